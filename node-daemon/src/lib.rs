//! The vmstream node daemon as a library: the Kubernetes side (heartbeat
//! Lease, the per-node VMNode status object, watches of the objects placed on
//! this node). The binary `vmstream-node` wires it together; the VMM itself
//! lives in the `vmstream-vmm` crate, which has no Kubernetes dependency.

pub mod heartbeat;
pub mod host;
pub mod node_status;
pub mod placed;
