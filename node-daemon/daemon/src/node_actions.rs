//! The daemon acting on what the operator placed on its node, level-
//! triggered: every sync interval it compares each placed LiveImage and
//! VMClone (from the reflector stores of [`crate::placed`]) with local facts
//! (VM processes, images on disk, work in flight), decides with the pure
//! [`image_action`] / [`clone_action`], and carries out the decision on a
//! blocking task:
//!
//! * a LiveImage with a boot source: boot the guest in a VM process, wait for
//!   READY, capture into `<state>/images/<ns>/<name>/`, stop the source VM,
//!   and write status Ready with the image's figures;
//! * a VMClone: start a clone process from the local image and write status
//!   Running with its start latency and memory figures; when the clone is
//!   being deleted, stop its VM and write phase Stopped;
//! * the node report lists the local images and the clones' usage.
//!
//! Status is written with a merge patch on `/status` under the field manager
//! `vmstream-node`. Everything is idempotent: after a daemon restart the
//! adopted VM processes and the images on disk are the facts it resumes from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use vmstream_api::v1alpha1::{
    BootSource, Guest, LiveImage, LiveImagePhase, MemoryBackend, VMClone, VMClonePhase, VMNode,
};
use vmstream_api::{condition, set_condition};
use vmstream_vmm::guests::{FillSpec, GuestProgram};
use vmstream_vmm::image::LiveImage as ImageFiles;

use crate::heartbeat::FIELD_MANAGER;
use crate::node_status::SharedReport;
use crate::page_service::PageService;
use crate::placed::PlacedObjects;
use crate::supervisor::{SupervisorError, VmLaunch, VmSupervisor};
use crate::vm_process::chain;
use crate::vm_protocol::{CaptureSummary, CloneBackend, Reply, Request, StartSpec, VmPhase};
use crate::vm_record::{VmOwner, VmRecord, dir_size, owner_id};

/// Why a remote clone cannot start yet (said in its status message).
#[derive(Debug)]
struct RemoteWait(String);

/// Figures of a local image, kept next to its files.
pub const CAPTURE_FILE: &str = "vmstream-capture.json";

/// What the daemon knows locally about one placed LiveImage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageFacts {
    /// The complete image on disk, with its figures.
    pub local: Option<CaptureSummary>,
    /// Phase of the image's source VM process, if one runs.
    pub source_vm: Option<VmPhase>,
    /// Work on this object is in flight.
    pub busy: bool,
    /// Local clone VMs started from this image.
    pub clones_using: usize,
    /// For a `fromClone` image: phase of the source clone's VM on this
    /// node, if it runs here.
    pub source_clone_vm: Option<VmPhase>,
}

/// What to do about a placed LiveImage.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageAction {
    Nothing,
    /// Boot, wait for readiness, capture, stop the source, report Ready.
    Build,
    /// Capture the running source VMClone (it keeps running), report Ready.
    CaptureClone,
    /// The image is on disk but its status does not say Ready.
    ReportReady(CaptureSummary),
    /// A source VM is left over (e.g. from a crash between capture and stop).
    StopSource,
    /// Remove the local files of a deleted image.
    RemoveLocal,
    Fail(String),
}

/// Decides about a placed LiveImage.
pub fn image_action(image: &LiveImage, facts: &ImageFacts) -> ImageAction {
    if facts.busy {
        return ImageAction::Nothing;
    }
    if image.meta().deletion_timestamp.is_some() {
        return if facts.source_vm.is_some() {
            ImageAction::StopSource
        } else if facts.local.is_some() && facts.clones_using == 0 {
            ImageAction::RemoveLocal
        } else {
            ImageAction::Nothing
        };
    }
    let phase = image.phase();
    if phase == LiveImagePhase::Failed {
        return ImageAction::Nothing;
    }
    if let Some(local) = &facts.local {
        if facts.source_vm.is_some() {
            return ImageAction::StopSource;
        }
        return if phase == LiveImagePhase::Ready {
            ImageAction::Nothing
        } else {
            ImageAction::ReportReady(local.clone())
        };
    }
    if phase == LiveImagePhase::Ready {
        return ImageAction::Fail("the image's files are missing on its node".into());
    }
    if let Some(source) = &image.spec.source.from_clone {
        return match &facts.source_clone_vm {
            Some(VmPhase::Running | VmPhase::Paused) => ImageAction::CaptureClone,
            Some(VmPhase::Warm | VmPhase::Starting) => ImageAction::Nothing,
            Some(other) => ImageAction::Fail(format!(
                "the VM of VMClone {} is {other:?}, not running",
                source.vm_clone
            )),
            None => ImageAction::Fail(format!(
                "VMClone {} has no VM on this node",
                source.vm_clone
            )),
        };
    }
    ImageAction::Build
}

/// What the daemon knows locally about one placed VMClone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CloneFacts {
    /// Phase of the clone's VM process, if one runs.
    pub vm: Option<VmPhase>,
    /// The clone's image is on this node (complete), here.
    pub image_dir: Option<PathBuf>,
    /// This node can stream images held by other nodes (its page service
    /// runs).
    pub can_stream: bool,
    pub busy: bool,
}

/// What to do about a placed VMClone.
#[derive(Debug, Clone, PartialEq)]
pub enum CloneAction {
    Nothing,
    Start {
        image_dir: PathBuf,
    },
    /// The image is not here: stream it from the nodes that hold it.
    StartRemote,
    /// The VM runs but the status does not say Running.
    ReportRunning,
    /// Stop the VM (the clone is being deleted), then report Stopped.
    Stop,
    /// No VM, being deleted: report Stopped so the finalizer is released.
    ReportStopped,
    /// Cannot start yet: say why in the status message.
    Wait(String),
    Fail(String),
}

