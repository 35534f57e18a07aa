//! The daemon's own control socket, `<state>/supervisor.sock`: the same
//! newline-delimited JSON framing as the VM sockets, with requests that
//! launch VMs, list them, and forward a [`Request`] to one of them. `ctl`
//! uses it while a daemon runs and otherwise acts directly through an
//! in-process [`VmSupervisor`] (re-adopting from disk first).
//!
//! A stopping daemon ([`SupervisorSocket::shutdown`]) refuses new requests
//! with `shutting_down` (nothing was done, so `ctl` carries the request out
//! directly instead) and waits for the requests it already forwarded to be
//! answered: a request a VM applied never loses its answer to a daemon
//! restart.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::supervisor::{AdoptReport, VmLaunch, VmListing, VmSupervisor, call_socket};
use crate::vm_protocol::{MAX_FRAME, Reply, Request, decode, read_frame, write_frame};
use crate::vm_record::{VmRecord, bind_socket, connect_socket};

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum SupervisorRequest {
    Launch {
        launch: VmLaunch,
    },
    List,
    /// Forward `request` to VM `id`.
    Vm {
        id: String,
        request: Request,
    },
    /// Scan the state directory again.
    Adopt,
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SupervisorReply {
    Launched { record: Box<VmRecord> },
    List { vms: Vec<VmListing> },
    Vm { reply: Reply },
    Adopted(AdoptReport),
}

/// One response line of the daemon socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisorResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<SupervisorReply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The daemon is stopping and did not act on the request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shutting_down: bool,
}

impl From<Result<SupervisorReply, String>> for SupervisorResponse {
    fn from(r: Result<SupervisorReply, String>) -> Self {
        match r {
            Ok(reply) => Self {
                ok: true,
                result: Some(reply),
                error: None,
                shutting_down: false,
            },
            Err(error) => Self {
                ok: false,
                result: None,
                error: Some(error),
                shutting_down: false,
            },
        }
    }
}

/// `<state>/supervisor.sock`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    crate::state_layout::StateLayout::new(state_dir).supervisor_socket()
}

/// Carries out one request on `supervisor`.
pub fn perform(
    supervisor: &VmSupervisor,
    request: SupervisorRequest,
) -> Result<SupervisorReply, String> {
    let text = |e: crate::supervisor::SupervisorError| crate::error_chain::chain(&e);
    match request {
        SupervisorRequest::Launch { launch } => supervisor
            .launch(&launch)
            .map(|record| SupervisorReply::Launched {
                record: Box::new(record),
            })
            .map_err(text),
        SupervisorRequest::List => Ok(SupervisorReply::List {
            vms: supervisor.list(),
        }),
        SupervisorRequest::Vm { id, request } => supervisor
            .call(&id, &request)
            .map(|reply| SupervisorReply::Vm { reply })
            .map_err(text),
        SupervisorRequest::Adopt => supervisor
            .adopt_all()
            .map(SupervisorReply::Adopted)
            .map_err(text),
    }
}

/// Requests being carried out, and whether the socket is stopping.
#[derive(Debug, Default)]
struct InFlight {
    stopping: bool,
    requests: usize,
}

/// The listening supervisor socket; [`SupervisorSocket::shutdown`] stops it.
pub struct SupervisorSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    in_flight: Arc<(Mutex<InFlight>, Condvar)>,
}

/// Listens on `<state>/supervisor.sock` in background threads.
pub fn serve(supervisor: Arc<VmSupervisor>) -> std::io::Result<SupervisorSocket> {
    let path = socket_path(supervisor.state_dir());
    let _ = std::fs::remove_file(&path);
    let listener = bind_socket(&path)?;
    let stop = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new((Mutex::new(InFlight::default()), Condvar::new()));
    let (accept_stop, accept_in_flight) = (Arc::clone(&stop), Arc::clone(&in_flight));
    std::thread::Builder::new()
        .name("supervisor-api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                if accept_stop.load(Ordering::SeqCst) {
                    return; // drops the listener: queued connections are reset, unserved
                }
                let Ok(stream) = stream else { continue };
                let supervisor = Arc::clone(&supervisor);
                let in_flight = Arc::clone(&accept_in_flight);
                std::thread::spawn(move || serve_connection(&supervisor, stream, &in_flight));
            }
        })?;
    Ok(SupervisorSocket {
        path,
        stop,
        in_flight,
    })
}

impl SupervisorSocket {
    /// Stops taking requests (new ones are refused with `shutting_down`,
    /// the socket file goes so `ctl` acts directly) and waits up to `grace`
    /// for the requests already being carried out to be answered. Returns
    /// how many were still running when it gave up.
    pub fn shutdown(&self, grace: Duration) -> usize {
        let (lock, changed) = &*self.in_flight;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stopping = true;
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
        // Wake the accept loop so it sees `stop` and drops the listener.
        let _ = UnixStream::connect(&self.path);
        let deadline = Instant::now() + grace;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        while state.requests > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            state = changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.requests
    }
}

fn serve_connection(
    supervisor: &VmSupervisor,
    stream: UnixStream,
    in_flight: &(Mutex<InFlight>, Condvar),
) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let (lock, changed) = in_flight;
    while let Ok(Some(frame)) = read_frame(&mut reader, MAX_FRAME) {
        let admitted = {
            let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
            if !state.stopping {
                state.requests += 1;
            }
            !state.stopping
        };
        if !admitted {
            let _ = write_frame(
                &mut writer,
                &SupervisorResponse {
                    ok: false,
                    result: None,
                    error: Some("the node daemon is stopping; nothing was done".into()),
                    shutting_down: true,
                },
            );
            return;
        }
        let result = frame
            .and_then(|line| decode::<SupervisorRequest>(&line))
            .map_err(|e| e.to_string())
            .and_then(|request| perform(supervisor, request));
        let written = write_frame(&mut writer, &SupervisorResponse::from(result));
        lock.lock().unwrap_or_else(|e| e.into_inner()).requests -= 1;
        changed.notify_all();
        if written.is_err() {
            return;
        }
    }
}

