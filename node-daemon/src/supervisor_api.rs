//! The daemon's own control socket, `<state>/supervisor.sock`: the same
//! newline-delimited JSON framing as the VM sockets, with requests that
//! launch VMs, list them, and forward a [`Request`] to one of them. `ctl`
//! uses it while a daemon runs and otherwise acts directly through an
//! in-process [`VmSupervisor`] (re-adopting from disk first).

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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
}

impl From<Result<SupervisorReply, String>> for SupervisorResponse {
    fn from(r: Result<SupervisorReply, String>) -> Self {
        match r {
            Ok(reply) => Self {
                ok: true,
                result: Some(reply),
                error: None,
            },
            Err(error) => Self {
                ok: false,
                result: None,
                error: Some(error),
            },
        }
    }
}

/// `<state>/supervisor.sock`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("supervisor.sock")
}

/// Carries out one request on `supervisor`.
pub fn perform(
    supervisor: &VmSupervisor,
    request: SupervisorRequest,
) -> Result<SupervisorReply, String> {
    let text = |e: crate::supervisor::SupervisorError| crate::vm_process::chain(&e);
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

/// Listens on `<state>/supervisor.sock` in background threads.
pub fn serve(supervisor: Arc<VmSupervisor>) -> std::io::Result<()> {
    let path = socket_path(supervisor.state_dir());
    let _ = std::fs::remove_file(&path);
    let listener = bind_socket(&path)?;
    std::thread::Builder::new()
        .name("supervisor-api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let supervisor = Arc::clone(&supervisor);
                std::thread::spawn(move || serve_connection(&supervisor, stream));
            }
        })?;
    Ok(())
}

fn serve_connection(supervisor: &VmSupervisor, stream: UnixStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    while let Ok(Some(frame)) = read_frame(&mut reader, MAX_FRAME) {
        let result = frame
            .and_then(|line| decode::<SupervisorRequest>(&line))
            .map_err(|e| e.to_string())
            .and_then(|request| perform(supervisor, request));
        if write_frame(&mut writer, &SupervisorResponse::from(result)).is_err() {
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
    match connect_socket(&path) {
        Ok(stream) => ctl_over_socket(&path, stream, &request),
        Err(_) => {
            let supervisor = VmSupervisor::new(state_dir, exe, cgroup_roots);
            supervisor
                .adopt_all()
                .map_err(|e| CtlError::Adopt(crate::vm_process::chain(&e)))?;
            perform(&supervisor, request).map_err(CtlError::Refused)
        }
    }
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
    match (response.result, response.error) {
        (Some(reply), _) if response.ok => Ok(reply),
        (_, Some(error)) => Err(CtlError::Refused(error)),
        _ => Err(CtlError::BadResponse(line)),
    }
}

/// Sends one raw request straight to a VM socket (no daemon involved).
pub fn call_vm(record: &VmRecord, request: &Request) -> Result<Reply, String> {
    call_socket(&record.id, &record.socket, request, Duration::from_secs(60))
        .map_err(|e| crate::vm_process::chain(&e))
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
}
