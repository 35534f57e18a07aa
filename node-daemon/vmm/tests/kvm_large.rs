//! The one large case: a 3.5 GiB guest whose RAM spans both memory slots
//! (below the 3 GiB MMIO hole and above 4 GiB). The memory guest's reads
//! across the hole match the host fill before and after capture, in a
//! copy-on-write clone and in a lazily streamed clone.

mod kvm_common;

use std::time::Instant;

use kvm_common::*;
use vmstream_vmm::capture::capture;
use vmstream_vmm::devices::mailbox::{report, request};
use vmstream_vmm::guests::{FillSpec, GuestProgram, TouchCommand, TouchPattern};
use vmstream_vmm::machine::{BootOptions, Machine, VmShell};
use vmstream_vmm::memory::{LazyOptions, PAGE_SIZE};
use vmstream_vmm::restore::{CloneMemory, CloneSource, restore};

const FILL: FillSpec = FillSpec {
    zero_percent: 97,
    duplicate_percent: 1,
    templates: 4,
    seed: 2024,
};

fn check_touches(machine: &Machine, label: &str) {
    let pages = machine.config().memory_bytes as u64 / PAGE_SIZE as u64;
    let hole_page = (3u64 << 30) / PAGE_SIZE as u64;
    let across_hole = TouchCommand {
        base_page: hole_page - 512,
        count: 1024,
        pattern: TouchPattern::Sequential,
        region_pages: 1024,
        stride: 1,
        marker: 0,
        seed: 1,
    };
    let everywhere = TouchCommand {
        base_page: 512,
        count: 400,
        pattern: TouchPattern::Random,
        region_pages: pages - 512,
        stride: 0,
        marker: 0,
        seed: 77,
    };
    for cmd in [across_hole, everywhere] {
        cmd.validate(pages).expect("valid command");
        let start = Instant::now();
        let result = machine
            .mailbox()
            .call(request::TOUCH, cmd.args(), report::RESULT, REPORT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{label}: {e}; vCPUs {:?}", status(machine)));
        let expected = cmd.expected(|page| FILL.first_qword(page));
        assert_eq!(
            (result.args[0], result.args[1], result.args[2]),
            (expected.sum, expected.xor, expected.pages),
            "{label}: {cmd:?}"
        );
        eprintln!(
            "{label}: {:?} touch of {} pages took {:?}",
            cmd.pattern,
            cmd.count,
            start.elapsed()
        );
    }
}

#[test]
fn guest_ram_above_4_gib_is_captured_and_cloned() {
    let Some(host) = kvm_or_skip("guest_ram_above_4_gib_is_captured_and_cloned") else {
        return;
    };
    let config = config(2, 3584);
    let start = Instant::now();
    let shell = VmShell::create(&host, config).expect("shell");
    eprintln!("3.5 GiB shell created in {:?}", shell.created_in());
    let options = BootOptions {
        params: Vec::new(),
        fill: Some(FILL),
    };
    let source_vm = Machine::boot(shell, GuestProgram::Memory, &options).expect("boot");
    wait_ready(&source_vm);
    eprintln!("booted and filled in {:?}", start.elapsed());
    check_touches(&source_vm, "source");

    let dir = tempfile::tempdir().unwrap();
    let report = capture(&source_vm, dir.path()).expect("capture");
    eprintln!(
        "capture of 3.5 GiB: {:?}, {:?}",
        report.timings, report.pages
    );
    assert!(report.pages.nonzero_pages < report.pages.pages / 10);

    let source = CloneSource::open(dir.path()).expect("open image");
    for memory in [
        CloneMemory::CopyOnWrite,
        CloneMemory::Lazy(LazyOptions::default()),
    ] {
        let mut shell = VmShell::create(&host, config).expect("shell");
        if let CloneMemory::Lazy(options) = &memory {
            shell
                .prepare_lazy(options.clone())
                .expect("register userfaultfd");
        }
        let clone = restore(shell, &source, &memory).expect("restore");
        eprintln!("{memory:?}: restore {:?}", clone.timings);
        check_touches(&clone.machine, &format!("{memory:?} clone"));
    }
}