/// Decides about a placed VMClone.
pub fn clone_action(clone: &VMClone, facts: &CloneFacts) -> CloneAction {
    if facts.busy {
        return CloneAction::Nothing;
    }
    let phase = clone.phase();
    if clone.meta().deletion_timestamp.is_some() {
        return match (&facts.vm, phase) {
            (Some(_), _) => CloneAction::Stop,
            (None, VMClonePhase::Stopped) => CloneAction::Nothing,
            (None, _) => CloneAction::ReportStopped,
        };
    }
    match (&facts.vm, phase) {
        (Some(VmPhase::Failed), VMClonePhase::Failed) => CloneAction::Nothing,
        (Some(VmPhase::Failed), _) => CloneAction::Fail("the clone's VM failed".into()),
        (Some(VmPhase::Running | VmPhase::Paused), VMClonePhase::Running) => CloneAction::Nothing,
        (Some(VmPhase::Running | VmPhase::Paused), _) => CloneAction::ReportRunning,
        (Some(_), _) => CloneAction::Nothing,
        (None, p) if p.is_terminal() || p == VMClonePhase::Migrating => CloneAction::Nothing,
        (None, VMClonePhase::Running | VMClonePhase::Stopping) => {
            CloneAction::Fail("the clone's VM process is gone".into())
        }
        (None, _) => match &facts.image_dir {
            Some(dir) => CloneAction::Start {
                image_dir: dir.clone(),
            },
            None if facts.can_stream => CloneAction::StartRemote,
            None => CloneAction::Wait(format!(
                "LiveImage {} is not on this node",
                clone.spec.live_image
            )),
        },
    }
}

/// How long a remote clone start keeps trying while the image's holders
/// answer `UnknownImage` (the LiveImage was reported Ready but its home does
/// not serve it yet, or a caching node dropped it) before the clone fails.
pub const UNKNOWN_IMAGE_PATIENCE: Duration = Duration::from_secs(30);
/// First pause before a retry of a remote start; it doubles per attempt.
const REMOTE_RETRY_FIRST: Duration = Duration::from_millis(250);
/// Longest pause between retries of a remote start.
const REMOTE_RETRY_MOST: Duration = Duration::from_secs(4);

/// What to do after relaying a remote image failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteRetry {
    /// Try again after this pause.
    After(Duration),
    /// The clone's start fails with the error.
    GiveUp,
}

/// Decides about a failed relay of a remote image (pure): only a refusal
/// naming the image unknown is retried, with a pause doubling from 250 ms
/// up to 4 s (`attempt` 0 is the first failure), while less than
/// [`UNKNOWN_IMAGE_PATIENCE`] has passed since the first attempt (`waited`);
/// the last pause ends at the patience. Any other failure gives up at once.
pub fn remote_retry(unknown_image: bool, attempt: u32, waited: Duration) -> RemoteRetry {
    if !unknown_image || waited >= UNKNOWN_IMAGE_PATIENCE {
        return RemoteRetry::GiveUp;
    }
    let pause = REMOTE_RETRY_FIRST
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(REMOTE_RETRY_MOST)
        .min(UNKNOWN_IMAGE_PATIENCE - waited);
    RemoteRetry::After(pause)
}

/// Whether `error` (or one of its sources) is a page server's refusal
/// because it does not serve the image (`UnknownImage`).
pub fn refused_as_unknown_image(error: &(dyn std::error::Error + 'static)) -> bool {
    use vmstream_pagestream::client::{ConnectError, RequestError};
    use vmstream_pagestream::direct::DirectError;
    use vmstream_pagestream::wire::ReasonCode;
    let mut next = Some(error);
    while let Some(e) = next {
        let reason = if let Some(ConnectError::Rejected { reason, .. }) = e.downcast_ref() {
            Some(reason)
        } else if let Some(DirectError::Refused { reason, .. }) = e.downcast_ref() {
            Some(reason)
        } else if let Some(RequestError::Refused { reason, .. }) = e.downcast_ref() {
            Some(reason)
        } else {
            None
        };
        if reason.is_some_and(|r| r.code == ReasonCode::UnknownImage) {
            return true;
        }
        next = e.source();
    }
    false
}

/// VMs owned by a VMClone or LiveImage that is not among `placed` (keys
/// `kind/namespace/name` of the objects placed on this node): their owner
/// may be gone. Returns (VM id, owner).
pub fn unplaced_vms(vms: &[VmRecord], placed: &BTreeSet<String>) -> Vec<(String, VmOwner)> {
    vms.iter()
        .filter_map(|r| {
            let owner = r.owner.as_ref()?;
            let placed_here = placed.contains(&key(&owner.kind, &owner.namespace, &owner.name));
            let owned = matches!(owner.kind.as_str(), "VMClone" | "LiveImage");
            (owned && !placed_here).then(|| (r.id.clone(), owner.clone()))
        })
        .collect()
}

/// The vmm fill of an API fill: the API's random and duplicate shares are
/// kept; everything else is zero (zero pages and unfilled pages are alike).
pub fn fill_spec(fill: &vmstream_api::v1alpha1::MemoryFill) -> FillSpec {
    let random = fill.random_percent.min(100);
    let duplicate = fill.duplicate_percent.min(100 - random);
    FillSpec {
        zero_percent: (100 - random - duplicate) as u8,
        duplicate_percent: duplicate as u8,
        templates: 16,
        seed: fill.seed,
    }
}

fn guest_program(guest: Guest) -> GuestProgram {
    match guest {
        Guest::Counter => GuestProgram::Counter,
        Guest::Memory => GuestProgram::Memory,
        Guest::Request => GuestProgram::Request,
    }
}

/// The boot start spec of a LiveImage's source.
pub fn boot_spec(boot: &BootSource) -> StartSpec {
    StartSpec::Boot {
        guest: guest_program(boot.guest),
        fill: boot.fill.as_ref().map(fill_spec),
        params: if boot.guest == Guest::Counter {
            // Counter guests report progress every 4096 iterations.
            vec![4095]
        } else {
            Vec::new()
        },
        ready_timeout_ms: u64::from(boot.readiness.timeout_seconds) * 1000,
    }
}

/// `<state>/images/<ns>/<name>`.
pub fn image_dir(state_dir: &Path, namespace: &str, name: &str) -> PathBuf {
    state_dir.join("images").join(namespace).join(name)
}

/// The figures of a complete local image, or `None` when there is none.
pub fn local_image(dir: &Path) -> Option<CaptureSummary> {
    let files = ImageFiles::open(dir).ok()?;
    if let Ok(text) = std::fs::read(dir.join(CAPTURE_FILE))
        && let Ok(summary) = serde_json::from_slice::<CaptureSummary>(&text)
    {
        return Some(summary);
    }
    Some(CaptureSummary {
        dir: dir.to_path_buf(),
        memory_bytes: files.state().memory_size,
        pages: files.pages().pages() as u64,
        nonzero_pages: files.pages().nonzero_pages() as u64,
        size_bytes: dir_size(dir).unwrap_or(0),
        capture_ms: 0.0,
        source_pause_ms: 0.0,
    })
}

/// `namespace/name` of every complete image under `<state>/images`.
pub fn local_images(state_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(namespaces) = std::fs::read_dir(state_dir.join("images")) else {
        return out;
    };
    for ns in namespaces.flatten() {
        let Ok(names) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for name in names.flatten() {
            if name.path().join(vmstream_vmm::image::STATE_FILE).is_file() {
                out.push(format!(
                    "{}/{}",
                    ns.file_name().to_string_lossy(),
                    name.file_name().to_string_lossy()
                ));
            }
        }
    }
    out.sort();
    out
}

/// Errors carrying out an action.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("writing the status of {kind} {namespace}/{name}")]
    Status {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(transparent)]
    Supervisor(Box<SupervisorError>),
    #[error("{0}")]
    Local(String),
}

