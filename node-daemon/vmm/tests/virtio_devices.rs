//! Well-behaved drivers against the virtio-mmio devices: feature
//! negotiation, queue rounds for rng, blk and net, used-ring wrap-around,
//! the block device's copy-on-write overlay (the image file never changes)
//! and save/restore of the transport state.

mod virtio_common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use virtio_common::*;
use vmstream_test_support::Need;
use vmstream_vmm::devices::virtio::blk::Block;
use vmstream_vmm::devices::virtio::net::Net;
use vmstream_vmm::devices::virtio::rng::Rng;
use vmstream_vmm::devices::virtio::tap::Tap;
use vmstream_vmm::devices::virtio::{
    InterruptLine, IrqfdLine, MmioTransport, VirtioInterrupt, VirtioMmio,
};

fn rng_device(g: &TestGuest) -> VirtioMmio<Rng> {
    let line: Arc<dyn InterruptLine> = g.interrupts.clone();
    VirtioMmio::new(Rng::new("test"), g.mem.clone(), line)
}

#[test]
fn rng_identifies_itself_and_negotiates_version_1() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    assert_eq!(read_reg(&mut dev, MAGIC), 0x7472_6976);
    assert_eq!(read_reg(&mut dev, VERSION), 2);
    assert_eq!(read_reg(&mut dev, DEVICE_ID), 4);
    assert_eq!(device_features(&mut dev), F_VERSION_1);
    let accepted = negotiate(&mut dev, u64::MAX);
    assert_eq!(accepted, F_VERSION_1);
    assert_eq!(dev.acked_features(), F_VERSION_1);
    write_reg(&mut dev, QUEUE_SEL, 0);
    assert_eq!(read_reg(&mut dev, QUEUE_NUM_MAX), 64);
    write_reg(&mut dev, QUEUE_SEL, 1);
    assert_eq!(read_reg(&mut dev, QUEUE_NUM_MAX), 0, "only one queue");
    setup_queue(&mut dev, 0, 16);
    driver_ok(&mut dev);
    assert_eq!(
        read_reg(&mut dev, STATUS),
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
    );
    assert!(dev.last_fault().is_none(), "{:?}", dev.last_fault());
    // Reset clears everything the driver set.
    write_reg(&mut dev, STATUS, 0);
    assert_eq!(read_reg(&mut dev, STATUS), 0);
    assert_eq!(dev.acked_features(), 0);
    assert!(!dev.queue_ready(0));
}

#[test]
fn rng_fills_the_buffers_of_one_queue_round() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    let q = &mut qs[0];
    let heads: Vec<u16> = (0..3)
        .map(|i| q.add(&g, &[writable(DATA_BASE + i * 0x1000, 64 + 100 * i as u32)]))
        .collect();
    q.notify(&mut dev);
    let used = q.take_used(&g);
    assert_eq!(
        used,
        heads
            .iter()
            .enumerate()
            .map(|(i, &h)| (u32::from(h), 64 + 100 * i as u32))
            .collect::<Vec<_>>()
    );
    for i in 0..3u64 {
        let bytes = g.read(DATA_BASE + i * 0x1000, 64 + 100 * i as usize);
        assert!(bytes.iter().any(|&b| b != 0), "buffer {i} was not filled");
    }
    assert_eq!(g.interrupts.take(), vec![VirtioInterrupt::Queue(0)]);
    assert_eq!(ack_interrupt(&mut dev), 1);
    assert_eq!(read_reg(&mut dev, INTERRUPT_STATUS), 0);
    assert_eq!(dev.device().bytes_served(), 64 + 164 + 264);
}

#[test]
fn used_buffers_raise_the_irqfd() {
    let g = TestGuest::new(16);
    let irqfd = Arc::new(IrqfdLine::new().unwrap());
    let line: Arc<dyn InterruptLine> = irqfd.clone();
    let mut dev = VirtioMmio::new(Rng::new("irqfd"), g.mem.clone(), line);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    qs[0].add(&g, &[writable(DATA_BASE, 8)]);
    qs[0].add(&g, &[writable(DATA_BASE + 8, 8)]);
    qs[0].notify(&mut dev);
    // One interrupt for the notification that completed two chains.
    assert_eq!(irqfd.eventfd().read().unwrap(), 1);
    assert_eq!(ack_interrupt(&mut dev), 1);
}