/// Errors of a `ctl` request.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("talking to the daemon at {0}")]
    Socket(PathBuf, #[source] std::io::Error),
    #[error("unreadable response from the daemon: {0}")]
    BadResponse(String),
    #[error("{0}")]
    Refused(String),
    #[error("cannot re-adopt VMs without a daemon: {0}")]
    Adopt(String),
    #[error("the node daemon is stopping")]
    ShuttingDown,
}

/// Sends `request` to the running daemon of `state_dir`, or — when none
/// listens — carries it out here after re-adopting the VMs on disk.
pub fn ctl(
    state_dir: &Path,
    exe: PathBuf,
    cgroup_roots: Vec<PathBuf>,
    request: SupervisorRequest,
) -> Result<SupervisorReply, CtlError> {
    let path = socket_path(state_dir);
    if let Ok(stream) = connect_socket(&path) {
        match ctl_over_socket(&path, stream, &request) {
            Err(CtlError::ShuttingDown) => {} // nothing done: act directly
            other => return other,
        }
    }
    let supervisor = VmSupervisor::new(state_dir, exe, cgroup_roots);
    supervisor
        .adopt_all()
        .map_err(|e| CtlError::Adopt(crate::error_chain::chain(&e)))?;
    perform(&supervisor, request).map_err(CtlError::Refused)
}

fn ctl_over_socket(
    path: &Path,
    mut stream: UnixStream,
    request: &SupervisorRequest,
) -> Result<SupervisorReply, CtlError> {
    let io = |e| CtlError::Socket(path.to_path_buf(), e);
    stream
        .set_read_timeout(Some(Duration::from_secs(900)))
        .map_err(io)?;
    write_frame(&mut stream, request).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let line = match read_frame(&mut reader, 64 << 20).map_err(io)? {
        Some(Ok(line)) => line,
        Some(Err(e)) => return Err(CtlError::BadResponse(e.to_string())),
        None => return Err(CtlError::BadResponse("connection closed".into())),
    };
    let response: SupervisorResponse =
        decode(&line).map_err(|e| CtlError::BadResponse(e.to_string()))?;
    if response.shutting_down {
        return Err(CtlError::ShuttingDown);
    }
    match (response.result, response.error) {
        (Some(reply), _) if response.ok => Ok(reply),
        (_, Some(error)) => Err(CtlError::Refused(error)),
        _ => Err(CtlError::BadResponse(line)),
    }
}

/// Sends one raw request straight to a VM socket (no daemon involved).
pub fn call_vm(record: &VmRecord, request: &Request) -> Result<Reply, String> {
    call_socket(&record.id, &record.socket, request, Duration::from_secs(60))
        .map_err(|e| crate::error_chain::chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = SupervisorRequest::Vm {
            id: "a".into(),
            request: Request::Mailbox {
                request: 4,
                timeout_ms: None,
            },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(decode::<SupervisorRequest>(&line).unwrap(), r);
        assert!(decode::<SupervisorRequest>(r#"{"command":"reboot"}"#).is_err());
    }

    #[test]
    fn ctl_without_daemon_works_on_an_empty_state_dir() {
        let state = tempfile::tempdir().unwrap();
        let reply = ctl(
            state.path(),
            "/bin/false".into(),
            Vec::new(),
            SupervisorRequest::List,
        )
        .unwrap();
        assert_eq!(reply, SupervisorReply::List { vms: vec![] });
        let err = ctl(
            state.path(),
            "/bin/false".into(),
            Vec::new(),
            SupervisorRequest::Vm {
                id: "nope".into(),
                request: Request::Stats,
            },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "no VM nope");
    }

    #[test]
    fn a_stopping_socket_refuses_new_requests_and_ctl_acts_directly() {
        let state = tempfile::tempdir().unwrap();
        let supervisor = Arc::new(VmSupervisor::new(state.path(), "/bin/false".into(), vec![]));
        let socket = serve(supervisor).unwrap();
        let path = socket_path(state.path());
        // A connection made while the daemon serves.
        let mut open = connect_socket(&path).unwrap();
        assert_eq!(
            ctl_over_socket(
                &path,
                connect_socket(&path).unwrap(),
                &SupervisorRequest::List
            )
            .unwrap(),
            SupervisorReply::List { vms: vec![] }
        );
        assert_eq!(socket.shutdown(Duration::from_secs(5)), 0);
        assert!(!path.exists(), "the socket file goes with the daemon");
        // The open connection's next request is refused, marked as not done.
        write_frame(&mut open, &SupervisorRequest::List).unwrap();
        let mut reader = BufReader::new(open);
        let line = read_frame(&mut reader, MAX_FRAME)
            .unwrap()
            .unwrap()
            .unwrap();
        let response: SupervisorResponse = decode(&line).unwrap();
        assert!(!response.ok && response.shutting_down, "{line}");
        // ctl falls back to acting directly.
        let reply = ctl(
            state.path(),
            "/bin/false".into(),
            vec![],
            SupervisorRequest::List,
        );
        assert_eq!(reply.unwrap(), SupervisorReply::List { vms: vec![] });
    }
}
