//! The controller: the model (in memory, written through to the database), what each
//! node last reported, and one reconciler thread per node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tandem_api::{
    ApiError, NodeName, NodeState, PoolInfo, ReplicaReport, SnapshotName, VolumeName, VolumeSpec,
};

use crate::model::{Model, Part};
use crate::node_client::NodeClient;
use crate::store::{Store, StoreError, Writer};

/// How often each node is visited when nothing changes.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);

/// What a node last reported.
#[derive(Debug, Clone)]
pub struct Observed {
    pub state: NodeState,
    pub version: Option<String>,
    /// Why the node is not Online, or what failed in its last visit.
    pub error: Option<String>,
    pub pools: Vec<PoolInfo>,
    /// Its replicated volumes; empty while it is not Online.
    pub replicas: BTreeMap<VolumeName, ReplicaReport>,
    /// Volumes whose desired state the node refused, and why.
    pub failures: BTreeMap<VolumeName, String>,
    /// Volumes it holds that the controller has no record of (neither wanted nor
    /// deleted): left alone until adopted or deleted by an operator.
    pub orphans: BTreeMap<VolumeName, VolumeSpec>,
    /// Events from the node applied so far (see `follow`): a visit whose report may
    /// be older than one of them looks again.
    pub events: u64,
}

impl Default for Observed {
    fn default() -> Self {
        Observed {
            state: NodeState::Connecting,
            version: None,
            error: None,
            pools: Vec::new(),
            replicas: BTreeMap::new(),
            failures: BTreeMap::new(),
            orphans: BTreeMap::new(),
            events: 0,
        }
    }
}

impl Observed {
    pub fn online(&self) -> bool {
        self.state == NodeState::Online
    }
}

/// Why a request was refused: the HTTP status class and the error the user sees.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub error: ApiError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    BadRequest,
    NotFound,
    Conflict,
    /// A node the request needs did not answer.
    Unreachable,
    /// This controller no longer serves changes (it lost its database volume's quorum,
    /// or was stopped): another candidate takes over.
    Unavailable,
    Internal,
}

impl Refusal {
    pub fn new(
        kind: RefusalKind,
        message: impl Into<String>,
        correction: impl Into<String>,
    ) -> Self {
        Refusal {
            kind,
            error: ApiError {
                message: message.into(),
                cause: None,
                correction: Some(correction.into()),
            },
        }
    }

    pub fn with_cause(mut self, cause: impl ToString) -> Self {
        self.error.cause = Some(cause.to_string());
        self
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        if let StoreError::Fenced(why) = &e {
            return Refusal::new(
                RefusalKind::Unavailable,
                format!("no controller: the one on this node stopped ({why}); nothing was changed"),
                "retry in a few seconds: another controller candidate takes over",
            );
        }
        tracing::error!(error = %e, "controller database write failed");
        Refusal::new(
            RefusalKind::Internal,
            "cannot write the controller database; nothing was changed",
            "check the data directory of the controller node (space, permissions)",
        )
        .with_cause(e)
    }
}

pub(crate) struct Desired {
    pub store: Store,
    pub model: Model,
}

/// Wakes reconcilers when the desired state changes.
#[derive(Default)]
struct Wake {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Wake {
    fn notify(&self) {
        *self.generation.lock().unwrap() += 1;
        self.changed.notify_all();
    }

    /// Waits until a change newer than `seen` or the timeout; returns the newest.
    fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.generation.lock().unwrap();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |g| *g == seen)
            .unwrap();
        *guard
    }
}

/// Records deletions in the database, then in the model.
fn persist_deletions(d: &mut Desired, parts: &[Part]) -> Result<(), StoreError> {
    if parts.is_empty() {
        return Ok(());
    }
    d.store
        .write(|w| parts.iter().try_for_each(|p| w.deletion(p)))?;
    d.model.deletions.extend(parts.iter().cloned());
    Ok(())
}

