//! Phase transitions the operator makes for VMClone, LiveImage and
//! VMMigration, from observed facts (node alive, daemon-reported phase,
//! deletion requested, elapsed time). The node daemons own the other
//! transitions (Starting, Running, Booting, Capturing, Ready, ...); the
//! operator only places, declares things lost or failed, and releases
//! finalizers.

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::placement::NoNodeFits;

/// VMClone phases (mirrors the API enum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClonePhase {
    Pending,
    Scheduled,
    Starting,
    Running,
    Migrating,
    Stopping,
    Stopped,
    Lost,
    Failed,
}

/// LiveImage phases (mirrors the API enum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImagePhase {
    Pending,
    Scheduled,
    Booting,
    Capturing,
    Ready,
    Failed,
    Deleting,
}

/// VMMigration phases (mirrors the API enum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationPhase {
    Pending,
    Scheduled,
    Running,
    Succeeded,
    Failed,
}

/// What the operator sees of one VMClone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneFacts {
    pub phase: Option<ClonePhase>,
    /// The node it is placed on (label or status), if any.
    pub node: Option<String>,
    /// Whether that node's heartbeat is fresh (ignored without a node).
    pub node_alive: bool,
    pub deletion_requested: bool,
}

/// The operator's next step for a VMClone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloneStep {
    /// Not placed yet: run placement.
    Place,
    /// Its node's heartbeat is stale: report it Lost.
    MarkLost,
    /// Deletion requested and no VM can still be running: drop the finalizer.
    ReleaseFinalizer,
    /// Deletion requested; the node daemon has yet to stop the VM.
    WaitForStop,
    /// Nothing for the operator to do.
    Nothing,
}

/// The VMClone state machine, operator side.
pub fn clone_step(facts: &CloneFacts) -> CloneStep {
    use ClonePhase::*;
    if facts.deletion_requested {
        return match (&facts.node, facts.phase) {
            (None, _) => CloneStep::ReleaseFinalizer,
            (Some(_), _) if !facts.node_alive => CloneStep::ReleaseFinalizer,
            (Some(_), Some(Stopped | Failed)) => CloneStep::ReleaseFinalizer,
            (Some(_), _) => CloneStep::WaitForStop,
        };
    }
    match (&facts.node, facts.phase) {
        (None, _) => CloneStep::Place,
        (Some(_), Some(Lost | Stopped | Failed)) => CloneStep::Nothing,
        (Some(_), _) if !facts.node_alive => CloneStep::MarkLost,
        (Some(_), _) => CloneStep::Nothing,
    }
}

/// What the operator sees of one LiveImage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFacts {
    pub phase: Option<ImagePhase>,
    pub node: Option<String>,
    pub node_alive: bool,
    pub deletion_requested: bool,
    /// VMClones whose `spec.liveImage` names this image.
    pub clones_using: usize,
    /// True for `source.boot`, false for `source.fromClone`.
    pub boot_source: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageStep {
    /// Boot image without a node: run placement.
    PlaceBoot,
    /// Capture image without a node: go to the source clone's node.
    FollowSourceClone,
    /// Capture in progress on a node whose heartbeat is stale.
    FailNodeLost,
    ReleaseFinalizer,
    /// Deletion blocked: clones still stream from it.
    BlockedByClones(usize),
    Nothing,
}

pub fn image_step(facts: &ImageFacts) -> ImageStep {
    use ImagePhase::*;
    if facts.deletion_requested {
        return if facts.clones_using > 0 {
            ImageStep::BlockedByClones(facts.clones_using)
        } else {
            ImageStep::ReleaseFinalizer
        };
    }
    match (&facts.node, facts.phase) {
        // Built (or given up): nothing left for the operator to place.
        (_, Some(Failed | Ready)) => ImageStep::Nothing,
        (None, _) if facts.boot_source => ImageStep::PlaceBoot,
        (None, _) => ImageStep::FollowSourceClone,
        (Some(_), Some(Scheduled | Booting | Capturing)) if !facts.node_alive => {
            ImageStep::FailNodeLost
        }
        (Some(_), _) => ImageStep::Nothing,
    }
}

