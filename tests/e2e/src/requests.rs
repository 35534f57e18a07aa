//! Requests driven at request-guest clones while the cluster changes under
//! them (migrations, daemon restarts): how a request reaches a clone
//! ([`RequestPath`]), how a failed attempt is classified ([`AttemptError`]),
//! a driver thread that keeps requests flowing and retries ([`RequestDriver`]),
//! and the exactly-once check over the guest's served counter
//! ([`check_exactly_once`]).
//!
//! A *refused* attempt (the VM process or the supervisor said no before the
//! request reached the guest) was never applied, so retrying it is safe. An
//! attempt that failed any other way (timeout, connection lost) may or may
//! not have been applied: the driver retries it too, and the served counter
//! tells afterwards whether it had been applied (a served value skipped).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::served;

/// How requests reach the VM processes of a node.
#[derive(Clone, Debug)]
pub enum RequestPath {
    /// `vmstream-node ctl --state-dir <node's>` on this machine (local mode).
    Local {
        node_binary: PathBuf,
        /// State directory of each node, by node name.
        state_dirs: BTreeMap<String, PathBuf>,
    },
    /// One line of JSON straight to each node daemon's `supervisor.sock`
    /// (what `ctl` sends, without starting a process per request: ~100× the
    /// request rate, so a request is nearly always in flight).
    Supervisor {
        /// State directory of each node, by node name.
        state_dirs: BTreeMap<String, PathBuf>,
    },
    /// `kubectl exec <node daemon pod> -- vmstream-node ctl` (KUBECONFIG mode).
    KubectlExec {
        kubectl: PathBuf,
        kubeconfig: PathBuf,
        namespace: String,
        state_dir: String,
        /// The node daemon pod of each node, by node name.
        pods: BTreeMap<String, String>,
    },
}

/// Why one request attempt got no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    /// Refused before it reached the guest (VM not running here, no such
    /// VM): never applied, safe to retry.
    #[error("refused: {0}")]
    Refused(String),
    /// No answer for another reason (timeout, connection lost, no route):
    /// it may have been applied.
    #[error("unknown outcome: {0}")]
    Unknown(String),
}

/// Classifies the error text of a failed `ctl request` (pure).
///
/// Refusals: the VM process's phase check (`mailbox refused: the VM is
/// stopping`) and the supervisor's `no VM <id>`; both answer before the
/// request is submitted to the guest's mailbox. ([`RequestPath::Supervisor`]
/// also counts a connection the daemon's socket refused: nothing was sent.)
pub fn classify_request_error(message: &str) -> AttemptError {
    let text = message.trim().to_string();
    let refused = text.contains("mailbox refused:")
        || text.lines().any(|l| {
            let l = l.trim();
            let l = l.strip_prefix("error: ").unwrap_or(l);
            l.starts_with("no VM ")
        });
    if refused {
        AttemptError::Refused(text)
    } else {
        AttemptError::Unknown(text)
    }
}

impl RequestPath {
    /// Sends request `n` to VM `vm_id` on node `node`; the guest's answer.
    /// `timeout_ms` bounds the wait for the guest inside the VM process.
    pub fn request(
        &self,
        node: &str,
        vm_id: &str,
        n: u64,
        timeout_ms: u64,
    ) -> Result<u64, AttemptError> {
        if let RequestPath::Supervisor { state_dirs } = self {
            let dir = state_dirs
                .get(node)
                .ok_or_else(|| AttemptError::Unknown(format!("no node {node}")))?;
            return supervisor_request(&dir.join("supervisor.sock"), vm_id, n, timeout_ms);
        }
        let n_text = n.to_string();
        let timeout_text = timeout_ms.to_string();
        let ctl_args = ["request", vm_id, &n_text, "--timeout-ms", &timeout_text];
        let output = match self {
            RequestPath::Local {
                node_binary,
                state_dirs,
            } => {
                let dir = state_dirs
                    .get(node)
                    .ok_or_else(|| AttemptError::Unknown(format!("no node {node}")))?;
                Command::new(node_binary)
                    .args(["ctl", "--state-dir"])
                    .arg(dir)
                    .args(ctl_args)
                    .env("RUST_LOG", "warn")
                    .output()
            }
            RequestPath::Supervisor { .. } => unreachable!("answered above"),
            RequestPath::KubectlExec {
                kubectl,
                kubeconfig,
                namespace,
                state_dir,
                pods,
            } => {
                let pod = pods.get(node).ok_or_else(|| {
                    AttemptError::Unknown(format!("no node daemon pod on {node}"))
                })?;
                Command::new(kubectl)
                    .arg("--kubeconfig")
                    .arg(kubeconfig)
                    .args(["-n", namespace, "exec", pod, "-c", "node", "--"])
                    .args(["vmstream-node", "ctl", "--state-dir", state_dir])
                    .args(ctl_args)
                    .output()
            }
        }
        .map_err(|e| AttemptError::Unknown(format!("running ctl: {e}")))?;
        if !output.status.success() {
            return Err(classify_request_error(&String::from_utf8_lossy(
                &output.stderr,
            )));
        }
        let reply: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|e| {
            AttemptError::Unknown(format!(
                "unreadable ctl reply {:?}: {e}",
                String::from_utf8_lossy(&output.stdout)
            ))
        })?;
        reply["reply"]["answer"]
            .as_u64()
            .ok_or_else(|| AttemptError::Unknown(format!("no answer in {reply}")))
    }
}

