//! `vmstream-node`: the node daemon binary. Without a subcommand (or with
//! `run`) it renews the node's heartbeat Lease, publishes the node's VMNode
//! status, supervises the node's VM processes, acts on the objects placed on
//! this node, and serves `/metrics` and `/healthz`. `vm` runs one VM (the
//! daemon spawns itself in this mode), `supervise` runs only the VM
//! supervisor (no API server), and `ctl` talks to the supervisor.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use vmstream_node::ctl::{CtlCommand, request_of};
use vmstream_node::error_chain::chain;
use vmstream_node::heartbeat::Heartbeat;
use vmstream_node::node_status::{self, NodeIdentity, SharedReport};
use vmstream_node::object_key::ObjectKey;
use vmstream_node::supervisor::VmSupervisor;
use vmstream_node::vm_process::VmProcessConfig;
use vmstream_node::vm_protocol::StartSpec;
use vmstream_node::{
    cgroup, host, memory_budget, migration_actions, node_actions, page_service, placed,
    supervisor_api,
};

#[derive(Parser, Debug)]
#[command(
    name = "vmstream-node",
    about = "vmstream node daemon",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    daemon: Args,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// The node daemon (the default).
    Run(Args),
    /// Run one VM in this process (spawned by the daemon).
    Vm(VmArgs),
    /// Supervise the VM processes of a state directory without an API server.
    Supervise(SuperviseArgs),
    /// Talk to the supervisor (or, when no daemon runs, act directly).
    Ctl(CtlArgs),
}

/// Where VM processes put their cgroups.
#[derive(clap::Args, Debug, Clone)]
struct CgroupArgs {
    /// cgroup v2 roots to try for per-VM cgroups (default: the usual mounts).
    #[arg(long = "cgroup-root")]
    cgroup_roots: Vec<PathBuf>,
    /// Do not put VM processes in cgroups.
    #[arg(long)]
    no_cgroup: bool,
}

impl CgroupArgs {
    fn roots(&self) -> Vec<PathBuf> {
        if self.no_cgroup {
            Vec::new()
        } else if self.cgroup_roots.is_empty() {
            cgroup::CANDIDATE_ROOTS.iter().map(PathBuf::from).collect()
        } else {
            self.cgroup_roots.clone()
        }
    }
}

#[derive(clap::Args, Debug)]
struct VmArgs {
    #[arg(long)]
    id: String,
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    #[arg(long, conflicts_with = "memory_mib")]
    memory_bytes: Option<u64>,
    #[arg(long, default_value_t = 16)]
    memory_mib: u64,
    /// Start at once with this start spec (JSON); otherwise wait warm.
    #[arg(long)]
    start: Option<String>,
    #[arg(long)]
    prepare_lazy: bool,
    #[arg(long)]
    preload_image: Option<PathBuf>,
    /// Mark a clone's guest RAM mergeable (KSM).
    #[arg(long)]
    ksm: bool,
    /// Lazy clones copy their whole image in the background.
    #[arg(long)]
    lazy_prefetch: bool,
    /// Owning object (JSON).
    #[arg(long)]
    owner: Option<String>,
    #[command(flatten)]
    cgroup: CgroupArgs,
}

#[derive(clap::Args, Debug)]
struct SuperviseArgs {
    #[arg(long, default_value = "/var/lib/vmstream")]
    state_dir: PathBuf,
    #[command(flatten)]
    cgroup: CgroupArgs,
    #[command(flatten)]
    memory: MemoryArgs,
}

/// Page sharing and the node's memory budget.
#[derive(clap::Args, Debug, Clone)]
struct MemoryArgs {
    /// Merge identical pages written by different clones (KSM).
    #[arg(long)]
    ksm: bool,
    /// Lazy clones copy their whole image in the background after starting.
    #[arg(long)]
    lazy_prefetch: bool,
    /// Memory the VM processes may use together (sum of their PSS); over
    /// it, clones give back clean pages that still equal their image.
    #[arg(long)]
    memory_budget_mib: Option<u64>,
    /// How often the memory budget is checked, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    memory_budget_interval_ms: u64,
}

impl MemoryArgs {
    /// Starts the budget loop on the current runtime, if a budget is set.
    fn spawn_budget(&self, supervisor: &Arc<VmSupervisor>) {
        if let Some(mib) = self.memory_budget_mib {
            tracing::info!(budget_mib = mib, "enforcing the node memory budget");
            tokio::spawn(memory_budget::run(
                Arc::new(memory_budget::MemoryBudget::new(mib << 20)),
                Arc::clone(supervisor),
                Duration::from_millis(self.memory_budget_interval_ms.max(50)),
            ));
        }
    }
}

