//! The pure decisions of the sync loop: what to do about a placed
//! LiveImage ([`image_action`]) or VMClone ([`clone_action`]) given the
//! local facts, whether a failed remote start is retried
//! ([`remote_retry`]), and which VMs may have lost their owner
//! ([`unplaced_vms`]). No I/O: tested by tables.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use kube::Resource;
use vmstream_api::v1alpha1::{LiveImage, LiveImagePhase, VMClone, VMClonePhase};

use crate::object_key::{ObjectKey, ObjectKind};
use crate::vm_protocol::{CaptureSummary, VmPhase};
use crate::vm_record::VmRecord;

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
    /// Boot a built-in guest, wait for readiness, capture, stop the source,
    /// report Ready.
    Build,
    /// Fetch and verify a Linux guest's artifacts, then as `Build`.
    BuildLinux,
    /// Capture the running source VMClone (it keeps running), report Ready.
    CaptureClone,
    /// The image is on disk but its status does not say Ready.
    ReportReady(CaptureSummary),
    /// A source VM is left over (e.g. from a crash between capture and stop).
    StopSource,
    /// Remove the local files of a deleted image.
    RemoveLocal,
    Fail(ImageFailure),
}

/// Why a placed LiveImage fails without anything being tried.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImageFailure {
    #[error("the image's files are missing on its node")]
    FilesMissing,
    #[error("the VM of VMClone {clone} is {phase:?}, not running")]
    SourceCloneNotRunning { clone: String, phase: VmPhase },
    #[error("VMClone {clone} has no VM on this node")]
    SourceCloneNotOnNode { clone: String },
}

impl ImageFailure {
    /// The `reason` of the status condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::FilesMissing => "ImageFilesMissing",
            Self::SourceCloneNotRunning { .. } => "SourceCloneNotRunning",
            Self::SourceCloneNotOnNode { .. } => "SourceCloneNotOnNode",
        }
    }
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
        return ImageAction::Fail(ImageFailure::FilesMissing);
    }
    if let Some(source) = &image.spec.source.from_clone {
        return match &facts.source_clone_vm {
            Some(VmPhase::Running | VmPhase::Paused) => ImageAction::CaptureClone,
            Some(VmPhase::Warm | VmPhase::Starting) => ImageAction::Nothing,
            Some(other) => ImageAction::Fail(ImageFailure::SourceCloneNotRunning {
                clone: source.vm_clone.clone(),
                phase: other.clone(),
            }),
            None => ImageAction::Fail(ImageFailure::SourceCloneNotOnNode {
                clone: source.vm_clone.clone(),
            }),
        };
    }
    if image
        .spec
        .source
        .boot
        .as_ref()
        .is_some_and(|b| b.linux.is_some())
    {
        return ImageAction::BuildLinux;
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
    Fail(CloneFailure),
}

/// Why a placed VMClone fails without anything being tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CloneFailure {
    #[error("the clone's VM failed")]
    VmFailed,
    #[error("the clone's VM process is gone")]
    VmGone,
}

impl CloneFailure {
    /// The `reason` of the status condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::VmFailed => "VMFailed",
            Self::VmGone => "VMGone",
        }
    }
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
        (Some(VmPhase::Failed), _) => CloneAction::Fail(CloneFailure::VmFailed),
        (Some(VmPhase::Running | VmPhase::Paused), VMClonePhase::Running) => CloneAction::Nothing,
        (Some(VmPhase::Running | VmPhase::Paused), _) => CloneAction::ReportRunning,
        (Some(_), _) => CloneAction::Nothing,
        (None, p) if p.is_terminal() || p == VMClonePhase::Migrating => CloneAction::Nothing,
        (None, VMClonePhase::Running | VMClonePhase::Stopping) => {
            CloneAction::Fail(CloneFailure::VmGone)
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
/// keys of the objects placed on this node): their owner may be gone.
/// Returns (VM id, owner).
pub fn unplaced_vms(vms: &[VmRecord], placed: &BTreeSet<ObjectKey>) -> Vec<(String, ObjectKey)> {
    vms.iter()
        .filter_map(|r| {
            let owner = r.owner.as_ref()?;
            let placed_here = placed.contains(owner);
            let owned = matches!(owner.kind, ObjectKind::VMClone | ObjectKind::LiveImage);
            (owned && !placed_here).then(|| (r.id.clone(), owner.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
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

    fn linux_image(phase: Option<LiveImagePhase>) -> LiveImage {
        let mut image = image(true, phase, false);
        image.spec.source.boot = Some(
            serde_json::from_value(json!({
                "memoryMiB": 256,
                "linux": {"kernel": {"url": "https://h/vmlinux", "sha256": "aa"}}
            }))
            .unwrap(),
        );
        image
    }

    #[test]
    fn linux_images_are_fetched_and_built_once_and_failures_stay() {
        let none = ImageFacts::default();
        assert_eq!(
            image_action(&linux_image(None), &none),
            ImageAction::BuildLinux
        );
        assert_eq!(
            image_action(&linux_image(Some(LiveImagePhase::Booting)), &none),
            ImageAction::BuildLinux,
            "a daemon restarted mid-boot builds again"
        );
        let busy = ImageFacts {
            busy: true,
            ..ImageFacts::default()
        };
        assert_eq!(
            image_action(&linux_image(None), &busy),
            ImageAction::Nothing
        );
        // A fetch failure or a refused boot wrote Failed: not retried.
        assert_eq!(
            image_action(&linux_image(Some(LiveImagePhase::Failed)), &none),
            ImageAction::Nothing
        );
        let local = ImageFacts {
            local: Some(summary()),
            ..ImageFacts::default()
        };
        assert_eq!(
            image_action(&linux_image(Some(LiveImagePhase::Capturing)), &local),
            ImageAction::ReportReady(summary())
        );
        // The built-in guests keep their own action.
        assert_eq!(
            image_action(&image(true, None, false), &none),
            ImageAction::Build
        );
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
            ImageAction::Fail(m) if m.to_string().contains("VMClone c has no VM")
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
        let placed: BTreeSet<ObjectKey> = ["VMClone/ns/a", "LiveImage/ns/img"]
            .iter()
            .map(|s| s.parse().unwrap())
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
