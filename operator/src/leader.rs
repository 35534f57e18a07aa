//! Leader election on a `coordination.k8s.io/v1` Lease, written with the
//! Lease API directly: acquire and renew by `replace` with the read
//! resourceVersion as precondition, so two replicas can never both succeed.
//!
//! Like client-go, a standby judges expiry by its *own* clock: it remembers
//! when it last saw the Lease change and takes over once the record has stood
//! still for `leaseDurationSeconds`. No clock comparison between machines.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

/// Name of the operator's leader Lease.
pub const LEADER_LEASE_NAME: &str = "vmstream-operator-leader";

/// Why one election round failed (the round is retried).
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("reading leader Lease {name}")]
    Get {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing leader Lease {name}")]
    Write {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// One replica's view of the leader Lease.
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    /// resourceVersion last seen, and when (local clock).
    observed: Option<(String, Instant)>,
}

fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElection {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, lease_duration: Duration) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            lease_duration,
            observed: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn duration_seconds(&self) -> i32 {
        self.lease_duration.as_secs_f64().ceil().max(1.0) as i32
    }

    /// One round: create, renew or take over the Lease. `Ok(true)` while
    /// this replica is the leader.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, ElectionError> {
        let now = MicroTime(Timestamp::now());
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| ElectionError::Get {
                name: self.name.clone(),
                source,
            })?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(source) => Err(ElectionError::Write {
                    name: self.name.clone(),
                    source,
                }),
            };
        };

        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        match &self.observed {
            Some((seen, _)) if *seen == version => {}
            _ => self.observed = Some((version, Instant::now())),
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != self.identity {
            let duration = Duration::from_secs(
                spec.lease_duration_seconds
                    .unwrap_or(self.duration_seconds())
                    .max(1) as u64,
            );
            let stood_still = self
                .observed
                .as_ref()
                .is_some_and(|(_, at)| at.elapsed() >= duration);
            if !holder.is_empty() && !stood_still {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.duration_seconds());
        // `replace` carries the resourceVersion we read: a concurrent writer
        // makes this fail with 409 instead of both believing they lead.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observed = written
                    .metadata
                    .resource_version
                    .map(|v| (v, Instant::now()));
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(source) => Err(ElectionError::Write {
                name: self.name.clone(),
                source,
            }),
        }
    }

    /// Give the Lease up (graceful shutdown) so a standby takes over at once.
    pub async fn release(&self) -> Result<(), ElectionError> {
        let Some(mut lease) =
            self.api
                .get_opt(&self.name)
                .await
                .map_err(|source| ElectionError::Get {
                    name: self.name.clone(),
                    source,
                })?
        else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(source) => Err(ElectionError::Write {
                name: self.name.clone(),
                source,
            }),
        }
    }
}
