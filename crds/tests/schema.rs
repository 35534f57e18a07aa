//! The generated CRDs without a server: the CEL rules, bounds, subresources,
//! printer columns and names the API promises are in the schemas, the schemas
//! stay structural, and `crdgen --check` catches stale YAML.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use vmstream_api::all_crds;

fn crd(plural: &str) -> Value {
    let name = format!("{plural}.vmstream.io");
    let crd = all_crds()
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some(name.as_str()))
        .unwrap_or_else(|| panic!("no CRD {name}"));
    serde_json::to_value(crd).unwrap()
}

fn version(crd: &Value) -> &Value {
    &crd["spec"]["versions"][0]
}

/// The schema at a dotted property path below openAPIV3Schema (`[]` steps
/// into array items).
fn schema_at<'a>(crd: &'a Value, path: &str) -> &'a Value {
    let mut s = &version(crd)["schema"]["openAPIV3Schema"];
    for step in path.split('.') {
        s = if step == "[]" {
            &s["items"]
        } else {
            &s["properties"][step]
        };
        assert!(!s.is_null(), "no schema at {path} (step {step})");
    }
    s
}

/// The rule at `path` with this CEL expression; panics when absent.
fn rule<'a>(crd: &'a Value, path: &str, expression: &str) -> &'a Value {
    schema_at(crd, path)["x-kubernetes-validations"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["rule"] == expression))
        .unwrap_or_else(|| panic!("no rule {expression:?} at {path}"))
}

#[test]
fn cel_rules_are_in_the_schemas() {
    let li = crd("liveimages");
    assert_eq!(
        rule(&li, "spec.source", "self == oldSelf")["message"],
        "source is immutable"
    );
    assert!(
        rule(&li, "spec.source", "has(self.boot) != has(self.fromClone)")["message"]
            .as_str()
            .unwrap()
            .contains("source.boot or source.fromClone")
    );
    assert!(
        rule(&li, "spec.source.boot.memoryMiB", "self % 2 == 0")["message"]
            .as_str()
            .unwrap()
            .contains("memoryMiB")
    );
    rule(
        &li,
        "spec.source.boot.fill",
        "self.randomPercent + self.zeroPercent + self.duplicatePercent <= 100",
    );
    rule(
        &li,
        "spec.source.boot",
        "has(self.guest) != has(self.linux)",
    );
    for artifact in [
        "spec.source.boot.linux.kernel",
        "spec.source.boot.linux.initrd",
        "spec.source.boot.linux.disks.[].image",
    ] {
        rule(&li, artifact, "has(self.url) != has(self.path)");
        assert_eq!(
            rule(&li, artifact, "!has(self.url) || has(self.sha256)")["fieldPath"],
            ".sha256"
        );
        rule(&li, &format!("{artifact}.path"), "self.startsWith('/')");
    }
    rule(
        &li,
        "spec.source.boot.linux.disks",
        "self.filter(d, d.root).size() <= 1",
    );

    let vmc = crd("vmclones");
    assert_eq!(
        rule(&vmc, "spec.liveImage", "self == oldSelf")["message"],
        "liveImage is immutable"
    );

    let mig = crd("vmmigrations");
    assert_eq!(
        rule(&mig, "spec", "self == oldSelf")["message"],
        "spec is immutable"
    );
    let differ = rule(
        &mig,
        "spec",
        "!has(self.sourceNode) || !has(self.targetNode) || self.sourceNode != self.targetNode",
    );
    assert_eq!(differ["fieldPath"], ".targetNode");
    let rounds = rule(
        &mig,
        "spec",
        "!has(self.precopyRounds) || self.mode != 'Postcopy'",
    );
    assert_eq!(rounds["fieldPath"], ".precopyRounds");

    let vmas = crd("vmautoscalers");
    assert_eq!(
        rule(&vmas, "spec", "self.minReplicas <= self.maxReplicas")["fieldPath"],
        ".minReplicas"
    );
    rule(
        &vmas,
        "spec.metrics.[]",
        "self.type == 'Custom' ? has(self.name) : !has(self.name)",
    );
    rule(
        &vmas,
        "spec.metrics.[].target",
        "has(self.averageUtilization) != has(self.averageValue)",
    );
    rule(&vmas, "spec.metrics.[].target.averageValue", "self > 0.0");
}

