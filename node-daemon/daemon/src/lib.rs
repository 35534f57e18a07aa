//! The vmstream node daemon as a library: the Kubernetes side (heartbeat
//! Lease, the per-node VMNode status object, watches of the objects placed on
//! this node) and the VM side (one process per VM, the supervisor protocol on
//! Unix sockets, re-adoption of running VMs after a daemon restart). The
//! binary `vmstream-node` wires it together; the VMM itself lives in the
//! `vmstream-vmm` crate, which has no Kubernetes dependency.

pub mod artifacts;
pub mod cgroup;
pub mod ctl;
pub mod error_chain;
pub mod heartbeat;
pub mod host;
pub mod memory_budget;
pub mod migration_actions;
pub mod node_actions;
pub mod node_status;
pub mod object_key;
pub mod page_service;
pub mod placed;
pub mod proc_stats;
pub mod state_layout;
pub mod status_patch;
pub mod supervisor;
pub mod supervisor_api;
pub mod vm_net;
pub mod vm_process;
pub mod vm_protocol;
pub mod vm_record;