/// What the operator sees of one VMMigration and its clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationFacts {
    pub phase: Option<MigrationPhase>,
    pub created: Timestamp,
    pub now: Timestamp,
    pub timeout_seconds: i64,
    /// `None` when the VMClone does not exist.
    pub clone_phase: Option<Option<ClonePhase>>,
    pub clone_deleting: bool,
    pub clone_node: Option<String>,
    pub spec_source: Option<String>,
    pub spec_target: Option<String>,
    /// From status, once scheduled.
    pub source: Option<String>,
    pub target: Option<String>,
    pub source_alive: bool,
    /// For a chosen or given target.
    pub target_alive: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationStep {
    Schedule {
        source: String,
        target: String,
    },
    /// Still Pending, with the reason.
    Wait(String),
    Fail(String),
    Nothing,
}

/// The VMMigration state machine, operator side. `pick_target(source)` runs
/// placement for a migration without `targetNode`.
pub fn migration_step(
    facts: &MigrationFacts,
    pick_target: impl FnOnce(&str) -> Result<String, NoNodeFits>,
) -> MigrationStep {
    use MigrationPhase::*;
    if matches!(facts.phase, Some(Succeeded | Failed)) {
        return MigrationStep::Nothing;
    }
    let deadline = facts
        .created
        .checked_add(SignedDuration::from_secs(facts.timeout_seconds))
        .unwrap_or(facts.created);
    if facts.now >= deadline {
        return MigrationStep::Fail(format!(
            "timed out after {}s in phase {:?}",
            facts.timeout_seconds,
            facts.phase.unwrap_or(Pending)
        ));
    }
    if matches!(facts.phase, Some(Scheduled | Running)) {
        if !facts.source_alive {
            return MigrationStep::Fail(format!(
                "source node {} heartbeat stale",
                facts.source.as_deref().unwrap_or("?")
            ));
        }
        if !facts.target_alive {
            return MigrationStep::Fail(format!(
                "target node {} heartbeat stale",
                facts.target.as_deref().unwrap_or("?")
            ));
        }
        return MigrationStep::Nothing;
    }

    // Pending: validate and schedule. A VMClone that does not exist yet may
    // still be created (a migration applied together with its clone): wait for
    // it until the migration's timeout instead of failing on apply order.
    let Some(clone_phase) = facts.clone_phase else {
        return MigrationStep::Wait("VMClone not found (yet)".into());
    };
    if facts.clone_deleting {
        return MigrationStep::Fail("VMClone is being deleted".into());
    }
    match clone_phase {
        Some(ClonePhase::Running) => {}
        None | Some(ClonePhase::Pending | ClonePhase::Scheduled | ClonePhase::Starting) => {
            return MigrationStep::Wait("waiting for the VMClone to be Running".into());
        }
        Some(other) => {
            return MigrationStep::Fail(format!("VMClone is {other:?}, not Running"));
        }
    }
    let Some(source) = facts.clone_node.clone() else {
        return MigrationStep::Wait("VMClone has no node yet".into());
    };
    if let Some(spec_source) = &facts.spec_source
        && *spec_source != source
    {
        return MigrationStep::Fail(format!(
            "VMClone runs on {source}, not on sourceNode {spec_source}"
        ));
    }
    if !facts.source_alive {
        return MigrationStep::Fail(format!("source node {source} heartbeat stale"));
    }
    match &facts.spec_target {
        Some(target) if *target == source => {
            MigrationStep::Fail(format!("targetNode {target} is the VMClone's current node"))
        }
        Some(target) if !facts.target_alive => {
            MigrationStep::Wait(format!("target node {target} heartbeat stale"))
        }
        Some(target) => MigrationStep::Schedule {
            source,
            target: target.clone(),
        },
        None => match pick_target(&source) {
            Ok(target) => MigrationStep::Schedule { source, target },
            Err(why) => MigrationStep::Wait(format!("no target node: {why}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clone(
        phase: Option<ClonePhase>,
        node: Option<&str>,
        alive: bool,
        deleting: bool,
    ) -> CloneFacts {
        CloneFacts {
            phase,
            node: node.map(Into::into),
            node_alive: alive,
            deletion_requested: deleting,
        }
    }

    #[test]
    fn unplaced_clone_is_placed() {
        assert_eq!(
            clone_step(&clone(None, None, false, false)),
            CloneStep::Place
        );
        assert_eq!(
            clone_step(&clone(Some(ClonePhase::Pending), None, false, false)),
            CloneStep::Place
        );
    }

    #[test]
    fn clone_on_dead_node_is_lost() {
        for phase in [
            ClonePhase::Scheduled,
            ClonePhase::Starting,
            ClonePhase::Running,
            ClonePhase::Migrating,
        ] {
            assert_eq!(
                clone_step(&clone(Some(phase), Some("n"), false, false)),
                CloneStep::MarkLost,
                "{phase:?}"
            );
        }
        // Already Lost / terminal: nothing more.
        assert_eq!(
            clone_step(&clone(Some(ClonePhase::Lost), Some("n"), false, false)),
            CloneStep::Nothing
        );
        assert_eq!(
            clone_step(&clone(Some(ClonePhase::Running), Some("n"), true, false)),
            CloneStep::Nothing
        );
    }

    #[test]
    fn deletion_waits_for_the_daemon_to_stop_the_vm() {
        assert_eq!(
            clone_step(&clone(Some(ClonePhase::Running), Some("n"), true, true)),
            CloneStep::WaitForStop
        );
        assert_eq!(
            clone_step(&clone(Some(ClonePhase::Stopping), Some("n"), true, true)),
            CloneStep::WaitForStop
        );
        assert_eq!(
            clone_step(&clone(Some(ClonePhase::Stopped), Some("n"), true, true)),
            CloneStep::ReleaseFinalizer
        );
        assert_eq!(
            clone_step(&clone(Some(ClonePhase::Failed), Some("n"), true, true)),
            CloneStep::ReleaseFinalizer
        );
    }

    #[test]
    fn deletion_of_unplaced_or_dead_node_clone_releases_at_once() {
        assert_eq!(
            clone_step(&clone(None, None, false, true)),
            CloneStep::ReleaseFinalizer
        );
        assert_eq!(
            clone_step(&clone(Some(ClonePhase::Running), Some("n"), false, true)),
            CloneStep::ReleaseFinalizer
        );
    }

    fn image(phase: Option<ImagePhase>, node: Option<&str>, alive: bool) -> ImageFacts {
        ImageFacts {
            phase,
            node: node.map(Into::into),
            node_alive: alive,
            deletion_requested: false,
            clones_using: 0,
            boot_source: true,
        }
    }

    #[test]
    fn image_deletion_blocked_while_clones_use_it() {
        let mut f = image(Some(ImagePhase::Ready), Some("n"), true);
        f.deletion_requested = true;
        f.clones_using = 2;
        assert_eq!(image_step(&f), ImageStep::BlockedByClones(2));
        f.clones_using = 0;
        assert_eq!(image_step(&f), ImageStep::ReleaseFinalizer);
    }

    #[test]
    fn image_placement_by_source() {
        assert_eq!(image_step(&image(None, None, false)), ImageStep::PlaceBoot);
        let mut f = image(None, None, false);
        f.boot_source = false;
        assert_eq!(image_step(&f), ImageStep::FollowSourceClone);
    }

    #[test]
    fn image_capture_on_dead_node_fails_but_ready_image_stays() {
        assert_eq!(
            image_step(&image(Some(ImagePhase::Booting), Some("n"), false)),
            ImageStep::FailNodeLost
        );
        assert_eq!(
            image_step(&image(Some(ImagePhase::Ready), Some("n"), false)),
            ImageStep::Nothing
        );
        assert_eq!(
            image_step(&image(Some(ImagePhase::Failed), None, false)),
            ImageStep::Nothing
        );
        assert_eq!(
            image_step(&image(Some(ImagePhase::Ready), None, false)),
            ImageStep::Nothing
        );
    }

    fn migration() -> MigrationFacts {
        let created: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        MigrationFacts {
            phase: None,
            created,
            now: created + SignedDuration::from_secs(5),
            timeout_seconds: 300,
            clone_phase: Some(Some(ClonePhase::Running)),
            clone_deleting: false,
            clone_node: Some("a".into()),
            spec_source: None,
            spec_target: None,
            source: None,
            target: None,
            source_alive: true,
            target_alive: true,
        }
    }

    fn no_pick(_: &str) -> Result<String, NoNodeFits> {
        panic!("placement must not run")
    }

    #[test]
    fn migration_picks_a_target_excluding_the_source() {
        let step = migration_step(&migration(), |source| {
            assert_eq!(source, "a");
            Ok("b".into())
        });
        assert_eq!(
            step,
            MigrationStep::Schedule {
                source: "a".into(),
                target: "b".into()
            }
        );
        let step = migration_step(&migration(), |_| Err(NoNodeFits::default()));
        assert!(matches!(step, MigrationStep::Wait(m) if m.contains("no target node")));
    }

    #[test]
    fn migration_with_given_target() {
        let mut f = migration();
        f.spec_target = Some("c".into());
        assert_eq!(
            migration_step(&f, no_pick),
            MigrationStep::Schedule {
                source: "a".into(),
                target: "c".into()
            }
        );
        f.spec_target = Some("a".into());
        assert!(
            matches!(migration_step(&f, no_pick), MigrationStep::Fail(m) if m.contains("targetNode a"))
        );
    }

    #[test]
    fn migration_past_timeout_fails() {
        let mut f = migration();
        f.phase = Some(MigrationPhase::Running);
        f.now = f.created + SignedDuration::from_secs(300);
        assert!(
            matches!(migration_step(&f, no_pick), MigrationStep::Fail(m) if m.contains("timed out after 300s"))
        );
        f.phase = Some(MigrationPhase::Succeeded);
        assert_eq!(migration_step(&f, no_pick), MigrationStep::Nothing);
    }

    #[test]
    fn migration_validates_the_clone() {
        let mut f = migration();
        f.clone_phase = None;
        assert!(
            matches!(migration_step(&f, no_pick), MigrationStep::Wait(m) if m.contains("not found"))
        );
        f.clone_phase = Some(Some(ClonePhase::Stopped));
        assert!(matches!(
            migration_step(&f, no_pick),
            MigrationStep::Fail(_)
        ));
        f.clone_phase = Some(Some(ClonePhase::Starting));
        assert!(matches!(
            migration_step(&f, no_pick),
            MigrationStep::Wait(_)
        ));
        let mut f = migration();
        f.spec_source = Some("z".into());
        assert!(
            matches!(migration_step(&f, no_pick), MigrationStep::Fail(m) if m.contains("sourceNode z"))
        );
    }

    #[test]
    fn migration_in_flight_fails_when_a_node_dies() {
        let mut f = migration();
        f.phase = Some(MigrationPhase::Running);
        f.source = Some("a".into());
        f.target = Some("b".into());
        assert_eq!(migration_step(&f, no_pick), MigrationStep::Nothing);
        f.target_alive = false;
        assert!(
            matches!(migration_step(&f, no_pick), MigrationStep::Fail(m) if m.contains("target node b"))
        );
    }
}
