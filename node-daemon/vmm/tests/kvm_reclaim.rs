//! Reclaim on the real /dev/kvm and userfaultfd: a clone gives back the
//! pages that still equal its image and keeps every page it wrote; the guest
//! then reads exactly the same data as before (dropped lazy pages are
//! streamed back from the image by the fault handler, dropped copy-on-write
//! pages come back from the page cache).

mod kvm_common;

use std::sync::Arc;

use kvm_common::*;
use vmstream_vmm::capture::capture;
use vmstream_vmm::devices::mailbox::{Report, report, request};
use vmstream_vmm::guests::{FillSpec, GuestProgram, PageFill, TouchCommand, TouchPattern};
use vmstream_vmm::machine::{BootOptions, Machine, MachineConfig, MemoryBacking, VmShell};
use vmstream_vmm::memory::{LazyOptions, PAGE_SIZE, drop_image_equal_pages, range_footprint};
use vmstream_vmm::restore::{CloneMemory, CloneSource, Restored, restore};
use vmstream_vmm::vstate::run_loop::VcpuStatus;
use vmstream_vmm::vstate::vm::KvmHost;

const FILL: FillSpec = FillSpec {
    zero_percent: 20,
    duplicate_percent: 10,
    templates: 8,
    seed: 4242,
};

const DATA_FIRST_PAGE: u64 = 0x20_0000 / PAGE_SIZE as u64;

fn touch(machine: &Machine, cmd: &TouchCommand) -> Report {
    machine
        .mailbox()
        .call(request::TOUCH, cmd.args(), report::RESULT, REPORT_TIMEOUT)
        .unwrap_or_else(|e| panic!("touch {cmd:?}: {e}; vCPUs {:?}", status(machine)))
}

fn assert_touch(report: &Report, cmd: &TouchCommand, first_qword: impl FnMut(u64) -> u64) {
    let expected = cmd.expected(first_qword);
    assert_eq!(
        (report.args[0], report.args[1], report.args[2]),
        (expected.sum, expected.xor, expected.pages),
        "checksum of {cmd:?}"
    );
}

fn sequential(base_page: u64, count: u64, marker: u64) -> TouchCommand {
    TouchCommand {
        base_page,
        count,
        pattern: TouchPattern::Sequential,
        region_pages: count,
        stride: 1,
        marker,
        seed: 1,
    }
}

fn clone_of(
    host: &Arc<KvmHost>,
    config: MachineConfig,
    source: &CloneSource,
    memory: &CloneMemory,
) -> Restored {
    let shell = VmShell::create(host, config).expect("create clone shell");
    restore(shell, source, memory).expect("restore clone")
}

fn owned_bytes(machine: &Machine) -> u64 {
    let ram = machine.guest_ram();
    range_footprint(None, ram.host_addr() as usize, ram.len())
        .expect("footprint")
        .owned()
}

