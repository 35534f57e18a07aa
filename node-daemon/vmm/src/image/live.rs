//! A complete live image: the state file and the page store of one
//! directory, opened and checked against each other (and, on request,
//! against the VM shell that will run it).

use std::path::{Path, PathBuf};

use super::error::ImageOpenError;
use super::state::{StateContents, StateFile};
use super::store::PageStore;

/// An opened, validated live image.
#[derive(Debug)]
pub struct LiveImage {
    dir: PathBuf,
    state: StateContents,
    pages: PageStore,
}

impl LiveImage {
    /// Opens `dir`: reads and validates `state.bin`, opens and validates the
    /// page store, and checks that both describe the same memory size.
    pub fn open(dir: &Path) -> Result<Self, ImageOpenError> {
        let state = StateFile::read(dir)?;
        let pages = PageStore::open(dir)?;
        check_consistent(dir, state.memory_size, pages.memory_size())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            state,
            pages,
        })
    }

    /// The image directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state file's contents (memory size, vCPU count, payload).
    pub fn state(&self) -> &StateContents {
        &self.state
    }

    /// The page store.
    pub fn pages(&self) -> &PageStore {
        &self.pages
    }

    /// Splits the image into its state and page store.
    pub fn into_parts(self) -> (StateContents, PageStore) {
        (self.state, self.pages)
    }

    /// Checks that the image's memory size equals a VM shell's guest RAM size
    /// (`shell_memory` bytes).
    pub fn check_fits(&self, shell_memory: usize) -> Result<(), ImageOpenError> {
        check_fits(&self.dir, self.state.memory_size, shell_memory as u64)
    }
}

/// The state file and the page store must describe the same memory size.
fn check_consistent(
    dir: &Path,
    state_memory: u64,
    store_memory: u64,
) -> Result<(), ImageOpenError> {
    if state_memory != store_memory {
        return Err(ImageOpenError::ImageInconsistent {
            dir: dir.to_path_buf(),
            state_memory,
            store_memory,
        });
    }
    Ok(())
}

/// An image can only run in a shell with exactly its memory size.
fn check_fits(dir: &Path, image: u64, shell: u64) -> Result<(), ImageOpenError> {
    if image != shell {
        return Err(ImageOpenError::MemorySizeMismatch {
            dir: dir.to_path_buf(),
            image,
            shell,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_must_match_exactly() {
        let d = Path::new("/img");
        assert!(check_consistent(d, 4096, 4096).is_ok());
        assert!(matches!(
            check_consistent(d, 8192, 4096),
            Err(ImageOpenError::ImageInconsistent { .. })
        ));
        assert!(check_fits(d, 4096, 4096).is_ok());
        let err = check_fits(d, 8192, 4096).unwrap_err();
        assert!(err.to_string().contains("8192") && err.to_string().contains("4096"));
    }
}
