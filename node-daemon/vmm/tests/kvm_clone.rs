//! Capture and clone start on the real /dev/kvm: clones resume exactly where
//! the image left off (registers and memory), many clones of one image run
//! at once and each reads exactly the image's data, clones serve requests,
//! clone writes stay private, and a VM captured twice gives two good images.

mod kvm_common;

use std::sync::Arc;
use std::time::Duration;

use kvm_common::*;
use vmstream_vmm::arch::x86_64::layout::STATE_ADDR;
use vmstream_vmm::capture::{capture, start_capture};
use vmstream_vmm::devices::mailbox::{Report, report, request};
use vmstream_vmm::guests::{
    FillSpec, GuestProgram, TouchCommand, TouchPattern, counter_hash, request_answer,
};
use vmstream_vmm::image::PageStore;
use vmstream_vmm::machine::{BootOptions, Machine, MachineConfig, VmShell};
use vmstream_vmm::memory::{LazyOptions, PAGE_SIZE};
use vmstream_vmm::restore::{CloneMemory, CloneSource, Restored, restore};
use vmstream_vmm::vstate::vm::KvmHost;

const INTERVAL: u64 = 256;

/// Lazy streaming where the vCPU thread fills missing pages itself (PVM
/// reports emulated accesses to them as MMIO exits).
const SIGBUS: LazyOptions = LazyOptions {
    handler_cpu: None,
    write_protect: false,
    sigbus: true,
    prefetch: false,
    prefetch_batch_pages: 64,
    fault_around_pages: 1,
};

fn image_u64(store: &PageStore, offset: u64) -> u64 {
    let mut page = vec![0u8; PAGE_SIZE];
    let index = offset as usize / PAGE_SIZE;
    if !store.is_present(index) {
        return 0;
    }
    store.read_page(index, &mut page).expect("read image page");
    let at = offset as usize % PAGE_SIZE;
    u64::from_le_bytes(page[at..at + 8].try_into().unwrap())
}

fn clone_of(
    host: &Arc<KvmHost>,
    config: MachineConfig,
    source: &CloneSource,
    memory: &CloneMemory,
) -> Restored {
    let shell = VmShell::create(host, config).expect("create shell");
    restore(shell, source, memory).expect("restore clone")
}

fn progress_of(machine: &Machine, vcpu: u8, since: u64) -> Report {
    machine
        .mailbox()
        .wait_report(since, REPORT_TIMEOUT, |r| {
            r.kind == report::PROGRESS && r.vcpu == vcpu
        })
        .unwrap_or_else(|| panic!("no progress from vCPU {vcpu}: {:?}", status(machine)))
}

#[test]
fn counter_clone_continues_from_the_captured_counters() {
    let Some(host) = kvm_or_skip("counter_clone_continues_from_the_captured_counters") else {
        return;
    };
    let config = config(2, 16);
    let options = BootOptions {
        params: vec![INTERVAL - 1],
        fill: None,
    };
    let source_vm = boot_ready(&host, config, GuestProgram::Counter, &options);
    // Let it count well past a few intervals so a restart from zero is visible.
    let since = source_vm.mailbox().next_report_index();
    let mut before = Vec::new();
    for vcpu in 0..2 {
        let mut last = progress_of(&source_vm, vcpu, since);
        while last.args[0] < 20 * INTERVAL {
            last = progress_of(&source_vm, vcpu, last.index + 1);
        }
        before.push(last.args[0]);
    }
    let dir = tempfile::tempdir().unwrap();
    let report = capture(&source_vm, dir.path()).expect("capture");
    eprintln!(
        "capture: {:?} state {} bytes pages {:?}",
        report.timings, report.state_bytes, report.pages
    );

    let source = CloneSource::open(dir.path()).expect("open image");
    let mut captured = Vec::new();
    for vcpu in 0..2u64 {
        let counter = image_u64(source.pages(), STATE_ADDR + 8 * vcpu);
        let register = source.state().vcpus[vcpu as usize].regs.r12;
        assert!(
            counter == register || counter + 1 == register,
            "image memory counter {counter} and register {register} of vCPU {vcpu} are one instruction apart at most"
        );
        assert!(register >= before[vcpu as usize]);
        captured.push(register);
    }

    let clone = clone_of(&host, config, &source, &CloneMemory::CopyOnWrite);
    eprintln!(
        "restore: {:?}, first entry {:?}, first exit {:?}",
        clone.timings,
        clone.first_entry(),
        clone.first_exit(Duration::from_secs(5))
    );
    for vcpu in 0..2u8 {
        let first = progress_of(&clone.machine, vcpu, 0);
        let [register, memory, hash, index, ..] = first.args;
        assert_eq!(index, u64::from(vcpu));
        assert_eq!(
            memory, register,
            "clone's memory counter follows its register"
        );
        assert_eq!(
            hash,
            counter_hash(register),
            "clone's hash register is exact"
        );
        let at_capture = captured[usize::from(vcpu)];
        assert!(
            register > at_capture && register <= at_capture + INTERVAL,
            "clone vCPU {vcpu} reported {register}; the image was captured at {at_capture}"
        );
    }
    // The source keeps running past the capture.
    let after = progress_of(&source_vm, 0, source_vm.mailbox().next_report_index());
    assert!(after.args[0] > captured[0]);
}

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

