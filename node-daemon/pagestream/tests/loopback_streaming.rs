//! Streaming on loopback (no namespaces needed, so it runs everywhere): the
//! bulk prefetcher fills the node cache with exactly the image, faults
//! racing it are served correctly, and concurrent readers of one page
//! coalesce into one network request.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use vmstream_pagestream::{PageServer, RemoteConfig, RemotePages, ServerOptions};
use vmstream_vmm::memory::{PAGE_SIZE, PageSource};

const IMAGE: &str = "default/loop";

fn setup(pages: usize) -> (tempfile::TempDir, PageServer, Vec<u8>) {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let bytes = image_bytes(pages, 31);
    let store = write_store(&dir.path().join("img"), &bytes);
    let server = PageServer::bind("127.0.0.1:0", token(), ServerOptions::default()).unwrap();
    server.add_image(IMAGE, Arc::new(store));
    (dir, server, bytes)
}

fn config(server: &PageServer) -> RemoteConfig {
    let mut c = RemoteConfig::new(IMAGE, vec![server.local_addr()], token());
    c.retry_budget = Duration::from_secs(10);
    c
}

#[test]
fn bulk_prefetch_fills_the_cache_with_exactly_the_image_while_faults_race_it() {
    let pages = 6_000;
    let (dir, server, bytes) = setup(pages);
    let remote = Arc::new(RemotePages::open(config(&server), &dir.path().join("cache")).unwrap());
    assert!(remote.start_prefetch(Vec::new()).unwrap());
    assert!(
        !remote.start_prefetch(Vec::new()).unwrap(),
        "one prefetch per node cache"
    );
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in (0..pages).rev().step_by(97) {
        remote.read_pages(p, 1, &mut buf).unwrap();
        assert_eq!(buf, bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "page {p}");
    }
    remote.wait_prefetch();
    assert!(remote.cache().is_complete());
    let mut all = vec![0u8; pages * PAGE_SIZE];
    remote.read_pages(0, pages, &mut all).unwrap();
    assert!(all == bytes);
    // No page crossed twice.
    let nonzero = remote.cache().nonzero_count() as u64;
    assert_eq!(server.stats().pages_sent, nonzero);
    let cs = remote.cache().stats();
    assert_eq!(cs.fault_pages_fetched + cs.bulk_pages_fetched, nonzero);
}

#[test]
fn concurrent_readers_of_one_page_make_one_request() {
    let (dir, server, bytes) = setup(64);
    let remote = Arc::new(RemotePages::open(config(&server), &dir.path().join("cache")).unwrap());
    let cache = Arc::clone(remote.cache());
    let readers: Vec<_> = (0..8)
        .map(|i| {
            // Each reader has its own source (own fault connection) over
            // the shared node cache, like clones on one node.
            let r = RemotePages::with_cache(config(&server), Arc::clone(&cache));
            let expected = bytes[PAGE_SIZE..2 * PAGE_SIZE].to_vec();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; PAGE_SIZE];
                r.read_pages(1, 1, &mut buf).unwrap();
                assert_eq!(buf, expected, "reader {i}");
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let s = server.stats();
    assert_eq!(s.pages_sent, 1);
    assert_eq!(s.fault_page_requests, 1);
}
