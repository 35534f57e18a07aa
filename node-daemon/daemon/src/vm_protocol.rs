//! The supervisor protocol spoken on a VM process's Unix socket
//! (`<state>/vms/<id>/control.sock`): one JSON object per line in each
//! direction. A [`Request`] names its command in the `command` field; every
//! [`Response`] carries `ok` and either a `result` or an `error` that names
//! the problem. Frames longer than [`MAX_FRAME`] bytes, text that is not JSON
//! and unknown commands are answered with an error; the connection and the VM
//! stay up.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmstream_vmm::guests::{FillSpec, GuestProgram};

/// Longest accepted request line, newline excluded.
pub const MAX_FRAME: usize = 64 * 1024;

/// How a clone's guest memory is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneBackend {
    /// `MAP_PRIVATE` of the local page store.
    CopyOnWrite,
    /// userfaultfd streaming from the page store.
    Lazy,
}

/// What a VM process runs once started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum StartSpec {
    /// Boot a micro guest; the start completes when the guest reports READY.
    Boot {
        guest: GuestProgram,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fill: Option<FillSpec>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        params: Vec<u64>,
        /// How long to wait for the READY report.
        #[serde(default = "default_ready_timeout_ms")]
        ready_timeout_ms: u64,
    },
    /// Start a clone from the live image in `image`.
    Clone {
        image: PathBuf,
        backend: CloneBackend,
        /// A Linux image's network devices: the namespace and taps the
        /// daemon made for this clone (none for micro guests).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<CloneNetwork>,
    },
    /// Start a clone of an image held by other nodes: the state file is in
    /// `state_dir`, the pages are streamed lazily from the daemon's relay
    /// server (`relay`, image `image_id`, token in `token_file`), which
    /// reads through the node cache.
    RemoteClone {
        state_dir: PathBuf,
        image_id: String,
        relay: std::net::SocketAddr,
        token_file: PathBuf,
    },
    /// Boot a Linux guest; the start completes when its readiness probe
    /// passes.
    Linux(LinuxStart),
}

/// The taps a clone of a Linux image attaches its network devices to (in
/// the image's device order), opened inside network namespace `netns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneNetwork {
    pub netns: String,
    pub taps: Vec<String>,
}

fn default_ready_timeout_ms() -> u64 {
    60_000
}

/// A Linux guest to boot: files the daemon fetched and verified (kernel,
/// initrd, disk images), the command line, the network and the readiness
/// probe. Disks are opened read-only, written through a copy-on-write
/// overlay in the VM's directory; network interfaces attach to the taps
/// the daemon made in namespace `netns` ([`crate::vm_net`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxStart {
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<LinuxDisk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<LinuxNetwork>,
    pub readiness: LinuxReadiness,
    /// How long to wait for the readiness probe.
    pub ready_timeout_ms: u64,
    /// The network namespace the taps are in (none: the VM process's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// A block device of a Linux guest, in the order the guest sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxDisk {
    pub name: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub root: bool,
}

/// A network interface of a Linux guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxNetwork {
    pub name: String,
    /// Address with prefix length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The tap the daemon made for the interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
}

/// When a booted Linux guest counts as ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "probe", rename_all = "snake_case")]
pub enum LinuxReadiness {
    /// No probe named: the serial console printed `IP-Config: Complete`
    /// (with a network) or `VFS: Mounted root` (without).
    Booted,
    /// The serial console printed this text.
    SerialPattern { pattern: String },
    /// The guest accepts TCP connections on this port.
    TcpProbe { port: u16 },
    /// The guest answers ICMP echo.
    Icmp,
    /// The vmstream guest agent reported ready.
    Agent,
}

/// A start a VM process refuses before touching its VM shell (the VM stays
/// warm); carried in [`Response::refusal`] so the daemon gets it typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum StartRefusal {
    /// Sent by builds before the VMM's Linux boot was wired in.
    #[error("this build's VMM cannot boot Linux yet")]
    LinuxBootUnavailable,
    #[error(
        "Linux readiness probes tcpProbe, icmp and agent are not supported yet; use serialPattern (or none)"
    )]
    LinuxReadinessUnsupported,
    #[error("a Linux network interface has no tap (the daemon makes them)")]
    LinuxNetworkWithoutTap,
}

impl StartRefusal {
    /// The `reason` of the status condition this refusal is reported with.
    pub fn reason(self) -> &'static str {
        match self {
            Self::LinuxBootUnavailable => "LinuxBootUnavailable",
            Self::LinuxReadinessUnsupported => "LinuxReadinessUnsupported",
            Self::LinuxNetworkWithoutTap => "LinuxNetworkWithoutTap",
        }
    }
}

