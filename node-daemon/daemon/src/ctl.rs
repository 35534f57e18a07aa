//! `vmstream-node ctl`: a small command line for humans and tests over the
//! supervisor API — list, stats, pause, resume, stop, capture, request,
//! launch and start. Each command becomes one [`SupervisorRequest`]; the
//! reply is printed as JSON.

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use vmstream_vmm::guests::GuestProgram;
use vmstream_vmm::image::StateFile;

use crate::object_key::ObjectKey;
use crate::supervisor::VmLaunch;
use crate::supervisor_api::SupervisorRequest;
use crate::vm_protocol::{CloneBackend, Request, StartSpec};

/// A micro guest, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuestArg {
    Counter,
    Memory,
    Request,
}

impl From<GuestArg> for GuestProgram {
    fn from(g: GuestArg) -> Self {
        match g {
            GuestArg::Counter => GuestProgram::Counter,
            GuestArg::Memory => GuestProgram::Memory,
            GuestArg::Request => GuestProgram::Request,
        }
    }
}

/// A clone memory backend, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    Cow,
    Lazy,
}

impl From<BackendArg> for CloneBackend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Cow => CloneBackend::CopyOnWrite,
            BackendArg::Lazy => CloneBackend::Lazy,
        }
    }
}

/// What to run: a guest to boot, or an image to clone.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Boot this micro guest.
    #[arg(long, conflicts_with = "image")]
    pub guest: Option<GuestArg>,
    /// Start a clone of the live image in this directory.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Memory backend of a clone.
    #[arg(long, value_enum, default_value = "cow")]
    pub backend: BackendArg,
    /// How long a booted guest may take to report READY.
    #[arg(long, default_value_t = 60_000)]
    pub ready_timeout_ms: u64,
}