impl From<SupervisorError> for ActionError {
    fn from(e: SupervisorError) -> Self {
        Self::Supervisor(Box::new(e))
    }
}

/// Shared state of the sync loop.
pub struct NodeActions {
    pub client: kube::Client,
    pub node: String,
    pub state_dir: PathBuf,
    pub supervisor: Arc<VmSupervisor>,
    pub placed: PlacedObjects,
    pub report: SharedReport,
    busy: Mutex<BTreeSet<String>>,
    /// The last phase this daemon wrote per VMClone (key → uid, phase,
    /// when), so a report is not repeated while the watch still shows the
    /// object as it was before the write.
    reported: Mutex<BTreeMap<String, (String, VMClonePhase, Instant)>>,
    recorder: Recorder,
    page_service: std::sync::OnceLock<Arc<PageService>>,
}

/// A sync whose VM listing takes longer than this says so in the log.
const SLOW_LISTING: Duration = Duration::from_millis(50);

/// A clone start taking longer than this is reported Starting meanwhile.
const STARTING_REPORT_AFTER: Duration = Duration::from_millis(500);

/// How long a phase this daemon wrote stands in for a lagging watch.
const REPORT_MEMORY: Duration = Duration::from_secs(10);

fn key(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind}/{ns}/{name}")
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
            state_dir,
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

    fn is_busy(&self, key: &str) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }

    /// Marks `key` busy; false when it already was.
    fn claim(&self, key: &str) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string())
    }

    /// True when `action` only reports a phase this daemon wrote for this
    /// very object moments ago (the watch has not delivered the write yet).
    fn already_reported(&self, key: &str, clone: &VMClone, action: &CloneAction) -> bool {
        let phase = match action {
            CloneAction::ReportRunning => VMClonePhase::Running,
            CloneAction::ReportStopped => VMClonePhase::Stopped,
            _ => return false,
        };
        let uid = clone.uid().unwrap_or_default();
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        reported.retain(|_, (_, _, at)| at.elapsed() < REPORT_MEMORY);
        reported
            .get(key)
            .is_some_and(|(u, p, _)| *u == uid && *p == phase)
    }

    fn remember_report(&self, clone: &VMClone, phase: VMClonePhase) {
        let key = key(
            "VMClone",
            &clone.namespace().unwrap_or_default(),
            &clone.name_any(),
        );
        self.reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key,
                (clone.uid().unwrap_or_default(), phase, Instant::now()),
            );
    }

    fn release(&self, key: &str) {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
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
        let placed: BTreeSet<String> = self
            .placed
            .clones
            .state()
            .iter()
            .map(|c| key("VMClone", &c.namespace().unwrap_or_default(), &c.name_any()))
            .chain(self.placed.images.state().iter().map(|i| {
                key(
                    "LiveImage",
                    &i.namespace().unwrap_or_default(),
                    &i.name_any(),
                )
            }))
            .collect();
        for (id, owner) in unplaced_vms(vms, &placed) {
            let k = key(&owner.kind, &owner.namespace, &owner.name);
            if self.is_busy(&k) {
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
            if !self.claim(&k) {
                continue;
            }
            let why = format!(
                "stopping VM {id}: its {} {}/{} no longer exists",
                owner.kind, owner.namespace, owner.name
            );
            tracing::warn!(vm = %id, "{why}");
            let this = Arc::clone(self);
            let stopped = tokio::task::spawn_blocking(move || {
                let result = this.supervisor.stop(&id);
                this.release(&k);
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

    async fn owner_exists(&self, owner: &VmOwner) -> Result<bool, kube::Error> {
        let ns = &owner.namespace;
        Ok(match owner.kind.as_str() {
            "VMClone" => Api::<VMClone>::namespaced(self.client.clone(), ns)
                .get_opt(&owner.name)
                .await?
                .is_some(),
            "LiveImage" => Api::<LiveImage>::namespaced(self.client.clone(), ns)
                .get_opt(&owner.name)
                .await?
                .is_some(),
            _ => true,
        })
    }

    /// An Event about this node (on its VMNode) concerning `related` (so
    /// events about different objects are not folded into one series); a
    /// failure is only logged.
    async fn node_event(&self, reason: &str, note: String, related: &VmOwner) {
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
                kind: Some(related.kind.clone()),
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
            let (Some(ns), name) = (image.namespace(), image.name_any()) else {
                continue;
            };
            let owner = VmOwner {
                kind: "LiveImage".into(),
                namespace: ns.clone(),
                name: name.clone(),
            };
            let k = key("LiveImage", &ns, &name);
            let dir = image_dir(&self.state_dir, &ns, &name);
            let clones_using = clones
                .iter()
                .filter(|c| c.namespace().as_deref() == Some(&ns) && c.spec.live_image == name)
                .filter(|c| {
                    phases.contains_key(&owner_id(&VmOwner {
                        kind: "VMClone".into(),
                        namespace: ns.clone(),
                        name: c.name_any(),
                    }))
                })
                .count();
            let source_clone_vm = image.spec.source.from_clone.as_ref().and_then(|c| {
                phases
                    .get(&owner_id(&VmOwner {
                        kind: "VMClone".into(),
                        namespace: ns.clone(),
                        name: c.vm_clone.clone(),
                    }))
                    .cloned()
            });
            let facts = ImageFacts {
                local: local_image(&dir),
                source_vm: phases.get(&owner_id(&owner)).cloned(),
                busy: self.is_busy(&k),
                clones_using,
                source_clone_vm,
            };
            let action = image_action(&image, &facts);
            if action == ImageAction::Nothing || !self.claim(&k) {
                continue;
            }
            tracing::info!(image = %k, ?action, "acting on LiveImage");
            let this = Arc::clone(self);
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let result = handle
                    .block_on(async { this.act_on_image(&image, &owner, &dir, action).await });
                if let Err(e) = result {
                    tracing::warn!(image = %k, error = %chain(&e), "LiveImage action failed");
                }
                this.release(&k);
            });
        }
    }

    fn sync_clones(self: &Arc<Self>, phases: &BTreeMap<String, VmPhase>) {
        for clone in self.placed.clones.state() {
            let (Some(ns), name) = (clone.namespace(), clone.name_any()) else {
                continue;
            };
            let owner = VmOwner {
                kind: "VMClone".into(),
                namespace: ns.clone(),
                name: name.clone(),
            };
            let k = key("VMClone", &ns, &name);
            let dir = image_dir(&self.state_dir, &ns, &clone.spec.live_image);
            let facts = CloneFacts {
                vm: phases.get(&owner_id(&owner)).cloned(),
                image_dir: dir
                    .join(vmstream_vmm::image::STATE_FILE)
                    .is_file()
                    .then_some(dir),
                can_stream: self.page_service.get().is_some(),
                busy: self.is_busy(&k),
            };
            let action = clone_action(&clone, &facts);
            if action == CloneAction::Nothing || self.already_reported(&k, &clone, &action) {
                continue;
            }
            if let CloneAction::Wait(message) = &action
                && clone.status.as_ref().and_then(|s| s.message.as_deref()) == Some(message)
            {
                continue;
            }
            if !self.claim(&k) {
                continue;
            }
            tracing::info!(clone = %k, ?action, "acting on VMClone");
            let this = Arc::clone(self);
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let result =
                    handle.block_on(async { this.act_on_clone(&clone, &owner, action).await });
                if let Err(e) = result {
                    tracing::warn!(clone = %k, error = %chain(&e), "VMClone action failed");
                }
                this.release(&k);
            });
        }
    }

    async fn patch_image(
        &self,
        image: &LiveImage,
        phase: LiveImagePhase,
        status: serde_json::Value,
    ) -> Result<(), ActionError> {
        let conditions = image.status.as_ref().map(|s| s.conditions.clone());
        let ready = ("Ready", phase == LiveImagePhase::Ready, phase.as_str());
        self.patch_phase("LiveImage", image, conditions, ready, json!(phase), status)
            .await
    }

    async fn patch_clone(
        &self,
        clone: &VMClone,
        phase: VMClonePhase,
        status: serde_json::Value,
    ) -> Result<(), ActionError> {
        let conditions = clone.status.as_ref().map(|s| s.conditions.clone());
        let running = ("Running", phase == VMClonePhase::Running, phase.as_str());
        self.patch_phase("VMClone", clone, conditions, running, json!(phase), status)
            .await?;
        self.remember_report(clone, phase);
        Ok(())
    }

    /// Merge-patches `obj`'s status with `status` plus the phase, this node,
    /// and the condition `(type, true?, reason)` (its message is the status's
    /// `message`), keeping the other conditions.
    async fn patch_phase<K>(
        &self,
        kind: &'static str,
        obj: &K,
        conditions: Option<Vec<Condition>>,
        (condition_type, is_true, reason): (&str, bool, &str),
        phase: serde_json::Value,
        mut status: serde_json::Value,
    ) -> Result<(), ActionError>
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let ns = obj.namespace().unwrap_or_default();
        let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
        let mut conditions = conditions.unwrap_or_default();
        let message = status["message"].as_str().unwrap_or("").to_string();
        set_condition(
            &mut conditions,
            condition(
                condition_type,
                is_true,
                reason,
                &message,
                obj.meta().generation,
            ),
        );
        status["phase"] = phase;
        status["node"] = json!(self.node);
        status["conditions"] = json!(conditions);
        api.patch_status(
            &obj.name_any(),
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .map_err(|source| ActionError::Status {
            kind,
            namespace: ns,
            name: obj.name_any(),
            source: Box::new(source),
        })?;
        Ok(())
    }

    async fn act_on_image(
        &self,
        image: &LiveImage,
        owner: &VmOwner,
        dir: &Path,
        action: ImageAction,
    ) -> Result<(), ActionError> {
        let id = owner_id(owner);
        match action {
            ImageAction::Nothing => Ok(()),
            ImageAction::StopSource => Ok(self.supervisor.stop(&id)?),
            ImageAction::RemoveLocal => std::fs::remove_dir_all(dir)
                .map_err(|e| ActionError::Local(format!("removing {}: {e}", dir.display()))),
            ImageAction::Fail(message) => {
                self.patch_image(image, LiveImagePhase::Failed, json!({ "message": message }))
                    .await
            }
            ImageAction::ReportReady(summary) => self.report_image_ready(image, &summary).await,
            ImageAction::CaptureClone => match self.capture_clone(image, dir).await {
                Ok(summary) => self.report_image_ready(image, &summary).await,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(dir.with_extension("partial"));
                    self.patch_image(
                        image,
                        LiveImagePhase::Failed,
                        json!({ "message": chain(&e) }),
                    )
                    .await?;
                    Err(e)
                }
            },
            ImageAction::Build => match self.build_image(image, owner, dir).await {
                Ok(summary) => self.report_image_ready(image, &summary).await,
                Err(e) => {
                    let message = chain(&e);
                    if self.supervisor.get(&id).is_some() {
                        let _ = self.supervisor.stop(&id);
                    }
                    let _ = std::fs::remove_dir_all(dir.with_extension("partial"));
                    self.patch_image(image, LiveImagePhase::Failed, json!({ "message": message }))
                        .await?;
                    Err(e)
                }
            },
        }
    }

    /// Serves every complete local image to other nodes and lists them in
    /// the node report. Called on every interval and before an image is
    /// reported Ready, so no node streams an image its home does not serve.
    fn serve_local_images(&self) {
        let images = local_images(&self.state_dir);
        if let Some(service) = self.page_service.get() {
            service.serve_local_images(&images);
        }
        if let Ok(mut report) = self.report.write() {
            report.images = images;
        }
    }

    async fn report_image_ready(
        &self,
        image: &LiveImage,
        summary: &CaptureSummary,
    ) -> Result<(), ActionError> {
        self.serve_local_images();
        self.patch_image(
            image,
            LiveImagePhase::Ready,
            json!({
                "message": "",
                "sizeBytes": summary.size_bytes,
                "memoryBytes": summary.memory_bytes,
                "nonZeroPages": summary.nonzero_pages,
                "captureTimeMs": summary.capture_ms,
                "sourcePauseMs": summary.source_pause_ms,
                "observedGeneration": image.meta().generation,
            }),
        )
        .await
    }

    /// Boots the source, waits for READY, captures, stops the source.
    async fn build_image(
        &self,
        image: &LiveImage,
        owner: &VmOwner,
        dir: &Path,
    ) -> Result<CaptureSummary, ActionError> {
        let boot = image
            .spec
            .source
            .boot
            .as_ref()
            .ok_or_else(|| ActionError::Local("the image has no boot source".into()))?;
        let id = owner_id(owner);
        self.patch_image(
            image,
            LiveImagePhase::Booting,
            json!({ "message": format!("booting the {} guest", boot.guest) }),
        )
        .await?;
        if self.supervisor.get(&id).is_none() {
            self.supervisor.launch(&VmLaunch {
                id: id.clone(),
                owner: Some(owner.clone()),
                vcpus: u8::try_from(boot.vcpus).unwrap_or(u8::MAX),
                memory_bytes: u64::from(boot.memory_mib) << 20,
                start: Some(boot_spec(boot)),
                prepare_lazy: false,
                preload_image: None,
            })?;
        }
        let timeout_ms = u64::from(boot.readiness.timeout_seconds) * 1000;
        self.supervisor
            .call(&id, &Request::WaitRunning { timeout_ms })?;
        self.patch_image(
            image,
            LiveImagePhase::Capturing,
            json!({ "message": "capturing" }),
        )
        .await?;
        let summary = self.capture_into(&id, dir)?;
        self.supervisor.stop(&id)?;
        Ok(summary)
    }

    /// Captures VM `id` into `dir`: into `<dir>.partial` first, with the
    /// figures file, then renamed, so a directory at the final place is
    /// always a complete image. The VM keeps running.
    fn capture_into(&self, id: &str, dir: &Path) -> Result<CaptureSummary, ActionError> {
        let partial = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| ActionError::Local(format!("creating {}: {e}", parent.display())))?;
        }
        let reply = self.supervisor.call(
            id,
            &Request::Capture {
                dir: partial.clone(),
            },
        )?;
        let Reply::Captured(mut summary) = reply else {
            return Err(ActionError::Local(format!("capture answered {reply:?}")));
        };
        summary.dir = dir.to_path_buf();
        std::fs::write(
            partial.join(CAPTURE_FILE),
            serde_json::to_vec_pretty(&summary).expect("summary serializes"),
        )
        .map_err(|e| ActionError::Local(format!("writing {CAPTURE_FILE}: {e}")))?;
        std::fs::rename(&partial, dir).map_err(|e| {
            ActionError::Local(format!(
                "renaming {} to {}: {e}",
                partial.display(),
                dir.display()
            ))
        })?;
        Ok(summary)
    }

    /// A `fromClone` image: captures the source clone's running VM on this
    /// node (it pauses for the capture and runs on).
    async fn capture_clone(
        &self,
        image: &LiveImage,
        dir: &Path,
    ) -> Result<CaptureSummary, ActionError> {
        let source = image
            .spec
            .source
            .from_clone
            .as_ref()
            .ok_or_else(|| ActionError::Local("the image has no fromClone source".into()))?;
        let id = owner_id(&VmOwner {
            kind: "VMClone".into(),
            namespace: image.namespace().unwrap_or_default(),
            name: source.vm_clone.clone(),
        });
        self.patch_image(
            image,
            LiveImagePhase::Capturing,
            json!({ "message": format!("capturing VMClone {}", source.vm_clone) }),
        )
        .await?;
        let summary = self.capture_into(&id, dir)?;
        tracing::info!(
            image = %image.name_any(),
            clone = %id,
            capture_ms = summary.capture_ms,
            source_pause_ms = summary.source_pause_ms,
            size_bytes = summary.size_bytes,
            "captured a running clone"
        );
        Ok(summary)
    }

    async fn act_on_clone(
        self: &Arc<Self>,
        clone: &VMClone,
        owner: &VmOwner,
        action: CloneAction,
    ) -> Result<(), ActionError> {
        let id = owner_id(owner);
        match action {
            CloneAction::Nothing => Ok(()),
            CloneAction::Wait(message) => {
                self.patch_clone(clone, clone.phase(), json!({ "message": message }))
                    .await
            }
            CloneAction::Fail(message) => {
                self.patch_clone(clone, VMClonePhase::Failed, json!({ "message": message }))
                    .await
            }
            CloneAction::Stop => {
                self.supervisor.stop(&id)?;
                self.patch_clone(
                    clone,
                    VMClonePhase::Stopped,
                    json!({ "message": "VM stopped" }),
                )
                .await
            }
            CloneAction::ReportStopped => {
                self.patch_clone(clone, VMClonePhase::Stopped, json!({ "message": "no VM" }))
                    .await
            }
            CloneAction::ReportRunning => self.report_clone_running(clone, &id).await.map(|_| ()),
            CloneAction::StartRemote => {
                let started = match self.remote_holders(clone).await {
                    Ok(holders) => {
                        self.patch_clone(
                            clone,
                            VMClonePhase::Starting,
                            json!({ "message": format!("streaming from {}", holders.join(", ")) }),
                        )
                        .await?;
                        match self.relay_with_retry(clone, &holders).await {
                            Ok(relayed) => self.launch_remote_clone(owner, relayed),
                            Err(e) => Err(e),
                        }
                    }
                    Err(RemoteWait(message)) => {
                        if clone.status.as_ref().and_then(|s| s.message.as_deref())
                            != Some(message.as_str())
                        {
                            self.patch_clone(clone, clone.phase(), json!({ "message": message }))
                                .await?;
                        }
                        return Ok(());
                    }
                };
                match started {
                    Ok(()) => self.report_clone_running(clone, &id).await.map(|_| ()),
                    Err(e) => {
                        if self.supervisor.get(&id).is_some() {
                            let _ = self.supervisor.stop(&id);
                        }
                        self.patch_clone(
                            clone,
                            VMClonePhase::Failed,
                            json!({ "message": chain(&e) }),
                        )
                        .await?;
                        Err(e)
                    }
                }
            }
            CloneAction::Start { image_dir } => {
                let began = Instant::now();
                // Starting is reported only when the start is slow: a clone
                // usually runs within a few hundred milliseconds, and during
                // a burst of starts every write adds to the API server's
                // queue. The report runs on the runtime (this is a blocking
                // thread) and is awaited before the Running report, so the
                // phases never land out of order.
                let (launched_tx, launched_rx) = tokio::sync::oneshot::channel::<()>();
                let starting = {
                    let this = Arc::clone(self);
                    let clone = clone.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = tokio::time::sleep(STARTING_REPORT_AFTER) => {}
                            _ = launched_rx => return Ok(None),
                        }
                        this.patch_clone(
                            &clone,
                            VMClonePhase::Starting,
                            json!({ "message": "starting" }),
                        )
                        .await
                        .map(|()| Some(began.elapsed()))
                    })
                };
                let started = self.start_clone(owner, &image_dir);
                let launched = began.elapsed();
                // Ends the wait (an error: the report is already under way).
                let _ = launched_tx.send(());
                let starting_reported = starting.await.map_err(|e| {
                    ActionError::Local(format!("the Starting report panicked: {e}"))
                })??;
                let starting_patch = starting_reported.unwrap_or_default();
                match started {
                    Ok(()) => {
                        let timing = self.report_clone_running(clone, &id).await?;
                        tracing::info!(
                            clone = %id,
                            launch_ms = ms(launched),
                            starting_reported_ms = ms(starting_patch),
                            stats_ms = ms(timing.stats),
                            running_patch_ms = ms(timing.patch),
                            total_ms = ms(began.elapsed()),
                            "clone running"
                        );
                        Ok(())
                    }
                    Err(e) => {
                        if self.supervisor.get(&id).is_some() {
                            let _ = self.supervisor.stop(&id);
                        }
                        self.patch_clone(
                            clone,
                            VMClonePhase::Failed,
                            json!({ "message": chain(&e) }),
                        )
                        .await?;
                        Err(e)
                    }
                }
            }
        }
    }

    fn start_clone(&self, owner: &VmOwner, image_dir: &Path) -> Result<(), ActionError> {
        let id = owner_id(owner);
        let header = vmstream_vmm::image::StateFile::read(image_dir).map_err(|e| {
            ActionError::Local(format!(
                "reading the image header in {}: {}",
                image_dir.display(),
                chain(&e)
            ))
        })?;
        let backend = match clone_backend(owner, &self.placed) {
            MemoryBackend::Lazy => CloneBackend::Lazy,
            MemoryBackend::CopyOnWrite => CloneBackend::CopyOnWrite,
        };
        self.supervisor.launch(&VmLaunch {
            id: id.clone(),
            owner: Some(owner.clone()),
            vcpus: u8::try_from(header.vcpu_count).unwrap_or(u8::MAX),
            memory_bytes: header.memory_size,
            start: Some(StartSpec::Clone {
                image: image_dir.to_path_buf(),
                backend,
            }),
            prepare_lazy: backend == CloneBackend::Lazy,
            preload_image: None,
        })?;
        self.supervisor
            .call(&id, &Request::WaitRunning { timeout_ms: 60_000 })?;
        Ok(())
    }

    /// Where the clone's image can be streamed from: its home node's page
    /// server first, then nodes listing it as cached. Not found yet (image
    /// not Ready, no address) is a reason to wait, not a failure.
    async fn remote_holders(&self, clone: &VMClone) -> Result<Vec<String>, RemoteWait> {
        let ns = clone.namespace().unwrap_or_default();
        let name = &clone.spec.live_image;
        let images: Api<LiveImage> = Api::namespaced(self.client.clone(), &ns);
        let image = images
            .get(name)
            .await
            .map_err(|e| RemoteWait(format!("LiveImage {name} not readable: {e}")))?;
        if image.phase() != LiveImagePhase::Ready {
            return Err(RemoteWait(format!("LiveImage {name} is not Ready")));
        }
        let home = image.status.as_ref().and_then(|s| s.node.clone());
        let nodes: Api<VMNode> = Api::all(self.client.clone());
        let nodes = nodes
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| RemoteWait(format!("VMNodes not readable: {e}")))?;
        let facts: Vec<(String, Option<String>, Vec<String>)> = nodes
            .items
            .iter()
            .map(|n| {
                let status = n.status.clone().unwrap_or_default();
                (n.name_any(), status.address, status.images)
            })
            .collect();
        let holders = crate::page_service::holders_of(
            &crate::page_service::image_id(&ns, name),
            home.as_deref(),
            &self.node,
            &facts,
        );
        if holders.is_empty() {
            return Err(RemoteWait(format!(
                "LiveImage {name} is not on this node and no node serving it has an address"
            )));
        }
        Ok(holders)
    }

    /// Relays the clone's remote image (`PageService::relay_remote`),
    /// retrying while its holders answer `UnknownImage` (decided by
    /// [`remote_retry`]); the first retry writes the reason into the
    /// clone's status message.
    async fn relay_with_retry(
        &self,
        clone: &VMClone,
        holders: &[String],
    ) -> Result<crate::page_service::RelayedImage, ActionError> {
        let service = self
            .page_service
            .get()
            .ok_or_else(|| ActionError::Local("no page service on this node".into()))?;
        let ns = clone.namespace().unwrap_or_default();
        let name = &clone.spec.live_image;
        let began = Instant::now();
        let mut attempt = 0u32;
        loop {
            let error = match service.relay_remote(&ns, name, holders) {
                Ok(relayed) => return Ok(relayed),
                Err(e) => e,
            };
            let unknown = refused_as_unknown_image(&error);
            match remote_retry(unknown, attempt, began.elapsed()) {
                RemoteRetry::GiveUp if unknown => {
                    return Err(ActionError::Local(format!(
                        "no holder of LiveImage {name} ({}) served it within {}s: {}",
                        holders.join(", "),
                        UNKNOWN_IMAGE_PATIENCE.as_secs(),
                        chain(&error)
                    )));
                }
                RemoteRetry::GiveUp => return Err(ActionError::Local(chain(&error))),
                RemoteRetry::After(pause) => {
                    tracing::info!(clone = %clone.name_any(), attempt, pause_ms = ms(pause), error = %chain(&error), "image not served yet; retrying");
                    if attempt == 0 {
                        let message = format!(
                            "LiveImage {name} is not served by {} yet; retrying for up to {}s",
                            holders.join(", "),
                            UNKNOWN_IMAGE_PATIENCE.as_secs()
                        );
                        self.patch_clone(
                            clone,
                            VMClonePhase::Starting,
                            json!({ "message": message }),
                        )
                        .await?;
                    }
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Launches the clone's VM process on a relayed remote image and waits
    /// until it runs.
    fn launch_remote_clone(
        &self,
        owner: &VmOwner,
        relayed: crate::page_service::RelayedImage,
    ) -> Result<(), ActionError> {
        let header = vmstream_vmm::image::StateFile::read(&relayed.state_dir).map_err(|e| {
            ActionError::Local(format!(
                "reading the fetched state file in {}: {}",
                relayed.state_dir.display(),
                chain(&e)
            ))
        })?;
        let id = owner_id(owner);
        self.supervisor.launch(&VmLaunch {
            id: id.clone(),
            owner: Some(owner.clone()),
            vcpus: u8::try_from(header.vcpu_count).unwrap_or(u8::MAX),
            memory_bytes: header.memory_size,
            start: Some(StartSpec::RemoteClone {
                state_dir: relayed.state_dir,
                image_id: relayed.image_id,
                relay: relayed.relay,
                token_file: relayed.token_file,
            }),
            prepare_lazy: true,
            preload_image: None,
        })?;
        self.supervisor
            .call(&id, &Request::WaitRunning { timeout_ms: 60_000 })?;
        Ok(())
    }

    async fn report_clone_running(
        &self,
        clone: &VMClone,
        id: &str,
    ) -> Result<ReportTiming, ActionError> {
        let began = Instant::now();
        let Reply::Stats(stats) = self.supervisor.call(id, &Request::Stats)? else {
            return Err(ActionError::Local("stats answered something else".into()));
        };
        let stats_took = began.elapsed();
        let start = stats.start.clone().unwrap_or_default();
        self.patch_clone(
            clone,
            VMClonePhase::Running,
            json!({
                "message": "",
                "startLatencyMs": start.first_exit_ms.unwrap_or(start.start_ms),
                "residentBytes": stats.memory.guest_resident,
                "sharedBytes": stats.memory.guest_shared,
                "privateBytes": stats.memory.guest_private,
                "faultsServed": stats.faults.faults,
                "startedAt": Time(Timestamp::now()),
                "observedGeneration": clone.meta().generation,
            }),
        )
        .await?;
        Ok(ReportTiming {
            stats: stats_took,
            patch: began.elapsed() - stats_took,
        })
    }
}

/// Where the Running report of a clone spent its time.
struct ReportTiming {
    stats: Duration,
    patch: Duration,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

fn clone_backend(owner: &VmOwner, placed: &PlacedObjects) -> MemoryBackend {
    placed
        .clones
        .state()
        .iter()
        .find(|c| c.namespace().as_deref() == Some(&owner.namespace) && c.name_any() == owner.name)
        .map(|c| c.spec.memory_backend)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmstream_api::v1alpha1::{LiveImageStatus, VMCloneStatus};

    fn image(boot: bool, phase: Option<LiveImagePhase>, deleting: bool) -> LiveImage {
        let mut value = json!({
            "apiVersion": "vmstream.io/v1alpha1", "kind": "LiveImage",
            "metadata": {"name": "img", "namespace": "ns"},
            "spec": {"source": if boot {
                json!({"boot": {"guest": "Request", "memoryMiB": 16}})
            } else {
                json!({"fromClone": {"vmClone": "c"}})
            }}
        });
        if deleting {
            value["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        let mut image: LiveImage = serde_json::from_value(value).unwrap();
        image.status = phase.map(|phase| LiveImageStatus {
            phase: Some(phase),
            ..LiveImageStatus::default()
        });
        image
    }

    fn summary() -> CaptureSummary {
        CaptureSummary {
            memory_bytes: 16 << 20,
            ..CaptureSummary::default()
        }
    }

    #[test]
    fn images_are_built_once_and_reported() {
        let none = ImageFacts::default();
        assert_eq!(
            image_action(&image(true, None, false), &none),
            ImageAction::Build
        );
        assert_eq!(
            image_action(&image(true, Some(LiveImagePhase::Scheduled), false), &none),
            ImageAction::Build
        );
        let busy = ImageFacts {
            busy: true,
            ..ImageFacts::default()
        };
        assert_eq!(
            image_action(&image(true, None, false), &busy),
            ImageAction::Nothing
        );
        let local = ImageFacts {
            local: Some(summary()),
            ..ImageFacts::default()
        };
        assert_eq!(
            image_action(&image(true, Some(LiveImagePhase::Capturing), false), &local),
            ImageAction::ReportReady(summary())
        );
        assert_eq!(
            image_action(&image(true, Some(LiveImagePhase::Ready), false), &local),
            ImageAction::Nothing
        );
        let leftover = ImageFacts {
            local: Some(summary()),
            source_vm: Some(VmPhase::Running),
            ..ImageFacts::default()
        };
        assert_eq!(
            image_action(
                &image(true, Some(LiveImagePhase::Capturing), false),
                &leftover
            ),
            ImageAction::StopSource
        );
        assert!(matches!(
            image_action(&image(true, Some(LiveImagePhase::Ready), false), &none),
            ImageAction::Fail(_)
        ));
        assert_eq!(
            image_action(&image(true, Some(LiveImagePhase::Failed), false), &none),
            ImageAction::Nothing
        );
    }

    #[test]
    fn images_from_clones_capture_the_running_clone_here() {
        let running = ImageFacts {
            source_clone_vm: Some(VmPhase::Running),
            ..ImageFacts::default()
        };
        let scheduled = image(false, Some(LiveImagePhase::Scheduled), false);
        assert_eq!(
            image_action(&scheduled, &running),
            ImageAction::CaptureClone
        );
        // A daemon restarted mid-capture captures again.
        let capturing = image(false, Some(LiveImagePhase::Capturing), false);
        assert_eq!(
            image_action(&capturing, &running),
            ImageAction::CaptureClone
        );
        let starting = ImageFacts {
            source_clone_vm: Some(VmPhase::Starting),
            ..ImageFacts::default()
        };
        assert_eq!(image_action(&scheduled, &starting), ImageAction::Nothing);
        assert!(matches!(
            image_action(&scheduled, &ImageFacts::default()),
            ImageAction::Fail(m) if m.contains("VMClone c has no VM")
        ));
        let done = ImageFacts {
            local: Some(summary()),
            ..running
        };
        assert_eq!(
            image_action(&capturing, &done),
            ImageAction::ReportReady(summary())
        );
        assert_eq!(
            image_action(&image(false, Some(LiveImagePhase::Ready), false), &done),
            ImageAction::Nothing
        );
    }

    fn record(id: &str, owner: Option<(&str, &str)>) -> VmRecord {
        let mut value = json!({
            "id": id, "pid": 1, "startTicks": 1, "kind": "boot", "vcpus": 1,
            "memoryBytes": 1, "createdAt": "", "socket": "/s"
        });
        if let Some((kind, name)) = owner {
            value["owner"] = json!({"kind": kind, "namespace": "ns", "name": name});
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn vms_whose_owner_is_not_placed_here_are_orphan_candidates() {
        let vms = [
            record("vmc.ns.a", Some(("VMClone", "a"))),
            record("vmc.ns.b", Some(("VMClone", "b"))),
            record("li.ns.img", Some(("LiveImage", "img"))),
            record("li.ns.gone", Some(("LiveImage", "gone"))),
            record("bench", None),
        ];
        let placed: BTreeSet<String> = ["VMClone/ns/a", "LiveImage/ns/img"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let ids: Vec<String> = unplaced_vms(&vms, &placed)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["vmc.ns.b", "li.ns.gone"]);
    }

    #[test]
    fn deleted_images_are_removed_when_no_clone_uses_them() {
        let local = ImageFacts {
            local: Some(summary()),
            ..ImageFacts::default()
        };
        let deleted = image(true, Some(LiveImagePhase::Ready), true);
        assert_eq!(image_action(&deleted, &local), ImageAction::RemoveLocal);
        let used = ImageFacts {
            clones_using: 1,
            ..local
        };
        assert_eq!(image_action(&deleted, &used), ImageAction::Nothing);
    }

    fn clone(phase: Option<VMClonePhase>, deleting: bool) -> VMClone {
        let mut value = json!({
            "apiVersion": "vmstream.io/v1alpha1", "kind": "VMClone",
            "metadata": {"name": "c", "namespace": "ns"},
            "spec": {"liveImage": "img"}
        });
        if deleting {
            value["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        let mut clone: VMClone = serde_json::from_value(value).unwrap();
        clone.status = phase.map(|phase| VMCloneStatus {
            phase: Some(phase),
            ..VMCloneStatus::default()
        });
        clone
    }

    #[test]
    fn clones_start_from_local_images_and_stop_on_deletion() {
        let here = CloneFacts {
            image_dir: Some("/img".into()),
            ..CloneFacts::default()
        };
        assert_eq!(
            clone_action(&clone(Some(VMClonePhase::Scheduled), false), &here),
            CloneAction::Start {
                image_dir: "/img".into()
            }
        );
        assert!(matches!(
            clone_action(&clone(Some(VMClonePhase::Scheduled), false), &CloneFacts::default()),
            CloneAction::Wait(m) if m.contains("img")
        ));
        let running = CloneFacts {
            vm: Some(VmPhase::Running),
            ..here.clone()
        };
        assert_eq!(
            clone_action(&clone(Some(VMClonePhase::Starting), false), &running),
            CloneAction::ReportRunning
        );
        assert_eq!(
            clone_action(&clone(Some(VMClonePhase::Running), false), &running),
            CloneAction::Nothing
        );
        assert!(matches!(
            clone_action(&clone(Some(VMClonePhase::Running), false), &here),
            CloneAction::Fail(_)
        ));
        assert_eq!(
            clone_action(&clone(Some(VMClonePhase::Running), true), &running),
            CloneAction::Stop
        );
        assert_eq!(
            clone_action(&clone(Some(VMClonePhase::Running), true), &here),
            CloneAction::ReportStopped
        );
        assert_eq!(
            clone_action(&clone(Some(VMClonePhase::Stopped), true), &here),
            CloneAction::Nothing
        );
        assert_eq!(
            clone_action(&clone(Some(VMClonePhase::Lost), false), &here),
            CloneAction::Nothing
        );
    }

    #[test]
    fn fill_keeps_random_and_duplicate_shares() {
        let fill = vmstream_api::v1alpha1::MemoryFill {
            seed: 3,
            random_percent: 50,
            zero_percent: 10,
            duplicate_percent: 20,
        };
        let spec = fill_spec(&fill);
        assert_eq!((spec.zero_percent, spec.duplicate_percent), (30, 20));
        assert_eq!(spec.seed, 3);
    }

    #[test]
    fn unknown_image_is_retried_with_backoff_for_a_bounded_time() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(remote_retry(true, 0, ms(0)), RemoteRetry::After(ms(250)));
        assert_eq!(remote_retry(true, 1, ms(250)), RemoteRetry::After(ms(500)));
        assert_eq!(remote_retry(true, 3, s(2)), RemoteRetry::After(s(2)));
        assert_eq!(remote_retry(true, 9, s(10)), RemoteRetry::After(s(4)));
        assert_eq!(remote_retry(true, 40, s(10)), RemoteRetry::After(s(4)));
        // The last pause ends at the patience, then the start fails.
        assert_eq!(remote_retry(true, 12, s(29)), RemoteRetry::After(s(1)));
        assert_eq!(remote_retry(true, 13, s(30)), RemoteRetry::GiveUp);
        // Other failures are not retried here.
        assert_eq!(remote_retry(false, 0, ms(0)), RemoteRetry::GiveUp);
    }

    #[test]
    fn an_unknown_image_refusal_is_found_in_the_error_chain() {
        use crate::page_service::PageServiceError;
        use vmstream_pagestream::client::{ConnectError, RemoteOpenError};
        use vmstream_pagestream::direct::DirectError;
        use vmstream_pagestream::wire::{Reason, ReasonCode};
        let addr: std::net::SocketAddr = "10.0.0.2:7481".parse().unwrap();
        let reason = |code| Reason {
            code,
            text: "this node does not serve image \"ns/img\"".into(),
        };
        let state = PageServiceError::State {
            image: "ns/img".into(),
            source: DirectError::Handshake(ConnectError::Rejected {
                addr,
                reason: reason(ReasonCode::UnknownImage),
            }),
        };
        assert!(refused_as_unknown_image(&state));
        let remote = PageServiceError::Remote {
            image: "ns/img".into(),
            source: RemoteOpenError::Connect(ConnectError::Rejected {
                addr,
                reason: reason(ReasonCode::UnknownImage),
            }),
        };
        assert!(refused_as_unknown_image(&remote));
        let auth = PageServiceError::State {
            image: "ns/img".into(),
            source: DirectError::Handshake(ConnectError::Rejected {
                addr,
                reason: reason(ReasonCode::AuthFailed),
            }),
        };
        assert!(!refused_as_unknown_image(&auth));
        assert!(!refused_as_unknown_image(&PageServiceError::NoHolders(
            "ns/img".into()
        )));
    }
}
