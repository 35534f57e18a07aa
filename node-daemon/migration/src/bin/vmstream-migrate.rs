//! `vmstream-migrate target`: receives one migration (a small stand-in for
//! the node daemon's migration target, used by the network-namespace tests
//! and the benchmark: `ip netns exec NS vmstream-migrate target …`).
//!
//! Prints one JSON line per event on stdout (`listening`, `received`), then
//! answers line commands on stdin about the received VM:
//! `progress VCPU SINCE` (next counter report), `result SEQ` (the memory
//! guest's RESULT with that sequence number), `touch JSON` (run a touch),
//! `read GPA` (a guest qword), `quit`.

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vmstream_migration::{TargetOptions, receive};
use vmstream_pagestream::ClusterToken;
use vmstream_vmm::devices::mailbox::{Report, report, request};
use vmstream_vmm::guests::TouchCommand;
use vmstream_vmm::image::PageStore;
use vmstream_vmm::vstate::vm::KvmHost;

#[derive(Parser)]
#[command(about = "vmstream migration target (tests and benchmarks)")]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Receive one migration, then answer commands about the VM.
    Target {
        /// Address to listen on (port 0: any).
        #[arg(long)]
        listen: String,
        /// The live image the migrating VM was cloned from, as this node
        /// holds it.
        #[arg(long)]
        image: Option<PathBuf>,
        /// Cluster token.
        #[arg(long, env = "VMSTREAM_MIGRATION_TOKEN")]
        token: String,
        /// Crash (abort) after setting the state, before sending Ready.
        #[arg(long)]
        die_before_ready: bool,
        /// Seconds a lost link may take to come back.
        #[arg(long, default_value_t = 60)]
        recovery_timeout: u64,
    },
}

fn say(value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let Mode::Target {
        listen,
        image,
        token,
        die_before_ready,
        recovery_timeout,
    } = Cli::parse().command;
    if let Err(e) = run(&listen, image, &token, die_before_ready, recovery_timeout) {
        say(serde_json::json!({ "error": e }));
        std::process::exit(1);
    }
}

fn run(
    listen: &str,
    image: Option<PathBuf>,
    token: &str,
    die_before_ready: bool,
    recovery_timeout: u64,
) -> Result<(), String> {
    let token = ClusterToken::new(token.as_bytes().to_vec()).map_err(|e| e.to_string())?;
    let host = KvmHost::open().map_err(|e| format!("KVM: {e}"))?;
    let image = match image {
        Some(dir) => Some(Arc::new(
            PageStore::open(&dir).map_err(|e| format!("image {}: {e}", dir.display()))?,
        )),
        None => None,
    };
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    say(serde_json::json!({ "listening": addr.to_string() }));
    let mut options = TargetOptions::new(token, host, image);
    options.recovery_timeout = Duration::from_secs(recovery_timeout);
    if die_before_ready {
        options.before_ready = Some(Arc::new(|| std::process::abort()));
    }
    let received = receive(&listener, &options, None).map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(inner) = src {
            s.push_str(&format!(": {inner}"));
            src = inner.source();
        }
        s
    })?;
    say(serde_json::json!({ "received": received.side }));
    let side = received.side;
    let vm = received.vm;
    let timeout = Duration::from_secs(30);
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let mut words = line.splitn(2, ' ');
        let answer = match (words.next(), words.next()) {
            (Some("progress"), Some(rest)) => {
                let mut it = rest
                    .split_whitespace()
                    .filter_map(|w| w.parse::<u64>().ok());
                let (vcpu, since) = (it.next().unwrap_or(0) as u8, it.next().unwrap_or(0));
                vm.mailbox()
                    .wait_report(since, timeout, |r| {
                        r.kind == report::PROGRESS && r.vcpu == vcpu
                    })
                    .map(|r| serde_json::json!({ "index": r.index, "args": r.args }))
            }
            (Some("result"), Some(seq)) => {
                let seq: u64 = seq.trim().parse().unwrap_or(u64::MAX);
                let is_answer = |r: &Report| r.kind == report::RESULT && r.args[7] == seq;
                // The guest may have answered on the source before the
                // pause: the saved state keeps the latest report of each
                // kind (a restored mailbox's history starts empty).
                vm.mailbox()
                    .latest(report::RESULT)
                    .filter(|r| is_answer(r))
                    .or_else(|| vm.mailbox().wait_report(0, timeout, |r| is_answer(r)))
                    .map(|r| serde_json::json!({ "args": r.args }))
            }
            (Some("touch"), Some(json)) => match serde_json::from_str::<TouchCommand>(json) {
                Ok(cmd) => vm
                    .mailbox()
                    .call(request::TOUCH, cmd.args(), report::RESULT, timeout)
                    .ok()
                    .map(|r| serde_json::json!({ "args": r.args })),
                Err(e) => Some(serde_json::json!({ "error": e.to_string() })),
            },
            (Some("read"), Some(gpa)) => gpa
                .trim()
                .parse::<u64>()
                .ok()
                .and_then(|g| vm.ram().read_u64(g).ok())
                .map(|v| serde_json::json!({ "value": v })),
            (Some("stats"), _) => Some(serde_json::json!({
                "installed": vm.backing().lazy_memory().map(|m| m.populated().count_ones()),
                "stats": format!("{side:?}"),
            })),
            (Some("quit"), _) => break,
            _ => Some(serde_json::json!({ "error": format!("unknown command {line:?}") })),
        };
        say(answer.unwrap_or_else(|| serde_json::json!({ "error": "timed out" })));
    }
    vm.stop();
    Ok(())
}
