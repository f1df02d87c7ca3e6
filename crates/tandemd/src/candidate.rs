//! A controller candidate (`tandemd --controller`): it keeps a replica of the cluster's
//! system volume (in the pool `tandem-system` of its data directory), and its promoter
//! runs the controller on whichever candidate the volume's single-Primary agreement
//! picks: when no candidate is Primary and this one sees a majority of the volume's
//! voters, it tries to become Primary; the winner opens the database on the volume and
//! starts the controller. A controller whose node loses that majority stops (its writes
//! fail at once; it stops after [`QUORUM_GRACE`], before any other candidate may take
//! over) and the volume is closed, for another to take it.
//!
//! A candidate that belongs to no cluster founds one when the first cluster request
//! reaches it (so candidates started together and then added to a cluster do not each
//! found their own). One started with `--restore-db` founds a new system volume for
//! its backup's cluster when it holds none.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use tandem_api::{ClusterId, CreatePool, DiskState, Role, VolumeSpec};
use tandem_controller::blockfile::BlockDevice;
use tandem_controller::system;
use tandem_controller::{Controller, Store};
use tandem_replication::ReplicatedVolume;

use crate::node::Node;

/// How often the promoter looks at the system volume.
const TICK: Duration = Duration::from_millis(200);
/// How long after a failed start the promoter tries again.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// How long a write or flush of the database waits for the system volume's quorum
/// before it fails, and how long the controller runs without it before it stops: a
/// replica being added counts as a vote from the moment the Primary learns of it, a
/// moment before it has connected. Shorter than the dead-peer timeout, after which
/// the other candidates may take over.
const QUORUM_GRACE: Duration = Duration::from_secs(3);

/// The replicated volume as the database's device. Writes are pipelined: each is
/// done on the local replica and sent to the peers before it returns, and the next
/// flush waits for every peer's answer to all of them (reporting the first failure)
/// before it makes them durable: between two syncs SQLite needs only to read back what
/// it wrote, which the local replica gives.
struct VolumeDevice {
    volume: Arc<ReplicatedVolume>,
    in_flight: Arc<InFlight>,
    /// A write was sent since the last flush.
    unflushed: std::sync::atomic::AtomicBool,
}

/// Writes sent and not yet answered by every peer, and the first that failed.
#[derive(Default)]
struct InFlight {
    state: Mutex<(usize, Option<io::Error>)>,
    drained: std::sync::Condvar,
}

impl InFlight {
    fn start(&self) {
        self.state.lock().unwrap().0 += 1;
    }

    fn finish(&self, result: io::Result<()>) {
        let mut s = self.state.lock().unwrap();
        s.0 -= 1;
        if let Err(e) = result {
            s.1.get_or_insert(e);
        }
        if s.0 == 0 {
            self.drained.notify_all();
        }
    }

    /// Waits until every write sent has been answered; the first failure since the
    /// last wait, if any.
    fn drain(&self) -> io::Result<()> {
        let s = self.state.lock().unwrap();
        let mut s = self.drained.wait_while(s, |s| s.0 > 0).unwrap();
        s.1.take().map_or(Ok(()), Err)
    }
}