pub struct Controller {
    pub(crate) desired: Mutex<Desired>,
    pub(crate) observed: RwLock<BTreeMap<NodeName, Observed>>,
    wake: Wake,
    /// Stop flags of the reconciler threads, by node.
    reconcilers: Mutex<BTreeMap<NodeName, Arc<AtomicBool>>>,
    /// The node this controller runs on.
    pub(crate) host: NodeName,
    /// Its data directory (the database, its backups).
    pub(crate) data_dir: std::path::PathBuf,
    /// How long visits of nodes take.
    pub(crate) reconcile_seconds: tandem_metrics::Latency,
    /// Set once the controller stops: its threads end, its database takes no writes.
    stopped: AtomicBool,
    /// Snapshots being taken, until recorded: a node already holds them, no record
    /// names them yet (see [`Controller::stray_snapshots`]).
    pub(crate) taking: Mutex<BTreeSet<(VolumeName, SnapshotName)>>,
}

impl Controller {
    /// Starts on the database `store` (on the system volume `system`, as the node that
    /// is its Primary sees it) and reconciles every known node. The host's own node
    /// (`host` at API address `host_api`) is registered on first start; `data_dir`
    /// keeps the backups.
    pub fn start(
        mut store: Store,
        data_dir: &Path,
        host: NodeName,
        host_api: String,
        system: &VolumeSpec,
    ) -> Result<Arc<Controller>, StoreError> {
        let epoch = store.raise_epoch()?;
        let mut model = store.load()?;
        if model.nodes.is_empty() {
            let row = crate::model::NodeRow {
                address: host_api,
                peer_address: String::new(),
            };
            store.write(|w| w.node(&host, &row))?;
            model.nodes.insert(host.clone(), row);
            tracing::info!(node = %host, "controller's own node registered");
        }
        if let Some((group, row)) = crate::system::adopt(&model, system) {
            store.write(|w| {
                w.group(&group)?;
                w.volume(&system.name, &row)
            })?;
            model.groups.insert(group.name.clone(), group);
            model.volumes.insert(system.name.clone(), row);
            tracing::info!(volume = %system.name, "system volume recorded in the model");
        }
        tracing::info!(cluster = %model.cluster.id, epoch,
            nodes = model.nodes.len(), volumes = model.volumes.len(), "controller started");
        let nodes: Vec<NodeName> = model.nodes.keys().cloned().collect();
        let controller = Arc::new(Controller {
            desired: Mutex::new(Desired { store, model }),
            observed: RwLock::default(),
            wake: Wake::default(),
            reconcilers: Mutex::default(),
            host,
            data_dir: data_dir.to_path_buf(),
            reconcile_seconds: tandem_metrics::Latency::default(),
            stopped: AtomicBool::new(false),
            taking: Mutex::default(),
        });
        for node in nodes {
            controller.reconcile(node);
        }
        controller.start_backups();
        Ok(controller)
    }

    /// Stops the controller for good: its database takes no more writes (a request in
    /// flight gets "no controller"), its reconcilers and backups end.
    pub fn stop(&self, why: &str) {
        self.desired().store.fence(why);
        self.stopped.store(true, Ordering::SeqCst);
        for (_, stop) in std::mem::take(&mut *self.reconcilers.lock().unwrap()) {
            stop.store(true, Ordering::Relaxed);
        }
        self.wake.notify();
        tracing::warn!(why, "controller stopped");
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Counts changes of the desired state.
    pub(crate) fn generation(&self) -> u64 {
        *self.wake.generation.lock().unwrap()
    }

    /// Waits for a change after `seen` (or the timeout); the newest generation.
    pub(crate) fn wait_change(&self, seen: u64, timeout: Duration) -> u64 {
        self.wake.wait(seen, timeout)
    }

    pub(crate) fn desired(&self) -> MutexGuard<'_, Desired> {
        self.desired.lock().unwrap()
    }

