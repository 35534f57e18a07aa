//! The vmstream operator: decides where VMs run and how many there are, and
//! writes those decisions into the API server for the node daemons to carry
//! out. Pure decisions live in [`decide`]; everything else is I/O around them.

pub mod cluster;
pub mod config;
pub mod controllers;
pub mod decide;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod run;
pub mod view;