/// One request to a VM process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is the process alive and who is it.
    Ping,
    /// Start the VM in the pre-created shell.
    Start { spec: StartSpec },
    /// Pause every vCPU.
    Pause,
    /// Resume every vCPU.
    Resume,
    /// Capture the running VM into a live image in `dir` (created if
    /// missing; must be empty).
    Capture { dir: PathBuf },
    /// Stop the VM; the process removes its directory and exits.
    Stop,
    /// Usage counters.
    Stats,
    /// Ask a request guest to answer `request` (a mailbox round trip).
    Mailbox {
        request: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Wait until the VM is running (booted guests: READY reported).
    WaitRunning { timeout_ms: u64 },
    /// Give back up to `max_bytes` of resident guest pages that still equal
    /// the clone's image (they are brought back from the image on the next
    /// touch); 0 only counts them. Pages the guest wrote are never dropped.
    Reclaim { max_bytes: u64 },
    /// Become a live-migration target: drop the warm shell, listen on
    /// `listen` (port 0: any), and receive the VM in the background (phase
    /// `starting` until it runs here). `image`: this node's copy of the
    /// VM's live image (pages the source did not change come from it).
    Receive {
        listen: std::net::SocketAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<PathBuf>,
        token_file: PathBuf,
    },
    /// Live-migrate the running VM to the target at `target`. On success
    /// the VM runs there: this process stops its copy and stays in phase
    /// `stopping` until it is stopped. On failure before the switch-over
    /// the VM runs here again.
    Migrate {
        target: std::net::SocketAddr,
        mode: MigrateMode,
        token_file: PathBuf,
        /// Precopy rounds (precopy: most rounds; hybrid: rounds before
        /// postcopy); 0 keeps the defaults.
        #[serde(default)]
        precopy_rounds: u32,
        /// Most bytes per second the background push may use.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bandwidth_bytes_per_s: Option<u64>,
        /// Whether the target holds the VM's live image (else every page
        /// crosses).
        #[serde(default)]
        target_has_image: bool,
    },
}

/// How a VM is migrated (the VMMigration's `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrateMode {
    Postcopy,
    Precopy,
    Hybrid,
}

impl Request {
    /// The command name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Start { .. } => "start",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Capture { .. } => "capture",
            Request::Stop => "stop",
            Request::Stats => "stats",
            Request::Mailbox { .. } => "mailbox",
            Request::WaitRunning { .. } => "wait_running",
            Request::Reclaim { .. } => "reclaim",
            Request::Receive { .. } => "receive",
            Request::Migrate { .. } => "migrate",
        }
    }
}

/// Where a VM process is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmPhase {
    /// Shell created, waiting for a start request.
    Warm,
    /// Start in progress (booting guests until READY).
    Starting,
    Running,
    Paused,
    /// Start failed or a vCPU ended; the process stays for inspection.
    Failed,
    /// Stop accepted; the process is about to exit.
    Stopping,
}

/// Start timings of a VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StartReport {
    /// Creating the shell (VM, vCPUs, memory slots), before the request.
    pub shell_created_ms: f64,
    /// Start request until the vCPU threads ran (restore or boot set-up).
    pub start_ms: f64,
    /// Start request until vCPU 0 first came back from the guest (clones),
    /// or until the READY report (booted guests).
    pub first_exit_ms: Option<f64>,
    /// Whether the start was a request to a waiting (warm) shell rather
    /// than given on the VM process's command line.
    pub warm: bool,
}

/// Process and guest-RAM memory figures in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFigures {
    /// Whole process (`smaps_rollup`).
    pub rss: u64,
    pub pss: u64,
    pub private: u64,
    pub shared: u64,
    /// Guest RAM mapping only (`smaps` of its range): resident bytes.
    pub guest_resident: u64,
    /// Resident guest bytes only this clone holds: anonymous pages not
    /// merged by KSM (pages it wrote; for lazy clones also the image pages
    /// copied in). Image pages mapped from the page cache are not private
    /// even when no other clone maps them.
    pub guest_private: u64,
    /// Resident guest bytes shared with the node: image pages in the page
    /// cache, KSM-merged pages (`guest_resident - guest_private`).
    pub guest_shared: u64,
    /// Resident guest bytes merged by KSM (part of `guest_shared`).
    #[serde(default)]
    pub guest_ksm: u64,
    /// Whether guest RAM is marked mergeable for KSM.
    #[serde(default)]
    pub ksm_enabled: bool,
}

/// Result of a reclaim.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ReclaimSummary {
    /// Resident guest pages compared with the image.
    pub scanned_pages: u64,
    /// Of those, pages equal to the image.
    pub image_equal_pages: u64,
    /// Bytes given back.
    pub dropped_bytes: u64,
    /// Image-equal bytes found but not dropped (over `max_bytes`).
    pub clean_left_bytes: u64,
    /// Guest-private bytes right after the reclaim.
    pub guest_private_after: u64,
    /// How long the vCPUs were paused.
    pub paused_ms: f64,
    pub took_ms: f64,
}

