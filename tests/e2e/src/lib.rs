//! End-to-end harness: a whole vmstream on one machine. A real etcd +
//! kube-apiserver listening on a Linux bridge, the operator in the root
//! network namespace, and node daemons each in its own network namespace
//! joined to the bridge by a veth pair, so every node has its own address and
//! page streaming crosses a real network hop.
//!
//! [`Cluster`] owns everything it starts and removes it all when dropped —
//! daemon and VM processes, namespaces, the bridge, state directories — also
//! when a test fails.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmstream_testenv::ControlPlane;

pub mod mode;
pub mod requests;

/// Errors setting up the end-to-end cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("binary {0} not built: run `cargo build --workspace --bins`")]
    MissingBinary(PathBuf),
    #[error("e2e mode: {0}")]
    Mode(String),
    #[error("control plane: {0}")]
    ControlPlane(#[from] vmstream_testenv::StartError),
    #[error("control plane: {0}")]
    Api(#[from] vmstream_testenv::ControlPlaneError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn run(cmd: &str, args: &[&str]) -> Result<(), ClusterError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|source| ClusterError::Io {
            what: format!("run {cmd}"),
            source,
        })?;
    if !out.status.success() {
        return Err(ClusterError::Command {
            command: format!("{cmd} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// A built workspace binary, found next to the running test's target directory.
pub fn workspace_binary(name: &str) -> Result<PathBuf, ClusterError> {
    let exe = std::env::current_exe().map_err(|source| ClusterError::Io {
        what: "locate the test binary".into(),
        source,
    })?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    if candidate.exists() {
        Ok(candidate)
    } else {
        Err(ClusterError::MissingBinary(candidate))
    }
}

/// A bridge in the root namespace with one network namespace per node.
/// Addresses: `10.213.<subnet>.1` on the bridge, `.<2+i>` for node i.
pub struct NodeNetwork {
    bridge: String,
    subnet: u8,
    /// Names this network's interfaces and namespaces.
    tag: u32,
    namespaces: Vec<String>,
}

impl NodeNetwork {
    /// Creates the bridge (name and subnet chosen to avoid other runs).
    pub fn create() -> Result<Self, ClusterError> {
        // Unique per process and per network within it (a test binary may
        // hold several clusters): interface names stay within 15 bytes.
        static CREATED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nth = CREATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = (std::process::id() % 10_000) * 10 + nth % 10;
        let subnet = ((std::process::id() + nth) % 200) as u8 + 20;
        let bridge = format!("vmstbr{tag}");
        let net = NodeNetwork {
            bridge: bridge.clone(),
            subnet,
            tag,
            namespaces: Vec::new(),
        };
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", net.host_ip()),
                "dev",
                &bridge,
            ],
        )?;
        run("ip", &["link", "set", &bridge, "up"])?;
        Ok(net)
    }

    /// The bridge's (root namespace's) address.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 1)
    }

    /// Adds namespace for node `index` (0-based); returns (namespace, address).
    pub fn add_node(&mut self, index: usize) -> Result<(String, Ipv4Addr), ClusterError> {
        let tag = self.tag;
        let ns = format!("vmst{tag}n{index}");
        let host_end = format!("vmst{tag}h{index}");
        let ip = Ipv4Addr::new(10, 213, self.subnet, 2 + index as u8);
        run("ip", &["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        run(
            "ip",
            &[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        run(
            "ip",
            &["link", "set", &host_end, "master", &self.bridge, "up"],
        )?;
        run(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok((ns, ip))
    }

    /// Takes node `index`'s link down (`up = false`) or up again.
    pub fn set_link(&self, index: usize, up: bool) -> Result<(), ClusterError> {
        let host_end = format!("vmst{}h{index}", self.tag);
        run(
            "ip",
            &["link", "set", &host_end, if up { "up" } else { "down" }],
        )
    }
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..) {
            // Deleting the namespace destroys the veth pair with it.
            let _ = run("ip", &["netns", "del", &ns]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}

/// One node daemon, running in its namespace.
pub struct Node {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub state_dir: PathBuf,
    daemon: Option<Child>,
}

impl Node {
    /// The daemon's pid, while it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// Pids of this node's VM processes (from their `vm.json` records).
    pub fn vm_pids(&self) -> Vec<u32> {
        self.vm_pids_by_id().into_values().collect()
    }

    /// This node's VM processes: VM id → pid (from their `vm.json` records).
    pub fn vm_pids_by_id(&self) -> std::collections::BTreeMap<String, u32> {
        let mut pids = std::collections::BTreeMap::new();
        let Ok(entries) = fs::read_dir(self.state_dir.join("vms")) else {
            return pids;
        };
        for entry in entries.flatten() {
            let Ok(text) = fs::read_to_string(entry.path().join("vm.json")) else {
                continue;
            };
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if let Some(pid) = value["pid"].as_u64() {
                pids.insert(entry.file_name().to_string_lossy().into_owned(), pid as u32);
            }
        }
        pids
    }
}

/// Everything an end-to-end test runs against.
pub struct Cluster {
    // Field order is drop order: processes first, then the API server, then the network.
    operator: Option<Child>,
    pub nodes: Vec<Node>,
    cp: ControlPlane,
    net: NodeNetwork,
    dir: tempfile::TempDir,
    pub system_namespace: String,
    /// What the cluster was started with (restarts use the same settings).
    options: ClusterOptions,
}

/// Options of [`Cluster::start`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub heartbeat_interval_s: u64,
    pub heartbeat_timeout_s: f64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            heartbeat_interval_s: 1,
            heartbeat_timeout_s: 4.0,
        }
    }
}

impl Cluster {
    /// Starts the bridge, the control plane on the bridge address, the CRDs,
    /// the operator and `options.nodes` node daemons, and waits until every
    /// node has published its VMNode.
    pub async fn start(options: ClusterOptions) -> Result<Cluster, ClusterError> {
        match mode::mode() {
            Ok(mode::E2eMode::Local) => {}
            Ok(mode::E2eMode::ExistingCluster { kubeconfig }) => {
                return Err(ClusterError::Mode(format!(
                    "an existing cluster is selected ({}), and this test starts a local one: \
                     in that mode run `cargo test -p vmstream-e2e --test any_cluster_e2e`",
                    kubeconfig.display()
                )));
            }
            Err(e) => return Err(ClusterError::Mode(e.to_string())),
        }
        let operator_bin = workspace_binary("vmstream-operator")?;
        let node_bin = workspace_binary("vmstream-node")?;
        let dir = tempfile::Builder::new()
            .prefix("vmstream-e2e-")
            .tempdir()
            .map_err(|source| ClusterError::Io {
                what: "create the e2e directory".into(),
                source,
            })?;
        let mut net = NodeNetwork::create()?;
        let cp = ControlPlane::start_with(None, net.host_ip())?;
        cp.install_crds(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds"))?;
        let system_namespace = "vmstream-system".to_string();
        cp.kubectl_ok(&["create", "namespace", &system_namespace])?;

        let mut nodes = Vec::new();
        for i in 0..options.nodes {
            let (netns, ip) = net.add_node(i)?;
            nodes.push(Node {
                name: format!("node-{i}"),
                netns,
                ip,
                state_dir: dir.path().join(format!("node-{i}")),
                daemon: None,
            });
        }
        let log_dir = dir.path().join("logs");
        fs::create_dir_all(&log_dir).map_err(|source| ClusterError::Io {
            what: "create log dir".into(),
            source,
        })?;
        let operator = Command::new(&operator_bin)
            .env("KUBECONFIG", cp.kubeconfig())
            .env("RUST_LOG", "info")
            .args([
                "--namespace",
                &system_namespace,
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(["--lease-duration", "3", "--autoscale-interval", "1"])
            .args([
                "--heartbeat-timeout",
                &options.heartbeat_timeout_s.to_string(),
            ])
            .args(["--overcommit-ratio", "4"])
            .stdout(Stdio::null())
            .stderr(log(&log_dir.join("operator.log"))?)
            .spawn()
            .map_err(|source| ClusterError::Io {
                what: "start the operator".into(),
                source,
            })?;
        let mut cluster = Cluster {
            operator: Some(operator),
            nodes,
            cp,
            net,
            dir,
            system_namespace,
            options: options.clone(),
        };
        for i in 0..options.nodes {
            cluster.start_node(i, &node_bin, options.heartbeat_interval_s)?;
        }
        Ok(cluster)
    }

    /// Starts (or restarts) node `index`'s daemon inside its namespace.
    pub fn start_node(
        &mut self,
        index: usize,
        node_bin: &Path,
        heartbeat_interval_s: u64,
    ) -> Result<(), ClusterError> {
        let log_path = self
            .dir
            .path()
            .join("logs")
            .join(format!("node-{index}.log"));
        let kubeconfig = self.cp.kubeconfig().to_path_buf();
        let node = &mut self.nodes[index];
        let daemon = Command::new("ip")
            .args(["netns", "exec", &node.netns])
            .arg(node_bin)
            .args([
                "--node-name",
                &node.name,
                "--namespace",
                &self.system_namespace,
            ])
            .arg("--state-dir")
            .arg(&node.state_dir)
            .args(["--stream-addr", &format!("{}:7480", node.ip)])
            .args(["--metrics-addr", &format!("{}:7481", node.ip)])
            .args(["--heartbeat-interval", &heartbeat_interval_s.to_string()])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(append_log(&log_path)?)
            .spawn()
            .map_err(|source| ClusterError::Io {
                what: format!("start {}", node.name),
                source,
            })?;
        node.daemon = Some(daemon);
        Ok(())
    }

    /// Restarts node `index`'s daemon (after [`Cluster::kill_node_daemon`]
    /// or [`Cluster::stop_node_daemon`]) with the cluster's heartbeat interval.
    pub fn restart_node(&mut self, index: usize) -> Result<(), ClusterError> {
        let node_bin = workspace_binary("vmstream-node")?;
        let interval = self.options.heartbeat_interval_s;
        self.start_node(index, &node_bin, interval)
    }

    /// Stops node `index`'s daemon the way an upgrade does: SIGTERM, then
    /// wait for it to exit (SIGKILL after `grace`). Returns whether it exited
    /// on its own. Its VM processes keep running.
    pub fn stop_node_daemon(&mut self, index: usize, grace: Duration) -> bool {
        let Some(mut child) = self.nodes[index].daemon.take() else {
            return true;
        };
        // SAFETY: kill(2) on our own child's pid (`ip netns exec` execs the
        // daemon, so the pid is the daemon's); it has not been reaped yet.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// SIGKILLs node `index`'s daemon; its VM processes keep running.
    pub fn kill_node_daemon(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops node `index` entirely: SIGKILLs its daemon and every VM process
    /// (a machine that died). Its state directory stays, as a dead disk would.
    pub fn stop_node(&mut self, index: usize) {
        self.kill_node_daemon(index);
        for pid in self.nodes[index].vm_pids() {
            // SAFETY: kill(2) on a pid read from this node's VM records; at worst ESRCH.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        let _ = self.net.set_link(index, false);
    }

    /// SIGKILLs the operator.
    pub fn kill_operator(&mut self) {
        if let Some(mut child) = self.operator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the operator again after [`Cluster::kill_operator`].
    pub fn restart_operator(&mut self) -> Result<(), ClusterError> {
        let operator_bin = workspace_binary("vmstream-operator")?;
        let child = Command::new(&operator_bin)
            .env("KUBECONFIG", self.cp.kubeconfig())
            .env("RUST_LOG", "info")
            .args([
                "--namespace",
                &self.system_namespace,
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(["--lease-duration", "3", "--autoscale-interval", "1"])
            .args([
                "--heartbeat-timeout",
                &self.options.heartbeat_timeout_s.to_string(),
            ])
            .args(["--overcommit-ratio", "4"])
            .stdout(Stdio::null())
            .stderr(append_log(&self.dir.path().join("logs/operator.log"))?)
            .spawn()
            .map_err(|source| ClusterError::Io {
                what: "restart the operator".into(),
                source,
            })?;
        self.operator = Some(child);
        Ok(())
    }

    /// The control plane (kubectl, clients, namespaces).
    pub fn control_plane(&self) -> &ControlPlane {
        &self.cp
    }

    /// The node network (link control).
    pub fn network(&self) -> &NodeNetwork {
        &self.net
    }

    /// Runs `vmstream-node ctl --state-dir <node's> args...` and parses its JSON reply.
    pub fn ctl(&self, index: usize, args: &[&str]) -> Result<serde_json::Value, String> {
        let bin = workspace_binary("vmstream-node").map_err(|e| e.to_string())?;
        let out = Command::new(bin)
            .args(["ctl", "--state-dir"])
            .arg(&self.nodes[index].state_dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// Index of the node named `node` in [`Cluster::nodes`].
    pub fn node_index(&self, node: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == node)
            .unwrap_or_else(|| panic!("unknown node {node}"))
    }

    /// Sends request `n` to the request-guest VM `vm_id` on node `index`
    /// (through its supervisor) and returns the guest's answer.
    pub fn request(&self, index: usize, vm_id: &str, n: u64) -> Result<u64, String> {
        let reply = self.ctl(index, &["request", vm_id, &n.to_string()])?;
        reply["reply"]["answer"]
            .as_u64()
            .ok_or_else(|| format!("no answer in {reply}"))
    }

    /// How requests reach this cluster's VMs (`ctl` on each node's state
    /// directory), for a [`requests::RequestDriver`].
    pub fn request_path(&self) -> Result<requests::RequestPath, ClusterError> {
        Ok(requests::RequestPath::Local {
            node_binary: workspace_binary("vmstream-node")?,
            state_dirs: self
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.state_dir.clone()))
                .collect(),
        })
    }

    /// Requests straight to each daemon's supervisor socket (no `ctl`
    /// process per request).
    pub fn supervisor_path(&self) -> requests::RequestPath {
        requests::RequestPath::Supervisor {
            state_dirs: self
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.state_dir.clone()))
                .collect(),
        }
    }

    /// Where the logs of the operator and daemons are.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// Prints the last lines of every log (for failing tests).
    pub fn dump_logs(&self) {
        let Ok(entries) = fs::read_dir(self.log_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("==== {} ====", entry.path().display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.kill_operator();
        for i in 0..self.nodes.len() {
            self.kill_node_daemon(i);
        }
        // VM processes outlive daemons by design: stop them explicitly.
        for node in &self.nodes {
            for pid in node.vm_pids() {
                // SAFETY: kill(2) on a pid read from our own VM records; at worst ESRCH.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for node in &self.nodes {
            for pid in node.vm_pids() {
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        self.cp.stop();
        // cgroups of VM processes (the daemon removes them on clean stops).
        for root in ["/sys/fs/cgroup/unified/vmstream", "/sys/fs/cgroup/vmstream"] {
            if let Ok(entries) = fs::read_dir(root) {
                for entry in entries.flatten() {
                    let _ = fs::remove_dir(entry.path());
                }
            }
        }
    }
}

fn log(path: &Path) -> Result<fs::File, ClusterError> {
    fs::File::create(path).map_err(|source| ClusterError::Io {
        what: format!("create {}", path.display()),
        source,
    })
}

fn append_log(path: &Path) -> Result<fs::File, ClusterError> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ClusterError::Io {
            what: format!("open {}", path.display()),
            source,
        })
}

/// Polls `f` every 200 ms until it returns `Some`, or panics after `secs`.
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Applies (server-side) a VMClone `name` of LiveImage `image`, with
/// `spec` fields added to it (e.g. `{"placement": {...}}`).
pub async fn apply_clone(
    clones: &kube::Api<vmstream_api::v1alpha1::VMClone>,
    name: &str,
    image: &str,
    spec: serde_json::Value,
) {
    let mut spec_json = serde_json::json!({ "liveImage": image });
    if let (Some(all), serde_json::Value::Object(extra)) = (spec_json.as_object_mut(), spec) {
        all.extend(extra);
    }
    clones
        .patch(
            name,
            &kube::api::PatchParams::apply("e2e").force(),
            &kube::api::Patch::Apply(serde_json::json!({
                "apiVersion": "vmstream.io/v1alpha1", "kind": "VMClone",
                "metadata": {"name": name},
                "spec": spec_json
            })),
        )
        .await
        .unwrap_or_else(|e| panic!("apply VMClone {name}: {e}"));
}

/// Waits up to `secs` for VMClone `name` to be Running (panics at once if
/// it Failed) and returns it.
pub async fn clone_running(
    clones: &kube::Api<vmstream_api::v1alpha1::VMClone>,
    name: &str,
    secs: u64,
) -> vmstream_api::v1alpha1::VMClone {
    use vmstream_api::v1alpha1::VMClonePhase;
    eventually(&format!("VMClone {name} Running"), secs, || async {
        let c = clones.get(name).await.ok()?;
        assert_ne!(
            c.phase(),
            VMClonePhase::Failed,
            "{name} failed: {:?}",
            c.status
        );
        (c.phase() == VMClonePhase::Running).then_some(c)
    })
    .await
}

/// Applies a VMMigration `name` with `spec` and waits up to `secs` for it
/// to succeed (panics at once if it failed); returns its status.
pub async fn migrate(
    migrations: &kube::Api<vmstream_api::v1alpha1::VMMigration>,
    name: &str,
    spec: serde_json::Value,
    secs: u64,
) -> vmstream_api::v1alpha1::VMMigrationStatus {
    use vmstream_api::v1alpha1::VMMigrationPhase;
    migrations
        .patch(
            name,
            &kube::api::PatchParams::apply("e2e").force(),
            &kube::api::Patch::Apply(serde_json::json!({
                "apiVersion": "vmstream.io/v1alpha1", "kind": "VMMigration",
                "metadata": {"name": name},
                "spec": spec
            })),
        )
        .await
        .unwrap_or_else(|e| panic!("apply VMMigration {name}: {e}"));
    eventually(&format!("VMMigration {name} Succeeded"), secs, || async {
        let m = migrations.get(name).await.ok()?;
        assert_ne!(
            m.phase(),
            VMMigrationPhase::Failed,
            "migration {name} failed: {:?}",
            m.status
        );
        (m.phase() == VMMigrationPhase::Succeeded).then_some(m.status?)
    })
    .await
}

/// The VM id the node daemon gives the VMClone `name` in namespace `ns`.
pub fn clone_vm_id(ns: &str, name: &str) -> String {
    format!("vmc.{ns}.{name}")
}

/// The request guest answers `n·1000003 + served`: the number of requests it
/// has served, including this one.
pub fn served(n: u64, answer: u64) -> u64 {
    answer.wrapping_sub(n.wrapping_mul(1_000_003))
}

/// Applies a LiveImage `name` booted from the request guest (1 vCPU,
/// `memory_mib` MiB) and waits until it is Ready.
pub async fn ready_request_image(
    images: &kube::Api<vmstream_api::v1alpha1::LiveImage>,
    name: &str,
    memory_mib: u32,
) -> vmstream_api::v1alpha1::LiveImage {
    use vmstream_api::v1alpha1::LiveImagePhase;
    images
        .patch(
            name,
            &kube::api::PatchParams::apply("e2e").force(),
            &kube::api::Patch::Apply(serde_json::json!({
                "apiVersion": "vmstream.io/v1alpha1", "kind": "LiveImage",
                "metadata": {"name": name},
                "spec": {"source": {"boot": {"guest": "Request", "vcpus": 1, "memoryMiB": memory_mib}}}
            })),
        )
        .await
        .expect("apply the LiveImage");
    eventually("LiveImage Ready", 90, || async {
        let i = images.get(name).await.ok()?;
        assert_ne!(
            i.phase(),
            LiveImagePhase::Failed,
            "image failed: {:?}",
            i.status
        );
        (i.phase() == LiveImagePhase::Ready).then_some(i)
    })
    .await
}
