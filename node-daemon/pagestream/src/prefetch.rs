//! The bulk prefetch of a [`crate::client::RemotePages`]: each bulk
//! connection plans runs of pages nobody has claimed (the working set
//! first, then page order), keeps a window of pipelined requests in flight
//! and writes each verified answer into the node cache.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::cache::{FetchPath, NodeImageCache, PageState};
use crate::client::Inner;
use crate::connection::{Connection, RequestError, connect_any};
use crate::wire::{Command, MAX_BATCH_PAGES, Role};

impl Inner {
    /// One bulk connection's prefetch (`lane` numbers the connections of
    /// one prefetch); runs until every page is present, the prefetch is
    /// stopped, or the retry budget is spent.
    pub(crate) fn bulk_loop(&self, working_set: &[u64], lane: usize) {
        let cache = &self.cache;
        let pages = cache.pages();
        let max = MAX_BATCH_PAGES as usize;
        let mut conn: Option<Connection> = None;
        let mut cursor = 0;
        tracing::debug!(image = %self.config.image_id, lane, "bulk connection starts");
        let mut inflight: VecDeque<(u64, usize, usize)> = VecDeque::new();
        let mut ws_pos = 0;
        let mut seq_pos = 0;
        let mut backoff = self.config.backoff_initial;
        let mut failing_since: Option<Instant> = None;
        let release_all = |inflight: &mut VecDeque<(u64, usize, usize)>| {
            for (_, a, b) in inflight.drain(..) {
                cache.release(a, b);
            }
        };
        loop {
            if self.stop.load(Ordering::Acquire) {
                release_all(&mut inflight);
                return;
            }
            if conn.is_none() {
                match connect_any(&self.config, Role::Bulk, &mut cursor, Some(self.accept)) {
                    Ok(c) => {
                        self.counters.connects.fetch_add(1, Ordering::Relaxed);
                        conn = Some(c);
                    }
                    Err(e) => {
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > self.config.retry_budget {
                            tracing::error!(error = %crate::error_chain(&e), "bulk prefetch gives up: no holder reachable");
                            return;
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(self.config.backoff_max);
                        continue;
                    }
                }
            }
            let c = conn.as_mut().expect("connected above");
            let mut send_failed = false;
            while inflight.len() < self.config.bulk_window.max(1) {
                // Planned and logged under the log's lock: with several bulk
                // connections, none plans a page outside the working set
                // before every working-set page is planned and logged.
                let run = {
                    let mut log = self.bulk_log.lock().unwrap_or_else(|e| e.into_inner());
                    let run = if ws_pos < working_set.len() {
                        next_working_set_run(cache, working_set, &mut ws_pos, max)
                    } else {
                        plan_run(seq_pos, pages, max, |p| cache.claim(p)).map(|(run, next)| {
                            seq_pos = next;
                            run
                        })
                    };
                    log.extend(run);
                    run
                };
                let Some((a, b)) = run else {
                    if ws_pos < working_set.len() {
                        continue;
                    }
                    break;
                };
                match c.send(Command::ReadPages, a, b) {
                    Ok(id) => inflight.push_back((id, a, b)),
                    Err(_) => {
                        cache.release(a, b);
                        send_failed = true;
                        break;
                    }
                }
            }
            let Some(&(id, a, b)) = inflight.front() else {
                if send_failed {
                    conn = None;
                    continue;
                }
                if cache.is_complete() {
                    return;
                }
                // Pages released by failed fetches elsewhere, or still being
                // fetched by faults: sweep again after a short wait.
                let seen = cache.generation();
                if (0..pages).any(|p| cache.state(p) == PageState::Busy) {
                    cache.wait_change(seen, Duration::from_millis(50));
                }
                seq_pos = 0;
                continue;
            };
            self.counters.bulk_requests.fetch_add(1, Ordering::Relaxed);
            let result = if send_failed {
                Err(RequestError::Protocol {
                    addr: c.addr(),
                    what: "send failed".into(),
                })
            } else {
                c.receive_pages(cache, id, a, b)
            };
            match result {
                Ok(()) => {
                    inflight.pop_front();
                    cache.complete(a, b, FetchPath::Bulk);
                    failing_since = None;
                    backoff = self.config.backoff_initial;
                }
                Err(e) => {
                    self.counters.bulk_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(image = %self.config.image_id, error = %crate::error_chain(&e), "bulk transfer failed; reconnecting");
                    release_all(&mut inflight);
                    conn = None;
                    cursor = (cursor + 1) % self.config.holders.len().max(1);
                    // Restart the sweep so released pages are picked up.
                    seq_pos = 0;
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.config.retry_budget {
                        tracing::error!(image = %self.config.image_id, "bulk prefetch gives up: transfers keep failing");
                        return;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.config.backoff_max);
                }
            }
        }
    }
}

/// Plans the next bulk run from `start`: the first page that `claim` turns
/// into ours (`Missing`), extended over further claimable and zero pages up
/// to `max` pages and `limit`, ending on a claimed page. Returns the run and
/// the position to continue from.
pub fn plan_run(
    start: usize,
    limit: usize,
    max: usize,
    mut claim: impl FnMut(usize) -> PageState,
) -> Option<((usize, usize), usize)> {
    let mut p = start;
    let first = loop {
        if p >= limit {
            return None;
        }
        if claim(p) == PageState::Missing {
            break p;
        }
        p += 1;
    };
    let mut end = first + 1;
    let mut q = first + 1;
    while q < limit && q - first < max {
        match claim(q) {
            PageState::Missing => end = q + 1,
            PageState::Zero => {}
            PageState::Present | PageState::Busy => break,
        }
        q += 1;
    }
    Some(((first, end), q.max(end)))
}

/// The next run of the working set (consecutive listed pages that are
/// consecutive in memory and claimable), advancing `pos`.
fn next_working_set_run(
    cache: &NodeImageCache,
    ws: &[u64],
    pos: &mut usize,
    max: usize,
) -> Option<(usize, usize)> {
    while *pos < ws.len() {
        let p = ws[*pos] as usize;
        *pos += 1;
        if p >= cache.pages() || cache.claim(p) != PageState::Missing {
            continue;
        }
        let mut end = p + 1;
        while *pos < ws.len()
            && ws[*pos] as usize == end
            && end - p < max
            && end < cache.pages()
            && cache.claim(end) == PageState::Missing
        {
            end += 1;
            *pos += 1;
        }
        return Some((p, end));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_runs_start_on_a_claim_cross_zeros_and_stop_at_others_pages() {
        use PageState::*;
        let states = [Present, Missing, Zero, Missing, Busy, Missing, Zero, Zero];
        let claim = |p: usize| states[p];
        assert_eq!(plan_run(0, 8, 256, claim), Some(((1, 4), 4)));
        // Trailing zeros are not part of the run, but are skipped.
        assert_eq!(plan_run(5, 8, 256, claim), Some(((5, 6), 8)));
        assert_eq!(plan_run(6, 8, 256, claim), None);
        // The length limit holds.
        let all = |_| Missing;
        assert_eq!(plan_run(0, 1000, 256, all), Some(((0, 256), 256)));
    }
}
