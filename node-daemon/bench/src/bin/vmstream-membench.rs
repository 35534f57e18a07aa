//! Micro-benchmark of guest-memory streaming on this host. Prints one flat
//! JSON object: first-touch fault latency of lazy memory served from a local
//! page store (handler pinned to the toucher's CPU, and to the other CPU),
//! beside a bare userfaultfd round trip (a handler that only does
//! `UFFDIO_COPY` from a static buffer) measured in the same run, and the
//! page-store writer's throughput on a filled and on a zero buffer.
//!
//! Usage: `vmstream-membench [--faults N] [--write-mib M] [--dir PATH] [--cpu C]`
//! (build with `--release` for meaningful numbers).

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use userfaultfd::{Event, UffdBuilder};
use vmstream_vmm::image::{PageStore, PageStoreWriter, WriteOptions};
use vmstream_vmm::memory::{GuestRam, LazyMemory, LazyOptions, PAGE_SIZE, pin_thread};

struct Args {
    faults: usize,
    write_mib: usize,
    dir: PathBuf,
    cpu: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        faults: 4096,
        write_mib: 1024,
        dir: std::env::temp_dir(),
        cpu: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--faults" => args.faults = value()?.parse().map_err(|e| format!("--faults: {e}"))?,
            "--write-mib" => {
                args.write_mib = value()?.parse().map_err(|e| format!("--write-mib: {e}"))?
            }
            "--dir" => args.dir = PathBuf::from(value()?),
            "--cpu" => args.cpu = Some(value()?.parse().map_err(|e| format!("--cpu: {e}"))?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.faults < 1 || args.write_mib < 1 {
        return Err("--faults and --write-mib must be positive".into());
    }
    Ok(args)
}

fn current_cpu() -> usize {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    cpu.max(0) as usize
}

fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Quantile `q` of sorted durations, in microseconds.
fn quantile_us(sorted: &[Duration], q: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    round2(sorted[idx].as_nanos() as f64 / 1000.0)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Touches every page of `[base, base + pages * PAGE_SIZE)` once (a read),
/// returning each first-touch time, sorted.
fn touch_all(base: *const u8, pages: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(pages);
    for p in 0..pages {
        let t0 = Instant::now();
        // SAFETY: inside the caller's mapping; the read may fault and is
        // served by the userfaultfd handler.
        let v = unsafe { base.add(p * PAGE_SIZE).read_volatile() };
        times.push(t0.elapsed());
        std::hint::black_box(v);
    }
    times.sort();
    times
}

/// Writes a page store of `pages` random non-zero pages into `dir`.
fn write_random_store(dir: &Path, pages: usize) -> Result<PageStore, Box<dyn Error>> {
    std::fs::create_dir_all(dir)?;
    let ram = GuestRam::reserve(pages * PAGE_SIZE)?;
    // SAFETY: fresh writable reservation of that length.
    let mem = unsafe { std::slice::from_raw_parts_mut(ram.host_addr(), ram.len()) };
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in mem.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let mut w = PageStoreWriter::prepare(dir, ram.len())?;
    // SAFETY: readable for its length, not written concurrently.
    unsafe { w.write_from(ram.host_addr(), None, None) }?;
    w.finish()?;
    Ok(PageStore::open(dir)?)
}

/// First-touch faults on lazy memory served from `store` by a handler
/// pinned to `handler_cpu`, touched from a thread pinned to `toucher_cpu`.
fn lazy_faults(
    store: &Arc<PageStore>,
    handler_cpu: usize,
    toucher_cpu: usize,
) -> Result<(Vec<Duration>, LazyMemory, GuestRam), Box<dyn Error>> {
    let ram = GuestRam::reserve(store.pages() * PAGE_SIZE)?;
    let lazy = LazyMemory::register(
        &ram,
        LazyOptions {
            handler_cpu: Some(handler_cpu),
            ..LazyOptions::default()
        },
    )?;
    lazy.attach(store.clone())?;
    let base = ram.host_addr() as usize;
    let pages = ram.pages();
    let times = std::thread::spawn(move || {
        pin_thread(0, toucher_cpu).expect("pin toucher");
        touch_all(base as *const u8, pages)
    })
    .join()
    .map_err(|_| "toucher thread panicked")?;
    Ok((times, lazy, ram))
}

/// The bare userfaultfd round trip: a handler thread that blocks in
/// `read`, then `UFFDIO_COPY`s one page from a static buffer.
fn raw_uffd_faults(
    pages: usize,
    handler_cpu: usize,
    toucher_cpu: usize,
) -> Result<Vec<Duration>, Box<dyn Error>> {
    static SOURCE_PAGE: [u8; PAGE_SIZE] = [0x5a; PAGE_SIZE];
    let ram = GuestRam::reserve(pages * PAGE_SIZE)?;
    let uffd = Arc::new(
        UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(false)
            .user_mode_only(false)
            .create()?,
    );
    uffd.register(ram.host_addr().cast(), ram.len())?;
    let handler_uffd = uffd.clone();
    let handler = std::thread::spawn(move || {
        pin_thread(0, handler_cpu).expect("pin raw handler");
        for _ in 0..pages {
            match handler_uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => {
                    let page = (addr as usize) & !(PAGE_SIZE - 1);
                    // SAFETY: copies one page from a static buffer into the
                    // registered, missing page that faulted.
                    unsafe {
                        handler_uffd
                            .copy(SOURCE_PAGE.as_ptr().cast(), page as *mut _, PAGE_SIZE, true)
                            .expect("UFFDIO_COPY");
                    }
                }
                other => panic!("unexpected userfaultfd event {other:?}"),
            }
        }
    });
    let base = ram.host_addr() as usize;
    let times = std::thread::spawn(move || {
        pin_thread(0, toucher_cpu).expect("pin toucher");
        touch_all(base as *const u8, pages)
    })
    .join()
    .map_err(|_| "toucher thread panicked")?;
    handler.join().map_err(|_| "raw handler panicked")?;
    drop(ram);
    Ok(times)
}

/// Page-store writer throughput over `mib` MiB: `fill` non-zero pages, or
/// pages that were written and zeroed again (private zero pages, so the scan
/// reads real memory). Returns (write_from seconds, finish seconds, bytes on disk).
fn writer_throughput(
    dir: &Path,
    mib: usize,
    fill: bool,
    direct_io: bool,
) -> Result<(f64, f64, u64), Box<dyn Error>> {
    let len = mib << 20;
    let ram = GuestRam::reserve(len)?;
    // SAFETY: fresh writable reservation of that length.
    let mem = unsafe { std::slice::from_raw_parts_mut(ram.host_addr().cast::<u64>(), len / 8) };
    for (i, w) in mem.iter_mut().enumerate() {
        *w = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    }
    if !fill {
        mem.fill(0);
    }
    std::fs::create_dir_all(dir)?;
    let mut w = PageStoreWriter::prepare_with(dir, len, WriteOptions { direct_io })?;
    let t0 = Instant::now();
    // SAFETY: readable for its length, not written concurrently.
    unsafe { w.write_from(ram.host_addr(), None, None) }?;
    let write_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    w.finish()?;
    let finish_s = t1.elapsed().as_secs_f64();
    let disk = PageStore::open(dir)?.disk_bytes();
    Ok((write_s, finish_s, disk))
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args().inspect_err(|_| {
        eprintln!("usage: vmstream-membench [--faults N] [--write-mib M] [--dir PATH] [--cpu C]");
    })?;
    vmstream_vmm::memory::userfaultfd_available()?;
    let cpu = args.cpu.unwrap_or_else(current_cpu);
    let other_cpu = (cpu + 1) % online_cpus();
    let work = tempfile_dir(&args.dir)?;
    let mut out = Map::new();
    out.insert(
        "build".into(),
        json!(if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }),
    );
    out.insert("faults".into(), json!(args.faults));
    out.insert("cpu".into(), json!(cpu));

