//! Migrations across a real network hop: the source runs in this process
//! (its connections from inside namespace A), the target is a separate
//! process (`vmstream-migrate target`) inside namespace B, joined by a veth
//! pair. Covers counter continuity, memory checksums, a write workload in
//! all three modes, a link cut during postcopy, and a target that dies
//! before the switch-over. Namespaces and the child are removed by Drop
//! guards, also when a test fails.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vmstream_migration::{MigrateError, MigrationMode, MigrationReport, SourceOptions, migrate};
use vmstream_pagestream::netns::{TestNetwork, enter};
use vmstream_test_support::Need;
use vmstream_vmm::arch::x86_64::layout::DATA_START;
use vmstream_vmm::devices::mailbox::request;
use vmstream_vmm::guests::{GuestProgram, TouchCommand};
use vmstream_vmm::machine::{BootOptions, Machine};
use vmstream_vmm::memory::PAGE_SIZE;

const TOKEN: &str = "vmstream-migration-test-token-0123456789";

/// Two namespaces joined by a veth pair.
struct Hop {
    _net: TestNetwork,
    source_ns: String,
    target_ns: String,
    target_ip: std::net::Ipv4Addr,
    target_dev: String,
}

impl Hop {
    fn new() -> Self {
        let mut net = TestNetwork::new();
        let source_ns = net.add_namespace().expect("namespace A");
        let target_ns = net.add_namespace().expect("namespace B");
        let link = net.link(&source_ns, &target_ns).expect("veth pair");
        let out = Command::new("ip")
            .args(["-n", &target_ns, "-o", "link", "show", "type", "veth"])
            .output()
            .expect("ip link show");
        let text = String::from_utf8_lossy(&out.stdout);
        let target_dev = text
            .split(':')
            .nth(1)
            .and_then(|s| s.trim().split('@').next())
            .expect("veth device in namespace B")
            .to_string();
        Self {
            _net: net,
            source_ns,
            target_ns,
            target_ip: link.b,
            target_dev,
        }
    }

    fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        let ok = Command::new("ip")
            .args([
                "-n",
                &self.target_ns,
                "link",
                "set",
                &self.target_dev,
                state,
            ])
            .status()
            .expect("ip link set")
            .success();
        assert!(ok, "ip link set {} {state} failed", self.target_dev);
    }
}

/// The target process; killed on drop.
struct TargetProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    addr: SocketAddr,
}

impl TargetProcess {
    fn spawn(hop: &Hop, image: Option<&Path>, extra: &[&str]) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &hop.target_ns])
            .arg(env!("CARGO_BIN_EXE_vmstream-migrate"))
            .args(["target", "--listen", &format!("{}:0", hop.target_ip)])
            .args(["--token", TOKEN])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(dir) = image {
            cmd.arg("--image").arg(dir);
        }
        let mut child = cmd.spawn().expect("spawn vmstream-migrate");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut me = Self {
            child,
            stdin,
            stdout,
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        let first = me.line();
        me.addr = first["listening"]
            .as_str()
            .unwrap_or_else(|| panic!("target did not listen: {first}"))
            .parse()
            .unwrap();
        me
    }

    fn line(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read target output");
        serde_json::from_str(&line).unwrap_or(serde_json::Value::Null)
    }

    fn ask(&mut self, command: &str) -> serde_json::Value {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        self.line()
    }
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn args_of(v: &serde_json::Value) -> Vec<u64> {
    v["args"]
        .as_array()
        .unwrap_or_else(|| panic!("no args in {v}"))
        .iter()
        .map(|a| a.as_u64().unwrap())
        .collect()
}

fn migrate_from(
    hop: &Hop,
    machine: &Machine,
    addr: SocketAddr,
    options: &SourceOptions,
) -> Result<MigrationReport, MigrateError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ns = enter(&hop.source_ns).expect("enter namespace A");
            migrate(machine, addr, options)
        })
        .join()
        .unwrap()
    })
}

fn options(mode: MigrationMode) -> SourceOptions {
    SourceOptions::new(mode, token())
}

fn needs(test: &str) -> Option<Arc<vmstream_vmm::vstate::vm::KvmHost>> {
    host_or_skip(test, &[Need::NetworkNamespaces])
}

