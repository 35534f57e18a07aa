//! The size and shape of a micro-VM ([`MachineConfig`]) and the checks a
//! configuration must pass before a shell is made for it.

use crate::arch::x86_64::layout::{self, MAX_VCPUS, MIN_RAM};

/// Size and shape of a micro-VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineConfig {
    /// Number of vCPUs (1..=8).
    pub vcpus: u8,
    /// Guest RAM in bytes (a multiple of 2 MiB, at least 4 MiB).
    pub memory_bytes: usize,
}

/// Error in a machine configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MachineConfigError {
    #[error("vCPU count {0} is outside 1..={MAX_VCPUS}")]
    VcpuCount(u8),
    #[error("memory size {0} is not a multiple of 2 MiB of at least {MIN_RAM} bytes")]
    MemorySize(usize),
    #[error("memory size {0} needs more address space than the identity map covers")]
    MemoryTooLarge(usize),
}

impl MachineConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), MachineConfigError> {
        if self.vcpus == 0 || usize::from(self.vcpus) > MAX_VCPUS {
            return Err(MachineConfigError::VcpuCount(self.vcpus));
        }
        if self.memory_bytes < MIN_RAM as usize || !self.memory_bytes.is_multiple_of(2 << 20) {
            return Err(MachineConfigError::MemorySize(self.memory_bytes));
        }
        if layout::gpa_end(self.memory_bytes as u64) > layout::MAX_MAPPED_GPA {
            return Err(MachineConfigError::MemoryTooLarge(self.memory_bytes));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let ok = MachineConfig {
            vcpus: 2,
            memory_bytes: 64 << 20,
        };
        assert_eq!(ok.validate(), Ok(()));
        assert!(MachineConfig { vcpus: 0, ..ok }.validate().is_err());
        assert!(MachineConfig { vcpus: 9, ..ok }.validate().is_err());
        assert!(
            MachineConfig {
                memory_bytes: 3 << 20,
                ..ok
            }
            .validate()
            .is_err()
        );
        assert!(
            MachineConfig {
                memory_bytes: (64 << 20) + 4096,
                ..ok
            }
            .validate()
            .is_err()
        );
    }
}
