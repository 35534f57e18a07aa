//! The daemon acting on what the operator placed on its node, level-
//! triggered: every sync interval it compares each placed LiveImage and
//! VMClone (from the reflector stores of [`crate::placed`]) with local facts
//! (VM processes, images on disk, work in flight), decides with the pure
//! [`image_action`] / [`clone_action`], and carries out the decision on a
//! blocking task:
//!
//! * a LiveImage with a boot source: boot the guest in a VM process, wait for
//!   READY, capture into `<state>/images/<ns>/<name>/`, stop the source VM,
//!   and write status Ready with the image's figures; a `linux` source first
//!   has its artifacts fetched and verified ([`crate::artifacts`]), a fetch
//!   failure or a refused start is status Failed with its reason;
//! * a VMClone: start a clone process from the local image and write status
//!   Running with its start latency and memory figures; when the clone is
//!   being deleted, stop its VM and write phase Stopped;
//! * the node report lists the local images and the clones' usage.
//!
//! Status is written with a typed merge patch on `/status` under the field
//! manager `vmstream-node`; a failure's condition reason names the failure
//! ([`ActionError::reason`]). Everything is idempotent: after a daemon
//! restart the adopted VM processes and the images on disk are the facts it
//! resumes from.
//!
//! This file is the sync loop; `decide` holds the pure decisions, `spec` the
//! translation from the API to start specs, `image_actions` and
//! `clone_actions` carry decisions out, `status` writes status.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use vmstream_api::v1alpha1::{LiveImage, VMClone, VMClonePhase};

use crate::artifacts::ArtifactFetcher;
use crate::error_chain::chain;
use crate::heartbeat::FIELD_MANAGER;
use crate::node_status::SharedReport;
use crate::object_key::{ObjectKey, ObjectKind};
use crate::page_service::PageService;
use crate::placed::PlacedObjects;
use crate::state_layout::StateLayout;
use crate::supervisor::VmSupervisor;
use crate::vm_protocol::VmPhase;
use crate::vm_record::VmRecord;

mod clone_actions;
mod decide;
mod error;
mod image_actions;
mod spec;
mod status;

pub use decide::{
    CloneAction, CloneFacts, CloneFailure, ImageAction, ImageFacts, ImageFailure, RemoteRetry,
    UNKNOWN_IMAGE_PATIENCE, clone_action, image_action, refused_as_unknown_image, remote_retry,
    unplaced_vms,
};
pub use error::ActionError;
pub use spec::{FetchedLinux, boot_spec, clone_backend, clone_spec, fill_spec, linux_spec};

/// Shared state of the sync loop.
pub struct NodeActions {
    pub client: kube::Client,
    pub node: String,
    pub layout: StateLayout,
    /// Fetches the artifacts of Linux guests into the layout's cache.
    pub artifacts: ArtifactFetcher,
    pub supervisor: Arc<VmSupervisor>,
    pub placed: PlacedObjects,
    pub report: SharedReport,
    busy: Mutex<BTreeSet<ObjectKey>>,
    /// The last phase this daemon wrote per VMClone (key → uid, phase,
    /// when), so a report is not repeated while the watch still shows the
    /// object as it was before the write.
    reported: Mutex<BTreeMap<ObjectKey, (String, VMClonePhase, Instant)>>,
    recorder: Recorder,
    page_service: std::sync::OnceLock<Arc<PageService>>,
}

/// A sync whose VM listing takes longer than this says so in the log.
const SLOW_LISTING: Duration = Duration::from_millis(50);

/// How long a phase this daemon wrote stands in for a lagging watch.
const REPORT_MEMORY: Duration = Duration::from_secs(10);

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

