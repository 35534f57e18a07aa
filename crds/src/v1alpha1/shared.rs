//! Types shared by several kinds: placement, memory backend, the phase enums
//! (serialized as their variant names, printed with `Display`) and the schema
//! helpers the kinds use.

use std::collections::BTreeMap;
use std::fmt;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A string enum: serialized as the variant name, with `as_str`, `Display`,
/// `FromStr` and `ALL`. Variants carry no doc comments on purpose: schemars
/// turns documented unit variants into a `oneOf` of consts, which the CRD does
/// not need; document the variants in the enum's doc comment instead.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire name of the variant.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant)),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::v1alpha1::UnknownVariant;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| $crate::v1alpha1::UnknownVariant {
                        enum_name: stringify!($name),
                        value: s.to_owned(),
                    })
            }
        }
    };
}
pub(crate) use string_enum;

/// A string that names no variant of the enum it was parsed as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownVariant {
    pub enum_name: &'static str,
    pub value: String,
}

impl fmt::Display for UnknownVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a {}", self.value, self.enum_name)
    }
}

impl std::error::Error for UnknownVariant {}

/// Regular expression of a DNS-1123 subdomain, the form of an object name.
pub const DNS1123_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Regular expression of a DNS-1123 label (a name without dots).
pub const DNS1123_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Longest artifact URL, in bytes.
pub const MAX_ARTIFACT_URL_LEN: usize = 2048;
/// Longest node-local artifact path, in bytes.
pub const MAX_ARTIFACT_PATH_LEN: usize = 4096;

/// A file the node fetches and verifies: exactly one of `url` (with its
/// `sha256`, required) or a node-local `path` (for tests and pre-provisioned
/// nodes; verified when `sha256` is given).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.url) != has(self.path)").message("exactly one of url or path must be set"),
    validation = Rule::new("!has(self.url) || has(self.sha256)").message("an artifact with a url needs its sha256").field_path(".sha256"),
)]
pub struct Artifact {
    /// An `http://` or `https://` URL, fetched once per node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_ARTIFACT_URL_LEN))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''").message("url must be an http:// or https:// URL with a host"))]
    pub url: Option<String>,
    /// An absolute path of a file on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_ARTIFACT_PATH_LEN))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("path must be absolute"))]
    pub path: Option<String>,
    /// SHA-256 of the file's content, 64 lowercase hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("sha256 must be 64 lowercase hex digits"))]
    pub sha256: Option<String>,
}

/// Where an [`Artifact`] comes from, as one of its two forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArtifactSource<'a> {
    Url {
        url: &'a str,
        sha256: &'a str,
    },
    Path {
        path: &'a str,
        sha256: Option<&'a str>,
    },
}

impl Artifact {
    /// An artifact fetched from `url` and verified against `sha256`.
    pub fn url(url: impl Into<String>, sha256: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            path: None,
            sha256: Some(sha256.into()),
        }
    }

    /// A node-local artifact, verified when `sha256` is given.
    pub fn path(path: impl Into<String>, sha256: Option<String>) -> Self {
        Self {
            url: None,
            path: Some(path.into()),
            sha256,
        }
    }

    /// The artifact's form, or `None` when it breaks the API's rules (both
    /// or neither of url and path, a url without sha256); the API server
    /// refuses such objects, so only hand-built values can be `None`.
    pub fn source(&self) -> Option<ArtifactSource<'_>> {
        match (&self.url, &self.path, &self.sha256) {
            (Some(url), None, Some(sha256)) => Some(ArtifactSource::Url { url, sha256 }),
            (None, Some(path), sha256) => Some(ArtifactSource::Path {
                path,
                sha256: sha256.as_deref(),
            }),
            _ => None,
        }
    }
}

/// Where an object may run. An empty placement lets the operator choose any
/// schedulable node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Run on exactly this node (the VMNode name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node_name: Option<String>,
    /// Run only on nodes whose VMNode labels contain all of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
}

impl Placement {
    /// Whether a node with this name and these labels satisfies the placement.
    pub fn matches(&self, node_name: &str, node_labels: &BTreeMap<String, String>) -> bool {
        if self.node_name.as_deref().is_some_and(|n| n != node_name) {
            return false;
        }
        self.node_selector
            .iter()
            .flatten()
            .all(|(k, v)| node_labels.get(k) == Some(v))
    }
}

string_enum! {
    /// How a clone's memory is backed: `CopyOnWrite` (the default) maps a
    /// complete local copy of the image privately, so clones on a node share
    /// the image's pages through the page cache until they write them (on a
    /// node that does not hold the image yet, the clone streams lazily until
    /// the node has cached it); `Lazy` streams pages on first touch through
    /// userfaultfd into the clone's own memory (no sharing unless KSM merges).
    #[derive(Default)]
    MemoryBackend {
        Lazy,
        #[default]
        CopyOnWrite,
    }
}

string_enum! {
    /// Lifecycle of a LiveImage: Pending (accepted), Scheduled (node chosen),
    /// Booting (source guest starting), Capturing (state and memory being
    /// saved), Ready (clones may start from it), Failed, Deleting.
    LiveImagePhase { Pending, Scheduled, Booting, Capturing, Ready, Failed, Deleting }
}

string_enum! {
    /// Lifecycle of a VMClone: Pending, Scheduled, Starting, Running,
    /// Migrating, Stopping, Stopped, Lost (its node stopped heartbeating),
    /// Failed.
    VMClonePhase { Pending, Scheduled, Starting, Running, Migrating, Stopping, Stopped, Lost, Failed }
}

string_enum! {
    /// Lifecycle of a VMMigration: Pending, Scheduled (target chosen), Running,
    /// Succeeded, Failed.
    VMMigrationPhase { Pending, Scheduled, Running, Succeeded, Failed }
}

impl LiveImagePhase {
    /// Whether the phase is final (no further transitions except deletion).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Ready | Self::Failed)
    }
}

impl VMClonePhase {
    /// Whether the clone's VM is gone for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Stopped | Self::Lost | Self::Failed)
    }
}

impl VMMigrationPhase {
    /// Whether the migration has finished, successfully or not.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// Schema of a status `conditions` list: a list keyed by condition type, so the
/// operator and the node daemon can each own their conditions under
/// server-side apply.
pub(crate) fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema =
        <Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>::json_schema(generator);
    let object = schema.ensure_object();
    object.insert("x-kubernetes-list-type".into(), "map".into());
    object.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_display_and_serde() {
        for phase in VMClonePhase::ALL {
            let parsed: VMClonePhase = phase.to_string().parse().unwrap();
            assert_eq!(parsed, *phase);
            let json = serde_json::to_string(phase).unwrap();
            assert_eq!(json, format!("\"{phase}\""));
        }
        assert_eq!(MemoryBackend::default(), MemoryBackend::CopyOnWrite);
        let err = "Sleeping".parse::<LiveImagePhase>().unwrap_err();
        assert_eq!(err.to_string(), "\"Sleeping\" is not a LiveImagePhase");
    }

    #[test]
    fn placement_matches_name_and_selector() {
        let labels: BTreeMap<String, String> =
            [("zone".to_owned(), "a".to_owned())].into_iter().collect();
        assert!(Placement::default().matches("n1", &labels));
        let by_name = Placement {
            node_name: Some("n1".into()),
            node_selector: None,
        };
        assert!(by_name.matches("n1", &labels));
        assert!(!by_name.matches("n2", &labels));
        let by_label = Placement {
            node_name: None,
            node_selector: Some(labels.clone()),
        };
        assert!(by_label.matches("n2", &labels));
        assert!(!by_label.matches("n2", &BTreeMap::new()));
    }
}