/// Lazy-memory fault counters and the service-time histogram.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultFigures {
    /// Missing-page faults served by the handler.
    pub faults: u64,
    pub pages_copied: u64,
    pub pages_zeroed: u64,
    pub errors: u64,
    /// `(bucket upper bound in µs, count)` for non-empty buckets.
    pub latency_us: Vec<(u64, u64)>,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

/// Stats of one VM process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmStats {
    pub id: String,
    pub pid: u32,
    pub phase: Option<VmPhase>,
    pub vcpus: u8,
    pub memory_bytes: u64,
    /// Sum of the vCPU threads' CPU time.
    pub vcpu_cpu_ms: f64,
    /// CPU time of the whole process (utime + stime).
    pub process_cpu_ms: f64,
    pub memory: MemoryFigures,
    pub faults: FaultFigures,
    pub start: Option<StartReport>,
    /// Mailbox requests the guest answered since this VM started.
    pub requests_served: u64,
    /// Milliseconds since the Unix epoch when sampled.
    pub sampled_at_ms: u64,
}

/// Result of a capture.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CaptureSummary {
    pub dir: PathBuf,
    pub memory_bytes: u64,
    pub pages: u64,
    pub nonzero_pages: u64,
    pub size_bytes: u64,
    pub capture_ms: f64,
    pub source_pause_ms: f64,
}

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Pong {
        id: String,
        pid: u32,
        phase: VmPhase,
    },
    Started(StartReport),
    Paused {
        pause_ms: f64,
    },
    Resumed,
    Captured(CaptureSummary),
    Stopping,
    Stats(Box<VmStats>),
    Answer {
        answer: u64,
        round_trip_us: u64,
    },
    Running,
    Reclaimed(ReclaimSummary),
    /// A migration target listens here.
    Receiving {
        addr: std::net::SocketAddr,
    },
    /// The VM runs on the target now.
    Migrated(Box<vmstream_migration::MigrationReport>),
}

/// One response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Reply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Set when the error is a typed start refusal (`error` says the same
    /// in words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<StartRefusal>,
}

impl Response {
    pub fn ok(reply: Reply) -> Self {
        Self {
            ok: true,
            result: Some(reply),
            error: None,
            refusal: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(message.into()),
            refusal: None,
        }
    }

    /// A typed start refusal.
    pub fn refused(refusal: StartRefusal) -> Self {
        Self {
            refusal: Some(refusal),
            ..Self::error(refusal.to_string())
        }
    }

    /// The reply, or the error message.
    pub fn into_result(self) -> Result<Reply, String> {
        match (self.ok, self.result, self.error) {
            (true, Some(reply), _) => Ok(reply),
            (_, _, Some(error)) => Err(error),
            (true, None, None) => Err("response has ok=true but no result".into()),
            (false, _, None) => Err("response has ok=false but no error".into()),
        }
    }
}

/// Why a line could not be read as a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame longer than {limit} bytes refused")]
    TooLong { limit: usize },
    #[error("frame is not UTF-8")]
    NotUtf8,
    #[error("frame is not JSON: {0}")]
    NotJson(String),
    #[error("bad request: {0}")]
    BadRequest(String),
}

/// Reads one line of at most `limit` bytes (newline excluded). Returns
/// `Ok(None)` at end of stream. An oversized line is consumed up to its
/// newline and reported as [`FrameError::TooLong`], so the next line is read
/// cleanly.
pub fn read_frame(
    reader: &mut impl BufRead,
    limit: usize,
) -> std::io::Result<Option<Result<String, FrameError>>> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            if line.is_empty() && !too_long {
                return Ok(None);
            }
            break;
        }
        let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i)),
            None => (buf, None),
        };
        if !too_long {
            if line.len() + chunk.len() > limit {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = found.map_or(buf.len(), |i| i + 1);
        reader.consume(used);
        if found.is_some() {
            break;
        }
    }
    if too_long {
        return Ok(Some(Err(FrameError::TooLong { limit })));
    }
    Ok(Some(
        String::from_utf8(line).map_err(|_| FrameError::NotUtf8),
    ))
}

/// Decodes a request line.
pub fn parse_request(line: &str) -> Result<Request, FrameError> {
    decode(line)
}

/// Decodes one JSON line into `T`, telling "not JSON" from "JSON that is
/// not a valid message".
pub fn decode<T: serde::de::DeserializeOwned>(line: &str) -> Result<T, FrameError> {
    serde_json::from_str(line).map_err(|e| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            FrameError::NotJson(e.to_string())
        }
        _ => FrameError::BadRequest(e.to_string()),
    })
}

