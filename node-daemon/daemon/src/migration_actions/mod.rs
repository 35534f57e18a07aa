//! The daemon carrying out VMMigrations, level-triggered like
//! [`crate::node_actions`]: every sync interval each migration this node
//! takes part in is compared with local facts and the pure
//! [`migration_action`] decides:
//!
//! * **target** (migration labelled `vmstream.io/node=<me>`): phase
//!   Scheduled → start the clone's VM process (`vmc.<ns>.<name>`) as a
//!   migration target listening on an ephemeral port of the node's stream
//!   address, write `status.targetAddress` and phase Running. A failed
//!   migration's target VM that never ran is stopped.
//! * **source** (label `vmstream.io/source-node=<me>`): once
//!   `targetAddress` is set, ask the clone's VM process to migrate there;
//!   on success write the clone's `status.node` (the target) and the
//!   migration's figures with phase Succeeded; the source VM process stays
//!   (phase `stopping`, memory released) until the operator moved the
//!   clone's node label, then it is stopped. On failure the migration is
//!   Failed with the reason (before the switch-over the VM keeps running
//!   here).
//!
//! This file is the sync loop and carries decisions out; `decide` holds the
//! pure decisions, `error` the failures and their reasons.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::Store;
use kube::{Api, Resource, ResourceExt};
use vmstream_api::v1alpha1::{
    LiveImage, VMClone, VMCloneStatus, VMMigration, VMMigrationPhase, VMMigrationStatus, VMNode,
};
use vmstream_api::{NODE_LABEL, condition, set_condition};

use crate::error_chain::chain;
use crate::object_key::ObjectKey;
use crate::state_layout::StateLayout;
use crate::status_patch::merge_status;
use crate::supervisor::{VmLaunch, VmSupervisor};
use crate::vm_protocol::{Reply, Request, VmPhase};

mod decide;
mod error;

pub use decide::{
    MigrationAction, MigrationFacts, MigrationFailure, Role, listen_ip, migration_action,
    protocol_mode,
};
pub use error::MigrationActionError;

/// The daemon's migration work.
pub struct MigrationActions {
    pub client: kube::Client,
    pub node: String,
    pub layout: StateLayout,
    pub supervisor: Arc<VmSupervisor>,
    /// Migrations to this node.
    pub incoming: Store<VMMigration>,
    /// Migrations from this node.
    pub outgoing: Store<VMMigration>,
    /// Clones labelled for this node.
    pub clones: Store<VMClone>,
    /// Address migration targets listen on (port chosen per migration).
    pub listen_ip: IpAddr,
    /// The cluster token both sides authenticate with.
    pub token_file: PathBuf,
    busy: Mutex<BTreeSet<(Role, ObjectKey)>>,
}

/// Writes the migration token file (`<state>/migration-token`, mode 0600)
/// from `token` (else env `VMSTREAM_STREAM_TOKEN`, else the development
/// token) and returns its path.
pub fn write_token_file(state_dir: &Path, token: Option<&Path>) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(path) = token {
        return Ok(path.to_path_buf());
    }
    let bytes = std::env::var("VMSTREAM_STREAM_TOKEN")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().as_bytes().to_vec())
        .unwrap_or_else(|| {
            tracing::warn!("no cluster token configured: migrations use the development token");
            b"vmstream-development-migration-token".to_vec()
        });
    let path = StateLayout::new(state_dir).migration_token_file();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    std::io::Write::write_all(&mut file, &bytes)?;
    Ok(path)
}

