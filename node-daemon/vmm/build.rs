//! Build script: assembles the micro guests in `guests/` with GNU `as --64`,
//! links them at 1 MiB with `guests/guest.ld` and flattens them with
//! `objcopy -O binary`; `src/guests` embeds the results with `include_bytes!`.

use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: &[&str] = &["counter", "memory", "request"];

fn main() {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src = manifest.join("guests");
    println!("cargo:rerun-if-changed=guests");
    for entry in std::fs::read_dir(&src).expect("read vmm/guests") {
        let path = entry.expect("read vmm/guests entry").path();
        println!("cargo:rerun-if-changed={}", path.display());
    }
    for guest in GUESTS {
        build_guest(&src, &out, guest);
    }
}

fn build_guest(src: &Path, out: &Path, name: &str) {
    let object = out.join(format!("{name}.o"));
    let elf = out.join(format!("{name}.elf"));
    let bin = out.join(format!("{name}.bin"));
    run(
        Command::new("as")
            .arg("--64")
            .arg("-I")
            .arg(src)
            .arg("-o")
            .arg(&object)
            .arg(src.join(format!("{name}.S"))),
        "as",
        name,
    );
    run(
        Command::new("ld")
            .arg("-nostdlib")
            .arg("-T")
            .arg(src.join("guest.ld"))
            .arg("-o")
            .arg(&elf)
            .arg(&object),
        "ld",
        name,
    );
    run(
        Command::new("objcopy")
            .arg("-O")
            .arg("binary")
            .arg(&elf)
            .arg(&bin),
        "objcopy",
        name,
    );
}

fn run(command: &mut Command, tool: &str, guest: &str) {
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("building micro guest `{guest}`: `{tool}` failed with {status}"),
        Err(error) => panic!(
            "building micro guest `{guest}`: cannot run GNU `{tool}` ({error}); \
             install GNU binutils (as, ld, objcopy) to build vmstream-vmm"
        ),
    }
}