/// One mailbox request through a daemon's supervisor socket.
fn supervisor_request(
    socket: &std::path::Path,
    vm_id: &str,
    n: u64,
    timeout_ms: u64,
) -> Result<u64, AttemptError> {
    use std::io::{BufRead, BufReader, Write};
    let unknown = |what: &str, e: std::io::Error| {
        AttemptError::Unknown(format!("{what} {}: {e}", socket.display()))
    };
    // Nothing was sent when the daemon does not listen (it is restarting):
    // a refusal.
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        AttemptError::Refused(format!("no daemon listening on {}: {e}", socket.display()))
    })?;
    stream
        .set_read_timeout(Some(
            Duration::from_millis(timeout_ms) + Duration::from_secs(10),
        ))
        .map_err(|e| unknown("setting a timeout on", e))?;
    let line = serde_json::json!({
        "command": "vm", "id": vm_id,
        "request": {"command": "mailbox", "request": n, "timeout_ms": timeout_ms}
    })
    .to_string();
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| unknown("writing to", e))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| unknown("reading from", e))?;
    if reply.is_empty() {
        return Err(AttemptError::Unknown(format!(
            "{} closed without a response",
            socket.display()
        )));
    }
    let reply: serde_json::Value = serde_json::from_str(&reply)
        .map_err(|e| AttemptError::Unknown(format!("unreadable reply {reply:?}: {e}")))?;
    if reply["ok"].as_bool() != Some(true) {
        return Err(classify_request_error(
            reply["error"].as_str().unwrap_or("error without text"),
        ));
    }
    reply["result"]["reply"]["answer"]
        .as_u64()
        .ok_or_else(|| AttemptError::Unknown(format!("no answer in {reply}")))
}

/// Where a driven clone runs now: updated by the test (e.g. from the
/// VMClone's `status.node`), read by the driver before every attempt.
#[derive(Clone, Debug)]
pub struct Route(Arc<Mutex<String>>);

impl Route {
    pub fn new(node: &str) -> Self {
        Route(Arc::new(Mutex::new(node.to_string())))
    }
    pub fn set(&self, node: &str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = node.to_string();
    }
    pub fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One failed attempt of a request.
#[derive(Clone, Debug)]
pub struct FailedAttempt {
    pub node: String,
    pub error: AttemptError,
    /// From the request's first attempt to the end of this one.
    pub after: Duration,
}

/// One logical request and what became of it.
#[derive(Clone, Debug)]
pub struct DrivenRequest {
    /// Index of the driven clone in [`RequestDriver::start`]'s list.
    pub target: usize,
    pub n: u64,
    pub failed: Vec<FailedAttempt>,
    /// The guest's served counter in the answer (None: never answered).
    pub served: Option<u64>,
    /// Node that answered.
    pub answered_by: Option<String>,
    pub issued: Instant,
    pub answered: Option<Instant>,
}

/// What a driver saw, per driven clone in the order given.
#[derive(Clone, Debug, Default)]
pub struct DriverReport {
    pub requests: Vec<DrivenRequest>,
    pub targets: Vec<String>,
}

/// A violation of "every request answered exactly once, applied exactly once".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Request `n` never got an answer.
    Unanswered { n: u64 },
    /// Served went from `before` to `after` across request `n`: `after -
    /// before - 1` applications happened whose answers nobody received
    /// (a lost answer; retried, the request was applied twice).
    Skipped { n: u64, before: u64, after: u64 },
    /// Served did not grow across request `n` (an answer repeated or the
    /// guest's state went back).
    NotIncreasing { n: u64, before: u64, after: u64 },
}

/// Checks, for one clone, the served counters of its answered requests in
/// issue order: each must be exactly one more than the one before
/// (`first_before` is the counter before the first driven request). Pure.
pub fn check_exactly_once(first_before: u64, requests: &[(u64, Option<u64>)]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut before = first_before;
    for &(n, served) in requests {
        match served {
            None => violations.push(Violation::Unanswered { n }),
            Some(after) if after == before + 1 => before = after,
            Some(after) if after > before + 1 => {
                violations.push(Violation::Skipped { n, before, after });
                before = after;
            }
            Some(after) => {
                violations.push(Violation::NotIncreasing { n, before, after });
                before = after;
            }
        }
    }
    violations
}

