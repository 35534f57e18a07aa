//! The `vmstream.io/v1alpha1` kinds, one file per kind, plus the types they share.

// Repeated `printcolumn(type_ = ...)` and `validation = ...` entries inside the
// kube/x_kube derive attributes are separate columns and rules, not duplicates.
#![allow(clippy::duplicated_attributes)]

mod clonepool;
mod liveimage;
mod shared;
mod vmautoscaler;
mod vmclone;
mod vmmigration;
mod vmnode;

pub use clonepool::*;
pub use liveimage::*;
pub use shared::*;
pub use vmautoscaler::*;
pub use vmclone::*;
pub use vmmigration::*;
pub use vmnode::*;
