//! Spec changes applied to a volume in place, while it may be open: participants come
//! and go, change kind or address, the size grows, options change. Each takes effect
//! by swapping in a new [`Config`]; requests already under way finish with the one
//! they started with.

use std::sync::Arc;

use tandem_api::{Participant, VolumeSpec};
use tandem_pool::Volume;

use crate::control::{Event, Sync};
use crate::locks::Locked;
use crate::peer::{Peer, kind_name};
use crate::volume::{Config, ReplicatedVolume, tracking};

/// Why a spec cannot be applied to a configured volume in place: it takes a new
/// `ReplicatedVolume`, which the node refuses while the volume is open here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotInPlace {
    /// Another cluster, another volume id, or this node under another node id: not the
    /// same volume.
    Identity(String),
    /// This node would gain or lose its replica (or the replica is another file).
    OwnReplica(String),
}

impl std::fmt::Display for NotInPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotInPlace::Identity(s) | NotInPlace::OwnReplica(s) => f.write_str(s),
        }
    }
}

impl ReplicatedVolume {
    /// Whether `spec` (with `me`, this node's entry in it) can be applied to this
    /// volume in place, with `local` as this node's replica (when it is known yet).
    pub fn in_place(
        &self,
        spec: &VolumeSpec,
        me: &Participant,
        local: Option<Option<&Arc<Volume>>>,
    ) -> Result<(), NotInPlace> {
        if spec.cluster_id != self.cluster_id() || spec.volume_id != self.volume_id() {
            return Err(NotInPlace::Identity(format!(
                "the spec names volume {} of cluster {}, this node has volume {} of cluster {} under that name",
                spec.volume_id,
                spec.cluster_id,
                self.volume_id(),
                self.cluster_id()
            )));
        }
        if me.node_id != self.my_id() {
            return Err(NotInPlace::Identity(format!(
                "the spec gives node {} node id {}, not {}",
                me.node,
                me.node_id,
                self.my_id()
            )));
        }
        let had = self.local().is_some();
        if me.kind.diskful() != had {
            let now = kind_name(self.config().me.kind);
            return Err(NotInPlace::OwnReplica(format!(
                "node {} would change from {now} to {} in volume {}: it would {} its replica",
                me.node,
                kind_name(me.kind),
                self.name(),
                if had { "lose" } else { "gain" }
            )));
        }
        if let Some(local) = local {
            let same = match (local, self.local()) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                return Err(NotInPlace::OwnReplica(format!(
                    "the replica of volume {} on node {} is another file now",
                    self.name(),
                    me.node
                )));
            }
        }
        Ok(())
    }

    /// Applies a spec that [`ReplicatedVolume::in_place`] accepts. A larger size must
    /// already be the local replica's. Peers that stay keep their connection (a
    /// diskless participant turned tiebreaker, say, only changes how it votes); new
    /// ones connect; removed ones are disconnected. A diskful participant that joins
    /// gets everything marked out of sync, so it is resynced in full unless the
    /// handshake finds it holds the same data; one that leaves (or loses its disk) has
    /// everything marked, so if it ever returns with its old replica, that replica is
    /// never taken for current.
    pub fn update(&self, spec: VolumeSpec, me: Participant) -> Result<(), String> {
        let _one = self.changing.locked();
        self.in_place(&spec, &me, None).map_err(|e| e.to_string())?;
        let old = self.config();
        let size = self.size();
        if spec.size < size {
            return Err(format!(
                "volume {} is {size} bytes; volumes only grow, not to {}",
                self.name(),
                spec.size
            ));
        }
        if spec.size > size {
            if let Some(local) = self.local() {
                if local.size() < spec.size {
                    return Err(format!(
                        "the local replica of {} is {} bytes, smaller than the spec's {}",
                        self.name(),
                        local.size(),
                        spec.size
                    ));
                }
            }
        }
        // Every bitmap covers the new size before any write can reach past the old end.
        for p in &old.peers {
            if let Some(t) = &p.tracked {
                t.locked().bits.grow(spec.size);
            }
        }
        let mut peers = Vec::new();
        let mut joined = Vec::new();
        for p in spec.participants.iter().filter(|p| p.node_id != me.node_id) {
            match old.peer(p.node_id) {
                Some(q) if q.same_as(p) => peers.push(q.clone()),
                existing => {
                    // Only the address (or name) changed: keep what is marked for it.
                    let kept = existing
                        .filter(|q| q.diskful && p.kind.diskful())
                        .and_then(|q| q.tracked.clone());
                    let tracked = match (self.local(), kept) {
                        (Some(_), Some(t)) => Some(t),
                        (Some(local), None) if p.kind.diskful() => Some(
                            tracking(local, p, spec.size)
                                .map_err(|e| format!("cannot track participant {}: {e}", p.node))?,
                        ),
                        _ => None,
                    };
                    let peer = Arc::new(Peer::new(p, tracked));
                    if peer.diskful && !existing.is_some_and(|q| q.diskful) {
                        joined.push(peer.clone());
                    }
                    peers.push(peer);
                }
            }
        }
        let gone: Vec<Arc<Peer>> = old
            .peers
            .iter()
            .filter(|q| !peers.iter().any(|p| Arc::ptr_eq(p, q)))
            .cloned()
            .collect();
        let grew = spec.size > size;
        let summary = format!(
            "{} participants, {} joined as replicas, {} replaced or left{}",
            spec.participants.len(),
            joined.len(),
            gone.len(),
            if grew {
                format!(", size {size} -> {}", spec.size)
            } else {
                String::new()
            }
        );
        let new_size = spec.size;
        let changed = Event::SpecChanged {
            peers: spec
                .participants
                .iter()
                .filter(|p| p.node_id != me.node_id)
                .map(|p| {
                    let kept = old.peer(p.node_id).is_some_and(|q| q.same_as(p));
                    (p.node_id, p.kind, !kept)
                })
                .collect(),
            two_primaries: spec.options.allow_two_primaries,
        };
        for q in &gone {
            if q.diskful && !peers.iter().any(|p| p.id == q.id && p.diskful) {
                self.mark(q, 0, new_size);
            }
        }
        self.set_config(Config { spec, me, peers });
        if grew {
            self.set_size(new_size);
        }
        // Announces this node's state: quorum and the peers' view of it may have changed.
        self.apply(changed)
            .map_err(|refused| format!("volume {}: {refused}", self.name()))?;
        for q in &gone {
            // Its connection, if any, ends: a replacement connects afresh.
            q.disconnect();
        }
        for p in &joined {
            self.mark(p, 0, new_size);
        }
        self.store_bitmaps();
        tracing::info!(volume = %self.name(), "volume spec changed in place: {summary}");
        Ok(())
    }

    /// Peers whose resync was refused while they stayed connected (a replica that had
    /// not grown yet, say) and are due for another try, with their connection epoch.
    pub(crate) fn resync_retries(&self) -> Vec<(Arc<Peer>, u64)> {
        let view = self.view();
        if !view.up_to_date() {
            return Vec::new();
        }
        let config = self.config();
        view.peers
            .iter()
            .filter(|c| {
                c.resync_due
                    && c.sync == Sync::Idle
                    && c.remote_disk() == Some(tandem_api::DiskState::UpToDate)
            })
            .filter_map(|c| Some((config.peer(c.id)?.clone(), c.epoch()?)))
            .filter(|(p, _)| p.retry_now())
            .collect()
    }
}
