//! `crdgen [--check] [DIR]`: write the CustomResourceDefinition YAML of every
//! vmstream kind into DIR (default: the `crds/` directory of the source tree),
//! one file per CRD; with `--check`, write nothing and exit 1 listing the files
//! that are missing, differ from the types, or belong to no CRD any more.

use std::path::PathBuf;
use std::process::ExitCode;

use vmstream_api::manifests::{check_dir, write_dir};

const USAGE: &str = "usage: crdgen [--check] [DIR]";

fn main() -> ExitCode {
    let mut check = false;
    let mut dir: Option<PathBuf> = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other if other.starts_with('-') || dir.is_some() => {
                eprintln!("crdgen: unexpected argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
            other => dir = Some(PathBuf::from(other)),
        }
    }
    let dir = dir.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));

    if check {
        match check_dir(&dir) {
            Ok(stale) if stale.is_empty() => ExitCode::SUCCESS,
            Ok(stale) => {
                for (name, why) in stale {
                    eprintln!("crdgen: {} is stale ({why:?})", dir.join(name).display());
                }
                eprintln!(
                    "crdgen: run `cargo run -p vmstream-api --bin crdgen` and commit the result"
                );
                ExitCode::FAILURE
            }
            Err(e) => report(&e),
        }
    } else {
        match write_dir(&dir) {
            Ok(written) => {
                for name in written {
                    println!("{}", dir.join(name).display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => report(&e),
        }
    }
}

fn report(e: &dyn std::error::Error) -> ExitCode {
    let mut msg = format!("crdgen: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{msg}");
    ExitCode::FAILURE
}
