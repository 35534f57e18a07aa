//! Pure decision logic of the operator: no I/O, no API types, unit-tested
//! directly. Reconcilers gather facts, call these, and write the outcome.

pub mod autoscale;
pub mod drain;
pub mod phase;
pub mod placement;
pub mod scale_in;
