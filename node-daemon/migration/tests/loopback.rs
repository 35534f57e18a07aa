//! Migrations in one process over 127.0.0.1 (source and target threads),
//! on the real /dev/kvm with real userfaultfd: a counter guest keeps
//! counting exactly, a memory guest's checksums are identical afterwards,
//! only pages that differ from the image cross, and a migrated VM is
//! migrated again (three hops, all modes) and captured.

mod common;

use std::net::TcpListener;
use std::sync::Arc;

use common::*;
use vmstream_migration::{MigrationMode, MigrationReport, SourceOptions, migrate, receive};
use vmstream_vmm::arch::x86_64::layout::DATA_START;
use vmstream_vmm::capture::capture;
use vmstream_vmm::guests::GuestProgram;
use vmstream_vmm::image::PageStore;
use vmstream_vmm::machine::{BootOptions, Machine, MemoryBacking, VmShell};
use vmstream_vmm::memory::PAGE_SIZE;
use vmstream_vmm::restore::{CloneMemory, CloneSource, restore};
use vmstream_vmm::vstate::vm::KvmHost;

#[test]
fn counter_guest_keeps_counting_after_postcopy() {
    let Some(host) = host_or_skip("counter_guest_keeps_counting_after_postcopy", &[]) else {
        return;
    };
    let source = boot(
        &host,
        config(2, 16),
        GuestProgram::Counter,
        &counter_options(),
    );
    let mut before = [0u64; 2];
    for vcpu in 0..2 {
        let mut r = progress(source.mailbox(), vcpu, 0);
        while r.args[0] < 8 * INTERVAL {
            r = progress(source.mailbox(), vcpu, r.index + 1);
        }
        before[vcpu as usize] = check_progress(&r);
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = target_options(&host, None);
    let target = std::thread::spawn(move || receive(&listener, &opts, None));
    let report = migrate(
        &source,
        addr,
        &SourceOptions::new(MigrationMode::Postcopy, token()),
    )
    .expect("migrate");
    let received = target.join().unwrap().expect("receive");
    eprintln!("report: {report:#?}");
    let last_on_source: Vec<u64> = (0..2)
        .map(|v| {
            source
                .mailbox()
                .latest(vmstream_vmm::devices::mailbox::report::PROGRESS)
                .map_or(0, |r| if r.vcpu == v { r.args[0] } else { 0 })
        })
        .collect();
    source.stop();
    for vcpu in 0..2u8 {
        let r = vm_progress(&received.vm, vcpu, 0);
        let n = check_progress(&r);
        assert!(
            n > before[vcpu as usize],
            "vCPU {vcpu} resumed at {n}, before {}",
            before[vcpu as usize]
        );
        assert!(n >= last_on_source[vcpu as usize]);
        let later = vm_progress(&received.vm, vcpu, r.index + 1);
        assert!(check_progress(&later) > n);
    }
    assert!(report.downtime_ms > 0.0);
    assert_eq!(report.reconnects, 0);
}

#[test]
fn memory_clone_checksums_match_and_only_written_pages_cross() {
    let Some(host) = host_or_skip(
        "memory_clone_checksums_match_and_only_written_pages_cross",
        &[],
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1, 64);
    let options = BootOptions {
        params: vec![],
        fill: Some(fill()),
    };
    let (source, image) = lazy_clone(&host, cfg, GuestProgram::Memory, &options, dir.path());
    let first = DATA_START / PAGE_SIZE as u64;
    let pages = (cfg.memory_bytes / PAGE_SIZE) as u64 - first;
    // Read everything once (pages populate but stay equal to the image),
    // then write 100 pages from the host: only those differ from the image.
    let all = touch_all(first, pages);
    let _ = touch(source.mailbox(), &all);
    let ram = source.ram();
    for i in 0..100u64 {
        let gpa = (first + i * 37) * PAGE_SIZE as u64;
        ram.write_u64(gpa + 8, 0xfeed_0000 + i).unwrap();
    }
    let expected = touch(source.mailbox(), &all);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = target_options(&host, Some(Arc::clone(image.pages())));
    let target = std::thread::spawn(move || receive(&listener, &opts, None));
    let report = migrate(
        &source,
        addr,
        &SourceOptions::new(MigrationMode::Postcopy, token()),
    )
    .expect("migrate");
    let received = target.join().unwrap().expect("receive");
    source.stop();
    eprintln!("report: {report:#?}");
    assert_eq!(touch(received.vm.mailbox(), &all), expected);
    // Second-qword writes the checksum does not see: compare directly.
    let vram = received.vm.ram();
    for i in 0..100u64 {
        let gpa = (first + i * 37) * PAGE_SIZE as u64;
        assert_eq!(vram.read_u64(gpa + 8).unwrap(), 0xfeed_0000 + i);
    }
    // Only the written pages (plus the few the guest itself writes: stack,
    // mailbox) cross as data.
    assert!(report.pages_sent >= 100, "{report:?}");
    assert!(report.pages_sent < 140, "{report:?}");
}

/// The memory guest writes a marker into every page of a region (three
/// passes, reading back the markers) while the VM migrates; the result it
/// reports on the target must be exactly what the host computes.
fn write_workload_completes(mode: MigrationMode, test: &str) {
    let Some(host) = host_or_skip(test, &[]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1, 64);
    let options = BootOptions {
        params: vec![],
        fill: Some(fill()),
    };
    let (source, image) = lazy_clone(&host, cfg, GuestProgram::Memory, &options, dir.path());
    let first = DATA_START / PAGE_SIZE as u64;
    let region = 8192;
    let cmd = vmstream_vmm::guests::TouchCommand {
        marker: 0x5151_0000_0000_0001,
        count: 16 * region,
        ..touch_all(first, region)
    };
    let expected = cmd.expected(|p| fill().first_qword(p));
    let since = source.mailbox().next_report_index();
    let sequence = source.mailbox().submit(
        0,
        vmstream_vmm::devices::mailbox::request::TOUCH,
        cmd.args(),
    );
    // Let the writes get going.
    std::thread::sleep(std::time::Duration::from_millis(150));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = target_options(&host, Some(Arc::clone(image.pages())));
    let target = std::thread::spawn(move || receive(&listener, &opts, None));
    let mut sopts = SourceOptions::new(mode, token());
    sopts.limits.downtime_target = std::time::Duration::from_millis(5);
    let report = migrate(&source, addr, &sopts).expect("migrate");
    let received = target.join().unwrap().expect("receive");
    let done_on_source = source
        .mailbox()
        .wait_report(since, std::time::Duration::ZERO, |r| r.args[7] == sequence)
        .is_some();
    source.stop();
    eprintln!("{mode:?} report: {report:#?}");
    assert!(
        !done_on_source,
        "the touch finished before the migration; make it longer"
    );
    let result = received
        .vm
        .mailbox()
        .wait_report(0, TIMEOUT, |r| {
            r.kind == vmstream_vmm::devices::mailbox::report::RESULT && r.args[7] == sequence
        })
        .expect("result on the target");
    assert_eq!(
        [result.args[0], result.args[1], result.args[2]],
        [expected.sum, expected.xor, expected.pages]
    );
    if mode != MigrationMode::Postcopy {
        assert!(report.precopy_rounds >= 1);
    }
}

#[test]
fn write_workload_postcopy() {
    write_workload_completes(MigrationMode::Postcopy, "write_workload_postcopy");
}

#[test]
fn write_workload_precopy() {
    write_workload_completes(MigrationMode::Precopy, "write_workload_precopy");
}

#[test]
fn write_workload_hybrid() {
    write_workload_completes(MigrationMode::Hybrid, "write_workload_hybrid");
}

/// Migrates `vm` to a new target in this process and returns the target's
/// machine (the source's copy is stopped).
fn hop(
    host: &Arc<KvmHost>,
    vm: Machine,
    image: Option<Arc<PageStore>>,
    mode: MigrationMode,
) -> (Machine, MigrationReport) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut options = SourceOptions::new(mode, token());
    options.target_has_image = image.is_some();
    let opts = target_options(host, image);
    let target = std::thread::spawn(move || receive(&listener, &opts, None));
    let report = migrate(&vm, addr, &options).expect("migrate");
    let received = target.join().unwrap().expect("receive");
    vm.stop();
    (received.vm, report)
}