#[test]
fn every_rule_has_a_message() {
    fn walk(v: &Value, path: &str, missing: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::Array(rules)) = map.get("x-kubernetes-validations") {
                    for r in rules {
                        if r.get("message").is_none() && r.get("messageExpression").is_none() {
                            missing.push(format!("{path}: {}", r["rule"]));
                        }
                    }
                }
                for (k, child) in map {
                    walk(child, &format!("{path}.{k}"), missing);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, path, missing)),
            _ => {}
        }
    }
    let mut missing = Vec::new();
    for c in all_crds() {
        walk(
            &serde_json::to_value(&c).unwrap(),
            c.metadata.name.as_deref().unwrap(),
            &mut missing,
        );
    }
    assert!(missing.is_empty(), "rules without message: {missing:?}");
}

#[test]
fn bounds_enums_and_defaults_are_in_the_schemas() {
    let li = crd("liveimages");
    let mem = schema_at(&li, "spec.source.boot.memoryMiB");
    assert_eq!(
        (mem["minimum"].as_f64(), mem["maximum"].as_f64()),
        (Some(2.0), Some(65536.0))
    );
    assert_eq!(schema_at(&li, "spec.source.boot.vcpus")["default"], 1);
    assert_eq!(
        schema_at(&li, "spec.source.boot.readiness.timeoutSeconds")["default"],
        60
    );
    assert_eq!(
        schema_at(&li, "spec.source.boot.guest")["enum"],
        serde_json::json!(["Counter", "Memory", "Request"])
    );
    assert_eq!(
        schema_at(&li, "spec.source.boot.linux.disks")["maxItems"],
        vmstream_api::v1alpha1::MAX_DISKS
    );
    assert_eq!(
        schema_at(&li, "spec.source.boot.linux.network")["maxItems"],
        vmstream_api::v1alpha1::MAX_NETWORK_INTERFACES
    );
    assert_eq!(
        schema_at(&li, "spec.source.boot.linux.cmdline")["maxLength"],
        vmstream_api::v1alpha1::MAX_CMDLINE_LEN
    );
    assert_eq!(
        schema_at(&li, "spec.source.boot.linux")["required"],
        serde_json::json!(["kernel"])
    );
    let cp = crd("clonepools");
    assert_eq!(schema_at(&cp, "spec.replicas")["default"], 1);
    assert_eq!(
        schema_at(&cp, "spec.replicas")["maximum"].as_f64(),
        Some(1000.0)
    );
    let vmas = crd("vmautoscalers");
    assert_eq!(schema_at(&vmas, "spec.metrics")["maxItems"], 8);
    assert_eq!(schema_at(&vmas, "spec.metrics")["minItems"], 1);
    assert_eq!(schema_at(&vmas, "spec.tolerance")["default"], 0.1);
    let mig = crd("vmmigrations");
    assert_eq!(schema_at(&mig, "spec.mode")["default"], "Postcopy");
    assert_eq!(schema_at(&mig, "spec.timeoutSeconds")["default"], 300);
    // status conditions merge per type under server-side apply
    let conditions = schema_at(&li, "status.conditions");
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
}

