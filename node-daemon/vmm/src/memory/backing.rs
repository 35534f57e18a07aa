//! What backs a machine's guest RAM (anonymous, a copy-on-write image, or
//! lazily filled userfaultfd memory), as capture and migration need to
//! know it.

use std::sync::Arc;

use super::{LazyMemory, PageSource};
use crate::image::PageStore;

/// What backs a machine's guest RAM, as capture needs to know it.
pub enum MemoryBacking {
    /// Anonymous memory (a booted guest).
    Anonymous,
    /// A private mapping of a complete local page store.
    CopyOnWrite(Arc<PageStore>),
    /// Pages brought in on first touch from `base`; capture takes pages
    /// that were never populated from `base`.
    Lazy {
        memory: Arc<LazyMemory>,
        base: Arc<PageStore>,
    },
    /// Pages brought in on first touch from any page source (e.g. another
    /// node's page server); capture first brings in every page that was
    /// never populated through `source`.
    LazyFrom {
        memory: Arc<LazyMemory>,
        source: Arc<dyn PageSource>,
    },
    /// Pages installed by the machine's owner through a
    /// [`crate::memory::PageInstaller`] (e.g. a live-migration target);
    /// a missing page goes to the owner's [`crate::memory::MissingPageHook`]
    /// and the guest waits for it. `image` is the live image the VM
    /// descends from, as held on this node, if any. Once every page is
    /// installed this is plain anonymous memory (capture and migration
    /// need that).
    Installed {
        memory: Arc<LazyMemory>,
        image: Option<Arc<PageStore>>,
    },
}

impl MemoryBacking {
    /// The userfaultfd-backed memory of a lazily streamed clone (or of
    /// installed memory).
    pub fn lazy_memory(&self) -> Option<&Arc<LazyMemory>> {
        match self {
            Self::Lazy { memory, .. }
            | Self::LazyFrom { memory, .. }
            | Self::Installed { memory, .. } => Some(memory),
            Self::Anonymous | Self::CopyOnWrite(_) => None,
        }
    }
}

impl std::fmt::Debug for MemoryBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::CopyOnWrite(store) => f.debug_tuple("CopyOnWrite").field(store).finish(),
            Self::Lazy { memory, base } => f
                .debug_struct("Lazy")
                .field("memory", memory)
                .field("base", base)
                .finish(),
            Self::LazyFrom { memory, source } => f
                .debug_struct("LazyFrom")
                .field("memory", memory)
                .field("source_pages", &source.pages())
                .finish(),
            Self::Installed { memory, image } => f
                .debug_struct("Installed")
                .field("memory", memory)
                .field("image", image)
                .finish(),
        }
    }
}
