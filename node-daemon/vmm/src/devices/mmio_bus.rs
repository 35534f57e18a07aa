//! Devices in the MMIO hole: guest accesses outside RAM that KVM reports as
//! MMIO exits go to the device whose window holds the address (a
//! virtio-mmio transport at `base..base + 4 KiB`). Addresses no window
//! holds read as zero and ignore writes (counted).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::virtio::MmioTransport;
use crate::arch::x86_64::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// A device the bus dispatches to, with offsets relative to its window.
pub trait MmioDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

impl<T: MmioTransport + ?Sized> MmioDevice for Mutex<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(offset, data);
    }
}

/// Error placing a device window.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmioBusError {
    #[error(
        "device window {base:#x}+{len:#x} is not inside the MMIO hole {MMIO_HOLE_START:#x}..{MMIO_HOLE_END:#x}"
    )]
    OutsideHole { base: u64, len: u64 },
    #[error("device window {base:#x}+{len:#x} overlaps the window at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Window {
    base: u64,
    len: u64,
    device: std::sync::Arc<dyn MmioDevice>,
}

/// The MMIO devices of one VM.
#[derive(Default)]
pub struct MmioBus {
    windows: Vec<Window>,
    unclaimed: AtomicU64,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let windows: Vec<(u64, u64)> = self.windows.iter().map(|w| (w.base, w.len)).collect();
        f.debug_struct("MmioBus")
            .field("windows", &windows)
            .field("unclaimed", &self.unclaimed())
            .finish()
    }
}

impl MmioBus {
    /// Places `device` at `base..base + len` (inside the MMIO hole, not
    /// overlapping another window).
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: std::sync::Arc<dyn MmioDevice>,
    ) -> Result<(), MmioBusError> {
        let end = base.checked_add(len);
        if len == 0 || base < MMIO_HOLE_START || end.is_none_or(|end| end > MMIO_HOLE_END) {
            return Err(MmioBusError::OutsideHole { base, len });
        }
        if let Some(other) = self
            .windows
            .iter()
            .find(|w| base < w.base + w.len && w.base < base + len)
        {
            return Err(MmioBusError::Overlap {
                base,
                len,
                other: other.base,
            });
        }
        self.windows.push(Window { base, len, device });
        Ok(())
    }

    fn find(&self, gpa: u64, len: usize) -> Option<(&Window, u64)> {
        self.windows
            .iter()
            .find(|w| gpa >= w.base && gpa + len as u64 <= w.base + w.len)
            .map(|w| (w, gpa - w.base))
    }

    /// A guest read at `gpa`; zero where no device is.
    pub fn read(&self, gpa: u64, data: &mut [u8]) {
        match self.find(gpa, data.len()) {
            Some((window, offset)) => window.device.read(offset, data),
            None => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                data.fill(0);
            }
        }
    }

    /// A guest write at `gpa`; ignored where no device is.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        match self.find(gpa, data.len()) {
            Some((window, offset)) => window.device.write(offset, data),
            None => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Accesses no window claimed.
    pub fn unclaimed(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }

    /// Number of device windows.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether the bus has no devices.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Remembers the last write and answers reads with offset + length.
    #[derive(Default)]
    struct Probe(Mutex<Vec<(u64, Vec<u8>)>>);

    impl MmioDevice for Probe {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill((offset as u8).wrapping_add(data.len() as u8));
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_window_with_relative_offsets() {
        let a = Arc::new(Probe::default());
        let b = Arc::new(Probe::default());
        let mut bus = MmioBus::default();
        bus.insert(0xd000_0000, 0x1000, a.clone()).unwrap();
        bus.insert(0xd000_1000, 0x1000, b.clone()).unwrap();
        let mut data = [0u8; 4];
        bus.read(0xd000_1070, &mut data);
        assert_eq!(data, [0x74; 4]);
        bus.write(0xd000_0050, &[1, 0, 0, 0]);
        assert_eq!(a.0.lock().unwrap().as_slice(), &[(0x50, vec![1, 0, 0, 0])]);
        assert!(b.0.lock().unwrap().is_empty());
        bus.read(0xd000_2000, &mut data);
        assert_eq!(data, [0; 4]);
        // An access straddling a window's end belongs to no device.
        bus.write(0xd000_0ffe, &[0; 4]);
        assert_eq!(bus.unclaimed(), 2);
    }

    #[test]
    fn refuses_windows_outside_the_hole_or_overlapping() {
        let device = Arc::new(Probe::default());
        let mut bus = MmioBus::default();
        bus.insert(0xd000_0000, 0x1000, device.clone()).unwrap();
        // (base, len) -> refused how
        let table = [
            (0x1000_0000, 0x1000, "outside"),
            (0xffff_f000, 0x2000, "outside"),
            (0xd000_0000, 0, "outside"),
            (0xd000_0800, 0x1000, "overlap"),
            (0xcfff_f800, 0x1000, "overlap"),
        ];
        for (base, len, how) in table {
            let error = bus.insert(base, len, device.clone()).unwrap_err();
            let matches = match how {
                "outside" => matches!(error, MmioBusError::OutsideHole { .. }),
                _ => matches!(
                    error,
                    MmioBusError::Overlap {
                        other: 0xd000_0000,
                        ..
                    }
                ),
            };
            assert!(matches, "{base:#x}+{len:#x}: {error}");
        }
        assert_eq!(bus.len(), 1);
    }
}
