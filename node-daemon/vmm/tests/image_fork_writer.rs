//! The page-store writer inside a forked child of a multithreaded process,
//! as the capture path runs it: busy threads hold the allocator and locks
//! while the parent forks; the child writes the page store with raw
//! syscalls only. Covered for plain memory and for a lazily streamed clone
//! (never-touched pages come from the base image, not from the child's
//! unregistered — and therefore zero — mapping).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vmstream_vmm::image::{Bitmap, PageStore, PageStoreWriter, WriteError};
use vmstream_vmm::memory::{GuestRam, LazyMemory, LazyOptions, PAGE_SIZE, userfaultfd_available};

/// Threads that allocate and lock continuously until dropped.
struct BusyThreads {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl BusyThreads {
    fn start(n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let lock = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let handles = (0..n)
            .map(|i| {
                let stop = stop.clone();
                let lock = lock.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let s = format!("thread {i} allocates {}", vec![i; 100].len());
                        let mut g = lock.lock().unwrap();
                        g.push(s);
                        if g.len() > 100 {
                            g.clear();
                        }
                    }
                })
            })
            .collect();
        Self { stop, handles }
    }
}

impl Drop for BusyThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Forks; the child runs the writer and reports through a pipe, then
/// `_exit`s. Returns the child's result.
fn write_in_child(
    writer: PageStoreWriter,
    mem: *const u8,
    base: Option<&PageStore>,
    populated: Option<&Bitmap>,
) -> Result<(), WriteError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors owned here.
    let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only calls async-signal-safe code: the writer's raw
    // syscalls on preallocated memory, write(2) and _exit(2).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let mut writer = writer;
        // SAFETY: `mem` is the parent's guest RAM, copied into the child by fork.
        let result =
            unsafe { writer.write_from(mem, base, populated) }.and_then(|_| writer.finish());
        let msg = match result {
            Ok(()) => [0u8; 20],
            Err(e) => e.to_bytes(),
        };
        // SAFETY: writes 20 bytes from a stack array, then exits without
        // running any parent-process destructors.
        unsafe {
            libc::write(tx.as_raw_fd(), msg.as_ptr().cast(), msg.len());
            libc::_exit(0);
        }
    }
    drop(writer);
    drop(tx);
    let mut msg = [0u8; 20];
    // SAFETY: reads up to 20 bytes into a stack array.
    let n = unsafe { libc::read(rx.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child died: {status:#x}"
    );
    assert_eq!(n, 20, "child did not report");
    if msg == [0; 20] {
        Ok(())
    } else {
        Err(WriteError::from_bytes(&msg).expect("child sent a valid error"))
    }
}

fn pattern(pages: usize, salt: u8) -> Vec<u8> {
    let mut v = vec![0u8; pages * PAGE_SIZE];
    for (i, page) in v.chunks_exact_mut(PAGE_SIZE).enumerate() {
        if i % 3 != 0 {
            for (j, b) in page.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31) ^ (j as u8) ^ salt;
            }
            page[0] = page[0].max(1);
        }
    }
    v
}

fn assert_store_equals(dir: &Path, want: &[u8]) {
    let store = PageStore::open(dir).unwrap();
    assert_eq!(store.as_mapping().as_slice(), want);
    for p in 0..want.len() / PAGE_SIZE {
        let zero = want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
            .iter()
            .all(|&b| b == 0);
        assert_eq!(store.is_present(p), !zero, "page {p}");
    }
}

#[test]
fn writer_runs_in_a_forked_child_of_a_multithreaded_process() {
    let pages = 2048;
    let want = pattern(pages, 1);
    let ram = GuestRam::reserve(pages * PAGE_SIZE).unwrap();
    // SAFETY: fresh writable reservation of that length.
    unsafe { std::ptr::copy_nonoverlapping(want.as_ptr(), ram.host_addr(), want.len()) };
    let dir = tempfile::tempdir().unwrap();
    let busy = BusyThreads::start(3);
    let writer = PageStoreWriter::prepare(dir.path(), ram.len()).unwrap();
    write_in_child(writer, ram.host_addr(), None, None).unwrap();
    drop(busy);
    assert_store_equals(dir.path(), &want);
}

