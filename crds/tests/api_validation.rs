//! The generated CRDs against a real kube-apiserver: the examples apply, bad
//! objects are refused by the server itself with errors naming the offending
//! field, immutable fields stay immutable, the Rust types round-trip with the
//! server's defaults, ClonePool scales through `/scale`, and `kubectl get`
//! prints the declared columns.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::{Client, Resource};
use serde_json::json;
use vmstream_api::v1alpha1::{
    Artifact, ClonePool, LiveImage, LiveImagePhase, MemoryBackend, MigrationMode, ScaleInPolicy,
    VMAutoscaler, VMClone, VMMigration, VMNode,
};
use vmstream_api::{condition, set_condition};
use vmstream_testenv::{ControlPlane, TestNamespace};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The shared control plane with the CRDs of this checkout installed once.
fn control_plane(test: &str) -> Option<&'static ControlPlane> {
    if let Some(why) = vmstream_testenv::unavailable() {
        vmstream_testenv::record_skip(test, &why);
        return None;
    }
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let cp = ControlPlane::shared().expect("start the local control plane");
    INSTALLED
        .get_or_init(|| {
            cp.install_crds(Path::new(env!("CARGO_MANIFEST_DIR")))
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .expect("install the generated CRDs");
    Some(cp)
}

macro_rules! setup {
    ($test:literal) => {{
        let cp = tokio::task::block_in_place(|| control_plane($test));
        let Some(cp) = cp else { return };
        let ns = cp.namespace("api").await.expect("create test namespace");
        (cp, ns)
    }};
}

/// The dynamic API of the kind named in `obj`, so objects the Rust types
/// cannot express (bad enum values, wrong shapes) still reach the server.
fn dynamic_api(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let ar = match kind {
        "LiveImage" => ApiResource::erase::<LiveImage>(&()),
        "VMClone" => ApiResource::erase::<VMClone>(&()),
        "VMMigration" => ApiResource::erase::<VMMigration>(&()),
        "ClonePool" => ApiResource::erase::<ClonePool>(&()),
        "VMAutoscaler" => ApiResource::erase::<VMAutoscaler>(&()),
        "VMNode" => return Api::all_with(client.clone(), &ApiResource::erase::<VMNode>(&())),
        other => panic!("unknown kind {other}"),
    };
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// Create the object given as YAML (with `apiVersion` and `metadata.name`
/// added); returns the server's error message on refusal.
async fn create(ns: &TestNamespace, kind: &str, name: &str, spec_yaml: &str) -> Result<(), String> {
    let spec: serde_json::Value = serde_yaml::from_str(spec_yaml).expect("test YAML parses");
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": vmstream_api::API_VERSION,
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    match dynamic_api(&ns.client(), ns.name(), kind)
        .create(&PostParams::default(), &obj)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(status.message),
        Err(e) => panic!("creating {kind}/{name}: transport error {e}"),
    }
}

const CPU_METRIC: &str = "[{type: Cpu, target: {averageUtilization: 50}}]";
/// A well-formed sha256 digest.
const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// (test name, kind, spec, substrings the refusal must contain: the field path
/// and what is wrong with it).
fn invalid_cases() -> Vec<(&'static str, &'static str, String, Vec<&'static str>)> {
    let boot = |extra: &str| format!("{{source: {{boot: {{guest: Request, {extra}}}}}}}");
    let autoscaler = |extra: &str| {
        format!(
            "{{scaleTargetRef: {{kind: ClonePool, name: pool}}, maxReplicas: 4, metrics: {CPU_METRIC}, {extra}}}"
        )
    };
    let metric = |m: &str| {
        format!(
            "{{scaleTargetRef: {{kind: ClonePool, name: pool}}, maxReplicas: 4, metrics: [{m}]}}"
        )
    };
    let linux = |extra: &str| {
        format!(
            "{{source: {{boot: {{memoryMiB: 256, linux: {{kernel: {{url: 'https://example.com/vmlinux', sha256: {DIGEST}}}, {extra}}}}}}}}}"
        )
    };
    let kernel = |artifact: &str| {
        format!("{{source: {{boot: {{memoryMiB: 256, linux: {{kernel: {artifact}}}}}}}}}")
    };
    let disk = |name: &str, root: bool| {
        format!("{{name: {name}, image: {{path: /var/lib/disks/{name}.img}}, root: {root}}}")
    };
    let too_many_disks: Vec<String> = (0..17).map(|i| disk(&format!("d{i}"), false)).collect();
    vec![
        // LiveImage with a Linux guest
        (
            "li-guest-and-linux",
            "LiveImage",
            linux("cmdline: x").replace("memoryMiB: 256", "memoryMiB: 256, guest: Counter"),
            vec![
                "spec.source.boot",
                "exactly one of boot.guest or boot.linux",
            ],
        ),
        (
            "li-neither-guest-nor-linux",
            "LiveImage",
            "{source: {boot: {memoryMiB: 64}}}".into(),
            vec![
                "spec.source.boot",
                "exactly one of boot.guest or boot.linux",
            ],
        ),
        (
            "li-linux-no-kernel",
            "LiveImage",
            "{source: {boot: {memoryMiB: 256, linux: {cmdline: console=ttyS0}}}}".into(),
            vec!["spec.source.boot.linux.kernel", "Required value"],
        ),
        (
            "li-linux-url-without-digest",
            "LiveImage",
            kernel("{url: 'https://example.com/vmlinux'}"),
            vec![
                "spec.source.boot.linux.kernel.sha256",
                "an artifact with a url needs its sha256",
            ],
        ),
        (
            "li-linux-digest-uppercase",
            "LiveImage",
            kernel(&format!(
                "{{url: 'https://example.com/vmlinux', sha256: {}}}",
                DIGEST.to_uppercase()
            )),
            vec![
                "spec.source.boot.linux.kernel.sha256",
                "sha256 must be 64 lowercase hex digits",
            ],
        ),
        (
            "li-linux-digest-short",
            "LiveImage",
            kernel("{path: /boot/vmlinux, sha256: abc123}"),
            vec![
                "spec.source.boot.linux.kernel.sha256",
                "sha256 must be 64 lowercase hex digits",
            ],
        ),
        (
            "li-linux-scheme",
            "LiveImage",
            kernel(&format!(
                "{{url: 'ftp://example.com/vmlinux', sha256: {DIGEST}}}"
            )),
            vec![
                "spec.source.boot.linux.kernel.url",
                "url must be an http:// or https:// URL",
            ],
        ),
        (
            "li-linux-no-host",
            "LiveImage",
            kernel(&format!("{{url: 'https:///vmlinux', sha256: {DIGEST}}}")),
            vec![
                "spec.source.boot.linux.kernel.url",
                "url must be an http:// or https:// URL with a host",
            ],
        ),
        (
            "li-linux-relative-path",
            "LiveImage",
            linux("initrd: {path: boot/initrd.img}"),
            vec![
                "spec.source.boot.linux.initrd.path",
                "path must be absolute",
            ],
        ),
        (
            "li-linux-url-and-path",
            "LiveImage",
            kernel(&format!(
                "{{url: 'https://example.com/vmlinux', path: /boot/vmlinux, sha256: {DIGEST}}}"
            )),
            vec![
                "spec.source.boot.linux.kernel",
                "exactly one of url or path must be set",
            ],
        ),
        (
            "li-linux-empty-artifact",
            "LiveImage",
            kernel("{}"),
            vec![
                "spec.source.boot.linux.kernel",
                "exactly one of url or path must be set",
            ],
        ),
        (
            "li-linux-two-roots",
            "LiveImage",
            linux(&format!(
                "disks: [{}, {}]",
                disk("a", true),
                disk("b", true)
            )),
            vec![
                "spec.source.boot.linux.disks",
                "at most one disk may be root",
            ],
        ),
        (
            "li-linux-duplicate-disks",
            "LiveImage",
            linux(&format!(
                "disks: [{}, {}]",
                disk("data", false),
                disk("data", true)
            )),
            vec!["spec.source.boot.linux.disks", "disk names must be unique"],
        ),
        (
            "li-linux-disk-name",
            "LiveImage",
            linux(&format!("disks: [{}]", disk("Root_Disk", true))),
            vec!["spec.source.boot.linux.disks[0].name", "should match"],
        ),
        (
            "li-linux-too-many-disks",
            "LiveImage",
            linux(&format!("disks: [{}]", too_many_disks.join(", "))),
            vec!["spec.source.boot.linux.disks", "must have at most 16 items"],
        ),
        (
            "li-linux-disk-digest",
            "LiveImage",
            linux("disks: [{name: root, image: {url: 'http://example.com/root.img'}}]"),
            vec![
                "spec.source.boot.linux.disks[0].image.sha256",
                "an artifact with a url needs its sha256",
            ],
        ),
        (
            "li-linux-cmdline-long",
            "LiveImage",
            linux(&format!("cmdline: {}", "x".repeat(2049))),
            vec![
                "spec.source.boot.linux.cmdline",
                "may not be more than 2048 bytes",
            ],
        ),
        (
            "li-linux-ip",
            "LiveImage",
            linux("network: [{name: eth0, ip: 10.0.0.2}]"),
            vec![
                "spec.source.boot.linux.network[0].ip",
                "ip must be an address with a prefix length",
            ],
        ),
        (
            "li-linux-gateway",
            "LiveImage",
            linux("network: [{name: eth0, ip: 10.0.0.2/24, gateway: 10.0.0.300}]"),
            vec![
                "spec.source.boot.linux.network[0].gateway",
                "gateway must be an IP address",
            ],
        ),
        (
            "li-linux-mac",
            "LiveImage",
            linux("network: [{name: eth0, mac: '52:54:00:ZZ:34:56'}]"),
            vec![
                "spec.source.boot.linux.network[0].mac",
                "mac must be six lowercase hex pairs",
            ],
        ),
        (
            "li-linux-duplicate-interfaces",
            "LiveImage",
            linux("network: [{name: eth0}, {name: eth0}]"),
            vec![
                "spec.source.boot.linux.network",
                "network interface names must be unique",
            ],
        ),
        (
            "li-linux-two-readiness-probes",
            "LiveImage",
            linux("readiness: {serialPattern: 'login:', icmp: {}}"),
            vec![
                "spec.source.boot.linux.readiness",
                "exactly one of readiness.serialPattern, tcpProbe, icmp or agent",
            ],
        ),
        (
            "li-linux-tcp-port",
            "LiveImage",
            linux("readiness: {tcpProbe: {port: 0}}"),
            vec![
                "spec.source.boot.linux.readiness.tcpProbe.port",
                "greater than or equal to 1",
            ],
        ),
        (
            "li-linux-fill",
            "LiveImage",
            linux("cmdline: x").replace("memoryMiB: 256", "memoryMiB: 256, fill: {zeroPercent: 5}"),
            vec![
                "spec.source.boot.fill",
                "fill applies only to built-in guests",
            ],
        ),
        // LiveImage
        (
            "li-memory-odd",
            "LiveImage",
            boot("memoryMiB: 63"),
            vec!["spec.source.boot.memoryMiB", "multiple of 2"],
        ),
        (
            "li-memory-too-small",
            "LiveImage",
            boot("memoryMiB: 0"),
            vec!["spec.source.boot.memoryMiB", "greater than or equal to 2"],
        ),
        (
            "li-memory-too-large",
            "LiveImage",
            boot("memoryMiB: 65538"),
            vec!["spec.source.boot.memoryMiB", "less than or equal to 65536"],
        ),
        (
            "li-memory-missing",
            "LiveImage",
            boot("vcpus: 1"),
            vec!["spec.source.boot.memoryMiB", "Required value"],
        ),
        (
            "li-vcpus",
            "LiveImage",
            boot("memoryMiB: 64, vcpus: 9"),
            vec!["spec.source.boot.vcpus", "less than or equal to 8"],
        ),
        (
            "li-guest",
            "LiveImage",
            boot("memoryMiB: 64, guest: Linux"),
            vec!["spec.source.boot.guest", "Unsupported value: \"Linux\""],
        ),
        (
            "li-both-sources",
            "LiveImage",
            "{source: {boot: {guest: Counter, memoryMiB: 4}, fromClone: {vmClone: c}}}".into(),
            vec![
                "spec.source",
                "exactly one of source.boot or source.fromClone",
            ],
        ),
        (
            "li-no-source",
            "LiveImage",
            "{source: {}}".into(),
            vec![
                "spec.source",
                "exactly one of source.boot or source.fromClone",
            ],
        ),
        (
            "li-fill-sum",
            "LiveImage",
            boot("memoryMiB: 64, fill: {randomPercent: 60, zeroPercent: 30, duplicatePercent: 20}"),
            vec![
                "spec.source.boot.fill",
                "randomPercent + zeroPercent + duplicatePercent must not exceed 100",
            ],
        ),
        (
            "li-fill-percent",
            "LiveImage",
            boot("memoryMiB: 64, fill: {zeroPercent: 101}"),
            vec![
                "spec.source.boot.fill.zeroPercent",
                "less than or equal to 100",
            ],
        ),
        (
            "li-readiness",
            "LiveImage",
            boot("memoryMiB: 64, readiness: {timeoutSeconds: 601}"),
            vec![
                "spec.source.boot.readiness.timeoutSeconds",
                "less than or equal to 600",
            ],
        ),
        (
            "li-from-clone-name",
            "LiveImage",
            "{source: {fromClone: {vmClone: Not_A_Name}}}".into(),
            vec!["spec.source.fromClone.vmClone", "should match"],
        ),
        (
            "li-from-clone-empty",
            "LiveImage",
            "{source: {fromClone: {vmClone: ''}}}".into(),
            vec!["spec.source.fromClone.vmClone", "at least 1 chars long"],
        ),
        // VMClone
        (
            "vmc-no-image",
            "VMClone",
            "{memoryBackend: Lazy}".into(),
            vec!["spec.liveImage", "Required value"],
        ),
        (
            "vmc-image-name",
            "VMClone",
            "{liveImage: UPPER}".into(),
            vec!["spec.liveImage", "should match"],
        ),
        (
            "vmc-backend",
            "VMClone",
            "{liveImage: img, memoryBackend: Eager}".into(),
            vec!["spec.memoryBackend", "Unsupported value: \"Eager\""],
        ),
        // VMMigration
        (
            "mig-same-nodes",
            "VMMigration",
            "{vmClone: c, sourceNode: n1, targetNode: n1}".into(),
            vec!["spec.targetNode", "targetNode must differ from sourceNode"],
        ),
        (
            "mig-postcopy-rounds",
            "VMMigration",
            "{vmClone: c, mode: Postcopy, precopyRounds: 3}".into(),
            vec![
                "spec.precopyRounds",
                "allowed only when mode is Precopy or Hybrid",
            ],
        ),
        (
            "mig-rounds-bound",
            "VMMigration",
            "{vmClone: c, mode: Hybrid, precopyRounds: 31}".into(),
            vec!["spec.precopyRounds", "less than or equal to 30"],
        ),
        (
            "mig-bandwidth",
            "VMMigration",
            "{vmClone: c, bandwidthMiBps: 0}".into(),
            vec!["spec.bandwidthMiBps", "greater than or equal to 1"],
        ),
        (
            "mig-timeout",
            "VMMigration",
            "{vmClone: c, timeoutSeconds: 3601}".into(),
            vec!["spec.timeoutSeconds", "less than or equal to 3600"],
        ),
        (
            "mig-mode",
            "VMMigration",
            "{vmClone: c, mode: Teleport}".into(),
            vec!["spec.mode", "Unsupported value: \"Teleport\""],
        ),
        // ClonePool
        (
            "cp-replicas",
            "ClonePool",
            "{liveImage: img, replicas: 1001}".into(),
            vec!["spec.replicas", "less than or equal to 1000"],
        ),
        (
            "cp-negative",
            "ClonePool",
            "{liveImage: img, replicas: -1}".into(),
            vec!["spec.replicas", "greater than or equal to 0"],
        ),
        (
            "cp-policy",
            "ClonePool",
            "{liveImage: img, scaleInPolicy: Random}".into(),
            vec!["spec.scaleInPolicy", "Unsupported value: \"Random\""],
        ),
        (
            "cp-no-image",
            "ClonePool",
            "{replicas: 2}".into(),
            vec!["spec.liveImage", "Required value"],
        ),
        // VMAutoscaler
        (
            "as-min-above-max",
            "VMAutoscaler",
            autoscaler("minReplicas: 5"),
            vec![
                "spec.minReplicas",
                "minReplicas must be less than or equal to maxReplicas",
            ],
        ),
        (
            "as-max-zero",
            "VMAutoscaler",
            format!(
                "{{scaleTargetRef: {{kind: ClonePool, name: pool}}, minReplicas: 0, maxReplicas: 0, metrics: {CPU_METRIC}}}"
            ),
            vec!["spec.maxReplicas", "greater than or equal to 1"],
        ),
        (
            "as-no-metrics",
            "VMAutoscaler",
            "{scaleTargetRef: {kind: ClonePool, name: pool}, maxReplicas: 4, metrics: []}".into(),
            vec!["spec.metrics", "at least 1 items"],
        ),
        (
            "as-target-kind",
            "VMAutoscaler",
            format!(
                "{{scaleTargetRef: {{kind: Deployment, name: pool}}, maxReplicas: 4, metrics: {CPU_METRIC}}}"
            ),
            vec![
                "spec.scaleTargetRef.kind",
                "Unsupported value: \"Deployment\"",
            ],
        ),
        (
            "as-custom-without-name",
            "VMAutoscaler",
            metric("{type: Custom, target: {averageValue: 5}}"),
            vec![
                "spec.metrics[0].name",
                "name is required when type is Custom",
            ],
        ),
        (
            "as-cpu-with-name",
            "VMAutoscaler",
            metric("{type: Cpu, name: x, target: {averageUtilization: 5}}"),
            vec!["spec.metrics[0].name", "not allowed otherwise"],
        ),
        (
            "as-two-targets",
            "VMAutoscaler",
            metric("{type: Memory, target: {averageUtilization: 5, averageValue: 3}}"),
            vec![
                "spec.metrics[0].target",
                "exactly one of target.averageUtilization or target.averageValue",
            ],
        ),
        (
            "as-cpu-average-value",
            "VMAutoscaler",
            metric("{type: Cpu, target: {averageValue: 3}}"),
            vec![
                "spec.metrics[0].target",
                "Cpu and Memory metrics take averageUtilization",
            ],
        ),
        (
            "as-value-zero",
            "VMAutoscaler",
            metric("{type: Custom, name: requestRate, target: {averageValue: 0}}"),
            vec!["spec.metrics[0].target.averageValue", "greater than 0"],
        ),
        (
            "as-utilization",
            "VMAutoscaler",
            metric("{type: Cpu, target: {averageUtilization: 1001}}"),
            vec![
                "spec.metrics[0].target.averageUtilization",
                "less than or equal to 1000",
            ],
        ),
        (
            "as-tolerance",
            "VMAutoscaler",
            autoscaler("tolerance: 1.5"),
            vec!["spec.tolerance", "less than or equal to 1"],
        ),
        (
            "as-window",
            "VMAutoscaler",
            autoscaler("behavior: {scaleDown: {stabilizationWindowSeconds: 3601}}"),
            vec![
                "spec.behavior.scaleDown.stabilizationWindowSeconds",
                "less than or equal to 3600",
            ],
        ),
        (
            "as-policy-period",
            "VMAutoscaler",
            autoscaler(
                "behavior: {scaleUp: {policies: [{type: Percent, value: 10, periodSeconds: 1801}]}}",
            ),
            vec![
                "spec.behavior.scaleUp.policies[0].periodSeconds",
                "less than or equal to 1800",
            ],
        ),
        (
            "as-select-policy",
            "VMAutoscaler",
            autoscaler("behavior: {scaleUp: {selectPolicy: Average}}"),
            vec![
                "spec.behavior.scaleUp.selectPolicy",
                "Unsupported value: \"Average\"",
            ],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_are_refused_naming_the_field() {
    let (_cp, ns) = setup!("vmstream-api::invalid_objects_are_refused_naming_the_field");
    let mut problems = Vec::new();
    let cases = invalid_cases();
    for (name, kind, spec, expected) in &cases {
        match create(&ns, kind, name, spec).await {
            Ok(()) => problems.push(format!("{name}: {kind} {spec} was accepted")),
            Err(message) => {
                for want in expected {
                    if !message.contains(want) {
                        problems.push(format!("{name}: error lacks {want:?}: {message}"));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} cases wrong:\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_applies_server_side() {
    let (cp, ns) = setup!("vmstream-api::every_example_applies_server_side");
    let dir = repo_root().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "examples found: {files:?}");
    for file in &files {
        let f = file.display().to_string();
        let out = tokio::task::block_in_place(|| {
            cp.kubectl_ok(&[
                "apply",
                "--server-side",
                "--field-manager=examples-test",
                "-n",
                ns.name(),
                "-f",
                &f,
            ])
        });
        out.unwrap_or_else(|e| panic!("applying {f}: {e}"));
    }

    // The stored objects read back into the Rust types, with the example's values.
    let client = ns.client();
    let image = Api::<LiveImage>::namespaced(client.clone(), ns.name())
        .get("request-64m")
        .await
        .unwrap();
    let boot = image.spec.source.boot.as_ref().expect("boot source");
    assert_eq!(boot.memory_mib, 64);
    assert_eq!(boot.fill.as_ref().unwrap().random_percent, 40);
    let clone = Api::<VMClone>::namespaced(client.clone(), ns.name())
        .get("request-1")
        .await
        .unwrap();
    assert_eq!(clone.spec.live_image, "request-64m");
    let pool = Api::<ClonePool>::namespaced(client.clone(), ns.name())
        .get("request-pool")
        .await
        .unwrap();
    assert_eq!(pool.spec.replicas, 3);
    let scaler = Api::<VMAutoscaler>::namespaced(client.clone(), ns.name())
        .get("request-pool")
        .await
        .unwrap();
    assert_eq!(scaler.spec.metrics.len(), 2);
    assert_eq!(
        scaler.spec.scale_target_ref.name,
        pool.meta().name.clone().unwrap()
    );
    let migration = Api::<VMMigration>::namespaced(client, ns.name())
        .get("request-1-move")
        .await
        .unwrap();
    assert_eq!(migration.spec.vm_clone, clone.meta().name.clone().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linux_live_image_is_accepted_with_its_defaults() {
    let (cp, ns) = setup!("vmstream-api::a_linux_live_image_is_accepted_with_its_defaults");
    let spec = format!(
        "{{source: {{boot: {{vcpus: 2, memoryMiB: 256, readiness: {{timeoutSeconds: 90}}, linux: {{
            kernel: {{url: 'https://example.com/vmlinux', sha256: {DIGEST}}},
            initrd: {{path: /var/lib/vmstream/initrd.img}},
            cmdline: 'console=ttyS0 root=/dev/vda',
            disks: [{{name: root, image: {{url: 'http://10.0.0.1:8080/root.ext4', sha256: {DIGEST}}}, root: true}},
                    {{name: data, image: {{path: /srv/data.img, sha256: {DIGEST}}}, readOnly: true}}],
            network: [{{name: eth0, ip: 10.0.2.15/24, gateway: 10.0.2.2, mac: '52:54:00:12:34:56'}},
                      {{name: eth1, ip: 'fd00::2/64'}}],
            readiness: {{tcpProbe: {{port: 22}}}}}}}}}}}}"
    );
    create(&ns, "LiveImage", "linux", &spec).await.unwrap();
    for readiness in ["serialPattern: 'login:'", "icmp: {}", "agent: {}"] {
        let name = format!(
            "linux-{}",
            readiness.split(':').next().unwrap().to_lowercase()
        );
        let spec = format!(
            "{{source: {{boot: {{memoryMiB: 64, linux: {{kernel: {{path: /boot/vmlinux}}, readiness: {{{readiness}}}}}}}}}}}"
        );
        create(&ns, "LiveImage", &name, &spec)
            .await
            .unwrap_or_else(|e| panic!("readiness {readiness} refused: {e}"));
    }
    let image = Api::<LiveImage>::namespaced(ns.client(), ns.name())
        .get("linux")
        .await
        .unwrap();
    let boot = image.spec.source.boot.unwrap();
    assert_eq!(boot.guest, None);
    assert_eq!(boot.readiness.timeout_seconds, 90);
    let linux = boot.linux.unwrap();
    assert_eq!(
        linux.kernel,
        Artifact::url("https://example.com/vmlinux", DIGEST)
    );
    assert_eq!(
        linux.initrd,
        Some(Artifact::path("/var/lib/vmstream/initrd.img", None))
    );
    let disks: Vec<(&str, bool, bool)> = linux
        .disks
        .iter()
        .map(|d| (d.name.as_str(), d.read_only, d.root))
        .collect();
    assert_eq!(disks, [("root", false, true), ("data", true, false)]);
    assert_eq!(linux.network[1].ip.as_deref(), Some("fd00::2/64"));
    assert_eq!(linux.readiness.unwrap().tcp_probe.unwrap().port, 22);

    // The Linux example (kept out of `make up`) is accepted too.
    let example = repo_root().join("examples/linux/linux-liveimage.yaml");
    let f = example.display().to_string();
    tokio::task::block_in_place(|| {
        cp.kubectl_ok(&[
            "apply",
            "--server-side",
            "--field-manager=examples-test",
            "-n",
            ns.name(),
            "-f",
            &f,
        ])
    })
    .unwrap_or_else(|e| panic!("applying {f}: {e}"));
    let example = Api::<LiveImage>::namespaced(ns.client(), ns.name())
        .get("linux-web")
        .await
        .unwrap();
    let linux = example.spec.source.boot.unwrap().linux.unwrap();
    assert!(linux.kernel.url.is_some() && linux.kernel.sha256.is_some());
    assert!(linux.disks.iter().all(|d| d.image.sha256.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_defaults_match_the_rust_defaults() {
    let (_cp, ns) = setup!("vmstream-api::server_defaults_match_the_rust_defaults");
    create(
        &ns,
        "LiveImage",
        "minimal",
        "{source: {boot: {guest: Counter, memoryMiB: 2, fill: {}}}}",
    )
    .await
    .unwrap();
    create(&ns, "VMClone", "minimal", "{liveImage: minimal}")
        .await
        .unwrap();
    create(&ns, "VMMigration", "minimal", "{vmClone: minimal}")
        .await
        .unwrap();
    create(&ns, "ClonePool", "minimal", "{liveImage: minimal}")
        .await
        .unwrap();
    create(&ns, "VMAutoscaler", "minimal", &format!("{{scaleTargetRef: {{kind: ClonePool, name: minimal}}, maxReplicas: 3, metrics: {CPU_METRIC}}}"))
        .await
        .unwrap();

    let client = ns.client();
    let image = Api::<LiveImage>::namespaced(client.clone(), ns.name())
        .get("minimal")
        .await
        .unwrap();
    let boot = image.spec.source.boot.unwrap();
    assert_eq!(boot.vcpus, 1);
    assert_eq!(boot.readiness.timeout_seconds, 60);
    let fill = boot.fill.unwrap();
    assert_eq!(
        (
            fill.seed,
            fill.random_percent,
            fill.zero_percent,
            fill.duplicate_percent
        ),
        (0, 0, 0, 0)
    );
    let clone = Api::<VMClone>::namespaced(client.clone(), ns.name())
        .get("minimal")
        .await
        .unwrap();
    assert_eq!(clone.spec.memory_backend, MemoryBackend::CopyOnWrite);
    let migration = Api::<VMMigration>::namespaced(client.clone(), ns.name())
        .get("minimal")
        .await
        .unwrap();
    assert_eq!(migration.spec.mode, MigrationMode::Postcopy);
    assert_eq!(migration.spec.timeout_seconds, 300);
    assert_eq!(migration.spec.precopy_rounds, None);
    let pool = Api::<ClonePool>::namespaced(client.clone(), ns.name())
        .get("minimal")
        .await
        .unwrap();
    assert_eq!(pool.spec.replicas, 1);
    assert_eq!(pool.spec.scale_in_policy, ScaleInPolicy::PendingThenNewest);
    let scaler = Api::<VMAutoscaler>::namespaced(client, ns.name())
        .get("minimal")
        .await
        .unwrap();
    assert_eq!(scaler.spec.min_replicas, 1);
    assert_eq!(scaler.spec.tolerance, 0.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immutable_fields_cannot_change() {
    let (_cp, ns) = setup!("vmstream-api::immutable_fields_cannot_change");
    let client = ns.client();
    create(
        &ns,
        "LiveImage",
        "img",
        "{source: {boot: {guest: Counter, memoryMiB: 4}}}",
    )
    .await
    .unwrap();
    create(&ns, "VMClone", "vm", "{liveImage: img}")
        .await
        .unwrap();
    create(&ns, "VMMigration", "mig", "{vmClone: vm}")
        .await
        .unwrap();
    let merge = |v: serde_json::Value| Patch::Merge(v);
    let pp = PatchParams::default();

    let clones = Api::<VMClone>::namespaced(client.clone(), ns.name());
    let err = clones
        .patch("vm", &pp, &merge(json!({"spec": {"liveImage": "other"}})))
        .await
        .expect_err("VMClone.spec.liveImage changed");
    let msg = api_message(err);
    assert!(
        msg.contains("spec.liveImage") && msg.contains("liveImage is immutable"),
        "{msg}"
    );
    // other VMClone fields stay mutable
    clones
        .patch(
            "vm",
            &pp,
            &merge(json!({"spec": {"placement": {"nodeName": "n2"}}})),
        )
        .await
        .unwrap();

    let images = Api::<LiveImage>::namespaced(client.clone(), ns.name());
    let err = images
        .patch(
            "img",
            &pp,
            &merge(json!({"spec": {"source": {"boot": {"memoryMiB": 8}}}})),
        )
        .await
        .expect_err("LiveImage.spec.source changed");
    let msg = api_message(err);
    assert!(
        msg.contains("spec.source") && msg.contains("source is immutable"),
        "{msg}"
    );
    images
        .patch(
            "img",
            &pp,
            &merge(json!({"spec": {"placement": {"nodeName": "n1"}}})),
        )
        .await
        .unwrap();

    let migrations = Api::<VMMigration>::namespaced(client, ns.name());
    let err = migrations
        .patch("mig", &pp, &merge(json!({"spec": {"targetNode": "n3"}})))
        .await
        .expect_err("VMMigration.spec changed");
    let msg = api_message(err);
    assert!(
        msg.contains("spec") && msg.contains("spec is immutable"),
        "{msg}"
    );
    // labels (how the operator places work) stay writable
    migrations
        .patch(
            "mig",
            &pp,
            &merge(json!({"metadata": {"labels": {vmstream_api::NODE_LABEL: "n1"}}})),
        )
        .await
        .unwrap();
}

fn api_message(err: kube::Error) -> String {
    match err {
        kube::Error::Api(status) => status.message,
        other => panic!("expected a refusal from the API server, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_resizes_a_clone_pool() {
    let (cp, ns) = setup!("vmstream-api::kubectl_scale_resizes_a_clone_pool");
    create(&ns, "ClonePool", "pool", "{liveImage: img, replicas: 3}")
        .await
        .unwrap();
    let out = tokio::task::block_in_place(|| {
        cp.kubectl_ok(&["scale", "clonepool/pool", "--replicas=5", "-n", ns.name()])
    })
    .unwrap();
    assert!(out.contains("scaled"), "{out}");
    let pools = Api::<ClonePool>::namespaced(ns.client(), ns.name());
    assert_eq!(pools.get("pool").await.unwrap().spec.replicas, 5);

    // The scale subresource reports status replicas and the selector from status.
    let status = json!({
        "apiVersion": vmstream_api::API_VERSION, "kind": "ClonePool",
        "status": {"replicas": 4, "readyReplicas": 2, "labelSelector": vmstream_api::pool_label_selector("pool")}
    });
    pools
        .patch_status(
            "pool",
            &PatchParams::apply("test-operator").force(),
            &Patch::Apply(status),
        )
        .await
        .unwrap();
    let scale = pools.get_scale("pool").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(5));
    let scale_status = scale.status.unwrap();
    assert_eq!(scale_status.replicas, 4);
    assert_eq!(
        scale_status.selector.as_deref(),
        Some("vmstream.io/pool=pool")
    );

    // The scale subresource enforces the bound on spec.replicas too.
    let refused = tokio::task::block_in_place(|| {
        cp.kubectl_ok(&[
            "scale",
            "clonepool/pool",
            "--replicas=1001",
            "-n",
            ns.name(),
        ])
    });
    let msg = refused.expect_err("scaled beyond 1000").to_string();
    assert!(msg.contains("spec.replicas"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_conditions_are_merged_per_type_across_managers() {
    let (_cp, ns) = setup!("vmstream-api::status_conditions_are_merged_per_type_across_managers");
    create(
        &ns,
        "LiveImage",
        "img",
        "{source: {boot: {guest: Memory, memoryMiB: 4}}}",
    )
    .await
    .unwrap();
    let images = Api::<LiveImage>::namespaced(ns.client(), ns.name());
    let apply_status = |manager: &'static str, status: serde_json::Value| {
        let images = images.clone();
        async move {
            let patch = json!({"apiVersion": vmstream_api::API_VERSION, "kind": "LiveImage", "status": status});
            images
                .patch_status(
                    "img",
                    &PatchParams::apply(manager).force(),
                    &Patch::Apply(patch),
                )
                .await
                .unwrap()
        }
    };
    let scheduled = condition("Scheduled", true, "NodeChosen", "placed on n1", Some(1));
    apply_status(
        "vmstream-operator",
        json!({"phase": "Scheduled", "conditions": [scheduled]}),
    )
    .await;
    let mut node_conditions = Vec::new();
    set_condition(
        &mut node_conditions,
        condition("Ready", true, "Captured", "image captured", Some(1)),
    );
    apply_status(
        "vmstream-node",
        json!({"node": "n1", "sizeBytes": 123, "sourcePauseMs": 1.5, "conditions": node_conditions}),
    )
    .await;
    let got = images.get("img").await.unwrap();
    let status = got.status.unwrap();
    let types: Vec<&str> = status
        .conditions
        .iter()
        .map(|c: &Condition| c.type_.as_str())
        .collect();
    assert_eq!(
        types,
        ["Scheduled", "Ready"],
        "both managers' conditions kept"
    );
    assert_eq!(status.phase, Some(LiveImagePhase::Scheduled));
    assert_eq!(status.node.as_deref(), Some("n1"));
    assert_eq!(status.source_pause_ms, Some(1.5));
    // the status subresource does not touch spec
    assert_eq!(got.spec.source.boot.unwrap().memory_mib, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_prints_the_columns() {
    let (cp, ns) = setup!("vmstream-api::kubectl_get_prints_the_columns");
    let client = ns.client();
    create(
        &ns,
        "LiveImage",
        "img",
        "{source: {boot: {guest: Counter, memoryMiB: 4}}}",
    )
    .await
    .unwrap();
    create(&ns, "VMClone", "vm", "{liveImage: img}")
        .await
        .unwrap();
    create(&ns, "VMMigration", "mig", "{vmClone: vm}")
        .await
        .unwrap();
    create(&ns, "ClonePool", "pool", "{liveImage: img, replicas: 2}")
        .await
        .unwrap();
    create(&ns, "VMAutoscaler", "scaler", &format!("{{scaleTargetRef: {{kind: ClonePool, name: pool}}, maxReplicas: 7, metrics: {CPU_METRIC}}}"))
        .await
        .unwrap();
    let status = json!({"apiVersion": vmstream_api::API_VERSION, "kind": "LiveImage",
        "status": {"phase": "Ready", "node": "node-a", "memoryBytes": 4194304, "sourcePauseMs": 2.5}});
    Api::<LiveImage>::namespaced(client.clone(), ns.name())
        .patch_status(
            "img",
            &PatchParams::apply("test").force(),
            &Patch::Apply(status),
        )
        .await
        .unwrap();
    let status = json!({"apiVersion": vmstream_api::API_VERSION, "kind": "VMClone",
        "status": {"phase": "Running", "node": "node-b", "startLatencyMs": 3.25}});
    Api::<VMClone>::namespaced(client, ns.name())
        .patch_status(
            "vm",
            &PatchParams::apply("test").force(),
            &Patch::Apply(status),
        )
        .await
        .unwrap();

    // (short name, header columns, cells of the row)
    let expected: [(&str, &[&str], &[&str]); 5] = [
        (
            "li",
            &["NAME", "PHASE", "NODE", "MEMORY", "PAUSE(MS)", "AGE"],
            &["img", "Ready", "node-a", "4194304", "2.5"],
        ),
        (
            "vmc",
            &["NAME", "PHASE", "NODE", "IMAGE", "START(MS)", "AGE"],
            &["vm", "Running", "node-b", "img", "3.25"],
        ),
        (
            "vmmig",
            &["NAME", "PHASE", "SOURCE", "TARGET", "DOWNTIME(MS)", "AGE"],
            &["mig"],
        ),
        (
            "cp",
            &["NAME", "DESIRED", "READY", "IMAGE", "AGE"],
            &["pool", "2", "img"],
        ),
        (
            "vmas",
            &["NAME", "TARGET", "MIN", "MAX", "CURRENT", "DESIRED", "AGE"],
            &["scaler", "pool", "1", "7"],
        ),
    ];
    for (short, header, cells) in expected {
        let out = tokio::task::block_in_place(|| cp.kubectl_ok(&["get", short, "-n", ns.name()]))
            .unwrap_or_else(|e| panic!("kubectl get {short}: {e}"));
        let mut lines = out.lines();
        let got_header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(got_header, header, "kubectl get {short}:\n{out}");
        let row: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        for cell in cells {
            assert!(
                row.contains(cell),
                "kubectl get {short}: row lacks {cell:?}:\n{out}"
            );
        }
    }

    // VMNode is cluster-scoped and has its own columns.
    let node_name = format!("{}-node", ns.name());
    let node = VMNode::new(&node_name, Default::default());
    let nodes = Api::<VMNode>::all(ns.client());
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let out = tokio::task::block_in_place(|| cp.kubectl_ok(&["get", "vmn", &node_name])).unwrap();
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "ADDRESS",
            "UNSCHEDULABLE",
            "HEARTBEAT",
            "VERSION",
            "AGE"
        ],
        "{out}"
    );
    nodes.delete(&node_name, &Default::default()).await.unwrap();
}