const FILL: FillSpec = FillSpec {
    zero_percent: 20,
    duplicate_percent: 20,
    templates: 16,
    seed: 99,
};

fn memory_source(host: &Arc<KvmHost>, config: MachineConfig, dir: &std::path::Path) -> Machine {
    let options = BootOptions {
        params: Vec::new(),
        fill: Some(FILL),
    };
    let vm = boot_ready(host, config, GuestProgram::Memory, &options);
    capture(&vm, dir).expect("capture memory guest");
    vm
}

fn data_pages(config: MachineConfig) -> (u64, u64) {
    let first = 0x20_0000 / PAGE_SIZE as u64;
    (first, config.memory_bytes as u64 / PAGE_SIZE as u64 - first)
}

#[test]
fn twenty_clones_of_one_image_each_read_the_image_data() {
    let Some(host) = kvm_or_skip("twenty_clones_of_one_image_each_read_the_image_data") else {
        return;
    };
    let config = config(1, 32);
    let dir = tempfile::tempdir().unwrap();
    let _source_vm = memory_source(&host, config, dir.path());
    let source = CloneSource::open(dir.path()).expect("open image");
    let (base_page, region_pages) = data_pages(config);
    let clones: Vec<Restored> = (0..20)
        .map(|i| {
            let memory = match i % 3 {
                0 => CloneMemory::CopyOnWrite,
                1 => CloneMemory::Lazy(LazyOptions::default()),
                _ => CloneMemory::Lazy(SIGBUS),
            };
            clone_of(&host, config, &source, &memory)
        })
        .collect();
    let totals: Vec<_> = clones.iter().map(|c| c.timings.total).collect();
    eprintln!("20 restores, calling-thread time each: {totals:?}");
    std::thread::scope(|scope| {
        for (i, clone) in clones.iter().enumerate() {
            scope.spawn(move || {
                let pattern = [
                    TouchPattern::Sequential,
                    TouchPattern::Random,
                    TouchPattern::HotCold,
                ][i % 3];
                let cmd = TouchCommand {
                    base_page,
                    count: 300,
                    pattern,
                    region_pages,
                    stride: 13,
                    marker: 0,
                    seed: 1 + i as u64,
                };
                let result = touch(&clone.machine, &cmd);
                assert_touch(&result, &cmd, |page| FILL.first_qword(page));
            });
        }
    });
}

