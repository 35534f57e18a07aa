//! Clones of the captured Linux, one at a time, each in a namespace of its
//! own whose tap was prepared before the request (the source's host MAC,
//! the host address, a permanent neighbour entry), from a VM shell made
//! before the request (registered with userfaultfd for lazy memory), as a
//! warm node would. Timed: the request (the `restore_linux*` call) to the
//! first ICMP echo reply, from a raw socket made before the request.
//! Variants, interleaved in every round:
//!
//! * copy-on-write memory, the tap opened with the shell (and running)
//!   before the request ([`restore_linux_with_taps`]), probing every 1 ms;
//! * copy-on-write memory, the tap opened by the VMM during the restore
//!   ([`restore_linux`] with its name): the carrier change and the host's
//!   link-watch activation are then in the path, and probes sent before
//!   it are dropped;
//! * lazy (userfaultfd) memory, the tap opened with the shell;
//! * the headline (`linux_clone_first_echo_ms`): as the first, but one
//!   request at once and the next only 1 s later, as a client would send:
//!   the guest is emulated here, and the 1 ms probes it receives while it
//!   answers the first slow its answer (measured: p50 ~54 ms with 1 ms
//!   probes, ~12 ms with one request, the first request answered every
//!   time with the tap opened before), so both are reported, and a lost
//!   first request (+1 s) is counted.
//!
//! A clone whose first probe got no answer (the first reply answered a
//! later request) is counted, not hidden; one that answered nothing in
//! 5 s is counted and left out of the quantiles.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmstream_vmm::devices::virtio::tap::Tap;
use vmstream_vmm::linux::clone::{CloneDevices, restore_linux, restore_linux_with_taps};
use vmstream_vmm::machine::VmShell;
use vmstream_vmm::memory::LazyOptions;
use vmstream_vmm::restore::{CloneMemory, CloneSource};
use vmstream_vmm::vstate::vm::KvmHost;

use crate::config;
use crate::error::BenchError;
use crate::figures::{Figures, ms};
use crate::net::{GUEST_IP, TAP, VmNet, wait_running};
use crate::probe::Prober;

const CLONE_TIMEOUT: Duration = Duration::from_secs(5);

/// One way of starting clones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub lazy: bool,
    pub tap_opened_before: bool,
    /// One request, the next 1 s later, instead of one every `--probe-us`.
    pub single_probe: bool,
}

impl Variant {
    pub const HEADLINE: Self = Self {
        lazy: false,
        tap_opened_before: true,
        single_probe: false,
    };
    pub const TAP_AT_RESTORE: Self = Self {
        tap_opened_before: false,
        ..Self::HEADLINE
    };
    pub const LAZY: Self = Self {
        lazy: true,
        ..Self::HEADLINE
    };
    pub const SINGLE_PROBE: Self = Self {
        single_probe: true,
        ..Self::HEADLINE
    };

    fn label(self) -> String {
        format!(
            "{}{}{}",
            if self.lazy { "lazy" } else { "cow" },
            if self.tap_opened_before {
                ""
            } else {
                ", tap at restore"
            },
            if self.single_probe {
                ", single probe"
            } else {
                ""
            }
        )
    }
}

/// One clone's figures; `first_echo` is `None` when it answered nothing.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub restore: Duration,
    pub first_echo: Option<Duration>,
    pub answered_seq: Option<u16>,
}

/// Starts clone `index` of `source` the `variant` way and times it.
pub fn one(
    host: &Arc<KvmHost>,
    source: &CloneSource,
    variant: Variant,
    work: &Path,
    index: usize,
    probe: Duration,
) -> Result<Sample, BenchError> {
    let probe = if variant.single_probe {
        Duration::from_secs(1)
    } else {
        probe
    };
    let net = VmNet::prepare()?;
    let dir = work.join(format!("clone{index}"));
    let sample = net.run(|| {
        // What a warm node has ready before the request.
        let mut shell = VmShell::create(host, config())
            .map_err(BenchError::vmm("creating a clone's VM shell"))?;
        let memory = if variant.lazy {
            let options = LazyOptions::default();
            shell
                .prepare_lazy(options.clone())
                .map_err(BenchError::vmm("registering a VM shell with userfaultfd"))?;
            CloneMemory::Lazy(options)
        } else {
            CloneMemory::CopyOnWrite
        };
        let taps = if variant.tap_opened_before {
            let tap = Tap::open(TAP).map_err(BenchError::vmm(format!("opening tap {TAP}")))?;
            if !wait_running(TAP, Duration::from_secs(2))? {
                return Err(BenchError::Setup(format!(
                    "tap {TAP} did not run 2 s after it was opened"
                )));
            }
            Some(vec![tap])
        } else {
            None
        };
        let prober = Prober::new(GUEST_IP, 0x6000 + index as u16)
            .map_err(BenchError::io("opening a raw ICMP socket"))?;

        let requested = Instant::now();
        let clone = match taps {
            Some(taps) => restore_linux_with_taps(shell, source, &memory, &dir, taps),
            None => {
                let devices = CloneDevices {
                    dir: dir.clone(),
                    taps: vec![TAP.into()],
                };
                restore_linux(shell, source, &memory, &devices)
            }
        }
        .map_err(BenchError::vmm(format!("starting clone {index}")))?;
        let restore = requested.elapsed();
        let reply = prober.first_reply(probe, CLONE_TIMEOUT, || {});

        let console = String::from_utf8_lossy(&clone.machine.serial_output()).into_owned();
        if console.contains("Freeing unused kernel") || console.contains("Run /") {
            return Err(BenchError::Guest(format!(
                "clone {index} was still booting:\n{console}"
            )));
        }
        drop(clone);
        Ok(Sample {
            restore,
            first_echo: reply.map(|r| r.at - requested),
            answered_seq: reply.map(|r| r.seq),
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
    let sample = sample?;
    progress!(
        "clone {index} ({}): restore {:.2} ms, first echo {}",
        variant.label(),
        ms(sample.restore),
        match (sample.first_echo, sample.answered_seq) {
            (Some(t), Some(seq)) => format!("{:.2} ms (request {seq})", ms(t)),
            _ => "none".to_string(),
        }
    );
    Ok(sample)
}

/// The keys one variant's figures go to.
pub struct Keys<'a> {
    pub first_echo: &'a str,
    pub restore: &'a str,
    pub lost_first: &'a str,
    pub no_echo: &'a str,
}

/// Puts the figures of `samples`: first echo under `first_echo` with
/// `_p50`/`_p99` appended (answering clones only), the
/// restore call under `restore` (`_p50`, `_p99`), and the counts of clones
/// whose first probe got no answer (`lost_first`) and that answered
/// nothing (`no_echo`).
pub fn put(figures: &mut Figures, keys: &Keys<'_>, samples: &[Sample]) -> Result<(), BenchError> {
    let echoes: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.first_echo)
        .map(ms)
        .collect();
    if echoes.is_empty() {
        return Err(BenchError::Guest(format!(
            "no clone answered ping ({} started)",
            samples.len()
        )));
    }
    figures.put_summary(keys.first_echo, "", &echoes);
    let restores: Vec<f64> = samples.iter().map(|s| ms(s.restore)).collect();
    figures.put_summary(keys.restore, "", &restores);
    let lost_first = samples.iter().filter(|s| s.answered_seq != Some(0)).count();
    figures.put_count(keys.lost_first, lost_first as u64);
    figures.put_count(keys.no_echo, (samples.len() - echoes.len()) as u64);
    Ok(())
}
