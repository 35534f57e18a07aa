//! vmstream node daemon.
fn main() {}