#[derive(clap::Args, Debug)]
struct CtlArgs {
    #[arg(long, default_value = "/var/lib/vmstream")]
    state_dir: PathBuf,
    #[command(flatten)]
    cgroup: CgroupArgs,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(clap::Args, Debug)]
struct Args {
    /// This node's name (the Kubernetes Node name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Namespace of the heartbeat Leases.
    #[arg(long, default_value = vmstream_api::DEFAULT_SYSTEM_NAMESPACE)]
    namespace: String,
    /// Directory for live images, the page cache and per-VM state.
    #[arg(long, default_value = "/var/lib/vmstream")]
    state_dir: PathBuf,
    /// Address other daemons reach this node's page-streaming server at
    /// (the server binds it).
    #[arg(long)]
    stream_addr: Option<String>,
    /// File with the cluster's page-streaming token (else env
    /// VMSTREAM_STREAM_TOKEN, else a fixed development token).
    #[arg(long)]
    stream_token_file: Option<PathBuf>,
    /// Loopback address of the relay serving remote images to this node's
    /// VM processes (fixed, so VMs keep it across daemon restarts).
    #[arg(long, default_value = "127.0.0.1:7482")]
    relay_addr: String,
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
    #[command(flatten)]
    memory: MemoryArgs,
    /// How often placed objects are acted on, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    sync_interval_ms: u64,
    #[command(flatten)]
    cgroup: CgroupArgs,
}

fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::parse();
    // `ctl` prints its answer on stdout; keep its stderr for problems.
    init_logging(if matches!(cli.mode, Some(Mode::Ctl(_))) {
        "warn"
    } else {
        "info"
    });
    let result = match cli.mode {
        None => daemon(cli.daemon),
        Some(Mode::Run(args)) => daemon(args),
        Some(Mode::Vm(args)) => vm_mode(args),
        Some(Mode::Supervise(args)) => supervise(args),
        Some(Mode::Ctl(args)) => ctl(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

type MainResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn vm_mode(args: VmArgs) -> MainResult {
    let start: Option<StartSpec> = match &args.start {
        Some(json) => Some(serde_json::from_str(json).map_err(|e| format!("--start: {e}"))?),
        None => None,
    };
    let owner: Option<ObjectKey> = match &args.owner {
        Some(json) => Some(serde_json::from_str(json).map_err(|e| format!("--owner: {e}"))?),
        None => None,
    };
    let memory_bytes = args.memory_bytes.unwrap_or(args.memory_mib << 20);
    vmstream_node::vm_process::run(VmProcessConfig {
        id: args.id,
        state_dir: args.state_dir,
        vcpus: args.vcpus,
        memory_bytes: usize::try_from(memory_bytes).map_err(|_| "memory size too large")?,
        start,
        prepare_lazy: args.prepare_lazy,
        preload_image: args.preload_image,
        owner,
        cgroup_roots: args.cgroup.roots(),
        ksm: args.ksm,
        lazy_prefetch: args.lazy_prefetch,
    })
    .map_err(|e| chain(&e).into())
}

fn new_supervisor(
    state_dir: &std::path::Path,
    cgroup: &CgroupArgs,
    memory: &MemoryArgs,
) -> MainResult<(Arc<VmSupervisor>, supervisor_api::SupervisorSocket)> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| format!("cannot create state dir {}: {e}", state_dir.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let supervisor = Arc::new(
        VmSupervisor::new(state_dir, exe, cgroup.roots())
            .with_ksm(memory.ksm)
            .with_lazy_prefetch(memory.lazy_prefetch),
    );
    let report = supervisor.adopt_all().map_err(|e| chain(&e))?;
    tracing::info!(
        adopted = report.adopted.len(),
        removed = report.removed.len(),
        kept = report.kept.len(),
        "VM processes scanned"
    );
    let socket = supervisor_api::serve(Arc::clone(&supervisor))
        .map_err(|e| format!("cannot listen on the supervisor socket: {e}"))?;
    Ok((supervisor, socket))
}

/// How long a stopping daemon waits for forwarded requests to be answered.
const SOCKET_GRACE: Duration = Duration::from_secs(10);

/// Stops the supervisor socket, letting requests already forwarded to VMs
/// finish so none is applied without its answer reaching the caller.
fn stop_socket(socket: &supervisor_api::SupervisorSocket) {
    let left = socket.shutdown(SOCKET_GRACE);
    if left > 0 {
        tracing::warn!(requests = left, "stopping with requests still unanswered");
    }
}

fn supervise(args: SuperviseArgs) -> MainResult {
    let (supervisor, socket) = new_supervisor(&args.state_dir, &args.cgroup, &args.memory)?;
    tracing::info!(state_dir = %args.state_dir.display(), "supervising VM processes");
    runtime()?.block_on(async move {
        args.memory.spawn_budget(&supervisor);
        let reaper = {
            let supervisor = Arc::clone(&supervisor);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let s = Arc::clone(&supervisor);
                    let _ = tokio::task::spawn_blocking(move || s.forget_dead()).await;
                }
            })
        };
        shutdown_signal().await;
        reaper.abort();
    });
    stop_socket(&socket);
    tracing::info!("supervisor stopping; VMs keep running");
    Ok(())
}

