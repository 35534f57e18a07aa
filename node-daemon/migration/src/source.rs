//! The source side of a migration: optional precopy rounds, the switch-over
//! (pause, state, Ready, Go, Resumed), then postcopy — fault requests
//! answered on their own connection while the rest is pushed on the bulk
//! connection, neighbours of faulted pages first — until the target reports
//! every page arrived. A broken link after Go is re-established (the VM
//! stays paused here, the guest waits there) and the push continues with
//! what the target still lacks.
//!
//! ```text
//! Connect ─► Handshake ─► [Precopy rounds] ─► Pause ─► State ─► Ready? ──no──► Resume here, Err
//!                                                                   │yes
//!                                                                   ▼
//!            Complete ◄─ Push+Faults ◄─ Resumed ◄─ Go (commit: never resumed here again)
//!               │             ▲ link lost: reconnect, Accept{resolved} ─┘
//!               ▼
//!            Release (caller stops the paused VM)
//! ```

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vmstream_pagestream::ClusterToken;
use vmstream_vmm::image::Bitmap;
use vmstream_vmm::machine::Machine;

use crate::plan::{MigrationMode, PrecopyLimits, PushOrder, RoundDecision, after_round};
use crate::report::MigrationReport;
use crate::session::{SessionError, expect, image_fingerprint};
use crate::source_link::{Connector, Link};
use crate::source_pages::{PageHashes, SourceMemory, TouchedPagesError};
use crate::source_precopy::{DirtTracking, send_precopy};
use crate::source_push::{Counters, EpochEnd, Sender, postcopy_epoch, send_bitmap};
use crate::wire::{Command, FLAG_TARGET_RUNNING, HEADER_LEN, Header, Hello, write_frame};

/// How a migration is run on the source.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub mode: MigrationMode,
    pub limits: PrecopyLimits,
    pub token: ClusterToken,
    /// Each connection attempt.
    pub connect_timeout: Duration,
    /// Waiting for Accept, Ready and Resumed.
    pub switchover_timeout: Duration,
    /// Silence after which a connection counts as broken.
    pub link_timeout: Duration,
    /// How long a broken link may take to come back after the switch-over.
    pub recovery_timeout: Duration,
    /// Most bytes per second the background push may use (fault answers
    /// are never held back).
    pub bandwidth_limit: Option<u64>,
    /// Whether the target holds the VM's live image; when false every page
    /// crosses (zero pages as Zero) and the session names no image.
    pub target_has_image: bool,
}

impl SourceOptions {
    /// Defaults for `mode` with `token`.
    pub fn new(mode: MigrationMode, token: ClusterToken) -> Self {
        Self {
            mode,
            limits: PrecopyLimits::default(),
            token,
            connect_timeout: Duration::from_secs(2),
            switchover_timeout: Duration::from_secs(10),
            link_timeout: Duration::from_millis(1500),
            recovery_timeout: Duration::from_secs(60),
            bandwidth_limit: None,
            target_has_image: true,
        }
    }
}

