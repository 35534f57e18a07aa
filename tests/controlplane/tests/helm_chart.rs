//! The Helm chart: `helm lint` passes, and everything `helm template`
//! renders (CRDs included) is accepted by a server-side dry-run apply against
//! the real local API server.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::io::Write;
use vmstream_testenv::require_control_plane;

fn helm() -> Option<PathBuf> {
    let path = std::env::var_os("VMSTREAM_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&home).join(".cache/vmstream/helm-v3.22.0/helm")
        });
    path.exists().then_some(path)
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/vmstream")
}

#[test]
fn helm_lint_passes() {
    let Some(helm) = helm() else {
        vmstream_testenv::record_skip(
            "testenv::helm_lint_passes",
            "helm not built: run `make controlplane`",
        );
        return;
    };
    let out = Command::new(helm)
        .args(["lint", "--strict"])
        .arg(chart_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm lint failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn rendered_chart_passes_server_side_dry_run() {
    let cp = require_control_plane!("testenv::rendered_chart_passes_server_side_dry_run");
    let Some(helm) = helm() else {
        vmstream_testenv::record_skip(
            "testenv::rendered_chart_passes_server_side_dry_run",
            "helm not built: run `make controlplane`",
        );
        return;
    };
    let ns = cp.namespace("chart").await.unwrap();
    let rendered = Command::new(helm)
        .args([
            "template",
            "vmstream",
            "--include-crds",
            "--namespace",
            ns.name(),
            "--kube-version",
            vmstream_testenv::KUBERNETES_VERSION,
        ])
        .arg(chart_dir())
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let manifest = String::from_utf8(rendered.stdout).unwrap();
    for kind in [
        "CustomResourceDefinition",
        "Deployment",
        "DaemonSet",
        "ClusterRole",
        "Secret",
    ] {
        assert!(
            manifest.contains(&format!("kind: {kind}")),
            "chart renders a {kind}"
        );
    }
    let mut child = cp
        .kubectl()
        .args(["apply", "--server-side", "--dry-run=server", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "server-side dry run refused the chart:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let applied = String::from_utf8_lossy(&out.stdout);
    assert!(
        applied.contains("daemonset.apps/vmstream-node serverside-applied (server dry run)"),
        "{applied}"
    );
}
