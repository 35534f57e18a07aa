//! Live-image files on a real filesystem: writer → page store round trip,
//! sparse zero pages, and corrupt or mismatched images refused with errors
//! that name the problem (and nothing mapped from them).

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::{Rng, SeedableRng, rngs::StdRng};
use vmstream_vmm::image::{
    FORMAT_VERSION, ImageOpenError, LiveImage, PAGES_FILE, PageStore, PageStoreWriter, STATE_FILE,
    StateContents, StateFile,
};
use vmstream_vmm::memory::{GuestRam, PAGE_SIZE, map_copy_on_write};

const PAGES: usize = 256;

/// Page-aligned memory filled with a mix of zero, random and duplicate pages.
fn filled_ram(pages: usize, seed: u64) -> GuestRam {
    let ram = GuestRam::reserve(pages * PAGE_SIZE).unwrap();
    // SAFETY: the reservation is ours and readable/writable for its length.
    let mem = unsafe { std::slice::from_raw_parts_mut(ram.host_addr(), ram.len()) };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut dup = vec![0u8; PAGE_SIZE];
    rng.fill(&mut dup[..]);
    for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
        match i % 5 {
            0 | 3 => {} // zero page
            1 => rng.fill(page),
            2 => page.copy_from_slice(&dup),
            _ => page[PAGE_SIZE - 1] = 1, // only the last byte set
        }
    }
    ram
}

fn write_image(dir: &Path, ram: &GuestRam, payload: &[u8]) {
    let mut w = PageStoreWriter::prepare(dir, ram.len()).unwrap();
    // SAFETY: `ram` is readable for its whole length and nothing writes it.
    let summary = unsafe { w.write_from(ram.host_addr(), None, None) }.unwrap();
    assert_eq!(summary.pages, ram.pages() as u64);
    w.finish().unwrap();
    StateFile::write(
        dir,
        &StateContents {
            memory_size: ram.len() as u64,
            vcpu_count: 1,
            payload: payload.to_vec(),
        },
    )
    .unwrap();
}

fn ram_bytes(ram: &GuestRam) -> &[u8] {
    // SAFETY: the reservation is readable for its whole length.
    unsafe { std::slice::from_raw_parts(ram.host_addr(), ram.len()) }
}

#[test]
fn writer_round_trip_keeps_every_page_and_leaves_zero_pages_as_holes() {
    let dir = tempfile::tempdir().unwrap();
    let ram = filled_ram(PAGES, 1);
    write_image(dir.path(), &ram, b"payload");
    let image = LiveImage::open(dir.path()).unwrap();
    assert_eq!(image.state().payload, b"payload");
    let store = image.pages();
    let src = ram_bytes(&ram);
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut nonzero = 0;
    for p in 0..PAGES {
        let want = &src[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        let is_zero = want.iter().all(|&b| b == 0);
        assert_eq!(store.is_present(p), !is_zero, "page {p}");
        nonzero += usize::from(!is_zero);
        store.read_page(p, &mut buf).unwrap();
        assert_eq!(buf, want, "page {p} via pread");
        assert_eq!(
            &store.as_mapping().as_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            want,
            "page {p} via mapping"
        );
    }
    assert_eq!(store.nonzero_pages(), nonzero);
    // Zero pages are holes: the data file occupies about the non-zero pages.
    let data_blocks = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(dir.path().join(PAGES_FILE)).unwrap().blocks() * 512
    };
    assert!(
        data_blocks < (PAGES * PAGE_SIZE) as u64,
        "{data_blocks} bytes allocated for {nonzero} of {PAGES} non-zero pages"
    );
    assert!(store.disk_bytes() >= data_blocks);
}

#[test]
fn writer_refuses_wrong_call_order_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let ram = filled_ram(8, 2);
    let w = PageStoreWriter::prepare(dir.path(), ram.len()).unwrap();
    assert!(w.finish().is_err(), "finish before write_from");
    assert!(PageStoreWriter::prepare(dir.path(), 1000).is_err());
}

/// Expects `LiveImage::open` to fail with an error whose message contains
/// every one of `needles`, and checks that nothing of `dir` is mapped.
fn expect_refused(dir: &Path, needles: &[&str]) -> ImageOpenError {
    let err = LiveImage::open(dir).expect_err("corrupt image was accepted");
    let msg = err.to_string();
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    assert!(
        !maps.contains(dir.to_str().unwrap()),
        "something of the refused image {} is mapped",
        dir.display()
    );
    err
}

fn fresh_image() -> (tempfile::TempDir, GuestRam) {
    let dir = tempfile::tempdir().unwrap();
    let ram = filled_ram(64, 3);
    write_image(dir.path(), &ram, b"{\"vcpus\":[]}");
    (dir, ram)
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn corrupt_payload_byte_fails_the_crc() {
    let (dir, _) = fresh_image();
    let state = dir.path().join(STATE_FILE);
    let mut bytes = fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&state, &bytes).unwrap();
    let err = expect_refused(dir.path(), &["state.bin", "CRC32", "stored", "computed"]);
    assert!(matches!(err, ImageOpenError::CrcMismatch { .. }));
}

#[test]
fn wrong_crc_field_is_refused() {
    let (dir, _) = fresh_image();
    patch(&dir.path().join(STATE_FILE), 60, &[0xde, 0xad, 0xbe, 0xef]);
    let err = expect_refused(dir.path(), &["CRC32", "0xefbeadde"]);
    assert!(matches!(err, ImageOpenError::CrcMismatch { .. }));
}

