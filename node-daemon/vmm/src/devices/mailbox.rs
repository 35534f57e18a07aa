//! The mailbox test device: how micro guests and the host talk.
//!
//! Each vCPU owns a slot in the guest's mailbox page (see
//! `arch::x86_64::layout`): 8 report arguments written by the guest, then 8
//! request arguments written by the host. The guest reports by writing its
//! arguments and doing `out PORT_REPORT, kind`; it polls for requests with
//! `in PORT_REQUEST`, which returns 0 (none: the guest loops) or the request
//! kind after the host has written the request arguments into the slot. The
//! host holds a poll at most [`POLL_WAIT`] before answering 0, so a pause
//! request is never delayed by a polling guest.
//!
//! Request argument 7 carries a sequence number the guests echo in report
//! argument 7, which is how [`Mailbox::call`] pairs a request with its answer.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Guest `out` port for reports.
pub const PORT_REPORT: u16 = 0x510;
/// Guest `in` port for requests.
pub const PORT_REQUEST: u16 = 0x514;
/// Longest the host holds a request poll before answering "none".
pub const POLL_WAIT: Duration = Duration::from_millis(1);
/// Number of u64 arguments of a report or request.
pub const ARGS: usize = 8;
/// Reports kept for waiters (older ones are dropped from the history).
pub const HISTORY_LIMIT: usize = 1 << 16;

/// Report kinds (guest to host).
pub mod report {
    /// The guest is ready; args\[0\] is the vCPU index or 0.
    pub const READY: u32 = 1;
    /// Counter guest progress.
    pub const PROGRESS: u32 = 2;
    /// Memory guest result of a touch request.
    pub const RESULT: u32 = 3;
    /// Request guest answer.
    pub const RESPONSE: u32 = 4;
}

/// Request kinds (host to guest).
pub mod request {
    /// Memory guest: touch pages.
    pub const TOUCH: u32 = 1;
    /// Request guest: answer n.
    pub const ANSWER: u32 = 2;
}

/// One report from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Position in this mailbox's report stream (0-based, survives restore).
    pub index: u64,
    pub vcpu: u8,
    pub kind: u32,
    pub args: [u64; ARGS],
}

/// One request to the guest, waiting to be polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub vcpu: u8,
    pub kind: u32,
    /// args\[7\] is the sequence number.
    pub args: [u64; ARGS],
}

/// The saved state of the mailbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxState {
    /// Requests submitted but not yet polled by the guest.
    pub pending: Vec<Request>,
    /// Next request sequence number.
    pub next_sequence: u64,
    /// Reports received, in total.
    pub reports: u64,
    /// Reports received, by kind.
    pub reports_by_kind: BTreeMap<u32, u64>,
    /// The latest report of each kind.
    pub latest: BTreeMap<u32, Report>,
    /// Requests delivered to the guest.
    pub requests_delivered: u64,
    /// Polls answered with "no request".
    pub empty_polls: u64,
}

/// Error waiting for an answer from the guest.
#[derive(Debug, thiserror::Error)]
pub enum MailboxCallError {
    #[error("no answer of kind {kind} to request {sequence} within {timeout:?}")]
    Timeout {
        kind: u32,
        sequence: u64,
        timeout: Duration,
    },
}

#[derive(Debug, Default)]
struct Inner {
    state: MailboxState,
    pending: VecDeque<Request>,
    history: VecDeque<Report>,
    interrupt_epoch: u64,
}

