//! vmstream's live migration of a running VM between nodes. No Kubernetes
//! dependency; the node daemon wires it to VMMigration objects.
//!
//! * **Postcopy** (default): pause on the source, send vCPU/VM/device state,
//!   resume on the target at once; the target's missing pages fault to the
//!   source over their own connection (never queued behind the bulk push)
//!   while the source pushes the rest, neighbours of faulted pages first.
//! * **Precopy**: copy rounds while the VM runs until what is left fits the
//!   downtime target, then stop and copy. **Hybrid**: a few rounds, then
//!   postcopy.
//! * Only what the target lacks crosses: pages never touched since the
//!   clone started, and touched pages still equal to the live image, come
//!   from the target's own copy of the image.
//! * A link lost after the switch-over is re-established; neither side
//!   drops the VM's state meanwhile; no page is installed twice.
//!
//! ```text
//!  source                                              target
//!  ──────                                              ──────
//!  connect C, F (HMAC handshake) ───────────────────►  make shell (slots, uffd)
//!  [precopy rounds: Pages…] ────────────────────────►  install (overwrite ok)
//!  pause, save state, State ────────────────────────►  set state
//!                             ◄───────────────── Ready
//!  Go  (commit point) ──────────────────────────────►  start vCPUs
//!                             ◄─────────────── Resumed  (downtime ends)
//!  Candidates, Pages/Clean/Zero… (C)  ──────────────►  install once
//!                             ◄──── FaultRequest (F)   guest faults
//!  Pages (fault answer, F) ─────────────────────────►  install once, wake
//!  Done ────────────────────────────────────────────►
//!                             ◄────────────── Complete  (source releases)
//! ```
//!
//! Protocol and figures: `docs/MIGRATION.md`.

pub mod plan;
pub mod report;
pub mod session;
pub mod source;
mod source_link;
pub mod source_pages;
mod source_precopy;
mod source_push;
pub mod target;
pub mod target_memory;
pub mod target_vm;
pub mod wire;

pub use plan::{MigrationMode, PrecopyLimits};
pub use report::{MigrationReport, TargetSide};
pub use source::{MigrateError, SourceOptions, migrate};
pub use target::{ReceiveError, Received, TargetOptions, receive};
pub use target_vm::{TargetShell, TargetShellError};
