//! The target side of a migration: accept a session, make (or take) the VM
//! shell before anything is paused, take precopy pages, set the state,
//! report Ready, start the vCPUs on Go, then install pages as they come
//! (pushed, or answering this side's faults) until Done; report Complete.
//! A link lost after Ready is waited for (the guest waits on missing
//! pages) and the session goes on over the new connections.
//!
//! ```text
//! Accept(C) ─► shell ─► Accept(F) ─► [precopy pages] ─► State ─► Ready ─► Go ─► start vCPUs ─► Resumed
//!                                                                  │                        │
//!  failure before Ready: discard (the VM never ran here)          ▼                        ▼
//!                                             link lost: wait for the source's reconnection (resume)
//!                                                                          Pages… Done ─► Complete
//! ```

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmstream_pagestream::ClusterToken;
use vmstream_vmm::image::PageStore;
use vmstream_vmm::machine::{Machine, MachineConfig};
use vmstream_vmm::vstate::VmState;
use vmstream_vmm::vstate::vm::KvmHost;

use crate::plan::MigrationMode;
use crate::report::TargetSide;
use crate::session::{SessionError, abort, image_fingerprint, read_hello, server_authenticate};
use crate::target_memory::TargetMemory;
use crate::target_vm::{TargetShell, TargetShellError};
use crate::wire::{
    self, Command, FLAG_FAULT_ANSWER, FLAG_FAULT_CONNECTION, FLAG_LAST, FLAG_PRECOPY, FLAG_RESUME,
    FLAG_TARGET_RUNNING, Header, Hello, read_frame, write_frame,
};

/// Called with the decoded state before Ready is sent (tests use it to
/// crash the target at the worst moment).
pub type BeforeReady = Arc<dyn Fn() + Send + Sync>;

/// How the target runs.
#[derive(Clone)]
pub struct TargetOptions {
    pub token: ClusterToken,
    pub host: Arc<KvmHost>,
    /// The live image the VM was cloned from, as held on this node.
    pub image: Option<Arc<PageStore>>,
    pub switchover_timeout: Duration,
    pub link_timeout: Duration,
    pub recovery_timeout: Duration,
    pub before_ready: Option<BeforeReady>,
}

impl std::fmt::Debug for TargetOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetOptions")
            .field("image", &self.image.as_ref().map(|i| i.dir().to_path_buf()))
            .field("switchover_timeout", &self.switchover_timeout)
            .field("recovery_timeout", &self.recovery_timeout)
            .finish_non_exhaustive()
    }
}

impl TargetOptions {
    /// Defaults.
    pub fn new(token: ClusterToken, host: Arc<KvmHost>, image: Option<Arc<PageStore>>) -> Self {
        Self {
            token,
            host,
            image,
            switchover_timeout: Duration::from_secs(10),
            link_timeout: Duration::from_millis(1500),
            recovery_timeout: Duration::from_secs(60),
            before_ready: None,
        }
    }
}