#[test]
fn lazy_and_cow_clones_keep_writes_private() {
    let Some(host) = kvm_or_skip("lazy_and_cow_clones_keep_writes_private") else {
        return;
    };
    let config = config(1, 16);
    let dir = tempfile::tempdir().unwrap();
    let _source_vm = memory_source(&host, config, dir.path());
    let source = CloneSource::open(dir.path()).expect("open image");
    let (base_page, region_pages) = data_pages(config);
    let writer = clone_of(&host, config, &source, &CloneMemory::CopyOnWrite);
    let lazy_writer = clone_of(
        &host,
        config,
        &source,
        &CloneMemory::Lazy(LazyOptions::default()),
    );
    let sigbus_writer = clone_of(&host, config, &source, &CloneMemory::Lazy(SIGBUS));
    // Clones running alongside the writers.
    let readers = [
        clone_of(&host, config, &source, &CloneMemory::CopyOnWrite),
        clone_of(
            &host,
            config,
            &source,
            &CloneMemory::Lazy(LazyOptions::default()),
        ),
    ];
    let write = TouchCommand {
        base_page,
        count: region_pages,
        pattern: TouchPattern::Sequential,
        region_pages,
        stride: 1,
        marker: 0x5eed_f00d,
        seed: 1,
    };
    for clone in [&writer, &lazy_writer, &sigbus_writer] {
        let result = touch(&clone.machine, &write);
        assert_touch(&result, &write, |page| FILL.first_qword(page));
        // A second pass sees its own markers.
        let reread = TouchCommand { marker: 0, ..write };
        let again = touch(&clone.machine, &reread);
        assert_eq!(again.args[0], write.marker.wrapping_mul(region_pages));
    }
    // The image file, the clones that ran alongside and a fresh clone still
    // hold the original data.
    let store = PageStore::open(dir.path()).expect("reopen page store");
    for page in base_page..base_page + region_pages {
        assert_eq!(
            image_u64(&store, page * PAGE_SIZE as u64),
            FILL.first_qword(page),
            "image page {page}"
        );
    }
    let fresh = clone_of(&host, config, &source, &CloneMemory::CopyOnWrite);
    let read = TouchCommand { marker: 0, ..write };
    for reader in readers.iter().chain([&fresh]) {
        let result = touch(&reader.machine, &read);
        assert_touch(&result, &read, |page| FILL.first_qword(page));
    }
}

#[test]
fn request_clone_answers_with_the_captured_counter() {
    let Some(host) = kvm_or_skip("request_clone_answers_with_the_captured_counter") else {
        return;
    };
    let config = config(1, 16);
    let vm = boot_ready(
        &host,
        config,
        GuestProgram::Request,
        &BootOptions::default(),
    );
    for n in 0..3 {
        vm.mailbox()
            .call(
                request::ANSWER,
                [n, 0, 0, 0, 0, 0, 0, 0],
                report::RESPONSE,
                REPORT_TIMEOUT,
            )
            .expect("answer");
    }
    let dir = tempfile::tempdir().unwrap();
    capture(&vm, dir.path()).expect("capture");
    let source = CloneSource::open(dir.path()).expect("open image");
    for memory in [
        CloneMemory::CopyOnWrite,
        CloneMemory::Lazy(LazyOptions::default()),
        CloneMemory::Lazy(SIGBUS),
    ] {
        let clone = clone_of(&host, config, &source, &memory);
        let answer = clone
            .machine
            .mailbox()
            .call(
                request::ANSWER,
                [41, 0, 0, 0, 0, 0, 0, 0],
                report::RESPONSE,
                REPORT_TIMEOUT,
            )
            .unwrap_or_else(|e| {
                panic!(
                    "{memory:?} clone answers: {e}; vCPUs {:?} stats {:?}",
                    status(&clone.machine),
                    clone.machine.stats()
                )
            });
        assert_eq!(answer.args[0], request_answer(41, 4), "{memory:?}");
        eprintln!(
            "{memory:?}: restore {:?} first exit {:?}",
            clone.timings.total,
            clone.first_exit(Duration::ZERO)
        );
    }
    // The source is unaffected by its clones.
    let answer = vm
        .mailbox()
        .call(
            request::ANSWER,
            [1, 0, 0, 0, 0, 0, 0, 0],
            report::RESPONSE,
            REPORT_TIMEOUT,
        )
        .expect("source answers");
    assert_eq!(answer.args[0], request_answer(1, 4));
}

