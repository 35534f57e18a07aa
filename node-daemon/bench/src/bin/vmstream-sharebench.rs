//! `vmstream-sharebench`: page sharing between clones on one node. Fifty
//! clones of one 1 GiB live image, each in its own process on the real
//! /dev/kvm, each guest reading the same 16 MiB of the image and writing
//! 4 MiB of it with its own marker (so no two clones write the same bytes),
//! then paused. Host memory is the sum of the clone processes' PSS (pages
//! shared between clones — image pages in the page cache, KSM-merged pages,
//! the binary — count once in total) plus the image's page cache pages no
//! clone maps (the node cache held outside them; `mincore` of the page
//! store). KVM's kernel memory (shadow page tables, vCPU structures) is not
//! in PSS and not counted.
//!
//! Budget: one copy of the touched image pages (16 MiB) + N × (4 MiB + VMM
//! overhead), where the VMM overhead is measured in the same run: the mean
//! per-clone PSS of everything but the guest's data area — the process
//! outside guest RAM and outside mappings of the image (heap, thread
//! stacks, the binary's share, the vCPU's `kvm_run` page) plus guest RAM
//! below the data area (the micro guest's program, page tables, stack,
//! mailbox and counters: the fixed cost of a running clone). The child
//! splits its guest RAM mapping at the data area (`MADV_NOHUGEPAGE` on the
//! part below it) so smaps reports the two parts apart. So host ≤ budget
//! exactly when the data area of all clones together costs at most one copy
//! of the touched image pages plus each clone's own 4 MiB.
//!
//! Variants, measured in the same run, each from a cold image page cache:
//! `cow` (MAP_PRIVATE of the page store — the shared backing, the headline),
//! `cow_ksm`, `lazy` (userfaultfd: every touched page is the clone's own
//! copy), `lazy_ksm` (ksmd merges the copies), `lazy_reclaim` (each clone
//! gives back its clean image-equal pages after the touches, as the node's
//! memory budget would make it).
//!
//! The bench re-executes itself for every clone:
//! `vmstream-sharebench --child DIR VARIANT INDEX`; the child starts the
//! clone, runs and checks the touches, pauses the VM, prints
//! `ready GUEST_ADDR GUEST_LEN TOUCH_MS DROPPED_BYTES` and waits for stdin
//! to close. It prints ONE flat JSON object on stdout; progress on stderr.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use vmstream_vmm::arch::x86_64::layout::DATA_START;
use vmstream_vmm::capture::capture;
use vmstream_vmm::devices::mailbox::{report, request};
use vmstream_vmm::guests::{FillSpec, GuestProgram, TouchCommand, TouchPattern};
use vmstream_vmm::image::{PAGES_FILE, PageStore};
use vmstream_vmm::machine::{BootOptions, Machine, MachineConfig, VmShell};
use vmstream_vmm::memory::ksm::{KSM_SYSFS, KsmRunning, KsmSettings};
use vmstream_vmm::memory::{
    LazyOptions, PAGE_SIZE, drop_image_equal_pages, merge_identical_pages, resident_bytes,
};
use vmstream_vmm::restore::{CloneMemory, CloneSource, restore};
use vmstream_vmm::vstate::vm::KvmHost;

const CHILD_FLAG: &str = "--child";
const MIB: f64 = (1 << 20) as f64;
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Pages every clone reads (16 MiB) and, of those, writes (4 MiB).
const READ_PAGES: u64 = 4096;
const WRITE_PAGES: u64 = 1024;
const FILL: FillSpec = FillSpec {
    zero_percent: 50,
    duplicate_percent: 5,
    templates: 64,
    seed: 0x5eed_5a4e,
};
const VARIANTS: [&str; 5] = ["cow", "cow_ksm", "lazy", "lazy_ksm", "lazy_reclaim"];

type Result<T, E = String> = std::result::Result<T, E>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(CHILD_FLAG) {
        let mut out = std::io::stdout();
        match child(&args[1..]) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                let _ = writeln!(out, "error {e}");
                std::process::exit(1);
            }
        }
    }
    match parse(&args).and_then(|a| run(&a)) {
        Ok(figures) => {
            let body: Vec<String> = figures
                .iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect();
            println!("{{{}}}", body.join(","));
        }
        Err(e) => {
            eprintln!("vmstream-sharebench: {e}");
            eprintln!(
                "usage: vmstream-sharebench [--clones N] [--memory-mib M] [--dir PATH] [--only v1,v2]"
            );
            std::process::exit(1);
        }
    }
}