#[test]
fn used_ring_wraps_after_more_than_queue_size_requests() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[8]);
    let q = &mut qs[0];
    let mut served = 0u32;
    // 8-entry queue, 900 requests in batches of 1..=8: the rings wrap more
    // than a hundred times.
    for round in 0..200u32 {
        let batch = round % 8 + 1;
        let mut heads = Vec::new();
        for k in 0..batch {
            let len = 1 + (served + k) % 32;
            heads.push((
                q.add(&g, &[writable(DATA_BASE + u64::from(k) * 64, len)]),
                len,
            ));
        }
        q.notify(&mut dev);
        let used = q.take_used(&g);
        assert_eq!(
            used,
            heads
                .iter()
                .map(|&(h, len)| (u32::from(h), len))
                .collect::<Vec<_>>(),
            "round {round}"
        );
        served += batch;
    }
    assert_eq!(served, 900);
    assert_eq!(q.used_idx(&g), 900);
    assert!(dev.last_fault().is_none(), "{:?}", dev.last_fault());
}

#[test]
fn rng_state_survives_save_and_restore() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[4]);
    let q = &mut qs[0];
    for _ in 0..6 {
        q.add(&g, &[writable(DATA_BASE, 16)]);
        q.notify(&mut dev);
    }
    let state = dev.save();
    let json = serde_json::to_string(&state).unwrap();
    let back: vmstream_vmm::devices::virtio::VirtioMmioState<
        vmstream_vmm::devices::virtio::rng::RngState,
    > = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    assert_eq!(back.transport.queues[0].next_used, 6);
    drop(dev);
    let line: Arc<dyn InterruptLine> = g.interrupts.clone();
    let mut restored = VirtioMmio::restore(
        Rng::restore("test", &back.device),
        g.mem.clone(),
        line,
        &back.transport,
    )
    .unwrap();
    assert_eq!(restored.device().bytes_served(), 96);
    assert_eq!(read_reg(&mut restored, STATUS) & S_DRIVER_OK, S_DRIVER_OK);
    // The driver goes on where it was: index 6 of a 4-entry ring.
    q.take_used(&g);
    let head = q.add(&g, &[writable(DATA_BASE, 16)]);
    q.notify(&mut restored);
    assert_eq!(q.take_used(&g), vec![(u32::from(head), 16)]);
    assert_eq!(q.used_idx(&g), 7);
    let _: &mut dyn MmioTransport = &mut restored;
}

// ---- virtio-blk -----------------------------------------------------------

const IMAGE_SECTORS: u64 = 2048;

/// A 1 MiB raw image whose every byte depends on its offset.
fn make_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..IMAGE_SECTORS as usize * 512)
        .map(|i| (i / 512 * 31 + i % 251) as u8)
        .collect();
    let path = dir.join("disk.raw");
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

fn sha256(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

fn blk_device(g: &TestGuest, block: Block) -> VirtioMmio<Block> {
    let line: Arc<dyn InterruptLine> = g.interrupts.clone();
    VirtioMmio::new(block, g.mem.clone(), line)
}

#[test]
fn blk_offers_its_features_and_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_image(dir.path());
    let g = TestGuest::new(16);
    let mut dev = blk_device(
        &g,
        Block::open("rootfs", &img, Some(&dir.path().join("ov"))).unwrap(),
    );
    assert_eq!(read_reg(&mut dev, DEVICE_ID), 2);
    assert_eq!(device_features(&mut dev), F_VERSION_1 | (1 << 9) | (1 << 2));
    let mut cap = [0u8; 8];
    dev.read(CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), IMAGE_SECTORS);
    assert_eq!(read_reg(&mut dev, CONFIG + 12), 254, "seg_max");
    let mut ro = blk_device(&g, Block::open("ro", &img, None).unwrap());
    assert_eq!(
        device_features(&mut ro),
        F_VERSION_1 | (1 << 9) | (1 << 2) | (1 << 5)
    );
}