/// Checks one clone driven by several concurrent streams: the served values
/// of all answers must be exactly `before+1 ..= before+answers` (each once),
/// and the counter after the streams (`after`, from one more request) one
/// beyond. Returns the served values missing (applied, answer lost) and
/// those seen twice. Pure.
pub fn check_concurrent_exactly_once(
    before: u64,
    served: &[u64],
    after: u64,
) -> (Vec<u64>, Vec<u64>) {
    let mut sorted = served.to_vec();
    sorted.sort_unstable();
    let mut twice: Vec<u64> = sorted
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    twice.dedup();
    let seen: std::collections::BTreeSet<u64> = sorted.into_iter().collect();
    let missing = (before + 1..after).filter(|v| !seen.contains(v)).collect();
    (missing, twice)
}

/// Figures of a driver run for the report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DriverFigures {
    pub requests: usize,
    pub answered: usize,
    /// Requests that needed more than one attempt.
    pub retried: usize,
    pub refused_attempts: usize,
    pub unknown_attempts: usize,
    /// Longest time from a request's first attempt to its answer.
    pub longest_request: Duration,
    /// Longest time between two consecutive answers to the same clone.
    pub longest_gap: Duration,
}

impl DriverReport {
    /// The requests to clone `target`, in issue order.
    pub fn of(&self, target: usize) -> impl Iterator<Item = &DrivenRequest> {
        self.requests.iter().filter(move |r| r.target == target)
    }

    /// Exactly-once violations of clone `target`.
    pub fn violations(&self, target: usize, first_before: u64) -> Vec<Violation> {
        let seq: Vec<(u64, Option<u64>)> = self.of(target).map(|r| (r.n, r.served)).collect();
        check_exactly_once(first_before, &seq)
    }

    /// Counts and longest waits over all clones.
    pub fn figures(&self) -> DriverFigures {
        let mut f = DriverFigures {
            requests: self.requests.len(),
            ..DriverFigures::default()
        };
        for r in &self.requests {
            f.answered += usize::from(r.answered.is_some());
            f.retried += usize::from(!r.failed.is_empty());
            for a in &r.failed {
                match a.error {
                    AttemptError::Refused(_) => f.refused_attempts += 1,
                    AttemptError::Unknown(_) => f.unknown_attempts += 1,
                }
            }
            if let Some(t) = r.answered {
                f.longest_request = f.longest_request.max(t - r.issued);
            }
        }
        for target in 0..self.targets.len() {
            let times: Vec<Instant> = self.of(target).filter_map(|r| r.answered).collect();
            for w in times.windows(2) {
                f.longest_gap = f.longest_gap.max(w[1] - w[0]);
            }
        }
        f
    }

    /// The failed attempts, one line each (for the test output).
    pub fn failed_attempts(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for r in &self.requests {
            for a in &r.failed {
                lines.push(format!(
                    "{} n={} on {} after {:?}: {}",
                    self.targets[r.target],
                    r.n,
                    a.node,
                    a.after,
                    a.error.to_string().lines().next().unwrap_or("")
                ));
            }
        }
        lines
    }
}

/// A thread sending requests round-robin to a set of clones until stopped;
/// every request is retried until answered (or until the driver is stopped
/// and its retry budget is spent).
pub struct RequestDriver {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<DriverReport>>,
}

/// Options of [`RequestDriver::start`].
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Wait for the guest inside the VM process, per attempt.
    pub attempt_timeout_ms: u64,
    /// Pause after a failed attempt.
    pub retry_pause: Duration,
    /// How long a request may be retried after the driver was stopped.
    pub drain_for: Duration,
    /// First request value (each request sends a new value).
    pub first_n: u64,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            attempt_timeout_ms: 5_000,
            retry_pause: Duration::from_millis(20),
            drain_for: Duration::from_secs(30),
            first_n: 1_000,
        }
    }
}

impl RequestDriver {
    /// Starts driving requests at `targets` (VM id and its route).
    pub fn start(path: RequestPath, targets: Vec<(String, Route)>, options: DriverOptions) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("request-driver".into())
            .spawn(move || drive(&path, &targets, &options, &stopped))
            .expect("spawn the request driver");
        RequestDriver {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops after the request in flight and returns what was seen.
    pub fn stop(mut self) -> DriverReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("driver thread")
            .join()
            .expect("the request driver panicked")
    }
}

