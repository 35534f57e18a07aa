//! The operator's view of the cluster for placement and liveness: reflector
//! caches (kube-rs `reflector::Store`) of every VMNode, node heartbeat Lease,
//! LiveImage, VMClone and VMMigration, plus in-memory *reservations* for the
//! placements this operator wrote that the caches have not shown yet.
//!
//! A placement decision reads the caches (no API round trip); the
//! reservations make a placement count against its node from the moment it
//! is written until the watch delivers it, so consecutive placements never
//! spend the same free memory twice even when the watch lags. Decisions that
//! create objects (a pool's clones) still read their own objects with a
//! quorum list: a cache may lag, a duplicate clone must never happen.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use vmstream_api::HEARTBEAT_LEASE_PREFIX;
use vmstream_api::v1alpha1::{LiveImage, VMClone, VMMigration, VMNode};

use crate::cluster::{
    NodeFactsInput, ObjectKey, Reservation, Reserved, heartbeat_of, node_facts_from, settled,
};
use crate::decide::placement::{Heartbeat, NodeFacts};

/// How long a reservation counts when the caches never show its object
/// (e.g. it was deleted before the watch delivered it).
pub const RESERVATION_TTL: Duration = Duration::from_secs(30);

/// Reflector caches of what placement and liveness checks read.
pub struct ClusterView {
    pub nodes: Store<VMNode>,
    pub leases: Store<Lease>,
    pub images: Store<LiveImage>,
    pub clones: Store<VMClone>,
    pub migrations: Store<VMMigration>,
    reservations: Mutex<Vec<Reservation>>,
    /// When a Lease states no duration.
    heartbeat_fallback: Duration,
}

/// A reflector whose store is filled by a spawned task (for the life of the
/// runtime); managed fields are dropped to keep the cache small.
fn spawn_reflector<K>(api: Api<K>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|obj| {
            obj.managed_fields_mut().clear();
        })
        .reflect(writer)
        .touched_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if let Err(err) = event {
                tracing::warn!(kind = %K::kind(&()), %err, "cluster view watch error");
            }
        }
    });
    reader
}

impl ClusterView {
    /// Starts the five watches (Leases in `lease_namespace`, the rest
    /// cluster-wide: a node's memory is committed by every namespace).
    pub fn start(client: &Client, lease_namespace: &str, heartbeat_fallback: Duration) -> Self {
        Self {
            nodes: spawn_reflector(Api::all(client.clone())),
            leases: spawn_reflector(Api::namespaced(client.clone(), lease_namespace)),
            images: spawn_reflector(Api::all(client.clone())),
            clones: spawn_reflector(Api::all(client.clone())),
            migrations: spawn_reflector(Api::all(client.clone())),
            reservations: Mutex::new(Vec::new()),
            heartbeat_fallback,
        }
    }

    /// Resolves once every cache holds its initial list.
    pub async fn ready(&self) {
        let _ = tokio::join!(
            self.nodes.wait_until_ready(),
            self.leases.wait_until_ready(),
            self.images.wait_until_ready(),
            self.clones.wait_until_ready(),
            self.migrations.wait_until_ready(),
        );
    }

    /// Heartbeats of every node, by node name.
    pub fn heartbeats(&self) -> BTreeMap<String, Heartbeat> {
        self.leases
            .state()
            .iter()
            .filter_map(|l| {
                let node = l
                    .name_any()
                    .strip_prefix(HEARTBEAT_LEASE_PREFIX)?
                    .to_owned();
                Some((node, heartbeat_of(l, self.heartbeat_fallback)?))
            })
            .collect()
    }

    /// Whether `node`'s heartbeat is fresh now.
    pub fn node_alive(&self, node: &str) -> bool {
        let lease = self.leases.state().into_iter().find(|l| {
            l.name_any()
                .strip_prefix(HEARTBEAT_LEASE_PREFIX)
                .is_some_and(|n| n == node)
        });
        lease
            .and_then(|l| heartbeat_of(&l, self.heartbeat_fallback))
            .is_some_and(|h| h.is_fresh(Timestamp::now()))
    }

    /// The cached VMNode `name`.
    pub fn node(&self, name: &str) -> Option<std::sync::Arc<VMNode>> {
        self.nodes.get(&ObjectRef::new(name))
    }

    /// The cached LiveImage `namespace/name`.
    pub fn image(&self, namespace: &str, name: &str) -> Option<std::sync::Arc<LiveImage>> {
        self.images.get(&ObjectRef::new(name).within(namespace))
    }

    /// Records memory placed on `node` by a write the caches may not show
    /// yet. Call under the placement lock, right after the write.
    pub fn reserve(&self, what: Reserved, object: ObjectKey, node: &str, memory: u64) {
        let mut list = self.reservations.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|r| !(r.what == what && r.object == object));
        list.push(Reservation {
            what,
            object,
            node: node.into(),
            memory_bytes: memory,
            at: Instant::now(),
        });
    }

    /// Facts about every node from the caches plus the reservations the
    /// caches do not show yet (those they show, or that expired, are
    /// dropped). Call under the placement lock.
    pub fn node_facts(&self) -> Vec<NodeFacts> {
        let nodes = self.nodes.state();
        let images = self.images.state();
        let clones = self.clones.state();
        let migrations = self.migrations.state();
        let mut reservations = self.reservations.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        reservations.retain(|r| {
            now.duration_since(r.at) < RESERVATION_TTL && !settled(r, &images, &clones, &migrations)
        });
        node_facts_from(&NodeFactsInput {
            nodes: &nodes,
            heartbeats: &self.heartbeats(),
            images: &images,
            clones: &clones,
            migrations: &migrations,
            reserved: &reservations,
        })
    }
}
