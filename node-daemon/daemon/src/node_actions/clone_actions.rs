//! Carrying out a VMClone decision: start the clone's VM from the local
//! image or from a remote image streamed through the page service, report
//! it Running with its figures, stop it, or say why it waits or failed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Resource, ResourceExt};
use vmstream_api::v1alpha1::{
    LiveImage, LiveImagePhase, VMClone, VMClonePhase, VMCloneStatus, VMNode,
};

use super::decide::{
    CloneAction, RemoteRetry, UNKNOWN_IMAGE_PATIENCE, refused_as_unknown_image, remote_retry,
};
use super::error::ActionError;
use super::spec::clone_spec;
use super::status::clone_message;
use super::{NodeActions, ms};
use crate::error_chain::chain;
use crate::object_key::ObjectKey;
use crate::page_service::{RelayedImage, holders_of};
use crate::supervisor::VmLaunch;
use crate::vm_protocol::{CloneNetwork, Reply, Request, StartSpec};

/// A clone start taking longer than this is reported Starting meanwhile.
const STARTING_REPORT_AFTER: Duration = Duration::from_millis(500);

/// Why a remote clone cannot start yet (said in its status message).
#[derive(Debug)]
struct RemoteWait(String);

/// Where the Running report of a clone spent its time.
struct ReportTiming {
    stats: Duration,
    patch: Duration,
}

impl NodeActions {
    pub(super) async fn act_on_clone(
        self: &Arc<Self>,
        clone: &VMClone,
        key: &ObjectKey,
        action: CloneAction,
    ) -> Result<(), ActionError> {
        let id = key.vm_id();
        match action {
            CloneAction::Nothing => Ok(()),
            CloneAction::Wait(message) => {
                self.patch_clone(clone, clone.phase(), clone_message(message))
                    .await
            }
            CloneAction::Fail(failure) => {
                self.fail_clone(clone, failure.reason(), failure.to_string())
                    .await
            }
            CloneAction::Stop => {
                self.supervisor.stop(&id).map_err(ActionError::stop(&id))?;
                self.patch_clone(clone, VMClonePhase::Stopped, clone_message("VM stopped"))
                    .await
            }
            CloneAction::ReportStopped => {
                self.patch_clone(clone, VMClonePhase::Stopped, clone_message("no VM"))
                    .await
            }
            CloneAction::ReportRunning => self.report_clone_running(clone, &id).await.map(|_| ()),
            CloneAction::StartRemote => self.start_remote(clone, key).await,
            CloneAction::Start { image_dir } => self.start_local(clone, key, &image_dir).await,
        }
    }

