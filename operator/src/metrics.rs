//! Prometheus metrics of the operator (prometheus-client) and the HTTP
//! endpoints that serve them with the health probes (axum).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    /// `up`, `down` or `none`.
    pub direction: String,
}

/// Every metric the operator exports.
pub struct OperatorMetrics {
    pub registry: Registry,
    pub reconciles: Family<KindLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub scale_decisions: Family<ScaleLabels, Counter>,
    pub placements: Family<KindLabels, Counter>,
    pub is_leader: Gauge,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("vmstream_operator");
        let reconciles = Family::<KindLabels, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let scale_decisions = Family::<ScaleLabels, Counter>::default();
        let placements = Family::<KindLabels, Counter>::default();
        let is_leader = Gauge::default();
        registry.register("reconciles", "Reconcile passes by kind", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconcile passes by kind and error variant",
            reconcile_errors.clone(),
        );
        registry.register(
            "scale_decisions",
            "VMAutoscaler decisions by direction",
            scale_decisions.clone(),
        );
        registry.register(
            "placements",
            "Objects placed on a node, by kind",
            placements.clone(),
        );
        registry.register(
            "is_leader",
            "1 while this replica holds the leader Lease",
            is_leader.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            scale_decisions,
            placements,
            is_leader,
        }
    }
}

impl OperatorMetrics {
    pub fn reconciled(&self, kind: &str) {
        self.reconciles
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn failed(&self, kind: &str, error: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                kind: kind.into(),
                error: error.into(),
            })
            .inc();
    }

    pub fn scaled(&self, direction: &str) {
        self.scale_decisions
            .get_or_create(&ScaleLabels {
                direction: direction.into(),
            })
            .inc();
    }

    pub fn placed(&self, kind: &str) {
        self.placements
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// State of the HTTP endpoints.
#[derive(Clone)]
pub struct Probes {
    pub metrics: Arc<OperatorMetrics>,
    /// Set once the process has initialised (client built, election running).
    pub ready: Arc<AtomicBool>,
}

async fn metrics(
    State(p): State<Probes>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    (
        StatusCode::OK,
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        p.metrics.encode(),
    )
}

async fn readyz(State(p): State<Probes>) -> (StatusCode, &'static str) {
    if p.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// Errors of the HTTP endpoint server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding the metrics address {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving HTTP on {addr}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Bind `addr`; the returned future serves `/metrics`, `/healthz`, `/readyz`.
pub async fn bind_probes(
    addr: SocketAddr,
    probes: Probes,
) -> Result<(SocketAddr, impl Future<Output = Result<(), ServeError>>), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(probes);
    let serve = async move {
        axum::serve(listener, app)
            .await
            .map_err(|source| ServeError::Serve {
                addr: local,
                source,
            })
    };
    Ok((local, serve))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_appear_in_the_exposition() {
        let m = OperatorMetrics::default();
        m.reconciled("ClonePool");
        m.failed("VMClone", "Patch");
        m.scaled("up");
        let text = m.encode();
        assert!(
            text.contains("vmstream_operator_reconciles_total{kind=\"ClonePool\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "vmstream_operator_reconcile_errors_total{kind=\"VMClone\",error=\"Patch\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("vmstream_operator_scale_decisions_total{direction=\"up\"} 1"),
            "{text}"
        );
    }
}
