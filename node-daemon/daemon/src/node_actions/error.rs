//! Why an action on a placed object failed: one variant per failure, each
//! with the stable `reason` that goes into the object's status condition.

use std::path::PathBuf;

use crate::artifacts::FetchError;
use crate::object_key::ObjectKey;
use crate::page_service::PageServiceError;
use crate::supervisor::SupervisorError;
use crate::vm_protocol::StartRefusal;

/// Errors carrying out an action.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("writing the status of {object}")]
    Status {
        object: ObjectKey,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("LiveImage {image} has no boot source")]
    NoBootSource { image: String },
    #[error("LiveImage {image} has no fromClone source")]
    NoCloneSource { image: String },
    #[error("fetching the {what} of LiveImage {image}")]
    Fetch {
        image: String,
        what: String,
        #[source]
        source: Box<FetchError>,
    },
    #[error("VM {id} refused the start")]
    StartRefused {
        id: String,
        #[source]
        refusal: StartRefusal,
    },
    #[error("setting up the network of VM {id}")]
    Network {
        id: String,
        #[source]
        source: crate::vm_net::VmNetError,
    },
    #[error("booting the source VM {id}")]
    Boot {
        id: String,
        #[source]
        source: Box<SupervisorError>,
    },
    #[error("capturing VM {id} into {}", dir.display())]
    Capture {
        id: String,
        dir: PathBuf,
        #[source]
        source: Box<SupervisorError>,
    },
    #[error("VM {id} answered {request} with {reply}")]
    UnexpectedReply {
        id: String,
        request: &'static str,
        reply: String,
    },
    #[error("cannot {what} {}", path.display())]
    ImageFiles {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the image header in {}", dir.display())]
    ImageHeader {
        dir: PathBuf,
        #[source]
        source: Box<vmstream_vmm::image::ImageOpenError>,
    },
    #[error("starting VM {id}")]
    Start {
        id: String,
        #[source]
        source: Box<SupervisorError>,
    },
    #[error("stopping VM {id}")]
    Stop {
        id: String,
        #[source]
        source: Box<SupervisorError>,
    },
    #[error("reading the stats of VM {id}")]
    Stats {
        id: String,
        #[source]
        source: Box<SupervisorError>,
    },
    #[error("this node has no page service to stream LiveImage {image}")]
    NoPageService { image: String },
    #[error("no holder of LiveImage {image} ({holders}) served it within {patience_s}s")]
    ImageNotServed {
        image: String,
        holders: String,
        patience_s: u64,
        #[source]
        source: Box<PageServiceError>,
    },
    #[error("streaming LiveImage {image} from {holders}")]
    Stream {
        image: String,
        holders: String,
        #[source]
        source: Box<PageServiceError>,
    },
    #[error("the Starting report of VMClone {clone} panicked: {why}")]
    StartingReport { clone: String, why: String },
}

impl ActionError {
    /// The `reason` of the status condition this failure is reported with.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Status { .. } => "StatusWriteFailed",
            Self::NoBootSource { .. } => "NoBootSource",
            Self::NoCloneSource { .. } => "NoCloneSource",
            Self::Fetch { source, .. } => source.reason(),
            Self::StartRefused { refusal, .. } => refusal.reason(),
            Self::Network { source, .. } => source.reason(),
            Self::Boot { .. } => "BootFailed",
            Self::Capture { .. } => "CaptureFailed",
            Self::UnexpectedReply { .. } => "UnexpectedReply",
            Self::ImageFiles { .. } => "ImageFilesFailed",
            Self::ImageHeader { .. } => "ImageNotFound",
            Self::Start { .. } => "StartFailed",
            Self::Stop { .. } => "StopFailed",
            Self::Stats { .. } => "StatsFailed",
            Self::NoPageService { .. } => "NoPageService",
            Self::ImageNotServed { .. } => "UnknownImage",
            Self::Stream { .. } => "StreamFailed",
            Self::StartingReport { .. } => "StartingReportFailed",
        }
    }

    /// A supervisor failure starting VM `id`.
    pub fn start(id: &str) -> impl FnOnce(SupervisorError) -> Self {
        let id = id.to_owned();
        move |e| Self::Start {
            id,
            source: Box::new(e),
        }
    }

    /// A failure setting up the network namespace and taps of VM `id`.
    pub fn network(id: &str) -> impl FnOnce(crate::vm_net::VmNetError) -> Self {
        let id = id.to_owned();
        move |source| Self::Network { id, source }
    }

    /// A supervisor failure stopping VM `id`.
    pub fn stop(id: &str) -> impl FnOnce(SupervisorError) -> Self {
        let id = id.to_owned();
        move |e| Self::Stop {
            id,
            source: Box::new(e),
        }
    }

    /// A supervisor failure booting the source VM `id`; a typed start
    /// refusal keeps its own reason.
    pub fn boot(id: &str) -> impl FnOnce(SupervisorError) -> Self {
        let id = id.to_owned();
        move |e| match e {
            SupervisorError::Refused {
                refusal: Some(refusal),
                ..
            } => Self::StartRefused { id, refusal },
            e => Self::Boot {
                id,
                source: Box::new(e),
            },
        }
    }

    /// A failure fetching `what` (kernel, initrd, disk NAME) of `image`.
    pub fn fetch(image: &str, what: &str) -> impl FnOnce(FetchError) -> Self {
        let (image, what) = (image.to_owned(), what.to_owned());
        move |e| Self::Fetch {
            image,
            what,
            source: Box::new(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_have_stable_reasons() {
        let start = ActionError::start("vmc.ns.a")(SupervisorError::NotFound("vmc.ns.a".into()));
        assert_eq!(start.reason(), "StartFailed");
        assert_eq!(
            crate::error_chain::chain(&start),
            "starting VM vmc.ns.a: no VM vmc.ns.a"
        );
        let header = ActionError::ImageHeader {
            dir: "/img".into(),
            source: Box::new(
                vmstream_vmm::image::StateFile::read(std::path::Path::new("/nonexistent"))
                    .unwrap_err(),
            ),
        };
        assert_eq!(header.reason(), "ImageNotFound");
        let refused = ActionError::boot("li.ns.img")(SupervisorError::Refused {
            id: "li.ns.img".into(),
            command: "start",
            error: "this build's VMM cannot boot Linux yet".into(),
            refusal: Some(StartRefusal::LinuxBootUnavailable),
        });
        assert_eq!(refused.reason(), "LinuxBootUnavailable");
        assert_eq!(
            crate::error_chain::chain(&refused),
            "VM li.ns.img refused the start: this build's VMM cannot boot Linux yet"
        );
        let fetch = ActionError::fetch("img", "kernel")(FetchError::NotAKernel {
            artifact: "https://h/k".into(),
        });
        assert_eq!(fetch.reason(), "NotAKernel");
        assert!(header.to_string().contains("/img"));
    }
}
