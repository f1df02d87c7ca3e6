//! Snapshots taken at one point of the replicated write order: a barrier in the write
//! stream, as a flush is.
//!
//! The Primary holds new writes back and waits for those in flight to be acknowledged
//! by every replica ([`IntervalLock::drain`](crate::interval::IntervalLock::drain));
//! then every replica that is UpToDate and reached begins the snapshot (the Primary's
//! own, and each peer's on a `Snapshot` message), and writes go on. Beginning is
//! instant; each replica then completes its snapshot in the background, sharing its
//! data file into it chunk by chunk, and any write first shares the chunk it changes
//! (see `tandem_pool::Volume::begin_snapshot`). The Primary waits for every replica to
//! complete (`SnapshotFill`) before it answers. So writes wait only for the drain, one
//! round trip and, each, for the chunk it touches to be shared. A replica that is not
//! reached or not UpToDate at that point does not get the snapshot.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tandem_api::{NodeId, NodeName, SnapshotMissing, SnapshotName, SnapshotTaken};
use tandem_pool::{DataFile, PoolError, Volume};

use super::{ReplicatedVolume, errno, error_from, is_up_to_date};
use crate::completion::{Completion, Outcome};
use crate::control::Event;
use crate::locks::Locked;
use crate::peer::Peer;
use crate::wire::{Buffer, Header, Kind};

/// How long a snapshot waits for the writes in flight before it gives up (a write
/// waiting for quorum to come back may hold its range indefinitely).
const DRAIN_PATIENCE: Duration = Duration::from_secs(10);

/// Why a snapshot was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRefused(pub String);

/// A snapshot begun on this replica for a Primary, completing in the background: its
/// outcome (an Ack status) once there.
#[derive(Default)]
pub(crate) struct Fill {
    status: Mutex<Option<u32>>,
    done: Condvar,
}

impl Fill {
    fn finish(&self, status: u32) {
        *self.status.locked() = Some(status);
        self.done.notify_all();
    }

    fn wait(&self) -> u32 {
        let status = crate::locks::wait_while(&self.done, self.status.locked(), |s| s.is_none());
        status.expect("set before notified")
    }

    fn finished(&self) -> bool {
        self.status.locked().is_some()
    }
}

/// What a replica answers when it does not take a snapshot.
fn errno_of(e: &PoolError) -> u32 {
    (match e {
        PoolError::SnapshotExists { .. } | PoolError::FileInTheWay { .. } => libc::EEXIST,
        PoolError::NoReflink { .. } => libc::EOPNOTSUPP,
        PoolError::NoSpace { .. } => libc::ENOSPC,
        PoolError::Failed { .. } => libc::EBUSY,
        _ => libc::EIO,
    }) as u32
}

fn reason(status: u32) -> String {
    match status as i32 {
        libc::EEXIST => "its replica already has a snapshot of that name".into(),
        libc::EOPNOTSUPP => "its pool's file system cannot share blocks (reflink)".into(),
        libc::ENOSPC => "its pool is full".into(),
        libc::ESTALE => "its replica was not UpToDate".into(),
        libc::EBUSY => "another snapshot was being taken there".into(),
        other => format!(
            "it failed to take it ({})",
            std::io::Error::from_raw_os_error(other)
        ),
    }
}

fn snapshot_name(payload: &[u8]) -> Option<SnapshotName> {
    std::str::from_utf8(payload).ok()?.parse().ok()
}

/// Sends `kind` for `snap` to `peers`; their answers.
fn ask(
    volume: &ReplicatedVolume,
    peers: &[&Arc<Peer>],
    kind: Kind,
    snap: &SnapshotName,
) -> Arc<Completion> {
    let mut h = Header::new(kind, volume.next_id());
    let name = snap.as_str().as_bytes();
    h.payload = name.len() as u32;
    let completion = Arc::new(Completion::new(peers.len()));
    for p in peers {
        p.request(&h, name, &completion);
    }
    completion
}

