//! virtio-net (ID 1) on a Linux tap: queue 0 receives, queue 1 transmits;
//! features MAC and STATUS (link always up); configuration space = MAC and
//! status. The 12-byte `virtio_net_hdr_v1` passes between the rings and the
//! tap unchanged (the tap is opened with the same header size), except that
//! received frames get `num_buffers = 1`.
//!
//! Transmit: each chain's device-readable bytes (header + frame) are one
//! write to the tap. Receive: the VM wiring polls [`Net::tap_fd`] (edge
//! triggered) and calls `VirtioMmio::process_queue(RX_QUEUE)` when it is
//! readable; frames are read until the tap is empty or no receive buffer is
//! left, and a frame that found no buffer waits for the driver's next
//! receive-queue notification. Frames too large for the buffer, and frames
//! the tap refuses, are dropped and counted.

use std::os::fd::{AsRawFd, RawFd};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};

use super::blk::copy_config;
use super::chain::Chain;
use super::device::{QueueAccess, VirtioDevice};
use super::errors::RequestError;
use super::tap::{Tap, VNET_HDR_LEN};

/// Receive queue index.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue index.
pub const TX_QUEUE: u16 = 1;
/// Queue size offered (both queues).
pub const NET_QUEUE_SIZE: u16 = 256;
/// Largest frame with its header (64 KiB of Ethernet frame plus header).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

/// Frame counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

/// Saved state of a net device (the tap is a resource given to `restore`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub stats: NetStats,
}

/// The network device.
#[derive(Debug)]
pub struct Net {
    name: String,
    tap: Tap,
    mac: [u8; 6],
    stats: NetStats,
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
}

impl Net {
    /// A device named `name` with MAC `mac` on `tap`.
    pub fn new(name: &str, tap: Tap, mac: [u8; 6]) -> Self {
        Self {
            name: format!("virtio-net {name}"),
            tap,
            mac,
            stats: NetStats::default(),
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: None,
            tx_buf: vec![0; MAX_FRAME],
        }
    }

    /// A device continuing from `state` on `tap`.
    pub fn restore(name: &str, tap: Tap, state: &NetState) -> Self {
        let mut net = Self::new(name, tap, state.mac);
        net.stats = state.stats;
        net
    }

    /// The tap's fd, for the wiring's poll loop.
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// The tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Frame counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// True when a received frame waits for a receive buffer.
    pub fn rx_waiting(&self) -> bool {
        self.rx_pending.is_some()
    }

    fn process_rx(&mut self, queue: &mut QueueAccess<'_>) -> Result<(), RequestError> {
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                    Err(error) => {
                        tracing::warn!(device = self.name, %error, "tap read failed");
                        return Ok(());
                    }
                },
            };
            self.rx_pending = Some(len);
            let Some(chain) = queue.next_chain()? else {
                return Ok(());
            };
            self.rx_pending = None;
            check_direction(&chain, "net receive", true)?;
            if len < VNET_HDR_LEN || chain.writable_len() < len as u64 {
                self.stats.rx_dropped += 1;
                queue.refuse(RequestError::Dropped {
                    head: chain.head,
                    len: len as u64,
                    why: "larger than the receive buffer",
                });
                queue.complete(chain.head, 0)?;
                continue;
            }
            // num_buffers: one buffer per frame (MRG_RXBUF is not offered).
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            chain.write_at(queue.mem(), 0, &self.rx_buf[..len])?;
            queue.complete(chain.head, len as u32)?;
            self.stats.rx_frames += 1;
        }
    }

    fn process_tx(&mut self, queue: &mut QueueAccess<'_>) -> Result<(), RequestError> {
        while let Some(chain) = queue.next_chain()? {
            check_direction(&chain, "net transmit", false)?;
            let len = chain.readable_len();
            if len < VNET_HDR_LEN as u64 {
                return Err(RequestError::TooShort {
                    head: chain.head,
                    what: "transmit header",
                    len,
                    need: VNET_HDR_LEN as u64,
                });
            }
            let sent = if len > MAX_FRAME as u64 {
                Err("larger than 64 KiB")
            } else {
                let frame = &mut self.tx_buf[..len as usize];
                chain.read_at(queue.mem(), 0, frame)?;
                self.tap.write_frame(frame).map_err(|error| {
                    tracing::debug!(device = self.name, %error, "tap write failed");
                    "the tap refused it"
                })
            };
            match sent {
                Ok(_) => self.stats.tx_frames += 1,
                Err(why) => {
                    self.stats.tx_dropped += 1;
                    queue.refuse(RequestError::Dropped {
                        head: chain.head,
                        len,
                        why,
                    });
                }
            }
            queue.complete(chain.head, 0)?;
        }
        Ok(())
    }
}

/// Receive chains must be all device-writable, transmit chains all
/// device-readable.
fn check_direction(chain: &Chain, request: &'static str, rx: bool) -> Result<(), RequestError> {
    let wrong = if rx {
        chain.readable.first()
    } else {
        chain.writable.first()
    };
    match wrong {
        None => Ok(()),
        Some(b) => Err(RequestError::Direction {
            request,
            head: chain.head,
            desc: b.desc,
            addr: b.addr,
            found: if rx {
                "device-readable"
            } else {
                "device-writable"
            },
            expected: if rx {
                "device-writable"
            } else {
                "device-readable"
            },
        }),
    }
}

impl VirtioDevice for Net {
    type State = NetState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[NET_QUEUE_SIZE, NET_QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        copy_config(&config, offset, data);
    }

    fn process_queue(&mut self, queue: &mut QueueAccess<'_>) -> Result<(), RequestError> {
        match queue.index() {
            RX_QUEUE => self.process_rx(queue),
            _ => self.process_tx(queue),
        }
    }

    fn reset(&mut self) {
        self.rx_pending = None;
    }

    fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            stats: self.stats,
        }
    }
}
