//! Hostile drivers: each test breaks one rule of the virtio spec and checks
//! that the device refuses it — a register keeps its value, or the device
//! stops with NEEDS_RESET, or the one request gets an error status — that
//! the error names the device, queue and descriptor, and that the process
//! (the VMM) keeps running and the device works again after a reset.

mod virtio_common;

use std::sync::Arc;

use virtio_common::*;
use vmstream_test_support::Need;
use vmstream_vmm::devices::virtio::blk::Block;
use vmstream_vmm::devices::virtio::net::Net;
use vmstream_vmm::devices::virtio::rng::Rng;
use vmstream_vmm::devices::virtio::tap::Tap;
use vmstream_vmm::devices::virtio::{InterruptLine, VirtioMmio};

fn rng_device(g: &TestGuest) -> VirtioMmio<Rng> {
    let line: Arc<dyn InterruptLine> = g.interrupts.clone();
    VirtioMmio::new(Rng::new("hostile"), g.mem.clone(), line)
}

/// A writable block device over a 1 MiB image (kept alive by the tempdir).
fn blk_device(g: &TestGuest) -> (tempfile::TempDir, VirtioMmio<Block>) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![0x5a; 1 << 20]).unwrap();
    let block = Block::open("disk", &img, Some(&dir.path().join("overlay"))).unwrap();
    let line: Arc<dyn InterruptLine> = g.interrupts.clone();
    (dir, VirtioMmio::new(block, g.mem.clone(), line))
}

/// After a reset the device serves a well-formed request again.
fn assert_recovers(g: &TestGuest, dev: &mut VirtioMmio<Rng>) {
    write_reg(dev, STATUS, 0);
    assert_eq!(read_reg(dev, STATUS), 0);
    let mut qs = bring_up(dev, F_VERSION_1, &[16]);
    let head = qs[0].add(g, &[writable(DATA_BASE, 32)]);
    qs[0].notify(dev);
    assert_eq!(qs[0].take_used(g), vec![(u32::from(head), 32)]);
    assert!(!dev.needs_reset());
}

#[test]
fn descriptor_address_outside_guest_memory_breaks_the_device() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    qs[0].add(&g, &[writable(16 << 20, 64)]);
    qs[0].notify(&mut dev);
    assert_broken(
        &g,
        &mut dev,
        &[
            "virtio-rng hostile",
            "queue 0",
            "descriptor 0",
            "0x1000000+64",
            "not inside guest memory",
        ],
    );
    assert_eq!(qs[0].used_idx(&g), 0, "nothing was completed");
    // Further notifications are ignored until a reset.
    qs[0].add(&g, &[writable(DATA_BASE, 8)]);
    qs[0].notify(&mut dev);
    assert_eq!(qs[0].used_idx(&g), 0);
    assert_recovers(&g, &mut dev);
}

#[test]
fn descriptor_table_outside_guest_memory_is_refused_at_queue_ready() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    negotiate(&mut dev, F_VERSION_1);
    let mut q = setup_queue(&mut dev, 0, 16);
    write_reg(&mut dev, QUEUE_READY, 0);
    q.desc = (16 << 20) - 128; // 16 entries need 256 bytes
    write_queue_regs(&mut dev, &q);
    write_reg(&mut dev, QUEUE_READY, 1);
    assert_eq!(read_reg(&mut dev, QUEUE_READY), 0);
    assert_fault(
        &dev,
        &[
            "virtio-rng hostile",
            "queue 0",
            "descriptor table at 0xffff80+256",
            "not inside guest memory",
        ],
    );
    // A table in the MMIO hole or far above RAM is no better.
    q.desc = 0xfee0_0000;
    write_queue_regs(&mut dev, &q);
    write_reg(&mut dev, QUEUE_READY, 1);
    assert_eq!(read_reg(&mut dev, QUEUE_READY), 0);
    q.desc = u64::MAX - 15;
    write_queue_regs(&mut dev, &q);
    write_reg(&mut dev, QUEUE_READY, 1);
    assert_eq!(read_reg(&mut dev, QUEUE_READY), 0);
    assert!(
        !dev.needs_reset(),
        "a refused register is not a broken device"
    );
}

#[test]
fn descriptor_chain_loop_breaks_the_device() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    let q = &mut qs[0];
    q.write_desc(&g, 3, DATA_BASE, 8, DESC_F_WRITE | DESC_F_NEXT, 4);
    q.write_desc(&g, 4, DATA_BASE + 8, 8, DESC_F_WRITE | DESC_F_NEXT, 3);
    q.publish(&g, 3);
    q.notify(&mut dev);
    assert_broken(
        &g,
        &mut dev,
        &[
            "virtio-rng hostile",
            "queue 0",
            "chain from head 3",
            "longer than the queue size 16",
            "loops back",
        ],
    );
    assert_recovers(&g, &mut dev);
}

