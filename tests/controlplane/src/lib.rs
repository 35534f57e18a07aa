//! A real local Kubernetes control plane for vmstream's integration tests and
//! `make up`: etcd and kube-apiserver, built from Go modules by
//! `hack/controlplane/build.sh` at a pinned version, started on loopback on
//! free ports, with an admin kubeconfig.
//!
//! Tests share one instance per test process ([`ControlPlane::shared`]) and
//! each test takes its own namespace ([`ControlPlane::namespace`]). The
//! server processes die with the test process (`PR_SET_PDEATHSIG`), also when
//! it is killed; the state directory is removed at exit, and directories left
//! by killed runs are swept at the next start.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};

pub use vmstream_test_support::{Need, record_skip, require};

/// The Kubernetes version the control plane is built at (see `hack/controlplane/go.mod`).
pub const KUBERNETES_VERSION: &str = "v1.36.3";

/// Root of the per-run state directories (`<root>/<pid>-<n>`).
const STATE_ROOT: &str = "/tmp/vmstream-controlplane";

/// Errors while starting the control plane.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "control-plane binary {0} not found; build it with `make controlplane` (hack/controlplane/build.sh)"
    )]
    MissingBinary(PathBuf),
    #[error("cannot create state directory {path}: {source}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error("cannot spawn {what}: {source}")]
    Spawn {
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot generate the service-account key with openssl: {0}")]
    Keygen(String),
    #[error("{what} exited before becoming ready ({status}); its log is {log}")]
    Exited {
        what: &'static str,
        status: String,
        log: PathBuf,
    },
    #[error("{what} not ready after {secs} s; its log is {log}")]
    Timeout {
        what: &'static str,
        secs: u64,
        log: PathBuf,
    },
    #[error("cannot read kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("no free loopback port: {0}")]
    Port(io::Error),
}

/// Errors of operations against a running control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("kubectl {args}: {message}")]
    Kubectl { args: String, message: String },
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("CRDs in {dir} not established after {secs} s")]
    CrdsNotEstablished { dir: PathBuf, secs: u64 },
}

/// Directory holding `etcd`, `kube-apiserver` and `kubectl`:
/// `$VMSTREAM_BIN_DIR`, else `~/.cache/vmstream/bin-<KUBERNETES_VERSION>`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMSTREAM_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home)
        .join(".cache/vmstream")
        .join(format!("bin-{KUBERNETES_VERSION}"))
}

/// Why a control plane cannot be started here, or `None` when it can.
pub fn unavailable() -> Option<String> {
    if std::env::var_os("VMSTREAM_KUBECONFIG").is_some() {
        return None;
    }
    for bin in ["etcd", "kube-apiserver", "kubectl"] {
        let path = bin_dir().join(bin);
        if !path.exists() {
            return Some(format!(
                "{} missing: run `make controlplane` to build the local control plane",
                path.display()
            ));
        }
    }
    None
}

