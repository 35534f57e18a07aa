//! ICMP echo probing for `vmstream-linuxbench`: a raw socket of the calling
//! thread's network namespace that sends an echo request to the guest every
//! `interval` (seq 0, 1, ...) and returns the first reply, so the first-echo
//! figures are not quantised by a slow probe. The socket is made before the
//! timed request.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The first reply: which request it answered (0 = the first sent) and
/// when it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    pub seq: u16,
    pub at: Instant,
}

/// A raw ICMP socket aimed at one guest address.
pub struct Prober {
    socket: OwnedFd,
    dst: [u8; 4],
    id: u16,
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Prober {
    /// Opens the socket in the calling thread's namespace; `id` tells this
    /// probe's replies from earlier ones.
    pub fn new(dst: [u8; 4], id: u16) -> std::io::Result<Self> {
        // SAFETY: plain socket creation; the result is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { socket, dst, id })
    }

    fn send(&self, seq: u16) {
        let mut packet = [8u8, 0, 0, 0, 0, 0, 0, 0, b'v', b'm', b's', b't', 0, 0, 0, 0];
        packet[4..6].copy_from_slice(&self.id.to_be_bytes());
        packet[6..8].copy_from_slice(&seq.to_be_bytes());
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(self.dst),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sends `packet` to `addr`, both live locals of the sizes
        // given. A failed send (e.g. the tap not running yet) is a lost
        // probe, which the figures account for.
        unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
    }

    /// Waits up to `wait` for the socket to become readable.
    fn wait_readable(&self, wait: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one live pollfd and a live timespec; no signal mask.
        unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    }

    /// The seq of an echo reply of ours waiting on the socket, if any
    /// (other packets are read and dropped).
    fn receive(&self) -> Option<u16> {
        loop {
            let mut reply = [0u8; 256];
            // SAFETY: receives into a live local buffer of the size given.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    reply.as_mut_ptr().cast(),
                    reply.len(),
                    0,
                )
            };
            if n <= 0 {
                return None;
            }
            let n = n as usize;
            let header = usize::from(reply[0] & 0x0f) * 4;
            if n < header + 8 {
                continue;
            }
            let icmp = &reply[header..n];
            if reply[12..16] == self.dst && icmp[0] == 0 && icmp[4..6] == self.id.to_be_bytes() {
                return Some(u16::from_be_bytes([icmp[6], icmp[7]]));
            }
        }
    }

    /// Sends a request every `interval` until the first reply (returned) or
    /// until `timeout` has passed (`None`). `tick` runs between probes.
    pub fn first_reply(
        &self,
        interval: Duration,
        timeout: Duration,
        mut tick: impl FnMut(),
    ) -> Option<Reply> {
        let started = Instant::now();
        let mut seq: u16 = 0;
        let mut next_send = started;
        loop {
            let now = Instant::now();
            if now >= next_send {
                self.send(seq);
                seq = seq.wrapping_add(1);
                next_send += interval;
                if next_send < now {
                    next_send = now + interval;
                }
                tick();
            }
            if let Some(answered) = self.receive() {
                return Some(Reply {
                    seq: answered,
                    at: Instant::now(),
                });
            }
            if started.elapsed() >= timeout {
                return None;
            }
            self.wait_readable(next_send.saturating_duration_since(Instant::now()));
        }
    }

    /// Reads replies until none came for `quiet` (or `limit` passed):
    /// the guest has answered the requests it had queued. Returns how many
    /// replies were read.
    pub fn drain(&self, quiet: Duration, limit: Duration) -> usize {
        let started = Instant::now();
        let mut last = Instant::now();
        let mut replies = 0;
        while last.elapsed() < quiet && started.elapsed() < limit {
            self.wait_readable(Duration::from_millis(10));
            while self.receive().is_some() {
                replies += 1;
                last = Instant::now();
            }
        }
        replies
    }
}
