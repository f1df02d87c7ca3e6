//! The cluster's system volume: the controller's database lives on it (see
//! [`crate::blockfile`]), replicated like any volume across the controller candidates
//! (the nodes started with `tandemd --controller`, each with a pool
//! [`SYSTEM_POOL`] in its data directory): up to [`MAX_REPLICAS`] diskful replicas, a
//! tiebreaker where two need one. Whichever candidate is Primary of it runs the
//! controller. It is a volume of the model in its own group, listed with
//! `volume list --all`, and refused to every ordinary change.

use tandem_api::{
    ClusterId, Group, GroupName, NodeId, NodeName, Participant, ParticipantKind, PoolName,
    QuorumPolicy, VolumeId, VolumeName, VolumeOptions, VolumeSpec,
};

use crate::controller::{Controller, Refusal, RefusalKind};
use crate::model::{Model, ParticipantRow, VolumeRow};

/// The system volume's name.
pub const SYSTEM_VOLUME: &str = "tandem-controller";
/// The pool each candidate keeps its replica in, and the system volume's group.
pub const SYSTEM_POOL: &str = "tandem-system";
/// Its size: room for the database and its journal (thin: it costs what is written).
pub const SYSTEM_SIZE: u64 = 256 << 20;
/// Diskful replicas it gets, as candidates allow.
pub const MAX_REPLICAS: u8 = 3;

pub fn volume_name() -> VolumeName {
    SYSTEM_VOLUME.parse().expect("a valid name")
}

pub fn pool_name() -> PoolName {
    SYSTEM_POOL.parse().expect("a valid name")
}

fn group_name() -> GroupName {
    SYSTEM_POOL.parse().expect("a valid name")
}

pub fn is_system(name: &VolumeName) -> bool {
    name.as_str() == SYSTEM_VOLUME
}

/// The system volume's group: a majority of its replicas to write, I/O errors (not a
/// hang) without one, so a controller that lost it fails at once.
fn group() -> Group {
    Group {
        name: group_name(),
        replicas: MAX_REPLICAS,
        pool: pool_name(),
        nodes: Vec::new(),
        quorum: QuorumPolicy::Majority,
        on_no_quorum: tandem_api::OnNoQuorum::IoError,
    }
}

fn options() -> VolumeOptions {
    let g = group();
    VolumeOptions {
        quorum: g.quorum,
        on_no_quorum: g.on_no_quorum,
        ..VolumeOptions::default()
    }
}

/// The spec a candidate founding a cluster gives itself: the system volume with its
/// one replica, before any controller exists.
pub fn founding_spec(cluster: ClusterId, node: &NodeName, peer_address: String) -> VolumeSpec {
    VolumeSpec {
        cluster_id: cluster,
        volume_id: VolumeId::random(),
        name: volume_name(),
        revision: 0,
        size: SYSTEM_SIZE,
        participants: vec![Participant {
            node_id: NodeId::new(0).expect("a valid id"),
            node: node.clone(),
            address: peer_address,
            kind: ParticipantKind::Diskful,
            pool: Some(pool_name()),
            fresh: false,
        }],
        options: options(),
        origin: None,
    }
}

/// Refuses an operator's change of the system volume or its group.
pub(crate) fn refuse_change(name: &str, what: &str) -> Result<(), Refusal> {
    if name == SYSTEM_VOLUME || name == SYSTEM_POOL {
        return Err(Refusal::new(
            RefusalKind::Conflict,
            format!("{name} holds the controller's database: it cannot be {what} by hand"),
            "Tandem manages it: it gets a replica on every node started with --controller (up to 3)",
        ));
    }
    Ok(())
}

/// Makes the model's system volume the one this controller runs on (`spec`, as the
/// node holding it sees it): a founding controller, or one started from a backup
/// that predates its volume, records it. Participants on nodes the model does not
/// know are left out (the volume's growth adds replicas again).
pub(crate) fn adopt(model: &Model, spec: &VolumeSpec) -> Option<(Group, VolumeRow)> {
    let participants: Vec<ParticipantRow> = (spec.participants.iter())
        .filter(|p| model.nodes.contains_key(&p.node))
        .map(|p| ParticipantRow {
            node: p.node.clone(),
            node_id: p.node_id,
            kind: p.kind,
            pool: p.pool.clone(),
            attached: false,
            fresh: p.fresh,
        })
        .collect();
    let row = VolumeRow {
        id: spec.volume_id,
        revision: spec.revision,
        size: spec.size,
        group: group_name(),
        replicas: participants.iter().filter(|p| p.kind.diskful()).count() as u8,
        participants,
        origin: None,
    };
    let current = model.volumes.get(&spec.name);
    let same = current.is_some_and(|v| v.id == row.id)
        && model.groups.get(&group_name()) == Some(&group());
    (!same).then(|| (group(), row))
}

impl Controller {
    /// Gives the system volume a replica on a candidate without one (a node with the
    /// system pool, online), up to [`MAX_REPLICAS`]: candidates join one by one, so one
    /// at a time is enough.
    pub(crate) fn settle_system_volume(&self) {
        let name = volume_name();
        let pool = pool_name();
        let next = self.view(|s| {
            let v = s.model.volumes.get(&name)?;
            if v.diskful().count() >= MAX_REPLICAS as usize {
                return None;
            }
            s.observed
                .iter()
                .filter(|(node, o)| {
                    o.online()
                        && o.pools.iter().any(|p| p.name == pool)
                        && !v.participant(node).is_some_and(|p| p.kind.diskful())
                        && s.model.nodes.contains_key(*node)
                })
                .map(|(node, _)| node.clone())
                .next()
        });
        let Some(node) = next else { return };
        match self.add_replica(&name, &node) {
            Ok(_) => {
                tracing::info!(node = %node, "system volume: replica added on a controller candidate")
            }
            Err(e) => tracing::warn!(node = %node, error = %e.error.message,
                "system volume: cannot add a replica on a controller candidate"),
        }
    }
}
