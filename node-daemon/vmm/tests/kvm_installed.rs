//! A machine restored from a given `VmState` over installed memory
//! (`restore::restore_state` + `StateMemory::Installed`): the memory is
//! filled only through a `PageInstaller`, and missing pages go to a hook
//! that does not install them itself but queues a request that another
//! thread answers (as a migration target does). The counter guest continues
//! exactly, installs are exactly once (EEXIST-safe), and the machine can
//! be captured into a live image once every page is installed.

mod kvm_common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_common::*;
use vmstream_vmm::capture::capture;
use vmstream_vmm::devices::mailbox::{Report, report};
use vmstream_vmm::guests::{GuestProgram, counter_hash};
use vmstream_vmm::machine::{BootOptions, Machine, MemoryBacking, VmShell};
use vmstream_vmm::memory::{LazyOptions, MissingPageHook, PAGE_SIZE, PageInstaller};
use vmstream_vmm::restore::{CloneMemory, CloneSource, StateMemory, restore, restore_state};

const INTERVAL: u64 = 256;

/// Queues each missing page for the answering thread; never installs.
struct QueueHook(Mutex<mpsc::Sender<usize>>);

impl MissingPageHook for QueueHook {
    fn missing(&self, page: usize, _installer: &PageInstaller) {
        let _ = self.0.lock().unwrap().send(page);
    }
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
fn restored_state_over_installed_memory_continues_and_captures() {
    let Some(host) = kvm_or_skip("restored_state_over_installed_memory_continues_and_captures")
    else {
        return;
    };
    let config = config(1, 16);
    let options = BootOptions {
        params: vec![INTERVAL - 1],
        fill: None,
    };
    let source = boot_ready(&host, config, GuestProgram::Counter, &options);
    let mut last = progress_of(&source, 0, 0);
    while last.args[0] < 8 * INTERVAL {
        last = progress_of(&source, 0, last.index + 1);
    }
    source.pause().expect("pause");
    let state = source.save_state().expect("save state");
    let at_pause = state.vcpus[0].regs.r12;
    let ram = source.guest_ram();
    // SAFETY: the paused source's guest RAM, mapped while `source` lives.
    let memory: Arc<Vec<u8>> =
        Arc::new(unsafe { std::slice::from_raw_parts(ram.host_addr(), ram.len()) }.to_vec());
    source.stop();

    let mut shell = VmShell::create(&host, config).expect("shell");
    shell.prepare_lazy(LazyOptions::default()).expect("lazy");
    let lazy = shell.lazy().expect("prepared");
    let installer = lazy.installer();
    let (tx, rx) = mpsc::channel::<usize>();
    lazy.attach_hook(Arc::new(QueueHook(Mutex::new(tx))))
        .expect("hook");
    // The upper half is installed ahead (one batch, then again: nothing
    // new); a few zero pages of the lower half as zero pages; the rest
    // (program, stack, page tables, counters) is answered on request.
    let pages = config.memory_bytes / PAGE_SIZE;
    let half = pages / 2;
    let upper = &memory[half * PAGE_SIZE..];
    assert_eq!(installer.install(half, upper).unwrap(), pages - half);
    assert_eq!(installer.install(half, upper).unwrap(), 0);
    let zero_tail: Vec<usize> = (0..half)
        .filter(|p| {
            memory[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                .iter()
                .all(|&b| b == 0)
        })
        .collect();
    for &p in zero_tail.iter().take(8) {
        assert_eq!(installer.install_zero(p, 1).unwrap(), 1);
        assert_eq!(installer.install_zero(p, 1).unwrap(), 0);
    }
    let answered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let answerer = {
        let installer = installer.clone();
        let memory = Arc::clone(&memory);
        let answered = Arc::clone(&answered);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok(page) = rx.recv_timeout(Duration::from_millis(20)) else {
                    continue;
                };
                // Answered late and from another thread, as over a network.
                std::thread::sleep(Duration::from_micros(200));
                let n = installer
                    .install(page, &memory[page * PAGE_SIZE..(page + 1) * PAGE_SIZE])
                    .expect("answer");
                answered.fetch_add(n, Ordering::Relaxed);
            }
        })
    };

    let prepared =
        restore_state(shell, &state, StateMemory::Installed { image: None }).expect("restore");
    let restored = prepared.start();
    let vm = restored.machine;
    let first = progress_of(&vm, 0, 0);
    let [register, counter, hash, ..] = first.args;
    assert_eq!(counter, register, "memory counter follows the register");
    assert_eq!(hash, counter_hash(register), "hash register is exact");
    assert!(
        register > at_pause && register <= at_pause + INTERVAL,
        "continued at {register}, paused at {at_pause}"
    );
    let on_request = answered.load(Ordering::Relaxed);
    eprintln!(
        "restore_state: {:?}; pages answered on request so far: {on_request}",
        restored.timings
    );
    assert!(on_request > 0, "the guest ran on pages answered on request");

    // Capture is refused while pages are still owed, then works.
    let dir = tempfile::tempdir().unwrap();
    let installed = vm.backing().lazy_memory().unwrap().populated().count_ones();
    if installed < pages {
        assert!(capture(&vm, dir.path()).is_err(), "incomplete memory");
    }
    for p in 0..pages {
        installer
            .install(p, &memory[p * PAGE_SIZE..(p + 1) * PAGE_SIZE])
            .expect("install rest");
    }
    assert!(matches!(vm.backing(), MemoryBacking::Installed { .. }));
    let report = capture(&vm, dir.path()).expect("capture installed memory");
    let at_capture = progress_of(&vm, 0, vm.mailbox().next_report_index()).args[0];
    let image = CloneSource::open(dir.path()).expect("open");
    let captured = image.state().vcpus[0].regs.r12;
    assert!(captured > at_pause && captured <= at_capture);
    let clone = restore(
        VmShell::create(&host, config).unwrap(),
        &image,
        &CloneMemory::CopyOnWrite,
    )
    .expect("clone");
    let c = progress_of(&clone.machine, 0, 0);
    assert_eq!(c.args[1], c.args[0]);
    assert_eq!(c.args[2], counter_hash(c.args[0]));
    assert!(c.args[0] > captured && c.args[0] <= captured + INTERVAL);
    eprintln!("capture of installed memory: {:?}", report.timings);
    clone.machine.stop();
    vm.stop();
    stop.store(true, Ordering::SeqCst);
    answerer.join().unwrap();
}
