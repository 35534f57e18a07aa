//! The probes of `hack/deps.sh` (what `make up` and `make test` install on a
//! fresh machine) checked against fake dpkg databases: a machine that ships
//! only llvm's `libclang-cpp` must still get `libclang-dev`, which bindgen
//! needs; a file-pattern probe once took the one for the other and `make up`
//! failed on a fresh machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmstream_test_support::record_skip;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A dpkg database under a fresh temporary directory holding `packages` as
/// installed, plus the llvm files a fresh machine of the project's kind has,
/// so a probe that looked at files instead of packages would be fooled.
fn fake_machine(name: &str, packages: &[&str]) -> PathBuf {
    let root = std::env::temp_dir().join(format!("vmstream-deps-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let admin = root.join("var/lib/dpkg");
    std::fs::create_dir_all(admin.join("info")).unwrap();
    std::fs::create_dir_all(admin.join("updates")).unwrap();
    let status: String = packages
        .iter()
        .map(|p| {
            format!(
                "Package: {p}\nStatus: install ok installed\nArchitecture: amd64\n\
                 Version: 1.0\nMaintainer: test\nDescription: test\n\n"
            )
        })
        .collect();
    std::fs::write(admin.join("status"), status).unwrap();
    let llvm = root.join("usr/lib/llvm-14/lib");
    std::fs::create_dir_all(&llvm).unwrap();
    std::fs::write(llvm.join("libclang-cpp.so.14"), b"").unwrap();
    root
}

/// `hack/deps.sh --missing` against the fake machine's dpkg database.
fn missing(root: &Path) -> Option<Vec<String>> {
    if Command::new("dpkg-query")
        .arg("--version")
        .output()
        .is_err()
    {
        return None;
    }
    let out = Command::new(repo().join("hack/deps.sh"))
        .arg("--missing")
        .env("DPKG_ADMINDIR", root.join("var/lib/dpkg"))
        .output()
        .expect("run hack/deps.sh");
    assert!(
        out.status.success(),
        "hack/deps.sh --missing failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn a_machine_with_only_libclang_cpp_gets_libclang_dev() {
    let root = fake_machine("libclang-cpp", &["libclang-cpp14", "binutils", "iproute2"]);
    let Some(missing) = missing(&root) else {
        record_skip(
            "a_machine_with_only_libclang_cpp_gets_libclang_dev",
            "no dpkg-query (not Debian)",
        );
        return;
    };
    std::fs::remove_dir_all(&root).unwrap();
    assert!(
        missing.contains(&"libclang-dev".to_string()),
        "missing: {missing:?}"
    );
    assert!(
        !missing.contains(&"binutils".to_string()),
        "missing: {missing:?}"
    );
    assert!(
        !missing.contains(&"iproute2".to_string()),
        "missing: {missing:?}"
    );
}

#[test]
fn a_machine_with_every_package_needs_nothing() {
    let all = [
        "libclang-dev",
        "binutils",
        "iproute2",
        "openssl",
        "curl",
        "procps",
        "python3",
        "ca-certificates",
        "linux-source-6.1",
        "gcc",
        "make",
        "flex",
        "bison",
        "bc",
        "libelf-dev",
        "xz-utils",
        "patch",
        "e2fsprogs",
    ];
    let root = fake_machine("complete", &all);
    let Some(missing) = missing(&root) else {
        record_skip(
            "a_machine_with_every_package_needs_nothing",
            "no dpkg-query (not Debian)",
        );
        return;
    };
    std::fs::remove_dir_all(&root).unwrap();
    assert_eq!(missing, Vec::<String>::new());
}

#[test]
fn an_empty_machine_needs_every_package() {
    let root = fake_machine("empty", &[]);
    let Some(missing) = missing(&root) else {
        record_skip(
            "an_empty_machine_needs_every_package",
            "no dpkg-query (not Debian)",
        );
        return;
    };
    std::fs::remove_dir_all(&root).unwrap();
    assert_eq!(missing.len(), 18, "missing: {missing:?}");
    assert_eq!(missing[0], "libclang-dev");
}