#[test]
fn truncated_state_names_offset_and_length() {
    let (dir, _) = fresh_image();
    let state = dir.path().join(STATE_FILE);
    let len = fs::metadata(&state).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let err = expect_refused(dir.path(), &["truncated", "offset 64"]);
    assert!(matches!(err, ImageOpenError::Truncated { offset: 64, .. }));
    // A header cut short is truncated at offset 0.
    OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(20)
        .unwrap();
    let err = expect_refused(dir.path(), &["truncated", "64 bytes at offset 0"]);
    assert!(matches!(err, ImageOpenError::Truncated { offset: 0, .. }));
}

#[test]
fn wrong_magic_is_refused() {
    let (dir, _) = fresh_image();
    patch(&dir.path().join(STATE_FILE), 0, b"NOTANIMG");
    let err = expect_refused(dir.path(), &["bad magic", "NOTANIMG", "VMSTRIMG"]);
    assert!(matches!(err, ImageOpenError::BadMagic { .. }));
}

#[test]
fn newer_major_and_newer_minor_are_refused_naming_both_versions() {
    let (dir, _) = fresh_image();
    let state = dir.path().join(STATE_FILE);
    let ours = FORMAT_VERSION.to_string();
    // major 2
    patch(&state, 8, &2u16.to_le_bytes());
    let major2 = format!("2.{}.0", FORMAT_VERSION.minor);
    let err = expect_refused(dir.path(), &[&major2, &ours, "unsupported format version"]);
    assert!(matches!(err, ImageOpenError::UnsupportedVersion { .. }));
    // A newer minor.
    let newer = FORMAT_VERSION.minor + 1;
    patch(&state, 8, &1u16.to_le_bytes());
    patch(&state, 10, &newer.to_le_bytes());
    let err = expect_refused(dir.path(), &[&format!("1.{newer}.0"), &ours]);
    assert!(matches!(err, ImageOpenError::UnsupportedVersion { .. }));
    // Version checks come before the CRC (which also covers the version):
    // with the original version restored the image opens again.
    patch(&state, 10, &FORMAT_VERSION.minor.to_le_bytes());
    LiveImage::open(dir.path()).unwrap();
}

#[test]
fn images_of_an_older_minor_still_open() {
    // 1.0 images (before the optional virtio devices and capture time in
    // the payload) stay readable: same major, older minor.
    const { assert!(FORMAT_VERSION.minor >= 1) };
    let (dir, _) = fresh_image();
    let state = dir.path().join(STATE_FILE);
    patch(&state, 10, &0u16.to_le_bytes());
    let mut bytes = fs::read(&state).unwrap();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[..60]);
    crc.update(&bytes[64..]);
    bytes[60..64].copy_from_slice(&crc.finalize().to_le_bytes());
    fs::write(&state, &bytes).unwrap();
    LiveImage::open(dir.path()).unwrap();
}

#[test]
fn page_store_shorter_than_its_index_is_refused() {
    let (dir, ram) = fresh_image();
    let data = dir.path().join(PAGES_FILE);
    OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len((ram.len() - PAGE_SIZE) as u64)
        .unwrap();
    let err = expect_refused(dir.path(), &["memory.pages", &ram.len().to_string()]);
    assert!(matches!(err, ImageOpenError::PageStoreSizeMismatch { .. }));
    assert!(PageStore::open(dir.path()).is_err());
}

#[test]
fn corrupt_index_is_refused() {
    let (dir, _) = fresh_image();
    let idx = dir.path().join("pages.idx");
    let mut bytes = fs::read(&idx).unwrap();
    bytes[48] ^= 0x04; // a bit of the present-page bitmap
    fs::write(&idx, &bytes).unwrap();
    let err = expect_refused(dir.path(), &["pages.idx", "CRC32"]);
    assert!(matches!(err, ImageOpenError::CrcMismatch { .. }));
    // Index cut short.
    fs::write(&idx, &bytes[..40]).unwrap();
    let err = expect_refused(dir.path(), &["pages.idx", "truncated"]);
    assert!(matches!(err, ImageOpenError::Truncated { .. }));
}

#[test]
fn state_and_page_store_of_different_sizes_are_refused() {
    let (dir, ram) = fresh_image();
    StateFile::write(
        dir.path(),
        &StateContents {
            memory_size: (ram.len() * 2) as u64,
            vcpu_count: 1,
            payload: vec![],
        },
    )
    .unwrap();
    let err = expect_refused(dir.path(), &["inconsistent", &(ram.len() * 2).to_string()]);
    assert!(matches!(err, ImageOpenError::ImageInconsistent { .. }));
}

#[test]
fn image_does_not_fit_a_shell_of_another_size() {
    let (dir, ram) = fresh_image();
    let image = LiveImage::open(dir.path()).unwrap();
    image.check_fits(ram.len()).unwrap();
    let shell = GuestRam::reserve(ram.len() * 2).unwrap();
    let err = image.check_fits(shell.len()).unwrap_err();
    assert!(matches!(err, ImageOpenError::MemorySizeMismatch { .. }));
    assert!(err.to_string().contains(&shell.len().to_string()));
    // The copy-on-write mapping refuses too, leaving the shell untouched.
    let err = map_copy_on_write(&shell, image.pages()).unwrap_err();
    assert!(err.to_string().contains(&shell.len().to_string()));
}

#[test]
fn missing_files_are_named() {
    let (dir, _) = fresh_image();
    fs::remove_file(dir.path().join("pages.idx")).unwrap();
    let err = expect_refused(dir.path(), &["pages.idx", "missing"]);
    assert!(matches!(err, ImageOpenError::Missing { .. }));
    fs::remove_file(dir.path().join(STATE_FILE)).unwrap();
    let err = expect_refused(dir.path(), &["state.bin", "missing"]);
    assert!(matches!(err, ImageOpenError::Missing { .. }));
}