#[test]
fn blk_reads_writes_flushes_and_identifies_through_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let (img, image) = make_image(dir.path());
    let before = sha256(&img);
    let overlay = dir.path().join("overlay");
    let g = TestGuest::new(16);
    let mut dev = blk_device(&g, Block::open("rootfs", &img, Some(&overlay)).unwrap());
    let mut qs = bring_up(&mut dev, u64::MAX, &[16]);
    let q = &mut qs[0];

    // Read 8 sectors into two buffers.
    let (status, len) = blk_request(
        &g,
        &mut dev,
        q,
        BLK_T_IN,
        0,
        &[
            writable(BLK_DATA_ADDR, 1024),
            writable(BLK_DATA_ADDR + 0x8000, 3072),
        ],
    );
    assert_eq!((status, len), (0, 4097));
    assert_eq!(g.read(BLK_DATA_ADDR, 1024), image[..1024]);
    assert_eq!(g.read(BLK_DATA_ADDR + 0x8000, 3072), image[1024..4096]);

    // Write sector 3 (part of overlay block 0) and sectors 7..9 (across
    // blocks 0 and 1).
    let mut expect = image.clone();
    g.write(BLK_DATA_ADDR, &[0xab; 512]);
    assert_eq!(
        blk_request(
            &g,
            &mut dev,
            q,
            BLK_T_OUT,
            3,
            &[readable(BLK_DATA_ADDR, 512)]
        ),
        (0, 1)
    );
    expect[3 * 512..4 * 512].fill(0xab);
    g.write(BLK_DATA_ADDR, &[0xcd; 1024]);
    assert_eq!(
        blk_request(
            &g,
            &mut dev,
            q,
            BLK_T_OUT,
            7,
            &[readable(BLK_DATA_ADDR, 1024)]
        ),
        (0, 1)
    );
    expect[7 * 512..9 * 512].fill(0xcd);
    assert_eq!(dev.device().written_blocks(), 2);

    // Read back 16 sectors: the overlay where written, the image elsewhere.
    let (status, len) = blk_request(
        &g,
        &mut dev,
        q,
        BLK_T_IN,
        0,
        &[writable(BLK_DATA_ADDR, 8192)],
    );
    assert_eq!((status, len), (0, 8193));
    assert_eq!(g.read(BLK_DATA_ADDR, 8192), expect[..8192]);

    assert_eq!(blk_request(&g, &mut dev, q, BLK_T_FLUSH, 0, &[]), (0, 1));
    let (status, len) = blk_request(
        &g,
        &mut dev,
        q,
        BLK_T_GET_ID,
        0,
        &[writable(BLK_DATA_ADDR, 20)],
    );
    assert_eq!((status, len), (0, 21));
    assert_eq!(
        g.read(BLK_DATA_ADDR, 20),
        b"rootfs\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
    );

    // A request past the end gets IOERR; an unknown type UNSUPP; the device
    // keeps working.
    let (status, _) = blk_request(
        &g,
        &mut dev,
        q,
        BLK_T_IN,
        IMAGE_SECTORS - 1,
        &[writable(BLK_DATA_ADDR, 1024)],
    );
    assert_eq!(status, 1);
    let refused = dev.last_refused_request().unwrap().to_string();
    assert!(
        refused.contains("virtio-blk rootfs queue 0")
            && refused.contains("sectors 2047+2 are beyond the capacity of 2048"),
        "{refused}"
    );
    assert_eq!(blk_request(&g, &mut dev, q, 99, 0, &[]).0, 2);
    assert_eq!(dev.refused_requests(), 2);
    assert!(!dev.needs_reset());

    // The image file never changed; the overlay holds the writes.
    assert_eq!(sha256(&img), before);
    let ov = std::fs::read(&overlay).unwrap();
    assert_eq!(ov.len(), image.len());
    assert_eq!(ov[3 * 512..4 * 512], [0xab; 512]);

    // Save, restore over the same overlay file, read the writes back.
    let state = dev.save();
    drop(dev);
    let block = Block::restore("rootfs", &img, Some(&overlay), &state.device).unwrap();
    let line: Arc<dyn InterruptLine> = g.interrupts.clone();
    let mut dev = VirtioMmio::restore(block, g.mem.clone(), line, &state.transport).unwrap();
    let (status, _) = blk_request(
        &g,
        &mut dev,
        q,
        BLK_T_IN,
        0,
        &[writable(BLK_DATA_ADDR, 8192)],
    );
    assert_eq!(status, 0);
    assert_eq!(g.read(BLK_DATA_ADDR, 8192), expect[..8192]);
    assert_eq!(dev.device().written_blocks(), 2);
    assert_eq!(sha256(&img), before);
}

#[test]
fn read_only_blk_refuses_writes_with_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_image(dir.path());
    let before = sha256(&img);
    let g = TestGuest::new(16);
    let mut dev = blk_device(&g, Block::open("ro", &img, None).unwrap());
    let mut qs = bring_up(&mut dev, u64::MAX, &[16]);
    assert_ne!(dev.acked_features() & (1 << 5), 0, "RO negotiated");
    g.write(BLK_DATA_ADDR, &[0x11; 512]);
    let (status, _) = blk_request(
        &g,
        &mut dev,
        &mut qs[0],
        BLK_T_OUT,
        0,
        &[readable(BLK_DATA_ADDR, 512)],
    );
    assert_eq!(status, 1);
    assert!(
        dev.last_refused_request()
            .unwrap()
            .to_string()
            .contains("read-only")
    );
    assert_eq!(sha256(&img), before);
}

