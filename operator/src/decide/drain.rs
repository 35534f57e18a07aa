//! Node drain: when a node is marked for maintenance (annotation
//! `vmstream.io/maintenance` on its VMNode, any value but `"false"`), each
//! Running clone on it gets a VMMigration that moves it to another node —
//! no VM is stopped. The operator creates the migration; the daemons move
//! the VM as for any other migration.

/// Facts about one clone for the drain decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainFacts {
    /// The clone is Running (only running VMs can be live-migrated).
    pub running: bool,
    /// The clone's node, if placed.
    pub node: Option<String>,
    /// The node carries the maintenance annotation.
    pub node_in_maintenance: bool,
    /// The clone is being deleted.
    pub deleting: bool,
    /// A VMMigration of this clone that has not finished (Pending, Scheduled, Running).
    pub migration_in_flight: bool,
    /// The drain migration for this clone and node already exists (in any phase).
    pub drain_migration_exists: bool,
}

/// What to do about a clone on a draining node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrainStep {
    /// Create the VMMigration named `name` moving the clone off `from`.
    Migrate {
        name: String,
        from: String,
    },
    Nothing,
}

/// Name of the drain migration of `clone` off `node`: unique per clone and
/// node, so a drain is attempted once per maintenance of a node (delete the
/// migration to retry a failed one).
pub fn drain_migration_name(clone: &str, node: &str) -> String {
    let name = format!("drain-{clone}-{node}");
    if name.len() <= 253 {
        name
    } else {
        name[..253].trim_end_matches('-').to_string()
    }
}

/// The drain decision for one clone.
pub fn drain_step(clone: &str, facts: &DrainFacts) -> DrainStep {
    let Some(node) = &facts.node else {
        return DrainStep::Nothing;
    };
    if !facts.node_in_maintenance
        || !facts.running
        || facts.deleting
        || facts.migration_in_flight
        || facts.drain_migration_exists
    {
        return DrainStep::Nothing;
    }
    DrainStep::Migrate {
        name: drain_migration_name(clone, node),
        from: node.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running_on_draining_node() -> DrainFacts {
        DrainFacts {
            running: true,
            node: Some("a".into()),
            node_in_maintenance: true,
            deleting: false,
            migration_in_flight: false,
            drain_migration_exists: false,
        }
    }

    #[test]
    fn a_running_clone_on_a_draining_node_is_migrated_off_it() {
        assert_eq!(
            drain_step("vm", &running_on_draining_node()),
            DrainStep::Migrate {
                name: "drain-vm-a".into(),
                from: "a".into()
            }
        );
    }

    #[test]
    fn nothing_happens_without_maintenance_or_when_already_moving() {
        let base = running_on_draining_node();
        for facts in [
            DrainFacts {
                node_in_maintenance: false,
                ..base.clone()
            },
            DrainFacts {
                running: false,
                ..base.clone()
            },
            DrainFacts {
                deleting: true,
                ..base.clone()
            },
            DrainFacts {
                migration_in_flight: true,
                ..base.clone()
            },
            DrainFacts {
                drain_migration_exists: true,
                ..base.clone()
            },
            DrainFacts {
                node: None,
                ..base.clone()
            },
        ] {
            assert_eq!(drain_step("vm", &facts), DrainStep::Nothing, "{facts:?}");
        }
    }

    #[test]
    fn names_stay_within_the_api_limit() {
        let long = "x".repeat(300);
        assert!(drain_migration_name(&long, "node").len() <= 253);
        assert_eq!(drain_migration_name("c", "n"), "drain-c-n");
    }
}
