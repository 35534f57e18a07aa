//! Command-line configuration of the operator (clap), shared by `main` and
//! the integration tests that start the binary.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// Parses a duration given in seconds (fractions allowed: `0.5`).
fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("{s:?} must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The vmstream operator: reconciles LiveImage, VMClone, VMMigration,
/// ClonePool and VMAutoscaler; leader-elected.
#[derive(Clone, Debug, Parser)]
#[command(name = "vmstream-operator", version)]
pub struct OperatorConfig {
    /// Namespace holding node heartbeat Leases and the leader Lease.
    #[arg(long, env = "VMSTREAM_NAMESPACE", default_value = vmstream_api::DEFAULT_SYSTEM_NAMESPACE)]
    pub namespace: String,
    /// Reconcile objects in this namespace only (default: all namespaces).
    #[arg(long)]
    pub watch_namespace: Option<String>,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Leader Lease duration in seconds; the standby takes over after it.
    #[arg(long, value_parser = seconds, default_value = "15")]
    pub lease_duration: Duration,
    /// Memory overcommit ratio for placement (1.0 = none).
    #[arg(long, default_value_t = 1.0)]
    pub overcommit_ratio: f64,
    /// Heartbeat timeout in seconds, used when a node Lease has no
    /// leaseDurationSeconds; a quarter of it is how often placed clones are
    /// rechecked.
    #[arg(long, value_parser = seconds, default_value = "40")]
    pub heartbeat_timeout: Duration,
    /// How often each VMAutoscaler is evaluated, in seconds.
    #[arg(long, value_parser = seconds, default_value = "15")]
    pub autoscale_interval: Duration,
    /// This replica's identity in the leader Lease (default: hostname-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

impl OperatorConfig {
    /// The identity, defaulted from the hostname and the process id.
    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "vmstream-operator".into());
            format!("{host}-{}", std::process::id())
        })
    }

    /// How often placed VMs and in-flight objects are rechecked.
    pub fn recheck_interval(&self) -> Duration {
        (self.heartbeat_timeout / 4).max(Duration::from_millis(500))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fractional_seconds_and_defaults() {
        let c = OperatorConfig::try_parse_from([
            "vmstream-operator",
            "--lease-duration",
            "2.5",
            "--identity",
            "a",
        ])
        .unwrap();
        assert_eq!(c.lease_duration, Duration::from_millis(2500));
        assert_eq!(c.autoscale_interval, Duration::from_secs(15));
        assert_eq!(c.namespace, "vmstream-system");
        assert_eq!(c.identity(), "a");
        assert!(OperatorConfig::try_parse_from(["x", "--lease-duration", "-1"]).is_err());
    }
}
