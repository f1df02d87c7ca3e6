//! Snapshots taken at one point of the replicated write order: a barrier in the write
//! stream, as a flush is.
//!
//! The Primary holds new writes back and waits for those in flight to be acknowledged
//! by every replica ([`IntervalLock::drain`](crate::interval::IntervalLock::drain));
//! then every replica that is UpToDate and reached takes the snapshot (the Primary's
//! own, and each peer's on a `Snapshot` message), and writes go on. A replica shares
//! its data file into the snapshot (reflink), so the pause is the drain, one round
//! trip and the slowest replica's reflink. A replica that is not reached or not
//! UpToDate at that point does not get the snapshot.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tandem_api::{NodeName, SnapshotInfo, SnapshotMissing, SnapshotName, SnapshotTaken};
use tandem_pool::PoolError;

use super::{ReplicatedVolume, is_up_to_date};
use crate::completion::Completion;
use crate::peer::Peer;
use crate::wire::{Header, Kind};

/// How long a snapshot waits for the writes in flight before it gives up (a write
/// waiting for quorum to come back may hold its range indefinitely).
const DRAIN_PATIENCE: Duration = Duration::from_secs(10);

/// Why a snapshot was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRefused(pub String);

/// What a replica answers a `Snapshot` with, when it does not take it.
fn errno_of(e: &PoolError) -> u32 {
    (match e {
        PoolError::SnapshotExists { .. } | PoolError::FileInTheWay { .. } => libc::EEXIST,
        PoolError::NoReflink { .. } => libc::EOPNOTSUPP,
        PoolError::NoSpace { .. } => libc::ENOSPC,
        _ => libc::EIO,
    }) as u32
}

fn reason(status: u32) -> String {
    match status as i32 {
        libc::EEXIST => "its replica already has a snapshot of that name".into(),
        libc::EOPNOTSUPP => "its pool's file system cannot share blocks (reflink)".into(),
        libc::ENOSPC => "its pool is full".into(),
        libc::ESTALE => "its replica was not UpToDate".into(),
        other => format!(
            "it failed to take it ({})",
            std::io::Error::from_raw_os_error(other)
        ),
    }
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
            let node = self
                .config()
                .peer(other.id)
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
        let targets: Vec<&std::sync::Arc<Peer>> = (config.data_peers(&view).into_iter())
            .filter(|p| is_up_to_date(&view, p.id))
            .collect();
        let mut h = Header::new(Kind::Snapshot, self.next_id());
        let name = snap.as_str().as_bytes();
        h.payload = name.len() as u32;
        let completion = std::sync::Arc::new(Completion::new(targets.len()));
        for p in &targets {
            p.request(&h, name, &completion);
        }
        let local = match self.attached_in(&view) {
            Some(v) if view.up_to_date() => Some(v.take_snapshot(snap).map_err(|e| e.to_string())),
            Some(_) => Some(Err(format!("its replica is {}", view.disk))),
            None => None,
        };
        let outcome = completion.wait();
        drop(drained);
        let paused = started.elapsed();

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
            if let Some((_, status)) = outcome.failed.iter().find(|(id, _)| *id == p.id) {
                miss(&p.node, reason(*status));
            } else if outcome.lost.contains(&p.id) {
                miss(&p.node, "its connection was lost before it answered".into());
            } else if targets.iter().any(|t| t.id == p.id) {
                replicas.push(p.node.clone());
            } else {
                miss(&p.node, "it was not connected and UpToDate".into());
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
        let snapshot = info.unwrap_or_else(|| SnapshotInfo {
            volume: self.name.clone(),
            name: snap.clone(),
            size: self.size(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
        tracing::info!(volume = %self.name, snapshot = %snap, replicas = replicas.len(), missing = missing.len(),
            paused_us = paused.as_micros() as u64, "snapshot taken");
        Ok(SnapshotTaken {
            snapshot,
            replicas,
            missing,
            paused_us: paused.as_micros() as u64,
        })
    }

    /// A Primary's `Snapshot` on this replica: every write it sent before is applied
    /// (it waited for their acknowledgements), none after. The status to answer with.
    pub(super) fn take_peer_snapshot(&self, payload: &[u8]) -> u32 {
        let Some(snap) = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.parse::<SnapshotName>().ok())
        else {
            return libc::EINVAL as u32;
        };
        let Some(local) = self.local_up_to_date() else {
            return libc::ESTALE as u32;
        };
        match local.take_snapshot(&snap) {
            Ok(_) => 0,
            Err(e) => {
                tracing::warn!(volume = %self.name, snapshot = %snap, error = %e, "snapshot not taken");
                errno_of(&e)
            }
        }
    }
}