/// Whether `id` answered 0; else why not.
fn answered(outcome: &Outcome, id: NodeId) -> Result<(), String> {
    if let Some((_, status)) = outcome.failed.iter().find(|(f, _)| *f == id) {
        return Err(reason(*status));
    }
    if outcome.lost.contains(&id) {
        return Err("its connection was lost before it answered".into());
    }
    Ok(())
}

impl ReplicatedVolume {
    /// Takes snapshot `snap` on every replica that is UpToDate and reached, at one point
    /// of the write order. Only the Primary takes snapshots: the caller opens the
    /// volume for writing first when it is closed.
    pub fn snapshot(&self, snap: &SnapshotName) -> Result<SnapshotTaken, SnapshotRefused> {
        let refused = |why: String| Err(SnapshotRefused(format!("volume {}: {why}", self.name)));
        let view = self.view();
        if view.writers == 0 {
            return refused(format!(
                "it is not open for writing on node {}, where the snapshot was asked",
                self.my_node
            ));
        }
        if let Some(other) = view.primary_besides(self.my_id) {
            let node = (self.config().peer(other.id))
                .map_or_else(|| other.id.to_string(), |p| p.node.to_string());
            return refused(format!(
                "node {node} writes to it too (two Primaries); its writes are not ordered with this node's"
            ));
        }
        let started = Instant::now();
        let Some(drained) = self.intervals.drain(DRAIN_PATIENCE) else {
            return refused(format!(
                "writes in flight did not complete within {} s",
                DRAIN_PATIENCE.as_secs()
            ));
        };
        // Every write before this point is acknowledged by every replica that took it.
        let (view, config) = (self.view(), self.config());
        let targets: Vec<&Arc<Peer>> = (config.data_peers(&view).into_iter())
            .filter(|p| is_up_to_date(&view, p.id))
            .collect();
        let begin = ask(self, &targets, Kind::Snapshot, snap);
        let local = match self.attached_in(&view) {
            Some(v) if view.up_to_date() => Some(
                v.begin_snapshot(snap)
                    .map(|()| v)
                    .map_err(|e| e.to_string()),
            ),
            Some(_) => Some(Err(format!("its replica is {}", view.disk))),
            None => None,
        };
        let began = begin.wait();
        drop(drained);
        let paused = started.elapsed();

        // Every replica that began completes its snapshot; writes go on meanwhile.
        let filling: Vec<&Arc<Peer>> = (targets.iter().copied())
            .filter(|p| answered(&began, p.id).is_ok())
            .collect();
        let fill = ask(self, &filling, Kind::SnapshotFill, snap);
        let local = local.map(|r| r.and_then(|v| v.fill_snapshot().map_err(|e| e.to_string())));
        let filled = fill.wait();

        let (mut replicas, mut missing) = (Vec::new(), Vec::new());
        let mut miss = |node: &NodeName, reason: String| {
            missing.push(SnapshotMissing {
                node: node.clone(),
                reason,
            })
        };
        let mut info = None;
        match local {
            Some(Ok(taken)) => {
                info = Some(taken);
                replicas.push(self.my_node.clone());
            }
            Some(Err(why)) => miss(&self.my_node, why),
            None => {}
        }
        for p in config.peers.iter().filter(|p| p.diskful) {
            if !targets.iter().any(|t| t.id == p.id) {
                miss(&p.node, "it was not connected and UpToDate".into());
            } else if let Err(why) = answered(&began, p.id).and_then(|()| answered(&filled, p.id)) {
                miss(&p.node, why);
            } else {
                replicas.push(p.node.clone());
            }
        }
        if replicas.is_empty() {
            let why: Vec<String> = missing
                .iter()
                .map(|m| format!("node {}: {}", m.node, m.reason))
                .collect();
            return refused(format!(
                "no replica took snapshot {snap} ({})",
                why.join("; ")
            ));
        }
        let snapshot = info.unwrap_or_else(|| tandem_api::SnapshotInfo {
            volume: self.name.clone(),
            name: snap.clone(),
            size: self.size(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
        tracing::info!(volume = %self.name, snapshot = %snap, replicas = replicas.len(), missing = missing.len(),
            paused_us = paused.as_micros() as u64, took_ms = started.elapsed().as_millis() as u64, "snapshot taken");
        Ok(SnapshotTaken {
            snapshot,
            replicas,
            missing,
            paused_us: paused.as_micros() as u64,
        })
    }

    /// Puts this node's part of the volume back to snapshot `snap`, at data generation
    /// `generation`, which the controller gives every participant it rolls back: the
    /// replica's data if it holds the snapshot; a replica without it holds nothing of
    /// its own afterwards (a full resync follows); a participant without a replica only
    /// learns the generation. Refused while the volume is open here or elsewhere.
    pub fn roll_back(&self, snap: &SnapshotName, generation: u64) -> Result<(), String> {
        let view = self.view();
        let refused = |why: String| Err(format!("volume {}: {why}", self.name));
        if view.writers > 0 {
            return refused(format!(
                "it is open on node {}; close it there first",
                self.my_node
            ));
        }
        if let Some(p) = view.primary_besides(self.my_id) {
            let node =
                (self.config().peer(p.id)).map_or_else(|| p.id.to_string(), |p| p.node.to_string());
            return refused(format!("it is open on node {node}; close it there first"));
        }
        let holds = match self.local.as_ref() {
            Some(v) if v.snapshot(snap).is_some() => {
                v.roll_back(snap)
                    .map_err(|e| format!("volume {}: {e}", self.name))?;
                true
            }
            _ => false,
        };
        self.apply(Event::RolledBack { generation, holds })
            .map_err(|refused| format!("volume {}: {refused}", self.name))?;
        tracing::warn!(volume = %self.name, snapshot = %snap, holds, generation = %format!("{generation:016x}"),
            "volume rolled back to a snapshot");
        Ok(())
    }

    /// A Primary's `Snapshot` on this replica: every write it sent before is applied
    /// (it waited for their acknowledgements), none after. Begins the snapshot and
    /// completes it in the background; the status to answer with.
    pub(super) fn begin_peer_snapshot(&self, payload: &[u8]) -> u32 {
        let Some(snap) = snapshot_name(payload) else {
            return libc::EINVAL as u32;
        };
        let Some(local) = self.local_up_to_date().cloned() else {
            return libc::ESTALE as u32;
        };
        if let Err(e) = local.begin_snapshot(&snap) {
            tracing::warn!(volume = %self.name, snapshot = %snap, error = %e, "snapshot not taken");
            return errno_of(&e);
        }
        let fill = Arc::new(Fill::default());
        {
            let mut fills = self.fills.locked();
            // Those a Primary never asked about (it went away) are forgotten here.
            fills.retain(|_, f| !f.finished());
            fills.insert(snap.clone(), fill.clone());
        }
        let (name, volume) = (self.name.clone(), local.clone());
        let work = move || complete(&name, &volume, &fill);
        if let Err(e) = std::thread::Builder::new()
            .name("snapshot-fill".into())
            .spawn(work)
        {
            tracing::error!(volume = %self.name, error = %e, "cannot start a thread to complete a snapshot");
            return libc::EAGAIN as u32;
        }
        0
    }

    /// A Primary's `SnapshotFill`: answered, from a thread of its own, once the
    /// snapshot begun under that name is complete.
    pub(super) fn answer_snapshot_fill(&self, from: NodeId, id: u64, payload: &[u8]) {
        let fill = snapshot_name(payload).and_then(|snap| self.fills.locked().remove(&snap));
        let Some(peer) = self.config().peer(from).cloned() else {
            return;
        };
        let answer = move || {
            let mut ack = Header::new(Kind::Ack, id);
            ack.status = fill.map_or(libc::ENOENT as u32, |f| f.wait());
            let _ = peer.send(&ack, &[]);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("snapshot-answer".into())
            .spawn(answer)
        {
            tracing::error!(volume = %self.name, error = %e, "cannot start a thread to answer a snapshot");
        }
    }
}

impl ReplicatedVolume {
    /// The size of snapshot `snap`, which this node does not hold, as a connected peer
    /// holding it says, and that peer (to read from first).
    pub fn snapshot_size(&self, snap: &SnapshotName) -> io::Result<(u64, NodeId)> {
        let (view, config) = (self.view(), self.config());
        let mut last = None;
        for peer in config.data_peers(&view) {
            let outcome = ask(self, &[peer], Kind::SnapshotStat, snap).wait();
            match (outcome.data, outcome.failed.first()) {
                (Some(data), _) if data.len() == 8 => {
                    let size = u64::from_be_bytes(data[..].try_into().expect("8 bytes"));
                    return Ok((size, peer.id));
                }
                (_, Some(&(_, status))) => {
                    last = Some(error_from(status, "peer has no such snapshot"))
                }
                _ => last = Some(io::Error::other("peer connection lost")),
            }
        }
        Err(last.unwrap_or_else(|| self.no_snapshot_peer(snap)))
    }

    /// Reads `buf.len()` bytes at `offset` of snapshot `snap`, which this node does not
    /// hold, from a connected peer holding it: `holder` first (see
    /// [`ReplicatedVolume::snapshot_size`]), so a read costs one round trip.
    pub fn read_snapshot(
        &self,
        snap: &SnapshotName,
        holder: NodeId,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let (view, config) = (self.view(), self.config());
        let mut peers = config.data_peers(&view);
        peers.sort_by_key(|p| p.id != holder);
        let mut last = None;
        for peer in peers {
            match self.read_from(peer, offset, buf, Some(snap)) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| self.no_snapshot_peer(snap)))
    }

    fn no_snapshot_peer(&self, snap: &SnapshotName) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "volume {}: no connected peer holds snapshot {snap}",
                self.name
            ),
        )
    }