impl Drop for RequestDriver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn drive(
    path: &RequestPath,
    targets: &[(String, Route)],
    options: &DriverOptions,
    stop: &AtomicBool,
) -> DriverReport {
    let mut report = DriverReport {
        requests: Vec::new(),
        targets: targets.iter().map(|(id, _)| id.clone()).collect(),
    };
    let mut n = options.first_n;
    let mut stopped_at: Option<Instant> = None;
    'requests: while !stop.load(Ordering::SeqCst) {
        for (target, (vm_id, route)) in targets.iter().enumerate() {
            n += 1;
            let mut request = DrivenRequest {
                target,
                n,
                failed: Vec::new(),
                served: None,
                answered_by: None,
                issued: Instant::now(),
                answered: None,
            };
            loop {
                let node = route.get();
                match path.request(&node, vm_id, n, options.attempt_timeout_ms) {
                    Ok(answer) => {
                        request.served = Some(served(n, answer));
                        request.answered_by = Some(node);
                        request.answered = Some(Instant::now());
                        break;
                    }
                    Err(error) => {
                        request.failed.push(FailedAttempt {
                            node,
                            error,
                            after: request.issued.elapsed(),
                        });
                        if stop.load(Ordering::SeqCst) {
                            let since = *stopped_at.get_or_insert_with(Instant::now);
                            if since.elapsed() > options.drain_for {
                                report.requests.push(request);
                                break 'requests;
                            }
                        }
                        std::thread::sleep(options.retry_pause);
                    }
                }
            }
            report.requests.push(request);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_apart_from_unknown_outcomes() {
        assert!(matches!(
            classify_request_error(
                "error: VM vmc.a.c: mailbox refused: the VM is stopping: migrated to 10.0.0.3:4000\n"
            ),
            AttemptError::Refused(_)
        ));
        assert!(matches!(
            classify_request_error("error: no VM vmc.a.c\n"),
            AttemptError::Refused(_)
        ));
        assert!(matches!(
            classify_request_error(
                "error: VM vmc.a.c: no answer of kind 4 to request 9 within 5s (does the guest answer requests?)"
            ),
            AttemptError::Unknown(_)
        ));
        assert!(matches!(
            classify_request_error("error: talking to VM vmc.a.c at /x/control.sock"),
            AttemptError::Unknown(_)
        ));
    }

    #[test]
    fn exactly_once_accepts_a_step_of_one_only() {
        assert!(check_exactly_once(5, &[(1, Some(6)), (2, Some(7)), (3, Some(8))]).is_empty());
        assert_eq!(
            check_exactly_once(5, &[(1, Some(6)), (2, Some(8)), (3, Some(9))]),
            vec![Violation::Skipped {
                n: 2,
                before: 6,
                after: 8
            }]
        );
        assert_eq!(
            check_exactly_once(5, &[(1, Some(6)), (2, Some(6))]),
            vec![Violation::NotIncreasing {
                n: 2,
                before: 6,
                after: 6
            }]
        );
        assert_eq!(
            check_exactly_once(5, &[(1, None)]),
            vec![Violation::Unanswered { n: 1 }]
        );
    }

    #[test]
    fn concurrent_streams_must_cover_the_served_range_once() {
        assert_eq!(
            check_concurrent_exactly_once(10, &[13, 11, 12], 14),
            (vec![], vec![])
        );
        // 12 was applied but its answer lost; 13 answered twice.
        assert_eq!(
            check_concurrent_exactly_once(10, &[11, 13, 13, 14], 15),
            (vec![12], vec![13])
        );
    }

    #[test]
    fn figures_count_retries_and_gaps() {
        let t0 = Instant::now();
        let req = |n: u64, failed: Vec<AttemptError>, at_ms: u64| DrivenRequest {
            target: 0,
            n,
            failed: failed
                .into_iter()
                .map(|error| FailedAttempt {
                    node: "a".into(),
                    error,
                    after: Duration::ZERO,
                })
                .collect(),
            served: Some(n),
            answered_by: Some("a".into()),
            issued: t0,
            answered: Some(t0 + Duration::from_millis(at_ms)),
        };
        let report = DriverReport {
            requests: vec![
                req(1, vec![], 10),
                req(
                    2,
                    vec![
                        AttemptError::Refused("x".into()),
                        AttemptError::Unknown("y".into()),
                    ],
                    110,
                ),
                req(3, vec![], 120),
            ],
            targets: vec!["c".into()],
        };
        let f = report.figures();
        assert_eq!((f.requests, f.answered, f.retried), (3, 3, 1));
        assert_eq!((f.refused_attempts, f.unknown_attempts), (1, 1));
        assert_eq!(f.longest_gap, Duration::from_millis(100));
        assert_eq!(f.longest_request, Duration::from_millis(120));
    }
}
