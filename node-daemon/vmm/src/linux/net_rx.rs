//! The receive side of a Linux guest's virtio-net devices: one thread per
//! device waits for its tap to become readable and then serves the receive
//! queue (the frames go into the guest's buffers and the irqfd interrupts
//! it). Transmit and buffer refills arrive as QueueNotify writes on the
//! vCPU thread. While a frame waits for receive buffers the thread only
//! sleeps: the driver's refill notification takes the frame.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::devices::virtio::VirtioMmio;
use crate::devices::virtio::net::{Net, RX_QUEUE};

/// How long a wait for the tap lasts before the stop flag is looked at.
const POLL_MS: i32 = 100;
/// Pause while a received frame waits for buffers.
const WAITING_FOR_BUFFERS: Duration = Duration::from_millis(5);

/// The receive threads of a machine's network devices; dropping this stops
/// and joins them.
#[derive(Debug, Default)]
pub struct NetRxThreads {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl NetRxThreads {
    /// Starts the receive thread of `device`.
    pub fn spawn(&mut self, device: Arc<Mutex<VirtioMmio<Net>>>) -> std::io::Result<()> {
        let stop = Arc::clone(&self.stop);
        let name = format!("net-rx{}", self.handles.len());
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || serve_rx(&device, &stop))?;
        self.handles.push(handle);
        Ok(())
    }
}

impl Drop for NetRxThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

fn serve_rx(device: &Mutex<VirtioMmio<Net>>, stop: &AtomicBool) {
    let lock = || device.lock().unwrap_or_else(|p| p.into_inner());
    let fd = lock().device().tap_fd();
    while !stop.load(Ordering::Relaxed) {
        if lock().device().rx_waiting() {
            std::thread::sleep(WAITING_FOR_BUFFERS);
            continue;
        }
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd that lives on this stack for the call; the fd
        // belongs to the tap the device owns, which outlives this thread
        // (the device is kept alive by the Arc this thread holds).
        let ready = unsafe { libc::poll(&mut poll, 1, POLL_MS) };
        if ready > 0 && poll.revents & libc::POLLIN != 0 {
            // Does nothing until the driver has the device running.
            if !lock().process_queue(RX_QUEUE) {
                std::thread::sleep(WAITING_FOR_BUFFERS);
            }
        }
    }
}
