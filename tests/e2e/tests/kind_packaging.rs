//! What `make e2e-kind` is built from, checked without Docker or kind: the
//! image's Dockerfile builds and copies exactly the workspace binaries the
//! Helm chart runs; `hack/e2e-kind.sh` parses, refuses clearly when its
//! tools are missing, gives every kind worker /dev/kvm and /dev/userfaultfd,
//! and its chart values render (cached helm) to pods running the image it
//! loads, never pulled.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Names of the binaries the Dockerfile copies into the runtime image.
fn image_binaries(dockerfile: &str) -> BTreeSet<String> {
    dockerfile
        .lines()
        .filter(|l| l.trim_start().starts_with("COPY --from=build"))
        .filter_map(|l| l.split_whitespace().last())
        .filter_map(|dest| dest.strip_prefix("/usr/local/bin/"))
        .map(str::to_string)
        .collect()
}

/// Binary targets of the workspace's packages (`cargo metadata`).
fn workspace_binaries() -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

/// The `command: ["..."]` binaries of the chart's templates.
fn chart_commands() -> BTreeSet<String> {
    let dir = repo().join("charts/vmstream/templates");
    let mut commands = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap();
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("command: [\"") {
                commands.insert(rest.split('"').next().unwrap().to_string());
            }
        }
    }
    commands
}

#[test]
fn the_image_holds_the_workspace_binaries_the_chart_runs() {
    let dockerfile = read("hack/image/Dockerfile");
    let copied = image_binaries(&dockerfile);
    let wanted: BTreeSet<String> = ["vmstream-node", "vmstream-operator"]
        .map(String::from)
        .into();
    assert_eq!(copied, wanted, "binaries copied into the runtime image");
    let built = workspace_binaries();
    for bin in &copied {
        assert!(built.contains(bin), "{bin} is not a workspace binary");
        assert!(
            dockerfile.contains(&format!("--bin {bin}"))
                && dockerfile.contains(&format!("target/release/{bin}")),
            "the build stage builds and copies {bin}"
        );
    }
    let commands = chart_commands();
    assert!(!commands.is_empty(), "the chart's containers name commands");
    assert!(
        commands.is_subset(&copied),
        "the chart runs {commands:?}, the image has {copied:?}"
    );
    // BuildKit's per-Dockerfile ignore file keeps target/ out of the context.
    let ignore = read("hack/image/Dockerfile.dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target"));
}

#[test]
fn the_kind_script_parses_and_names_what_is_missing() {
    let script = repo().join("hack/e2e-kind.sh");
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    // A PATH with nothing but `dirname`: every tool is reported missing.
    let bare = tempfile::tempdir().unwrap();
    let dirname = ["/usr/bin/dirname", "/bin/dirname"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("dirname");
    std::os::unix::fs::symlink(dirname, bare.path().join("dirname")).unwrap();
    let out = Command::new("/bin/bash")
        .arg(&script)
        .env_clear()
        .env("PATH", bare.path())
        .env("HOME", bare.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("missing: docker kind kubectl cargo helm"),
        "{stderr}"
    );
    assert!(
        stderr.contains("make e2e"),
        "points to the local suite: {stderr}"
    );
}

#[test]
fn kind_workers_get_the_devices() {
    let out = Command::new("bash")
        .arg(repo().join("hack/e2e-kind.sh"))
        .arg("--kind-config")
        .env("VMSTREAM_KIND_WORKERS", "3")
        .output()
        .unwrap();
    assert!(out.status.success());
    let config = String::from_utf8_lossy(&out.stdout);
    assert_eq!(config.matches("role: worker").count(), 3, "{config}");
    for dev in ["/dev/kvm", "/dev/userfaultfd"] {
        assert_eq!(
            config
                .matches(&format!("{{ hostPath: {dev}, containerPath: {dev} }}"))
                .count(),
            3,
            "{config}"
        );
    }
}

#[test]
fn the_kind_values_render_pods_running_the_loaded_image() {
    const TEST: &str = "kind_packaging::the_kind_values_render_pods_running_the_loaded_image";
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let helm = std::env::var("VMSTREAM_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(&home).join(".cache/vmstream/helm-v3.22.0/helm"));
    if !helm.exists() {
        vmstream_test_support::record_skip(
            TEST,
            &format!("{} missing: run `make deps`", helm.display()),
        );
        return;
    }
    let out = Command::new("bash")
        .arg(repo().join("hack/e2e-kind.sh"))
        .arg("--template")
        .env("VMSTREAM_HELM", &helm)
        .env("VMSTREAM_IMAGE", "vmstream/vmstream:kind-check")
        .output()
        .unwrap();
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images: Vec<&str> = rendered
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    assert_eq!(
        images, ["vmstream/vmstream:kind-check"; 2],
        "operator and node daemon run the loaded image"
    );
    let policies: Vec<&str> = rendered
        .lines()
        .filter_map(|l| l.trim().strip_prefix("imagePullPolicy: "))
        .collect();
    assert_eq!(policies, ["Never"; 2], "a loaded image is never pulled");
    for path in ["/dev/kvm", "/dev/userfaultfd"] {
        assert!(
            rendered.contains(&format!("path: {path}")),
            "{path} mounted"
        );
    }
}
