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

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmstream_pagestream::ClusterToken;
use vmstream_vmm::image::{Bitmap, PageStore};
use vmstream_vmm::machine::Machine;
use vmstream_vmm::memory::PAGE_SIZE;

use crate::plan::{MigrationMode, PrecopyLimits, PushOrder, RoundDecision, after_round};
use crate::report::{MigrationReport, TargetSide};
use crate::session::{SessionError, client_handshake, expect};
use crate::source_pages::{PageHashes, PageKind, SourceMemory, TouchedPagesError, page_hash};
use crate::wire::{
    self, Command, FLAG_FAULT_ANSWER, FLAG_FAULT_CONNECTION, FLAG_LAST, FLAG_PRECOPY, FLAG_RESUME,
    FLAG_TARGET_RUNNING, Header, Hello, MAX_BATCH_PAGES, read_frame, write_frame,
};

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

/// Byte and page counters shared by the source's threads.
#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    page_bytes: AtomicU64,
    pages_sent: AtomicU64,
    pages_clean: AtomicU64,
    pages_zero: AtomicU64,
    pages_resent: AtomicU64,
    fault_requests: AtomicU64,
}

/// Sends frames and counts bytes and pages.
struct Sender<'a> {
    memory: &'a SourceMemory,
    counters: &'a Counters,
    /// Pages sent at least once (data, clean or zero).
    sent: &'a Bitmap,
}

impl Sender<'_> {
    fn frame(&self, w: &mut TcpStream, header: &Header, parts: &[&[u8]]) -> std::io::Result<()> {
        write_frame(w, header, parts)?;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.counters
            .bytes
            .fetch_add((wire::HEADER_LEN + len) as u64, Ordering::Relaxed);
        Ok(())
    }

    fn account(&self, first: usize, count: usize) {
        for p in first..first + count {
            if self.sent.set(p) {
                self.counters.pages_resent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends pages `first..first + count` classified, grouped into runs of
    /// one kind; `flags` go on every frame.
    fn send_run(
        &self,
        w: &mut TcpStream,
        first: usize,
        count: usize,
        flags: u32,
    ) -> std::io::Result<()> {
        let mut page = first;
        while page < first + count {
            let kind = self.memory.classify(page);
            let mut end = page + 1;
            while end < first + count && self.memory.classify(end) == kind {
                end += 1;
            }
            self.send_kind(w, page, end - page, kind, flags)?;
            page = end;
        }
        Ok(())
    }

    fn send_kind(
        &self,
        w: &mut TcpStream,
        first: usize,
        count: usize,
        kind: PageKind,
        flags: u32,
    ) -> std::io::Result<()> {
        let range = |c| {
            Header::new(c)
                .with_range(first as u64, count as u32)
                .with_flags(flags)
        };
        match kind {
            PageKind::Data => {
                let data = self.memory.pages_slice(first, count);
                self.frame(w, &range(Command::Pages), &[data])?;
                self.counters
                    .page_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                self.counters
                    .pages_sent
                    .fetch_add(count as u64, Ordering::Relaxed);
            }
            PageKind::Clean => {
                self.frame(w, &range(Command::Clean), &[])?;
                self.counters
                    .pages_clean
                    .fetch_add(count as u64, Ordering::Relaxed);
            }
            PageKind::Zero => {
                self.frame(w, &range(Command::Zero), &[])?;
                self.counters
                    .pages_zero
                    .fetch_add(count as u64, Ordering::Relaxed);
            }
        }
        self.account(first, count);
        Ok(())
    }
}

/// A fingerprint of a live image both sides must hold: its size and its
/// non-zero page bitmap.
pub fn image_fingerprint(image: Option<&PageStore>) -> u64 {
    let Some(image) = image else { return 0 };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&image.memory_size().to_le_bytes());
    for w in image.present().to_words() {
        crc.update(&w.to_le_bytes());
    }
    (u64::from(crc.finalize()) << 32) | (image.nonzero_pages() as u64 & 0xffff_ffff)
}

struct Link {
    control: TcpStream,
    fault: TcpStream,
    accept_flags: u32,
    resolved: Option<Vec<u64>>,
}

struct Connector<'a> {
    target: SocketAddr,
    options: &'a SourceOptions,
    session: u64,
    hello: Hello,
}