/// Checks that each vCPU of `vm` continues exactly (memory == register,
/// hash of every step) from beyond `at_least[vcpu]`; returns the counters
/// of a later report of each.
fn continues(vm: &Machine, at_least: [u64; 2]) -> [u64; 2] {
    let mut last = [0; 2];
    for vcpu in 0..2u8 {
        let r = vm_progress(vm, vcpu, 0);
        let n = check_progress(&r);
        let before = at_least[usize::from(vcpu)];
        assert!(n > before, "vCPU {vcpu} resumed at {n}, after {before}");
        let later = vm_progress(vm, vcpu, r.index + 1);
        last[usize::from(vcpu)] = check_progress(&later);
    }
    last
}

#[test]
fn migrated_vm_migrates_again_and_captures() {
    let Some(host) = host_or_skip("migrated_vm_migrates_again_and_captures", &[]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(2, 16);
    let (vm, image) = lazy_clone(
        &host,
        cfg,
        GuestProgram::Counter,
        &counter_options(),
        dir.path(),
    );
    let store = Arc::clone(image.pages());
    let mut at = continues(&vm, [0; 2]);
    // A → B (postcopy, B holds the image), B → C (precopy, C lacks it),
    // C → D (hybrid, with the image): each received VM is a Machine that
    // is migrated again; every step of every vCPU stays exact.
    let mut vm = vm;
    for (mode, with_image) in [
        (MigrationMode::Postcopy, true),
        (MigrationMode::Precopy, false),
        (MigrationMode::Hybrid, true),
    ] {
        let image = with_image.then(|| Arc::clone(&store));
        let (next, report) = hop(&host, vm, image, mode);
        eprintln!(
            "{mode:?} hop: downtime {:.2} ms, {} pages sent, {} clean, {} zero",
            report.downtime_ms, report.pages_sent, report.pages_clean, report.pages_zero
        );
        assert!(matches!(next.backing(), MemoryBacking::Installed { .. }));
        at = continues(&next, at);
        vm = next;
    }
    // The migrated VM can be paused and resumed, and captured.
    vm.pause().expect("pause");
    vm.resume();
    let captured_dir = tempfile::tempdir().unwrap();
    capture(&vm, captured_dir.path()).expect("capture a migrated VM");
    let image = CloneSource::open(captured_dir.path()).expect("open the captured image");
    let captured = image.state().vcpus[0].regs.r12;
    assert!(captured > at[0], "captured at {captured}, after {}", at[0]);
    let clone = restore(
        VmShell::create(&host, cfg).unwrap(),
        &image,
        &CloneMemory::CopyOnWrite,
    )
    .expect("clone of the migrated VM's image");
    let r = progress(clone.machine.mailbox(), 0, 0);
    let n = check_progress(&r);
    assert!(
        n > captured && n <= captured + INTERVAL,
        "clone at {n}, captured {captured}"
    );
    clone.machine.stop();
    vm.stop();
}

/// What the precopy source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    /// Booted (anonymous memory, no image: every page crosses).
    Booted,
    /// Lazily streamed clone (the target holds the image).
    Lazy,
    /// Copy-on-write clone (the target holds the image).
    CopyOnWrite,
}

