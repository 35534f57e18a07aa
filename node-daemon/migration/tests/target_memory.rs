//! The target's guest memory on a real userfaultfd (no KVM): a page is
//! installed exactly once whichever path brings it, a fault on a source
//! page sends one request and waits for the page, a fault on an image page
//! is served from the image, and a page pushed while its fault is in flight
//! wakes the faulting thread with the pushed data.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use vmstream_migration::target_memory::TargetMemory;
use vmstream_migration::wire::{Command, read_frame};
use vmstream_test_support::{Need, require};
use vmstream_vmm::memory::{
    BufferSource, GuestRam, LazyMemory, LazyOptions, PAGE_SIZE, PageSource,
};

const PAGES: usize = 64;

fn image() -> Arc<dyn PageSource> {
    let mut bytes = vec![0u8; PAGES * PAGE_SIZE];
    for p in 0..PAGES {
        bytes[p * PAGE_SIZE] = 0x10 + p as u8;
    }
    Arc::new(BufferSource::new(bytes))
}

fn read_byte(ram: &GuestRam, page: usize) -> u8 {
    // SAFETY: inside guest RAM; a missing page waits for the handler.
    unsafe { ram.host_addr().add(page * PAGE_SIZE).read_volatile() }
}

fn words(pages: &[usize]) -> Vec<(usize, u64)> {
    let mut w = vec![0u64; PAGES.div_ceil(64)];
    for &p in pages {
        w[p / 64] |= 1 << (p % 64);
    }
    w.into_iter().enumerate().filter(|(_, x)| *x != 0).collect()
}

#[test]
fn pages_arrive_once_from_whichever_path_is_first() {
    if !require(
        "pages_arrive_once_from_whichever_path_is_first",
        &[Need::Userfaultfd],
    ) {
        return;
    }
    let ram = Arc::new(GuestRam::reserve(PAGES * PAGE_SIZE).unwrap());
    let lazy = LazyMemory::register(&ram, LazyOptions::default()).unwrap();
    let memory = Arc::new(TargetMemory::attach(&lazy, Some(image())).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut requests, _) = listener.accept().unwrap();
    requests
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    memory.set_fault_link(Some(writer));
    memory.set_running();
    // Pages 0..8 come from the source, the rest from the image.
    memory.mark_candidates(&words(&[0, 1, 2, 3, 4, 5, 6, 7]));
    memory.finish_candidates().unwrap();

    // An image page: served from the image, no request.
    assert_eq!(read_byte(&ram, 20), 0x10 + 20);

    // A source page: one request, the guest waits until the page arrives.
    let r = Arc::clone(&ram);
    let reader = std::thread::spawn(move || read_byte(&r, 3));
    let mut buf = Vec::new();
    let h = read_frame(&mut requests, &mut buf).unwrap();
    assert_eq!((h.command, h.first_page), (Command::FaultRequest, 3));
    std::thread::sleep(Duration::from_millis(20));
    assert!(!reader.is_finished(), "the reader must wait for the source");
    // The push gets there first; the fault answer that follows is dropped.
    let mut page = vec![0u8; PAGE_SIZE];
    page[0] = 0xa3;
    memory.install_pages(3, &page, false).unwrap();
    assert_eq!(reader.join().unwrap(), 0xa3);
    let mut other = vec![0u8; PAGE_SIZE];
    other[0] = 0xff;
    memory.install_pages(3, &other, false).unwrap();
    assert_eq!(
        read_byte(&ram, 3),
        0xa3,
        "a later copy must not replace the page"
    );

    // A second fault on an installed page sends nothing.
    assert_eq!(read_byte(&ram, 3), 0xa3);
    requests.set_nonblocking(true).unwrap();
    let mut probe = [0u8; 1];
    assert!(requests.read(&mut probe).is_err(), "no second request");

    // Clean announcement: installed from the image.
    memory.install_from_image(5, 1).unwrap();
    assert_eq!(read_byte(&ram, 5), 0x15);
    let stats = memory.stats();
    assert_eq!(stats.pages_requested, 1);
    assert_eq!(stats.duplicates, 1);
    assert_eq!(stats.pages_received, 1);
    assert!(stats.fault_wait_ns > 0);
    // Pages 0,1,2,4,6,7 were never sent: all of them requested-or-lost.
    let (requested, lost) = memory.missing_source_pages();
    assert_eq!((requested, lost), (0, 6));
    memory.shutdown();
    drop(lazy);
}
