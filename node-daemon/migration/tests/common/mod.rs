//! Shared set-up for the migration tests: KVM/userfaultfd checks, booting
//! micro guests, capturing an image and starting a lazy clone from it, and
//! reading the counter guest's progress.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vmstream_migration::TargetOptions;
use vmstream_pagestream::ClusterToken;
use vmstream_test_support::{Need, require};
use vmstream_vmm::capture::capture;
use vmstream_vmm::devices::mailbox::{Mailbox, Report, report, request};
use vmstream_vmm::guests::{FillSpec, GuestProgram, TouchCommand, TouchPattern, counter_hash};
use vmstream_vmm::machine::{BootOptions, Machine, MachineConfig, VmShell};
use vmstream_vmm::memory::LazyOptions;
use vmstream_vmm::restore::{CloneMemory, CloneSource, restore};
use vmstream_vmm::vstate::vm::KvmHost;

pub const TIMEOUT: Duration = Duration::from_secs(30);
pub const INTERVAL: u64 = 256;

pub fn token() -> ClusterToken {
    ClusterToken::new(b"vmstream-migration-test-token-0123456789".to_vec()).unwrap()
}

pub fn host_or_skip(test: &str, extra: &[Need]) -> Option<Arc<KvmHost>> {
    let mut needs = vec![Need::Kvm, Need::Userfaultfd];
    needs.extend_from_slice(extra);
    if !require(test, &needs) {
        return None;
    }
    match KvmHost::open() {
        Ok(h) => Some(h),
        Err(e) => {
            vmstream_test_support::record_skip(test, &format!("KVM not usable: {e}"));
            None
        }
    }
}

pub fn config(vcpus: u8, mib: usize) -> MachineConfig {
    MachineConfig {
        vcpus,
        memory_bytes: mib << 20,
    }
}

pub fn boot(
    host: &Arc<KvmHost>,
    config: MachineConfig,
    guest: GuestProgram,
    options: &BootOptions,
) -> Machine {
    let shell = VmShell::create(host, config).expect("create shell");
    let machine = Machine::boot(shell, guest, options).expect("boot");
    machine
        .mailbox()
        .wait_report(0, TIMEOUT, |r| r.kind == report::READY)
        .expect("READY");
    machine
}

pub fn counter_options() -> BootOptions {
    BootOptions {
        params: vec![INTERVAL - 1],
        fill: None,
    }
}

pub fn fill() -> FillSpec {
    FillSpec {
        zero_percent: 30,
        duplicate_percent: 10,
        templates: 4,
        seed: 7,
    }
}

/// Boots `guest` with a fill, captures it into `dir`, and returns a lazy
/// clone of the image (the usual migration source: a VM cloned from a live
/// image) with the opened image.
pub fn lazy_clone(
    host: &Arc<KvmHost>,
    config: MachineConfig,
    guest: GuestProgram,
    options: &BootOptions,
    dir: &Path,
) -> (Machine, CloneSource) {
    let booted = boot(host, config, guest, options);
    capture(&booted, dir).expect("capture");
    booted.stop();
    let source = CloneSource::open(dir).expect("open image");
    let shell = VmShell::create(host, config).expect("shell");
    let restored =
        restore(shell, &source, &CloneMemory::Lazy(LazyOptions::default())).expect("restore");
    (restored.machine, source)
}

pub fn progress(mailbox: &Mailbox, vcpu: u8, since: u64) -> Report {
    mailbox
        .wait_report(since, TIMEOUT, |r| {
            r.kind == report::PROGRESS && r.vcpu == vcpu
        })
        .unwrap_or_else(|| panic!("no progress from vCPU {vcpu}"))
}

/// Checks a counter report is exact (memory == register, hash of every
/// step) and returns the counter.
pub fn check_progress(r: &Report) -> u64 {
    let [register, memory, hash, ..] = r.args;
    assert_eq!(
        memory, register,
        "memory counter and register disagree: {r:?}"
    );
    assert_eq!(
        hash,
        counter_hash(register),
        "a step was lost or repeated: {r:?}"
    );
    register
}

pub fn touch_all(region_first: u64, pages: u64) -> TouchCommand {
    TouchCommand {
        base_page: region_first,
        count: pages,
        pattern: TouchPattern::Sequential,
        region_pages: pages,
        stride: 1,
        marker: 0,
        seed: 1,
    }
}

pub fn touch(mailbox: &Mailbox, cmd: &TouchCommand) -> [u64; 3] {
    let r = mailbox
        .call(request::TOUCH, cmd.args(), report::RESULT, TIMEOUT)
        .expect("touch result");
    [r.args[0], r.args[1], r.args[2]]
}

pub fn target_options(
    host: &Arc<KvmHost>,
    image: Option<Arc<vmstream_vmm::image::PageStore>>,
) -> TargetOptions {
    TargetOptions::new(token(), Arc::clone(host), image)
}

pub fn vm_progress(vm: &Machine, vcpu: u8, since: u64) -> Report {
    progress(vm.mailbox(), vcpu, since)
}
