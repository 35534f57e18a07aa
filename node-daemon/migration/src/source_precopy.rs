//! Precopy on the source: finding the pages written since they were sent
//! (KVM's dirty log, or content hashes as the fallback) and sending a
//! round's pages, each copied and hashed first, while the VM runs.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;

use vmstream_vmm::machine::Machine;
use vmstream_vmm::memory::PAGE_SIZE;

use crate::source_pages::{PageHashes, PageKind, SourceMemory, page_hash};
use crate::source_push::Counters;
use crate::wire::{self, Command, FLAG_PRECOPY, Header, MAX_BATCH_PAGES, write_frame};

/// How precopy finds the pages written since they were sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirtTracking {
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
    pub(crate) fn start(machine: &Machine) -> Self {
        match machine.start_dirty_log() {
            Ok(()) => Self::KvmDirtyLog,
            Err(e) => {
                tracing::warn!(error = %e, "KVM dirty logging unavailable; precopy compares page hashes");
                Self::ContentHash
            }
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::KvmDirtyLog => "kvm-dirty-log",
            Self::ContentHash => "content-hash",
        }
    }

    /// Pages written since they were sent (KVM's log, then only those whose
    /// content differs from what was sent), or touched and never sent.
    /// Pages the host installed (a lazy clone's fills) are not guest
    /// writes: they are in the touched set, and sent if never sent.
    pub(crate) fn changed_since_sent(
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
    pub(crate) fn stop(self, machine: &Machine) {
        if self == Self::KvmDirtyLog
            && let Err(e) = machine.stop_dirty_log()
        {
            tracing::warn!(error = %e, "cannot switch KVM dirty logging off");
        }
    }
}

/// Sends the pages of `words` while the VM may run: each page is copied
/// and hashed first, so the hash is of exactly the bytes sent.
pub(crate) fn send_precopy(
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
