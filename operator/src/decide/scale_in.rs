//! Scale-in: which of a ClonePool's clones go when it has too many.
//!
//! Order (first removed first): clones that are dead (Failed, Lost, Stopped),
//! then unplaced ones (Pending), then placed but not yet running (Scheduled,
//! Starting), then running ones; inside each group the newest first
//! (`PendingThenNewest`) or the oldest first (`PendingThenOldest`); ties by
//! name so the choice is the same on every operator replica and every retry.

use k8s_openapi::jiff::Timestamp;

use super::phase::ClonePhase;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleInPolicy {
    #[default]
    PendingThenNewest,
    PendingThenOldest,
}

/// One clone of the pool, as scale-in sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolMember {
    pub name: String,
    pub created: Timestamp,
    /// `None` when no status was written yet.
    pub phase: Option<ClonePhase>,
}

fn group(phase: Option<ClonePhase>) -> u8 {
    use ClonePhase::*;
    match phase {
        Some(Failed | Lost | Stopped | Stopping) => 0,
        None | Some(Pending) => 1,
        Some(Scheduled | Starting) => 2,
        Some(Running | Migrating) => 3,
    }
}

/// The names of the `count` clones to delete, in deletion order.
pub fn choose_victims(members: &[PoolMember], count: usize, policy: ScaleInPolicy) -> Vec<String> {
    let mut ordered: Vec<&PoolMember> = members.iter().collect();
    ordered.sort_by(|a, b| {
        let by_age = match policy {
            ScaleInPolicy::PendingThenNewest => b.created.cmp(&a.created),
            ScaleInPolicy::PendingThenOldest => a.created.cmp(&b.created),
        };
        group(a.phase)
            .cmp(&group(b.phase))
            .then(by_age)
            .then(a.name.cmp(&b.name))
    });
    ordered
        .into_iter()
        .take(count)
        .map(|m| m.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    fn member(name: &str, age_seconds: i64, phase: Option<ClonePhase>) -> PoolMember {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        PoolMember {
            name: name.into(),
            created: now - SignedDuration::from_secs(age_seconds),
            phase,
        }
    }

    fn pool() -> Vec<PoolMember> {
        vec![
            member("run-old", 300, Some(ClonePhase::Running)),
            member("run-new", 10, Some(ClonePhase::Running)),
            member("run-mid", 100, Some(ClonePhase::Running)),
            member("pending", 200, Some(ClonePhase::Pending)),
            member("starting", 20, Some(ClonePhase::Starting)),
            member("lost", 400, Some(ClonePhase::Lost)),
        ]
    }

    #[test]
    fn dead_then_pending_then_starting_then_newest_running() {
        assert_eq!(
            choose_victims(&pool(), 5, ScaleInPolicy::PendingThenNewest),
            ["lost", "pending", "starting", "run-new", "run-mid"]
        );
    }

    #[test]
    fn oldest_policy_removes_oldest_running() {
        assert_eq!(
            choose_victims(&pool(), 4, ScaleInPolicy::PendingThenOldest),
            ["lost", "pending", "starting", "run-old"]
        );
    }

    #[test]
    fn no_status_counts_as_pending() {
        let members = vec![
            member("a", 5, Some(ClonePhase::Running)),
            member("b", 50, None),
        ];
        assert_eq!(
            choose_victims(&members, 1, ScaleInPolicy::PendingThenNewest),
            ["b"]
        );
    }

    #[test]
    fn equal_age_ties_break_by_name() {
        let members = vec![
            member("c", 5, Some(ClonePhase::Running)),
            member("a", 5, Some(ClonePhase::Running)),
            member("b", 5, Some(ClonePhase::Running)),
        ];
        assert_eq!(
            choose_victims(&members, 2, ScaleInPolicy::PendingThenNewest),
            ["a", "b"]
        );
        // Same input in another order gives the same answer.
        let mut reversed = members.clone();
        reversed.reverse();
        assert_eq!(
            choose_victims(&reversed, 2, ScaleInPolicy::PendingThenNewest),
            ["a", "b"]
        );
    }

    #[test]
    fn asking_for_more_than_exist_returns_all() {
        assert_eq!(
            choose_victims(&pool(), 10, ScaleInPolicy::PendingThenNewest).len(),
            6
        );
        assert!(choose_victims(&pool(), 0, ScaleInPolicy::PendingThenNewest).is_empty());
    }
}