    /// The data file and size of the snapshot a peer names, from this replica; the
    /// status to answer with when there is none.
    fn snapshot_file(&self, payload: &[u8]) -> Result<(Arc<DataFile>, u64), u32> {
        let snap = snapshot_name(payload).ok_or(libc::EINVAL as u32)?;
        let local = self.local.as_ref().ok_or(libc::ENOENT as u32)?;
        let size = local.snapshot(&snap).ok_or(libc::ENOENT as u32)?.size;
        let mut files = self.snapshot_files.locked();
        if let Some(f) = files.get(&snap) {
            return Ok((f.clone(), size));
        }
        let file = Arc::new(local.open_snapshot(&snap).map_err(|e| errno_of(&e))?);
        // Snapshots deleted since they were read are forgotten here.
        files.retain(|name, _| local.snapshot(name).is_some());
        files.insert(snap, file.clone());
        Ok((file, size))
    }

    /// A peer's read of a snapshot this replica holds.
    pub(super) fn serve_snapshot_read(
        &self,
        peer: &Peer,
        h: &Header,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut data = Buffer::zeroed(h.length as usize);
        let status = match self.snapshot_file(payload) {
            Ok((file, size))
                if h.offset
                    .checked_add(h.length)
                    .is_some_and(|end| end <= size) =>
            {
                file.read_at(&mut data, h.offset)
                    .map_or_else(|e| errno(&e), |()| 0)
            }
            Ok(_) => libc::EINVAL as u32,
            Err(status) => status,
        };
        let mut reply = Header::new(Kind::ReadReply, h.id);
        reply.status = status;
        let data = if status == 0 { &data[..] } else { &[][..] };
        reply.payload = data.len() as u32;
        peer.send(&reply, data)
    }

    /// A peer asks the size of a snapshot this replica holds.
    pub(super) fn serve_snapshot_stat(
        &self,
        peer: &Peer,
        h: &Header,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut reply = Header::new(Kind::ReadReply, h.id);
        let size = match self.snapshot_file(payload) {
            Ok((_, size)) => size.to_be_bytes(),
            Err(status) => {
                reply.status = status;
                return peer.send(&reply, &[]);
            }
        };
        reply.payload = 8;
        peer.send(&reply, &size)
    }
}

/// Completes the snapshot begun on `volume` and records the outcome in `fill`.
fn complete(name: &tandem_api::VolumeName, volume: &Volume, fill: &Fill) {
    let status = match volume.fill_snapshot() {
        Ok(_) => 0,
        Err(e) => {
            tracing::error!(volume = %name, error = %e, "snapshot not completed");
            errno_of(&e)
        }
    };
    fill.finish(status);
}
