//! Orphans: volumes nodes hold that the controller has no record of, neither wanted
//! nor deleted (they predate a restored database, or come from another past of the
//! node). Reconciliation leaves them alone; an operator adopts them into the model or
//! has them deleted.

use std::collections::BTreeMap;

use tandem_api::{
    ClusterVolume, GroupName, NodeName, ParticipantKind, VolumeId, VolumeName, VolumeSpec,
};

use crate::controller::{Controller, Refusal, RefusalKind};
use crate::model::{Part, ParticipantRow, VolumeRow};

use RefusalKind::{Conflict, NotFound};

/// An orphan as the nodes holding it report it.
struct Orphan {
    id: VolumeId,
    /// The spec each holder has, by node.
    holders: BTreeMap<NodeName, VolumeSpec>,
}

fn no_orphan(name: &VolumeName) -> Refusal {
    Refusal::new(
        NotFound,
        format!("no node reports an orphan volume {name}"),
        "nodes report orphans when visited: `tandem health` lists those found",
    )
}

impl Controller {
    /// The one orphan named `name`.
    fn orphan(&self, name: &VolumeName) -> Result<Orphan, Refusal> {
        let mut found: Vec<Orphan> = self
            .view(|s| s.orphans())
            .into_iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, id), holders)| Orphan { id, holders })
            .collect();
        match found.len() {
            0 => Err(no_orphan(name)),
            1 => Ok(found.remove(0)),
            _ => Err(Refusal::new(
                Conflict,
                format!(
                    "nodes hold {} different volumes named {name} (ids {})",
                    found.len(),
                    found
                        .iter()
                        .map(|o| o.id.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "keep one: delete the others on their nodes (`tandem volume delete NAME --orphan` deletes them all)",
            )),
        }
    }

    /// Takes an orphan into the model as it stands on its nodes: its id, size,
    /// participants and origin; group `default`. Nothing on the nodes changes.
    pub fn adopt_volume(&self, name: &VolumeName) -> Result<ClusterVolume, Refusal> {
        crate::system::refuse_change(name.as_str(), "adopted")?;
        let orphan = self.orphan(name)?;
        let mut d = self.desired();
        if d.model.volumes.contains_key(name) {
            return Err(Refusal::new(
                Conflict,
                format!(
                    "the controller already has a volume {name}, and nodes {} hold another (id {})",
                    orphan
                        .holders
                        .keys()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    orphan.id
                ),
                "delete the orphan with `tandem volume delete NAME --orphan`, or the recorded volume first",
            ));
        }
        // The holders' specs agree but for what changed since: the largest is newest.
        let spec = orphan
            .holders
            .values()
            .max_by_key(|s| (s.size, s.participants.len()))
            .expect("an orphan has a holder")
            .clone();
        let mut participants = Vec::new();
        for p in &spec.participants {
            if !d.model.nodes.contains_key(&p.node) {
                return Err(Refusal::new(
                    Conflict,
                    format!(
                        "orphan {name} has a participant on node {}, which is not in the cluster",
                        p.node
                    ),
                    format!(
                        "add node {} to the cluster first (`tandem node create`)",
                        p.node
                    ),
                ));
            }
            participants.push(ParticipantRow {
                node: p.node.clone(),
                node_id: p.node_id,
                kind: p.kind,
                pool: p.pool.clone(),
                // A diskless participant exists for its attachment.
                attached: p.kind == ParticipantKind::Diskless,
                fresh: p.fresh,
            });
        }
        let row = VolumeRow {
            id: spec.volume_id,
            revision: spec.revision,
            size: spec.size,
            group: "default".parse::<GroupName>().expect("a valid name"),
            replicas: participants.iter().filter(|p| p.kind.diskful()).count() as u8,
            participants,
            origin: spec.origin.clone(),
        };
        self.commit(
            &mut d,
            |w| w.volume(name, &row),
            |m| {
                m.volumes.insert(name.clone(), row.clone());
            },
        )?;
        drop(d);
        tracing::info!(volume = %name, id = %orphan.id, "orphan adopted");
        self.volume(name)
    }

    /// Has the nodes holding orphans named `name` delete them.
    pub fn delete_orphan(&self, name: &VolumeName) -> Result<(), Refusal> {
        let parts: Vec<Part> = self
            .view(|s| s.orphans())
            .into_iter()
            .filter(|((n, _), _)| n == name)
            .flat_map(|((n, id), holders)| {
                holders.into_keys().map(move |node| Part {
                    node,
                    volume: n.clone(),
                    id,
                })
            })
            .collect();
        if parts.is_empty() {
            return Err(no_orphan(name));
        }
        self.record_deletions(&parts)?;
        tracing::info!(volume = %name, nodes = parts.len(), "orphan to be deleted");
        Ok(())
    }
}
