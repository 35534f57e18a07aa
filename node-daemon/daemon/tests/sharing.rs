//! Page sharing and the node's memory budget on the real /dev/kvm,
//! userfaultfd and KSM: guests of two clones writing identical pages get
//! them merged by ksmd (and keep reading and writing their own data); VM
//! processes started with `--ksm` mark clone RAM mergeable and the image
//! pages two lazy clones copied in are merged across the processes; a node
//! over its memory budget makes clones give back clean image-equal pages
//! and the clones keep answering correctly.
//!
//! The KSM tests switch ksmd on (`/sys/kernel/mm/ksm/run` = 1, a larger
//! `pages_to_scan`, a short sleep) and restore the previous settings
//! afterwards; they run one at a time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmstream_node::memory_budget::MemoryBudget;
use vmstream_node::supervisor::{VmLaunch, VmSupervisor};
use vmstream_node::vm_protocol::{CloneBackend, Reply, Request, StartSpec, VmStats};
use vmstream_test_support::{Need, record_skip, require};
use vmstream_vmm::capture::capture;
use vmstream_vmm::devices::mailbox::{report, request};
use vmstream_vmm::guests::{FillSpec, GuestProgram, TouchCommand, TouchPattern, request_answer};
use vmstream_vmm::machine::{BootOptions, Machine, MachineConfig, VmShell};
use vmstream_vmm::memory::ksm::{self, KSM_SYSFS, KsmRunning, KsmSettings};
use vmstream_vmm::memory::{PAGE_SIZE, merge_identical_pages};
use vmstream_vmm::restore::{CloneMemory, CloneSource, restore};
use vmstream_vmm::vstate::vm::KvmHost;

const EXE: &str = env!("CARGO_BIN_EXE_vmstream-node");
const MIB: u64 = 1 << 20;
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// ksmd settings are node-wide: one KSM test at a time.
static KSM_LOCK: Mutex<()> = Mutex::new(());

const FILL: FillSpec = FillSpec {
    zero_percent: 20,
    duplicate_percent: 10,
    templates: 8,
    seed: 77,
};

/// KSM running fast, or `None` (skip recorded) when the host has no KSM.
fn ksm_or_skip(test: &str) -> Option<KsmRunning> {
    let dir = Path::new(KSM_SYSFS);
    if let Err(e) = KsmSettings::read(dir) {
        record_skip(test, &e.to_string());
        return None;
    }
    Some(KsmRunning::start(dir, 20_000, 5).expect("switch ksmd on"))
}

/// Kills, on drop, every VM process recorded under a state directory.
struct KillVmsOnDrop(PathBuf);

