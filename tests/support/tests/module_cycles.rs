//! `hack/module-cycles.py` (run by `make structure`) checked on small fake
//! crates: it must report a cycle between two files, including one made of
//! `super::` paths and brace groups, and must not report the patterns that
//! are not cycles (a parent declaring a child, an inline `mod tests` that
//! imports `super::*`, a one-way chain).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Writes `files` (path under src/, contents) into a fresh fake crate.
fn fake_crate(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let root = std::env::temp_dir().join(format!("vmstream-cycles-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for (path, text) in files {
        let path = root.join("src").join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    std::fs::write(root.join("Cargo.toml"), "[package]\nname = \"fake\"\n").unwrap();
    root
}

fn check(root: &Path) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/module-cycles.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(root)
        .output()
        .expect("run hack/module-cycles.py");
    std::fs::remove_dir_all(root).unwrap();
    out
}

#[test]
fn two_files_that_import_each_other_are_a_cycle() {
    let root = fake_crate(
        "pair",
        &[
            ("lib.rs", "mod actions;\nmod service;\n"),
            (
                "actions.rs",
                "use crate::service::{PageService, other::X};\npub struct Dir;\n",
            ),
            (
                "service.rs",
                "pub struct PageService;\nfn f() -> super::actions::Dir { todo() }\n",
            ),
        ],
    );
    let out = check(&root);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "stdout: {text}");
    assert!(
        text.contains("src/actions.rs <-> ") && text.contains("src/service.rs"),
        "{text}"
    );
}

#[test]
fn children_tests_and_chains_are_not_cycles() {
    let root = fake_crate(
        "none",
        &[
            ("lib.rs", "pub mod decide;\npub mod run;\n"),
            // A parent declares its children; the child imports the parent.
            (
                "decide/mod.rs",
                "mod tests;\npub mod placement;\npub struct Facts;\n",
            ),
            (
                "decide/tests.rs",
                "use super::*;\nuse super::placement::place;\n",
            ),
            (
                "decide/placement.rs",
                "use super::Facts;\npub fn place(_: Facts) {}\n",
            ),
            // run imports decide one way; its inline tests import run itself.
            (
                "run.rs",
                "use crate::decide::placement::place;\n\
                 #[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
            ),
        ],
    );
    let out = check(&root);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout: {text}");
    assert!(text.contains("module cycles: none"), "{text}");
}