    /// Writes a change to the database, then applies it to the model, then wakes the
    /// reconcilers: the model never holds what the database does not.
    ///
    /// The parts of volumes on nodes that the change removes (a volume deleted, a
    /// replica moved off a node) are recorded as deletions in the same transaction:
    /// nodes drop a volume only on such a record, and a controller killed at any
    /// moment leaves either the change with its records or neither.
    pub(crate) fn commit(
        &self,
        d: &mut Desired,
        persist: impl FnOnce(&Writer<'_>) -> Result<(), StoreError>,
        apply: impl FnOnce(&mut Model),
    ) -> Result<(), Refusal> {
        let mut next = d.model.clone();
        apply(&mut next);
        // Every volume the change touched gets the next revision, in the same
        // transaction (the change itself wrote its rows with the revision they had).
        let mut revised = Vec::new();
        for (name, v) in next.volumes.iter_mut() {
            let old = d.model.volumes.get(name);
            if old.is_none_or(|o| o != v) {
                v.revision = old.map_or(v.revision, |o| o.revision) + 1;
                revised.push((name.clone(), v.revision));
            }
        }
        let gone: Vec<Part> = (d.model.parts())
            .difference(&next.parts())
            .filter(|p| next.nodes.contains_key(&p.node))
            .cloned()
            .collect();
        d.store.write(|w| {
            persist(w)?;
            (revised.iter()).try_for_each(|(name, revision)| w.revision(name, *revision))?;
            gone.iter().try_for_each(|p| w.deletion(p))
        })?;
        next.deletions.extend(gone);
        d.model = next;
        self.wake.notify();
        Ok(())
    }

    /// Has nodes delete parts of volumes the model does not hold (orphans).
    pub(crate) fn record_deletions(&self, parts: &[Part]) -> Result<(), Refusal> {
        let mut d = self.desired();
        persist_deletions(&mut d, parts)?;
        drop(d);
        self.wake.notify();
        Ok(())
    }

    /// Drops deletion records a node has carried out.
    pub(crate) fn forget_deletions(&self, done: &[Part]) {
        if done.is_empty() {
            return;
        }
        let mut d = self.desired();
        match d
            .store
            .write(|w| done.iter().try_for_each(|p| w.drop_deletion(p)))
        {
            Ok(()) => {
                for p in done {
                    d.model.deletions.remove(p);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot drop deletions carried out; kept for now"),
        }
    }

    pub(crate) fn client(&self, node: &NodeName) -> Option<NodeClient> {
        let d = self.desired();
        let row = d.model.nodes.get(node)?;
        Some(NodeClient::new(&row.address, d.model.caller(&self.host)))
    }

    pub(crate) fn observed(&self, node: &NodeName) -> Observed {
        self.observed
            .read()
            .unwrap()
            .get(node)
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn set_observed(&self, node: &NodeName, update: impl FnOnce(&mut Observed)) {
        let mut all = self.observed.write().unwrap();
        update(all.entry(node.clone()).or_default());
    }

    /// Starts the reconciler thread of a node.
    pub(crate) fn reconcile(self: &Arc<Self>, node: NodeName) {
        if self.stopped() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(old) = self
            .reconcilers
            .lock()
            .unwrap()
            .insert(node.clone(), stop.clone())
        {
            old.store(true, Ordering::Relaxed);
        }
        self.follow(node.clone(), stop.clone());
        let controller = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name(format!("reconcile-{node}"))
            .spawn(move || {
                let mut seen = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Some(c) = controller.upgrade() else {
                        return;
                    };
                    let started = std::time::Instant::now();
                    crate::reconcile::visit(&c, &node);
                    c.reconcile_seconds.observe(started.elapsed());
                    seen = c.wake.wait(seen, RECONCILE_EVERY);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a reconciler thread");
        }
    }

    /// Makes every reconciler visit its node now.
    pub(crate) fn wake_reconcilers(&self) {
        self.wake.notify();
    }

    /// Stops reconciling a node and forgets what it reported.
    pub(crate) fn forget(&self, node: &NodeName) {
        if let Some(stop) = self.reconcilers.lock().unwrap().remove(node) {
            stop.store(true, Ordering::Relaxed);
        }
        self.observed.write().unwrap().remove(node);
        self.wake.notify();
    }
}