/// The mailbox device, shared by the vCPU threads and host callers.
#[derive(Debug, Default)]
pub struct Mailbox {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Mailbox {
    /// A mailbox in a saved state (history empty).
    pub fn from_state(state: MailboxState) -> Self {
        let pending = state.pending.iter().copied().collect();
        Self {
            inner: Mutex::new(Inner {
                state: MailboxState {
                    pending: Vec::new(),
                    ..state
                },
                pending,
                ..Inner::default()
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The device state to save.
    pub fn save(&self) -> MailboxState {
        let inner = self.lock();
        MailboxState {
            pending: inner.pending.iter().copied().collect(),
            ..inner.state.clone()
        }
    }

    /// Queues a request for vCPU `vcpu`; returns its sequence number.
    pub fn submit(&self, vcpu: u8, kind: u32, mut args: [u64; ARGS]) -> u64 {
        let mut inner = self.lock();
        let sequence = inner.state.next_sequence;
        inner.state.next_sequence += 1;
        args[ARGS - 1] = sequence;
        inner.pending.push_back(Request { vcpu, kind, args });
        drop(inner);
        self.changed.notify_all();
        sequence
    }

    /// Index the next report will get; pass it to [`Mailbox::wait_report`] to
    /// wait only for reports after this point.
    pub fn next_report_index(&self) -> u64 {
        self.lock().state.reports
    }

    /// The latest report of `kind`, if any.
    pub fn latest(&self, kind: u32) -> Option<Report> {
        self.lock().state.latest.get(&kind).copied()
    }

    /// Waits up to `timeout` for a report with index ≥ `since` matching
    /// `wanted`.
    pub fn wait_report(
        &self,
        since: u64,
        timeout: Duration,
        wanted: impl Fn(&Report) -> bool,
    ) -> Option<Report> {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        let mut scanned = since;
        loop {
            let first = inner
                .history
                .front()
                .map_or(inner.state.reports, |r| r.index);
            let start = scanned.max(first);
            let skip = (start - first) as usize;
            if let Some(found) = inner.history.iter().skip(skip).find(|r| wanted(r)) {
                return Some(*found);
            }
            scanned = inner.state.reports;
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Submits a request to vCPU 0 and waits for the report of `answer_kind`
    /// that echoes its sequence number.
    pub fn call(
        &self,
        kind: u32,
        args: [u64; ARGS],
        answer_kind: u32,
        timeout: Duration,
    ) -> Result<Report, MailboxCallError> {
        let since = self.next_report_index();
        let sequence = self.submit(0, kind, args);
        self.wait_report(since, timeout, |r| {
            r.kind == answer_kind && r.args[ARGS - 1] == sequence
        })
        .ok_or(MailboxCallError::Timeout {
            kind: answer_kind,
            sequence,
            timeout,
        })
    }

    /// Wakes vCPU threads waiting in a request poll (used to pause them).
    pub fn interrupt(&self) {
        self.lock().interrupt_epoch += 1;
        self.changed.notify_all();
    }

    /// vCPU side: records a report.
    pub(crate) fn record_report(&self, vcpu: u8, kind: u32, args: [u64; ARGS]) {
        let mut inner = self.lock();
        let report = Report {
            index: inner.state.reports,
            vcpu,
            kind,
            args,
        };
        inner.state.reports += 1;
        *inner.state.reports_by_kind.entry(kind).or_default() += 1;
        inner.state.latest.insert(kind, report);
        if inner.history.len() == HISTORY_LIMIT {
            inner.history.pop_front();
        }
        inner.history.push_back(report);
        drop(inner);
        self.changed.notify_all();
    }

    /// vCPU side: takes the first request for `vcpu`, waiting up to
    /// [`POLL_WAIT`] or until interrupted.
    pub(crate) fn poll_request(&self, vcpu: u8) -> Option<Request> {
        let deadline = Instant::now() + POLL_WAIT;
        let mut inner = self.lock();
        let epoch = inner.interrupt_epoch;
        loop {
            if let Some(position) = inner.pending.iter().position(|r| r.vcpu == vcpu) {
                let request = inner.pending.remove(position);
                inner.state.requests_delivered += 1;
                return request;
            }
            let now = Instant::now();
            if now >= deadline || inner.interrupt_epoch != epoch {
                inner.state.empty_polls += 1;
                return None;
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn poll_without_request_answers_none_quickly() {
        let mailbox = Mailbox::default();
        assert_eq!(mailbox.poll_request(0), None);
        assert_eq!(mailbox.save().empty_polls, 1);
    }

    #[test]
    fn requests_carry_sequence_numbers_and_target_vcpus() {
        let mailbox = Mailbox::default();
        let a = mailbox.submit(1, request::ANSWER, [5; ARGS]);
        let b = mailbox.submit(0, request::ANSWER, [6; ARGS]);
        assert_eq!((a, b), (0, 1));
        let first = mailbox.poll_request(0).unwrap();
        assert_eq!(first.args[0], 6);
        assert_eq!(first.args[ARGS - 1], 1);
        assert_eq!(mailbox.poll_request(1).unwrap().args[ARGS - 1], 0);
        assert_eq!(mailbox.save().requests_delivered, 2);
    }

    #[test]
    fn call_pairs_request_and_answer() {
        let mailbox = Arc::new(Mailbox::default());
        let guest = {
            let mailbox = Arc::clone(&mailbox);
            std::thread::spawn(move || {
                loop {
                    if let Some(req) = mailbox.poll_request(0) {
                        let mut args = [0; ARGS];
                        args[0] = req.args[0] * 2;
                        args[ARGS - 1] = req.args[ARGS - 1];
                        mailbox.record_report(0, report::RESPONSE, args);
                        return;
                    }
                }
            })
        };
        let answer = mailbox
            .call(
                request::ANSWER,
                [21, 0, 0, 0, 0, 0, 0, 0],
                report::RESPONSE,
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(answer.args[0], 42);
        guest.join().unwrap();
    }

    #[test]
    fn wait_report_sees_only_reports_after_since() {
        let mailbox = Mailbox::default();
        mailbox.record_report(0, report::PROGRESS, [1; ARGS]);
        let since = mailbox.next_report_index();
        assert!(
            mailbox
                .wait_report(since, Duration::from_millis(10), |r| r.kind
                    == report::PROGRESS)
                .is_none()
        );
        mailbox.record_report(0, report::PROGRESS, [2; ARGS]);
        let found = mailbox
            .wait_report(since, Duration::from_millis(10), |r| {
                r.kind == report::PROGRESS
            })
            .unwrap();
        assert_eq!((found.index, found.args[0]), (1, 2));
    }

    #[test]
    fn state_round_trips_with_pending_requests() {
        let mailbox = Mailbox::default();
        mailbox.submit(0, request::TOUCH, [3; ARGS]);
        mailbox.record_report(0, report::READY, [0; ARGS]);
        let saved = mailbox.save();
        let restored = Mailbox::from_state(saved.clone());
        assert_eq!(restored.save(), saved);
        assert_eq!(restored.next_report_index(), 1);
        assert_eq!(restored.poll_request(0).unwrap().kind, request::TOUCH);
    }
}
