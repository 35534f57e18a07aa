//! KVM state of a micro-VM: the host's KVM capabilities, VM creation and the
//! VM-wide state (irqchip, PIT, clock), each vCPU's state and its run loop,
//! and [`VmState`], the plain-data snapshot of all of it that a live image's
//! state file carries.

pub mod clock;
pub mod ram_access;
pub mod run_loop;
pub mod vcpu;
pub mod vm;

use serde::{Deserialize, Serialize};

use crate::devices::DeviceState;
use vcpu::VcpuState;
use vm::VmWideState;

/// Version of the [`VmState`] payload layout inside the state file. The
/// state file itself is versioned by the image format; this number lets the
/// VMM refuse a payload it would misread.
pub const VM_STATE_VERSION: u32 = 1;

/// Everything about a paused VM except its memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub memory_bytes: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmWideState,
    pub devices: DeviceState,
    /// Wall-clock time of the save, nanoseconds since the Unix epoch: a
    /// restore advances the guest's kvmclock by the time since (absent in
    /// images written before format 1.1, which resume the clock as saved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured_at_unix_ns: Option<u64>,
}

/// Error decoding a [`VmState`] payload.
#[derive(Debug, thiserror::Error)]
pub enum VmStateDecodeError {
    #[error("VM state payload is not valid")]
    Malformed(#[source] serde_json::Error),
    #[error(
        "VM state payload version {found} is not supported (this VMM reads version {VM_STATE_VERSION})"
    )]
    Version { found: u32 },
}

impl VmState {
    /// The payload bytes for the state file.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("VM state is plain data and always serialises")
    }

    /// Parses a payload written by [`VmState::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, VmStateDecodeError> {
        let state: Self = serde_json::from_slice(bytes).map_err(VmStateDecodeError::Malformed)?;
        if state.version != VM_STATE_VERSION {
            return Err(VmStateDecodeError::Version {
                found: state.version,
            });
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_state(version: u32) -> VmState {
        VmState {
            version,
            memory_bytes: 16 << 20,
            vcpus: Vec::new(),
            vm: VmWideState {
                pit: Default::default(),
                clock: Default::default(),
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
            },
            devices: DeviceState::default(),
            captured_at_unix_ns: None,
        }
    }

    #[test]
    fn payload_round_trips() {
        let mut state = empty_state(VM_STATE_VERSION);
        state.vm.clock.clock = 12345;
        state.devices.serial.transmitted = 7;
        let decoded = VmState::decode(&state.encode()).unwrap();
        assert_eq!(decoded.vm.clock.clock, 12345);
        assert_eq!(decoded.devices, state.devices);
    }

    #[test]
    fn payloads_without_the_optional_fields_still_decode() {
        // What a format-1.0 writer produced: no `virtio`, no capture time.
        let mut state = empty_state(VM_STATE_VERSION);
        let written = String::from_utf8(state.encode()).unwrap();
        assert!(!written.contains("virtio") && !written.contains("captured_at"));
        let decoded = VmState::decode(written.as_bytes()).unwrap();
        assert!(decoded.devices.virtio.is_empty());
        assert_eq!(decoded.captured_at_unix_ns, None);
        state.captured_at_unix_ns = Some(42);
        let decoded = VmState::decode(&state.encode()).unwrap();
        assert_eq!(decoded.captured_at_unix_ns, Some(42));
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let newer = empty_state(VM_STATE_VERSION + 1).encode();
        assert!(matches!(
            VmState::decode(&newer),
            Err(VmStateDecodeError::Version { found }) if found == VM_STATE_VERSION + 1
        ));
        assert!(matches!(
            VmState::decode(b"{not json"),
            Err(VmStateDecodeError::Malformed(_))
        ));
    }
}