#[test]
fn lazily_streamed_clone_is_recaptured_from_a_fork_with_base_pages() {
    if let Err(reason) = userfaultfd_available() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let pages = 1024;
    // Base image.
    let base_bytes = pattern(pages, 2);
    let base_dir = tempfile::tempdir().unwrap();
    {
        let ram = GuestRam::reserve(pages * PAGE_SIZE).unwrap();
        // SAFETY: fresh writable reservation of that length.
        unsafe {
            std::ptr::copy_nonoverlapping(base_bytes.as_ptr(), ram.host_addr(), base_bytes.len())
        };
        let mut w = PageStoreWriter::prepare(base_dir.path(), ram.len()).unwrap();
        // SAFETY: readable, not written concurrently.
        unsafe { w.write_from(ram.host_addr(), None, None) }.unwrap();
        w.finish().unwrap();
    }
    let base = Arc::new(PageStore::open(base_dir.path()).unwrap());

    // A lazy clone touches half of its pages (zero and non-zero ones) and
    // writes some of them: a byte here and there, a non-zero page zeroed,
    // and a first-touch write into a page that is zero in the base.
    let ram = GuestRam::reserve(pages * PAGE_SIZE).unwrap();
    let lazy = LazyMemory::register(&ram, LazyOptions::default()).unwrap();
    lazy.attach(base.clone()).unwrap();
    let mut want = base_bytes.clone();
    for p in (0..pages).step_by(2) {
        // SAFETY: in bounds; first touch is served by the handler.
        let v = unsafe { ram.host_addr().add(p * PAGE_SIZE).read_volatile() };
        assert_eq!(v, base_bytes[p * PAGE_SIZE]);
    }
    for p in (0..pages).step_by(8) {
        let off = p * PAGE_SIZE + 100;
        // SAFETY: in bounds; the page is populated.
        unsafe { ram.host_addr().add(off).write_volatile(0xcd) };
        want[off] = 0xcd;
    }
    let zeroed = 2; // touched, non-zero in the base
    assert!(base.is_present(zeroed));
    // SAFETY: in bounds; populated.
    unsafe { std::ptr::write_bytes(ram.host_addr().add(zeroed * PAGE_SIZE), 0, PAGE_SIZE) };
    want[zeroed * PAGE_SIZE..(zeroed + 1) * PAGE_SIZE].fill(0);
    let written_zero_page = 3; // untouched so far, zero in the base
    assert!(!base.is_present(written_zero_page));
    // SAFETY: in bounds; the write's fault is served by the handler.
    unsafe {
        ram.host_addr()
            .add(written_zero_page * PAGE_SIZE + 5)
            .write_volatile(0x11)
    };
    want[written_zero_page * PAGE_SIZE + 5] = 0x11;
    let untouched = 1021; // odd, non-zero in the base
    assert!(base.is_present(untouched));
    assert!(!lazy.populated().get(untouched));

    let busy = BusyThreads::start(2);
    let clone_dir = tempfile::tempdir().unwrap();
    let writer = PageStoreWriter::prepare(clone_dir.path(), ram.len()).unwrap();
    let guard = lazy.quiesce();
    let result = write_in_child(writer, ram.host_addr(), Some(&base), Some(lazy.populated()));
    drop(guard);
    drop(busy);
    result.unwrap();
    // Never-touched pages were not populated in the parent either.
    assert!(!lazy.populated().get(untouched));
    assert_store_equals(clone_dir.path(), &want);
    drop(lazy);

    // Without a base, a populated bitmap is refused.
    let ram2 = GuestRam::reserve(PAGE_SIZE).unwrap();
    let mut w = PageStoreWriter::prepare(clone_dir.path(), PAGE_SIZE).unwrap();
    let bits = Bitmap::new(1);
    // SAFETY: readable one-page reservation.
    let err = unsafe { w.write_from(ram2.host_addr(), None, Some(&bits)) }.unwrap_err();
    assert_eq!(err, WriteError::PopulatedWithoutBase);
}
