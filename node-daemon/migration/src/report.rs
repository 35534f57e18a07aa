//! What one migration did, for the operator's VMMigration status and the
//! benchmarks: downtime, total time, bytes and pages moved, faults and the
//! time the guest waited for them.

use serde::{Deserialize, Serialize};

use crate::plan::MigrationMode;
use crate::target_memory::TargetMemoryStats;

/// The target's side of a migration, sent to the source with Complete.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetSide {
    /// Creating the VM shell (off the downtime path when made early).
    pub shell_create_ms: f64,
    /// Decoding and setting the vCPU and VM state.
    pub set_state_ms: f64,
    /// Go received → vCPUs started.
    pub start_ms: f64,
    /// Missing-page faults read by the target's handler.
    pub faults: u64,
    /// Pages requested from the source because of faults.
    pub pages_requested_by_faults: u64,
    /// Total time faulting guest threads waited.
    pub fault_wait_ms: f64,
    /// Longest single fault wait.
    pub max_fault_wait_ms: f64,
    /// Pages installed from received data.
    pub pages_received: u64,
    /// Received pages dropped because already installed.
    pub duplicate_pages: u64,
    /// Pages installed from the local live image.
    pub pages_from_image: u64,
}

impl TargetSide {
    /// Fills the memory counters.
    pub fn with_memory(mut self, m: &TargetMemoryStats) -> Self {
        self.faults = m.faults;
        self.pages_requested_by_faults = m.pages_requested;
        self.fault_wait_ms = m.fault_wait_ns as f64 / 1e6;
        self.max_fault_wait_ms = m.max_fault_wait_ns as f64 / 1e6;
        self.pages_received = m.pages_received;
        self.duplicate_pages = m.duplicates;
        self.pages_from_image = m.pages_from_image;
        self
    }
}

/// One migration, as the source saw it (with the target's counters).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub mode: Option<MigrationMode>,
    /// Source pause requested → the target reported its vCPUs started
    /// (measured on the source's clock: an upper bound by the one-way
    /// latency of the Resumed message).
    pub downtime_ms: f64,
    /// Pausing the source's vCPUs.
    pub pause_ms: f64,
    /// Saving the vCPU, VM and device state.
    pub save_state_ms: f64,
    /// Start (connect) → the target reported every page arrived.
    pub total_ms: f64,
    /// Precopy rounds run while the VM ran on the source.
    pub precopy_rounds: u32,
    /// Pages copied during precopy rounds (data only).
    pub precopy_pages: u64,
    /// Pages copied while the VM was paused (precopy's stop-and-copy).
    pub stop_and_copy_pages: u64,
    /// Pages the source may have changed since the image (touched).
    pub touched_pages: u64,
    /// Page data frames' pages sent (all phases, fault answers included).
    pub pages_sent: u64,
    /// Pages announced as identical to the image (no data).
    pub pages_clean: u64,
    /// Pages announced as zero (no data).
    pub pages_zero: u64,
    /// Pages sent more than once (fault answer and push, reconnections,
    /// precopy resends).
    pub pages_resent: u64,
    /// Every byte written to the target (headers, state, pages).
    pub bytes_sent: u64,
    /// Page data bytes among them.
    pub page_bytes_sent: u64,
    /// Fault requests the source answered.
    pub fault_requests: u64,
    /// Connections re-established after a link loss.
    pub reconnects: u32,
    /// State payload size.
    pub state_bytes: u64,
    /// How precopy/hybrid rounds found pages written since they were sent:
    /// `kvm-dirty-log`, or `content-hash` when dirty logging could not be
    /// switched on; empty for postcopy.
    #[serde(default)]
    pub dirty_tracking: String,
    pub target: TargetSide,
}
