//! `vmstream-node`: the node daemon binary. It renews the node's heartbeat
//! Lease, publishes the node's VMNode status, watches the objects placed on
//! this node, and serves `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use vmstream_node::heartbeat::Heartbeat;
use vmstream_node::node_status::{self, NodeIdentity, SharedReport};
use vmstream_node::{host, placed};

#[derive(Parser, Debug)]
#[command(name = "vmstream-node", about = "vmstream node daemon", version)]
struct Args {
    /// This node's name (the Kubernetes Node name).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Namespace of the heartbeat Leases.
    #[arg(long, default_value = vmstream_api::DEFAULT_SYSTEM_NAMESPACE)]
    namespace: String,
    /// Directory for live images, the page cache and per-VM state.
    #[arg(long, default_value = "/var/lib/vmstream")]
    state_dir: PathBuf,
    /// Address other daemons reach this node's page-streaming server at.
    #[arg(long)]
    stream_addr: Option<String>,
    /// Address for /metrics and /healthz.
    #[arg(long, default_value = "127.0.0.1:7481")]
    metrics_addr: SocketAddr,
    /// Heartbeat renewal (and status publishing) interval in seconds.
    #[arg(long, default_value_t = 5)]
    heartbeat_interval: u64,
    /// Lease duration written into the heartbeat (default: 3 × interval).
    #[arg(long)]
    lease_duration: Option<u64>,
    /// Memory kept for the host; the rest is allocatable to VMs.
    #[arg(long, default_value_t = 1024)]
    reserved_memory_mib: u64,
    /// Merge identical pages written by different clones (KSM).
    #[arg(long)]
    ksm: bool,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if let Err(e) = run(args).await {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| format!("cannot create state dir {}: {e}", args.state_dir.display()))?;
    let client = kube::Client::try_default().await?;
    let capacity = host::capacity()?;
    let allocatable = host::allocatable(&capacity, args.reserved_memory_mib << 20);
    let interval = Duration::from_secs(args.heartbeat_interval.max(1));
    let heartbeat = Heartbeat {
        node: args.node_name.clone(),
        namespace: args.namespace.clone(),
        interval,
        lease_duration: Duration::from_secs(
            args.lease_duration
                .unwrap_or(3 * args.heartbeat_interval.max(1)),
        ),
    };
    // The first beat is synchronous so a misconfiguration fails loudly at start.
    heartbeat.renew(&client).await?;
    let identity = NodeIdentity {
        node: args.node_name.clone(),
        capacity,
        allocatable,
        address: args.stream_addr.clone(),
    };
    let report = SharedReport::default();
    node_status::publish(&client, &identity, &report.read().unwrap().clone()).await?;
    tracing::info!(node = %args.node_name, "node daemon running");

    let (stop_tx, stop_rx) = watch::channel(false);
    let placed = placed::watch(&client, &args.node_name);
    let mut registry = Registry::default();
    let placed_gauge = Gauge::<i64>::default();
    registry.register(
        "vmstream_node_placed_objects",
        "LiveImages, VMClones and VMMigrations placed on this node",
        placed_gauge.clone(),
    );
    let registry = Arc::new(registry);
    tokio::spawn(heartbeat.run(client.clone(), stop_rx.clone()));
    tokio::spawn(node_status::run(
        client.clone(),
        identity,
        report,
        interval,
        stop_rx.clone(),
    ));
    {
        let placed = placed.clone();
        tokio::spawn(async move {
            loop {
                let n = placed.images.state().len()
                    + placed.clones.state().len()
                    + placed.migrations.state().len();
                placed_gauge.set(n as i64);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    let _ = encode(&mut body, &registry);
                    body
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.metrics_addr))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    tracing::info!("node daemon stopping; VMs keep running");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
