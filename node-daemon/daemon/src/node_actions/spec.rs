//! Translation from the API's types to the VM process's start spec (the
//! one place an API field becomes a `vm_protocol` value): boot sources,
//! memory fills, and a clone's memory backend.

use std::path::Path;

use vmstream_api::v1alpha1::{BootSource, Guest, MemoryBackend, MemoryFill};
use vmstream_vmm::guests::{FillSpec, GuestProgram};

use crate::vm_protocol::{CloneBackend, StartSpec};

/// The vmm fill of an API fill: the API's random and duplicate shares are
/// kept; everything else is zero (zero pages and unfilled pages are alike).
pub fn fill_spec(fill: &MemoryFill) -> FillSpec {
    let random = fill.random_percent.min(100);
    let duplicate = fill.duplicate_percent.min(100 - random);
    FillSpec {
        zero_percent: (100 - random - duplicate) as u8,
        duplicate_percent: duplicate as u8,
        templates: 16,
        seed: fill.seed,
    }
}

fn guest_program(guest: Guest) -> GuestProgram {
    match guest {
        Guest::Counter => GuestProgram::Counter,
        Guest::Memory => GuestProgram::Memory,
        Guest::Request => GuestProgram::Request,
    }
}

/// The boot start spec of a LiveImage's built-in `guest` source (`None`
/// for a `linux` source).
pub fn boot_spec(boot: &BootSource) -> Option<StartSpec> {
    let guest = boot.guest?;
    Some(StartSpec::Boot {
        guest: guest_program(guest),
        fill: boot.fill.as_ref().map(fill_spec),
        params: if guest == Guest::Counter {
            // Counter guests report progress every 4096 iterations.
            vec![4095]
        } else {
            Vec::new()
        },
        ready_timeout_ms: u64::from(boot.readiness.timeout_seconds) * 1000,
    })
}

/// The protocol's backend of a VMClone's `memoryBackend`.
pub fn clone_backend(backend: MemoryBackend) -> CloneBackend {
    match backend {
        MemoryBackend::Lazy => CloneBackend::Lazy,
        MemoryBackend::CopyOnWrite => CloneBackend::CopyOnWrite,
    }
}

/// The start spec of a clone of the local image in `image_dir`.
pub fn clone_spec(image_dir: &Path, backend: MemoryBackend) -> StartSpec {
    StartSpec::Clone {
        image: image_dir.to_path_buf(),
        backend: clone_backend(backend),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_keeps_random_and_duplicate_shares() {
        let fill = MemoryFill {
            seed: 3,
            random_percent: 50,
            zero_percent: 10,
            duplicate_percent: 20,
        };
        let spec = fill_spec(&fill);
        assert_eq!((spec.zero_percent, spec.duplicate_percent), (30, 20));
        assert_eq!(spec.seed, 3);
    }

    #[test]
    fn a_clone_spec_keeps_the_backend() {
        assert_eq!(
            clone_spec(Path::new("/img"), MemoryBackend::Lazy),
            StartSpec::Clone {
                image: "/img".into(),
                backend: CloneBackend::Lazy
            }
        );
        assert_eq!(
            clone_backend(MemoryBackend::default()),
            CloneBackend::CopyOnWrite
        );
    }
}
