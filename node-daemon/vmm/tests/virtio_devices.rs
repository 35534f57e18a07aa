//! Well-behaved drivers against the virtio-mmio devices: feature
//! negotiation, queue rounds for rng, blk and net, used-ring wrap-around,
//! the block device's copy-on-write overlay (the image file never changes)
//! and save/restore of the transport state.

mod virtio_common;

use std::sync::Arc;

use virtio_common::*;
use vmstream_vmm::devices::virtio::rng::Rng;
use vmstream_vmm::devices::virtio::{InterruptLine, MmioTransport, VirtioInterrupt, VirtioMmio};

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