impl NodeActions {
    pub fn new(
        client: kube::Client,
        node: String,
        state_dir: PathBuf,
        supervisor: Arc<VmSupervisor>,
        placed: PlacedObjects,
        report: SharedReport,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: FIELD_MANAGER.into(),
                    instance: Some(node.clone()),
                },
            ),
            client,
            node,
            artifacts: ArtifactFetcher::new(StateLayout::new(&state_dir)),
            layout: StateLayout::new(state_dir),
            supervisor,
            placed,
            report,
            busy: Mutex::new(BTreeSet::new()),
            reported: Mutex::new(BTreeMap::new()),
            page_service: std::sync::OnceLock::new(),
        })
    }

    /// Serves local images to other nodes and streams remote images for
    /// clones placed here (without it such clones wait).
    pub fn set_page_service(&self, service: Arc<PageService>) {
        let _ = self.page_service.set(service);
    }

    fn is_busy(&self, key: &ObjectKey) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }

    /// Marks `key` busy; false when it already was.
    fn claim(&self, key: &ObjectKey) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone())
    }

    fn release(&self, key: &ObjectKey) {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// True when `action` only reports a phase this daemon wrote for this
    /// very object moments ago (the watch has not delivered the write yet).
    fn already_reported(&self, key: &ObjectKey, clone: &VMClone, action: &CloneAction) -> bool {
        let phase = match action {
            CloneAction::ReportRunning => VMClonePhase::Running,
            CloneAction::ReportStopped => VMClonePhase::Stopped,
            _ => return false,
        };
        let uid = clone.metadata.uid.clone().unwrap_or_default();
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        reported.retain(|_, (_, _, at)| at.elapsed() < REPORT_MEMORY);
        reported
            .get(key)
            .is_some_and(|(u, p, _)| *u == uid && *p == phase)
    }

    fn remember_report(&self, clone: &VMClone, phase: VMClonePhase) {
        let Some(key) = ObjectKey::of(clone) else {
            return;
        };
        self.reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key,
                (
                    clone.metadata.uid.clone().unwrap_or_default(),
                    phase,
                    Instant::now(),
                ),
            );
    }

    /// Runs the sync loop every `interval` and whenever a placed object
    /// changes, and refreshes the node report.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let changed = Arc::clone(&self.placed.changed);
        loop {
            // Level-triggered: every interval, and at once when a placed
            // object changes (a burst of changes coalesces into one sync).
            let tick = tokio::select! {
                _ = ticker.tick() => true,
                _ = changed.notified() => false,
            };
            let this = Arc::clone(&self);
            let listing_began = Instant::now();
            let vms = match tokio::task::spawn_blocking(move || {
                this.supervisor.forget_dead();
                // Every VM is asked on the interval; between, phases known
                // from the last interval (or a launch) are reused.
                if tick {
                    this.supervisor.list()
                } else {
                    this.supervisor.list_recent(interval)
                }
            })
            .await
            {
                Ok(vms) => vms,
                Err(e) => {
                    tracing::warn!(error = %e, "listing VMs failed");
                    continue;
                }
            };
            if listing_began.elapsed() > SLOW_LISTING {
                tracing::info!(
                    vms = vms.len(),
                    took_ms = ms(listing_began.elapsed()),
                    "slow VM listing"
                );
            }
            let phases: BTreeMap<String, VmPhase> = vms
                .iter()
                .filter_map(|v| Some((v.record.id.clone(), v.phase.clone()?)))
                .collect();
            self.sync_images(&phases);
            self.sync_clones(&phases);
            // The node report (stats of every VM, the image list) and the
            // orphan check follow the interval, not every watch event:
            // during a burst of placements each event would otherwise
            // sample every VM again.
            if !tick {
                continue;
            }
            let records: Vec<VmRecord> = vms.into_iter().map(|v| v.record).collect();
            self.reap_orphans(&records).await;
            let this = Arc::clone(&self);
            let refreshed = tokio::task::spawn_blocking(move || {
                let usage = this.supervisor.sample_usage();
                this.serve_local_images();
                if let Ok(mut report) = this.report.write() {
                    report.vms = usage;
                }
            })
            .await;
            if let Err(e) = refreshed {
                tracing::warn!(error = %e, "node report not refreshed");
            }
        }
    }

    /// Stops VM processes whose owning VMClone or LiveImage no longer
    /// exists (deleted while this daemon was down, or force-deleted without
    /// its finalizer). Candidates are VMs whose owner the placed stores do
    /// not show; a quorum read of the owner decides (a clone placed on
    /// another node, e.g. migrating here, still exists and is left alone).
    async fn reap_orphans(self: &Arc<Self>, vms: &[VmRecord]) {
        let placed: BTreeSet<ObjectKey> = self
            .placed
            .clones
            .state()
            .iter()
            .filter_map(|c| ObjectKey::of(c.as_ref()))
            .chain(
                self.placed
                    .images
                    .state()
                    .iter()
                    .filter_map(|i| ObjectKey::of(i.as_ref())),
            )
            .collect();
        for (id, owner) in unplaced_vms(vms, &placed) {
            if self.is_busy(&owner) {
                continue;
            }
            match self.owner_exists(&owner).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(vm = %id, error = %e, "owner of an unplaced VM not readable");
                    continue;
                }
            }
            if !self.claim(&owner) {
                continue;
            }
            let why = format!(
                "stopping VM {id}: its {} {}/{} no longer exists",
                owner.kind, owner.namespace, owner.name
            );
            tracing::warn!(vm = %id, "{why}");
            let this = Arc::clone(self);
            let key = owner.clone();
            let stopped = tokio::task::spawn_blocking(move || {
                let result = this.supervisor.stop(&id);
                this.release(&key);
                result
            })
            .await;
            match stopped {
                Ok(Ok(())) => self.node_event("OrphanVMStopped", why, &owner).await,
                Ok(Err(e)) => tracing::warn!(error = %chain(&e), "stopping an orphaned VM failed"),
                Err(e) => tracing::warn!(error = %e, "stopping an orphaned VM panicked"),
            }
        }
    }

    async fn owner_exists(&self, owner: &ObjectKey) -> Result<bool, kube::Error> {
        let ns = &owner.namespace;
        Ok(match owner.kind {
            ObjectKind::VMClone => Api::<VMClone>::namespaced(self.client.clone(), ns)
                .get_opt(&owner.name)
                .await?
                .is_some(),
            ObjectKind::LiveImage => Api::<LiveImage>::namespaced(self.client.clone(), ns)
                .get_opt(&owner.name)
                .await?
                .is_some(),
            ObjectKind::VMMigration | ObjectKind::Other(_) => true,
        })
    }

    /// An Event about this node (on its VMNode) concerning `related` (so
    /// events about different objects are not folded into one series); a
    /// failure is only logged.
    async fn node_event(&self, reason: &str, note: String, related: &ObjectKey) {
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(vmstream_api::API_VERSION.into()),
            kind: Some("VMNode".into()),
            name: Some(self.node.clone()),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: Some(k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some(vmstream_api::API_VERSION.into()),
                kind: Some(related.kind.to_string()),
                namespace: Some(related.namespace.clone()),
                name: Some(related.name.clone()),
                ..Default::default()
            }),
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, reason, "publishing an event failed");
        }
    }

    fn sync_images(self: &Arc<Self>, phases: &BTreeMap<String, VmPhase>) {
        let clones = self.placed.clones.state();
        for image in self.placed.images.state() {
            let Some(key) = ObjectKey::of(image.as_ref()) else {
                continue;
            };
            let vm_phase = |clone: &str| phases.get(&key.clone_in_namespace(clone).vm_id());
            let clones_using = clones
                .iter()
                .filter(|c| c.metadata.namespace.as_deref() == Some(&key.namespace))
                .filter(|c| c.spec.live_image == key.name)
                .filter(|c| vm_phase(c.metadata.name.as_deref().unwrap_or_default()).is_some())
                .count();
            let source_clone_vm = image
                .spec
                .source
                .from_clone
                .as_ref()
                .and_then(|c| vm_phase(&c.vm_clone).cloned());
            let facts = ImageFacts {
                local: self.layout.local_image(&key),
                source_vm: phases.get(&key.vm_id()).cloned(),
                busy: self.is_busy(&key),
                clones_using,
                source_clone_vm,
            };
            let action = image_action(&image, &facts);
            if action == ImageAction::Nothing || !self.claim(&key) {
                continue;
            }
            tracing::info!(image = %key, ?action, "acting on LiveImage");
            let this = Arc::clone(self);
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let result =
                    handle.block_on(async { this.act_on_image(&image, &key, action).await });
                if let Err(e) = result {
                    tracing::warn!(image = %key, error = %chain(&e), "LiveImage action failed");
                }
                this.release(&key);
            });
        }
    }

    fn sync_clones(self: &Arc<Self>, phases: &BTreeMap<String, VmPhase>) {
        for clone in self.placed.clones.state() {
            let Some(key) = ObjectKey::of(clone.as_ref()) else {
                continue;
            };
            let image = key.image_in_namespace(&clone.spec.live_image);
            let facts = CloneFacts {
                vm: phases.get(&key.vm_id()).cloned(),
                image_dir: self.layout.complete_image(&image),
                can_stream: self.page_service.get().is_some(),
                busy: self.is_busy(&key),
            };
            let action = clone_action(&clone, &facts);
            if action == CloneAction::Nothing || self.already_reported(&key, &clone, &action) {
                continue;
            }
            if let CloneAction::Wait(message) = &action
                && clone.status.as_ref().and_then(|s| s.message.as_deref()) == Some(message)
            {
                continue;
            }
            if !self.claim(&key) {
                continue;
            }
            tracing::info!(clone = %key, ?action, "acting on VMClone");
            let this = Arc::clone(self);
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let result =
                    handle.block_on(async { this.act_on_clone(&clone, &key, action).await });
                if let Err(e) = result {
                    tracing::warn!(clone = %key, error = %chain(&e), "VMClone action failed");
                }
                this.release(&key);
            });
        }
    }
}
