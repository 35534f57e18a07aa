//! The reconcilers, one module per kind, and what they share: the
//! [`Context`] (client, events, metrics, caches), the error policy with
//! per-object backoff, and the controllers' wiring. The typed merge patches
//! they write with are in [`patch`].

pub mod clonepool;
pub mod liveimage;
pub mod patch;
pub mod translate;
pub mod vmautoscaler;
pub mod vmclone;
pub mod vmmigration;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::DynamicObject;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use vmstream_api::v1alpha1::{ClonePool, LiveImage, VMAutoscaler, VMClone, VMMigration};

use crate::config::OperatorConfig;
use crate::error::ReconcileError;
use crate::metrics::OperatorMetrics;
use crate::view::ClusterView;

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "vmstream-operator";

/// What every reconcile pass gets.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<OperatorMetrics>,
    pub config: OperatorConfig,
    /// Consecutive failures per object, for the error backoff.
    failures: Mutex<HashMap<ObjectRef<DynamicObject>, u32>>,
    /// When each periodic object (VMAutoscaler) was last evaluated, by
    /// object and generation.
    last_pass: Mutex<HashMap<(ObjectRef<DynamicObject>, i64), Instant>>,
    /// When the operator last wrote each object's status (see
    /// [`Context::status_write_wait`]).
    last_status_write: Mutex<HashMap<ObjectRef<DynamicObject>, Instant>>,
    /// Held from reading node facts to writing the chosen node (and its
    /// reservation), so two concurrent reconciles never both count the same
    /// free memory.
    pub placement_lock: tokio::sync::Mutex<()>,
    /// Reflector caches of nodes, heartbeats, images, clones, migrations.
    pub view: ClusterView,
}

impl Context {
    /// The context, with the watches of its [`ClusterView`] started (call
    /// [`ClusterView::ready`] before deciding anything).
    pub fn new(client: Client, metrics: Arc<OperatorMetrics>, config: OperatorConfig) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(config.identity()),
        };
        Self {
            view: ClusterView::start(&client, &config.namespace, config.heartbeat_timeout),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            config,
            failures: Mutex::new(HashMap::new()),
            last_pass: Mutex::new(HashMap::new()),
            last_status_write: Mutex::new(HashMap::new()),
            placement_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Publish an event about `obj`; a failure to publish is only logged.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(%err, reason, "publishing event failed");
        }
    }

    /// For objects evaluated on a period: `None` when a pass is due now
    /// (and records it), else how long until it is. Status writes wake the
    /// controller too; this keeps them from turning into extra passes.
    pub fn pass_due<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        every: Duration,
    ) -> Option<Duration> {
        let key = (identity(obj), obj.meta().generation.unwrap_or(0));
        let mut map = self.last_pass.lock().ok()?;
        let now = Instant::now();
        if let Some(last) = map.get(&key) {
            let since = now.duration_since(*last);
            if since < every {
                return Some(every - since);
            }
        }
        map.insert(key, now);
        None
    }

    /// `None` when a status write for `obj` may go now, else how long
    /// until `spacing` has passed since the last one.
    pub fn status_write_wait<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        spacing: Duration,
    ) -> Option<Duration> {
        let map = self.last_status_write.lock().ok()?;
        let since = map.get(&identity(obj))?.elapsed();
        (since < spacing).then(|| spacing - since)
    }

    /// Records a status write for [`Context::status_write_wait`].
    pub fn status_written<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        if let Ok(mut map) = self.last_status_write.lock() {
            map.insert(identity(obj), Instant::now());
        }
    }

    /// Count a successful pass and reset the object's backoff.
    pub fn succeeded<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        self.metrics.reconciled(&K::kind(&()));
        if let Ok(mut f) = self.failures.lock() {
            f.remove(&identity(obj));
        }
    }

    /// Next retry delay for a failing object: 0.5 s doubling to 60 s;
    /// resourceVersion conflicts retry after 0.2 s.
    fn backoff<K: Resource<DynamicType = ()>>(&self, obj: &K, err: &ReconcileError) -> Duration {
        if err.is_conflict() {
            return Duration::from_millis(200);
        }
        let n = self.failures.lock().map_or(0, |mut f| {
            let n = f.entry(identity(obj)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        });
        Duration::from_millis(500)
            .saturating_mul(1 << n.min(8).saturating_sub(1))
            .min(Duration::from_secs(60))
    }
}

/// `obj`'s identity across kinds, for the per-object bookkeeping.
fn identity<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectRef<DynamicObject> {
    ObjectRef::from_obj(obj).erase()
}

/// Shared error policy: count the error by kind and variant, retry with backoff.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    let kind = K::kind(&());
    ctx.metrics.failed(&kind, err.variant());
    let delay = ctx.backoff(obj.as_ref(), err);
    tracing::warn!(
        %kind,
        name = obj.meta().name.as_deref().unwrap_or_default(),
        error = %err,
        cause = ?std::error::Error::source(err).map(ToString::to_string),
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// The current time as a `metav1.Time`.
pub fn now_time() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
}

/// All namespaces, or only `namespace`.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Run every controller (until the process ends: a replica that stops
/// leading exits rather than winding down, so it never writes after).
pub async fn run_controllers(ctx: Arc<Context>) {
    let synced = Instant::now();
    ctx.view.ready().await;
    tracing::info!(took = ?synced.elapsed(), "cluster view synced");
    let client = ctx.client.clone();
    let wc = watcher::Config::default;
    let scope = ctx.config.watch_namespace.clone();

    let pools = Controller::new(scoped::<ClonePool>(&client, scope.as_deref()), wc())
        .owns(scoped::<VMClone>(&client, scope.as_deref()), wc())
        .run(clonepool::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let clones = Controller::new(scoped::<VMClone>(&client, scope.as_deref()), wc())
        .run(vmclone::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let images = Controller::new(scoped::<LiveImage>(&client, scope.as_deref()), wc())
        .watches(
            scoped::<VMClone>(&client, scope.as_deref()),
            wc(),
            |clone| {
                let ns = clone.namespace()?;
                Some(ObjectRef::<LiveImage>::new(&clone.spec.live_image).within(&ns))
            },
        )
        .run(liveimage::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let migrations = Controller::new(scoped::<VMMigration>(&client, scope.as_deref()), wc())
        .run(vmmigration::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let autoscalers = Controller::new(scoped::<VMAutoscaler>(&client, scope.as_deref()), wc())
        .run(vmautoscaler::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    tokio::join!(pools, clones, images, migrations, autoscalers);
}