    // Lazy memory from a local page store, handler on the toucher's CPU.
    let store = Arc::new(write_random_store(&work.join("fault-image"), args.faults)?);
    let (times, lazy, ram) = lazy_faults(&store, cpu, cpu)?;
    let stats = lazy.stats();
    drop(lazy);
    drop(ram);
    out.insert("fault_local_us_p50".into(), json!(quantile_us(&times, 0.5)));
    out.insert(
        "fault_local_us_p99".into(),
        json!(quantile_us(&times, 0.99)),
    );
    out.insert(
        "fault_local_handler_service_us_p50_bucket_upper".into(),
        json!(stats.latency.quantile_upper_us(0.5)),
    );
    out.insert("fault_local_faults_served".into(), json!(stats.faults));

    // Bare userfaultfd round trip, same pinning, same run.
    let raw = raw_uffd_faults(args.faults, cpu, cpu)?;
    out.insert(
        "uffd_raw_roundtrip_us_p50".into(),
        json!(quantile_us(&raw, 0.5)),
    );
    out.insert(
        "uffd_raw_roundtrip_us_p99".into(),
        json!(quantile_us(&raw, 0.99)),
    );

    // The same two with the handler on another CPU.
    if other_cpu != cpu {
        let (times, lazy, ram) = lazy_faults(&store, other_cpu, cpu)?;
        drop(lazy);
        drop(ram);
        out.insert(
            "fault_local_cross_cpu_us_p50".into(),
            json!(quantile_us(&times, 0.5)),
        );
        out.insert(
            "fault_local_cross_cpu_us_p99".into(),
            json!(quantile_us(&times, 0.99)),
        );
        let raw = raw_uffd_faults(args.faults, other_cpu, cpu)?;
        out.insert(
            "uffd_raw_roundtrip_cross_cpu_us_p50".into(),
            json!(quantile_us(&raw, 0.5)),
        );
        out.insert(
            "uffd_raw_roundtrip_cross_cpu_us_p99".into(),
            json!(quantile_us(&raw, 0.99)),
        );
    }
    drop(store);

