//! A clone on node B of an image that lives on node A, through the node
//! daemon's real page service, across a real veth hop between network
//! namespaces, on the real /dev/kvm: node A's page server serves its local
//! image (pages and state file), node B fetches the state file, relays the
//! image through its node cache on loopback, and two KVM clones on B read
//! through `DirectPages` (as VM processes do): both answer requests with
//! the captured counter and read exactly the image's data; every non-zero
//! page crosses the hop once for the node (the second clone fetches
//! nothing new), and the background prefetch completes the cache, which is
//! then promoted to a complete local image identical to A's.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmstream_node::object_key::ObjectKey;
use vmstream_node::page_service::PageService;
use vmstream_pagestream::netns::{TestNetwork, enter};
use vmstream_pagestream::{ClusterToken, DirectPages, RemoteConfig};
use vmstream_test_support::{Need, require};
use vmstream_vmm::capture::capture;
use vmstream_vmm::devices::mailbox::{report, request};
use vmstream_vmm::guests::{FillSpec, GuestProgram, request_answer};
use vmstream_vmm::image::PageStore;
use vmstream_vmm::machine::{BootOptions, Machine, MachineConfig, VmShell};
use vmstream_vmm::memory::{LazyOptions, PAGE_SIZE, PageSource};
use vmstream_vmm::restore::{CloneMemory, CloneSource, restore};
use vmstream_vmm::vstate::vm::KvmHost;

const TOKEN: &[u8] = b"remote-clone-test-token-0123456789";
const TIMEOUT: Duration = Duration::from_secs(30);

fn guest_page(machine: &Machine, page: usize) -> Vec<u8> {
    let ram = machine.guest_ram();
    assert!((page + 1) * PAGE_SIZE <= ram.len());
    // SAFETY: in bounds of guest RAM, which lives as long as `machine`; a
    // read of a missing page is served by the clone's lazy memory.
    unsafe { std::slice::from_raw_parts(ram.host_addr().add(page * PAGE_SIZE), PAGE_SIZE) }.to_vec()
}

fn image_page(store: &PageStore, page: usize) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE_SIZE];
    if store.is_present(page) {
        store.read_page(page, &mut buf).unwrap();
    }
    buf
}

#[test]
fn a_clone_on_another_node_streams_the_image_through_the_node_cache() {
    if !require(
        "a_clone_on_another_node_streams_the_image_through_the_node_cache",
        &[Need::Kvm, Need::Userfaultfd, Need::NetworkNamespaces],
    ) {
        return;
    }
    let host = KvmHost::open().unwrap();
    let config = MachineConfig {
        vcpus: 1,
        memory_bytes: 16 << 20,
    };
    // Node A's image: a request guest with 40 % random data pages, which
    // answered 3 requests before the capture.
    let dir = tempfile::tempdir().unwrap();
    let (state_a, state_b) = (dir.path().join("a"), dir.path().join("b"));
    let image_dir = state_a.join("images/default/img");
    std::fs::create_dir_all(&image_dir).unwrap();
    let source = Machine::boot(
        VmShell::create(&host, config).unwrap(),
        GuestProgram::Request,
        &BootOptions {
            params: Vec::new(),
            fill: Some(FillSpec {
                zero_percent: 50,
                duplicate_percent: 10,
                templates: 4,
                seed: 7,
            }),
        },
    )
    .unwrap();
    source
        .mailbox()
        .wait_report(0, TIMEOUT, |r| r.kind == report::READY)
        .expect("source READY");
    for n in 0..3 {
        source
            .mailbox()
            .call(
                request::ANSWER,
                [n, 0, 0, 0, 0, 0, 0, 0],
                report::RESPONSE,
                TIMEOUT,
            )
            .unwrap();
    }
    capture(&source, &image_dir).unwrap();
    source.stop();
    let store = PageStore::open(&image_dir).unwrap();
    let nonzero = store.nonzero_pages() as u64;

    let mut net = TestNetwork::new();
    let (a, b) = (net.add_namespace().unwrap(), net.add_namespace().unwrap());
    let link = net.link(&a, &b).unwrap();
    let addr_a = SocketAddr::V4(SocketAddrV4::new(link.a, 7480));
    let node_a = {
        let _in_a = enter(&a).unwrap();
        let node_a =
            PageService::start(&state_a, TOKEN, Some(&addr_a.to_string()), "127.0.0.1:0").unwrap();
        node_a.serve_local_images(&[ObjectKey::live_image("default", "img")]);
        node_a
    };
    assert_eq!(node_a.public_addr(), Some(addr_a));

    let in_b = enter(&b).unwrap();
    let addr_b = SocketAddr::V4(SocketAddrV4::new(link.b, 7480));
    let node_b =
        PageService::start(&state_b, TOKEN, Some(&addr_b.to_string()), "127.0.0.1:0").unwrap();
    let relayed = node_b
        .relay_remote(
            &ObjectKey::live_image("default", "img"),
            &[addr_a.to_string()],
        )
        .unwrap();
    // The state file came from A, whole.
    assert_eq!(
        std::fs::read(relayed.state_dir.join("state.bin")).unwrap(),
        std::fs::read(image_dir.join("state.bin")).unwrap()
    );
    let token = ClusterToken::new(TOKEN.to_vec()).unwrap();
    for clone_no in 0..2 {
        let pages = Arc::new(
            DirectPages::open(RemoteConfig::new(
                &relayed.image_id,
                vec![relayed.relay],
                token.clone(),
            ))
            .unwrap(),
        );
        let clone_source = CloneSource::open_state(&relayed.state_dir, pages.as_ref()).unwrap();
        let clone = restore(
            VmShell::create(&host, config).unwrap(),
            &clone_source,
            &CloneMemory::LazyFrom {
                options: LazyOptions::default(),
                source: pages as Arc<dyn PageSource>,
            },
        )
        .unwrap();
        let answer = clone
            .machine
            .mailbox()
            .call(
                request::ANSWER,
                [41, 0, 0, 0, 0, 0, 0, 0],
                report::RESPONSE,
                TIMEOUT,
            )
            .expect("the remote clone answers");
        assert_eq!(answer.args[0], request_answer(41, 4), "clone {clone_no}");
        // Every page of the data area (never written by the request guest)
        // reads exactly as in A's image.
        for page in (2 << 20) / PAGE_SIZE..store.pages() {
            assert_eq!(
                guest_page(&clone.machine, page),
                image_page(&store, page),
                "clone {clone_no} page {page}"
            );
        }
        clone.machine.stop();
    }

    // The prefetch completes the cache and promotes it to a local image.
    let promoted = state_b.join("images/default/img");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !promoted.join("state.bin").is_file() {
        assert!(Instant::now() < deadline, "the cache was not promoted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let copy = PageStore::open(&promoted).unwrap();
    assert_eq!(copy.pages(), store.pages());
    for page in 0..store.pages() {
        assert_eq!(
            image_page(&copy, page),
            image_page(&store, page),
            "page {page}"
        );
    }
    // Each non-zero page crossed the hop exactly once for node B, whatever
    // the two clones, the faults and the prefetch did.
    let sent = node_a.public_stats().unwrap();
    assert_eq!(sent.pages_sent, nonzero, "{sent:?}");
    assert_eq!(sent.state_requests, 1);
    let (_, cache) = &node_b.cache_stats()[0];
    assert_eq!(cache.present_pages, nonzero);
    // A server stops by waking its acceptor through its own address: drop
    // each node's service inside its own namespace.
    drop(node_b);
    drop(in_b);
    let _in_a = enter(&a).unwrap();
    drop(node_a);
}
