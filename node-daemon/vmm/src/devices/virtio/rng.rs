//! virtio-rng (entropy device, ID 4): one queue whose device-writable
//! buffers are filled from the host's `getrandom(2)`. At most 64 KiB per
//! request; the used length says how much was written.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use super::device::{QueueAccess, VirtioDevice};
use super::errors::RequestError;

/// Queue size offered.
pub const RNG_QUEUE_SIZE: u16 = 64;
/// Most bytes written per request.
pub const RNG_MAX_REQUEST: usize = 64 << 10;

/// Saved state: the device has none beyond a counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Random bytes handed to the guest so far.
    pub bytes_served: u64,
}

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    name: String,
    bytes_served: u64,
}

impl Rng {
    /// A device named `name` (for logs and errors).
    pub fn new(name: &str) -> Self {
        Self {
            name: format!("virtio-rng {name}"),
            bytes_served: 0,
        }
    }

    /// A device continuing from `state`.
    pub fn restore(name: &str, state: &RngState) -> Self {
        Self {
            bytes_served: state.bytes_served,
            ..Self::new(name)
        }
    }

    /// Random bytes handed to the guest so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served
    }
}

impl VirtioDevice for Rng {
    type State = RngState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(&mut self, queue: &mut QueueAccess<'_>) -> Result<(), RequestError> {
        let mut buf = vec![0u8; 4096];
        while let Some(chain) = queue.next_chain()? {
            if let Some(first) = chain.readable.first() {
                return Err(RequestError::Direction {
                    request: "entropy",
                    head: chain.head,
                    desc: first.desc,
                    addr: first.addr,
                    found: "device-readable",
                    expected: "device-writable",
                });
            }
            let want = chain.writable_len().min(RNG_MAX_REQUEST as u64) as usize;
            let mut done = 0usize;
            while done < want {
                let n = (want - done).min(buf.len());
                if let Err(source) = fill_random(&mut buf[..n]) {
                    queue.refuse(RequestError::Io {
                        head: chain.head,
                        op: "getrandom",
                        source,
                    });
                    break;
                }
                chain.write_at(queue.mem(), done as u64, &buf[..n])?;
                done += n;
            }
            self.bytes_served += done as u64;
            queue.complete(chain.head, done as u32)?;
        }
        Ok(())
    }

    fn save(&self) -> RngState {
        RngState {
            bytes_served: self.bytes_served,
        }
    }
}

/// Fills `buf` from getrandom(2) (it blocks only until the kernel's pool
/// is initialised, long before a VM runs).
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`,
        // a live, writable host buffer.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n > 0 {
            done += n as usize;
        } else {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
    Ok(())
}
