//! Watches of the objects the operator placed on this node: LiveImages,
//! VMClones and VMMigrations labelled `vmstream.io/node=<node>`, and the
//! VMMigrations of VMs leaving it (`vmstream.io/source-node=<node>`). The
//! daemon never lists or watches objects of other nodes.

use std::sync::Arc;

use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;
use vmstream_api::v1alpha1::{LiveImage, VMClone, VMMigration};

/// The label selector selecting the objects placed on `node`.
pub fn node_selector(node: &str) -> String {
    format!("{}={node}", vmstream_api::NODE_LABEL)
}

/// Local caches of the objects placed on this node.
#[derive(Clone)]
pub struct PlacedObjects {
    pub images: Store<LiveImage>,
    pub clones: Store<VMClone>,
    pub migrations: Store<VMMigration>,
    /// Notified on every watch event, so the node acts at once instead of
    /// at its next periodic sync.
    pub changed: Arc<Notify>,
}

/// Starts the three label-filtered watches; they run until the runtime stops.
pub fn watch(client: &kube::Client, node: &str) -> PlacedObjects {
    let config = watcher::Config::default().labels(&node_selector(node));
    let changed = Arc::new(Notify::new());
    PlacedObjects {
        images: spawn_reflector(
            Api::<LiveImage>::all(client.clone()),
            config.clone(),
            changed.clone(),
        ),
        clones: spawn_reflector(
            Api::<VMClone>::all(client.clone()),
            config.clone(),
            changed.clone(),
        ),
        migrations: spawn_reflector(
            Api::<VMMigration>::all(client.clone()),
            config,
            changed.clone(),
        ),
        changed,
    }
}

/// The label selector selecting the migrations of VMs leaving `node`.
pub fn source_selector(node: &str) -> String {
    format!("{}={node}", vmstream_api::SOURCE_NODE_LABEL)
}

/// Watches the VMMigrations whose VM leaves this node.
pub fn watch_source_migrations(client: &kube::Client, node: &str) -> Store<VMMigration> {
    let config = watcher::Config::default().labels(&source_selector(node));
    // Migrations are acted on by their own periodic loop.
    spawn_reflector(
        Api::<VMMigration>::all(client.clone()),
        config,
        Arc::new(Notify::new()),
    )
}

fn spawn_reflector<K>(api: Api<K>, config: watcher::Config, changed: Arc<Notify>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config))
        .default_backoff()
        .applied_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(obj) => {
                    tracing::debug!(kind = %K::kind(&()), name = ?obj.meta().name, "placed object changed");
                    changed.notify_one();
                }
                Err(e) => tracing::warn!(kind = %K::kind(&()), error = %e, "watch error"),
            }
        }
    });
    reader
}

#[cfg(test)]
mod tests {
    #[test]
    fn selector_names_the_node_label() {
        assert_eq!(super::node_selector("n1"), "vmstream.io/node=n1");
    }
}
