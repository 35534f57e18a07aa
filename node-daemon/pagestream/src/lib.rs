//! vmstream's page streaming between node daemons: the frame codec it
//! shares with live migration ([`frame`]), its wire format ([`wire`],
//! [`framing`]), peer authentication ([`auth`]), the page server
//! ([`server`]), the node image cache ([`cache`]) and the remote page source
//! that lazy guest memory reads through ([`client`]), cache-less requests
//! ([`direct`]) and the read-through image a daemon serves to its own VM
//! processes ([`relay`]). No Kubernetes
//! dependency. The protocol is described in `docs/PAGE-STREAMING.md`.

pub mod auth;
pub mod cache;
pub mod client;
mod config;
pub mod connection;
pub mod direct;
pub mod frame;
pub mod framing;
pub mod netns;
mod prefetch;
pub mod relay;
pub mod server;
pub mod wire;

pub use auth::ClusterToken;
pub use cache::{CacheStats, NodeImageCache};
pub use client::{RemoteConfig, RemotePages, RemoteStats};
pub use direct::{DirectPages, fetch_state_file};
pub use relay::ReadThrough;
pub use server::{ImageDir, PageServer, ServedImage, ServerOptions, ServerStats};

/// An error and all its sources, joined with `: ` (for logs and reasons).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
