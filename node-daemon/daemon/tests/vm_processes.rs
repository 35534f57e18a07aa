//! One process per VM on the real /dev/kvm: VM processes started by a
//! supervising daemon survive its SIGKILL, a new daemon re-adopts them and
//! pauses, resumes and stops them (leaving nothing behind); a running VM is
//! captured through its socket and clone processes (copy-on-write and lazy,
//! cold and warm) answer from the image; malformed control frames are
//! refused with a clear error while the VM keeps running.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmstream_node::supervisor::{VmLaunch, VmSupervisor};
use vmstream_node::vm_protocol::{CloneBackend, Reply, Request, StartSpec};
use vmstream_test_support::{Need, require};
use vmstream_vmm::guests::{GuestProgram, request_answer};

const EXE: &str = env!("CARGO_BIN_EXE_vmstream-node");

/// A supervising daemon (`vmstream-node supervise`), killed on drop.
struct Daemon(Child);

impl Daemon {
    fn start(state: &Path) -> Self {
        let child = Command::new(EXE)
            .args(["supervise", "--state-dir"])
            .arg(state)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn supervise daemon");
        let socket = state.join("supervisor.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "daemon socket never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn kill(mut self) {
        self.0.kill().expect("SIGKILL the daemon");
        self.0.wait().expect("reap the daemon");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills, on drop, every VM process recorded under a state directory, so
/// a failing test leaves no VM running.
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
            let Ok(record) = serde_json::from_slice::<Value>(&text) else {
                continue;
            };
            let Some(pid) = record["pid"].as_u64() else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = String::from_utf8_lossy(&cmdline).contains(&*self.0.to_string_lossy());
            if ours {
                // SAFETY: kill(2) of a VM process this test started (its
                // command line names the test's state directory).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

/// Runs `vmstream-node ctl --state-dir STATE ARGS`: the JSON reply, or stderr.
fn ctl(state: &Path, args: &[&str]) -> Result<Value, String> {
    let out = Command::new(EXE)
        .args(["ctl", "--state-dir"])
        .arg(state)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ctl");
    if out.status.success() {
        serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("ctl printed no JSON ({e}): {out:?}"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn ok(state: &Path, args: &[&str]) -> Value {
    ctl(state, args).unwrap_or_else(|e| panic!("ctl {args:?}: {e}"))
}

fn answer(state: &Path, id: &str, n: u64) -> u64 {
    let v = ok(state, &["request", id, &n.to_string()]);
    v["reply"]["answer"]
        .as_u64()
        .unwrap_or_else(|| panic!("no answer in {v}"))
}

/// (state, parent pid) of a process, or None when it does not exist.
fn proc_state(pid: u64) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

fn alive(pid: u64) -> bool {
    proc_state(pid).is_some_and(|(s, _)| s != 'Z')
}

fn wait_gone(pid: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} still runs");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn five_vms_outlive_their_daemon_and_are_readopted() {
    if !require(
        "node::five_vms_outlive_their_daemon_and_are_readopted",
        &[Need::Kvm, Need::Root],
    ) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let _cleanup = KillVmsOnDrop(state.path().to_path_buf());
    let s = state.path();
    let daemon = Daemon::start(s);
    let ids: Vec<String> = (0..5).map(|i| format!("vm-{i}")).collect();
    let mut pids = Vec::new();
    for id in &ids {
        let v = ok(
            s,
            &["launch", id, "--guest", "request", "--memory-mib", "16"],
        );
        let pid = v["record"]["pid"].as_u64().expect("launched pid");
        let (_, ppid) = proc_state(pid).expect("VM process exists");
        assert_eq!(ppid, u64::from(daemon.pid()), "the daemon spawned {id}");
        pids.push(pid);
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(answer(s, id, i as u64), request_answer(i as u64, 1));
    }

    daemon.kill();
    for (pid, id) in pids.iter().zip(&ids) {
        assert!(alive(*pid), "{id} (pid {pid}) died with its daemon");
    }
    // With no daemon, ctl talks to the VMs directly.
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            answer(s, id, 100 + i as u64),
            request_answer(100 + i as u64, 2)
        );
    }

    let _daemon = Daemon::start(s);
    let list = ok(s, &["list"]);
    let vms = list["vms"].as_array().expect("vms");
    let mut listed: Vec<(String, u64, String)> = vms
        .iter()
        .map(|v| {
            (
                v["record"]["id"].as_str().unwrap().to_string(),
                v["record"]["pid"].as_u64().unwrap(),
                v["phase"].as_str().unwrap_or("none").to_string(),
            )
        })
        .collect();
    listed.sort();
    let expected: Vec<(String, u64, String)> = ids
        .iter()
        .zip(&pids)
        .map(|(id, pid)| (id.clone(), *pid, "running".to_string()))
        .collect();
    assert_eq!(listed, expected, "the new daemon lists the same 5 VMs");

    ok(s, &["pause", "vm-0"]);
    let refused = ctl(s, &["request", "vm-0", "1"]).unwrap_err();
    assert!(refused.contains("paused"), "{refused}");
    let stats = ok(s, &["stats", "vm-0"]);
    assert_eq!(stats["reply"]["phase"], "paused");
    ok(s, &["resume", "vm-0"]);
    assert_eq!(answer(s, "vm-0", 7), request_answer(7, 3));

    for (id, pid) in ids.iter().zip(&pids) {
        ok(s, &["stop", id]);
        wait_gone(*pid);
        let dir = s.join("vms").join(id);
        assert!(!dir.exists(), "{} is left behind", dir.display());
        if let Some(group) = vms
            .iter()
            .find(|v| v["record"]["id"] == id.as_str())
            .and_then(|v| v["record"]["cgroup"].as_str())
        {
            assert!(!Path::new(group).exists(), "cgroup {group} is left behind");
        }
    }
    assert_eq!(ok(s, &["list"])["vms"], serde_json::json!([]));
    let err = ctl(s, &["stats", "vm-0"]).unwrap_err();
    assert!(err.contains("no VM vm-0"), "{err}");
}

fn request_guest(id: &str) -> VmLaunch {
    VmLaunch {
        id: id.into(),
        owner: None,
        vcpus: 1,
        memory_bytes: 16 << 20,
        start: Some(StartSpec::Boot {
            guest: GuestProgram::Request,
            fill: None,
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

fn wait_running(supervisor: &VmSupervisor, id: &str) {
    supervisor
        .call(id, &Request::WaitRunning { timeout_ms: 30_000 })
        .unwrap_or_else(|e| panic!("{id} is not running: {e}"));
}

#[test]
fn captured_vm_gives_clone_processes_that_answer() {
    if !require(
        "node::captured_vm_gives_clone_processes_that_answer",
        &[Need::Kvm, Need::Root, Need::Userfaultfd],
    ) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let _cleanup = KillVmsOnDrop(state.path().to_path_buf());
    let supervisor = VmSupervisor::new(state.path(), PathBuf::from(EXE), Vec::new());
    supervisor.launch(&request_guest("source")).unwrap();
    wait_running(&supervisor, "source");
    for n in 0..3 {
        assert_eq!(ask(&supervisor, "source", n), request_answer(n, n + 1));
    }
    let image = state.path().join("image");
    let Reply::Captured(summary) = supervisor
        .call("source", &Request::Capture { dir: image.clone() })
        .unwrap()
    else {
        panic!("capture answered something else")
    };
    assert_eq!(summary.memory_bytes, 16 << 20);
    assert!(summary.nonzero_pages > 0 && summary.nonzero_pages < summary.pages);
    eprintln!("capture: {summary:?}");

    let clone_of = |id: &str, backend: CloneBackend| VmLaunch {
        start: Some(StartSpec::Clone {
            image: image.clone(),
            backend,
            network: None,
        }),
        ..request_guest(id)
    };
    supervisor
        .launch(&clone_of("cow", CloneBackend::CopyOnWrite))
        .unwrap();
    supervisor
        .launch(&clone_of("lazy", CloneBackend::Lazy))
        .unwrap();
    // A warm shell: created (and registered with userfaultfd, image
    // decoded) before the start request.
    supervisor
        .launch(&VmLaunch {
            start: None,
            prepare_lazy: true,
            preload_image: Some(image.clone()),
            ..request_guest("warm")
        })
        .unwrap();
    let Reply::Started(started) = supervisor
        .call(
            "warm",
            &Request::Start {
                spec: StartSpec::Clone {
                    image: image.clone(),
                    backend: CloneBackend::Lazy,
                    network: None,
                },
            },
        )
        .unwrap()
    else {
        panic!("start answered something else")
    };
    eprintln!("warm lazy clone start: {started:?}");
    for id in ["cow", "lazy", "warm"] {
        wait_running(&supervisor, id);
        // The image was taken after 3 answers: a clone's first is the 4th.
        assert_eq!(ask(&supervisor, id, 41), request_answer(41, 4), "{id}");
    }
    let Reply::Stats(stats) = supervisor.call("lazy", &Request::Stats).unwrap() else {
        panic!("stats answered something else")
    };
    eprintln!("lazy clone stats: {stats:?}");
    assert!(
        stats.faults.pages_copied > 0,
        "a lazy clone brings pages in from the image"
    );
    assert_eq!(stats.requests_served, 1);
    // The source runs on, unaffected.
    assert_eq!(ask(&supervisor, "source", 9), request_answer(9, 4));
    for id in ["source", "cow", "lazy", "warm"] {
        supervisor.stop(id).unwrap();
        assert!(!state.path().join("vms").join(id).exists());
    }
}

fn send_raw(stream: &mut UnixStream, reader: &mut impl BufRead, line: &[u8]) -> Value {
    stream.write_all(line).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut response = String::new();
    reader.read_line(&mut response).unwrap();
    serde_json::from_str(&response).unwrap_or_else(|e| panic!("{e}: {response}"))
}

#[test]
fn malformed_control_frames_are_refused_and_the_vm_keeps_running() {
    if !require(
        "node::malformed_control_frames_are_refused_and_the_vm_keeps_running",
        &[Need::Kvm, Need::Root],
    ) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let _cleanup = KillVmsOnDrop(state.path().to_path_buf());
    let supervisor = VmSupervisor::new(state.path(), PathBuf::from(EXE), Vec::new());
    let record = supervisor.launch(&request_guest("target")).unwrap();
    wait_running(&supervisor, "target");
    let mut stream = UnixStream::connect(&record.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let cases: [(&[u8], &str); 5] = [
        (b"hello", "not JSON"),
        (br#"{"command":"fly"}"#, "unknown variant `fly`"),
        (br#"{"command":"mailbox"}"#, "missing field `request`"),
        (b"{}", "missing field `command`"),
        (&[b'x'; 70 * 1024], "longer than 65536 bytes"),
    ];
    for (line, expected) in cases {
        let v = send_raw(&mut stream, &mut reader, line);
        assert_eq!(v["ok"], false, "{v}");
        let error = v["error"].as_str().unwrap();
        assert!(
            error.contains(expected),
            "{error:?} should say {expected:?}"
        );
    }
    // Same connection, still served; the guest still answers.
    let v = send_raw(
        &mut stream,
        &mut reader,
        br#"{"command":"mailbox","request":5}"#,
    );
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["result"]["answer"], request_answer(5, 1));
    let v = send_raw(
        &mut stream,
        &mut reader,
        br#"{"command":"start","spec":{"source":"boot","guest":"Request"}}"#,
    );
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("start refused: the VM is running")),
        "{v}"
    );
    supervisor.stop("target").unwrap();
    assert!(!record.socket.exists());

    // A VM that cannot start is reported with the reason and cleaned up.
    let missing = state.path().join("no-such-image");
    let err = supervisor
        .launch(&VmLaunch {
            start: Some(StartSpec::Clone {
                image: missing.clone(),
                backend: CloneBackend::CopyOnWrite,
                network: None,
            }),
            ..request_guest("broken")
        })
        .unwrap_err();
    let text = vmstream_node::error_chain::chain(&err);
    assert!(text.contains("no-such-image"), "{text}");
    assert!(!state.path().join("vms").join("broken").exists());
}