/// Writes `message` as one line and flushes.
pub fn write_frame(writer: &mut impl Write, message: &impl Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line)?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::Ping,
            Request::Start {
                spec: StartSpec::Clone {
                    image: "/x".into(),
                    backend: CloneBackend::Lazy,
                    network: None,
                },
            },
            Request::Start {
                spec: StartSpec::Boot {
                    guest: GuestProgram::Request,
                    fill: None,
                    params: vec![],
                    ready_timeout_ms: 5,
                },
            },
            Request::Capture { dir: "/img".into() },
            Request::Reclaim { max_bytes: 4096 },
            Request::Receive {
                listen: "10.0.0.1:0".parse().unwrap(),
                image: Some("/img".into()),
                token_file: "/t".into(),
            },
            Request::Migrate {
                target: "10.0.0.2:4000".parse().unwrap(),
                mode: MigrateMode::Hybrid,
                token_file: "/t".into(),
                precopy_rounds: 2,
                bandwidth_bytes_per_s: None,
                target_has_image: true,
            },
            Request::Mailbox {
                request: 7,
                timeout_ms: None,
            },
            Request::Stop,
        ];
        for r in requests {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(parse_request(&line).unwrap(), r, "{line}");
        }
        assert_eq!(
            parse_request(r#"{"command":"mailbox","request":3}"#).unwrap(),
            Request::Mailbox {
                request: 3,
                timeout_ms: None
            }
        );
    }

    #[test]
    fn bad_frames_name_the_problem() {
        let e = parse_request("hello").unwrap_err();
        assert!(matches!(e, FrameError::NotJson(_)), "{e}");
        let e = parse_request(r#"{"command":"fly"}"#).unwrap_err();
        assert!(
            e.to_string().contains("unknown variant `fly`"),
            "unknown command named: {e}"
        );
        let e = parse_request(r#"{"command":"mailbox"}"#).unwrap_err();
        assert!(e.to_string().contains("request"), "{e}");
        let e = parse_request(r#"{"command":"mailbox","request":1,"extra":1}"#).unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
    }

    #[test]
    fn oversized_frame_is_skipped_and_the_next_one_read() {
        let mut input = vec![b'x'; 100];
        input.push(b'\n');
        input.extend_from_slice(b"{\"command\":\"ping\"}\n");
        // A tiny buffer makes the long line arrive in many chunks.
        let mut reader = BufReader::with_capacity(8, &input[..]);
        let first = read_frame(&mut reader, 50).unwrap().unwrap();
        assert_eq!(first, Err(FrameError::TooLong { limit: 50 }));
        let second = read_frame(&mut reader, 50).unwrap().unwrap().unwrap();
        assert_eq!(parse_request(&second).unwrap(), Request::Ping);
        assert!(read_frame(&mut reader, 50).unwrap().is_none());
    }

    #[test]
    fn last_line_without_newline_is_read() {
        let mut reader = BufReader::new(&b"{\"command\":\"stats\"}"[..]);
        let line = read_frame(&mut reader, MAX_FRAME)
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(parse_request(&line).unwrap(), Request::Stats);
    }

    #[test]
    fn response_result_or_error() {
        let ok = Response::ok(Reply::Resumed);
        let line = serde_json::to_string(&ok).unwrap();
        let back: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(back.into_result(), Ok(Reply::Resumed));
        let err = Response::error("no");
        assert_eq!(err.into_result(), Err("no".to_string()));
        let refused = Response::refused(StartRefusal::LinuxBootUnavailable);
        let line = serde_json::to_string(&refused).unwrap();
        assert_eq!(
            line,
            r#"{"ok":false,"error":"this build's VMM cannot boot Linux yet","refusal":"linux_boot_unavailable"}"#
        );
        let back: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(back.refusal, Some(StartRefusal::LinuxBootUnavailable));
    }

    #[test]
    fn a_linux_start_round_trips() {
        let start = Request::Start {
            spec: StartSpec::Linux(LinuxStart {
                kernel: "/a/sha256-k".into(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
                disks: vec![LinuxDisk {
                    name: "root".into(),
                    path: "/a/sha256-d".into(),
                    read_only: false,
                    root: true,
                }],
                network: vec![],
                readiness: LinuxReadiness::TcpProbe { port: 22 },
                ready_timeout_ms: 5000,
                netns: None,
            }),
        };
        let line = serde_json::to_string(&start).unwrap();
        assert!(line.contains(r#""source":"linux""#), "{line}");
        assert_eq!(parse_request(&line).unwrap(), start);
    }
}
