//! The pure decisions about a migration this node takes part in
//! ([`migration_action`]), and the translation of the API's migration mode
//! and stream address into the VM protocol's terms.

use std::net::{IpAddr, SocketAddr};

use kube::Resource;
use vmstream_api::v1alpha1::{MigrationMode, VMMigration, VMMigrationPhase};

use crate::vm_protocol::{MigrateMode, VmPhase};

/// This node's part in a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Source,
    Target,
}

/// What the daemon knows locally about one migration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationFacts {
    /// Phase of the clone's VM process on this node, if one runs.
    pub local_vm: Option<VmPhase>,
    /// The clone is labelled for this node (it is in the placed store).
    pub clone_here: bool,
    /// Work on this migration is in flight.
    pub busy: bool,
}

/// What to do about a migration.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrationAction {
    Nothing,
    /// Target: start the VM process as a migration target, publish its
    /// address, phase Running.
    PrepareTarget,
    /// Source: migrate the clone's VM to this address.
    Migrate(SocketAddr),
    /// Stop the clone's VM process on this node (a target VM of a failed
    /// migration, or the source's stopped copy after the hand-over).
    StopVm,
    /// The migration cannot go on: write phase Failed with this reason.
    Fail(MigrationFailure),
}

/// Why a migration cannot go on, decided without trying anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationFailure {
    #[error("targetAddress {0:?} is not host:port")]
    BadTargetAddress(String),
    #[error("the clone's VM process is not on the source node")]
    VmNotOnSource,
}

impl MigrationFailure {
    /// The `reason` of the Succeeded condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadTargetAddress(_) => "BadTargetAddress",
            Self::VmNotOnSource => "VMNotOnSource",
        }
    }
}

/// Decides about a migration this node takes part in as `role`.
pub fn migration_action(
    role: Role,
    migration: &VMMigration,
    facts: &MigrationFacts,
) -> MigrationAction {
    use MigrationAction::*;
    if facts.busy || migration.meta().deletion_timestamp.is_some() {
        return Nothing;
    }
    let status = migration.status.as_ref();
    let address = status.and_then(|s| s.target_address.as_deref());
    match (role, migration.phase()) {
        (Role::Target, VMMigrationPhase::Scheduled) => match (&facts.local_vm, address) {
            (None, None) => PrepareTarget,
            _ => Nothing,
        },
        (Role::Target, VMMigrationPhase::Failed) => match &facts.local_vm {
            // A target VM that never ran (or failed) and does not own the clone.
            Some(VmPhase::Warm | VmPhase::Starting | VmPhase::Failed) if !facts.clone_here => {
                StopVm
            }
            _ => Nothing,
        },
        (Role::Source, VMMigrationPhase::Running) => match (&facts.local_vm, address) {
            (Some(VmPhase::Running), Some(address)) => match address.parse() {
                Ok(addr) => Migrate(addr),
                Err(_) => Fail(MigrationFailure::BadTargetAddress(address.to_owned())),
            },
            (None, Some(_)) => Fail(MigrationFailure::VmNotOnSource),
            _ => Nothing,
        },
        // The VM runs on the target; once the clone's label moved there,
        // the source's stopped copy goes.
        (Role::Source, VMMigrationPhase::Succeeded) => match &facts.local_vm {
            Some(VmPhase::Stopping) if !facts.clone_here => StopVm,
            _ => Nothing,
        },
        _ => Nothing,
    }
}

/// The protocol mode of an API mode.
pub fn protocol_mode(mode: MigrationMode) -> MigrateMode {
    match mode {
        MigrationMode::Postcopy => MigrateMode::Postcopy,
        MigrationMode::Precopy => MigrateMode::Precopy,
        MigrationMode::Hybrid => MigrateMode::Hybrid,
    }
}