#[test]
fn descriptor_length_near_u32_max_breaks_the_device() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    qs[0].add(&g, &[writable(DATA_BASE, u32::MAX - 15)]);
    qs[0].notify(&mut dev);
    assert_broken(
        &g,
        &mut dev,
        &[
            "queue 0",
            "descriptor 0 (chain head 0)",
            "0x200000+4294967280",
        ],
    );
    assert_recovers(&g, &mut dev);
}

#[test]
fn unaligned_ring_addresses_are_refused() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    negotiate(&mut dev, F_VERSION_1);
    let good = TestQueue {
        index: 0,
        size: 16,
        desc: RINGS_BASE,
        avail: RINGS_BASE + 0x4000,
        used: RINGS_BASE + 0x8000,
        avail_idx: 0,
        last_used: 0,
        next_desc: 0,
    };
    for (q, expect) in [
        (
            TestQueue {
                desc: RINGS_BASE + 8,
                ..good.clone()
            },
            "not 16-byte aligned",
        ),
        (
            TestQueue {
                avail: RINGS_BASE + 0x4001,
                ..good.clone()
            },
            "not 2-byte aligned",
        ),
        (
            TestQueue {
                used: RINGS_BASE + 0x8002,
                ..good.clone()
            },
            "not 4-byte aligned",
        ),
    ] {
        write_queue_regs(&mut dev, &q);
        write_reg(&mut dev, QUEUE_READY, 1);
        assert_eq!(read_reg(&mut dev, QUEUE_READY), 0, "{expect}");
        assert_fault(&dev, &["virtio-rng hostile", "queue 0", expect]);
    }
    write_queue_regs(&mut dev, &good);
    write_reg(&mut dev, QUEUE_READY, 1);
    assert_eq!(read_reg(&mut dev, QUEUE_READY), 1);
}

#[test]
fn queue_size_not_a_power_of_two_or_above_the_maximum_is_refused() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    negotiate(&mut dev, F_VERSION_1);
    for size in [0u16, 3, 12, 128, 1024] {
        let q = TestQueue {
            index: 0,
            size,
            desc: RINGS_BASE,
            avail: RINGS_BASE + 0x4000,
            used: RINGS_BASE + 0x8000,
            avail_idx: 0,
            last_used: 0,
            next_desc: 0,
        };
        write_queue_regs(&mut dev, &q);
        write_reg(&mut dev, QUEUE_READY, 1);
        assert_eq!(read_reg(&mut dev, QUEUE_READY), 0, "size {size}");
        assert_fault(
            &dev,
            &[
                "queue 0",
                &format!("queue size {size} is not a power of two between 1 and 64"),
            ],
        );
    }
}

#[test]
fn notification_before_driver_ok_is_ignored() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    negotiate(&mut dev, F_VERSION_1);
    let mut q = setup_queue(&mut dev, 0, 16);
    q.add(&g, &[writable(DATA_BASE, 16)]);
    q.notify(&mut dev);
    assert_eq!(q.used_idx(&g), 0, "nothing served before DRIVER_OK");
    assert_fault(
        &dev,
        &[
            "virtio-rng hostile",
            "notification of queue 0 before DRIVER_OK",
        ],
    );
    assert_eq!(g.interrupts.count(), 0);
    // Notifying a queue that does not exist is refused too.
    driver_ok(&mut dev);
    write_reg(&mut dev, QUEUE_NOTIFY, 7);
    assert_fault(&dev, &["queue 7 does not exist"]);
    assert!(!dev.needs_reset());
    // The request made available earlier is served on the next notification.
    q.notify(&mut dev);
    assert_eq!(q.take_used(&g).len(), 1);
}

#[test]
fn available_index_jumping_more_than_the_queue_size_breaks_the_device() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    let q = &mut qs[0];
    q.add(&g, &[writable(DATA_BASE, 16)]);
    g.write_u16(q.avail + 2, 40);
    q.notify(&mut dev);
    assert_broken(
        &g,
        &mut dev,
        &[
            "virtio-rng hostile",
            "queue 0",
            "available index 40 is 40 entries ahead",
            "queue size 16",
        ],
    );
    assert_eq!(q.used_idx(&g), 0);
    assert_recovers(&g, &mut dev);
}

