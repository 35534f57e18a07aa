//! A virtio-mmio driver for tests: it writes descriptors and rings into
//! guest memory (the crate's own `GuestRam`, seen by the device through
//! `guest_memory_view`) and touches the device only through MMIO register
//! reads and writes, as a guest kernel would. Hostile tests use the same
//! driver and then break the rules on purpose.

#![allow(dead_code)]

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmstream_vmm::devices::virtio::{
    MmioTransport, RecordedInterrupts, VirtioDevice, VirtioInterrupt, VirtioMmio,
};
use vmstream_vmm::memory::{GuestRam, guest_memory_view};
use vmstream_vmm::vstate::ram_access::RamAccess;

pub const MAGIC: u64 = 0x00;
pub const VERSION: u64 = 0x04;
pub const DEVICE_ID: u64 = 0x08;
pub const DEVICE_FEATURES: u64 = 0x10;
pub const DEVICE_FEATURES_SEL: u64 = 0x14;
pub const DRIVER_FEATURES: u64 = 0x20;
pub const DRIVER_FEATURES_SEL: u64 = 0x24;
pub const QUEUE_SEL: u64 = 0x30;
pub const QUEUE_NUM_MAX: u64 = 0x34;
pub const QUEUE_NUM: u64 = 0x38;
pub const QUEUE_READY: u64 = 0x44;
pub const QUEUE_NOTIFY: u64 = 0x50;
pub const INTERRUPT_STATUS: u64 = 0x60;
pub const INTERRUPT_ACK: u64 = 0x64;
pub const STATUS: u64 = 0x70;
pub const QUEUE_DESC_LOW: u64 = 0x80;
pub const QUEUE_DESC_HIGH: u64 = 0x84;
pub const QUEUE_AVAIL_LOW: u64 = 0x90;
pub const QUEUE_AVAIL_HIGH: u64 = 0x94;
pub const QUEUE_USED_LOW: u64 = 0xa0;
pub const QUEUE_USED_HIGH: u64 = 0xa4;
pub const CONFIG_GENERATION: u64 = 0xfc;
pub const CONFIG: u64 = 0x100;

pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 64;

pub const F_VERSION_1: u64 = 1 << 32;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Guest RAM for a test: the mapping, the host view of it and the
/// `GuestMemoryMmap` the devices use.
pub struct TestGuest {
    _ram: GuestRam,
    pub ram: RamAccess,
    pub mem: GuestMemoryMmap,
    pub interrupts: Arc<RecordedInterrupts>,
}