/// Runs the reclaim scenario on one clone: read region A (512 pages), write
/// region B (64 pages), write region C (8 pages) with each page's own image
/// value (so they stay image-equal but were written), then reclaim.
fn reclaim_keeps_writes_and_data(memory: CloneMemory, lazy: bool) {
    let Some(host) = kvm_or_skip("reclaim") else {
        return;
    };
    let config = config(1, 16);
    let dir = tempfile::tempdir().unwrap();
    let options = BootOptions {
        params: Vec::new(),
        fill: Some(FILL),
    };
    let source_vm = boot_ready(&host, config, GuestProgram::Memory, &options);
    capture(&source_vm, dir.path()).expect("capture memory guest");
    source_vm.stop();
    let source = CloneSource::open(dir.path()).expect("open image");
    let clone = clone_of(&host, config, &source, &memory);
    let machine = &clone.machine;

    let a = sequential(DATA_FIRST_PAGE, 512, 0);
    let b = sequential(DATA_FIRST_PAGE + 1024, 64, 0xfeed_5eed);
    assert_touch(&touch(machine, &a), &a, |p| FILL.first_qword(p));
    assert_touch(&touch(machine, &b), &b, |p| FILL.first_qword(p));
    // Region C: each page gets its own image value written back (one
    // single-page command per page: the marker is per command).
    let c_first = DATA_FIRST_PAGE + 2048;
    let c_pages: Vec<u64> = (c_first..c_first + 64)
        .filter(|&p| FILL.page(p) != PageFill::Zero)
        .take(8)
        .collect();
    for &p in &c_pages {
        let cmd = sequential(p, 1, FILL.first_qword(p));
        assert_touch(&touch(machine, &cmd), &cmd, |q| FILL.first_qword(q));
    }
    let nonzero_in_a = (a.base_page..a.base_page + a.count)
        .filter(|&p| FILL.page(p) != PageFill::Zero)
        .count() as u64;
    let before = owned_bytes(machine);

    // Counting only: nothing dropped, no pause.
    let counted = drop_image_equal_pages(machine, source.startup_pages(), 0, true).unwrap();
    assert_eq!(counted.dropped_pages, 0);
    assert_eq!(counted.paused, std::time::Duration::ZERO);
    // Lazy: every populated non-zero page of A (copies of the image) and C;
    // copy-on-write: only C (A's pages are page cache, not anonymous).
    let expected_equal = if lazy {
        nonzero_in_a + c_pages.len() as u64
    } else {
        c_pages.len() as u64
    };
    assert!(
        counted.image_equal_pages >= expected_equal,
        "{counted:?}, expected at least {expected_equal} image-equal pages"
    );
    // Some lazily filled pages outside A/B/C may equal the image (guest
    // stack and the like are in `keep` or written); never more than scanned.
    assert!(counted.image_equal_pages <= counted.scanned_pages);

    // A limit is respected.
    let limited = drop_image_equal_pages(machine, source.startup_pages(), 4 * 4096, true).unwrap();
    assert_eq!(limited.dropped_pages, 4, "{limited:?}");

    let all = drop_image_equal_pages(machine, source.startup_pages(), u64::MAX / 2, true).unwrap();
    assert_eq!(
        all.dropped_pages + limited.dropped_pages,
        counted.image_equal_pages,
        "{all:?}"
    );
    assert!(all.paused > std::time::Duration::ZERO);
    let after = owned_bytes(machine);
    eprintln!(
        "owned guest memory {before} -> {after} bytes; {counted:?}; dropped {} pages in {:?} (paused {:?})",
        all.dropped_pages + limited.dropped_pages,
        all.took,
        all.paused
    );
    assert!(
        after + (all.dropped_pages + limited.dropped_pages) * PAGE_SIZE as u64
            <= before + 16 * 4096,
        "owned memory did not shrink by the dropped pages: {before} -> {after}"
    );
    if let MemoryBacking::Lazy { memory, .. } = machine.backing() {
        for p in a.base_page..a.base_page + a.count {
            if FILL.page(p) != PageFill::Zero {
                assert!(
                    !memory.populated().get(p as usize),
                    "page {p} still populated"
                );
            }
        }
        for p in b.base_page..b.base_page + b.count {
            assert!(
                memory.populated().get(p as usize),
                "written page {p} dropped"
            );
        }
    }
    // Nothing more to drop right after.
    let again =
        drop_image_equal_pages(machine, source.startup_pages(), u64::MAX / 2, true).unwrap();
    assert_eq!(again.image_equal_pages, 0, "{again:?}");

    // The guest reads the same data: A from the image again, B its own
    // markers, C the image values it wrote.
    assert_touch(&touch(machine, &a), &a, |p| FILL.first_qword(p));
    let reread_b = TouchCommand { marker: 0, ..b };
    let got = touch(machine, &reread_b);
    assert_eq!(
        got.args[0],
        b.marker.wrapping_mul(b.count),
        "region B markers"
    );
    for &p in &c_pages {
        let cmd = sequential(p, 1, 0);
        assert_touch(&touch(machine, &cmd), &cmd, |q| FILL.first_qword(q));
    }
    // A reclaim of a paused VM leaves it paused.
    machine.pause().unwrap();
    drop_image_equal_pages(machine, source.startup_pages(), u64::MAX / 2, false).unwrap();
    assert!(
        machine
            .vcpus()
            .iter()
            .all(|v| matches!(v.status(), VcpuStatus::Paused)),
        "{:?}",
        status(machine)
    );
    machine.resume();
    assert_touch(&touch(machine, &a), &a, |p| FILL.first_qword(p));
}

#[test]
fn lazy_clone_gives_back_clean_pages_and_streams_them_again() {
    reclaim_keeps_writes_and_data(CloneMemory::Lazy(LazyOptions::default()), true);
}

#[test]
fn cow_clone_gives_back_image_equal_private_pages() {
    reclaim_keeps_writes_and_data(CloneMemory::CopyOnWrite, false);
}
