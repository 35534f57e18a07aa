//! The node's memory budget (`--memory-budget-mib`): every round the daemon
//! sums what its VM processes cost the host (their PSS, so pages shared
//! between clones — the image's page cache pages, KSM-merged pages — count
//! once in total), and when the sum is over the budget asks clones to give
//! back clean pages that still equal their image (`reclaim` request): they
//! are streamed back from the image on the next touch, so nothing is lost.
//! Which clone gives back how much is the pure
//! [`vmstream_vmm::memory::plan_reclaim`]; how much a clone may still hold
//! is [`vmstream_vmm::memory::image_clean_estimate`] over the last reclaim
//! answer of that clone (kept here, per VM process).
//!
//! Memory the node holds outside the VM processes (image page cache pages
//! no clone maps) is not charged: the kernel reclaims clean page cache on
//! its own.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmstream_vmm::memory::{CleanScan, CloneUsage, image_clean_estimate, plan_reclaim};

use crate::supervisor::VmSupervisor;
use crate::vm_protocol::{Reply, Request};
use crate::vm_record::VmKind;

/// What one budget round saw and did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetRound {
    /// Sum of the VM processes' PSS.
    pub used_bytes: u64,
    pub budget_bytes: u64,
    /// `(VM id, bytes asked, bytes given back)`.
    pub reclaimed: Vec<(String, u64, u64)>,
    /// Bytes over budget that clean pages could not cover.
    pub shortfall_bytes: u64,
    /// VMs that could not be sampled or did not reclaim, with why.
    pub errors: Vec<(String, String)>,
}

impl BudgetRound {
    /// Bytes given back this round.
    pub fn dropped_bytes(&self) -> u64 {
        self.reclaimed.iter().map(|(_, _, d)| d).sum()
    }
}

/// The budget and what the last reclaim of each VM process left.
#[derive(Debug)]
pub struct MemoryBudget {
    budget_bytes: u64,
    /// Keyed by VM id; the pid tells a VM process from a later one.
    scans: Mutex<BTreeMap<String, (u32, CleanScan)>>,
}

impl MemoryBudget {
    pub fn new(budget_bytes: u64) -> Self {
        Self {
            budget_bytes,
            scans: Mutex::new(BTreeMap::new()),
        }
    }

    /// One round: sample every VM, plan, ask the chosen clones to reclaim.
    pub fn enforce(&self, supervisor: &VmSupervisor) -> BudgetRound {
        let mut round = BudgetRound {
            budget_bytes: self.budget_bytes,
            ..BudgetRound::default()
        };
        let mut sampled = Vec::new();
        for listing in supervisor.list() {
            let id = listing.record.id.clone();
            match supervisor.call(&id, &Request::Stats) {
                Ok(Reply::Stats(stats)) => sampled.push((listing.record, stats)),
                Ok(other) => round.errors.push((id, format!("stats answered {other:?}"))),
                Err(e) => round.errors.push((id, crate::error_chain::chain(&e))),
            }
        }
        let mut scans = self.scans.lock().unwrap_or_else(|e| e.into_inner());
        scans.retain(|id, (pid, _)| sampled.iter().any(|(r, _)| r.id == *id && r.pid == *pid));
        let usage: Vec<CloneUsage> = sampled
            .iter()
            .map(|(record, stats)| CloneUsage {
                charged: stats.memory.pss,
                image_clean: if record.kind == VmKind::Clone {
                    image_clean_estimate(
                        scans.get(&record.id).map(|(_, scan)| *scan),
                        stats.memory.guest_private,
                    )
                } else {
                    0
                },
            })
            .collect();
        round.used_bytes = usage.iter().map(|u| u.charged).sum();
        let plan = plan_reclaim(self.budget_bytes, 0, &usage);
        round.shortfall_bytes = plan.shortfall;
        for request in plan.requests {
            let (record, _) = &sampled[request.clone];
            let id = record.id.clone();
            match supervisor.call(
                &id,
                &Request::Reclaim {
                    max_bytes: request.bytes,
                },
            ) {
                Ok(Reply::Reclaimed(summary)) => {
                    scans.insert(
                        id.clone(),
                        (
                            record.pid,
                            CleanScan {
                                owned_after: summary.guest_private_after,
                                clean_left: summary.clean_left_bytes,
                            },
                        ),
                    );
                    round
                        .reclaimed
                        .push((id, request.bytes, summary.dropped_bytes));
                }
                Ok(other) => round
                    .errors
                    .push((id, format!("reclaim answered {other:?}"))),
                Err(e) => round.errors.push((id, crate::error_chain::chain(&e))),
            }
        }
        round
    }
}

/// Enforces `budget` every `interval` until the task is dropped.
pub async fn run(budget: Arc<MemoryBudget>, supervisor: Arc<VmSupervisor>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let (budget, supervisor) = (Arc::clone(&budget), Arc::clone(&supervisor));
        match tokio::task::spawn_blocking(move || budget.enforce(&supervisor)).await {
            Ok(round) if !round.reclaimed.is_empty() || round.shortfall_bytes > 0 => {
                tracing::info!(
                    used = round.used_bytes,
                    budget = round.budget_bytes,
                    dropped = round.dropped_bytes(),
                    shortfall = round.shortfall_bytes,
                    clones = round.reclaimed.len(),
                    "memory budget enforced"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "memory budget round failed"),
        }
    }
}
