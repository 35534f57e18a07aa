//! vmstream's page streaming between node daemons: the wire format
//! ([`wire`], [`framing`]), peer authentication ([`auth`]), the page server
//! ([`server`]), the node image cache ([`cache`]) and the remote page source
//! that lazy guest memory reads through ([`client`]). No Kubernetes
//! dependency. The protocol is described in `docs/PAGE-STREAMING.md`.

pub mod auth;
pub mod cache;
pub mod client;
pub mod framing;
pub mod netns;
pub mod server;
pub mod wire;

pub use auth::ClusterToken;
pub use cache::{CacheStats, NodeImageCache};
pub use client::{RemoteConfig, RemotePages, RemoteStats};
pub use server::{PageServer, ServedImage, ServerOptions, ServerStats};
