//! Page-streaming benchmark across a real veth hop between two network
//! namespaces (node A serves, node B reads). Prints one flat JSON object:
//! first-touch remote fault latency through real userfaultfd lazy memory
//! (p50/p99 in µs), the bulk stream rate of a whole image into B's node
//! cache, and raw TCP throughput over the same hop in the same run (both in
//! Gbit/s). Needs root and `ip`; removes its namespaces at the end.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rand::seq::SliceRandom;
use vmstream_pagestream::netns::{TestNetwork, enter, spawn_in};
use vmstream_pagestream::{ClusterToken, PageServer, RemoteConfig, RemotePages, ServerOptions};
use vmstream_vmm::image::{PageStore, PageStoreWriter};
use vmstream_vmm::memory::{GuestRam, LazyMemory, LazyOptions, PAGE_SIZE};

#[derive(Debug, Parser)]
#[command(about = "Benchmark page streaming across a veth hop")]
struct Args {
    /// Image size in MiB (streamed whole; every page non-zero).
    #[arg(long, default_value_t = 1024)]
    image_mib: usize,
    /// First-touch faults to time.
    #[arg(long, default_value_t = 3000)]
    faults: usize,
    /// Bytes of raw TCP to send, in MiB.
    #[arg(long, default_value_t = 1024)]
    raw_mib: usize,
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const IMAGE: &str = "bench/image";

fn write_image(dir: &std::path::Path, bytes: usize) -> BenchResult<PageStore> {
    let ram = GuestRam::reserve(bytes)?;
    // SAFETY: the reservation is `bytes` long and owned here; filled as u64s.
    let words = unsafe { std::slice::from_raw_parts_mut(ram.host_addr().cast::<u64>(), bytes / 8) };
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in words.iter_mut() {
        // xorshift: cheap, non-zero, incompressible enough for TCP.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    std::fs::create_dir_all(dir)?;
    let mut writer = PageStoreWriter::prepare(dir, bytes)?;
    // SAFETY: the range is readable and not written concurrently.
    unsafe { writer.write_from(ram.host_addr(), None, None) }
        .map_err(|e| format!("writing the image: {e}"))?;
    writer
        .finish()
        .map_err(|e| format!("finishing the image: {e}"))?;
    Ok(PageStore::open(dir)?)
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

/// Sends `total` bytes from namespace A to a receiver in B; returns the
/// receiver's time from connect to the last byte.
fn raw_tcp(ns_a: &str, a: SocketAddr, total: usize) -> BenchResult<Duration> {
    let listener = spawn_in(ns_a, move || TcpListener::bind(a))?
        .join()
        .map_err(|_| "listener thread panicked")???;
    let addr = listener.local_addr()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let chunk = vec![0xa5u8; 1 << 20];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n])?;
            left -= n;
        }
        Ok(())
    });
    let start = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    while got < total {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err("raw sender closed early".into());
        }
        got += n;
    }
    let elapsed = start.elapsed();
    sender.join().map_err(|_| "sender panicked")??;
    Ok(elapsed)
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn run(args: &Args) -> BenchResult<serde_json::Value> {
    if let Err(why) = vmstream_vmm::memory::userfaultfd_available() {
        return Err(why.into());
    }
    let mut net = TestNetwork::new();
    let (ns_a, ns_b) = (net.add_namespace()?, net.add_namespace()?);
    let link = net.link(&ns_a, &ns_b)?;
    let dir = tempfile::tempdir()?;
    let image_bytes = args.image_mib << 20;
    let store = Arc::new(write_image(&dir.path().join("image"), image_bytes)?);
    let token = ClusterToken::new(b"streambench-cluster-token-0123456789".to_vec())?;

    let listen = SocketAddr::V4(SocketAddrV4::new(link.a, 7070));
    let server_token = token.clone();
    let server = spawn_in(&ns_a, move || {
        PageServer::bind(listen, server_token, ServerOptions::default())
    })?
    .join()
    .map_err(|_| "server thread panicked")???;
    server.add_image(IMAGE, store);

    let _in_b = enter(&ns_b)?;
    // 1. Raw TCP over the hop.
    let raw_bytes = args.raw_mib << 20;
    let raw = raw_tcp(
        &ns_a,
        SocketAddr::V4(SocketAddrV4::new(link.a, 7071)),
        raw_bytes,
    )?;

    // 2. First-touch faults through userfaultfd lazy memory, each one a
    //    request on the fault connection.
    let config = RemoteConfig::new(IMAGE, vec![server.local_addr()], token);
    let faults_src = Arc::new(RemotePages::open(
        config.clone(),
        &dir.path().join("fault-cache"),
    )?);
    let ram = GuestRam::reserve(image_bytes)?;
    let lazy = LazyMemory::register(&ram, LazyOptions::default())?;
    lazy.attach(faults_src.clone())?;
    let mut order: Vec<usize> = (0..image_bytes / PAGE_SIZE).collect();
    order.shuffle(&mut rand::rng());
    let mut lat = Vec::with_capacity(args.faults);
    for &p in order.iter().take(args.faults) {
        // SAFETY: inside the reservation; the read faults and is served by
        // the lazy memory's handler.
        let addr = unsafe { ram.host_addr().add(p * PAGE_SIZE) };
        let t = Instant::now();
        // SAFETY: see above; a volatile read so the touch is not elided.
        let v = unsafe { std::ptr::read_volatile(addr) };
        lat.push(t.elapsed());
        std::hint::black_box(v);
    }
    let fault_stats = lazy.stats();
    lazy.shutdown();
    drop(ram);
    drop(faults_src);
    lat.sort();

    // 3. The whole image through the bulk path into a fresh node cache.
    let bulk = RemotePages::open(config, &dir.path().join("bulk-cache"))?;
    let start = Instant::now();
    bulk.start_prefetch(Vec::new())?;
    bulk.wait_prefetch();
    let stream = start.elapsed();
    if !bulk.cache().is_complete() {
        return Err("the bulk stream did not complete".into());
    }
    let bulk_stats = bulk.stats();
    drop(bulk);
    let server_stats = server.stats();
    server.shutdown();

    let stream_gbps = gbps(image_bytes as u64, stream);
    let raw_gbps = gbps(raw_bytes as u64, raw);
    Ok(serde_json::json!({
        "remote_fault_us_p50": percentile(&lat, 0.5),
        "remote_fault_us_p99": percentile(&lat, 0.99),
        "faults_timed": lat.len(),
        "fault_errors": fault_stats.errors,
        "stream_gbps": stream_gbps,
        "raw_tcp_gbps": raw_gbps,
        "stream_to_raw": stream_gbps / raw_gbps,
        "stream_seconds": stream.as_secs_f64(),
        "image_bytes": image_bytes,
        "raw_bytes": raw_bytes,
        "bulk_requests": bulk_stats.bulk_requests,
        "bulk_failures": bulk_stats.bulk_failures,
        "server_pages_sent": server_stats.pages_sent,
        "units": "gbps = 1e9 bits/s; latencies in microseconds, touch to return",
    }))
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            println!("{}", serde_json::json!({ "error": e.to_string() }));
            std::process::exit(1);
        }
    }
}