#[test]
fn netns_counter_guest_keeps_counting() {
    let Some(host) = needs("netns_counter_guest_keeps_counting") else {
        return;
    };
    let hop = Hop::new();
    let source = boot(
        &host,
        config(2, 16),
        GuestProgram::Counter,
        &counter_options(),
    );
    let mut before = [0u64; 2];
    for vcpu in 0..2 {
        let mut r = progress(source.mailbox(), vcpu, 0);
        while r.args[0] < 4 * INTERVAL {
            r = progress(source.mailbox(), vcpu, r.index + 1);
        }
        before[vcpu as usize] = check_progress(&r);
    }
    let mut target = TargetProcess::spawn(&hop, None, &[]);
    let report = migrate_from(
        &hop,
        &source,
        target.addr,
        &options(MigrationMode::Postcopy),
    )
    .expect("migrate");
    source.stop();
    let received = target.line();
    eprintln!("report {report:?}\ntarget {received}");
    for vcpu in 0..2u8 {
        let r = target.ask(&format!("progress {vcpu} 0"));
        let args = args_of(&r);
        let n = args[0];
        assert_eq!(args[1], n, "memory and register counters differ: {r}");
        assert_eq!(
            args[2],
            vmstream_vmm::guests::counter_hash(n),
            "a step was lost or repeated: {r}"
        );
        assert!(n > before[vcpu as usize]);
    }
    assert!(report.downtime_ms > 0.0);
}

fn memory_clone(host: &Arc<vmstream_vmm::vstate::vm::KvmHost>, mib: usize, dir: &Path) -> Machine {
    let opts = BootOptions {
        params: vec![],
        fill: Some(fill()),
    };
    lazy_clone(host, config(1, mib), GuestProgram::Memory, &opts, dir).0
}

#[test]
fn netns_memory_checksums_identical() {
    let Some(host) = needs("netns_memory_checksums_identical") else {
        return;
    };
    let hop = Hop::new();
    let dir = tempfile::tempdir().unwrap();
    let source = memory_clone(&host, 64, dir.path());
    let first = DATA_START / PAGE_SIZE as u64;
    let pages = (64 << 20) / PAGE_SIZE as u64 - first;
    let all = touch_all(first, pages);
    let _ = touch(source.mailbox(), &all);
    for i in 0..500u64 {
        source
            .ram()
            .write_u64((first + i * 29) * PAGE_SIZE as u64, 0xabc0_0000 + i)
            .unwrap();
    }
    let expected = touch(source.mailbox(), &all);
    let mut target = TargetProcess::spawn(&hop, Some(dir.path()), &[]);
    let report = migrate_from(
        &hop,
        &source,
        target.addr,
        &options(MigrationMode::Postcopy),
    )
    .expect("migrate");
    source.stop();
    let _ = target.line();
    let got = args_of(&target.ask(&format!("touch {}", serde_json::to_string(&all).unwrap())));
    assert_eq!(got[..3], expected[..]);
    assert!(
        report.pages_sent >= 500 && report.pages_sent < 560,
        "{report:?}"
    );
}

/// Memory guest writing markers across the migration (see loopback.rs).
fn netns_write_workload(mode: MigrationMode, test: &str) {
    let Some(host) = needs(test) else {
        return;
    };
    let hop = Hop::new();
    let dir = tempfile::tempdir().unwrap();
    let source = memory_clone(&host, 64, dir.path());
    let first = DATA_START / PAGE_SIZE as u64;
    let region = 8192;
    let cmd = TouchCommand {
        marker: 0x7777_0000_0000_0003,
        count: 16 * region,
        ..touch_all(first, region)
    };
    let expected = cmd.expected(|p| fill().first_qword(p));
    let sequence = source.mailbox().submit(0, request::TOUCH, cmd.args());
    std::thread::sleep(Duration::from_millis(150));
    let mut target = TargetProcess::spawn(&hop, Some(dir.path()), &[]);
    let mut opts = options(mode);
    opts.limits.downtime_target = Duration::from_millis(5);
    let report = migrate_from(&hop, &source, target.addr, &opts).expect("migrate");
    source.stop();
    let _ = target.line();
    eprintln!("{mode:?}: {report:?}");
    let got = args_of(&target.ask(&format!("result {sequence}")));
    assert_eq!(got[..3], [expected.sum, expected.xor, expected.pages]);
}

