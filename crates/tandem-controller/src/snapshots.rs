//! Snapshots as cluster objects. One is taken by the volume's Primary (or, when the
//! volume is closed, by a node holding an UpToDate replica, which becomes Primary for
//! the moment), at one point of the write order on every replica it reaches; the
//! controller records which replicas hold it.

use std::collections::BTreeSet;

use tandem_api::{
    ClusterSnapshot, ClusterVolume, NodeName, Origin, ParticipantKind, SnapshotChanges,
    SnapshotInfo, SnapshotName, SnapshotTaken, VolumeId, VolumeName,
};

use crate::controller::{Controller, Refusal, RefusalKind};
use crate::model::{ParticipantRow, SnapshotRow, VolumeRow};
use crate::ops::{candidates_for, no_volume, node_call, retaken, settle_tiebreaker};
use crate::placement;

use RefusalKind::{Conflict, NotFound};

fn no_snapshot(volume: &VolumeName, snap: &SnapshotName) -> Refusal {
    Refusal::new(
        NotFound,
        format!("snapshot {volume}@{snap} does not exist"),
        format!("list the volume's snapshots with `tandem snapshot list {volume}`"),
    )
}

impl Controller {
    /// Every snapshot, or those of one volume.
    pub fn snapshots(&self, volume: Option<&VolumeName>) -> Result<Vec<ClusterSnapshot>, Refusal> {
        let d = self.desired();
        if let Some(v) = volume
            && !d.model.volumes.contains_key(v)
        {
            return Err(no_volume(v));
        }
        Ok((d.model.snapshots.iter())
            .filter(|((v, _), _)| volume.is_none_or(|want| want == v))
            .map(|((volume, name), row)| ClusterSnapshot {
                volume: volume.clone(),
                name: name.clone(),
                created: row.created,
                size: row.size,
                replicas: row.replicas.clone(),
            })
            .collect())
    }

    pub fn create_snapshot(
        &self,
        volume: &VolumeName,
        snap: &SnapshotName,
    ) -> Result<SnapshotTaken, Refusal> {
        crate::system::refuse_change(volume.as_str(), "snapshotted")?;
        let d = self.desired();
        if !d.model.volumes.contains_key(volume) {
            return Err(no_volume(volume));
        }
        if d.model
            .snapshots
            .contains_key(&(volume.clone(), snap.clone()))
        {
            return Err(Refusal::new(
                Conflict,
                format!("snapshot {volume}@{snap} already exists"),
                "choose another name",
            ));
        }
        let open = self.snapshot(&d, |s| s.open_on(volume));
        drop(d);
        let node = match open.as_slice() {
            [one] => one.clone(),
            [] => self.speaker(volume)?.0,
            many => {
                return Err(Refusal::new(
                    Conflict,
                    format!("volume {volume} is open on {} (a migration?)", join(many)),
                    "take the snapshot once it is open on one node only",
                ));
            }
        };
        let client = self
            .client(&node)
            .ok_or_else(|| crate::ops::no_node(&node))?;
        let _taking = Taking::new(self, volume, snap);
        let taken = client
            .create_snapshot(volume, snap)
            .map_err(|e| node_call(&node, &format!("take snapshot {volume}@{snap}"), e))?;
        let row = SnapshotRow {
            created: taken.snapshot.created,
            size: taken.snapshot.size,
            replicas: taken.replicas.clone(),
        };
        let mut d = self.desired();
        let key = (volume.clone(), snap.clone());
        self.commit(
            &mut d,
            |w| w.snapshot(volume, snap, &row),
            |m| {
                m.snapshots.insert(key, row.clone());
            },
        )?;
        tracing::info!(%volume, snapshot = %snap, %node, replicas = %join(&taken.replicas),
            paused_us = taken.paused_us, "snapshot taken");
        Ok(taken)
    }

    /// The blocks that changed between snapshot `since` and snapshot `snap`, from a node
    /// that holds both (one that is online, if any).
    pub fn snapshot_changes(
        &self,
        volume: &VolumeName,
        snap: &SnapshotName,
        since: &SnapshotName,
    ) -> Result<SnapshotChanges, Refusal> {
        let d = self.desired();
        let row = |s: &SnapshotName| {
            (d.model.snapshots.get(&(volume.clone(), s.clone())))
                .map(|r| r.replicas.clone())
                .ok_or_else(|| no_snapshot(volume, s))
        };
        let (newer, older) = (row(snap)?, row(since)?);
        drop(d);
        let both: Vec<NodeName> = newer.into_iter().filter(|n| older.contains(n)).collect();
        let node = (both.iter().find(|n| self.observed(n).online()))
            .or(both.first())
            .cloned()
            .ok_or_else(|| {
                Refusal::new(
                    Conflict,
                    format!("no node holds both snapshots {since} and {snap} of volume {volume}"),
                    "compare snapshots taken while the same replica was reached",
                )
            })?;
        let client = self
            .client(&node)
            .ok_or_else(|| crate::ops::no_node(&node))?;
        client.changes(volume, snap, since).map_err(|e| {
            node_call(
                &node,
                &format!("compare snapshots {since} and {snap} of {volume}"),
                e,
            )
        })
    }