/// Why a migration failed, and where the VM is.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration failed before the switch-over; the VM runs on the source again")]
    BeforeSwitchover(#[source] SessionError),
    #[error("cannot find the source's changed pages")]
    TouchedPages(#[from] TouchedPagesError),
    #[error("cannot pause the source VM")]
    Pause(#[source] vmstream_vmm::machine::PauseError),
    #[error("cannot save the source VM's state; the VM runs on the source again")]
    SaveState(#[source] vmstream_vmm::machine::StateSaveError),
    #[error(
        "the link to the target did not come back within {waited:?} after the switch-over; the VM's state stays paused on the source, which must not resume it"
    )]
    LinkLost {
        waited: Duration,
        #[source]
        last: SessionError,
    },
    #[error("the target aborted after the switch-over: {0}")]
    TargetAborted(String),
}

/// Migrates `machine` (running) to the target listening at `target`.
///
/// On `Ok`, the VM runs on the target and every page has arrived there; the
/// source VM is left paused and the caller must stop it (never resume it).
/// On [`MigrateError::BeforeSwitchover`] and [`MigrateError::SaveState`]
/// the VM runs on the source again. On [`MigrateError::LinkLost`] the VM
/// is paused here and may be running there: it must not be resumed here.
pub fn migrate(
    machine: &Machine,
    target: SocketAddr,
    options: &SourceOptions,
) -> Result<MigrationReport, MigrateError> {
    let started = Instant::now();
    let mut report = MigrationReport {
        mode: Some(options.mode),
        ..MigrationReport::default()
    };
    let mut memory = SourceMemory::of(machine)?;
    if !options.target_has_image {
        memory = memory.without_image();
    }
    let connector = Connector {
        target,
        token: &options.token,
        connect_timeout: options.connect_timeout,
        handshake_timeout: options.switchover_timeout,
        session: rand::random::<u64>() | 1,
        hello: Hello {
            memory_bytes: machine.guest_ram().len() as u64,
            vcpus: u32::from(machine.config().vcpus),
            mode: options.mode.to_wire(),
            image_fingerprint: image_fingerprint(memory.image().map(|i| i.as_ref())),
            nonce: [0; 32],
        },
    };
    let counters = Counters::default();
    let mut link = connector
        .connect(false)
        .map_err(MigrateError::BeforeSwitchover)?;
    let _ = link
        .control
        .set_write_timeout(Some(options.switchover_timeout));

    // Precopy rounds while the VM runs.
    let mut hashes = PageHashes::new(memory.pages());
    let mut decision = RoundDecision::SwitchToPostcopy;
    let mut dirt = DirtTracking::ContentHash;
    // Changes found after the last round, not sent yet (the dirty log is
    // read destructively: they must go in the final pass).
    let mut unsent_changes: Vec<u64> = Vec::new();
    if options.mode != MigrationMode::Postcopy {
        dirt = DirtTracking::start(machine);
        report.dirty_tracking = dirt.name().to_string();
        let mut to_send = memory.touched_words().to_vec();
        loop {
            report.precopy_rounds += 1;
            let round_start = Instant::now();
            let bytes_before = counters.page_bytes.load(Ordering::Relaxed);
            send_precopy(&mut link.control, &memory, &to_send, &mut hashes, &counters).map_err(
                |e| {
                    dirt.stop(machine);
                    fail_before(machine, false, SessionError::io("sending precopy pages")(e))
                },
            )?;
            let bytes = counters.page_bytes.load(Ordering::Relaxed) - bytes_before;
            let bandwidth = bytes as f64 / round_start.elapsed().as_secs_f64().max(1e-6);
            memory
                .refresh(machine)
                .inspect_err(|_| dirt.stop(machine))?;
            to_send = dirt.changed_since_sent(machine, &mut memory, &hashes);
            let dirty = to_send.iter().map(|w| w.count_ones() as usize).sum();
            decision = after_round(
                options.mode,
                &options.limits,
                report.precopy_rounds,
                dirty,
                bandwidth,
            );
            if decision != RoundDecision::AnotherRound {
                unsent_changes = to_send;
                break;
            }
        }
        report.precopy_pages = counters.pages_sent.load(Ordering::Relaxed);
    }

    // Switch-over.
    let paused_at = Instant::now();
    machine.pause().map_err(|e| {
        dirt.stop(machine);
        MigrateError::Pause(e)
    })?;
    report.pause_ms = ms(paused_at.elapsed());
    let step = Instant::now();
    let state = match machine.save_state() {
        Ok(s) => s,
        Err(e) => {
            dirt.stop(machine);
            machine.resume();
            return Err(MigrateError::SaveState(e));
        }
    };
    let encoded = state.encode();
    report.save_state_ms = ms(step.elapsed());
    report.state_bytes = encoded.len() as u64;
    // Postcopy finds its candidates after the switch-over (a pagemap scan
    // grows with memory size; it stays off the downtime path). With the
    // dirty log, pages written since the last round are in the log; pages
    // a lazy clone read in since then hold image content: no rescan.
    if options.mode != MigrationMode::Postcopy && dirt == DirtTracking::ContentHash {
        memory.refresh(machine).inspect_err(|_| {
            dirt.stop(machine);
            machine.resume();
        })?;
    }
    // Paused: what the guest wrote since the last round is final.
    let last = (options.mode != MigrationMode::Postcopy).then(|| {
        let mut last = dirt.changed_since_sent(machine, &mut memory, &hashes);
        for (l, u) in last.iter_mut().zip(&unsent_changes) {
            *l |= u;
        }
        last
    });
    dirt.stop(machine);
    let candidates: Vec<u64> = match (options.mode, decision, last) {
        (MigrationMode::Postcopy, _, _) | (_, _, None) => Vec::new(),
        (_, RoundDecision::StopAndCopy, Some(last)) => {
            let before = counters.pages_sent.load(Ordering::Relaxed);
            send_precopy(&mut link.control, &memory, &last, &mut hashes, &counters).map_err(
                |e| fail_before(machine, true, SessionError::io("sending the last pages")(e)),
            )?;
            report.stop_and_copy_pages = counters.pages_sent.load(Ordering::Relaxed) - before;
            vec![0; memory.pages().div_ceil(64)]
        }
        (_, _, Some(last)) => {
            let stale: Vec<u64> = last
                .iter()
                .zip(hashes.sent_words())
                .map(|(c, s)| c & s)
                .collect();
            send_bitmap(&mut link.control, Command::Invalidate, &stale, &counters).map_err(
                |e| fail_before(machine, true, SessionError::io("sending Invalidate")(e)),
            )?;
            last
        }
    };
    let state_header = Header::new(Command::State);
    write_frame(&mut link.control, &state_header, &[&encoded])
        .map_err(|e| fail_before(machine, true, SessionError::io("sending the VM state")(e)))?;
    counters
        .bytes
        .fetch_add((HEADER_LEN + encoded.len()) as u64, Ordering::Relaxed);
    let mut buf = Vec::new();
    let _ = link
        .control
        .set_read_timeout(Some(options.switchover_timeout));
    expect(&mut link.control, &mut buf, Command::Ready, "Ready")
        .map_err(|e| fail_before(machine, true, e))?;

    // Commit point: from here on the VM is never resumed on this node.
    let go = write_frame(&mut link.control, &Header::new(Command::Go), &[])
        .map_err(SessionError::io("sending Go"))
        .and_then(|()| expect(&mut link.control, &mut buf, Command::Resumed, "Resumed"));
    let mut last_error = None;
    match go {
        Ok(_) => report.downtime_ms = ms(paused_at.elapsed()),
        Err(e) => last_error = Some(e),
    }

    // Postcopy.
    let candidates = if options.mode == MigrationMode::Postcopy {
        if let Err(e) = memory.refresh(machine) {
            // Past the commit point: send everything rather than fail.
            tracing::error!(error = %e, "cannot find touched pages; sending all of them");
            memory.touch_all();
        }
        memory.touched_words().to_vec()
    } else {
        candidates
    };
    report.touched_pages = memory.touched_count() as u64;
    let sent = Bitmap::new(memory.pages());
    let mut order = PushOrder::new(candidates.clone(), memory.pages());
    let mut first_epoch = last_error.is_none();
    let target_side = loop {
        if let Some(error) = last_error.take() {
            let (new_link, resumed_now) =
                reconnect(&connector, options, error, &mut report, paused_at)?;
            link = new_link;
            if resumed_now {
                first_epoch = true;
            }
            if let Some(resolved) = &link.resolved {
                let pending: Vec<u64> = candidates
                    .iter()
                    .zip(resolved)
                    .map(|(c, r)| c & !r)
                    .collect();
                order = PushOrder::new(pending, memory.pages());
                // What went out but did not arrive must go again.
                for page in 0..memory.pages() {
                    if resolved[page / 64] & (1 << (page % 64)) != 0 {
                        sent.set(page);
                    } else {
                        sent.clear(page);
                    }
                }
            }
        }
        let _ = first_epoch;
        let sender = Sender {
            memory: &memory,
            counters: &counters,
            sent: &sent,
        };
        match postcopy_epoch(
            &mut link,
            &sender,
            &candidates,
            &mut order,
            options.link_timeout,
            options.bandwidth_limit,
        ) {
            Ok(side) => break side,
            Err(EpochEnd::Aborted(reason)) => return Err(MigrateError::TargetAborted(reason)),
            Err(EpochEnd::Link(e)) => last_error = Some(e),
        }
    };
    report.total_ms = ms(started.elapsed());
    report.target = target_side;
    report.bytes_sent = counters.bytes.load(Ordering::Relaxed);
    report.page_bytes_sent = counters.page_bytes.load(Ordering::Relaxed);
    report.pages_sent = counters.pages_sent.load(Ordering::Relaxed);
    report.pages_clean = counters.pages_clean.load(Ordering::Relaxed);
    report.pages_zero = counters.pages_zero.load(Ordering::Relaxed);
    report.pages_resent = counters.pages_resent.load(Ordering::Relaxed);
    report.fault_requests = counters.fault_requests.load(Ordering::Relaxed);
    Ok(report)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A failure before Go: the VM runs here again.
fn fail_before(machine: &Machine, paused: bool, e: SessionError) -> MigrateError {
    if paused {
        machine.resume();
    }
    MigrateError::BeforeSwitchover(e)
}

/// Re-establishes both connections after Go; returns whether the target had
/// not started the VM yet (then Go is sent again and Resumed awaited).
fn reconnect(
    connector: &Connector<'_>,
    options: &SourceOptions,
    mut last: SessionError,
    report: &mut MigrationReport,
    paused_at: Instant,
) -> Result<(Link, bool), MigrateError> {
    let lost_at = Instant::now();
    tracing::warn!(error = %last, "migration link lost after the switch-over; reconnecting");
    loop {
        if lost_at.elapsed() > options.recovery_timeout {
            return Err(MigrateError::LinkLost {
                waited: lost_at.elapsed(),
                last,
            });
        }
        match connector.connect(true) {
            Ok(mut link) => {
                report.reconnects += 1;
                if link.accept_flags & FLAG_TARGET_RUNNING != 0 {
                    return Ok((link, false));
                }
                let mut buf = Vec::new();
                let go = write_frame(&mut link.control, &Header::new(Command::Go), &[])
                    .map_err(SessionError::io("sending Go"))
                    .and_then(|()| {
                        expect(&mut link.control, &mut buf, Command::Resumed, "Resumed")
                    });
                match go {
                    Ok(_) => {
                        report.downtime_ms = ms(paused_at.elapsed());
                        return Ok((link, true));
                    }
                    Err(e) => last = e,
                }
            }
            Err(SessionError::Aborted(reason)) => {
                return Err(MigrateError::TargetAborted(reason));
            }
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