fn ms_time(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

impl MigrationActions {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        node: String,
        state_dir: PathBuf,
        supervisor: Arc<VmSupervisor>,
        incoming: Store<VMMigration>,
        outgoing: Store<VMMigration>,
        clones: Store<VMClone>,
        listen_ip: IpAddr,
        token_file: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            node,
            layout: StateLayout::new(state_dir),
            supervisor,
            incoming,
            outgoing,
            clones,
            listen_ip,
            token_file,
            busy: Mutex::new(BTreeSet::new()),
        })
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, BTreeSet<(Role, ObjectKey)>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the sync loop every `interval`.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let this = Arc::clone(&self);
            let Ok(vms) = tokio::task::spawn_blocking(move || this.supervisor.list()).await else {
                continue;
            };
            let phases: std::collections::BTreeMap<String, VmPhase> = vms
                .into_iter()
                .filter_map(|v| Some((v.record.id.clone(), v.phase?)))
                .collect();
            let work = self
                .incoming
                .state()
                .into_iter()
                .map(|m| (Role::Target, m))
                .chain(self.outgoing.state().into_iter().map(|m| (Role::Source, m)));
            for (role, migration) in work {
                let Some(migration_key) = ObjectKey::of(migration.as_ref()) else {
                    continue;
                };
                let owner = migration_key.clone_in_namespace(&migration.spec.vm_clone);
                let key = (role, migration_key);
                let facts = MigrationFacts {
                    local_vm: phases.get(&owner.vm_id()).cloned(),
                    clone_here: self.clones.state().iter().any(|c| {
                        ObjectKey::of(c.as_ref()).as_ref() == Some(&owner)
                            && c.labels().get(NODE_LABEL) == Some(&self.node)
                    }),
                    busy: self.busy().contains(&key),
                };
                let action = migration_action(role, &migration, &facts);
                if action == MigrationAction::Nothing || !self.busy().insert(key.clone()) {
                    continue;
                }
                tracing::info!(migration = %key.1, ?role, ?action, "acting on VMMigration");
                let this = Arc::clone(&self);
                let handle = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || {
                    let result = handle.block_on(this.act(&migration, &owner, action));
                    if let Err(e) = result {
                        tracing::warn!(migration = %key.1, role = ?key.0, error = %chain(&e), "VMMigration action failed");
                    }
                    this.busy().remove(&key);
                });
            }
        }
    }

    async fn act(
        &self,
        migration: &VMMigration,
        owner: &ObjectKey,
        action: MigrationAction,
    ) -> Result<(), MigrationActionError> {
        let id = owner.vm_id();
        match action {
            MigrationAction::Nothing => Ok(()),
            MigrationAction::StopVm => {
                self.supervisor
                    .stop(&id)
                    .map_err(|e| MigrationActionError::Stop {
                        id: id.clone(),
                        source: Box::new(e),
                    })?;
                tracing::info!(vm = %id, "migration: VM process stopped");
                Ok(())
            }
            MigrationAction::Fail(failure) => {
                self.fail(migration, failure.reason(), &failure.to_string())
                    .await
            }
            MigrationAction::PrepareTarget => match self.prepare_target(owner, &id).await {
                Ok(addr) => {
                    self.patch(
                        migration,
                        &VMMigrationStatus {
                            phase: Some(VMMigrationPhase::Running),
                            target_address: Some(addr.to_string()),
                            message: Some(format!("target listening on {addr}")),
                            ..VMMigrationStatus::default()
                        },
                    )
                    .await
                }
                Err(e) => {
                    let message = format!("preparing the target on {}: {}", self.node, chain(&e));
                    if self.supervisor.get(&id).is_some() {
                        let _ = self.supervisor.stop(&id);
                    }
                    self.fail(migration, e.reason(), &message).await
                }
            },
            MigrationAction::Migrate(addr) => self.migrate(migration, owner, &id, addr).await,
        }
    }

    /// Starts the clone's VM process as a migration target; its address.
    async fn prepare_target(
        &self,
        owner: &ObjectKey,
        id: &str,
    ) -> Result<SocketAddr, MigrationActionError> {
        let ns = &owner.namespace;
        let clone = Api::<VMClone>::namespaced(self.client.clone(), ns)
            .get(&owner.name)
            .await
            .map_err(api_error(owner))?;
        let image_key = owner.image_in_namespace(&clone.spec.live_image);
        let image = Api::<LiveImage>::namespaced(self.client.clone(), ns)
            .get(&image_key.name)
            .await
            .map_err(api_error(&image_key))?;
        let memory_bytes = image
            .status
            .as_ref()
            .and_then(|s| s.memory_bytes)
            .or_else(|| {
                image
                    .spec
                    .source
                    .boot
                    .as_ref()
                    .map(|b| u64::from(b.memory_mib) << 20)
            })
            .ok_or_else(|| MigrationActionError::NoMemorySize {
                image: image_key.clone(),
            })?;
        let vcpus = image
            .spec
            .source
            .boot
            .as_ref()
            .map_or(1, |b| u8::try_from(b.vcpus).unwrap_or(1));
        let local = self.layout.complete_image(&image_key);
        let launch = VmLaunch {
            id: id.to_string(),
            owner: Some(owner.clone()),
            vcpus,
            memory_bytes,
            start: None,
            prepare_lazy: false,
            preload_image: None,
        };
        let request = Request::Receive {
            listen: SocketAddr::new(self.listen_ip, 0),
            image: local,
            token_file: self.token_file.clone(),
        };
        let supervisor = Arc::clone(&self.supervisor);
        let vm = id.to_string();
        let reply = tokio::task::spawn_blocking(move || {
            supervisor.launch(&launch)?;
            supervisor.call(&vm, &request)
        })
        .await
        .map_err(|e| MigrationActionError::Panicked {
            id: id.to_string(),
            why: e.to_string(),
        })?
        .map_err(|e| MigrationActionError::Target {
            id: id.to_string(),
            source: Box::new(e),
        })?;
        match reply {
            Reply::Receiving { addr } => Ok(addr),
            other => Err(MigrationActionError::UnexpectedReply {
                id: id.to_string(),
                request: "receive",
                reply: format!("{other:?}"),
            }),
        }
    }

    async fn migrate(
        &self,
        migration: &VMMigration,
        owner: &ObjectKey,
        id: &str,
        addr: SocketAddr,
    ) -> Result<(), MigrationActionError> {
        let ns = &owner.namespace;
        let target = migration
            .status
            .as_ref()
            .and_then(|s| s.target_node.clone())
            .unwrap_or_default();
        let clone = Api::<VMClone>::namespaced(self.client.clone(), ns)
            .get(&owner.name)
            .await
            .map_err(api_error(owner))?;
        let image_key = owner
            .image_in_namespace(&clone.spec.live_image)
            .namespaced_name();
        let target_has_image = Api::<VMNode>::all(self.client.clone())
            .get_opt(&target)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.status)
            .is_some_and(|s| s.images.contains(&image_key));
        let request = Request::Migrate {
            target: addr,
            mode: protocol_mode(migration.spec.mode),
            token_file: self.token_file.clone(),
            precopy_rounds: migration.spec.precopy_rounds.unwrap_or(0),
            bandwidth_bytes_per_s: migration.spec.bandwidth_mibps.map(|m| u64::from(m) << 20),
            target_has_image,
        };
        tracing::info!(vm = %id, %addr, target_has_image, "migrating");
        let supervisor = Arc::clone(&self.supervisor);
        let vm = id.to_string();
        let result = tokio::task::spawn_blocking(move || supervisor.call(&vm, &request))
            .await
            .map_err(|e| MigrationActionError::Panicked {
                id: id.to_string(),
                why: e.to_string(),
            })?;
        match result {
            Ok(Reply::Migrated(report)) => {
                // The clone now runs on the target: say so before the
                // operator moves its label there.
                let node = VMCloneStatus {
                    node: Some(target.clone()),
                    ..VMCloneStatus::default()
                };
                merge_status::<VMClone, _>(&self.client, ns, &owner.name, &node)
                    .await
                    .map_err(api_error(owner))?;
                let mut conditions = migration
                    .status
                    .as_ref()
                    .map(|s| s.conditions.clone())
                    .unwrap_or_default();
                let message = format!(
                    "migrated to {target} in {:.1} ms (downtime {:.3} ms)",
                    report.total_ms, report.downtime_ms
                );
                set_condition(
                    &mut conditions,
                    condition(
                        "Succeeded",
                        true,
                        "Migrated",
                        &message,
                        migration.meta().generation,
                    ),
                );
                self.patch(
                    migration,
                    &VMMigrationStatus {
                        phase: Some(VMMigrationPhase::Succeeded),
                        downtime_ms: Some(ms_time(report.downtime_ms)),
                        total_time_ms: Some(ms_time(report.total_ms)),
                        bytes_sent: Some(report.bytes_sent),
                        pages_sent: Some(report.pages_sent),
                        pages_faulted: Some(report.target.pages_requested_by_faults),
                        fault_wait_ms: Some(ms_time(report.target.fault_wait_ms)),
                        completion_time: Some(Time(Timestamp::now())),
                        message: Some(message),
                        conditions,
                        ..VMMigrationStatus::default()
                    },
                )
                .await
            }
            Ok(other) => {
                let e = MigrationActionError::UnexpectedReply {
                    id: id.to_string(),
                    request: "migrate",
                    reply: format!("{other:?}"),
                };
                self.fail(migration, e.reason(), &e.to_string()).await
            }
            Err(source) => {
                let e = MigrationActionError::Migrate {
                    id: id.to_string(),
                    target: addr,
                    source: Box::new(source),
                };
                self.fail(migration, e.reason(), &chain(&e)).await
            }
        }
    }

    /// Writes phase Failed with `message`, the Succeeded condition's
    /// reason `reason`.
    async fn fail(
        &self,
        migration: &VMMigration,
        reason: &str,
        message: &str,
    ) -> Result<(), MigrationActionError> {
        let mut conditions = migration
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        set_condition(
            &mut conditions,
            condition(
                "Succeeded",
                false,
                reason,
                message,
                migration.meta().generation,
            ),
        );
        self.patch(
            migration,
            &VMMigrationStatus {
                phase: Some(VMMigrationPhase::Failed),
                message: Some(message.to_owned()),
                completion_time: Some(Time(Timestamp::now())),
                conditions,
                ..VMMigrationStatus::default()
            },
        )
        .await
    }

    async fn patch(
        &self,
        migration: &VMMigration,
        status: &VMMigrationStatus,
    ) -> Result<(), MigrationActionError> {
        let key = ObjectKey::vm_migration(
            migration.namespace().unwrap_or_default(),
            migration.name_any(),
        );
        merge_status::<VMMigration, _>(&self.client, &key.namespace, &key.name, status)
            .await
            .map_err(api_error(&key))
    }
}

/// A failed read or write of `object`.
fn api_error(object: &ObjectKey) -> impl FnOnce(kube::Error) -> MigrationActionError {
    let object = object.clone();
    move |e| MigrationActionError::Api {
        object,
        source: Box::new(e),
    }
}
