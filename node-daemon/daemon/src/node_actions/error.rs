//! Why an action on a placed object failed: one variant per failure, each
//! with the stable `reason` that goes into the object's status condition.

use std::path::PathBuf;

use crate::object_key::ObjectKey;
use crate::page_service::PageServiceError;
use crate::supervisor::SupervisorError;

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

    /// A supervisor failure stopping VM `id`.
    pub fn stop(id: &str) -> impl FnOnce(SupervisorError) -> Self {
        let id = id.to_owned();
        move |e| Self::Stop {
            id,
            source: Box::new(e),
        }
    }

    /// A supervisor failure booting the source VM `id`.
    pub fn boot(id: &str) -> impl FnOnce(SupervisorError) -> Self {
        let id = id.to_owned();
        move |e| Self::Boot {
            id,
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
        assert!(header.to_string().contains("/img"));
    }
}