impl VolumeDevice {
    fn await_quorum(&self) {
        let deadline = Instant::now() + QUORUM_GRACE;
        while !self.volume.has_quorum() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.volume
            .read(offset, buf)
            .inspect_err(|e| failed("read", offset, e))
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.await_quorum();
        self.unflushed.store(true, Ordering::SeqCst);
        self.in_flight.start();
        let in_flight = self.in_flight.clone();
        self.volume.write(offset, data, false, move |r| {
            if let Err(e) = &r {
                failed("write", offset, e);
            }
            in_flight.finish(r);
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.in_flight.drain()?;
        self.await_quorum();
        self.volume.flush().inspect_err(|e| failed("flush", 0, e))?;
        self.unflushed.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// With no other write since the last flush: one write with FUA, durable on every
    /// replica when they answer (one round trip instead of two).
    fn write_durable(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.unflushed.load(Ordering::SeqCst) {
            self.write_at(offset, data)?;
            return self.flush();
        }
        self.await_quorum();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.volume.write(offset, data, true, move |r| {
            let _ = tx.send(r);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("the write was dropped")))
            .inspect_err(|e| failed("durable write", offset, e))
    }
}

/// SQLite reports only "disk I/O error": the cause goes to the log.
fn failed(what: &str, offset: u64, e: &io::Error) {
    tracing::warn!(what, offset, error = %e, "system volume I/O failed under the controller database");
}

/// The controller this node runs, and what it runs on.
struct Running {
    controller: Arc<Controller>,
    routes: Router,
    volume: Arc<ReplicatedVolume>,
}

pub struct Candidate {
    node: Arc<Node>,
    data_dir: PathBuf,
    /// This node's API address, as the controller presents itself to nodes.
    api: String,
    token: Option<String>,
    running: RwLock<Option<Running>>,
    /// Held while a controller starts or stops (the promoter and a founding request).
    changing: Mutex<()>,
    /// Since when the running controller's node has lacked the system volume's quorum.
    quorum_lost: Mutex<Option<Instant>>,
}

impl Candidate {
    /// Makes the node a candidate: its system pool exists, its promoter runs.
    pub fn start(
        node: Arc<Node>,
        data_dir: &Path,
        api: String,
        token: Option<String>,
    ) -> anyhow::Result<Arc<Candidate>> {
        let pool = system::pool_name();
        if !node.pools().iter().any(|p| p.name == pool) {
            let dir = std::path::absolute(data_dir.join("system-pool"))
                .context("locating the data directory")?;
            node.create_pool(&CreatePool {
                name: pool.clone(),
                path: dir.display().to_string(),
            })
            .with_context(|| format!("creating the system pool {pool} in {}", dir.display()))?;
            tracing::info!(pool = %pool, path = %dir.display(), "system pool created: this node is a controller candidate");
        }
        let candidate = Arc::new(Candidate {
            node,
            data_dir: data_dir.to_path_buf(),
            api,
            token,
            running: RwLock::default(),
            changing: Mutex::default(),
            quorum_lost: Mutex::default(),
        });
        let weak = Arc::downgrade(&candidate);
        std::thread::Builder::new()
            .name("promoter".into())
            .spawn(move || {
                let mut retry_at = Instant::now();
                while let Some(c) = weak.upgrade() {
                    if Instant::now() >= retry_at
                        && let Err(e) = c.step()
                    {
                        tracing::error!(
                            error = format!("{e:#}"),
                            "controller not started; trying again"
                        );
                        retry_at = Instant::now() + RETRY_AFTER;
                    }
                    drop(c);
                    std::thread::sleep(TICK);
                }
            })
            .context("starting the promoter")?;
        Ok(candidate)
    }

    /// The cluster API's routes, while this node runs the controller.
    pub fn routes(&self) -> Option<Router> {
        let running = self.running.read().unwrap();
        running.as_ref().map(|r| r.routes.clone())
    }

    pub fn controller(&self) -> Option<Arc<Controller>> {
        let running = self.running.read().unwrap();
        running.as_ref().map(|r| r.controller.clone())
    }

    /// What this candidate sees of the election, for answers while no controller runs:
    /// the candidates (the participants of the system volume) and whether it reaches a
    /// majority of them.
    pub fn election(&self) -> String {
        let Some(volume) = self.node.replicated(&system::volume_name()) else {
            return "election in progress (this candidate holds no replica of the controller's database yet)".into();
        };
        let status = volume.status();
        let mut names = vec![status.node.to_string()];
        names.extend(status.peers.iter().map(|p| p.node.to_string()));
        names.sort();
        let reached = 1
            + (status.peers.iter())
                .filter(|p| p.connection == tandem_api::ConnectionState::Connected)
                .count();
        if status.quorum {
            format!("election in progress among candidates {}", names.join(","))
        } else {
            format!(
                "no quorum among candidates {} (node {} reaches {reached} of {})",
                names.join(","),
                status.node,
                names.len()
            )
        }
    }

    /// `<data-dir>/controller.db`: a database to load into the system volume (put
    /// there by `--restore-db`, or left by a release that kept it in the data dir).
    fn pending_import(&self) -> Option<PathBuf> {
        let path = self.data_dir.join("controller.db");
        path.exists().then_some(path)
    }

    /// Whether a cluster request reaching this node should found a cluster here: it
    /// belongs to none and holds no system volume.
    pub fn may_found(&self) -> bool {
        self.node.replicated(&system::volume_name()).is_none()
            && self.node.cluster_id().is_none()
            && self.routes().is_none()
    }

    /// Founds the system volume here and starts the controller on it, for a new
    /// cluster or for the cluster of the database to import.
    pub fn found(&self) -> anyhow::Result<()> {
        let _one = self.changing.lock().unwrap();
        if self.node.replicated(&system::volume_name()).is_some() {
            return Ok(()); // founded meanwhile
        }
        let cluster = match self.pending_import() {
            Some(path) => Store::cluster_of(&path)
                .with_context(|| format!("reading the database to import, {}", path.display()))?,
            None => ClusterId::random(),
        };
        let spec = system::founding_spec(cluster, self.node.name(), self.node.info().peer_address);
        self.node
            .set_spec(spec)
            .context("creating the system volume")?;
        tracing::info!(cluster = %cluster, "system volume founded on this node");
        self.promote()
    }

    /// One look at the system volume: start or stop the controller as it says.
    fn step(&self) -> anyhow::Result<()> {
        let name = system::volume_name();
        let Some(volume) = self.node.replicated(&name) else {
            // A database to restore and nothing to restore it on: found it here.
            if self.pending_import().is_some() {
                return self.found();
            }
            return Ok(());
        };
        let status = volume.status();
        if let Some(why) = self.running_without(&status) {
            self.stop(&why);
            return Ok(());
        }
        let ready = self.routes().is_none()
            && status.quorum
            && status.disk == DiskState::UpToDate
            && !status.peers.iter().any(|p| p.role == Role::Primary);
        if ready {
            let _one = self.changing.lock().unwrap();
            if self.routes().is_none() {
                return self.promote();
            }
        }
        Ok(())
    }

    /// Why the running controller must stop, if it must.
    fn running_without(&self, status: &tandem_api::VolumeStatus) -> Option<String> {
        let running = self.running.read().unwrap();
        let r = running.as_ref()?;
        let mut lost = self.quorum_lost.lock().unwrap();
        if status.quorum {
            *lost = None;
        } else if lost.get_or_insert_with(Instant::now).elapsed() >= QUORUM_GRACE {
            *lost = None;
            return Some(format!(
                "node {} lost the quorum of the system volume",
                self.node.name()
            ));
        }
        if !Arc::ptr_eq(&r.volume, &self.node.replicated(&system::volume_name())?) {
            return Some("the system volume was replaced".into());
        }
        if status.role != Role::Primary {
            // Demoted under it (its replica found behind a peer's): every write it
            // makes fails from now on.
            return Some(format!(
                "node {} is no longer Primary of the system volume",
                self.node.name()
            ));
        }
        None
    }

    /// Becomes Primary of the system volume and starts the controller on it (the
    /// caller holds `changing`).
    fn promote(&self) -> anyhow::Result<()> {
        let name = system::volume_name();
        let volume = self
            .node
            .replicated(&name)
            .context("the system volume is gone")?;
        if let Err(refused) = volume.open(true) {
            // Another candidate won, or this one lacks what it takes: not an error.
            tracing::debug!(reason = %refused.0, "not promoted");
            return Ok(());
        }
        match self.start_controller(&volume) {
            Ok(running) => {
                tracing::info!(
                    epoch = running.controller.info().epoch,
                    "controller running on this node"
                );
                *self.running.write().unwrap() = Some(running);
                Ok(())
            }
            Err(e) => {
                volume.close(true);
                Err(e)
            }
        }
    }

    fn start_controller(&self, volume: &Arc<ReplicatedVolume>) -> anyhow::Result<Running> {
        let spec: VolumeSpec = volume.spec();
        let device = Arc::new(VolumeDevice {
            volume: volume.clone(),
            in_flight: Arc::default(),
            unflushed: Default::default(),
        });
        let mut store = Store::open_on(device, spec.cluster_id)
            .context("opening the controller database on the system volume")?;
        if let Some(path) = self.pending_import() {
            self.import(&mut store, &path)?;
        }
        let controller = Controller::start(
            store,
            &self.data_dir,
            self.node.name().clone(),
            self.api.clone(),
            &spec,
        )
        .context("starting the controller")?;
        let routes = tandem_controller::router(controller.clone(), self.token.clone());
        Ok(Running {
            controller,
            routes,
            volume: volume.clone(),
        })
    }

    /// Loads a database file into the system volume's, then sets the file aside
    /// (kept, renamed): it is loaded once.
    fn import(&self, store: &mut Store, path: &Path) -> anyhow::Result<()> {
        store
            .import(path)
            .with_context(|| format!("loading {} into the system volume", path.display()))?;
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        for ext in ["", "-wal", "-shm"] {
            let from = PathBuf::from(format!("{}{ext}", path.display()));
            if from.exists() {
                let to = PathBuf::from(format!("{}.imported-{ms}{ext}", path.display()));
                std::fs::rename(&from, &to)
                    .with_context(|| format!("setting {} aside", from.display()))?;
            }
        }
        tracing::warn!(file = %path.display(), "controller database loaded into the system volume; the file is set aside");
        Ok(())
    }

    /// Stops the controller and gives up the system volume for another candidate.
    pub fn stop(&self, why: &str) {
        let _one = self.changing.lock().unwrap();
        let Some(running) = self.running.write().unwrap().take() else {
            return;
        };
        running.controller.stop(why);
        running.volume.close(true);
    }
}