    /// Makes volume `new` a copy of snapshot `snap` of `volume`, independent of it from
    /// then on: a replica on each online node holding the snapshot (as many as the
    /// origin has replicas), in the origin's pool there, sharing the snapshot's blocks;
    /// any more replicas are placed as for any volume, and resynced in full from those.
    pub fn clone_snapshot(
        &self,
        volume: &VolumeName,
        snap: &SnapshotName,
        new: &VolumeName,
    ) -> Result<ClusterVolume, Refusal> {
        crate::system::refuse_change(new.as_str(), "created")?;
        let mut d = self.desired();
        if d.model.volumes.contains_key(new) {
            return Err(Refusal::new(
                Conflict,
                format!("volume {new} already exists"),
                "choose another name",
            ));
        }
        let row = (d.model.snapshots.get(&(volume.clone(), snap.clone())))
            .cloned()
            .ok_or_else(|| no_snapshot(volume, snap))?;
        let origin = d
            .model
            .volumes
            .get(volume)
            .cloned()
            .ok_or_else(|| no_volume(volume))?;
        let group = d.model.groups.get(&origin.group).cloned();
        let holders: Vec<&ParticipantRow> = (row.replicas.iter())
            .filter(|n| self.observed(n).online())
            .filter_map(|n| origin.participant(n).filter(|p| p.kind.diskful()))
            .collect();
        if holders.is_empty() {
            return Err(Refusal::new(
                Conflict,
                format!(
                    "no online node holds snapshot {volume}@{snap} (held by {})",
                    join(&row.replicas)
                ),
                "bring a node holding it back online",
            ));
        }
        let wanted = origin.replicas as usize;
        let mut v = VolumeRow {
            id: VolumeId::random(),
            revision: 0,
            size: row.size,
            group: origin.group.clone(),
            replicas: origin.replicas,
            participants: Vec::new(),
            origin: Some(Origin {
                volume: volume.clone(),
                snapshot: snap.clone(),
            }),
        };
        let replica = |v: &VolumeRow, node: &NodeName, pool, fresh| ParticipantRow {
            node: node.clone(),
            node_id: v.free_node_id().expect("at most 31 replicas"),
            kind: ParticipantKind::Diskful,
            pool,
            attached: false,
            fresh,
        };
        for p in holders.iter().take(wanted) {
            let r = replica(&v, &p.node, p.pool.clone(), false);
            v.participants.push(r);
        }
        let pool = group
            .as_ref()
            .map_or_else(|| "default".parse().expect("valid"), |g| g.pool.clone());
        let candidates = self.snapshot(&d, |s| candidates_for(s, group.as_ref(), Some(&pool)));
        if v.participants.len() < wanted {
            let more = placement::place(
                wanted - v.participants.len(),
                row.size,
                &pool,
                &retaken(&candidates, &v),
            )
            .map_err(|e| {
                Refusal::new(
                    Conflict,
                    format!("cannot place clone {new}: {e}"),
                    "add nodes or pools, or free space",
                )
            })?;
            for node in more {
                let r = replica(&v, &node, Some(pool.clone()), true);
                v.participants.push(r);
            }
        }
        let others = retaken(&candidates, &v);
        settle_tiebreaker(&mut v, &others);
        self.commit(
            &mut d,
            |w| w.volume(new, &v),
            |m| {
                m.volumes.insert(new.clone(), v.clone());
            },
        )?;
        tracing::info!(volume = %new, origin = %format!("{volume}@{snap}"), "volume cloned from a snapshot");
        Ok(self.snapshot(&d, |s| s.volume(new)).expect("just created"))
    }

