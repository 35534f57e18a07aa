//! Page streaming between "nodes" in real network namespaces joined by veth
//! pairs, with the home node's page server running as a separate process
//! (`ip netns exec`) and the reader on another node: lazy userfaultfd memory
//! on node B reads exactly the image served from node A; a second reader on
//! B fetches nothing again; a holder killed mid-stream and restarted lets the
//! reader finish with correct data; another holder (a node with the image
//! cached) takes over when the home dies; the recorded working set is
//! prefetched first. Skips with a recorded reason without root or `ip`.

mod common;

use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};
use vmstream_pagestream::netns::{TestNetwork, enter, spawn_in};
use vmstream_pagestream::{NodeImageCache, RemoteConfig, RemotePages};
use vmstream_test_support::{Need, require};
use vmstream_vmm::memory::{GuestRam, LazyMemory, LazyOptions, PAGE_SIZE, PageSource};

const IMAGE: &str = "default/streamed";
const PORT: u16 = 7070;

fn config(holders: Vec<SocketAddr>) -> RemoteConfig {
    let mut c = RemoteConfig::new(IMAGE, holders, token());
    c.backoff_initial = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(200);
    c.request_timeout = Duration::from_secs(2);
    c
}

fn page_of(ram: &GuestRam, page: usize) -> &[u8] {
    // SAFETY: in bounds of the reservation; a read may fault and is served
    // by the lazy memory's handler.
    unsafe { std::slice::from_raw_parts(ram.host_addr().add(page * PAGE_SIZE), PAGE_SIZE) }
}