    /// Starts the clone from the local image in `image_dir` and reports it
    /// Running (or Failed).
    async fn start_local(
        self: &Arc<Self>,
        clone: &VMClone,
        key: &ObjectKey,
        image_dir: &Path,
    ) -> Result<(), ActionError> {
        let id = key.vm_id();
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
                this.patch_clone(&clone, VMClonePhase::Starting, clone_message("starting"))
                    .await
                    .map(|()| Some(began.elapsed()))
            })
        };
        let started = self.launch_clone(clone, key, image_dir);
        let launched = began.elapsed();
        // Ends the wait (an error: the report is already under way).
        let _ = launched_tx.send(());
        let starting_reported = starting.await.map_err(|e| ActionError::StartingReport {
            clone: clone.name_any(),
            why: e.to_string(),
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
            Err(e) => self.start_failed(clone, &id, e).await,
        }
    }

    /// Streams the clone's image from the nodes holding it, starts the
    /// clone on it and reports it Running (or Failed, or why it waits).
    async fn start_remote(&self, clone: &VMClone, key: &ObjectKey) -> Result<(), ActionError> {
        let id = key.vm_id();
        let image = key.image_in_namespace(&clone.spec.live_image);
        let holders = match self.remote_holders(&image).await {
            Ok(holders) => holders,
            Err(RemoteWait(message)) => {
                if clone.status.as_ref().and_then(|s| s.message.as_deref())
                    != Some(message.as_str())
                {
                    self.patch_clone(clone, clone.phase(), clone_message(message))
                        .await?;
                }
                return Ok(());
            }
        };
        self.patch_clone(
            clone,
            VMClonePhase::Starting,
            clone_message(format!("streaming from {}", holders.join(", "))),
        )
        .await?;
        let started = match self.relay_with_retry(clone, &image, &holders).await {
            Ok(relayed) => self.launch_remote_clone(key, relayed),
            Err(e) => Err(e),
        };
        match started {
            Ok(()) => self.report_clone_running(clone, &id).await.map(|_| ()),
            Err(e) => self.start_failed(clone, &id, e).await,
        }
    }

    /// Stops what is left of a failed start and reports the clone Failed.
    async fn start_failed(
        &self,
        clone: &VMClone,
        id: &str,
        error: ActionError,
    ) -> Result<(), ActionError> {
        if self.supervisor.get(id).is_some() {
            let _ = self.supervisor.stop(id);
        }
        crate::vm_net::remove(id);
        self.fail_clone(clone, error.reason(), chain(&error))
            .await?;
        Err(error)
    }

    /// Launches the clone's VM process from the local image in `image_dir`;
    /// returns once it runs.
    fn launch_clone(
        &self,
        clone: &VMClone,
        key: &ObjectKey,
        image_dir: &Path,
    ) -> Result<(), ActionError> {
        let id = key.vm_id();
        let header = vmstream_vmm::image::StateFile::read(image_dir).map_err(|source| {
            ActionError::ImageHeader {
                dir: image_dir.to_path_buf(),
                source: Box::new(source),
            }
        })?;
        // A Linux image's interfaces: a namespace and taps of the clone's own.
        let nics = crate::vm_process::linux::read_network(image_dir);
        let network = if nics.is_empty() {
            None
        } else {
            let net = crate::vm_net::create(&id, &nics).map_err(ActionError::network(&id))?;
            Some(CloneNetwork {
                netns: net.netns,
                taps: net.taps,
            })
        };
        // A launch with a start spec returns once the VM runs.
        self.supervisor
            .launch(&VmLaunch {
                id: id.clone(),
                owner: Some(key.clone()),
                vcpus: u8::try_from(header.vcpu_count).unwrap_or(u8::MAX),
                memory_bytes: header.memory_size,
                start: Some(clone_spec(image_dir, clone.spec.memory_backend, network)),
                // The VM process prepares lazy memory for a lazy start spec.
                prepare_lazy: false,
                preload_image: None,
            })
            .map_err(ActionError::start(&id))?;
        Ok(())
    }

    /// Where the image can be streamed from: its home node's page server
    /// first, then nodes listing it as cached. Not found yet (image not
    /// Ready, no address) is a reason to wait, not a failure.
    async fn remote_holders(&self, image: &ObjectKey) -> Result<Vec<String>, RemoteWait> {
        let name = &image.name;
        let images: Api<LiveImage> = Api::namespaced(self.client.clone(), &image.namespace);
        let live_image = images
            .get(name)
            .await
            .map_err(|e| RemoteWait(format!("LiveImage {name} not readable: {e}")))?;
        if live_image.phase() != LiveImagePhase::Ready {
            return Err(RemoteWait(format!("LiveImage {name} is not Ready")));
        }
        let home = live_image.status.as_ref().and_then(|s| s.node.clone());
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
        let holders = holders_of(
            &image.namespaced_name(),
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

    /// Relays the remote `image` (`PageService::relay_remote`), retrying
    /// while its holders answer `UnknownImage` (decided by
    /// [`remote_retry`]); the first retry writes the reason into the
    /// clone's status message.
    async fn relay_with_retry(
        &self,
        clone: &VMClone,
        image: &ObjectKey,
        holders: &[String],
    ) -> Result<RelayedImage, ActionError> {
        let name = &image.name;
        let service = self
            .page_service
            .get()
            .ok_or_else(|| ActionError::NoPageService {
                image: name.clone(),
            })?;
        let began = Instant::now();
        let mut attempt = 0u32;
        loop {
            let error = match service.relay_remote(image, holders) {
                Ok(relayed) => return Ok(relayed),
                Err(e) => e,
            };
            let unknown = refused_as_unknown_image(&error);
            match remote_retry(unknown, attempt, began.elapsed()) {
                RemoteRetry::GiveUp if unknown => {
                    return Err(ActionError::ImageNotServed {
                        image: name.clone(),
                        holders: holders.join(", "),
                        patience_s: UNKNOWN_IMAGE_PATIENCE.as_secs(),
                        source: Box::new(error),
                    });
                }
                RemoteRetry::GiveUp => {
                    return Err(ActionError::Stream {
                        image: name.clone(),
                        holders: holders.join(", "),
                        source: Box::new(error),
                    });
                }
                RemoteRetry::After(pause) => {
                    tracing::info!(clone = %clone.name_any(), attempt, pause_ms = ms(pause), error = %chain(&error), "image not served yet; retrying");
                    if attempt == 0 {
                        let message = format!(
                            "LiveImage {name} is not served by {} yet; retrying for up to {}s",
                            holders.join(", "),
                            UNKNOWN_IMAGE_PATIENCE.as_secs()
                        );
                        self.patch_clone(clone, VMClonePhase::Starting, clone_message(message))
                            .await?;
                    }
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Launches the clone's VM process on a relayed remote image; returns
    /// once it runs.
    fn launch_remote_clone(
        &self,
        key: &ObjectKey,
        relayed: RelayedImage,
    ) -> Result<(), ActionError> {
        let header =
            vmstream_vmm::image::StateFile::read(&relayed.state_dir).map_err(|source| {
                ActionError::ImageHeader {
                    dir: relayed.state_dir.clone(),
                    source: Box::new(source),
                }
            })?;
        let id = key.vm_id();
        self.supervisor
            .launch(&VmLaunch {
                id: id.clone(),
                owner: Some(key.clone()),
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
            })
            .map_err(ActionError::start(&id))?;
        Ok(())
    }

    async fn report_clone_running(
        &self,
        clone: &VMClone,
        id: &str,
    ) -> Result<ReportTiming, ActionError> {
        let began = Instant::now();
        let reply = self
            .supervisor
            .call(id, &Request::Stats)
            .map_err(|e| ActionError::Stats {
                id: id.to_owned(),
                source: Box::new(e),
            })?;
        let Reply::Stats(stats) = reply else {
            return Err(ActionError::UnexpectedReply {
                id: id.to_owned(),
                request: "stats",
                reply: format!("{reply:?}"),
            });
        };
        let stats_took = began.elapsed();
        let start = stats.start.clone().unwrap_or_default();
        self.patch_clone(
            clone,
            VMClonePhase::Running,
            VMCloneStatus {
                message: Some(String::new()),
                start_latency_ms: Some(start.first_exit_ms.unwrap_or(start.start_ms)),
                resident_bytes: Some(stats.memory.guest_resident),
                shared_bytes: Some(stats.memory.guest_shared),
                private_bytes: Some(stats.memory.guest_private),
                faults_served: Some(stats.faults.faults),
                started_at: Some(Time(Timestamp::now())),
                observed_generation: clone.meta().generation,
                ..VMCloneStatus::default()
            },
        )
        .await?;
        Ok(ReportTiming {
            stats: stats_took,
            patch: began.elapsed() - stats_took,
        })
    }
}
