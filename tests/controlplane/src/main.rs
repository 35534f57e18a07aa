//! `vmstream-controlplane`: runs the local control plane (etcd +
//! kube-apiserver) in the foreground for `make up`, writing its kubeconfig
//! into the state directory, until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use vmstream_testenv::ControlPlane;

#[derive(Parser)]
#[command(about = "Run a local etcd + kube-apiserver on loopback")]
struct Args {
    /// State directory (etcd data, certs, logs, kubeconfig).
    #[arg(long, default_value = ".vmstream/controlplane")]
    dir: PathBuf,
    /// Address kube-apiserver listens on (e.g. a bridge address that node
    /// daemons in network namespaces can reach).
    #[arg(long, default_value = "127.0.0.1")]
    bind: std::net::Ipv4Addr,
}

fn main() {
    let args = Args::parse();
    let dir = std::path::absolute(&args.dir).unwrap_or(args.dir);
    let cp = match ControlPlane::start_with(Some(&dir), args.bind) {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("vmstream-controlplane: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "control plane ready; kubeconfig: {}",
        cp.kubeconfig().display()
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_stop(sig, stop.clone());
    }
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
    cp.stop();
}

static STOP: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    if let Some(flag) = STOP.get() {
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn register_stop(sig: libc::c_int, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let _ = STOP.set(flag);
    // SAFETY: the handler only performs an atomic store, which is async-signal-safe.
    unsafe {
        libc::signal(sig, on_signal as *const () as libc::sighandler_t);
    }
}