/// A running (or externally provided) control plane.
pub struct ControlPlane {
    kubeconfig: PathBuf,
    state_dir: Option<PathBuf>,
    children: Mutex<Vec<Child>>,
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

impl ControlPlane {
    /// The control plane shared by all tests of this process: the cluster in
    /// `$VMSTREAM_KUBECONFIG` when set, else one started on first use and
    /// stopped when the process exits.
    pub fn shared() -> Result<&'static ControlPlane, String> {
        SHARED
            .get_or_init(|| {
                let cp = match std::env::var_os("VMSTREAM_KUBECONFIG") {
                    Some(path) => Ok(ControlPlane::external(PathBuf::from(path))),
                    None => ControlPlane::start().map_err(|e| e.to_string()),
                };
                if cp.is_ok() {
                    // SAFETY: registering a plain extern "C" function with atexit.
                    unsafe {
                        libc::atexit(stop_shared_at_exit);
                    }
                }
                cp
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Wraps an existing cluster given by its kubeconfig; nothing is started or stopped.
    pub fn external(kubeconfig: PathBuf) -> ControlPlane {
        ControlPlane {
            kubeconfig,
            state_dir: None,
            children: Mutex::new(Vec::new()),
        }
    }

    /// Starts etcd and kube-apiserver on free loopback ports in a fresh state
    /// directory and waits until the API server is ready.
    pub fn start() -> Result<ControlPlane, StartError> {
        Self::start_in(None)
    }

    /// Like [`ControlPlane::start`], with the state kept in `dir` (for `make up`).
    pub fn start_in(dir: Option<&Path>) -> Result<ControlPlane, StartError> {
        Self::start_with(dir, std::net::Ipv4Addr::LOCALHOST)
    }

    /// Like [`ControlPlane::start_in`], with kube-apiserver listening on
    /// `bind` instead of loopback — e.g. the bridge address of test network
    /// namespaces, so node daemons inside them reach the API server. The
    /// kubeconfig names that address.
    pub fn start_with(
        dir: Option<&Path>,
        bind: std::net::Ipv4Addr,
    ) -> Result<ControlPlane, StartError> {
        let bins = bin_dir();
        for bin in ["etcd", "kube-apiserver"] {
            if !bins.join(bin).exists() {
                return Err(StartError::MissingBinary(bins.join(bin)));
            }
        }
        sweep_stale_state_dirs();
        let state_dir = match dir {
            Some(d) => d.to_path_buf(),
            None => {
                static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Path::new(STATE_ROOT).join(format!("{}-{n}", std::process::id()))
            }
        };
        let _ = fs::remove_dir_all(&state_dir);
        fs::create_dir_all(state_dir.join("certs")).map_err(|source| StartError::StateDir {
            path: state_dir.clone(),
            source,
        })?;
        let mut cp = ControlPlane {
            kubeconfig: state_dir.join("kubeconfig"),
            state_dir: Some(state_dir.clone()),
            children: Mutex::new(Vec::new()),
        };
        let token = format!("vmstream-admin-{:x}", rand_u64());
        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let api_port = free_port()?;

        // etcd
        let etcd_log = state_dir.join("etcd.log");
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = spawn_tied(
            Command::new(bins.join("etcd"))
                .arg(format!("--data-dir={}", state_dir.join("etcd").display()))
                .arg(format!("--listen-client-urls={etcd_url}"))
                .arg(format!("--advertise-client-urls={etcd_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=default={peer_url}"))
                .arg("--unsafe-no-fsync=true")
                .arg("--log-level=warn")
                .stdout(Stdio::null())
                .stderr(log_file(&etcd_log, &state_dir)?),
        )
        .map_err(|source| StartError::Spawn {
            what: "etcd",
            source,
        })?;
        cp.children.get_mut().unwrap().push(etcd);

        // service-account signing key
        let sa_key = state_dir.join("sa.key");
        let out = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048")
            .output()
            .map_err(|e| StartError::Keygen(e.to_string()))?;
        if !out.status.success() {
            return Err(StartError::Keygen(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        let tokens = state_dir.join("tokens.csv");
        fs::write(
            &tokens,
            format!("{token},vmstream-admin,vmstream-admin,\"system:masters\"\n"),
        )
        .map_err(|source| StartError::StateDir {
            path: tokens.clone(),
            source,
        })?;

        // kube-apiserver
        let api_log = state_dir.join("kube-apiserver.log");
        let api = spawn_tied(
            Command::new(bins.join("kube-apiserver"))
                .arg(format!("--etcd-servers={etcd_url}"))
                .arg(format!("--bind-address={bind}"))
                .arg(format!("--advertise-address={bind}"))
                .arg(format!("--secure-port={api_port}"))
                .arg(format!("--cert-dir={}", state_dir.join("certs").display()))
                .arg(format!("--token-auth-file={}", tokens.display()))
                .arg("--authorization-mode=RBAC")
                .arg("--service-account-issuer=https://kubernetes.default.svc")
                .arg(format!("--service-account-key-file={}", sa_key.display()))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    sa_key.display()
                ))
                .arg("--service-cluster-ip-range=10.96.0.0/16")
                .arg("--allow-privileged=true")
                .arg("--enable-priority-and-fairness=false")
                .arg("--disable-admission-plugins=ServiceAccount")
                .arg("--profiling=false")
                .arg("--v=0")
                .stdout(Stdio::null())
                .stderr(log_file(&api_log, &state_dir)?),
        )
        .map_err(|source| StartError::Spawn {
            what: "kube-apiserver",
            source,
        })?;
        cp.children.get_mut().unwrap().push(api);

        let server = format!("https://{bind}:{api_port}");
        fs::write(&cp.kubeconfig, kubeconfig_yaml(&server, &token)).map_err(|source| {
            StartError::StateDir {
                path: cp.kubeconfig.clone(),
                source,
            }
        })?;
        cp.wait_ready(&api_log)?;
        Ok(cp)
    }

    fn wait_ready(&self, api_log: &Path) -> Result<(), StartError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            {
                let mut children = self.children.lock().unwrap();
                for (i, child) in children.iter_mut().enumerate() {
                    if let Ok(Some(status)) = child.try_wait() {
                        let what = if i == 0 { "etcd" } else { "kube-apiserver" };
                        let log = self.state_dir.as_ref().unwrap().join(format!("{what}.log"));
                        return Err(StartError::Exited {
                            what,
                            status: status.to_string(),
                            log,
                        });
                    }
                }
            }
            let out = self.kubectl().args(["get", "--raw", "/readyz"]).output();
            if let Ok(out) = out
                && out.status.success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StartError::Timeout {
                    what: "kube-apiserver",
                    secs: 120,
                    log: api_log.to_path_buf(),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Path of the admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A `kube::Client` for the admin user.
    pub async fn client(&self) -> Result<kube::Client, ControlPlaneError> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .map_err(kube::Error::InferKubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(kube::Error::InferKubeconfig)?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A `kubectl` command (the pinned build when present) aimed at this cluster.
    pub fn kubectl(&self) -> Command {
        let pinned = bin_dir().join("kubectl");
        let mut cmd = Command::new(if pinned.exists() {
            pinned
        } else {
            PathBuf::from("kubectl")
        });
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        cmd
    }

    /// Runs kubectl with `args`, returning stdout; a failure carries stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String, ControlPlaneError> {
        let out = self
            .kubectl()
            .args(args)
            .output()
            .map_err(|e| ControlPlaneError::Kubectl {
                args: args.join(" "),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(ControlPlaneError::Kubectl {
                args: args.join(" "),
                message: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Applies every CRD YAML in `dir` (server-side) and waits until all are Established.
    pub fn install_crds(&self, dir: &Path) -> Result<(), ControlPlaneError> {
        let d = dir.display().to_string();
        self.kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", &d])?;
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            &d,
        ])
        .map_err(|_| ControlPlaneError::CrdsNotEstablished {
            dir: dir.to_path_buf(),
            secs: 60,
        })?;
        Ok(())
    }

    /// Creates a fresh namespace `<prefix>-<random>`; it is deleted when the guard drops.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace, ControlPlaneError> {
        let client = self.client().await?;
        let name = format!("{prefix}-{:08x}", rand_u64() as u32);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))
        .expect("static namespace manifest");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(TestNamespace { name, client })
    }

    /// Stops the processes and removes the state directory (also done on drop).
    pub fn stop(&self) {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        // apiserver first, then etcd
        while let Some(mut child) = children.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.state_dir
            && dir.starts_with(STATE_ROOT)
        {
            let _ = fs::remove_dir_all(dir);
        }
    }

    /// The state directory (logs, certs, etcd data), when this process started the server.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

extern "C" fn stop_shared_at_exit() {
    if let Some(Ok(cp)) = SHARED.get() {
        cp.stop();
    }
}

/// A namespace owned by one test; deleted (without waiting) when dropped.
pub struct TestNamespace {
    name: String,
    client: kube::Client,
}

impl TestNamespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A client for the cluster.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let client = self.client.clone();
        let name = self.name.clone();
        let delete = async move {
            let _ = Api::<Namespace>::all(client)
                .delete(&name, &DeleteParams::background())
                .await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(delete);
            }
            Err(_) => {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(delete);
                }
            }
        }
    }
}

/// Spawns `cmd` from a thread that lives as long as the process, with
/// `PR_SET_PDEATHSIG(SIGKILL)`, so the child dies with this process even when
/// it is killed (the death signal follows the *thread* that forked).
fn spawn_tied(cmd: &mut Command) -> io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    spawner().spawn(std::mem::replace(cmd, Command::new("true")))
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

struct Spawner(Mutex<mpsc::Sender<SpawnRequest>>);

impl Spawner {
    fn spawn(&self, cmd: Command) -> io::Result<Child> {
        let (tx, rx) = mpsc::channel();
        self.0
            .lock()
            .unwrap()
            .send((cmd, tx))
            .map_err(|_| io::Error::other("spawner gone"))?;
        rx.recv().map_err(|_| io::Error::other("spawner gone"))?
    }
}

fn spawner() -> &'static Spawner {
    static SPAWNER: OnceLock<Spawner> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("controlplane-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // Keep the thread (and so the children's death-signal anchor) alive.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn controlplane-spawner thread");
        Spawner(Mutex::new(tx))
    })
}

