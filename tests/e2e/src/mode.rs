//! Which cluster the end-to-end suite runs against: the local one it builds
//! itself (default: control plane on a bridge, operator and node daemons in
//! network namespaces), or an existing cluster given by a kubeconfig, where
//! vmstream is already installed (e.g. by the Helm chart in kind).
//!
//! Existing-cluster mode is chosen by `VMSTREAM_E2E_KUBECONFIG=<path>`, or by
//! `VMSTREAM_E2E_EXISTING_CLUSTER=1` with `KUBECONFIG=<path>` (a plain
//! `KUBECONFIG` alone never redirects the suite). In that mode only
//! cluster-level assertions run (through the API server; requests to guests
//! through `kubectl exec` into the node daemon pods); tests that need the
//! processes themselves (kill -9, pids, network links) skip, saying why.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use vmstream_api::v1alpha1::VMNode;
use vmstream_testenv::ControlPlane;

use crate::requests::RequestPath;
use crate::{Cluster, ClusterError, ClusterOptions};

/// Where the suite runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum E2eMode {
    /// Everything started on this machine by the harness.
    Local,
    /// An existing cluster with vmstream installed.
    ExistingCluster { kubeconfig: PathBuf },
}

/// Errors choosing the mode.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    #[error(
        "VMSTREAM_E2E_EXISTING_CLUSTER is set but KUBECONFIG is not: name the cluster's kubeconfig"
    )]
    OptInWithoutKubeconfig,
    #[error("the kubeconfig {0} does not exist")]
    MissingKubeconfig(PathBuf),
}

/// The mode for these environment values (pure; the file is checked by
/// [`mode`]). `opt_in` is `VMSTREAM_E2E_EXISTING_CLUSTER`: any value but
/// empty, `0` or `false` opts in.
pub fn choose_mode(
    e2e_kubeconfig: Option<OsString>,
    kubeconfig: Option<OsString>,
    opt_in: Option<OsString>,
) -> Result<E2eMode, ModeError> {
    if let Some(path) = e2e_kubeconfig.filter(|p| !p.is_empty()) {
        return Ok(E2eMode::ExistingCluster {
            kubeconfig: PathBuf::from(path),
        });
    }
    let opted_in = opt_in.is_some_and(|v| !matches!(v.to_str(), Some("" | "0" | "false")));
    if !opted_in {
        return Ok(E2eMode::Local);
    }
    match kubeconfig.filter(|p| !p.is_empty()) {
        // KUBECONFIG may list several files; the first is the one used here.
        Some(list) => Ok(E2eMode::ExistingCluster {
            kubeconfig: std::env::split_paths(&list)
                .next()
                .unwrap_or_else(|| PathBuf::from(list)),
        }),
        None => Err(ModeError::OptInWithoutKubeconfig),
    }
}

/// The mode from this process's environment.
pub fn mode() -> Result<E2eMode, ModeError> {
    let chosen = choose_mode(
        std::env::var_os("VMSTREAM_E2E_KUBECONFIG"),
        std::env::var_os("KUBECONFIG"),
        std::env::var_os("VMSTREAM_E2E_EXISTING_CLUSTER"),
    )?;
    if let E2eMode::ExistingCluster { kubeconfig } = &chosen
        && !kubeconfig.exists()
    {
        return Err(ModeError::MissingKubeconfig(kubeconfig.clone()));
    }
    Ok(chosen)
}

/// Why process-level tests skip in existing-cluster mode.
pub const NO_PROCESS_ACCESS: &str = "existing-cluster mode (VMSTREAM_E2E_KUBECONFIG): this test \
     needs the node daemons and VM processes on this machine (SIGKILL/SIGTERM, pids, network \
     links of node namespaces), which a cluster given by its kubeconfig does not give";

/// For tests that need a local cluster: `true` in local mode; in
/// existing-cluster mode records a skip naming why and returns `false`.
pub fn local_only(test: &str) -> bool {
    match mode() {
        Ok(E2eMode::Local) => true,
        Ok(E2eMode::ExistingCluster { .. }) => {
            vmstream_test_support::record_skip(test, NO_PROCESS_ACCESS);
            false
        }
        Err(e) => panic!("choosing the e2e mode: {e}"),
    }
}

/// An existing cluster with vmstream installed.
pub struct ExistingCluster {
    cp: ControlPlane,
    pub system_namespace: String,
}

/// The cluster a mode-independent test runs against.
pub enum ClusterUnderTest {
    Local(Box<Cluster>),
    Existing(ExistingCluster),
}

