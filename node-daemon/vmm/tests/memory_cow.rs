//! Copy-on-write backing on real files: the page store mapped `MAP_PRIVATE`
//! over guest RAM reads as the image, writes stay private to each mapping,
//! and the image file never changes.

use std::fs;
use std::path::Path;

use vmstream_vmm::image::{PAGES_FILE, PageStore, PageStoreWriter};
use vmstream_vmm::memory::{GuestRam, PAGE_SIZE, map_copy_on_write, range_footprint};

fn make_store(dir: &Path, pages: usize) -> Vec<u8> {
    let ram = GuestRam::reserve(pages * PAGE_SIZE).unwrap();
    // SAFETY: fresh writable reservation of that length.
    let mem = unsafe { std::slice::from_raw_parts_mut(ram.host_addr(), ram.len()) };
    for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
        if i % 4 != 0 {
            page.fill((i % 251) as u8 + 1);
        }
    }
    let copy = mem.to_vec();
    let mut w = PageStoreWriter::prepare(dir, ram.len()).unwrap();
    // SAFETY: readable for its length, not written concurrently.
    unsafe { w.write_from(ram.host_addr(), None, None) }.unwrap();
    w.finish().unwrap();
    copy
}

fn bytes(ram: &GuestRam) -> &[u8] {
    // SAFETY: the whole reservation is mapped readable.
    unsafe { std::slice::from_raw_parts(ram.host_addr(), ram.len()) }
}

#[test]
fn writes_stay_private_and_the_file_never_changes() {
    let pages = 512;
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path(), pages);
    let file_before = fs::read(dir.path().join(PAGES_FILE)).unwrap();
    let store = PageStore::open(dir.path()).unwrap();

    let a = GuestRam::reserve(pages * PAGE_SIZE).unwrap();
    let b = GuestRam::reserve(pages * PAGE_SIZE).unwrap();
    let a_addr = a.host_addr();
    map_copy_on_write(&a, &store).unwrap();
    map_copy_on_write(&b, &store).unwrap();
    assert_eq!(
        a.host_addr(),
        a_addr,
        "the mapping stays at the same address"
    );
    assert_eq!(bytes(&a), &image[..]);
    assert_eq!(bytes(&b), &image[..]);

    // Each clone writes different pages (including formerly zero pages).
    for p in (0..pages).step_by(3) {
        // SAFETY: in bounds; the private mapping is writable.
        unsafe { a.host_addr().add(p * PAGE_SIZE + 1).write_volatile(0xaa) };
    }
    for p in (0..pages).step_by(5) {
        // SAFETY: as above.
        unsafe { b.host_addr().add(p * PAGE_SIZE + 2).write_volatile(0xbb) };
    }
    for p in 0..pages {
        let base = &image[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        let mut want_a = base.to_vec();
        if p % 3 == 0 {
            want_a[1] = 0xaa;
        }
        let mut want_b = base.to_vec();
        if p % 5 == 0 {
            want_b[2] = 0xbb;
        }
        assert_eq!(
            &bytes(&a)[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            &want_a[..],
            "clone a page {p}"
        );
        assert_eq!(
            &bytes(&b)[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            &want_b[..],
            "clone b page {p}"
        );
    }
    // The page store's own mapping and the file are unchanged.
    assert_eq!(store.as_mapping().as_slice(), &image[..]);
    drop((a, b));
    assert_eq!(fs::read(dir.path().join(PAGES_FILE)).unwrap(), file_before);

    // A third clone still sees the pristine image.
    let c = GuestRam::reserve(pages * PAGE_SIZE).unwrap();
    map_copy_on_write(&c, &store).unwrap();
    assert_eq!(bytes(&c), &image[..]);
}

#[test]
fn footprint_separates_shared_image_pages_from_private_writes() {
    let pages = 256;
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path(), pages);
    let store = PageStore::open(dir.path()).unwrap();
    let ram = GuestRam::reserve(pages * PAGE_SIZE).unwrap();
    map_copy_on_write(&ram, &store).unwrap();
    // Read everything (maps page-cache pages), then write 10 pages.
    let sum: u64 = bytes(&ram).iter().map(|&b| b as u64).sum();
    assert!(sum > 0);
    for p in 0..10 {
        // SAFETY: in bounds; private mapping.
        unsafe { ram.host_addr().add(p * PAGE_SIZE).write_volatile(1) };
    }
    let f = range_footprint(None, ram.host_addr() as usize, ram.len()).unwrap();
    assert_eq!(f.size, ram.len() as u64);
    assert_eq!(f.anonymous, 10 * PAGE_SIZE as u64, "{f:?}");
    assert!(f.resident >= f.anonymous, "{f:?}");
}