impl SourceArgs {
    /// The start spec, if a guest or an image was named.
    pub fn spec(&self) -> Option<StartSpec> {
        if let Some(guest) = self.guest {
            return Some(StartSpec::Boot {
                guest: guest.into(),
                fill: None,
                params: Vec::new(),
                ready_timeout_ms: self.ready_timeout_ms,
            });
        }
        self.image.as_ref().map(|image| StartSpec::Clone {
            image: image.clone(),
            backend: self.backend.into(),
            network: None,
        })
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// List the node's VMs.
    List,
    /// Usage counters of a VM.
    Stats {
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Stop a VM: its process, socket and directory go away.
    Stop {
        id: String,
    },
    /// Capture a running VM into a live image in DIR.
    Capture {
        id: String,
        dir: PathBuf,
    },
    /// Ask a request guest to answer N.
    Request {
        id: String,
        n: u64,
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
    /// Start a VM process (a warm shell unless --guest or --image is given
    /// without --warm).
    Launch {
        id: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Guest memory (taken from the image when --image is given).
        #[arg(long, default_value_t = 16)]
        memory_mib: u64,
        #[command(flatten)]
        source: SourceArgs,
        /// Create the shell only (preloading --image if given) and wait
        /// for `start`.
        #[arg(long)]
        warm: bool,
        /// Register guest RAM with userfaultfd in the warm shell.
        #[arg(long)]
        prepare_lazy: bool,
        /// Owning object, `Kind/namespace/name`.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Start a warm VM.
    Start {
        id: String,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Scan the state directory for VMs again.
    Adopt,
}

/// Errors turning a command into a request.
#[derive(Debug, thiserror::Error)]
pub enum CtlCommandError {
    #[error("cannot read the live image header in {0}")]
    Image(PathBuf, #[source] vmstream_vmm::image::ImageOpenError),
    #[error("start needs --guest or --image")]
    NoSource,
    #[error("--owner must be Kind/namespace/name, got {0:?}")]
    Owner(String),
    #[error("the image in {0} has {1} vCPUs, more than 255")]
    Vcpus(PathBuf, u32),
}

/// Parses `Kind/namespace/name`.
pub fn parse_owner(text: &str) -> Option<ObjectKey> {
    text.parse().ok()
}

fn vm(id: String, request: Request) -> SupervisorRequest {
    SupervisorRequest::Vm { id, request }
}

/// The supervisor request of a command.
pub fn request_of(command: CtlCommand) -> Result<SupervisorRequest, CtlCommandError> {
    Ok(match command {
        CtlCommand::List => SupervisorRequest::List,
        CtlCommand::Adopt => SupervisorRequest::Adopt,
        CtlCommand::Stats { id } => vm(id, Request::Stats),
        CtlCommand::Pause { id } => vm(id, Request::Pause),
        CtlCommand::Resume { id } => vm(id, Request::Resume),
        CtlCommand::Stop { id } => vm(id, Request::Stop),
        CtlCommand::Capture { id, dir } => vm(id, Request::Capture { dir }),
        CtlCommand::Request { id, n, timeout_ms } => vm(
            id,
            Request::Mailbox {
                request: n,
                timeout_ms,
            },
        ),
        CtlCommand::Start { id, source } => vm(
            id,
            Request::Start {
                spec: source.spec().ok_or(CtlCommandError::NoSource)?,
            },
        ),
        CtlCommand::Launch {
            id,
            vcpus,
            memory_mib,
            source,
            warm,
            prepare_lazy,
            owner,
        } => {
            let owner = match owner {
                Some(text) => Some(parse_owner(&text).ok_or(CtlCommandError::Owner(text))?),
                None => None,
            };
            let (vcpus, memory_bytes) = match &source.image {
                Some(dir) => {
                    let header =
                        StateFile::read(dir).map_err(|e| CtlCommandError::Image(dir.clone(), e))?;
                    let vcpus = u8::try_from(header.vcpu_count)
                        .map_err(|_| CtlCommandError::Vcpus(dir.clone(), header.vcpu_count))?;
                    (vcpus, header.memory_size)
                }
                None => (vcpus, memory_mib << 20),
            };
            let spec = source.spec();
            SupervisorRequest::Launch {
                launch: VmLaunch {
                    id,
                    owner,
                    vcpus,
                    memory_bytes,
                    start: if warm { None } else { spec },
                    prepare_lazy: prepare_lazy
                        || (warm && source.image.is_some() && source.backend == BackendArg::Lazy),
                    preload_image: if warm { source.image.clone() } else { None },
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(guest: Option<GuestArg>, image: Option<&str>) -> SourceArgs {
        SourceArgs {
            guest,
            image: image.map(PathBuf::from),
            backend: BackendArg::Lazy,
            ready_timeout_ms: 5,
        }
    }

    #[test]
    fn commands_become_requests() {
        let r = request_of(CtlCommand::Request {
            id: "a".into(),
            n: 3,
            timeout_ms: None,
        })
        .unwrap();
        assert_eq!(
            r,
            vm(
                "a".into(),
                Request::Mailbox {
                    request: 3,
                    timeout_ms: None
                }
            )
        );
        let launch = request_of(CtlCommand::Launch {
            id: "b".into(),
            vcpus: 1,
            memory_mib: 16,
            source: source(Some(GuestArg::Request), None),
            warm: false,
            prepare_lazy: false,
            owner: Some("VMClone/ns/b".into()),
        })
        .unwrap();
        let SupervisorRequest::Launch { launch } = launch else {
            panic!("{launch:?}")
        };
        assert_eq!(launch.memory_bytes, 16 << 20);
        assert!(matches!(launch.start, Some(StartSpec::Boot { .. })));
        assert_eq!(launch.owner.unwrap().name, "b");
        assert!(matches!(
            request_of(CtlCommand::Start {
                id: "c".into(),
                source: source(None, None)
            }),
            Err(CtlCommandError::NoSource)
        ));
        assert!(matches!(
            request_of(CtlCommand::Launch {
                id: "d".into(),
                vcpus: 1,
                memory_mib: 16,
                source: source(None, Some("/nonexistent")),
                warm: true,
                prepare_lazy: false,
                owner: None,
            }),
            Err(CtlCommandError::Image(..))
        ));
    }

    #[test]
    fn owners() {
        assert_eq!(parse_owner("VMClone/ns/n").unwrap().namespace, "ns");
        assert!(parse_owner("VMClone/ns").is_none());
        assert!(parse_owner("//n").is_none());
    }
}
