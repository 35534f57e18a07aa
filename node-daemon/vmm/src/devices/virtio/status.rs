//! The device status state machine as a pure decision: what a driver's
//! write to Status means in the current status, and whether the features it
//! accepted may be confirmed with FEATURES_OK.
//!
//! ```text
//!  0 ──ACK──▶ 1 ──DRIVER──▶ 3 ──FEATURES_OK──▶ 11 ──DRIVER_OK──▶ 15
//!  any ──0──▶ reset        any ──FAILED──▶ |FAILED (driver gave up)
//!  NEEDS_RESET (set by the device): only 0 or FAILED are accepted
//! ```

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};

use super::errors::RegisterError;

const STEPS: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];

/// What a Status write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// 0: reset the device.
    Reset,
    /// The driver set FAILED.
    Failed,
    /// The same value again.
    Unchanged,
    /// The next bit in order (one of ACKNOWLEDGE, DRIVER, FEATURES_OK,
    /// DRIVER_OK); the new status is `current | bit`.
    Step(u32),
}

/// Decides a driver's write of `value` in status `current`.
pub fn status_change(current: u32, value: u32) -> Result<StatusChange, RegisterError> {
    if value == 0 {
        return Ok(StatusChange::Reset);
    }
    if value & VIRTIO_CONFIG_S_FAILED != 0 {
        return Ok(StatusChange::Failed);
    }
    if current & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
        return Err(RegisterError::NeedsReset { to: value });
    }
    if value == current {
        return Ok(StatusChange::Unchanged);
    }
    let refused = RegisterError::StatusOrder {
        from: current,
        to: value,
    };
    let done = STEPS.iter().take_while(|&&s| current & s != 0).count();
    let prefix = STEPS[..done].iter().fold(0, |a, s| a | s);
    match STEPS.get(done) {
        Some(&step) if current == prefix && value == current | step => Ok(StatusChange::Step(step)),
        _ => Err(refused),
    }
}

/// Whether FEATURES_OK may be set with `acked` when `offered` was offered.
pub fn check_features(acked: u64, offered: u64) -> Result<(), RegisterError> {
    if acked & !offered != 0 {
        return Err(RegisterError::FeaturesNotOffered { acked, offered });
    }
    if acked & (1 << VIRTIO_F_VERSION_1) == 0 {
        return Err(RegisterError::Version1Missing { acked });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_bits_are_accepted_one_at_a_time_in_order() {
        let table = [
            (0, 1, Some(StatusChange::Step(1))),
            (1, 3, Some(StatusChange::Step(2))),
            (3, 11, Some(StatusChange::Step(8))),
            (11, 15, Some(StatusChange::Step(4))),
            (15, 15, Some(StatusChange::Unchanged)),
            (15, 0, Some(StatusChange::Reset)),
            (3, 0x83, Some(StatusChange::Failed)),
            (0, 3, None),
            (0, 2, None),
            (1, 5, None),
            (3, 7, None),
            (11, 27, None),
            (15, 31, None),
            (15, 11, None),
            (0x4f, 0x4f, None),
            (0x4f, 0, Some(StatusChange::Reset)),
        ];
        for (current, value, expected) in table {
            assert_eq!(
                status_change(current, value).ok(),
                expected,
                "{current:#x} <- {value:#x}"
            );
        }
    }

    #[test]
    fn features_must_be_offered_and_include_version_1() {
        let v1 = 1u64 << 32;
        assert!(check_features(v1, v1 | 1).is_ok());
        assert!(check_features(v1 | 1, v1 | 1).is_ok());
        assert!(matches!(
            check_features(v1 | 2, v1 | 1),
            Err(RegisterError::FeaturesNotOffered { .. })
        ));
        assert!(matches!(
            check_features(1, v1 | 1),
            Err(RegisterError::Version1Missing { .. })
        ));
    }
}