struct Args {
    clones: usize,
    memory_mib: usize,
    dir: Option<PathBuf>,
    only: Vec<String>,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args {
        clones: 50,
        memory_mib: 1024,
        dir: None,
        only: VARIANTS.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--clones" => a.clones = value()?.parse().map_err(|e| format!("--clones: {e}"))?,
            "--memory-mib" => {
                a.memory_mib = value()?.parse().map_err(|e| format!("--memory-mib: {e}"))?
            }
            "--dir" => a.dir = Some(PathBuf::from(value()?)),
            "--only" => a.only = value()?.split(',').map(str::to_owned).collect(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if let Some(v) = a.only.iter().find(|v| !VARIANTS.contains(&v.as_str())) {
        return Err(format!("unknown variant {v} (known: {VARIANTS:?})"));
    }
    Ok(a)
}

fn progress(text: &str) {
    eprintln!("sharebench: {text}");
}

fn first_data_page() -> u64 {
    DATA_START / PAGE_SIZE as u64
}

fn read_touch() -> TouchCommand {
    TouchCommand {
        base_page: first_data_page(),
        count: READ_PAGES,
        pattern: TouchPattern::Sequential,
        region_pages: READ_PAGES,
        stride: 1,
        marker: 0,
        seed: 1,
    }
}

fn write_touch(index: u64) -> TouchCommand {
    TouchCommand {
        count: WRITE_PAGES,
        region_pages: WRITE_PAGES,
        marker: 0x5ca1_ab1e_0000 + index + 1,
        ..read_touch()
    }
}

fn run(args: &Args) -> Result<BTreeMap<String, String>> {
    let mut figures = BTreeMap::new();
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempdir()?;
            temp.0.clone()
        }
    };
    let image = dir.join("image");
    let config = MachineConfig {
        vcpus: 1,
        memory_bytes: args.memory_mib << 20,
    };
    let started = Instant::now();
    make_image(config, &image)?;
    progress(&format!(
        "{} MiB image captured in {:.1} s",
        args.memory_mib,
        started.elapsed().as_secs_f64()
    ));
    let put = |f: &mut BTreeMap<String, String>, k: &str, v: f64| {
        f.insert(k.to_string(), format!("{:.3}", v));
    };
    let n = args.clones as f64;
    put(&mut figures, "clones50_shared_clones", n);
    put(
        &mut figures,
        "clones50_shared_image_mib",
        args.memory_mib as f64,
    );
    put(
        &mut figures,
        "clones50_shared_touched_mib",
        READ_PAGES as f64 * 4096.0 / MIB,
    );
    put(
        &mut figures,
        "clones50_shared_written_mib_per_clone",
        WRITE_PAGES as f64 * 4096.0 / MIB,
    );
    let ksm_available = KsmSettings::read(Path::new(KSM_SYSFS)).is_ok();
    for variant in VARIANTS {
        if !args.only.iter().any(|v| v == variant) {
            continue;
        }
        if variant.ends_with("_ksm") && !ksm_available {
            progress(&format!("{variant} skipped: no {KSM_SYSFS}"));
            continue;
        }
        let m = run_variant(&image, variant, args.clones)?;
        let budget = READ_PAGES as f64 * 4096.0 / MIB
            + n * (WRITE_PAGES as f64 * 4096.0 / MIB + m.overhead_mib_per_clone);
        progress(&format!(
            "{variant}: host {:.1} MiB (PSS {:.1} + node cache outside {:.1}), budget {:.1} MiB, guest private {:.2} MiB/clone, VMM overhead {:.2} MiB/clone, all ready in {:.1} s",
            m.host_mib,
            m.pss_mib,
            m.cache_outside_mib,
            budget,
            m.guest_private_mib_per_clone,
            m.overhead_mib_per_clone,
            m.ready_s
        ));
        let p = format!("clones50_shared_{variant}");
        put(&mut figures, &format!("{p}_host_mib"), m.host_mib);
        put(&mut figures, &format!("{p}_budget_mib"), budget);
        put(&mut figures, &format!("{p}_pss_sum_mib"), m.pss_mib);
        put(
            &mut figures,
            &format!("{p}_cache_outside_mib"),
            m.cache_outside_mib,
        );
        put(
            &mut figures,
            &format!("{p}_image_cached_mib"),
            m.image_cached_mib,
        );
        put(
            &mut figures,
            &format!("{p}_guest_private_mib_per_clone"),
            m.guest_private_mib_per_clone,
        );
        put(
            &mut figures,
            &format!("{p}_guest_ksm_mib_per_clone"),
            m.guest_ksm_mib_per_clone,
        );
        put(
            &mut figures,
            &format!("{p}_overhead_mib_per_clone"),
            m.overhead_mib_per_clone,
        );
        put(
            &mut figures,
            &format!("{p}_dropped_mib_per_clone"),
            m.dropped_mib_per_clone,
        );
        put(
            &mut figures,
            &format!("{p}_guest_fixed_kib_per_clone"),
            m.fixed_guest_kib_per_clone,
        );
        put(&mut figures, &format!("{p}_touch_ms_p50"), m.touch_ms_p50);
        put(&mut figures, &format!("{p}_all_ready_s"), m.ready_s);
        if variant == "cow" {
            // The node's sharing backing is the headline.
            put(&mut figures, "clones50_shared_host_mib", m.host_mib);
            put(&mut figures, "clones50_shared_budget_mib", budget);
            put(
                &mut figures,
                "clones50_shared_vmm_overhead_mib_per_clone",
                m.overhead_mib_per_clone,
            );
        }
    }
    Ok(figures)
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<TempDir> {
    let path = std::env::temp_dir().join(format!("vmstream-sharebench.{}", std::process::id()));
    std::fs::create_dir_all(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    Ok(TempDir(path))
}

fn make_image(config: MachineConfig, dir: &Path) -> Result<()> {
    let host = KvmHost::open().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    let shell = VmShell::create(&host, config).map_err(|e| format!("creating the shell: {e}"))?;
    let machine = Machine::boot(
        shell,
        GuestProgram::Memory,
        &BootOptions {
            params: Vec::new(),
            fill: Some(FILL),
        },
    )
    .map_err(|e| format!("booting the memory guest: {e}"))?;
    machine
        .mailbox()
        .wait_report(0, GUEST_TIMEOUT, |r| r.kind == report::READY)
        .ok_or("the memory guest did not report READY")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    capture(&machine, dir).map_err(|e| format!("capturing into {}: {e}", dir.display()))?;
    machine.stop();
    Ok(())
}

/// Drops the image's clean pages from the page cache (each variant starts
/// cold, so the cache holds what its clones brought in).
fn evict_image(image: &Path) -> Result<()> {
    let path = image.join(PAGES_FILE);
    let file =
        std::fs::File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    // SAFETY: fadvise on a descriptor we own; it only drops clean cached pages.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(format!(
            "posix_fadvise DONTNEED on {}: errno {rc}",
            path.display()
        ));
    }
    Ok(())
}