/// Precopy with KVM dirty logging while the guest writes a new marker into
/// 8192 pages pass after pass: rounds resend what was written between
/// them, and when the target has set the state (the source paused, the
/// target not yet running) every page the target holds equals the
/// source's, and every page it does not hold (to come from its image)
/// equals the image page.
fn precopy_gives_identical_memory(kind: SourceKind, test: &str) {
    let Some(host) = host_or_skip(test, &[]) else {
        return;
    };
    let cfg = config(1, 64);
    let options = BootOptions {
        params: vec![],
        fill: Some(fill()),
    };
    let dir = tempfile::tempdir().unwrap();
    let (source, image) = match kind {
        SourceKind::Booted => (boot(&host, cfg, GuestProgram::Memory, &options), None),
        SourceKind::Lazy => {
            let (vm, image) = lazy_clone(&host, cfg, GuestProgram::Memory, &options, dir.path());
            (vm, Some(Arc::clone(image.pages())))
        }
        SourceKind::CopyOnWrite => {
            let (vm, image) = lazy_clone(&host, cfg, GuestProgram::Memory, &options, dir.path());
            vm.stop();
            let cow = restore(
                VmShell::create(&host, cfg).unwrap(),
                &image,
                &CloneMemory::CopyOnWrite,
            )
            .expect("CoW clone");
            (cow.machine, Some(Arc::clone(image.pages())))
        }
    };
    let source = Arc::new(source);
    let first = DATA_START / PAGE_SIZE as u64;
    let region = 8192;
    // Pass after pass over the region, each with a new marker, so every
    // pass changes the content of every page.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let source = Arc::clone(&source);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut passes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let cmd = vmstream_vmm::guests::TouchCommand {
                    marker: 0x7171_0000_0000_0000 + passes,
                    ..touch_all(first, region)
                };
                let sent = source.mailbox().call(
                    vmstream_vmm::devices::mailbox::request::TOUCH,
                    cmd.args(),
                    vmstream_vmm::devices::mailbox::report::RESULT,
                    std::time::Duration::from_secs(5),
                );
                if sent.is_err() {
                    break;
                }
                passes += 1;
            }
            passes
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(100));

    let shell = vmstream_migration::TargetShell::create(&host, cfg, image.clone()).expect("shell");
    let target_ram = (shell.ram().host_addr() as usize, shell.ram().len());
    let source_ram = (
        source.guest_ram().host_addr() as usize,
        source.guest_ram().len(),
    );
    let target_memory = Arc::clone(shell.memory());
    let compared: Arc<std::sync::Mutex<Option<(usize, usize)>>> = Arc::default();
    let mut opts = target_options(&host, image.clone());
    let out = Arc::clone(&compared);
    let hook_image = image.clone();
    opts.before_ready = Some(Arc::new(move || {
        let pages = target_ram.1 / PAGE_SIZE;
        // SAFETY: both RAM ranges stay mapped for the migration; the
        // source is paused and the target's vCPUs have not started; only
        // installed target pages are read (others would wait).
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(source_ram.0 as *const u8, source_ram.1),
                std::slice::from_raw_parts(target_ram.0 as *const u8, target_ram.1),
            )
        };
        let mut image_page = vec![0u8; PAGE_SIZE];
        let mut differing = 0;
        let installed = (0..pages)
            .filter(|&p| target_memory.is_installed(p))
            .count();
        for p in 0..pages {
            let src = &a[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
            let same = if target_memory.is_installed(p) {
                *src == b[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
            } else {
                image_page.fill(0);
                if let Some(image) = &hook_image
                    && image.is_present(p)
                {
                    image.read_page(p, &mut image_page).unwrap();
                }
                *src == image_page[..]
            };
            differing += usize::from(!same);
        }
        *out.lock().unwrap() = Some((installed, differing));
    }));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target = std::thread::spawn(move || receive(&listener, &opts, Some(shell)));
    let mut sopts = SourceOptions::new(MigrationMode::Precopy, token());
    sopts.target_has_image = image.is_some();
    sopts.limits.downtime_target = std::time::Duration::ZERO;
    sopts.limits.max_rounds = 4;
    let report = migrate(&source, addr, &sopts).expect("migrate");
    let received = target.join().unwrap().expect("receive");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let passes = writer.join().unwrap();
    match Arc::try_unwrap(source) {
        Ok(source) => source.stop(),
        Err(_) => panic!("the writer still holds the source"),
    }
    eprintln!("{kind:?} report: {report:#?}; {passes} write passes on the source");
    let (installed, differing) = compared.lock().unwrap().expect("compared before Ready");
    assert!(installed >= 1000, "{installed} pages installed");
    if kind == SourceKind::Booted {
        assert_eq!(
            installed,
            cfg.memory_bytes / PAGE_SIZE,
            "every page installed"
        );
    }
    assert_eq!(differing, 0, "pages differing between source and target");
    assert_eq!(report.dirty_tracking, "kvm-dirty-log");
    assert_eq!(report.precopy_rounds, 4);
    assert!(
        report.pages_resent > 0,
        "pages written between rounds were resent"
    );
    received.vm.stop();
}

#[test]
fn precopy_with_dirty_log_gives_identical_memory() {
    precopy_gives_identical_memory(
        SourceKind::Booted,
        "precopy_with_dirty_log_gives_identical_memory",
    );
}

#[test]
fn precopy_of_a_lazy_clone_gives_identical_memory() {
    precopy_gives_identical_memory(
        SourceKind::Lazy,
        "precopy_of_a_lazy_clone_gives_identical_memory",
    );
}

#[test]
fn precopy_of_a_cow_clone_gives_identical_memory() {
    precopy_gives_identical_memory(
        SourceKind::CopyOnWrite,
        "precopy_of_a_cow_clone_gives_identical_memory",
    );
}