// ---- virtio-net -----------------------------------------------------------

/// An AF_PACKET socket on one interface: sees what the tap's fd writes and
/// sends frames that the tap's fd then reads.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    fn open(ifname: &str) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            raw >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {ifname}");
        let addr = Self::addr(ifindex, proto, [0; 6]);
        // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Self { fd, ifindex }
    }

    fn addr(ifindex: i32, proto: u16, mac: [u8; 6]) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&mac);
        addr
    }

    fn send(&self, frame: &[u8]) {
        let addr = Self::addr(self.ifindex, 0, frame[..6].try_into().unwrap());
        // SAFETY: `frame` and `addr` are live for the call; sizes match.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }

    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: `buf` is a live, writable buffer of the length passed.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then_some(n as usize)
    }
}

const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn ethernet(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&TEST_ETHERTYPE);
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

#[test]
fn net_transmits_and_receives_through_a_tap() {
    let test = "net_transmits_and_receives_through_a_tap";
    if !vmstream_test_support::require(test, &[Need::Root]) {
        return;
    }
    if !Path::new("/dev/net/tun").exists() {
        vmstream_test_support::record_skip(test, "/dev/net/tun does not exist");
        return;
    }
    let name = format!("vmsv{}", std::process::id() % 100_000);
    let tap = Tap::open(&name).expect("open tap");
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let up = std::process::Command::new("ip")
        .args(["link", "set", "dev", &name, "up"])
        .status()
        .expect("run ip");
    assert!(up.success(), "ip link set {name} up");
    let sock = PacketSocket::open(&name);

    let g = TestGuest::new(16);
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let line: Arc<dyn InterruptLine> = g.interrupts.clone();
    let mut dev = VirtioMmio::new(Net::new("eth0", tap, mac), g.mem.clone(), line);
    assert_eq!(read_reg(&mut dev, DEVICE_ID), 1);
    let mut config = [0u8; 8];
    dev.read(CONFIG, &mut config);
    assert_eq!(config[..6], mac);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    let mut qs = bring_up(&mut dev, u64::MAX, &[16, 16]);
    assert_eq!(dev.acked_features(), F_VERSION_1 | (1 << 5) | (1 << 16));

    // Transmit: header and frame in two descriptors, seen on the interface.
    let tx = ethernet([0xff; 6], mac, b"vmstream virtio-net tx");
    g.write(DATA_BASE, &[0; 12]);
    g.write(DATA_BASE + 0x100, &tx);
    let head = qs[1].add(
        &g,
        &[
            readable(DATA_BASE, 12),
            readable(DATA_BASE + 0x100, tx.len() as u32),
        ],
    );
    qs[1].notify(&mut dev);
    assert_eq!(qs[1].take_used(&g), vec![(u32::from(head), 0)]);
    assert_eq!(dev.device().stats().tx_frames, 1);
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(3);
    let seen = loop {
        assert!(
            Instant::now() < deadline,
            "transmitted frame not seen on {name}"
        );
        if let Some(n) = sock.recv(&mut buf)
            && buf[..n] == tx[..]
        {
            break n;
        }
    };
    assert_eq!(seen, tx.len());

    // Receive: buffers posted first, then a frame sent to the interface.
    for i in 0..4u64 {
        qs[0].add(&g, &[writable(DATA_BASE + 0x1_0000 + i * 0x1000, 2048)]);
    }
    qs[0].notify(&mut dev);
    assert!(qs[0].take_used(&g).is_empty(), "nothing to receive yet");
    let rx = ethernet(mac, [0x02, 0, 0, 0, 0, 1], b"vmstream virtio-net rx");
    sock.send(&rx);
    let deadline = Instant::now() + Duration::from_secs(3);
    'wait: loop {
        assert!(
            Instant::now() < deadline,
            "frame sent to {name} never reached the rx queue"
        );
        dev.process_queue(0);
        for (id, len) in qs[0].take_used(&g) {
            let addr = DATA_BASE + 0x1_0000 + u64::from(id) * 0x1000;
            let got = g.read(addr, len as usize);
            assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
            if got[12..] == rx[..] {
                break 'wait;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(dev.device().stats().rx_frames >= 1);
    assert!(g.interrupts.take().contains(&VirtioInterrupt::Queue(0)));
    assert!(dev.last_fault().is_none(), "{:?}", dev.last_fault());
}