/// Bytes of the image held in the page cache.
fn image_cached_bytes(image: &Path) -> Result<u64> {
    let store = PageStore::open(image).map_err(|e| format!("opening the page store: {e}"))?;
    let mapping = store.as_mapping();
    resident_bytes(mapping.as_ptr(), mapping.len()).map_err(|e| e.to_string())
}

/// Figures of one variant.
struct Measured {
    host_mib: f64,
    pss_mib: f64,
    cache_outside_mib: f64,
    image_cached_mib: f64,
    guest_private_mib_per_clone: f64,
    guest_ksm_mib_per_clone: f64,
    overhead_mib_per_clone: f64,
    fixed_guest_kib_per_clone: f64,
    dropped_mib_per_clone: f64,
    touch_ms_p50: f64,
    ready_s: f64,
}

struct Children(Vec<(Child, BufReader<ChildStdout>)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One VMA of a child's smaps.
#[derive(Debug, Default)]
struct Vma {
    start: usize,
    end: usize,
    path: String,
    pss: u64,
    anonymous: u64,
    ksm: u64,
}

fn parse_smaps(text: &str) -> Vec<Vma> {
    let mut vmas: Vec<Vma> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            let path = line.split_whitespace().nth(5).unwrap_or("").to_string();
            vmas.push(Vma {
                start: lo,
                end: hi,
                path,
                ..Vma::default()
            });
            continue;
        }
        let Some(vma) = vmas.last_mut() else { continue };
        let kib: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        match first {
            "Pss:" => vma.pss = kib * 1024,
            "Anonymous:" => vma.anonymous = kib * 1024,
            "KSM:" => vma.ksm = kib * 1024,
            _ => {}
        }
    }
    vmas
}

