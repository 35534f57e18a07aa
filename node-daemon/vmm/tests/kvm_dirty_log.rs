//! KVM dirty logging on a running machine (`Machine::start_dirty_log`,
//! `take_dirty_pages`): pages the guest writes show up, pages it only reads
//! do not, a second read of the log holds only what was written since, and
//! the mailbox page (written by the host) is always included.

mod kvm_common;

use kvm_common::*;
use vmstream_vmm::arch::x86_64::layout::{DATA_START, MAILBOX_ADDR};
use vmstream_vmm::devices::mailbox::{report, request};
use vmstream_vmm::guests::{GuestProgram, TouchCommand, TouchPattern};
use vmstream_vmm::machine::{BootOptions, Machine};
use vmstream_vmm::memory::PAGE_SIZE;

fn is_set(words: &[u64], page: u64) -> bool {
    words[page as usize / 64] & (1 << (page % 64)) != 0
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

fn touch(machine: &Machine, cmd: &TouchCommand) {
    machine
        .mailbox()
        .call(request::TOUCH, cmd.args(), report::RESULT, REPORT_TIMEOUT)
        .expect("touch");
}

#[test]
fn dirty_log_holds_exactly_the_written_pages() {
    let Some(host) = kvm_or_skip("dirty_log_holds_exactly_the_written_pages") else {
        return;
    };
    eprintln!(
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: {}",
        host.manual_dirty_log_protect()
    );
    let machine = boot_ready(
        &host,
        config(1, 16),
        GuestProgram::Memory,
        &BootOptions::default(),
    );
    let data = DATA_START / PAGE_SIZE as u64;
    // Bring the pages in before logging starts (first touches of anonymous
    // memory are writes of the kernel's zero page mapping, not the guest's).
    touch(&machine, &sequential(data, 64, 0));
    let started = std::time::Instant::now();
    machine.start_dirty_log().expect("start dirty log");
    eprintln!("start_dirty_log: {:?}", started.elapsed());

    let written = sequential(data + 8, 8, 0xfeed);
    touch(&machine, &written);
    touch(&machine, &sequential(data + 32, 8, 0)); // reads only
    let dirty = machine.take_dirty_pages().expect("dirty pages");
    for page in data + 8..data + 16 {
        assert!(is_set(&dirty, page), "written page {page} is dirty");
    }
    for page in (data..data + 8).chain(data + 16..data + 64) {
        assert!(!is_set(&dirty, page), "page {page} was not written");
    }
    assert!(is_set(&dirty, MAILBOX_ADDR / PAGE_SIZE as u64));

    // Only what was written since the last read.
    touch(&machine, &sequential(data + 40, 2, 0xbeef));
    let again = machine.take_dirty_pages().expect("dirty pages");
    for page in data + 8..data + 16 {
        assert!(!is_set(&again, page), "page {page} was not written again");
    }
    assert!(is_set(&again, data + 40) && is_set(&again, data + 41));
    machine.stop_dirty_log().expect("stop dirty log");
    // The guest keeps working with logging off.
    touch(&machine, &sequential(data, 4, 0x1));
    machine.stop();
}

/// A host copy of the counter guest's state page, refreshed whenever the
/// log says the page was written, equals the page once the VM is paused
/// (2 vCPUs writing it all the time; many log reads).
fn copy_follows_the_log(vcpus: u8, rounds: usize, lazy: bool) -> usize {
    let Some(host) = kvm_or_skip("copy_follows_the_log") else {
        return 0;
    };
    let booted = boot_ready(
        &host,
        config(vcpus, 16),
        GuestProgram::Counter,
        &BootOptions {
            params: vec![255],
            fill: None,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let machine = if lazy {
        // A lazily streamed clone: 4 KiB pages filled by userfaultfd.
        vmstream_vmm::capture::capture(&booted, dir.path()).expect("capture");
        booted.stop();
        let source = vmstream_vmm::restore::CloneSource::open(dir.path()).unwrap();
        let shell = vmstream_vmm::machine::VmShell::create(&host, config(vcpus, 16)).unwrap();
        vmstream_vmm::restore::restore(
            shell,
            &source,
            &vmstream_vmm::restore::CloneMemory::Lazy(Default::default()),
        )
        .expect("restore")
        .machine
    } else {
        booted
    };
    let page = vmstream_vmm::arch::x86_64::layout::STATE_ADDR / PAGE_SIZE as u64;
    let read = |m: &Machine| -> Vec<u8> {
        let ram = m.guest_ram();
        // SAFETY: inside guest RAM, mapped while the machine lives.
        unsafe {
            std::slice::from_raw_parts(ram.host_addr().add(page as usize * PAGE_SIZE), PAGE_SIZE)
        }
        .to_vec()
    };
    machine.start_dirty_log().expect("start");
    let mut copy = read(&machine);
    let mut missed = 0;
    for _ in 0..rounds {
        std::thread::sleep(std::time::Duration::from_micros(300));
        let dirty = machine.take_dirty_pages().expect("log");
        if is_set(&dirty, page) {
            copy = read(&machine);
        }
    }
    machine.pause().expect("pause");
    let dirty = machine.take_dirty_pages().expect("log");
    if is_set(&dirty, page) {
        copy = read(&machine);
    }
    if copy != read(&machine) {
        missed += 1;
    }
    machine.stop();
    missed
}

#[test]
fn log_refreshed_copy_matches_memory_after_pause() {
    let mut missed = 0;
    for lazy in [false, true] {
        for vcpus in [1u8, 2] {
            for _ in 0..5 {
                missed += copy_follows_the_log(vcpus, 200, lazy);
            }
            eprintln!("lazy {lazy}, {vcpus} vCPUs: {missed} stale copies so far");
        }
    }
    assert_eq!(missed, 0);
}