impl Drop for KillVmsOnDrop {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.0.join("vms")) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(text) = std::fs::read(entry.path().join("vm.json")) else {
                continue;
            };
            let Some(pid) = serde_json::from_slice::<Value>(&text)
                .ok()
                .and_then(|r| r["pid"].as_u64())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*self.0.to_string_lossy()) {
                // SAFETY: kill(2) of a VM process this test started (its
                // command line names this test's state directory).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

fn request_guest(id: &str) -> VmLaunch {
    VmLaunch {
        id: id.into(),
        owner: None,
        vcpus: 1,
        memory_bytes: 16 << 20,
        start: Some(StartSpec::Boot {
            guest: GuestProgram::Request,
            fill: Some(FILL),
            params: Vec::new(),
            ready_timeout_ms: 30_000,
        }),
        prepare_lazy: false,
        preload_image: None,
    }
}

fn ask(supervisor: &VmSupervisor, id: &str, n: u64) -> u64 {
    match supervisor.call(
        id,
        &Request::Mailbox {
            request: n,
            timeout_ms: None,
        },
    ) {
        Ok(Reply::Answer { answer, .. }) => answer,
        other => panic!("{id} did not answer {n}: {other:?}"),
    }
}

fn stats(supervisor: &VmSupervisor, id: &str) -> VmStats {
    match supervisor.call(id, &Request::Stats) {
        Ok(Reply::Stats(stats)) => *stats,
        other => panic!("stats of {id}: {other:?}"),
    }
}

/// Boots a filled request guest, captures it into `<state>/image`, stops it.
fn request_image(supervisor: &VmSupervisor, state: &Path) -> PathBuf {
    supervisor.launch(&request_guest("source")).unwrap();
    assert_eq!(ask(supervisor, "source", 1), request_answer(1, 1));
    let image = state.join("image");
    supervisor
        .call("source", &Request::Capture { dir: image.clone() })
        .unwrap();
    supervisor.stop("source").unwrap();
    image
}

/// Launches lazy clones `ids` of `image` and waits until each has copied
/// its whole image in (the supervisor prefetches).
fn prefetched_lazy_clones(supervisor: &VmSupervisor, image: &Path, ids: &[&str]) {
    for id in ids {
        supervisor
            .launch(&VmLaunch {
                start: Some(StartSpec::Clone {
                    image: image.to_path_buf(),
                    backend: CloneBackend::Lazy,
                    network: None,
                }),
                prepare_lazy: true,
                ..request_guest(id)
            })
            .unwrap();
    }
    let pages = (16 << 20) / PAGE_SIZE as u64;
    let deadline = Instant::now() + GUEST_TIMEOUT;
    for id in ids {
        loop {
            let f = stats(supervisor, id).faults;
            if f.pages_copied + f.pages_zeroed >= pages {
                break;
            }
            assert!(Instant::now() < deadline, "{id} did not prefetch: {f:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The image was captured after one answer: a clone's first is the 2nd.
        assert_eq!(ask(supervisor, id, 7), request_answer(7, 2), "{id}");
    }
}

fn merging_pages(pid: Option<u32>) -> u64 {
    ksm::process_stat(pid).expect("ksm_stat").merging_pages
}

/// Waits until `done()` or the timeout, returning whether it happened.
fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

fn touch(machine: &Machine, cmd: &TouchCommand) -> [u64; 3] {
    let r = machine
        .mailbox()
        .call(request::TOUCH, cmd.args(), report::RESULT, GUEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("touch {cmd:?}: {e}"));
    [r.args[0], r.args[1], r.args[2]]
}

#[test]
fn guests_writing_identical_pages_get_them_merged() {
    let test = "node::guests_writing_identical_pages_get_them_merged";
    if !require(test, &[Need::Kvm, Need::Root]) {
        return;
    }
    let _one = KSM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(_ksm) = ksm_or_skip(test) else {
        return;
    };
    let host = KvmHost::open().unwrap();
    let config = MachineConfig {
        vcpus: 1,
        memory_bytes: 16 << 20,
    };
    let dir = tempfile::tempdir().unwrap();
    let source_vm = Machine::boot(
        VmShell::create(&host, config).unwrap(),
        GuestProgram::Memory,
        &BootOptions {
            params: Vec::new(),
            fill: Some(FILL),
        },
    )
    .unwrap();
    source_vm
        .mailbox()
        .wait_report(0, GUEST_TIMEOUT, |r| r.kind == report::READY)
        .expect("memory guest READY");
    capture(&source_vm, dir.path()).unwrap();
    source_vm.stop();
    let source = CloneSource::open(dir.path()).unwrap();
    let clones: Vec<_> = (0..2)
        .map(|_| {
            let shell = VmShell::create(&host, config).unwrap();
            let clone = restore(shell, &source, &CloneMemory::CopyOnWrite).unwrap();
            merge_identical_pages(clone.machine.guest_ram()).unwrap();
            clone
        })
        .collect();
    let merged_before = merging_pages(None);
    // Both guests write the same marker into the same 256 pages: each page
    // becomes a private copy (image bytes with the marker in front),
    // identical in the two clones.
    let write = TouchCommand {
        base_page: 0x20_0000 / PAGE_SIZE as u64 + 256,
        count: 256,
        pattern: TouchPattern::Sequential,
        region_pages: 256,
        stride: 1,
        marker: 0xabad_cafe,
        seed: 1,
    };
    let expected = write.expected(|p| FILL.first_qword(p));
    for clone in &clones {
        assert_eq!(
            touch(&clone.machine, &write),
            [expected.sum, expected.xor, expected.pages]
        );
    }
    // The pages the fill left zero were written too; all 256 are pairs.
    let merged = wait_for(Duration::from_secs(60), || {
        merging_pages(None) >= merged_before + 2 * 200
    });
    let now = merging_pages(None);
    assert!(
        merged,
        "ksmd merged {} pages of this process, expected at least 400 (2 clones x 256 identical pages)",
        now - merged_before
    );
    eprintln!(
        "KSM: {} pages of the two clones merged",
        now - merged_before
    );
    // Merged pages read right, and a write to one clone's page stays its own.
    let reread = TouchCommand { marker: 0, ..write };
    for clone in &clones {
        let got = touch(&clone.machine, &reread);
        assert_eq!(got[0], write.marker.wrapping_mul(write.count));
    }
    let rewrite = TouchCommand {
        marker: 0x1234,
        ..write
    };
    touch(&clones[0].machine, &rewrite);
    assert_eq!(
        touch(&clones[0].machine, &reread)[0],
        rewrite.marker.wrapping_mul(write.count)
    );
    assert_eq!(
        touch(&clones[1].machine, &reread)[0],
        write.marker.wrapping_mul(write.count),
        "a write to a merged page reached the other clone"
    );
}

#[test]
fn ksm_vm_processes_merge_the_pages_lazy_clones_copied_in() {
    let test = "node::ksm_vm_processes_merge_the_pages_lazy_clones_copied_in";
    if !require(test, &[Need::Kvm, Need::Root, Need::Userfaultfd]) {
        return;
    }
    let _one = KSM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(_ksm) = ksm_or_skip(test) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let _cleanup = KillVmsOnDrop(state.path().to_path_buf());
    let supervisor = VmSupervisor::new(state.path(), PathBuf::from(EXE), Vec::new())
        .with_ksm(true)
        .with_lazy_prefetch(true);
    let image = request_image(&supervisor, state.path());
    prefetched_lazy_clones(&supervisor, &image, &["a", "b"]);
    let pids: Vec<u32> = ["a", "b"]
        .iter()
        .map(|id| supervisor.get(id).unwrap().pid)
        .collect();
    // Each clone holds its own copy of ~13 MiB of non-zero image pages.
    let merged = wait_for(Duration::from_secs(60), || {
        pids.iter().all(|&pid| merging_pages(Some(pid)) >= 1024)
    });
    let counts: Vec<u64> = pids.iter().map(|&p| merging_pages(Some(p))).collect();
    assert!(
        merged,
        "pages merged per clone process: {counts:?}, expected at least 1024 each"
    );
    for id in ["a", "b"] {
        let s = stats(&supervisor, id);
        eprintln!("{id}: {:?}", s.memory);
        assert!(s.memory.ksm_enabled, "{id} RAM not marked mergeable");
        assert!(
            s.memory.guest_ksm >= 1024 * PAGE_SIZE as u64,
            "{id}: {:?}",
            s.memory
        );
        assert_eq!(
            s.memory.guest_resident,
            s.memory.guest_private + s.memory.guest_shared
        );
        assert!(s.memory.guest_shared >= s.memory.guest_ksm);
        assert_eq!(ask(&supervisor, id, 8), request_answer(8, 3), "{id}");
    }
    for id in ["a", "b"] {
        supervisor.stop(id).unwrap();
    }
}

#[test]
fn over_budget_clones_give_back_clean_pages_and_keep_answering() {
    let test = "node::over_budget_clones_give_back_clean_pages_and_keep_answering";
    if !require(test, &[Need::Kvm, Need::Root, Need::Userfaultfd]) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let _cleanup = KillVmsOnDrop(state.path().to_path_buf());
    let supervisor = Arc::new(
        VmSupervisor::new(state.path(), PathBuf::from(EXE), Vec::new()).with_lazy_prefetch(true),
    );
    let image = request_image(&supervisor, state.path());
    prefetched_lazy_clones(&supervisor, &image, &["a", "b"]);

    // Counting only: a prefetched lazy clone holds ~13 MiB of image copies.
    let Reply::Reclaimed(counted) = supervisor
        .call("a", &Request::Reclaim { max_bytes: 0 })
        .unwrap()
    else {
        panic!("reclaim answered something else")
    };
    assert_eq!(counted.dropped_bytes, 0);
    assert!(
        counted.clean_left_bytes >= 8 * MIB,
        "clean image-equal bytes counted: {counted:?}"
    );

    let used: u64 = ["a", "b"]
        .iter()
        .map(|id| stats(&supervisor, id).memory.pss)
        .sum();
    let budget = MemoryBudget::new(used - 12 * MIB);
    let round = budget.enforce(&supervisor);
    eprintln!("budget round 1: {round:?}");
    assert!(round.errors.is_empty(), "{round:?}");
    // Asked for exactly the excess; a clone's startup pages stay, so the
    // first round may leave a few pages to the next.
    assert!(round.dropped_bytes() >= 11 * MIB, "{round:?}");
    assert_eq!(round.shortfall_bytes, 0);
    let mut rounds = 1;
    let settled = loop {
        let round = budget.enforce(&supervisor);
        eprintln!("budget round {}: {round:?}", rounds + 1);
        rounds += 1;
        if round.reclaimed.is_empty() {
            break round;
        }
        assert!(rounds < 8, "budget not met after {rounds} rounds");
    };
    assert!(
        settled.used_bytes <= used - 12 * MIB,
        "still over budget after giving back pages: {settled:?}"
    );
    // The clones answer from their state; dropped pages come back from the
    // image when touched.
    for id in ["a", "b"] {
        assert_eq!(ask(&supervisor, id, 9), request_answer(9, 3), "{id}");
    }
    // A budget nobody exceeds asks nothing.
    let roomy = MemoryBudget::new(u64::MAX / 2).enforce(&supervisor);
    assert!(roomy.reclaimed.is_empty() && roomy.shortfall_bytes == 0);
    for id in ["a", "b"] {
        supervisor.stop(id).unwrap();
    }
}