    /// Puts volume `volume` back as it was at snapshot `snap`, on every replica: those
    /// holding the snapshot take its data, the others are resynced in full from them,
    /// all at one new data generation. The volume must be closed everywhere, and every
    /// participant online (one left out would come back with the old data as current).
    pub fn rollback_snapshot(
        &self,
        volume: &VolumeName,
        snap: &SnapshotName,
    ) -> Result<ClusterVolume, Refusal> {
        crate::system::refuse_change(volume.as_str(), "rolled back")?;
        let d = self.desired();
        let v = d
            .model
            .volumes
            .get(volume)
            .cloned()
            .ok_or_else(|| no_volume(volume))?;
        let row = (d.model.snapshots.get(&(volume.clone(), snap.clone())))
            .cloned()
            .ok_or_else(|| no_snapshot(volume, snap))?;
        let open = self.snapshot(&d, |s| s.open_on(volume));
        drop(d);
        if !open.is_empty() {
            return Err(Refusal::new(
                Conflict,
                format!("volume {volume} is open on {}", join(&open)),
                "disconnect its NBD clients there first; a rollback needs the volume closed everywhere",
            ));
        }
        let offline: Vec<NodeName> = (v.participants.iter())
            .map(|p| p.node.clone())
            .filter(|n| !self.observed(n).online())
            .collect();
        if !offline.is_empty() {
            return Err(Refusal::new(
                Conflict,
                format!(
                    "volume {volume} has participants offline: {}",
                    join(&offline)
                ),
                "bring them back, or remove them from the volume, then roll back",
            ));
        }
        let holds = |n: &NodeName| row.replicas.contains(n);
        if !v.diskful().any(|p| holds(&p.node)) {
            return Err(Refusal::new(
                Conflict,
                format!("no replica of volume {volume} holds snapshot {snap}"),
                "list the snapshot's replicas with `tandem snapshot list`",
            ));
        }
        let generation =
            u64::from_le_bytes(VolumeId::random().0[..8].try_into().expect("8 bytes")) | 1;
        // Participants without data learn the generation first, then the replicas
        // holding the snapshot take it, then the others give up theirs.
        let mut order: Vec<&ParticipantRow> = v.participants.iter().collect();
        order.sort_by_key(|p| (p.kind.diskful(), !holds(&p.node)));
        for p in &order {
            let client = self
                .client(&p.node)
                .ok_or_else(|| crate::ops::no_node(&p.node))?;
            client.roll_back(volume, snap, generation).map_err(|e| {
                node_call(&p.node, &format!("roll volume {volume} back to {snap}"), e)
            })?;
        }
        // Replicas that met while some were rolled back and others not refused each
        // other: every one connects afresh now that all share the generation.
        for p in &order {
            if let Some(client) = self.client(&p.node)
                && let Err(e) = client.reconnect(volume)
            {
                tracing::warn!(%volume, node = %p.node, error = %e, "reconnect after the rollback failed");
            }
        }
        tracing::info!(%volume, snapshot = %snap, "volume rolled back");
        self.volume(volume)
    }

    /// Deletes a snapshot: its record first, then each replica's copy. A node that
    /// does not answer (away, cut off, its disk failing) drops its copy when it is next
    /// visited, as every copy no record names goes (see [`Controller::stray_snapshots`]).
    pub fn delete_snapshot(&self, volume: &VolumeName, snap: &SnapshotName) -> Result<(), Refusal> {
        let key = (volume.clone(), snap.clone());
        let mut d = self.desired();
        let Some(row) = d.model.snapshots.get(&key).cloned() else {
            return Err(no_snapshot(volume, snap));
        };
        self.commit(
            &mut d,
            |w| w.delete_snapshot(volume, snap),
            |m| {
                m.snapshots.remove(&key);
            },
        )?;
        drop(d);
        let mut kept = Vec::new();
        for node in &row.replicas {
            // A node deleted from the cluster took its replicas along.
            if let Some(client) = self.client(node)
                && let Err(e) = client.delete_snapshot(volume, snap)
            {
                tracing::warn!(%volume, snapshot = %snap, %node, error = %e,
                    "snapshot copy left on a node; it goes when the node is next visited");
                kept.push(node.clone());
            }
        }
        tracing::info!(%volume, snapshot = %snap, left_on = %join(&kept), "snapshot deleted");
        Ok(())
    }

    /// The snapshots `held` by `node` that no record gives it, among those of the
    /// volumes it holds as the model knows them (`ours`; an orphan's are left to the
    /// operator): deleted while the node was away, or taken on it by a request whose
    /// record was never made (its controller replaced meanwhile). Not one being taken
    /// now. `held` must be listed before this is called.
    pub(crate) fn stray_snapshots(
        &self,
        node: &NodeName,
        ours: &BTreeSet<VolumeName>,
        held: Vec<SnapshotInfo>,
    ) -> Vec<(VolumeName, SnapshotName)> {
        // Taken, then the record: looked at in that order, a snapshot the listing
        // found is either still being taken or recorded.
        let taking = self.taking.lock().unwrap().clone();
        let d = self.desired();
        held.into_iter()
            .map(|s| (s.volume, s.name))
            .filter(|key| ours.contains(&key.0) && !taking.contains(key))
            .filter(|key| {
                !(d.model.snapshots.get(key)).is_some_and(|row| row.replicas.contains(node))
            })
            .collect()
    }
}

/// Marks a snapshot as being taken while it lives.
struct Taking<'a> {
    controller: &'a Controller,
    key: (VolumeName, SnapshotName),
}

impl<'a> Taking<'a> {
    fn new(controller: &'a Controller, volume: &VolumeName, snap: &SnapshotName) -> Self {
        let key = (volume.clone(), snap.clone());
        controller.taking.lock().unwrap().insert(key.clone());
        Taking { controller, key }
    }
}

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        self.controller.taking.lock().unwrap().remove(&self.key);
    }
}

fn join(nodes: &[NodeName]) -> String {
    nodes
        .iter()
        .map(NodeName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}