/// Where migration targets listen: the host of the node's stream address.
pub fn listen_ip(stream_addr: Option<&str>) -> Option<IpAddr> {
    let addr = stream_addr?;
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    addr.rsplit_once(':')
        .map_or(addr, |(host, _)| host)
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vmstream_api::v1alpha1::{VMMigrationSpec, VMMigrationStatus};

    fn migration(phase: VMMigrationPhase, address: Option<&str>) -> VMMigration {
        let mut m = VMMigration::new(
            "m",
            serde_json::from_value::<VMMigrationSpec>(json!({ "vmClone": "c" })).unwrap(),
        );
        m.status = Some(VMMigrationStatus {
            phase: Some(phase),
            target_address: address.map(str::to_string),
            ..VMMigrationStatus::default()
        });
        m
    }

    fn facts(vm: Option<VmPhase>, clone_here: bool) -> MigrationFacts {
        MigrationFacts {
            local_vm: vm,
            clone_here,
            busy: false,
        }
    }

    #[test]
    fn target_prepares_once_and_cleans_up_failures() {
        let scheduled = migration(VMMigrationPhase::Scheduled, None);
        assert_eq!(
            migration_action(Role::Target, &scheduled, &facts(None, false)),
            MigrationAction::PrepareTarget
        );
        // Already started (daemon restarted before writing the address).
        assert_eq!(
            migration_action(
                Role::Target,
                &scheduled,
                &facts(Some(VmPhase::Starting), false)
            ),
            MigrationAction::Nothing
        );
        let mut busy = facts(None, false);
        busy.busy = true;
        assert_eq!(
            migration_action(Role::Target, &scheduled, &busy),
            MigrationAction::Nothing
        );
        let failed = migration(VMMigrationPhase::Failed, Some("10.0.0.2:4000"));
        assert_eq!(
            migration_action(
                Role::Target,
                &failed,
                &facts(Some(VmPhase::Starting), false)
            ),
            MigrationAction::StopVm
        );
        // A VM that runs here is never stopped by a failed migration.
        assert_eq!(
            migration_action(Role::Target, &failed, &facts(Some(VmPhase::Running), false)),
            MigrationAction::Nothing
        );
        // The target does not act on a Running migration (the source does).
        let running = migration(VMMigrationPhase::Running, Some("10.0.0.2:4000"));
        assert_eq!(
            migration_action(
                Role::Target,
                &running,
                &facts(Some(VmPhase::Starting), false)
            ),
            MigrationAction::Nothing
        );
    }

    #[test]
    fn source_migrates_when_the_target_listens() {
        let waiting = migration(VMMigrationPhase::Scheduled, None);
        assert_eq!(
            migration_action(Role::Source, &waiting, &facts(Some(VmPhase::Running), true)),
            MigrationAction::Nothing
        );
        let running = migration(VMMigrationPhase::Running, Some("10.0.0.2:4000"));
        assert_eq!(
            migration_action(Role::Source, &running, &facts(Some(VmPhase::Running), true)),
            MigrationAction::Migrate("10.0.0.2:4000".parse().unwrap())
        );
        assert!(matches!(
            migration_action(Role::Source, &running, &facts(None, true)),
            MigrationAction::Fail(m) if m.to_string().contains("not on the source")
        ));
        let bad = migration(VMMigrationPhase::Running, Some("nowhere"));
        assert!(matches!(
            migration_action(Role::Source, &bad, &facts(Some(VmPhase::Running), true)),
            MigrationAction::Fail(m) if m.to_string().contains("host:port")
        ));
    }

    #[test]
    fn source_copy_goes_after_the_hand_over() {
        let done = migration(VMMigrationPhase::Succeeded, Some("10.0.0.2:4000"));
        assert_eq!(
            migration_action(Role::Source, &done, &facts(Some(VmPhase::Stopping), true)),
            MigrationAction::Nothing
        );
        assert_eq!(
            migration_action(Role::Source, &done, &facts(Some(VmPhase::Stopping), false)),
            MigrationAction::StopVm
        );
        // A VM back on this node later (another migration) is left alone.
        assert_eq!(
            migration_action(Role::Source, &done, &facts(Some(VmPhase::Running), false)),
            MigrationAction::Nothing
        );
    }

    #[test]
    fn listen_ip_is_the_stream_host() {
        assert_eq!(
            listen_ip(Some("10.1.0.2:7480")),
            Some("10.1.0.2".parse().unwrap())
        );
        assert_eq!(
            listen_ip(Some("10.1.0.3")),
            Some("10.1.0.3".parse().unwrap())
        );
        assert_eq!(listen_ip(None), None);
        assert_eq!(listen_ip(Some("node-a:7480")), None);
    }
}