#[test]
fn schemas_are_structural_and_use_known_formats() {
    fn walk(v: &Value, path: &str, problems: &mut Vec<String>) {
        let Value::Object(map) = v else { return };
        for key in ["anyOf", "oneOf", "allOf", "$ref", "not"] {
            if map.contains_key(key) {
                problems.push(format!("{path} has {key}"));
            }
        }
        if let Some(Value::String(f)) = map.get("format")
            && !["int32", "int64", "double", "float", "date-time"].contains(&f.as_str())
        {
            problems.push(format!("{path} has format {f}"));
        }
        if let Some(Value::Array(values)) = map.get("enum")
            && values.iter().any(Value::is_null)
        {
            problems.push(format!("{path} has null in enum"));
        }
        if let Some(Value::Object(props)) = map.get("properties") {
            for (k, child) in props {
                walk(child, &format!("{path}.{k}"), problems);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child) = map.get(key) {
                walk(child, &format!("{path}[]"), problems);
            }
        }
    }
    let mut problems = Vec::new();
    for c in all_crds() {
        let v = serde_json::to_value(&c).unwrap();
        walk(
            &version(&v)["schema"]["openAPIV3Schema"],
            c.metadata.name.as_deref().unwrap(),
            &mut problems,
        );
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn subresources_names_and_columns() {
    // (plural, kind, short name, scope, printer columns)
    let expected: [(&str, &str, &str, &str, &[&str]); 6] = [
        (
            "liveimages",
            "LiveImage",
            "li",
            "Namespaced",
            &["Phase", "Node", "Memory", "Pause(ms)", "Age"],
        ),
        (
            "vmclones",
            "VMClone",
            "vmc",
            "Namespaced",
            &["Phase", "Node", "Image", "Start(ms)", "Age"],
        ),
        (
            "vmmigrations",
            "VMMigration",
            "vmmig",
            "Namespaced",
            &["Phase", "Source", "Target", "Downtime(ms)", "Age"],
        ),
        (
            "clonepools",
            "ClonePool",
            "cp",
            "Namespaced",
            &["Desired", "Ready", "Image", "Age"],
        ),
        (
            "vmautoscalers",
            "VMAutoscaler",
            "vmas",
            "Namespaced",
            &["Target", "Min", "Max", "Current", "Desired", "Age"],
        ),
        (
            "vmnodes",
            "VMNode",
            "vmn",
            "Cluster",
            &["Address", "Unschedulable", "Heartbeat", "Version", "Age"],
        ),
    ];
    for (plural, kind, short, scope, columns) in expected {
        let c = crd(plural);
        assert_eq!(c["spec"]["group"], "vmstream.io");
        assert_eq!(c["spec"]["names"]["kind"], kind);
        assert_eq!(c["spec"]["names"]["shortNames"], serde_json::json!([short]));
        assert_eq!(c["spec"]["scope"], scope);
        let v = version(&c);
        assert_eq!(v["name"], "v1alpha1");
        assert_eq!(
            v["subresources"]["status"],
            serde_json::json!({}),
            "{plural} status subresource"
        );
        let names: Vec<&str> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|col| col["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, columns, "{plural} printer columns");
        let conditions = schema_at(&c, "status.conditions");
        assert_eq!(conditions["type"], "array", "{plural} status.conditions");
    }
    let cp = crd("clonepools");
    assert_eq!(
        version(&cp)["subresources"]["scale"],
        serde_json::json!({
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.labelSelector",
        })
    );
    for plural in [
        "liveimages",
        "vmclones",
        "vmmigrations",
        "vmautoscalers",
        "vmnodes",
    ] {
        assert!(
            version(&crd(plural))["subresources"]["scale"].is_null(),
            "{plural} has no scale"
        );
    }
}

fn crdgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_crdgen"))
        .args(args)
        .output()
        .expect("run crdgen")
}

#[test]
fn committed_yaml_is_current() {
    let out = crdgen(&["--check", env!("CARGO_MANIFEST_DIR")]);
    assert!(
        out.status.success(),
        "crds/*.yaml is stale; run `cargo run -p vmstream-api --bin crdgen`:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn crdgen_check_reports_missing_changed_and_orphaned_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();

    let out = crdgen(&["--check", d]);
    assert!(!out.status.success(), "empty directory passed the check");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("liveimages.vmstream.io.yaml is stale (Missing)")
    );

    let out = crdgen(&[d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 6);
    assert!(
        crdgen(&["--check", d]).status.success(),
        "freshly written files are current"
    );

    let changed = dir.path().join("vmclones.vmstream.io.yaml");
    let text = std::fs::read_to_string(&changed).unwrap();
    std::fs::write(
        &changed,
        text.replace("liveImage is immutable", "anything goes"),
    )
    .unwrap();
    std::fs::write(dir.path().join("oldkinds.vmstream.io.yaml"), "kind: Old\n").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a CRD\n").unwrap();
    let out = crdgen(&["--check", d]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("vmclones.vmstream.io.yaml is stale (Differs)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("oldkinds.vmstream.io.yaml is stale (Orphaned)"),
        "{stderr}"
    );
    assert!(!stderr.contains("notes.txt"), "{stderr}");
    assert!(!stderr.contains("liveimages"), "{stderr}");

    // Regenerating repairs the directory and removes the orphan.
    assert!(crdgen(&[d]).status.success());
    assert!(crdgen(&["--check", d]).status.success());
    assert!(!Path::new(d).join("oldkinds.vmstream.io.yaml").exists());
    assert!(Path::new(d).join("notes.txt").exists());
}
