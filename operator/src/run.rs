//! The operator process: probes and metrics endpoint, leader election, and
//! the controllers, which run only while this replica holds the Lease. A
//! replica that loses the Lease returns [`RunError::LeadershipLost`] and the
//! process exits (its Deployment restarts it as a standby).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kube::{Api, Client};

use crate::config::OperatorConfig;
use crate::controllers::{Context, run_controllers};
use crate::leader::{LEADER_LEASE_NAME, LeaderElection};
use crate::metrics::{OperatorMetrics, Probes, ServeError, bind_probes};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("building the Kubernetes client from kubeconfig or in-cluster config")]
    Client(#[source] kube::Error),
    #[error("starting the metrics endpoint")]
    Probes(#[source] ServeError),
    #[error("lost the leader Lease {LEADER_LEASE_NAME}; exiting so no two replicas write")]
    LeadershipLost,
    #[error("installing the signal handler")]
    Signal(#[source] std::io::Error),
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() -> Result<(), RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Run the operator until a signal (Ok) or the loss of the Lease (Err).
pub async fn run(config: OperatorConfig) -> Result<(), RunError> {
    let client = Client::try_default().await.map_err(RunError::Client)?;
    let metrics = Arc::new(OperatorMetrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let (addr, serve) = bind_probes(
        config.metrics_addr,
        Probes {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    )
    .await
    .map_err(RunError::Probes)?;
    tokio::spawn(async move {
        if let Err(err) = serve.await {
            tracing::error!(%err, "metrics endpoint stopped");
        }
    });
    let identity = config.identity();
    tracing::info!(%addr, %identity, namespace = %config.namespace, "vmstream-operator starting");

    let mut election = LeaderElection::new(
        Api::namespaced(client.clone(), &config.namespace),
        LEADER_LEASE_NAME,
        &identity,
        config.lease_duration,
    );
    let retry = (config.lease_duration / 5).max(Duration::from_millis(100));
    let renew_deadline = config.lease_duration * 2 / 3;
    let signal = shutdown_signal();
    tokio::pin!(signal);
    ready.store(true, Ordering::Relaxed);

    loop {
        match election.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(err) => tracing::warn!(%err, "leader election round failed"),
        }
        tokio::select! {
            r = &mut signal => return r,
            _ = tokio::time::sleep(retry) => {}
        }
    }
    tracing::info!(%identity, "became leader; starting controllers");
    metrics.is_leader.set(1);
    let ctx = Arc::new(Context::new(client, metrics.clone(), config));
    let controllers = tokio::spawn(run_controllers(ctx));

    let mut last_renew = Instant::now();
    let lost = loop {
        tokio::select! {
            r = &mut signal => { r?; break false; }
            _ = tokio::time::sleep(retry) => {}
        }
        match election.try_acquire_or_renew().await {
            Ok(true) => last_renew = Instant::now(),
            Ok(false) => break true,
            Err(err) => {
                tracing::warn!(%err, "renewing the leader Lease failed");
                if last_renew.elapsed() > renew_deadline {
                    break true;
                }
            }
        }
    };
    controllers.abort();
    metrics.is_leader.set(0);
    if lost {
        return Err(RunError::LeadershipLost);
    }
    if let Err(err) = election.release().await {
        tracing::warn!(%err, "releasing the leader Lease failed");
    }
    tracing::info!("shut down");
    Ok(())
}