impl TestGuest {
    /// `mib` MiB of anonymous guest RAM.
    pub fn new(mib: usize) -> Self {
        let ram = GuestRam::reserve(mib << 20).expect("reserve guest RAM");
        // SAFETY: `_ram` is kept in the same struct and dropped after every
        // use of the view within a test (the device is dropped by then).
        let access = unsafe { RamAccess::new(ram.host_addr(), ram.len()) };
        let mem = guest_memory_view(&access).expect("guest memory view");
        Self {
            _ram: ram,
            ram: access,
            mem,
            interrupts: Arc::new(RecordedInterrupts::new()),
        }
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.ram.write_bytes(gpa, bytes).expect("write guest RAM");
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        for (i, b) in out.iter_mut().enumerate() {
            let word = self.ram.read_u64((gpa + i as u64) & !7).unwrap();
            *b = (word >> (8 * ((gpa + i as u64) & 7))) as u8;
        }
        out
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    pub fn read_u16(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        let b = self.read(gpa, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Where a queue's rings are in guest memory, and the driver's view of it.
#[derive(Debug, Clone)]
pub struct TestQueue {
    pub index: u32,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Next avail idx the driver will publish.
    pub avail_idx: u16,
    /// Used entries the driver has consumed.
    pub last_used: u16,
    /// Next free descriptor (allocated round robin).
    pub next_desc: u16,
}

/// One buffer of a chain the driver builds.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

pub fn readable(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        writable: false,
    }
}

pub fn writable(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        writable: true,
    }
}

/// Ring area of queue `i` (64 KiB each from 1 MiB) and the data area.
pub const RINGS_BASE: u64 = 0x10_0000;
pub const DATA_BASE: u64 = 0x20_0000;

pub fn read_reg(dev: &mut dyn MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub fn write_reg(dev: &mut dyn MmioTransport, offset: u64, value: u32) {
    dev.write(offset, &value.to_le_bytes());
}

pub fn device_features(dev: &mut dyn MmioTransport) -> u64 {
    write_reg(dev, DEVICE_FEATURES_SEL, 0);
    let low = read_reg(dev, DEVICE_FEATURES);
    write_reg(dev, DEVICE_FEATURES_SEL, 1);
    let high = read_reg(dev, DEVICE_FEATURES);
    u64::from(low) | (u64::from(high) << 32)
}

pub fn write_driver_features(dev: &mut dyn MmioTransport, features: u64) {
    write_reg(dev, DRIVER_FEATURES_SEL, 0);
    write_reg(dev, DRIVER_FEATURES, features as u32);
    write_reg(dev, DRIVER_FEATURES_SEL, 1);
    write_reg(dev, DRIVER_FEATURES, (features >> 32) as u32);
}

/// ACKNOWLEDGE, DRIVER, features (all offered of `wanted`), FEATURES_OK.
/// Returns the accepted features.
pub fn negotiate(dev: &mut dyn MmioTransport, wanted: u64) -> u64 {
    assert_eq!(read_reg(dev, MAGIC), 0x7472_6976);
    assert_eq!(read_reg(dev, VERSION), 2);
    write_reg(dev, STATUS, 0);
    write_reg(dev, STATUS, S_ACKNOWLEDGE);
    write_reg(dev, STATUS, S_ACKNOWLEDGE | S_DRIVER);
    let offered = device_features(dev);
    let accepted = offered & wanted;
    write_driver_features(dev, accepted);
    write_reg(dev, STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    assert_ne!(
        read_reg(dev, STATUS) & S_FEATURES_OK,
        0,
        "device refused features {accepted:#x}"
    );
    accepted
}

/// Writes queue `index`'s registers for `size` entries at the standard
/// places and sets QueueReady; returns the driver's view.
pub fn setup_queue(dev: &mut dyn MmioTransport, index: u32, size: u16) -> TestQueue {
    let base = RINGS_BASE + u64::from(index) * 0x1_0000;
    let q = TestQueue {
        index,
        size,
        desc: base,
        avail: base + 0x4000,
        used: base + 0x8000,
        avail_idx: 0,
        last_used: 0,
        next_desc: 0,
    };
    write_queue_regs(dev, &q);
    write_reg(dev, QUEUE_READY, 1);
    q
}

/// Selects the queue and writes its size and ring addresses (not ready).
pub fn write_queue_regs(dev: &mut dyn MmioTransport, q: &TestQueue) {
    write_reg(dev, QUEUE_SEL, q.index);
    assert_eq!(read_reg(dev, QUEUE_READY), 0);
    write_reg(dev, QUEUE_NUM, u32::from(q.size));
    for (low, value) in [
        (QUEUE_DESC_LOW, q.desc),
        (QUEUE_AVAIL_LOW, q.avail),
        (QUEUE_USED_LOW, q.used),
    ] {
        write_reg(dev, low, value as u32);
        write_reg(dev, low + 4, (value >> 32) as u32);
    }
}

pub fn driver_ok(dev: &mut dyn MmioTransport) {
    let status = read_reg(dev, STATUS);
    write_reg(dev, STATUS, status | S_DRIVER_OK);
    assert_ne!(read_reg(dev, STATUS) & S_DRIVER_OK, 0, "DRIVER_OK refused");
}

/// Negotiates, sets up `sizes.len()` queues and sets DRIVER_OK.
pub fn bring_up(dev: &mut dyn MmioTransport, wanted: u64, sizes: &[u16]) -> Vec<TestQueue> {
    negotiate(dev, wanted);
    let queues = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| setup_queue(dev, i as u32, size))
        .collect();
    driver_ok(dev);
    queues
}

impl TestQueue {
    /// Writes one descriptor at table index `i`.
    pub fn write_desc(&self, g: &TestGuest, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        g.write(self.desc + 16 * u64::from(i), &d);
    }

    /// Builds a chain of `bufs` in free descriptors; returns its head.
    pub fn build_chain(&mut self, g: &TestGuest, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (k, b) in bufs.iter().enumerate() {
            let i = (head + k as u16) % self.size;
            let last = k + 1 == bufs.len();
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(g, i, b.addr, b.len, flags, (i + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        head
    }

    /// Puts `head` in the available ring and publishes the new index.
    pub fn publish(&mut self, g: &TestGuest, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        g.write_u16(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        g.write_u16(self.avail + 2, self.avail_idx);
    }

    /// Builds and publishes a chain; returns its head.
    pub fn add(&mut self, g: &TestGuest, bufs: &[Buf]) -> u16 {
        let head = self.build_chain(g, bufs);
        self.publish(g, head);
        head
    }

    pub fn notify(&self, dev: &mut dyn MmioTransport) {
        write_reg(dev, QUEUE_NOTIFY, self.index);
    }

    /// The device's used index.
    pub fn used_idx(&self, g: &TestGuest) -> u16 {
        g.read_u16(self.used + 2)
    }

    /// Used entries (id, len) not consumed yet.
    pub fn take_used(&mut self, g: &TestGuest) -> Vec<(u32, u32)> {
        let used_idx = self.used_idx(g);
        let mut out = Vec::new();
        while self.last_used != used_idx {
            let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
            out.push((g.read_u32(e), g.read_u32(e + 4)));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }
}

/// Reads and acknowledges the interrupt status.
pub fn ack_interrupt(dev: &mut dyn MmioTransport) -> u32 {
    let status = read_reg(dev, INTERRUPT_STATUS);
    write_reg(dev, INTERRUPT_ACK, status);
    status
}

pub const BLK_T_IN: u32 = 0;
pub const BLK_T_OUT: u32 = 1;
pub const BLK_T_FLUSH: u32 = 4;
pub const BLK_T_GET_ID: u32 = 8;
pub const BLK_HEADER_ADDR: u64 = DATA_BASE;
pub const BLK_STATUS_ADDR: u64 = DATA_BASE + 0x100;
pub const BLK_DATA_ADDR: u64 = DATA_BASE + 0x1_0000;

/// Writes a block request header (type, sector) at [`BLK_HEADER_ADDR`].
pub fn blk_header(g: &TestGuest, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    g.write(BLK_HEADER_ADDR, &h);
}

/// Submits header + `data` + status byte, notifies, and returns
/// (status byte, used length). `data` buffers give their own direction.
pub fn blk_request(
    g: &TestGuest,
    dev: &mut dyn MmioTransport,
    q: &mut TestQueue,
    kind: u32,
    sector: u64,
    data: &[Buf],
) -> (u8, u32) {
    blk_header(g, kind, sector);
    g.write(BLK_STATUS_ADDR, &[0xee]);
    let mut bufs = vec![readable(BLK_HEADER_ADDR, 16)];
    bufs.extend_from_slice(data);
    bufs.push(writable(BLK_STATUS_ADDR, 1));
    let head = q.add(g, &bufs);
    q.notify(dev);
    let used = q.take_used(g);
    assert_eq!(used.len(), 1, "one completion expected, got {used:?}");
    assert_eq!(used[0].0, u32::from(head));
    (g.read(BLK_STATUS_ADDR, 1)[0], used[0].1)
}

/// The device stopped with NEEDS_RESET, raised a configuration interrupt,
/// and its recorded fault contains every piece of `expect`.
pub fn assert_broken<D: VirtioDevice>(g: &TestGuest, dev: &mut VirtioMmio<D>, expect: &[&str]) {
    assert!(
        dev.needs_reset(),
        "device did not stop: {:?}",
        dev.last_fault()
    );
    assert_ne!(read_reg(dev, STATUS) & S_NEEDS_RESET, 0);
    assert!(g.interrupts.take().contains(&VirtioInterrupt::Config));
    assert_ne!(
        read_reg(dev, INTERRUPT_STATUS) & 2,
        0,
        "config interrupt bit"
    );
    assert_fault(dev, expect);
}

/// The latest recorded fault contains every piece of `expect`.
pub fn assert_fault<D: VirtioDevice>(dev: &VirtioMmio<D>, expect: &[&str]) {
    let message = dev
        .last_fault()
        .map(ToString::to_string)
        .unwrap_or_else(|| panic!("no fault recorded; expected {expect:?}"));
    for piece in expect {
        assert!(message.contains(piece), "fault {message:?} lacks {piece:?}");
    }
}