fn run_variant(image: &Path, variant: &str, clones: usize) -> Result<Measured> {
    evict_image(image)?;
    let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    let started = Instant::now();
    let mut children = Children(Vec::with_capacity(clones));
    for index in 0..clones {
        let mut child = Command::new(&exe)
            .arg(CHILD_FLAG)
            .arg(image)
            .arg(variant)
            .arg(index.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning clone child {index}: {e}"))?;
        let out = child.stdout.take().expect("stdout is piped");
        children.0.push((child, BufReader::new(out)));
    }
    let mut guests = Vec::with_capacity(clones);
    let mut touch_ms = Vec::with_capacity(clones);
    let mut dropped = 0u64;
    for (index, (_, out)) in children.0.iter_mut().enumerate() {
        let mut line = String::new();
        out.read_line(&mut line)
            .map_err(|e| format!("reading clone child {index}: {e}"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ready", addr, len, ms, gone] => {
                let addr: usize = addr.parse().map_err(|_| format!("bad line {line:?}"))?;
                let len: usize = len.parse().map_err(|_| format!("bad line {line:?}"))?;
                guests.push((addr, addr + len));
                touch_ms.push(ms.parse::<f64>().unwrap_or(f64::NAN));
                dropped += gone.parse::<u64>().unwrap_or(0);
            }
            _ => {
                return Err(format!(
                    "clone child {index} ({variant}) said {:?}",
                    line.trim()
                ));
            }
        }
    }
    let ready_s = started.elapsed().as_secs_f64();
    let ksm = if variant.ends_with("_ksm") {
        Some(settle_ksm()?)
    } else {
        None
    };
    let mut pss = 0u64;
    let mut image_pss = 0u64;
    let mut guest_private = 0u64;
    let mut guest_ksm = 0u64;
    let mut overhead = 0u64;
    let mut fixed_guest = 0u64;
    for ((child, _), (lo, hi)) in children.0.iter().zip(&guests) {
        let data_lo = lo + DATA_START as usize;
        let path = format!("/proc/{}/smaps", child.id());
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        for vma in parse_smaps(&text) {
            pss += vma.pss;
            let is_guest = vma.start < *hi && vma.end > *lo;
            let is_image = vma.path.ends_with(PAGES_FILE);
            if is_guest && vma.end <= data_lo {
                // Below the data area: the guest's fixed pages.
                fixed_guest += vma.pss;
                overhead += vma.pss;
            } else if is_guest {
                let owned = vma.anonymous.saturating_sub(vma.ksm);
                guest_private += owned;
                guest_ksm += vma.ksm;
                // The guest VMA of a CoW clone maps the image: its file part
                // is page cache (approximately PSS minus its anonymous pages).
                if is_image {
                    image_pss += vma.pss.saturating_sub(vma.anonymous);
                }
            } else if is_image {
                image_pss += vma.pss;
            } else {
                overhead += vma.pss;
            }
        }
    }
    drop(ksm);
    let image_cached = image_cached_bytes(image)?;
    let outside = image_cached.saturating_sub(image_pss);
    for (mut child, _) in std::mem::take(&mut children.0) {
        drop(child.stdin.take());
        let status = child
            .wait()
            .map_err(|e| format!("waiting for a child: {e}"))?;
        if !status.success() {
            return Err(format!("clone child {} exited with {status}", child.id()));
        }
    }
    touch_ms.sort_by(f64::total_cmp);
    let n = clones as f64;
    Ok(Measured {
        host_mib: (pss + outside) as f64 / MIB,
        pss_mib: pss as f64 / MIB,
        cache_outside_mib: outside as f64 / MIB,
        image_cached_mib: image_cached as f64 / MIB,
        guest_private_mib_per_clone: guest_private as f64 / MIB / n,
        guest_ksm_mib_per_clone: guest_ksm as f64 / MIB / n,
        overhead_mib_per_clone: overhead as f64 / MIB / n,
        fixed_guest_kib_per_clone: fixed_guest as f64 / 1024.0 / n,
        dropped_mib_per_clone: dropped as f64 / MIB / n,
        touch_ms_p50: touch_ms
            .get(touch_ms.len() / 2)
            .copied()
            .unwrap_or(f64::NAN),
        ready_s,
    })
}

/// Runs ksmd fast until it has done three more full scans and merged no
/// more pages in the last one; the settings are restored when the returned
/// guard is dropped (after measuring).
fn settle_ksm() -> Result<KsmRunning> {
    let dir = Path::new(KSM_SYSFS);
    let running = KsmRunning::start(dir, 50_000, 5).map_err(|e| e.to_string())?;
    let sharing = || {
        std::fs::read_to_string(dir.join("pages_sharing"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut scans = KsmSettings::full_scans(dir).map_err(|e| e.to_string())?;
    let mut rounds = 0;
    let mut last = sharing();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = KsmSettings::full_scans(dir).map_err(|e| e.to_string())?;
        if now > scans {
            scans = now;
            rounds += 1;
            let s = sharing();
            if rounds >= 3 && s == last {
                break;
            }
            last = s;
        }
    }
    progress(&format!(
        "ksmd: {} pages sharing after {rounds} full scans",
        sharing()
    ));
    Ok(running)
}

fn child(args: &[String]) -> Result<()> {
    let [dir, variant, index] = args else {
        return Err(format!("{CHILD_FLAG} DIR VARIANT INDEX, got {args:?}"));
    };
    let index: u64 = index.parse().map_err(|e| format!("index {index}: {e}"))?;
    let dir = PathBuf::from(dir);
    let host = KvmHost::open().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    let source = CloneSource::open(&dir).map_err(|e| format!("opening the image: {e}"))?;
    let config = MachineConfig {
        vcpus: source.state().vcpus.len() as u8,
        memory_bytes: source.state().memory_bytes as usize,
    };
    let lazy = variant.starts_with("lazy");
    let mut shell = VmShell::create(&host, config).map_err(|e| format!("shell: {e}"))?;
    if lazy {
        shell
            .prepare_lazy(LazyOptions::default())
            .map_err(|e| format!("userfaultfd: {e}"))?;
    }
    let memory = if lazy {
        CloneMemory::Lazy(LazyOptions::default())
    } else {
        CloneMemory::CopyOnWrite
    };
    let clone = restore(shell, &source, &memory).map_err(|e| format!("restore: {e}"))?;
    let machine = &clone.machine;
    if variant.ends_with("_ksm") {
        merge_identical_pages(machine.guest_ram()).map_err(|e| e.to_string())?;
    }
    // Split the guest RAM mapping at the data area, so smaps reports the
    // guest's fixed pages (program, tables, stack, mailbox) apart.
    // SAFETY: madvise on the first DATA_START bytes of this clone's guest
    // RAM; MADV_NOHUGEPAGE changes no contents.
    let rc = unsafe {
        libc::madvise(
            machine.guest_ram().host_addr().cast(),
            DATA_START as usize,
            libc::MADV_NOHUGEPAGE,
        )
    };
    if rc != 0 {
        return Err(format!(
            "madvise(MADV_NOHUGEPAGE) below the data area: {}",
            std::io::Error::last_os_error()
        ));
    }
    let started = Instant::now();
    for cmd in [read_touch(), write_touch(index)] {
        let want = cmd.expected(|p| FILL.first_qword(p));
        let got = machine
            .mailbox()
            .call(request::TOUCH, cmd.args(), report::RESULT, GUEST_TIMEOUT)
            .map_err(|e| format!("touch {cmd:?}: {e}"))?;
        if got.args[..3] != [want.sum, want.xor, want.pages] {
            return Err(format!(
                "touch {cmd:?} read wrong data: {:x?}",
                &got.args[..3]
            ));
        }
    }
    let touch_ms = started.elapsed().as_secs_f64() * 1e3;
    let dropped = if variant == "lazy_reclaim" {
        drop_image_equal_pages(machine, source.startup_pages(), u64::MAX / 2, true)
            .map_err(|e| format!("reclaim: {e}"))?
            .dropped_bytes()
    } else {
        0
    };
    machine.pause().map_err(|e| format!("pause: {e}"))?;
    let ram = machine.guest_ram();
    let mut out = std::io::stdout();
    writeln!(
        out,
        "ready {} {} {touch_ms:.3} {dropped}",
        ram.host_addr() as usize,
        ram.len()
    )
    .and_then(|()| out.flush())
    .map_err(|e| format!("reporting: {e}"))?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    Ok(())
}