fn log_file(path: &Path, state_dir: &Path) -> Result<fs::File, StartError> {
    fs::File::create(path).map_err(|source| StartError::StateDir {
        path: state_dir.to_path_buf(),
        source,
    })
}

fn free_port() -> Result<u16, StartError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(StartError::Port)?;
    Ok(l.local_addr().map_err(StartError::Port)?.port())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

/// Removes state directories of earlier runs whose process no longer exists.
fn sweep_stale_state_dirs() {
    let Ok(entries) = fs::read_dir(STATE_ROOT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn kubeconfig_yaml(server: &str, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: vmstream-local
  cluster:
    server: {server}
    insecure-skip-tls-verify: true
users:
- name: vmstream-admin
  user:
    token: {token}
contexts:
- name: vmstream-local
  context:
    cluster: vmstream-local
    user: vmstream-admin
current-context: vmstream-local
"
    )
}

/// Returns early from the calling test (recording the skip) when no control
/// plane can be had here.
#[macro_export]
macro_rules! require_control_plane {
    ($test:expr) => {{
        if let Some(why) = $crate::unavailable() {
            $crate::record_skip($test, &why);
            return;
        }
        $crate::ControlPlane::shared().expect("start the local control plane")
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_names_server_and_token() {
        let y = kubeconfig_yaml("https://127.0.0.1:1234", "tok");
        assert!(y.contains("server: https://127.0.0.1:1234"));
        assert!(y.contains("token: tok"));
        let parsed: serde_yaml::Value = serde_yaml::from_str(&y).unwrap();
        assert_eq!(parsed["current-context"], "vmstream-local");
    }

    #[test]
    fn bin_dir_is_keyed_by_version() {
        if std::env::var_os("VMSTREAM_BIN_DIR").is_none() {
            assert!(bin_dir().ends_with(format!("bin-{KUBERNETES_VERSION}")));
        }
    }
}
