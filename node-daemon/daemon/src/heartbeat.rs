//! The node's heartbeat: a `coordination.k8s.io/v1` Lease named
//! `vmstream-node-<node>` that the daemon renews every interval. The operator
//! places no new work on a node whose Lease is older than its timeout and
//! reports that node's VMs Lost.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::sync::watch;

/// Field manager for everything the node daemon writes.
pub const FIELD_MANAGER: &str = "vmstream-node";

/// Errors renewing the heartbeat.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("renewing Lease {namespace}/{name}: {source}")]
    Renew {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Heartbeat settings of one node.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    pub node: String,
    pub namespace: String,
    pub interval: Duration,
    /// Written into the Lease as `leaseDurationSeconds`: how long the Lease
    /// counts as fresh after a renewal.
    pub lease_duration: Duration,
}

impl Heartbeat {
    /// The Lease body for a renewal at `now` (server-side apply; holder = node).
    pub fn lease_patch(&self, now: Timestamp) -> serde_json::Value {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(vmstream_api::heartbeat_lease_name(&self.node)),
                namespace: Some(self.namespace.clone()),
                labels: Some(
                    [(vmstream_api::NODE_LABEL.to_owned(), self.node.clone())]
                        .into_iter()
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.node.clone()),
                lease_duration_seconds: Some(
                    i32::try_from(self.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX),
                ),
                renew_time: Some(MicroTime(now)),
                ..LeaseSpec::default()
            }),
        };
        serde_json::to_value(lease).expect("a Lease serializes")
    }

    /// Renews the Lease once.
    pub async fn renew(&self, client: &kube::Client) -> Result<(), HeartbeatError> {
        let name = vmstream_api::heartbeat_lease_name(&self.node);
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(self.lease_patch(Timestamp::now())),
        )
        .await
        .map_err(|source| HeartbeatError::Renew {
            namespace: self.namespace.clone(),
            name,
            source,
        })?;
        Ok(())
    }

    /// Renews the Lease every interval until `stop` turns true. Failures are
    /// logged and retried at the next tick: a missed beat only ages the Lease.
    pub async fn run(self, client: kube::Client, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Err(e) = self.renew(&client).await {
                        tracing::warn!(error = %e, "heartbeat not renewed");
                    }
                }
                _ = stop.changed() => {
                    if *stop.borrow() { return; }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_the_node_and_its_duration() {
        let hb = Heartbeat {
            node: "n1".into(),
            namespace: "vmstream-system".into(),
            interval: Duration::from_secs(5),
            lease_duration: Duration::from_secs(20),
        };
        let now: Timestamp = "2026-11-27T10:00:00Z".parse().unwrap();
        let p = hb.lease_patch(now);
        assert_eq!(p["metadata"]["name"], "vmstream-node-n1");
        assert_eq!(p["spec"]["holderIdentity"], "n1");
        assert_eq!(p["spec"]["leaseDurationSeconds"], 20);
        assert!(
            p["spec"]["renewTime"]
                .as_str()
                .unwrap()
                .starts_with("2026-11-27T10:00:00")
        );
    }
}