impl Connector<'_> {
    fn open(&self, flags: u32) -> Result<(TcpStream, Header, Vec<u8>), SessionError> {
        let mut stream = TcpStream::connect_timeout(&self.target, self.options.connect_timeout)
            .map_err(SessionError::io("connecting to the target"))?;
        let (header, payload) = client_handshake(
            &mut stream,
            &self.options.token,
            self.session,
            flags,
            self.hello,
            self.options.switchover_timeout,
        )?;
        Ok((stream, header, payload))
    }

    fn connect(&self, resume: bool) -> Result<Link, SessionError> {
        let extra = if resume { FLAG_RESUME } else { 0 };
        let (control, accept, payload) = self.open(extra)?;
        let resolved = if resume {
            let words = self.hello.memory_bytes as usize / PAGE_SIZE;
            let words = words.div_ceil(64);
            let pairs = wire::parse_sparse_bitmap(&payload, words).ok_or_else(|| {
                SessionError::Protocol("malformed resolved-pages bitmap in Accept".into())
            })?;
            let mut dense = vec![0u64; words];
            for (i, w) in pairs {
                dense[i] = w;
            }
            Some(dense)
        } else {
            None
        };
        let (fault, _, _) = self.open(extra | FLAG_FAULT_CONNECTION)?;
        Ok(Link {
            control,
            fault,
            accept_flags: accept.flags,
            resolved,
        })
    }
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
        options,
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
        .fetch_add((wire::HEADER_LEN + encoded.len()) as u64, Ordering::Relaxed);
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
        match postcopy_epoch(
            &mut link,
            &memory,
            &candidates,
            &mut order,
            &sent,
            &counters,
            options,
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

enum EpochEnd {
    Link(SessionError),
    Aborted(String),
}

/// One connection pair's worth of postcopy: Candidates, then the push while
/// a thread answers faults, then Done; ends when Complete arrives or the
/// link breaks.
fn postcopy_epoch(
    link: &mut Link,
    memory: &SourceMemory,
    candidates: &[u64],
    order: &mut PushOrder,
    sent: &Bitmap,
    counters: &Counters,
    options: &SourceOptions,
) -> Result<TargetSide, EpochEnd> {
    let broken = AtomicBool::new(false);
    let complete: Mutex<Option<Result<TargetSide, String>>> = Mutex::new(None);
    let hints: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    let control_w = Mutex::new(
        link.control
            .try_clone()
            .map_err(|e| EpochEnd::Link(SessionError::io("cloning the control connection")(e)))?,
    );
    let fault_w = Mutex::new(
        link.fault
            .try_clone()
            .map_err(|e| EpochEnd::Link(SessionError::io("cloning the fault connection")(e)))?,
    );
    for s in [&link.control, &link.fault] {
        let _ = s.set_read_timeout(Some(options.link_timeout));
        let _ = s.set_write_timeout(Some(options.link_timeout));
    }
    let sender = Sender {
        memory,
        counters,
        sent,
    };
    let kill = |why: &str| {
        if !broken.swap(true, Ordering::SeqCst) {
            tracing::warn!(why, "migration connection broken");
        }
        let _ = link.control.shutdown(Shutdown::Both);
        let _ = link.fault.shutdown(Shutdown::Both);
    };
    let done = AtomicBool::new(false);
    let mut fault_r = &link.fault;
    let mut control_r = &link.control;
    let result = std::thread::scope(|scope| {
        // Fault requests: answered at once on the fault connection.
        scope.spawn(|| {
            let mut buf = Vec::new();
            loop {
                let header = match read_frame(&mut fault_r, &mut buf) {
                    Ok(h) => h,
                    Err(_) if done.load(Ordering::SeqCst) => return,
                    Err(e) => {
                        kill(&format!("fault connection: {e}"));
                        return;
                    }
                };
                if header.command != Command::FaultRequest {
                    continue;
                }
                let page = header.first_page as usize;
                if page >= memory.pages() {
                    kill("fault request out of range");
                    return;
                }
                counters.fault_requests.fetch_add(1, Ordering::Relaxed);
                let mut w = fault_w.lock().unwrap_or_else(|e| e.into_inner());
                let r = sender
                    .send_run(&mut w, page, 1, FLAG_FAULT_ANSWER)
                    .and_then(|()| w.flush());
                drop(w);
                if let Err(e) = r {
                    kill(&format!("answering a fault: {e}"));
                    return;
                }
                hints.lock().unwrap_or_else(|e| e.into_inner()).push(page);
            }
        });
        // Control reads: Complete, Abort, pings.
        scope.spawn(|| {
            let mut buf = Vec::new();
            loop {
                match read_frame(&mut control_r, &mut buf) {
                    Ok(h) if h.command == Command::Complete => {
                        let side = serde_json::from_slice(&buf).unwrap_or_default();
                        *complete.lock().unwrap_or_else(|e| e.into_inner()) = Some(Ok(side));
                        return;
                    }
                    Ok(h) if h.command == Command::Abort => {
                        *complete.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(Err(String::from_utf8_lossy(&buf).into_owned()));
                        kill("target aborted");
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !done.load(Ordering::SeqCst) {
                            kill(&format!("control connection: {e}"));
                        }
                        return;
                    }
                }
            }
        });
        // Pings keep the target's liveness check quiet while idle.
        scope.spawn(|| {
            while !broken.load(Ordering::SeqCst) && !done.load(Ordering::SeqCst) {
                for _ in 0..20 {
                    if broken.load(Ordering::SeqCst) || done.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                for w in [&control_w, &fault_w] {
                    let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
                    if write_frame(&mut *w, &Header::new(Command::Ping), &[]).is_err() {
                        kill("sending a ping");
                    }
                }
            }
        });
        let push_started = Instant::now();
        let mut pushed = 0u64;
        let mut push = || -> std::io::Result<()> {
            {
                let mut w = control_w.lock().unwrap_or_else(|e| e.into_inner());
                send_bitmap(&mut w, Command::Candidates, candidates, counters)?;
            }
            loop {
                if broken.load(Ordering::SeqCst) {
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                }
                for page in hints.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
                    order.forget(page);
                    order.fault_at(page);
                }
                let Some((first, count)) =
                    order.next_run(MAX_BATCH_PAGES as usize, |p| sent.get(p))
                else {
                    break;
                };
                let mut w = control_w.lock().unwrap_or_else(|e| e.into_inner());
                sender.send_run(&mut w, first, count, 0)?;
                drop(w);
                pushed += (count * PAGE_SIZE) as u64;
                if let Some(limit) = options.bandwidth_limit {
                    let due = Duration::from_secs_f64(pushed as f64 / limit.max(1) as f64);
                    if let Some(wait) = due.checked_sub(push_started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
            let mut w = control_w.lock().unwrap_or_else(|e| e.into_inner());
            sender.frame(&mut w, &Header::new(Command::Done), &[])?;
            w.flush()
        };
        if let Err(e) = push() {
            kill(&format!("pushing pages: {e}"));
        }
        // Wait for Complete (or the link to break).
        let outcome = loop {
            if let Some(c) = complete.lock().unwrap_or_else(|e| e.into_inner()).take() {
                break Some(c);
            }
            if broken.load(Ordering::SeqCst) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        done.store(true, Ordering::SeqCst);
        let _ = link.control.shutdown(Shutdown::Both);
        let _ = link.fault.shutdown(Shutdown::Both);
        outcome
    });
    match result {
        Some(Ok(side)) => Ok(side),
        Some(Err(reason)) => Err(EpochEnd::Aborted(reason)),
        None => Err(EpochEnd::Link(SessionError::Timeout(
            "the migration link broke during postcopy",
        ))),
    }
}

/// Sends a word bitmap as sparse Candidates/Invalidate frames, the last
/// flagged.
fn send_bitmap(
    w: &mut TcpStream,
    command: Command,
    words: &[u64],
    counters: &Counters,
) -> std::io::Result<()> {
    let chunks = wire::sparse_bitmap_chunks(words);
    let n = chunks.len();
    for (i, chunk) in chunks.iter().enumerate() {
        let flags = if i + 1 == n { FLAG_LAST } else { 0 };
        write_frame(w, &Header::new(command).with_flags(flags), &[chunk])?;
        counters
            .bytes
            .fetch_add((wire::HEADER_LEN + chunk.len()) as u64, Ordering::Relaxed);
    }
    w.flush()
}

/// How precopy finds the pages written since they were sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirtTracking {
    /// KVM's dirty log of the VM's memory slots (guest writes, plus the
    /// host-written mailbox page): proportional to the pages written.
    KvmDirtyLog,
    /// Content hashes of every page sent, compared each round (fallback
    /// when dirty logging cannot be switched on): proportional to the
    /// pages sent so far.
    ContentHash,
}

impl DirtTracking {
    /// Switches on dirty logging, or falls back to hashing.
    fn start(machine: &Machine) -> Self {
        match machine.start_dirty_log() {
            Ok(()) => Self::KvmDirtyLog,
            Err(e) => {
                tracing::warn!(error = %e, "KVM dirty logging unavailable; precopy compares page hashes");
                Self::ContentHash
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::KvmDirtyLog => "kvm-dirty-log",
            Self::ContentHash => "content-hash",
        }
    }

    /// Pages written since they were sent (KVM's log, then only those whose
    /// content differs from what was sent), or touched and never sent.
    /// Pages the host installed (a lazy clone's fills) are not guest
    /// writes: they are in the touched set, and sent if never sent.
    fn changed_since_sent(
        &mut self,
        machine: &Machine,
        memory: &mut SourceMemory,
        hashes: &PageHashes,
    ) -> Vec<u64> {
        let changed = match self {
            Self::KvmDirtyLog => match machine.take_dirty_pages() {
                Ok(written) => {
                    // Written pages never sent are touched now (they go
                    // below, classified as written) even if the touched
                    // set was not re-read.
                    memory.add_touched(&written);
                    hashes.changed_among(memory, &written)
                }
                Err(e) => {
                    // Lost track: everything sent may have changed.
                    tracing::error!(error = %e, "reading the dirty log failed; falling back to page hashes");
                    *self = Self::ContentHash;
                    let _ = machine.stop_dirty_log();
                    // The touched set may be stale too: re-read it.
                    if memory.refresh(machine).is_err() {
                        memory.touch_all();
                    }
                    hashes.sent_words().to_vec()
                }
            },
            Self::ContentHash => hashes.changed(memory),
        };
        changed
            .iter()
            .zip(memory.touched_words())
            .zip(hashes.sent_words())
            .map(|((c, t), s)| c | (t & !s))
            .collect()
    }

    /// Switches dirty logging off again (nothing for hashing).
    fn stop(self, machine: &Machine) {
        if self == Self::KvmDirtyLog
            && let Err(e) = machine.stop_dirty_log()
        {
            tracing::warn!(error = %e, "cannot switch KVM dirty logging off");
        }
    }
}

/// Sends the pages of `words` while the VM may run: each page is copied
/// and hashed first, so the hash is of exactly the bytes sent.
fn send_precopy(
    w: &mut TcpStream,
    memory: &SourceMemory,
    words: &[u64],
    hashes: &mut PageHashes,
    counters: &Counters,
) -> std::io::Result<()> {
    let mut batch = vec![0u8; MAX_BATCH_PAGES as usize * PAGE_SIZE];
    let mut run: Option<(usize, usize)> = None;
    let flush = |w: &mut TcpStream,
                 run: &mut Option<(usize, usize)>,
                 batch: &[u8]|
     -> std::io::Result<()> {
        if let Some((first, count)) = run.take() {
            let h = Header::new(Command::Pages)
                .with_range(first as u64, count as u32)
                .with_flags(FLAG_PRECOPY);
            let data = &batch[..count * PAGE_SIZE];
            write_frame(w, &h, &[data])?;
            counters
                .bytes
                .fetch_add((wire::HEADER_LEN + data.len()) as u64, Ordering::Relaxed);
            counters
                .page_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            counters
                .pages_sent
                .fetch_add(count as u64, Ordering::Relaxed);
        }
        Ok(())
    };
    for (wi, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let page = wi * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if hashes.was_sent(page) {
                counters.pages_resent.fetch_add(1, Ordering::Relaxed);
            }
            match memory.classify(page) {
                kind @ (PageKind::Clean | PageKind::Zero) => {
                    flush(w, &mut run, &batch)?;
                    // The hash of what the target will hold, not of the
                    // page now (the guest may write it meanwhile).
                    hashes.record(page, page_hash(&image_page(memory, page)));
                    let c = if kind == PageKind::Clean {
                        Command::Clean
                    } else {
                        Command::Zero
                    };
                    write_frame(
                        w,
                        &Header::new(c)
                            .with_range(page as u64, 1)
                            .with_flags(FLAG_PRECOPY),
                        &[],
                    )?;
                    counters
                        .bytes
                        .fetch_add(wire::HEADER_LEN as u64, Ordering::Relaxed);
                    let counter = if kind == PageKind::Clean {
                        &counters.pages_clean
                    } else {
                        &counters.pages_zero
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                PageKind::Data => {
                    let contiguous = matches!(run, Some((f, c)) if f + c == page && c < MAX_BATCH_PAGES as usize);
                    if !contiguous {
                        flush(w, &mut run, &batch)?;
                        run = Some((page, 0));
                    }
                    let (first, count) = run.as_mut().expect("run started");
                    let slot = &mut batch[*count * PAGE_SIZE..(*count + 1) * PAGE_SIZE];
                    slot.copy_from_slice(memory.page(page));
                    hashes.record(page, page_hash(slot));
                    let _ = first;
                    *count += 1;
                }
            }
        }
    }
    flush(w, &mut run, &batch)?;
    w.flush()
}

/// The content the target installs for a clean or zero page.
fn image_page(memory: &SourceMemory, page: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; PAGE_SIZE];
    if let Some(image) = memory.image()
        && image.is_present(page)
        && image.read_page(page, &mut bytes).is_err()
    {
        // Unreadable image page: a hash no page has, so it is resent.
        bytes.fill(0xa5);
    }
    bytes
}
