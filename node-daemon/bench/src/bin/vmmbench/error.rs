//! The error of a `vmstream-vmmbench` run: what failed and on what (each
//! benchmark step maps the library's error into one of these variants).

use std::path::PathBuf;

use vmstream_vmm::capture::CaptureError;
use vmstream_vmm::machine::{BootError, PauseError, ShellCreateError};
use vmstream_vmm::memory::LazyRegisterError;
use vmstream_vmm::restore::{CloneSourceError, RestoreError};
use vmstream_vmm::vstate::vm::KvmHostError;

/// Why a benchmark run failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bad arguments: {0}")]
    Usage(String),
    #[error("cannot set the CPU affinity of the benchmark thread: {0}")]
    Pin(#[source] std::io::Error),
    #[error("/dev/kvm is missing or not accessible read-write (needs root or the kvm group)")]
    KvmMissing,
    #[error("KVM is not usable on this host")]
    Kvm(#[source] KvmHostError),
    #[error("{0}")]
    Userfaultfd(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create a {mib} MiB VM shell")]
    Shell {
        mib: usize,
        #[source]
        source: ShellCreateError,
    },
    #[error("cannot register a {mib} MiB VM shell with userfaultfd")]
    PrepareLazy {
        mib: usize,
        #[source]
        source: LazyRegisterError,
    },
    #[error("cannot boot the memory guest")]
    Boot(#[from] BootError),
    #[error("cannot pause a VM")]
    Pause(#[from] PauseError),
    #[error("cannot open the live image {dir}")]
    Open {
        dir: PathBuf,
        #[source]
        source: CloneSourceError,
    },
    #[error("cannot start a clone of {dir}")]
    Restore {
        dir: PathBuf,
        #[source]
        source: RestoreError,
    },
    #[error("cannot capture a VM into {dir}")]
    Capture {
        dir: PathBuf,
        #[source]
        source: CaptureError,
    },
    #[error("guest misbehaved: {0}")]
    Guest(String),
    #[error("clone child process: {0}")]
    Child(String),
}

impl BenchError {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