#[test]
fn netns_write_workload_postcopy() {
    netns_write_workload(MigrationMode::Postcopy, "netns_write_workload_postcopy");
}

#[test]
fn netns_write_workload_precopy() {
    netns_write_workload(MigrationMode::Precopy, "netns_write_workload_precopy");
}

#[test]
fn netns_write_workload_hybrid() {
    netns_write_workload(MigrationMode::Hybrid, "netns_write_workload_hybrid");
}

#[test]
fn netns_link_cut_during_postcopy_recovers() {
    let Some(host) = needs("netns_link_cut_during_postcopy_recovers") else {
        return;
    };
    let hop = Hop::new();
    let dir = tempfile::tempdir().unwrap();
    let source = memory_clone(&host, 64, dir.path());
    let first = DATA_START / PAGE_SIZE as u64;
    let pages = (64 << 20) / PAGE_SIZE as u64 - first;
    // Every page written since the image: all of them must cross.
    for p in 0..pages {
        source
            .ram()
            .write_u64((first + p) * PAGE_SIZE as u64 + 16, p ^ 0x5a5a)
            .unwrap();
    }
    let all = touch_all(first, pages);
    let expected = touch(source.mailbox(), &all);
    // A touch running across the migration: the guest faults during the cut.
    let sequence = source.mailbox().submit(0, request::TOUCH, all.args());
    let mut target = TargetProcess::spawn(&hop, Some(dir.path()), &[]);
    let mut opts = options(MigrationMode::Postcopy);
    // Slow the push so the cut lands in postcopy (64 MiB at 16 MB/s: ~4 s).
    opts.bandwidth_limit = Some(16 << 20);
    opts.link_timeout = Duration::from_millis(800);
    let report = std::thread::scope(|s| {
        let migration = s.spawn(|| {
            let _ns = enter(&hop.source_ns).expect("enter namespace A");
            migrate(&source, target.addr, &opts)
        });
        std::thread::sleep(Duration::from_millis(1000));
        hop.set_link(false);
        std::thread::sleep(Duration::from_millis(2500));
        hop.set_link(true);
        migration.join().unwrap()
    })
    .expect("migration completes after the link comes back");
    source.stop();
    let _ = target.line();
    eprintln!("{report:?}");
    assert!(
        report.reconnects >= 1,
        "the cut was not noticed: {report:?}"
    );
    let got = args_of(&target.ask(&format!("result {sequence}")));
    assert_eq!(got[..3], expected[..]);
    // And the pages' other bytes.
    for p in [0, 1, pages / 2, pages - 1] {
        let v = target.ask(&format!("read {}", (first + p) * PAGE_SIZE as u64 + 16));
        assert_eq!(v["value"].as_u64(), Some(p ^ 0x5a5a), "page {p}");
    }
}

#[test]
fn netns_target_dies_before_resume_vm_stays_on_source() {
    let Some(host) = needs("netns_target_dies_before_resume_vm_stays_on_source") else {
        return;
    };
    let hop = Hop::new();
    let source = boot(
        &host,
        config(1, 16),
        GuestProgram::Counter,
        &counter_options(),
    );
    let r = progress(source.mailbox(), 0, 0);
    let before = check_progress(&r);
    let mut target = TargetProcess::spawn(&hop, None, &["--die-before-ready"]);
    let result = migrate_from(
        &hop,
        &source,
        target.addr,
        &options(MigrationMode::Postcopy),
    );
    assert!(
        matches!(result, Err(MigrateError::BeforeSwitchover(_))),
        "{result:?}"
    );
    let status = target.child.wait().expect("target exit");
    assert!(!status.success(), "the target was meant to crash");
    // The VM goes on counting on the source, exactly.
    let since = source.mailbox().next_report_index();
    let r = progress(source.mailbox(), 0, since);
    let after = check_progress(&r);
    assert!(after > before);
    let r2 = progress(source.mailbox(), 0, r.index + 1);
    assert!(check_progress(&r2) > after);
}
