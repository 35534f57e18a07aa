//! What a client of page servers is configured with: the image, its
//! holders, the cluster token, timeouts, retries and the bulk prefetch's
//! connections (shared by [`crate::client`] and [`crate::direct`]).

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::ClusterToken;

/// Where and how to fetch an image's pages.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The image id the holders serve it under.
    pub image_id: String,
    /// Nodes that hold the image (home first), tried in turn on failure.
    pub holders: Vec<SocketAddr>,
    /// The cluster secret.
    pub token: ClusterToken,
    /// Time to establish one TCP connection.
    pub connect_timeout: Duration,
    /// Time a peer may take to answer a request before it is taken for dead.
    pub request_timeout: Duration,
    /// Total time a fault keeps retrying before `read_pages` fails.
    pub retry_budget: Duration,
    /// First and longest wait between retries.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Bulk requests in flight at once, per bulk connection.
    pub bulk_window: usize,
    /// Bulk connections (each with its own thread) a prefetch opens. They
    /// share the work through the cache's claims; two let the receiving,
    /// checking and writing of one batch overlap another's on both ends.
    pub bulk_connections: usize,
}

impl RemoteConfig {
    /// A configuration with default timeouts.
    pub fn new(image_id: &str, holders: Vec<SocketAddr>, token: ClusterToken) -> Self {
        Self {
            image_id: image_id.to_owned(),
            holders,
            token,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            retry_budget: Duration::from_secs(120),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_secs(1),
            bulk_window: 8,
            bulk_connections: 2,
        }
    }
}
