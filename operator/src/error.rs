//! The error a reconcile pass can end with; each variant names the API call
//! that failed and on what, and its name labels the error metric.

/// Why one reconcile pass failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("getting {kind} {name}")]
    Get {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing {kind}")]
    List {
        kind: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("creating {kind} for {owner}")]
    Create {
        kind: &'static str,
        owner: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting {kind} {name}")]
    Delete {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("patching {what} of {kind} {name}")]
    Patch {
        kind: &'static str,
        what: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("object has no {0}")]
    MissingField(&'static str),
}

impl ReconcileError {
    /// The variant's name, for the `error` label of the error metric.
    pub fn variant(&self) -> &'static str {
        match self {
            Self::Get { .. } => "Get",
            Self::List { .. } => "List",
            Self::Create { .. } => "Create",
            Self::Delete { .. } => "Delete",
            Self::Patch { .. } => "Patch",
            Self::MissingField(_) => "MissingField",
        }
    }

    /// True when the API server refused a write on a stale resourceVersion.
    pub fn is_conflict(&self) -> bool {
        let source = match self {
            Self::Get { source, .. }
            | Self::List { source, .. }
            | Self::Create { source, .. }
            | Self::Delete { source, .. }
            | Self::Patch { source, .. } => source,
            _ => return false,
        };
        matches!(source, kube::Error::Api(s) if s.code == 409)
    }
}