fn ctl(args: CtlArgs) -> MainResult {
    let request = request_of(args.command).map_err(|e| chain(&e))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let reply = supervisor_api::ctl(&args.state_dir, exe, args.cgroup.roots(), request)
        .map_err(|e| chain(&e))?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(())
}

fn daemon(args: Args) -> MainResult {
    runtime()?.block_on(run(args))
}

async fn run(args: Args) -> MainResult {
    let node_name = args
        .node_name
        .clone()
        .ok_or("--node-name (or NODE_NAME) is required")?;
    let (supervisor, socket) = {
        let state_dir = args.state_dir.clone();
        let cgroup = args.cgroup.clone();
        let memory = args.memory.clone();
        tokio::task::spawn_blocking(move || {
            new_supervisor(&state_dir, &cgroup, &memory).map_err(|e| e.to_string())
        })
        .await??
    };
    args.memory.spawn_budget(&supervisor);
    let client = kube::Client::try_default().await?;
    let capacity = host::capacity()?;
    let allocatable = host::allocatable(&capacity, args.reserved_memory_mib << 20);
    let interval = Duration::from_secs(args.heartbeat_interval.max(1));
    let heartbeat = Heartbeat {
        node: node_name.clone(),
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
        node: node_name.clone(),
        capacity,
        allocatable,
        address: args.stream_addr.clone(),
    };
    let report = SharedReport::default();
    let snapshot = report.read().map(|r| r.clone()).unwrap_or_default();
    node_status::publish(&client, &identity, &snapshot).await?;
    tracing::info!(node = %node_name, "node daemon running");

    let (stop_tx, stop_rx) = watch::channel(false);
    let placed = placed::watch(&client, &node_name);
    let actions = node_actions::NodeActions::new(
        client.clone(),
        node_name.clone(),
        args.state_dir.clone(),
        Arc::clone(&supervisor),
        placed.clone(),
        report.clone(),
    );
    {
        let state_dir = args.state_dir.clone();
        let token_file = args.stream_token_file.clone();
        let stream_addr = args.stream_addr.clone();
        let relay_addr = args.relay_addr.clone();
        let service = tokio::task::spawn_blocking(move || {
            let token = page_service::load_token(token_file.as_deref())?;
            page_service::PageService::start(
                &state_dir,
                &token,
                stream_addr.as_deref(),
                &relay_addr,
            )
        })
        .await?
        .map_err(|e| chain(&e))?;
        tracing::info!(public = ?service.public_addr(), relay = %service.relay_addr(), "page streaming ready");
        actions.set_page_service(service);
    }
    tokio::spawn(actions.run(Duration::from_millis(args.sync_interval_ms.max(50))));
    match migration_actions::listen_ip(args.stream_addr.as_deref()) {
        Some(ip) => {
            let token_file = migration_actions::write_token_file(
                &args.state_dir,
                args.stream_token_file.as_deref(),
            )
            .map_err(|e| format!("cannot write the migration token file: {e}"))?;
            let migrations = migration_actions::MigrationActions::new(
                client.clone(),
                node_name.clone(),
                args.state_dir.clone(),
                Arc::clone(&supervisor),
                placed.migrations.clone(),
                placed::watch_source_migrations(&client, &node_name),
                placed.clones.clone(),
                ip,
                token_file,
            );
            tokio::spawn(migrations.run(Duration::from_millis(args.sync_interval_ms.max(50))));
        }
        None => tracing::warn!(
            "no --stream-addr with an IP address: this node takes no part in migrations"
        ),
    }
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
    tokio::task::spawn_blocking(move || stop_socket(&socket)).await?;
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