    // Writer throughput: buffered (the default) and O_DIRECT, then the
    // zero-page scan.
    let gib = args.write_mib as f64 / 1024.0;
    out.insert("pagestore_write_mib".into(), json!(args.write_mib));
    for (prefix, direct_io) in [("pagestore", false), ("pagestore_direct", true)] {
        let dir = work.join(format!("write-{prefix}"));
        let (write_s, finish_s, disk) = writer_throughput(&dir, args.write_mib, true, direct_io)?;
        out.insert(
            format!("{prefix}_write_gib_s"),
            json!(round2(gib / write_s)),
        );
        out.insert(
            format!("{prefix}_finish_fsync_ms"),
            json!(round2(finish_s * 1000.0)),
        );
        out.insert(
            format!("{prefix}_write_with_fsync_gib_s"),
            json!(round2(gib / (write_s + finish_s))),
        );
        out.insert(format!("{prefix}_disk_bytes"), json!(disk));
        std::fs::remove_dir_all(&dir)?;
    }
    let (zero_s, _, zero_disk) =
        writer_throughput(&work.join("write-zero"), args.write_mib, false, false)?;
    out.insert(
        "pagestore_zero_scan_gib_s".into(),
        json!(round2(gib / zero_s)),
    );
    out.insert("pagestore_zero_disk_bytes".into(), json!(zero_disk));

    std::fs::remove_dir_all(&work)?;
    println!("{}", Value::Object(out));
    Ok(())
}

/// A fresh work directory under `parent`.
fn tempfile_dir(parent: &Path) -> std::io::Result<PathBuf> {
    let dir = parent.join(format!("vmstream-membench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