/// Why receiving a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("the migration session failed before the VM ran here; nothing is kept")]
    BeforeStart(#[source] SessionError),
    #[error("cannot make the VM shell")]
    Shell(#[from] TargetShellError),
    #[error("the link did not come back within {0:?}; the VM stops here")]
    LinkLost(Duration),
    #[error("protocol error after the switch-over: {0}")]
    Protocol(String),
}

/// A received migration: the VM (running, a machine like any other: it can
/// be paused, captured and migrated again) and what it took here.
#[derive(Debug)]
pub struct Received {
    pub vm: Machine,
    pub mode: MigrationMode,
    pub side: TargetSide,
}

fn accept_until(listener: &TcpListener, deadline: Instant) -> Option<TcpStream> {
    let _ = listener.set_nonblocking(true);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = listener.set_nonblocking(false);
                return Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let _ = listener.set_nonblocking(false);
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Accepts the next connection of `session` with the given role flags
/// (authenticated); other connections are refused and dropped.
fn accept_role(
    listener: &TcpListener,
    options: &TargetOptions,
    session: u64,
    flags: u32,
    deadline: Instant,
) -> Option<(TcpStream, Hello)> {
    while let Some(mut s) = accept_until(listener, deadline) {
        let Ok((h, hello)) = read_hello(&mut s, options.switchover_timeout) else {
            continue;
        };
        if h.request_id != session || h.flags & (FLAG_RESUME | FLAG_FAULT_CONNECTION) != flags {
            let _ = abort(&mut s, "not the connection this target waits for");
            continue;
        }
        if server_authenticate(&mut s, &options.token, session, &hello).is_ok() {
            return Some((s, hello));
        }
    }
    None
}

/// Waits for the first connection of a new session and checks it.
fn accept_session(
    listener: &TcpListener,
    options: &TargetOptions,
) -> Result<(TcpStream, u64, Hello, MigrationMode), SessionError> {
    loop {
        let (mut s, _) = listener
            .accept()
            .map_err(SessionError::io("accepting a migration connection"))?;
        let Ok((h, hello)) = read_hello(&mut s, options.switchover_timeout) else {
            continue;
        };
        if h.flags & (FLAG_RESUME | FLAG_FAULT_CONNECTION) != 0 {
            let _ = abort(&mut s, "no migration session is in progress here");
            continue;
        }
        let refuse = |s: &mut TcpStream, why: String| {
            let _ = abort(s, &why);
            SessionError::Refused(why)
        };
        let Some(mode) = MigrationMode::from_wire(hello.mode) else {
            return Err(refuse(
                &mut s,
                format!("unknown migration mode {}", hello.mode),
            ));
        };
        let ours = image_fingerprint(options.image.as_deref());
        // Fingerprint 0: the source sends every page (it names no image),
        // so this node's image is never read and need not match.
        if hello.image_fingerprint != 0 && hello.image_fingerprint != ours {
            return Err(refuse(
                &mut s,
                format!(
                    "the VM's live image (fingerprint {:#x}) is not the one this node holds ({ours:#x})",
                    hello.image_fingerprint
                ),
            ));
        }
        server_authenticate(&mut s, &options.token, h.request_id, &hello)?;
        return Ok((s, h.request_id, hello, mode));
    }
}

/// Receives one migration on `listener`. `shell` is a shell made ahead of
/// time (used if its shape matches, else one is made when Hello arrives —
/// still before the source pauses).
pub fn receive(
    listener: &TcpListener,
    options: &TargetOptions,
    shell: Option<TargetShell>,
) -> Result<Received, ReceiveError> {
    let (mut control, session, hello, mode) =
        accept_session(listener, options).map_err(ReceiveError::BeforeStart)?;
    let config = MachineConfig {
        vcpus: u8::try_from(hello.vcpus).unwrap_or(u8::MAX),
        memory_bytes: hello.memory_bytes as usize,
    };
    let mut side = TargetSide::default();
    let step = Instant::now();
    let shell = match shell {
        Some(s) if s.config() == config => s,
        _ => match TargetShell::create(&options.host, config, options.image.clone()) {
            Ok(s) => s,
            Err(e) => {
                let _ = abort(&mut control, &format!("cannot make the VM shell: {e}"));
                return Err(e.into());
            }
        },
    };
    side.shell_create_ms = step.elapsed().as_secs_f64() * 1e3;
    let memory = Arc::clone(shell.memory());
    write_frame(&mut control, &Header::new(Command::Accept), &[])
        .map_err(|e| ReceiveError::BeforeStart(SessionError::io("sending Accept")(e)))?;
    let deadline = Instant::now() + options.switchover_timeout;
    let (mut fault, _) = accept_role(listener, options, session, FLAG_FAULT_CONNECTION, deadline)
        .ok_or(ReceiveError::BeforeStart(SessionError::Timeout(
        "waiting for the fault connection",
    )))?;
    write_frame(&mut fault, &Header::new(Command::Accept), &[])
        .map_err(|e| ReceiveError::BeforeStart(SessionError::io("sending Accept")(e)))?;

    // Precopy pages, then the state.
    let _ = control.set_read_timeout(Some(options.switchover_timeout));
    let mut buf = Vec::new();
    let mut shell = Some(shell);
    let prepared = loop {
        let h = read_frame(&mut control, &mut buf)
            .map_err(|e| ReceiveError::BeforeStart(SessionError::read("precopy or state")(e)))?;
        match h.command {
            Command::State => {
                let step = Instant::now();
                let state = VmState::decode(&buf).map_err(|e| {
                    ReceiveError::BeforeStart(SessionError::Protocol(format!("bad VM state: {e}")))
                })?;
                let shell = shell.take().expect("the state arrives once");
                let prepared = match shell.set_state(&state) {
                    Ok(prepared) => prepared,
                    Err(e) => {
                        let _ = abort(&mut control, &format!("cannot set the VM state: {e}"));
                        return Err(ReceiveError::BeforeStart(SessionError::Refused(
                            e.to_string(),
                        )));
                    }
                };
                side.set_state_ms = step.elapsed().as_secs_f64() * 1e3;
                break prepared;
            }
            Command::Abort => {
                return Err(ReceiveError::BeforeStart(SessionError::Aborted(
                    String::from_utf8_lossy(&buf).into_owned(),
                )));
            }
            _ => apply_page_frame(&memory, &h, &buf).map_err(ReceiveError::BeforeStart)?,
        }
    };
    if let Some(hook) = &options.before_ready {
        hook();
    }
    write_frame(&mut control, &Header::new(Command::Ready), &[])
        .map_err(|e| ReceiveError::BeforeStart(SessionError::io("sending Ready")(e)))?;

    // Go (possibly over a new connection if the link broke after Ready).
    let mut links = Some((control, fault));
    let mut vm: Option<Machine> = None;
    let mut prepared = Some(prepared);
    loop {
        let (mut control, fault) = match links.take() {
            Some(l) => l,
            None => match await_reconnect(listener, options, session, &memory, vm.is_some()) {
                Some(l) => l,
                None => {
                    return Err(if vm.is_some() {
                        ReceiveError::LinkLost(options.recovery_timeout)
                    } else {
                        ReceiveError::BeforeStart(SessionError::Timeout(
                            "the source did not send Go and did not come back",
                        ))
                    });
                }
            },
        };
        if vm.is_none() {
            let go = loop {
                match read_frame(&mut control, &mut buf) {
                    Ok(h) if h.command == Command::Go => break Ok(()),
                    Ok(h) if h.command == Command::Abort => {
                        break Err(Some(String::from_utf8_lossy(&buf).into_owned()));
                    }
                    Ok(_) => {}
                    Err(_) => break Err(None),
                }
            };
            match go {
                Ok(()) => {
                    let step = Instant::now();
                    memory.set_running();
                    let started = prepared.take().expect("kept until Go").start().machine;
                    side.start_ms = step.elapsed().as_secs_f64() * 1e3;
                    vm = Some(started);
                    if write_frame(&mut control, &Header::new(Command::Resumed), &[]).is_err() {
                        continue;
                    }
                }
                Err(Some(reason)) => {
                    return Err(ReceiveError::BeforeStart(SessionError::Aborted(reason)));
                }
                Err(None) => continue,
            }
        }
        match postcopy_epoch(control, fault, &memory, options, &side) {
            Ok(()) => break,
            Err(EpochEnd::Link) => {}
            Err(EpochEnd::Protocol(e)) => return Err(ReceiveError::Protocol(e)),
        }
    }
    let vm = vm.expect("running after postcopy");
    memory.shutdown();
    side = side.with_memory(&memory.stats());
    Ok(Received { vm, mode, side })
}

/// Waits for the source's reconnection (both connections), answering with
/// what this side already has.
fn await_reconnect(
    listener: &TcpListener,
    options: &TargetOptions,
    session: u64,
    memory: &TargetMemory,
    running: bool,
) -> Option<(TcpStream, TcpStream)> {
    memory.set_fault_link(None);
    tracing::warn!("migration link lost; waiting for the source to reconnect");
    let deadline = Instant::now() + options.recovery_timeout;
    loop {
        let (mut control, _) = accept_role(listener, options, session, FLAG_RESUME, deadline)?;
        let resolved = memory.resolved_words();
        let chunks = wire::sparse_bitmap_chunks(&resolved);
        let flags = if running { FLAG_TARGET_RUNNING } else { 0 };
        if chunks.len() != 1 {
            // More than 1 MiB of sparse bitmap: the source re-pushes all.
            let _ = write_frame(
                &mut control,
                &Header::new(Command::Accept).with_flags(flags),
                &[],
            );
        } else if write_frame(
            &mut control,
            &Header::new(Command::Accept).with_flags(flags),
            &[&chunks[0]],
        )
        .is_err()
        {
            continue;
        }
        let (mut fault, _) = accept_role(
            listener,
            options,
            session,
            FLAG_RESUME | FLAG_FAULT_CONNECTION,
            deadline,
        )?;
        if write_frame(&mut fault, &Header::new(Command::Accept), &[]).is_ok() {
            return Some((control, fault));
        }
    }
}

/// Applies a page-carrying frame (Pages, Clean, Zero, Candidates,
/// Invalidate, Ping).
fn apply_page_frame(memory: &TargetMemory, h: &Header, buf: &[u8]) -> Result<(), SessionError> {
    let first = h.first_page as usize;
    let count = h.page_count as usize;
    let install = |r: Result<(), crate::target_memory::InstallError>| {
        r.map_err(|e| SessionError::Protocol(e.to_string()))
    };
    match h.command {
        Command::Pages => install(memory.install_pages(first, buf, h.flags & FLAG_PRECOPY != 0)),
        Command::Clean => install(memory.install_from_image(first, count)),
        Command::Zero => install(memory.install_zero(first, count)),
        Command::Candidates => {
            let words = memory.pages().div_ceil(64);
            let pairs = wire::parse_sparse_bitmap(buf, words)
                .ok_or_else(|| SessionError::Protocol("malformed Candidates".into()))?;
            memory.mark_candidates(&pairs);
            if h.flags & FLAG_LAST != 0 {
                install(memory.finish_candidates())?;
            }
            Ok(())
        }
        Command::Invalidate => {
            let words = memory.pages().div_ceil(64);
            let pairs = wire::parse_sparse_bitmap(buf, words)
                .ok_or_else(|| SessionError::Protocol("malformed Invalidate".into()))?;
            install(memory.invalidate(&pairs).map(|_| ()))
        }
        Command::Ping => Ok(()),
        other => Err(SessionError::Unexpected {
            expected: "pages",
            got: other,
        }),
    }
}

enum EpochEnd {
    Link,
    Protocol(String),
}

/// One connection pair's worth of postcopy on the target.
fn postcopy_epoch(
    control: TcpStream,
    fault: TcpStream,
    memory: &Arc<TargetMemory>,
    options: &TargetOptions,
    base: &TargetSide,
) -> Result<(), EpochEnd> {
    for s in [&control, &fault] {
        let _ = s.set_read_timeout(Some(options.link_timeout));
        let _ = s.set_write_timeout(Some(options.link_timeout));
    }
    let fault_w = fault.try_clone().map_err(|_| EpochEnd::Link)?;
    memory.set_fault_link(Some(fault_w));
    memory.rerequest_waiting();
    let broken = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let control_w = Mutex::new(control.try_clone().map_err(|_| EpochEnd::Link)?);
    let kill = || {
        broken.store(true, Ordering::SeqCst);
        let _ = control.shutdown(Shutdown::Both);
        let _ = fault.shutdown(Shutdown::Both);
    };
    let mut fault_r = &fault;
    let mut control_r = &control;
    let result = std::thread::scope(|scope| {
        // Fault answers.
        scope.spawn(|| {
            let mut buf = Vec::new();
            loop {
                match read_frame(&mut fault_r, &mut buf) {
                    Ok(h) if h.command == Command::Ping => {}
                    Ok(h) if h.flags & FLAG_FAULT_ANSWER != 0 => {
                        if let Err(e) = apply_page_frame(memory, &h, &buf) {
                            tracing::error!(error = %e, "installing a fault answer failed");
                            kill();
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if !done.load(Ordering::SeqCst) {
                            kill();
                        }
                        return;
                    }
                }
            }
        });
        scope.spawn(|| {
            while !broken.load(Ordering::SeqCst) && !done.load(Ordering::SeqCst) {
                for _ in 0..20 {
                    if broken.load(Ordering::SeqCst) || done.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let mut w = control_w.lock().unwrap_or_else(|e| e.into_inner());
                if write_frame(&mut *w, &Header::new(Command::Ping), &[]).is_err() {
                    kill();
                }
                drop(w);
                memory.ping_fault_link();
            }
        });
        let mut buf = Vec::with_capacity(wire::MAX_PAGES_PAYLOAD as usize);
        let outcome = loop {
            let h = match read_frame(&mut control_r, &mut buf) {
                Ok(h) => h,
                Err(_) => break Err(EpochEnd::Link),
            };
            match h.command {
                Command::Done => {
                    // Fault answers travel on the other connection and may
                    // still be on their way: wait for them (bounded).
                    let waited = Instant::now();
                    let missing = loop {
                        let (requested, lost) = memory.missing_source_pages();
                        if lost > 0 || requested == 0 || waited.elapsed() > options.link_timeout {
                            break requested + lost;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    };
                    if missing > 0 {
                        let why = format!("{missing} pages announced by the source never arrived");
                        let mut w = control_w.lock().unwrap_or_else(|e| e.into_inner());
                        let _ = abort(&mut w, &why);
                        break Err(EpochEnd::Protocol(why));
                    }
                    let side = base.with_memory(&memory.stats());
                    let payload = serde_json::to_vec(&side).unwrap_or_default();
                    let mut w = control_w.lock().unwrap_or_else(|e| e.into_inner());
                    match write_frame(&mut *w, &Header::new(Command::Complete), &[&payload])
                        .and_then(|()| w.flush())
                    {
                        Ok(()) => break Ok(()),
                        Err(_) => break Err(EpochEnd::Link),
                    }
                }
                Command::Abort => {
                    break Err(EpochEnd::Protocol(format!(
                        "the source aborted: {}",
                        String::from_utf8_lossy(&buf)
                    )));
                }
                _ => {
                    if let Err(e) = apply_page_frame(memory, &h, &buf) {
                        break Err(EpochEnd::Protocol(e.to_string()));
                    }
                }
            }
        };
        done.store(true, Ordering::SeqCst);
        if outcome.is_err() {
            memory.set_fault_link(None);
        }
        // Let the source read Complete before the sockets close: it closes
        // the control connection first, then the fault connection goes.
        if outcome.is_ok() {
            let mut rest = Vec::new();
            while read_frame(&mut control_r, &mut rest).is_ok() {}
        }
        let _ = fault.shutdown(Shutdown::Both);
        if outcome.is_err() || broken.load(Ordering::SeqCst) {
            let _ = control.shutdown(Shutdown::Both);
        }
        outcome
    });
    memory.set_fault_link(None);
    result
}
