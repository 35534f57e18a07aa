//! Shared set-up for the tests that run micro-VMs on the real /dev/kvm: skip
//! with a clear message when KVM is not usable, and small helpers to boot
//! guests and wait for their reports.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use vmstream_vmm::devices::mailbox::{Report, report};
use vmstream_vmm::guests::GuestProgram;
use vmstream_vmm::machine::{BootOptions, Machine, MachineConfig, VmShell};
use vmstream_vmm::vstate::vm::KvmHost;

/// Generous timeout for guest reports (instructions are emulated here).
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(20);

/// The host's KVM, or None (with a printed reason) when tests must skip.
pub fn kvm_or_skip(test: &str) -> Option<Arc<KvmHost>> {
    if !KvmHost::is_available() {
        eprintln!(
            "SKIPPED {test}: /dev/kvm is missing or not accessible (needs root or the kvm group)"
        );
        return None;
    }
    match KvmHost::open() {
        Ok(host) => Some(host),
        Err(error) => {
            eprintln!("SKIPPED {test}: KVM is not usable: {error}");
            None
        }
    }
}

pub fn config(vcpus: u8, memory_mib: usize) -> MachineConfig {
    MachineConfig {
        vcpus,
        memory_bytes: memory_mib << 20,
    }
}

/// Boots `guest` and waits for the READY report of vCPU 0.
pub fn boot_ready(
    host: &Arc<KvmHost>,
    config: MachineConfig,
    guest: GuestProgram,
    options: &BootOptions,
) -> Machine {
    let shell = VmShell::create(host, config).expect("create VM shell");
    let machine = Machine::boot(shell, guest, options).expect("boot guest");
    wait_ready(&machine);
    machine
}

/// Waits for a READY report.
pub fn wait_ready(machine: &Machine) -> Report {
    machine
        .mailbox()
        .wait_report(0, REPORT_TIMEOUT, |r| r.kind == report::READY)
        .unwrap_or_else(|| panic!("guest did not report READY; vCPUs {:?}", status(machine)))
}

pub fn status(machine: &Machine) -> Vec<String> {
    machine
        .vcpus()
        .iter()
        .map(|v| format!("{:?}", v.status()))
        .collect()
}