impl ClusterUnderTest {
    /// Starts a local cluster with `local` options, or connects to the
    /// existing one, by [`mode`]. In existing-cluster mode waits until at
    /// least `min_nodes` VMNodes exist.
    pub async fn start(local: ClusterOptions, min_nodes: usize) -> Result<Self, ClusterError> {
        let chosen = mode().map_err(|e| ClusterError::Mode(e.to_string()))?;
        match chosen {
            E2eMode::Local => Ok(ClusterUnderTest::Local(Box::new(
                Cluster::start(local).await?,
            ))),
            E2eMode::ExistingCluster { kubeconfig } => {
                let cp = ControlPlane::external(kubeconfig);
                let system_namespace = std::env::var("VMSTREAM_E2E_SYSTEM_NAMESPACE")
                    .unwrap_or_else(|_| vmstream_api::DEFAULT_SYSTEM_NAMESPACE.to_string());
                let existing = ClusterUnderTest::Existing(ExistingCluster {
                    cp,
                    system_namespace,
                });
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
                loop {
                    let n = existing.node_names().await?.len();
                    if n >= min_nodes {
                        break;
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(ClusterError::Mode(format!(
                            "the existing cluster has {n} VMNodes, this test needs {min_nodes}"
                        )));
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Ok(existing)
            }
        }
    }

    /// The API server (client, kubectl, test namespaces).
    pub fn control_plane(&self) -> &ControlPlane {
        match self {
            ClusterUnderTest::Local(c) => c.control_plane(),
            ClusterUnderTest::Existing(e) => &e.cp,
        }
    }

    /// Namespace of the operator, daemons and heartbeat Leases.
    pub fn system_namespace(&self) -> &str {
        match self {
            ClusterUnderTest::Local(c) => &c.system_namespace,
            ClusterUnderTest::Existing(e) => &e.system_namespace,
        }
    }

    /// The local cluster, for process-level checks (None on an existing one).
    pub fn local(&self) -> Option<&Cluster> {
        match self {
            ClusterUnderTest::Local(c) => Some(c),
            ClusterUnderTest::Existing(_) => None,
        }
    }

    /// `local` or `existing cluster (<kubeconfig>)`.
    pub fn describe(&self) -> String {
        match self {
            ClusterUnderTest::Local(c) => format!("local cluster of {} nodes", c.nodes.len()),
            ClusterUnderTest::Existing(e) => {
                format!("existing cluster ({})", e.cp.kubeconfig().display())
            }
        }
    }

    /// Names of the VMNodes.
    pub async fn node_names(&self) -> Result<Vec<String>, ClusterError> {
        let client = self.control_plane().client().await?;
        let nodes = Api::<VMNode>::all(client)
            .list(&ListParams::default())
            .await
            .map_err(|e| ClusterError::Mode(format!("listing VMNodes: {e}")))?;
        Ok(nodes
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect())
    }

    /// How requests reach guests: `ctl` locally; on an existing cluster
    /// `kubectl exec` into the node daemon pods, or `Err(why not)` when
    /// there are none (vmstream not installed by the chart).
    pub async fn request_path(&self) -> Result<RequestPath, String> {
        match self {
            ClusterUnderTest::Local(c) => c.request_path().map_err(|e| e.to_string()),
            ClusterUnderTest::Existing(e) => e.exec_path().await,
        }
    }
}

impl ExistingCluster {
    async fn exec_path(&self) -> Result<RequestPath, String> {
        let client = self.cp.client().await.map_err(|e| e.to_string())?;
        let pods = Api::<Pod>::namespaced(client, &self.system_namespace)
            .list(&ListParams::default().labels(NODE_POD_SELECTOR))
            .await
            .map_err(|e| format!("listing node daemon pods: {e}"))?;
        let by_node = daemon_pods_by_node(&pods.items);
        if by_node.is_empty() {
            return Err(format!(
                "no running node daemon pods ({NODE_POD_SELECTOR}) in {}: requests to guests \
                 are skipped",
                self.system_namespace
            ));
        }
        Ok(RequestPath::KubectlExec {
            kubectl: kubectl_binary(),
            kubeconfig: self.cp.kubeconfig().to_path_buf(),
            namespace: self.system_namespace.clone(),
            state_dir: std::env::var("VMSTREAM_E2E_STATE_DIR")
                .unwrap_or_else(|_| "/var/lib/vmstream".into()),
            pods: by_node,
        })
    }
}

/// Label selector of the chart's node daemon pods.
pub const NODE_POD_SELECTOR: &str =
    "app.kubernetes.io/name=vmstream,app.kubernetes.io/component=node";

/// Running node daemon pods by the node they run on (pure).
pub fn daemon_pods_by_node(pods: &[Pod]) -> BTreeMap<String, String> {
    pods.iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            Some((
                p.spec.as_ref()?.node_name.clone()?,
                p.metadata.name.clone()?,
            ))
        })
        .collect()
}

/// The pinned kubectl when built, else `kubectl` from PATH.
fn kubectl_binary() -> PathBuf {
    let pinned = vmstream_testenv::bin_dir().join("kubectl");
    if Path::new(&pinned).exists() {
        pinned
    } else {
        PathBuf::from("kubectl")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn local_unless_asked_for_an_existing_cluster() {
        assert_eq!(choose_mode(None, None, None), Ok(E2eMode::Local));
        // A KUBECONFIG alone (set for kubectl) does not redirect the suite.
        assert_eq!(choose_mode(None, os("/k"), None), Ok(E2eMode::Local));
        assert_eq!(choose_mode(None, os("/k"), os("0")), Ok(E2eMode::Local));
        assert_eq!(choose_mode(os(""), os("/k"), None), Ok(E2eMode::Local));
    }

    #[test]
    fn existing_cluster_by_its_own_variable_or_an_explicit_opt_in() {
        let existing = |p: &str| {
            Ok(E2eMode::ExistingCluster {
                kubeconfig: PathBuf::from(p),
            })
        };
        assert_eq!(choose_mode(os("/e2e"), os("/k"), None), existing("/e2e"));
        assert_eq!(choose_mode(None, os("/k"), os("1")), existing("/k"));
        assert_eq!(choose_mode(None, os("/a:/b"), os("true")), existing("/a"));
        assert_eq!(
            choose_mode(None, None, os("1")),
            Err(ModeError::OptInWithoutKubeconfig)
        );
    }

    #[test]
    fn only_running_pods_with_a_node_route_requests() {
        let pod = |name: &str, node: Option<&str>, phase: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "spec": {"containers": [], "nodeName": node},
                "status": {"phase": phase}
            }))
            .unwrap()
        };
        let pods = [
            pod("a", Some("n1"), "Running"),
            pod("b", Some("n2"), "Pending"),
            pod("c", None, "Running"),
        ];
        let by_node = daemon_pods_by_node(&pods);
        assert_eq!(
            by_node,
            BTreeMap::from([("n1".to_string(), "a".to_string())])
        );
    }
}
