//! vmstream's VMM and memory-streaming library: KVM micro-VMs and Linux
//! guests, live images
//! (capture and restore), and guest memory backends (anonymous, copy-on-write
//! image file, userfaultfd streaming). It has no Kubernetes dependency; the
//! node daemon wires it to the API server.

pub mod arch;
pub mod capture;
pub mod devices;
pub mod guests;
pub mod image;
pub mod linux;
pub mod machine;
pub mod memory;
pub mod restore;
pub mod vstate;