/// Reads every page of `source` through real userfaultfd lazy memory, in a
/// shuffled order from two threads, and checks it against `bytes`.
fn read_all_lazily(source: Arc<dyn PageSource>, bytes: &[u8], seed: u64) {
    let pages = bytes.len() / PAGE_SIZE;
    let ram = GuestRam::reserve(bytes.len()).unwrap();
    let lazy = LazyMemory::register(&ram, LazyOptions::default()).unwrap();
    lazy.attach(source).unwrap();
    let mut order: Vec<usize> = (0..pages).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    std::thread::scope(|s| {
        for half in order.chunks(pages.div_ceil(2)) {
            let ram = &ram;
            s.spawn(move || {
                for &p in half {
                    assert_eq!(
                        page_of(ram, p),
                        &bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                        "page {p}"
                    );
                }
            });
        }
    });
    // The handler marks a page populated just after the copy that woke the
    // reader: let it finish the last ones.
    for _ in 0..1000 {
        if lazy.is_complete() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = lazy.stats();
    assert_eq!(stats.errors, 0, "{:?}", lazy.last_error());
    assert_eq!(stats.populated_pages, pages as u64);
    lazy.shutdown();
}

fn nonzero_pages(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(PAGE_SIZE)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as u64
}

fn needs(test: &str) -> bool {
    require(test, &[Need::NetworkNamespaces, Need::Userfaultfd])
}

fn serve_image(ns: &str, addr: std::net::Ipv4Addr, dir: &Path, image_dir: &Path) -> ServerProcess {
    ServerProcess::start(
        Some(ns),
        SocketAddr::V4(SocketAddrV4::new(addr, PORT)),
        &write_token_file(dir),
        &[format!("--image={IMAGE}={}", image_dir.display())],
    )
}

#[test]
fn remote_lazy_memory_reads_the_image_and_a_second_reader_fetches_nothing() {
    if !needs("remote_lazy_memory_reads_the_image_and_a_second_reader_fetches_nothing") {
        return;
    }
    let mut net = TestNetwork::new();
    let (a, b) = (net.add_namespace().unwrap(), net.add_namespace().unwrap());
    let link = net.link(&a, &b).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bytes = image_bytes(3000, 21);
    write_store(&dir.path().join("image"), &bytes);
    let mut server = serve_image(&a, link.a, dir.path(), &dir.path().join("image"));

    let _in_b = enter(&b).unwrap();
    let cache_dir = dir.path().join("node-b-cache");
    let first = Arc::new(RemotePages::open(config(vec![server.addr]), &cache_dir).unwrap());
    read_all_lazily(first.clone(), &bytes, 1);
    let after_first = server.stats();
    // Every non-zero page crossed the hop exactly once; zero pages never.
    assert_eq!(after_first.pages_sent, nonzero_pages(&bytes));
    assert_eq!(after_first.bulk_page_requests, 0);
    assert!(after_first.fault_page_requests > 0);
    let cache = Arc::clone(first.cache());
    assert!(cache.is_complete());
    assert_eq!(cache.stats().fault_pages_fetched, nonzero_pages(&bytes));

    // A second clone on node B, sharing the node cache: no page request.
    let second = Arc::new(RemotePages::with_cache(
        config(vec![server.addr]),
        Arc::clone(&cache),
    ));
    read_all_lazily(second.clone(), &bytes, 2);
    let after_second = server.stats();
    assert_eq!(after_second.page_requests, after_first.page_requests);
    assert_eq!(after_second.pages_sent, after_first.pages_sent);
    assert_eq!(
        second.stats().connects,
        0,
        "the second reader never connected"
    );

    // After the daemon restarts (cache reopened from disk): still nothing.
    drop((first, second, cache));
    let third = Arc::new(RemotePages::open(config(vec![server.addr]), &cache_dir).unwrap());
    read_all_lazily(third, &bytes, 3);
    let after_third = server.stats();
    assert_eq!(after_third.pages_sent, after_first.pages_sent);
    assert_eq!(after_third.index_requests, after_first.index_requests);
}

#[test]
fn a_holder_killed_mid_stream_and_restarted_lets_the_reader_finish_correctly() {
    if !needs("a_holder_killed_mid_stream_and_restarted_lets_the_reader_finish_correctly") {
        return;
    }
    let mut net = TestNetwork::new();
    let (a, b) = (net.add_namespace().unwrap(), net.add_namespace().unwrap());
    let link = net.link(&a, &b).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pages = 6000;
    let bytes = Arc::new(image_bytes(pages, 22));
    let image_dir = dir.path().join("image");
    write_store(&image_dir, &bytes);
    let server = serve_image(&a, link.a, dir.path(), &image_dir);
    let addr = server.addr;

    let _in_b = enter(&b).unwrap();
    let remote =
        Arc::new(RemotePages::open(config(vec![addr]), &dir.path().join("cache")).unwrap());
    let cache = Arc::clone(remote.cache());
    let reader = {
        let (remote, bytes) = (Arc::clone(&remote), Arc::clone(&bytes));
        std::thread::spawn(move || read_all_lazily(remote, &bytes, 4))
    };
    // Kill the home node's server once the reader is well under way.
    while cache.stats().present_pages < cache.nonzero_count() as u64 / 4 {
        assert!(!reader.is_finished(), "the reader finished before the kill");
        std::thread::sleep(Duration::from_millis(1));
    }
    server.kill();
    let at_kill = cache.stats().present_pages;
    // With the server gone the reader waits (and retries); the background
    // prefetch started now retries too.
    assert!(remote.start_prefetch(Vec::new()).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !reader.is_finished(),
        "the reader cannot finish without a holder"
    );
    assert!(cache.stats().present_pages < cache.nonzero_count() as u64);
    assert!(at_kill < cache.nonzero_count() as u64);
    let mut restarted = serve_image(&a, link.a, dir.path(), &image_dir);
    reader
        .join()
        .expect("the reader read correct data after the restart");
    remote.wait_prefetch();
    assert!(cache.is_complete());
    let stats = remote.stats();
    assert!(stats.fault_failures + stats.bulk_failures >= 1, "{stats:?}");
    assert!(restarted.stats().pages_sent > 0);
    // And the cache holds exactly the image.
    let mut buf = vec![0u8; pages * PAGE_SIZE];
    remote.read_pages(0, pages, &mut buf).unwrap();
    assert!(buf == *bytes);
}

#[test]
fn another_holder_serves_when_the_home_node_dies() {
    if !needs("another_holder_serves_when_the_home_node_dies") {
        return;
    }
    let mut net = TestNetwork::new();
    let (a, b, c) = (
        net.add_namespace().unwrap(),
        net.add_namespace().unwrap(),
        net.add_namespace().unwrap(),
    );
    let ab = net.link(&a, &b).unwrap();
    let ac = net.link(&a, &c).unwrap();
    let cb = net.link(&c, &b).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pages = 2048;
    let bytes = image_bytes(pages, 23);
    let image_dir = dir.path().join("image");
    write_store(&image_dir, &bytes);
    let home = serve_image(&a, ab.a, dir.path(), &image_dir);
    // The home server listens on A's B-side address; node C reaches A
    // through its own link, so start a second listener there.
    let home_for_c = serve_image(&a, ac.a, dir.path(), &image_dir);

    // Node C caches the whole image with a bulk prefetch (in C's namespace).
    let c_cache = dir.path().join("node-c-cache");
    let holder = SocketAddr::V4(SocketAddrV4::new(ac.a, PORT));
    let c_dir = c_cache.clone();
    spawn_in(&c, move || {
        let r = RemotePages::open(config(vec![holder]), &c_dir).unwrap();
        assert!(r.start_prefetch(Vec::new()).unwrap());
        r.wait_prefetch();
        assert!(r.cache().is_complete());
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap();
    drop(home_for_c);
    let mut c_server = ServerProcess::start(
        Some(&c),
        SocketAddr::V4(SocketAddrV4::new(cb.a, PORT)),
        &write_token_file(dir.path()),
        &[format!("--cache={}", c_cache.display())],
    );

    let _in_b = enter(&b).unwrap();
    let remote = RemotePages::open(
        config(vec![home.addr, c_server.addr]),
        &dir.path().join("b"),
    )
    .unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in 0..pages / 2 {
        remote.read_pages(p, 1, &mut buf).unwrap();
        assert_eq!(buf, bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]);
    }
    assert_eq!(
        c_server.stats().pages_sent,
        0,
        "the home served while alive"
    );
    home.kill();
    for p in pages / 2..pages {
        remote.read_pages(p, 1, &mut buf).unwrap();
        assert_eq!(buf, bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "page {p}");
    }
    let served_by_c = c_server.stats().pages_sent;
    assert!(served_by_c > 0 && served_by_c <= nonzero_pages(&bytes) / 2 + 1);
}

#[test]
fn the_working_set_of_the_first_clone_is_prefetched_first_for_later_ones() {
    if !needs("the_working_set_of_the_first_clone_is_prefetched_first_for_later_ones") {
        return;
    }
    let mut net = TestNetwork::new();
    let (a, b) = (net.add_namespace().unwrap(), net.add_namespace().unwrap());
    let link = net.link(&a, &b).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pages = 4096;
    let bytes = image_bytes(pages, 24);
    write_store(&dir.path().join("image"), &bytes);
    let server = serve_image(&a, link.a, dir.path(), &dir.path().join("image"));
    let _in_b = enter(&b).unwrap();

    // The first clone touches a scattered working set.
    let mut touched: Vec<usize> = (0..pages).filter(|p| p % 7 == 3 || p % 11 == 5).collect();
    touched.shuffle(&mut StdRng::seed_from_u64(5));
    touched.truncate(400);
    let first_dir = dir.path().join("first");
    {
        let first = RemotePages::open(config(vec![server.addr]), &first_dir).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        for &p in &touched {
            first.read_pages(p, 1, &mut buf).unwrap();
        }
    }
    let recorded = vmstream_pagestream::cache::read_working_set(&first_dir).unwrap();
    let expected: Vec<u64> = touched
        .iter()
        .filter(|&&p| {
            bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                .iter()
                .any(|&b| b != 0)
        })
        .map(|&p| p as u64)
        .collect();
    assert_eq!(recorded, expected, "working set in first-touch order");

    // A later clone with an empty cache prefetches the working set first.
    let later = RemotePages::open(config(vec![server.addr]), &dir.path().join("later")).unwrap();
    assert!(later.start_prefetch(recorded.clone()).unwrap());
    later.wait_prefetch();
    assert!(later.cache().is_complete());
    let ranges = later.bulk_ranges();
    let ws: std::collections::HashSet<usize> = recorded.iter().map(|&p| p as usize).collect();
    let mut covered = 0;
    for &(s, e) in &ranges {
        if covered == ws.len() {
            break;
        }
        for p in s..e {
            assert!(
                ws.contains(&p),
                "page {p} fetched before the working set was complete"
            );
        }
        covered += e - s;
    }
    assert_eq!(covered, ws.len());
    let opened = NodeImageCache::open_existing(&dir.path().join("later"))
        .unwrap()
        .unwrap();
    drop(later);
    assert!(opened.is_complete());
}
