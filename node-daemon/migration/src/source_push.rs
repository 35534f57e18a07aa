//! The source's page push: frames counted as they go ([`Sender`]), sparse
//! page bitmaps, and one postcopy epoch on a connection pair — Candidates,
//! the push (neighbours of faults first) while a thread answers fault
//! requests, Done, until the target's Complete or a broken link.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmstream_vmm::image::Bitmap;
use vmstream_vmm::memory::PAGE_SIZE;

use crate::plan::PushOrder;
use crate::report::TargetSide;
use crate::session::SessionError;
use crate::source_link::Link;
use crate::source_pages::{PageKind, SourceMemory};
use crate::wire::{
    self, Command, FLAG_FAULT_ANSWER, FLAG_LAST, Header, MAX_BATCH_PAGES, read_frame, write_frame,
};

/// Byte and page counters shared by the source's threads.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub bytes: AtomicU64,
    pub page_bytes: AtomicU64,
    pub pages_sent: AtomicU64,
    pub pages_clean: AtomicU64,
    pub pages_zero: AtomicU64,
    pub pages_resent: AtomicU64,
    pub fault_requests: AtomicU64,
}

/// Sends frames and counts bytes and pages.
pub(crate) struct Sender<'a> {
    pub memory: &'a SourceMemory,
    pub counters: &'a Counters,
    /// Pages sent at least once (data, clean or zero).
    pub sent: &'a Bitmap,
}

impl Sender<'_> {
    pub(crate) fn frame(
        &self,
        w: &mut TcpStream,
        header: &Header,
        parts: &[&[u8]],
    ) -> std::io::Result<()> {
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
    pub(crate) fn send_run(
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

pub(crate) enum EpochEnd {
    Link(SessionError),
    Aborted(String),
}

/// One connection pair's worth of postcopy: Candidates, then the push while
/// a thread answers faults, then Done; ends when Complete arrives or the
/// link breaks.
pub(crate) fn postcopy_epoch(
    link: &mut Link,
    sender: &Sender<'_>,
    candidates: &[u64],
    order: &mut PushOrder,
    link_timeout: Duration,
    bandwidth_limit: Option<u64>,
) -> Result<TargetSide, EpochEnd> {
    let Sender {
        memory,
        counters,
        sent,
    } = *sender;
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
        let _ = s.set_read_timeout(Some(link_timeout));
        let _ = s.set_write_timeout(Some(link_timeout));
    }
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
                if let Some(limit) = bandwidth_limit {
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
pub(crate) fn send_bitmap(
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