#[test]
fn captured_twice_gives_two_good_images() {
    let Some(host) = kvm_or_skip("captured_twice_gives_two_good_images") else {
        return;
    };
    let config = config(1, 16);
    let vm = boot_ready(
        &host,
        config,
        GuestProgram::Request,
        &BootOptions::default(),
    );
    let ask = |machine: &Machine, n: u64| {
        machine
            .mailbox()
            .call(
                request::ANSWER,
                [n, 0, 0, 0, 0, 0, 0, 0],
                report::RESPONSE,
                REPORT_TIMEOUT,
            )
            .expect("answer")
            .args[0]
    };
    ask(&vm, 1);
    let first = tempfile::tempdir().unwrap();
    let pending = start_capture(&vm, first.path()).expect("first capture");
    eprintln!("source paused {:?}", pending.timings().source_paused);
    // The source runs while the first image is still being written.
    ask(&vm, 2);
    pending.wait().expect("first capture completes");
    ask(&vm, 3);
    let second = tempfile::tempdir().unwrap();
    capture(&vm, second.path()).expect("second capture");

    let one = CloneSource::open(first.path()).expect("first image");
    let two = CloneSource::open(second.path()).expect("second image");
    let a = clone_of(&host, config, &one, &CloneMemory::CopyOnWrite);
    let b = clone_of(&host, config, &two, &CloneMemory::CopyOnWrite);
    assert_eq!(ask(&a.machine, 10), request_answer(10, 2));
    assert_eq!(ask(&b.machine, 10), request_answer(10, 4));
}

#[test]
fn clones_recapture_with_their_writes_and_the_base_pages() {
    let Some(host) = kvm_or_skip("clones_recapture_with_their_writes_and_the_base_pages") else {
        return;
    };
    let config = config(1, 16);
    let dir = tempfile::tempdir().unwrap();
    let _source_vm = memory_source(&host, config, dir.path());
    let base = CloneSource::open(dir.path()).expect("open image");
    let (base_page, region_pages) = data_pages(config);
    let memories = [
        CloneMemory::CopyOnWrite,
        CloneMemory::Lazy(LazyOptions::default()),
        CloneMemory::Lazy(SIGBUS),
    ];
    for memory in memories {
        let lazy = clone_of(&host, config, &base, &memory);
        // Write markers into the first 100 data pages only.
        let write = TouchCommand {
            base_page,
            count: 100,
            pattern: TouchPattern::Sequential,
            region_pages,
            stride: 1,
            marker: 0xabcd,
            seed: 1,
        };
        touch(&lazy.machine, &write);
        let again = tempfile::tempdir().unwrap();
        let report = capture(&lazy.machine, again.path()).expect("capture clone");
        let lazily = matches!(memory, CloneMemory::Lazy(_));
        assert!(
            !lazily || report.pages.pages_from_base > 1000,
            "untouched pages of a lazy clone come from the base image: {:?}",
            report.pages
        );
        let image = CloneSource::open(again.path()).expect("recaptured image");
        let clone = clone_of(&host, config, &image, &CloneMemory::CopyOnWrite);
        let read_all = TouchCommand {
            count: region_pages,
            marker: 0,
            ..write
        };
        let result = touch(&clone.machine, &read_all);
        assert_touch(&result, &read_all, |page| {
            if page < base_page + 100 {
                write.marker
            } else {
                FILL.first_qword(page)
            }
        });
    }
}

#[test]
fn an_image_does_not_carry_the_sources_queued_requests() {
    let Some(host) = kvm_or_skip("an_image_does_not_carry_the_sources_queued_requests") else {
        return;
    };
    let options = BootOptions {
        params: vec![INTERVAL - 1],
        fill: None,
    };
    // The counter guest never polls the mailbox: the request stays queued.
    let source_vm = boot_ready(&host, config(1, 16), GuestProgram::Counter, &options);
    source_vm.mailbox().submit(0, request::TOUCH, [1; 8]);
    let dir = tempfile::tempdir().unwrap();
    capture(&source_vm, dir.path()).expect("capture");
    assert_eq!(
        source_vm.mailbox().save().pending.len(),
        1,
        "the source keeps its caller's request"
    );
    source_vm.stop();
    let image = CloneSource::open(dir.path()).expect("open image");
    assert!(
        image.state().devices.mailbox.pending.is_empty(),
        "clones would apply a request nobody waits for: {:?}",
        image.state().devices.mailbox.pending
    );
}
