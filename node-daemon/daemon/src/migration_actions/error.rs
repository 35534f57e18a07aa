//! Why carrying out a migration action failed: one variant per failure,
//! each with the stable `reason` of the migration's Succeeded condition.

use std::net::SocketAddr;

use crate::object_key::ObjectKey;
use crate::supervisor::SupervisorError;

/// Errors carrying out a migration action.
#[derive(Debug, thiserror::Error)]
pub enum MigrationActionError {
    #[error("reading or writing {object}")]
    Api {
        object: ObjectKey,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("LiveImage {image} has no memory size")]
    NoMemorySize { image: ObjectKey },
    #[error("starting the target VM {id}")]
    Target {
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
    #[error("migrating VM {id} to {target}")]
    Migrate {
        id: String,
        target: SocketAddr,
        #[source]
        source: Box<SupervisorError>,
    },
    #[error("VM {id} answered {request} with {reply}")]
    UnexpectedReply {
        id: String,
        request: &'static str,
        reply: String,
    },
    #[error("the work on VM {id} panicked: {why}")]
    Panicked { id: String, why: String },
}

impl MigrationActionError {
    /// The `reason` of the Succeeded condition this failure is reported with.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Api { .. } => "APIError",
            Self::NoMemorySize { .. } => "NoMemorySize",
            Self::Target { .. } => "TargetStartFailed",
            Self::Stop { .. } => "StopFailed",
            Self::Migrate { .. } => "MigrationFailed",
            Self::UnexpectedReply { .. } => "UnexpectedReply",
            Self::Panicked { .. } => "Panicked",
        }
    }
}
