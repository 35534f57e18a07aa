//! Carrying out a LiveImage decision: boot the source (a built-in guest, or
//! a Linux guest after fetching its artifacts) and capture it, capture a
//! running source clone, report the image Ready with its figures, stop a
//! left-over source VM, or remove a deleted image's files.

use kube::{Resource, ResourceExt};
use vmstream_api::v1alpha1::{LinuxBoot, LiveImage, LiveImagePhase, LiveImageStatus};

use super::NodeActions;
use super::decide::ImageAction;
use super::error::ActionError;
use super::spec::{FetchedLinux, boot_spec, linux_spec};
use super::status::image_message;
use crate::error_chain::chain;
use crate::object_key::ObjectKey;
use crate::state_layout::capture_file_in;
use crate::supervisor::VmLaunch;
use crate::vm_protocol::{CaptureSummary, Reply, Request, StartSpec};

impl NodeActions {
    pub(super) async fn act_on_image(
        &self,
        image: &LiveImage,
        key: &ObjectKey,
        action: ImageAction,
    ) -> Result<(), ActionError> {
        let id = key.vm_id();
        let dir = self.layout.image_dir(key);
        match action {
            ImageAction::Nothing => Ok(()),
            ImageAction::StopSource => self.supervisor.stop(&id).map_err(ActionError::stop(&id)),
            ImageAction::RemoveLocal => {
                std::fs::remove_dir_all(&dir).map_err(|source| ActionError::ImageFiles {
                    what: "remove",
                    path: dir.clone(),
                    source,
                })
            }
            ImageAction::Fail(failure) => {
                self.fail_image(image, failure.reason(), failure.to_string())
                    .await
            }
            ImageAction::ReportReady(summary) => self.report_image_ready(image, &summary).await,
            ImageAction::CaptureClone => match self.capture_clone(image, key).await {
                Ok(summary) => self.report_image_ready(image, &summary).await,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(self.layout.partial_image_dir(key));
                    self.fail_image(image, e.reason(), chain(&e)).await?;
                    Err(e)
                }
            },
            ImageAction::Build | ImageAction::BuildLinux => {
                match self.build_image(image, key).await {
                    Ok(summary) => self.report_image_ready(image, &summary).await,
                    Err(e) => {
                        if self.supervisor.get(&id).is_some() {
                            let _ = self.supervisor.stop(&id);
                        }
                        crate::vm_net::remove(&id);
                        let _ = std::fs::remove_dir_all(self.layout.partial_image_dir(key));
                        self.fail_image(image, e.reason(), chain(&e)).await?;
                        Err(e)
                    }
                }
            }
        }
    }

    /// Serves every complete local image to other nodes and lists them in
    /// the node report. Called on every interval and before an image is
    /// reported Ready, so no node streams an image its home does not serve.
    pub(super) fn serve_local_images(&self) {
        let images = self.layout.local_images();
        if let Some(service) = self.page_service.get() {
            service.serve_local_images(&images);
        }
        if let Ok(mut report) = self.report.write() {
            report.images = images.iter().map(ObjectKey::namespaced_name).collect();
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
            LiveImageStatus {
                message: Some(String::new()),
                size_bytes: Some(summary.size_bytes),
                memory_bytes: Some(summary.memory_bytes),
                non_zero_pages: Some(summary.nonzero_pages),
                capture_time_ms: Some(summary.capture_ms),
                source_pause_ms: Some(summary.source_pause_ms),
                observed_generation: image.meta().generation,
                ..LiveImageStatus::default()
            },
        )
        .await
    }

    /// Boots the source, waits for READY, captures, stops the source.
    async fn build_image(
        &self,
        image: &LiveImage,
        key: &ObjectKey,
    ) -> Result<CaptureSummary, ActionError> {
        let boot = image
            .spec
            .source
            .boot
            .as_ref()
            .ok_or_else(|| ActionError::NoBootSource {
                image: image.name_any(),
            })?;
        let id = key.vm_id();
        if self.supervisor.get(&id).is_none() {
            let launch = |start| VmLaunch {
                id: id.clone(),
                owner: Some(key.clone()),
                vcpus: u8::try_from(boot.vcpus).unwrap_or(u8::MAX),
                memory_bytes: u64::from(boot.memory_mib) << 20,
                start,
                prepare_lazy: false,
                preload_image: None,
            };
            if let Some(start) = boot_spec(boot) {
                self.patch_image(
                    image,
                    LiveImagePhase::Booting,
                    image_message(format!(
                        "booting the {} guest",
                        boot.guest.map_or("built-in", |g| g.as_str())
                    )),
                )
                .await?;
                // The launch returns once the guest reported READY.
                self.supervisor
                    .launch(&launch(Some(start)))
                    .map_err(ActionError::boot(&id))?;
            } else {
                let linux = boot
                    .linux
                    .as_ref()
                    .ok_or_else(|| ActionError::NoBootSource {
                        image: image.name_any(),
                    })?;
                self.patch_image(
                    image,
                    LiveImagePhase::Booting,
                    image_message("fetching the Linux guest's artifacts"),
                )
                .await?;
                let files = self.fetch_linux(&image.name_any(), linux).await?;
                self.patch_image(
                    image,
                    LiveImagePhase::Booting,
                    image_message("booting the Linux guest"),
                )
                .await?;
                let mut spec = linux_spec(boot, linux, &files);
                if let StartSpec::Linux(start) = &mut spec
                    && !start.network.is_empty()
                {
                    // A namespace of its own with a tap per interface.
                    let net = crate::vm_net::create(&id, &start.network)
                        .map_err(ActionError::network(&id))?;
                    for (nic, tap) in start.network.iter_mut().zip(net.taps) {
                        nic.tap = Some(tap);
                    }
                    start.netns = Some(net.netns);
                }
                // A warm shell first, then the start request: a refusal of
                // the spec comes back typed (`StartRefusal`), not as a log.
                self.supervisor
                    .launch(&launch(None))
                    .map_err(ActionError::boot(&id))?;
                self.supervisor
                    .call(&id, &Request::Start { spec })
                    .map_err(ActionError::boot(&id))?;
            }
        } else {
            // A source VM left by an earlier daemon may still be booting.
            let timeout_ms = u64::from(boot.readiness.timeout_seconds) * 1000;
            self.supervisor
                .call(&id, &Request::WaitRunning { timeout_ms })
                .map_err(ActionError::boot(&id))?;
        }
        self.patch_image(image, LiveImagePhase::Capturing, image_message("capturing"))
            .await?;
        let summary = self.capture_into(&id, key)?;
        self.supervisor.stop(&id).map_err(ActionError::stop(&id))?;
        Ok(summary)
    }

    /// Fetches and verifies every artifact of a Linux guest (the kernel
    /// also checked to be one).
    async fn fetch_linux(
        &self,
        image: &str,
        linux: &LinuxBoot,
    ) -> Result<FetchedLinux, ActionError> {
        let kernel = self
            .artifacts
            .fetch_kernel(&linux.kernel)
            .await
            .map_err(ActionError::fetch(image, "kernel"))?;
        let initrd = match &linux.initrd {
            Some(initrd) => Some(
                self.artifacts
                    .fetch(initrd)
                    .await
                    .map_err(ActionError::fetch(image, "initrd"))?,
            ),
            None => None,
        };
        let mut disks = Vec::with_capacity(linux.disks.len());
        for disk in &linux.disks {
            disks.push(
                self.artifacts
                    .fetch(&disk.image)
                    .await
                    .map_err(ActionError::fetch(image, &format!("disk {}", disk.name)))?,
            );
        }
        Ok(FetchedLinux {
            kernel,
            initrd,
            disks,
        })
    }

    /// Captures VM `id` into the directory of `image`: into its partial
    /// directory first, with the figures file, then renamed, so a directory
    /// at the final place is always a complete image. The VM keeps running.
    fn capture_into(&self, id: &str, image: &ObjectKey) -> Result<CaptureSummary, ActionError> {
        let dir = self.layout.image_dir(image);
        let partial = self.layout.partial_image_dir(image);
        let _ = std::fs::remove_dir_all(&partial);
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ActionError::ImageFiles {
                what: "create",
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let reply = self
            .supervisor
            .call(
                id,
                &Request::Capture {
                    dir: partial.clone(),
                },
            )
            .map_err(|e| ActionError::Capture {
                id: id.to_owned(),
                dir: partial.clone(),
                source: Box::new(e),
            })?;
        let Reply::Captured(mut summary) = reply else {
            return Err(ActionError::UnexpectedReply {
                id: id.to_owned(),
                request: "capture",
                reply: format!("{reply:?}"),
            });
        };
        summary.dir = dir.clone();
        let figures = capture_file_in(&partial);
        std::fs::write(
            &figures,
            serde_json::to_vec_pretty(&summary).expect("summary serializes"),
        )
        .map_err(|source| ActionError::ImageFiles {
            what: "write",
            path: figures,
            source,
        })?;
        std::fs::rename(&partial, &dir).map_err(|source| ActionError::ImageFiles {
            what: "rename into place",
            path: partial,
            source,
        })?;
        Ok(summary)
    }

    /// A `fromClone` image: captures the source clone's running VM on this
    /// node (it pauses for the capture and runs on).
    async fn capture_clone(
        &self,
        image: &LiveImage,
        key: &ObjectKey,
    ) -> Result<CaptureSummary, ActionError> {
        let source =
            image
                .spec
                .source
                .from_clone
                .as_ref()
                .ok_or_else(|| ActionError::NoCloneSource {
                    image: image.name_any(),
                })?;
        let id = key.clone_in_namespace(&source.vm_clone).vm_id();
        self.patch_image(
            image,
            LiveImagePhase::Capturing,
            image_message(format!("capturing VMClone {}", source.vm_clone)),
        )
        .await?;
        let summary = self.capture_into(&id, key)?;
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
}