#[test]
fn features_ok_with_a_feature_not_offered_is_refused() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    write_reg(&mut dev, STATUS, S_ACKNOWLEDGE);
    write_reg(&mut dev, STATUS, S_ACKNOWLEDGE | S_DRIVER);
    // VIRTIO_F_VERSION_1 plus EVENT_IDX (bit 29), which is not offered.
    write_driver_features(&mut dev, F_VERSION_1 | (1 << 29));
    write_reg(&mut dev, STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    assert_eq!(read_reg(&mut dev, STATUS) & S_FEATURES_OK, 0);
    assert_fault(
        &dev,
        &[
            "virtio-rng hostile",
            "FEATURES_OK refused",
            "0x120000000",
            "not offered",
        ],
    );
    // Without VERSION_1 (a legacy driver) it is refused as well.
    write_driver_features(&mut dev, 0);
    write_reg(&mut dev, STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    assert_eq!(read_reg(&mut dev, STATUS) & S_FEATURES_OK, 0);
    assert_fault(&dev, &["VIRTIO_F_VERSION_1"]);
    // A queue cannot be set up without FEATURES_OK.
    write_reg(&mut dev, QUEUE_SEL, 0);
    write_reg(&mut dev, QUEUE_NUM, 16);
    assert_fault(&dev, &["queue 0 configured in status 0x3"]);
}

#[test]
fn status_bits_out_of_order_are_refused() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    write_reg(
        &mut dev,
        STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    assert_eq!(read_reg(&mut dev, STATUS), 0);
    assert_fault(&dev, &["status 0xf refused in status 0x0"]);
    write_reg(&mut dev, STATUS, S_ACKNOWLEDGE);
    write_reg(&mut dev, STATUS, S_ACKNOWLEDGE | S_DRIVER_OK);
    assert_eq!(read_reg(&mut dev, STATUS), S_ACKNOWLEDGE);
    // Registers are 32-bit: a byte write is refused, not half-applied.
    dev.write(STATUS, &[3]);
    assert_eq!(read_reg(&mut dev, STATUS), S_ACKNOWLEDGE);
    assert_fault(&dev, &["register 0x70 accessed with 1 bytes"]);
}

#[test]
fn descriptor_index_out_of_range_and_indirect_descriptors_break_the_device() {
    let g = TestGuest::new(16);
    // Head index beyond the table.
    let mut dev = rng_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    qs[0].publish(&g, 16);
    qs[0].notify(&mut dev);
    assert_broken(
        &g,
        &mut dev,
        &["queue 0", "chain head 16 is not a descriptor index"],
    );
    // Next index beyond the table.
    let mut dev = rng_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    qs[0].write_desc(&g, 2, DATA_BASE, 8, DESC_F_WRITE | DESC_F_NEXT, 999);
    qs[0].publish(&g, 2);
    qs[0].notify(&mut dev);
    assert_broken(
        &g,
        &mut dev,
        &["descriptor 2 (chain head 2) names next descriptor 999"],
    );
    // Indirect table (INDIRECT_DESC was not offered).
    let mut dev = rng_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    qs[0].write_desc(&g, 5, DATA_BASE, 32, DESC_F_INDIRECT, 0);
    qs[0].publish(&g, 5);
    qs[0].notify(&mut dev);
    assert_broken(&g, &mut dev, &["descriptor 5 (chain head 5) is indirect"]);
    assert_recovers(&g, &mut dev);
}

#[test]
fn rng_request_with_a_device_readable_buffer_breaks_the_device() {
    let g = TestGuest::new(16);
    let mut dev = rng_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    qs[0].add(&g, &[readable(DATA_BASE, 16), writable(DATA_BASE + 64, 16)]);
    qs[0].notify(&mut dev);
    assert_broken(
        &g,
        &mut dev,
        &[
            "entropy request (chain head 0)",
            "descriptor 0 at 0x200000 is device-readable",
        ],
    );
}

#[test]
fn blk_in_with_a_device_readable_data_buffer_breaks_the_device() {
    let g = TestGuest::new(16);
    let (dir, mut dev) = blk_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    let q = &mut qs[0];
    blk_header(&g, BLK_T_IN, 0);
    // The device would have to write the sector into a read-only buffer.
    q.add(
        &g,
        &[
            readable(BLK_HEADER_ADDR, 16),
            readable(BLK_DATA_ADDR, 512),
            writable(BLK_STATUS_ADDR, 1),
        ],
    );
    q.notify(&mut dev);
    assert_broken(
        &g,
        &mut dev,
        &[
            "virtio-blk disk queue 0",
            "blk IN request (chain head 0)",
            "descriptor 1 at 0x210000 is device-readable",
            "needs it device-writable",
        ],
    );
    assert_eq!(q.used_idx(&g), 0);
    assert_eq!(
        std::fs::read(dir.path().join("disk.raw")).unwrap(),
        vec![0x5a; 1 << 20]
    );
}

#[test]
fn blk_out_with_a_device_writable_data_buffer_breaks_the_device() {
    let g = TestGuest::new(16);
    let (_dir, mut dev) = blk_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    let q = &mut qs[0];
    blk_header(&g, BLK_T_OUT, 0);
    // The device would have to read the data from a write-only buffer.
    q.add(
        &g,
        &[
            readable(BLK_HEADER_ADDR, 16),
            writable(BLK_DATA_ADDR, 512),
            writable(BLK_STATUS_ADDR, 1),
        ],
    );
    q.notify(&mut dev);
    assert_broken(
        &g,
        &mut dev,
        &[
            "virtio-blk disk queue 0",
            "blk OUT request (chain head 0)",
            "descriptor 1 at 0x210000 is device-writable",
        ],
    );
    assert_eq!(dev.device().written_blocks(), 0, "nothing was written");
}

#[test]
fn blk_request_header_too_short_breaks_the_device() {
    let g = TestGuest::new(16);
    let (_dir, mut dev) = blk_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    blk_header(&g, BLK_T_IN, 0);
    qs[0].add(
        &g,
        &[
            readable(BLK_HEADER_ADDR, 8),
            writable(BLK_DATA_ADDR, 512),
            writable(BLK_STATUS_ADDR, 1),
        ],
    );
    qs[0].notify(&mut dev);
    assert_broken(
        &g,
        &mut dev,
        &[
            "virtio-blk disk queue 0",
            "chain head 0: the request header is 8 bytes, at least 16",
        ],
    );
    // A chain with no status byte cannot be answered either.
    write_reg(&mut dev, STATUS, 0);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    qs[0].add(&g, &[readable(BLK_HEADER_ADDR, 16)]);
    qs[0].notify(&mut dev);
    assert_broken(&g, &mut dev, &["status byte"]);
}

#[test]
fn blk_sector_beyond_capacity_gets_ioerr_and_the_device_goes_on() {
    let g = TestGuest::new(16);
    let (_dir, mut dev) = blk_device(&g);
    let mut qs = bring_up(&mut dev, F_VERSION_1, &[16]);
    let q = &mut qs[0];
    for (sector, len) in [
        (2048u64, 512u32),
        (2047, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512, 512),
    ] {
        let (status, used) = blk_request(
            &g,
            &mut dev,
            q,
            BLK_T_IN,
            sector,
            &[writable(BLK_DATA_ADDR, len)],
        );
        assert_eq!((status, used), (1, 1), "sector {sector}");
        let refused = dev.last_refused_request().unwrap().to_string();
        assert!(
            refused.contains("virtio-blk disk queue 0")
                && refused.contains(&format!("sectors {sector}+")),
            "{refused}"
        );
    }
    let (status, _) = blk_request(
        &g,
        &mut dev,
        q,
        BLK_T_OUT,
        2048,
        &[readable(BLK_DATA_ADDR, 512)],
    );
    assert_eq!(status, 1);
    // A length that is not whole sectors is refused the same way.
    let (status, _) = blk_request(
        &g,
        &mut dev,
        q,
        BLK_T_IN,
        0,
        &[writable(BLK_DATA_ADDR, 100)],
    );
    assert_eq!(status, 1);
    assert!(
        dev.last_refused_request()
            .unwrap()
            .to_string()
            .contains("not a multiple of 512")
    );
    assert_eq!(dev.refused_requests(), 6);
    assert!(!dev.needs_reset());
    assert_eq!(dev.device().written_blocks(), 0);
    let (status, _) = blk_request(
        &g,
        &mut dev,
        q,
        BLK_T_IN,
        2047,
        &[writable(BLK_DATA_ADDR, 512)],
    );
    assert_eq!(status, 0);
    assert_eq!(g.read(BLK_DATA_ADDR, 512), vec![0x5a; 512]);
}

#[test]
fn net_transmit_chain_with_a_device_writable_buffer_breaks_the_device() {
    let test = "net_transmit_chain_with_a_device_writable_buffer_breaks_the_device";
    if !vmstream_test_support::require(test, &[Need::Root]) {
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        vmstream_test_support::record_skip(test, "/dev/net/tun does not exist");
        return;
    }
    let g = TestGuest::new(16);
    let tap = Tap::open(&format!("vmsh{}", std::process::id() % 100_000)).expect("open tap");
    let line: Arc<dyn InterruptLine> = g.interrupts.clone();
    let mut dev = VirtioMmio::new(
        Net::new("eth0", tap, [2, 0, 0, 0, 0, 1]),
        g.mem.clone(),
        line,
    );
    let mut qs = bring_up(&mut dev, u64::MAX, &[16, 16]);
    qs[1].add(
        &g,
        &[readable(DATA_BASE, 12), writable(DATA_BASE + 0x100, 64)],
    );
    qs[1].notify(&mut dev);
    assert_broken(
        &g,
        &mut dev,
        &[
            "virtio-net eth0 queue 1",
            "net transmit request (chain head 0)",
            "descriptor 1 at 0x200100 is device-writable",
        ],
    );
    assert_eq!(dev.device().stats().tx_frames, 0);
    // The receive path of the broken device is not served either.
    assert!(!dev.process_queue(0));
}
