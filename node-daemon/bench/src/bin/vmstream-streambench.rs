//! Page-streaming benchmark across a real veth hop between two network
//! namespaces (node A serves, node B reads). Prints one flat JSON object:
//! first-touch remote fault latency through real userfaultfd lazy memory
//! (p50/p99 in µs), the bulk stream rate of a whole image into B's node
//! cache, and raw TCP throughput over the same hop in the same run (both in
//! Gbit/s, medians of interleaved rounds after a warm-up round). Needs root
//! and `ip`; removes its namespaces at the end.

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
    /// Timed repetitions of the stream and raw TCP measurements (after one
    /// untimed warm-up round); medians are reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Bulk connections of the stream (`RemoteConfig::bulk_connections`).
    #[arg(long, default_value_t = 2)]
    bulk_connections: usize,
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

/// Sends `total` bytes from namespace A to receivers in B over
/// `connections` parallel connections (an equal share each, one sending
/// and one receiving thread per connection); returns the time from the
/// first connect to the last byte received.
fn raw_tcp(listener: &TcpListener, connections: usize, total: usize) -> BenchResult<Duration> {
    let addr = listener.local_addr()?;
    let share = total / connections;
    let mut senders = Vec::new();
    for _ in 0..connections {
        let listener = listener.try_clone()?;
        senders.push(std::thread::spawn(move || -> std::io::Result<()> {
            let (mut s, _) = listener.accept()?;
            let chunk = vec![0xa5u8; 1 << 20];
            let mut left = share;
            while left > 0 {
                let n = left.min(chunk.len());
                s.write_all(&chunk[..n])?;
                left -= n;
            }
            Ok(())
        }));
    }
    let start = Instant::now();
    let receivers: Vec<_> = (0..connections)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut s = TcpStream::connect(addr)?;
                let mut buf = vec![0u8; 1 << 20];
                let mut got = 0;
                while got < share {
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    got += n;
                }
                Ok(())
            })
        })
        .collect();
    for r in receivers {
        r.join().map_err(|_| "receiver panicked")??;
    }
    let elapsed = start.elapsed();
    for s in senders {
        s.join().map_err(|_| "sender panicked")??;
    }
    Ok(elapsed)
}

/// Streams the whole image through the bulk path into a fresh node cache
/// in `cache_dir`; returns the time until every page is present (readable
/// by clones) and the time until the cache is also flushed to disk.
fn stream_once(
    config: &RemoteConfig,
    cache_dir: &std::path::Path,
) -> BenchResult<(Duration, Duration, vmstream_pagestream::RemoteStats)> {
    if cache_dir.exists() {
        std::fs::remove_dir_all(cache_dir)?;
    }
    let bulk = RemotePages::open(config.clone(), cache_dir)?;
    let cache = Arc::clone(bulk.cache());
    let start = Instant::now();
    bulk.start_prefetch(Vec::new())?;
    while !cache.is_complete() {
        let seen = cache.generation();
        if cache.is_complete() {
            break;
        }
        cache.wait_change(seen, Duration::from_millis(20));
        if start.elapsed() > Duration::from_secs(600) {
            return Err("the bulk stream did not complete within 600 s".into());
        }
    }
    let present = start.elapsed();
    bulk.wait_prefetch();
    let flushed = start.elapsed();
    Ok((present, flushed, bulk.stats()))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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

    let raw_addr = SocketAddr::V4(SocketAddrV4::new(link.a, 7071));
    let raw_listener = spawn_in(&ns_a, move || TcpListener::bind(raw_addr))?
        .join()
        .map_err(|_| "listener thread panicked")???;
    let _in_b = enter(&ns_b)?;
    let raw_bytes = args.raw_mib << 20;

    // 1. First-touch faults through userfaultfd lazy memory, each one a
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

    // 2. Rounds of: raw TCP over the hop (one connection, then as many as
    //    the stream uses), then the whole image through the bulk path into
    //    a fresh node cache. Round 0 warms up and is not counted.
    let mut config = config;
    config.bulk_connections = args.bulk_connections.max(1);
    let cache_dir = dir.path().join("bulk-cache");
    let (mut stream_v, mut flushed_v, mut raw_v, mut raw_n_v) = (vec![], vec![], vec![], vec![]);
    let (mut bulk_requests, mut bulk_failures) = (0, 0);
    let mut warmup = (0.0, 0.0);
    for round in 0..=args.reps.max(1) {
        let raw = raw_tcp(&raw_listener, 1, raw_bytes)?;
        let raw_n = raw_tcp(&raw_listener, config.bulk_connections, raw_bytes)?;
        let (present, flushed, stats) = stream_once(&config, &cache_dir)?;
        bulk_requests += stats.bulk_requests;
        bulk_failures += stats.bulk_failures;
        if round == 0 {
            warmup = (
                gbps(image_bytes as u64, present),
                gbps(raw_bytes as u64, raw),
            );
        } else {
            raw_v.push(gbps(raw_bytes as u64, raw));
            raw_n_v.push(gbps(raw_bytes as u64, raw_n));
            stream_v.push(gbps(image_bytes as u64, present));
            flushed_v.push(gbps(image_bytes as u64, flushed));
        }
    }
    let server_stats = server.stats();
    server.shutdown();

    let rounded = |v: &[f64]| {
        v.iter()
            .map(|x| (x * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    };
    let (stream_all, raw_all) = (rounded(&stream_v), rounded(&raw_v));
    let stream_gbps = median(&mut stream_v);
    let raw_gbps = median(&mut raw_v);
    Ok(serde_json::json!({
        "remote_fault_us_p50": percentile(&lat, 0.5),
        "remote_fault_us_p99": percentile(&lat, 0.99),
        "faults_timed": lat.len(),
        "fault_errors": fault_stats.errors,
        "stream_gbps": stream_gbps,
        "stream_flushed_gbps": median(&mut flushed_v),
        "raw_tcp_gbps": raw_gbps,
        "raw_tcp_parallel_gbps": median(&mut raw_n_v),
        "stream_to_raw": stream_gbps / raw_gbps,
        "stream_gbps_all": stream_all,
        "raw_tcp_gbps_all": raw_all,
        "reps": stream_v.len(),
        "warmup_stream_gbps": warmup.0,
        "warmup_raw_tcp_gbps": warmup.1,
        "bulk_connections": config.bulk_connections,
        "image_bytes": image_bytes,
        "raw_bytes": raw_bytes,
        "bulk_requests": bulk_requests,
        "bulk_failures": bulk_failures,
        "server_pages_sent": server_stats.pages_sent,
        "units": "gbps = 1e9 bits/s, medians of the timed rounds (stream: until every page is present in the node cache; stream_flushed: until also synced to disk; raw_tcp_parallel: as many connections as the stream); latencies in microseconds, touch to return",
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
