//! The source of `vmstream-linuxbench`: boots the project kernel (root on
//! virtio-blk through an overlay, `ip=` on virtio-net, virtio-rng) in a VM
//! shell made beforehand, in a namespace whose tap was prepared beforehand,
//! and times the request (`Machine::boot_linux`) to the first ICMP echo
//! reply, probing every 10 ms. Once the kernel has finished booting and
//! idles (its console says so) and the guest has answered the probes it
//! had queued, the source is captured into a live image: the clones then
//! start from an idle guest with nothing left to do.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmstream_vmm::capture::capture;
use vmstream_vmm::linux::{LinuxBootSpec, VirtioDeviceSpec};
use vmstream_vmm::machine::{Machine, VmShell};
use vmstream_vmm::vstate::run_loop::VcpuStatus;
use vmstream_vmm::vstate::vm::KvmHost;

use crate::config;
use crate::error::BenchError;
use crate::figures::{Figures, ms};
use crate::net::{GUEST_IP, GUEST_MAC, HOST_IP, TAP, VmNet, dotted};
use crate::probe::Prober;

/// What the project kernel prints once no init could run and PID 1 idles
/// (its patched `init/main.c`): the end of its boot.
const GUEST_IDLE: &str = "vmstream: no init could run; PID 1 idles";
/// How long the emulated kernel may take to boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Probe interval while the source boots.
const BOOT_PROBE: Duration = Duration::from_millis(10);

fn idle(machine: &Machine) -> bool {
    String::from_utf8_lossy(&machine.serial_output()).contains(GUEST_IDLE)
}

/// Boots the source, captures it into `work/image` and returns that
/// directory. Puts `linux_boot_to_echo_s`, `linux_boot_to_idle_s`,
/// `linux_capture_pause_ms` and `linux_capture_total_ms`.
pub fn boot_and_capture(
    host: &Arc<KvmHost>,
    linux: &Path,
    work: &Path,
    figures: &mut Figures,
) -> Result<PathBuf, BenchError> {
    let mut spec = LinuxBootSpec::new(linux.join("vmlinux"));
    spec.devices = vec![
        VirtioDeviceSpec::Block {
            image: linux.join("rootfs.ext2"),
            overlay: Some(work.join("source.overlay")),
        },
        VirtioDeviceSpec::Net {
            tap: TAP.into(),
            mac: GUEST_MAC,
        },
        VirtioDeviceSpec::Rng,
    ];
    spec.cmdline = format!(
        "root=/dev/vda ro rootwait ip={}::{}:255.255.255.0::eth0:off",
        dotted(GUEST_IP),
        dotted(HOST_IP)
    );
    let net = VmNet::prepare()?;
    let machine = net.run(|| {
        let shell = VmShell::create(host, config())
            .map_err(BenchError::vmm("creating the source's VM shell"))?;
        let prober =
            Prober::new(GUEST_IP, 0x5e00).map_err(BenchError::io("opening a raw ICMP socket"))?;
        let requested = Instant::now();
        let machine =
            Machine::boot_linux(shell, &spec).map_err(BenchError::vmm("booting Linux"))?;
        progress!("source: boot requested; probing every 10 ms");
        let mut idle_after = None;
        let mut ticks = 0u32;
        let reply = prober.first_reply(BOOT_PROBE, BOOT_TIMEOUT, || {
            ticks += 1;
            if idle_after.is_none() && ticks.is_multiple_of(5) && idle(&machine) {
                idle_after = Some(requested.elapsed());
            }
        });
        let Some(reply) = reply else {
            return Err(BenchError::Guest(format!(
                "the source answered no echo request in {BOOT_TIMEOUT:?} (vCPU {:?})",
                machine.vcpus()[0].status()
            )));
        };
        let to_echo = reply.at - requested;
        progress!(
            "source: first echo reply {:.2} s after the boot request (request {})",
            to_echo.as_secs_f64(),
            reply.seq
        );
        figures.put("linux_boot_to_echo_s", to_echo.as_secs_f64());
        while idle_after.is_none() {
            if idle(&machine) {
                idle_after = Some(requested.elapsed());
            } else if requested.elapsed() > BOOT_TIMEOUT
                || matches!(machine.vcpus()[0].status(), VcpuStatus::Exited(_))
            {
                return Err(BenchError::Guest(format!(
                    "the source never printed {GUEST_IDLE:?} (vCPU {:?})",
                    machine.vcpus()[0].status()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let to_idle = idle_after.unwrap_or_default();
        progress!(
            "source: idle {:.2} s after the request",
            to_idle.as_secs_f64()
        );
        figures.put("linux_boot_to_idle_s", to_idle.as_secs_f64());
        // The guest answers the requests it queued while booting before
        // it is captured, so no clone inherits that work.
        let drained = prober.drain(Duration::from_millis(500), Duration::from_secs(60));
        progress!("source: {drained} queued echo requests answered; capturing");
        Ok(machine)
    })?;
    let image = work.join("image");
    std::fs::create_dir(&image).map_err(BenchError::io(format!("creating {}", image.display())))?;
    let report =
        capture(&machine, &image).map_err(BenchError::vmm("capturing the running Linux"))?;
    progress!(
        "captured: source paused {:?}, total {:?}, {} non-zero pages",
        report.timings.source_paused,
        report.timings.total,
        report.pages.nonzero_pages
    );
    figures.put("linux_capture_pause_ms", ms(report.timings.source_paused));
    figures.put("linux_capture_total_ms", ms(report.timings.total));
    drop(machine);
    drop(net);
    Ok(image)
}
