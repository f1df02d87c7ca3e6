//! One visit of a node: learn what it is and has, make it hold exactly the volume specs
//! the model gives it, and record what it reports.
//!
//! Visits are idempotent and work from the difference between the model and what the
//! node reports, so a node that was away converges on its next visit: volumes created
//! meanwhile appear, deleted ones go, changed ones are updated. Nothing waits for a
//! node to come back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use tandem_api::{
    JoinCluster, NODE_API_VERSION, NodeInfo, NodeName, NodeState, ReplicaReport, VolumeName,
};

use crate::controller::{Controller, Observed};
use crate::model::{Cluster, NodeRow, Part, PoolRow};
use crate::node_client::{CallError, NodeClient};

/// A visit that could not get the node in hand.
pub(crate) struct Trouble {
    pub state: NodeState,
    pub why: String,
    /// The node did not answer (as opposed to answering something unacceptable).
    pub unreachable: bool,
}

impl From<CallError> for Trouble {
    fn from(e: CallError) -> Self {
        let why = match &e {
            CallError::Refused(401, _) => {
                format!("the node refused the cluster secret: {e}")
            }
            _ => e.to_string(),
        };
        Trouble {
            state: NodeState::Offline,
            why,
            unreachable: matches!(e, CallError::Unreachable(_)),
        }
    }
}

pub(crate) fn visit(c: &Controller, node: &NodeName) {
    let (row, cluster, caller) = {
        let d = c.desired();
        match d.model.nodes.get(node) {
            Some(row) => (
                row.clone(),
                d.model.cluster.clone(),
                d.model.caller(&c.host),
            ),
            None => return,
        }
    };
    let client = NodeClient::new(&row.address, caller);
    match converge(c, node, &row, &cluster, &client) {
        Ok(()) => {}
        Err(t) => {
            let was = c.observed(node).state;
            if was != t.state {
                tracing::warn!(%node, state = %t.state, why = %t.why, "node is not online");
            }
            c.set_observed(node, |o| {
                o.state = t.state;
                o.error = Some(t.why);
                o.replicas.clear();
                o.failures.clear();
            });
        }
    }
}

/// Deletes the snapshots the node holds that no record gives it (see
/// [`Controller::stray_snapshots`]); a deletion that fails is reported with the
/// volume's other failures and tried again at the next visit.
fn remove_stray_snapshots(
    c: &Controller,
    node: &NodeName,
    client: &NodeClient,
    ours: &BTreeSet<VolumeName>,
    failures: &mut BTreeMap<VolumeName, String>,
) -> Result<(), Trouble> {
    let held = client.snapshots()?;
    for (volume, snap) in c.stray_snapshots(node, ours, held) {
        match client.delete_snapshot(&volume, &snap) {
            Ok(()) => tracing::info!(%node, %volume, snapshot = %snap,
                "snapshot removed from node: no record gives it this node"),
            Err(e) => {
                tracing::warn!(%node, %volume, snapshot = %snap, error = %e,
                    "node kept a snapshot it should drop");
                failures
                    .entry(volume.clone())
                    .or_insert_with(|| format!("cannot remove snapshot {volume}@{snap}: {e}"));
            }
        }
    }
    Ok(())
}

/// Checks the node is the one registered, in this cluster, speaking this API.
pub(crate) fn admit(
    client: &NodeClient,
    node: &NodeName,
    address: &str,
    cluster: &Cluster,
) -> Result<NodeInfo, Trouble> {
    let info = client.info()?;
    if info.api_version != NODE_API_VERSION {
        return Err(Trouble {
            state: NodeState::VersionMismatch,
            why: format!(
                "node speaks API version {} (tandemd {}), the controller speaks {}; run the same \
                 tandemd release on every node",
                info.api_version, info.version, NODE_API_VERSION
            ),
            unreachable: false,
        });
    }
    if &info.name != node {
        return Err(Trouble {
            state: NodeState::Offline,
            why: format!(
                "the tandemd at {address} is named {}, not {node}",
                info.name
            ),
            unreachable: false,
        });
    }
    match info.cluster_id {
        Some(id) if id == cluster.id => Ok(info),
        Some(other) => Err(Trouble {
            state: NodeState::Offline,
            why: format!(
                "node belongs to another cluster ({other}); release it from that cluster first"
            ),
            unreachable: false,
        }),
        None => Ok(client.join(&JoinCluster {
            cluster_id: cluster.id,
            secret: cluster.secret.clone(),
        })?),
    }
}

/// The address peers reach a node at: its peer listener, with the host of its API
/// address when it listens on every interface.
fn peer_address(info: &NodeInfo, api_address: &str) -> String {
    match info.peer_address.parse::<SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            let host = api_address
                .rsplit_once(':')
                .map_or(api_address, |(host, _)| host);
            format!("{host}:{}", addr.port())
        }
        _ => info.peer_address.clone(),
    }
}

fn converge(
    c: &Controller,
    node: &NodeName,
    row: &NodeRow,
    cluster: &Cluster,
    client: &NodeClient,
) -> Result<(), Trouble> {
    let info = admit(client, node, &row.address, cluster)?;
    remember_node(c, node, row, &info);
    // Events applied after this may be newer than the report about to be read.
    let events_before = c.observed(node).events;

    let mut reports = client.replicated()?;
    let (desired, deletions) = {
        let d = c.desired();
        let deletions: BTreeSet<Part> = (d.model.deletions.iter())
            .filter(|p| &p.node == node)
            .cloned()
            .collect();
        (d.model.specs_for(node), deletions)
    };
    let part = |r: &ReplicaReport| Part {
        node: node.clone(),
        volume: r.spec.name.clone(),
        id: r.spec.volume_id,
    };
    let mut failures = BTreeMap::new();
    let mut changed = false;
    for (name, spec) in &desired {
        let current = reports.iter().find(|r| &r.spec.name == name);
        let result = match current {
            Some(r) if r.spec == *spec => continue,
            // Another volume of that name: one deleted (and the name used again) goes;
            // one the controller has no record of stays, in the way.
            Some(r) if r.spec.volume_id != spec.volume_id => {
                if !deletions.contains(&part(r)) {
                    failures.insert(
                        name.clone(),
                        format!(
                            "the node holds another volume of this name (id {}) the controller has no record of: adopt or delete it first",
                            r.spec.volume_id
                        ),
                    );
                    continue;
                }
                client
                    .delete_volume(name)
                    .and_then(|()| client.put_spec(spec))
            }
            _ => client.put_spec(spec),
        };
        changed = true;
        match result {
            Ok(_) => tracing::info!(%node, volume = %name, "volume spec applied"),
            Err(e) => {
                tracing::warn!(%node, volume = %name, error = %e, "node refused the volume spec");
                failures.insert(name.clone(), e.to_string());
            }
        }
    }
    // A volume the model does not want is deleted only on a deletion record: one the
    // controller has no record of at all (from before a restored database, say) is an
    // orphan, left as it is and reported.
    let mut orphans = BTreeMap::new();
    for r in &reports {
        let name = &r.spec.name;
        if r.spec.cluster_id != cluster.id
            || desired
                .get(name)
                .is_some_and(|s| s.volume_id == r.spec.volume_id)
        {
            continue;
        }
        if !deletions.contains(&part(r)) {
            orphans.insert(name.clone(), r.spec.clone());
            continue;
        }
        if desired.contains_key(name) {
            // Replaced above.
            continue;
        }
        changed = true;
        match client.delete_volume(name) {
            Ok(()) => tracing::info!(%node, volume = %name, "volume removed from node"),
            Err(e) => {
                tracing::warn!(%node, volume = %name, error = %e, "node kept a volume it should drop");
                failures.insert(name.clone(), format!("cannot remove it: {e}"));
            }
        }
    }
    if changed {
        reports = client.replicated()?;
    }
    let done: Vec<Part> = deletions
        .into_iter()
        .filter(|p| {
            !reports
                .iter()
                .any(|r| r.spec.name == p.volume && r.spec.volume_id == p.id)
        })
        .collect();
    c.forget_deletions(&done);
    let was = c.observed(node).state;
    if was != NodeState::Online {
        tracing::info!(%node, "node is online");
    }
    let replicas: BTreeMap<VolumeName, ReplicaReport> = reports
        .into_iter()
        .filter(|r| r.spec.cluster_id == cluster.id && !orphans.contains_key(&r.spec.name))
        .map(|r| (r.spec.name.clone(), r))
        .collect();
    let ours: BTreeSet<VolumeName> = (replicas.iter())
        .filter(|(name, r)| {
            desired
                .get(*name)
                .is_some_and(|s| s.volume_id == r.spec.volume_id)
        })
        .map(|(name, _)| name.clone())
        .collect();
    remove_stray_snapshots(c, node, client, &ours, &mut failures)?;
    let mut overtaken = false;
    c.set_observed(node, |o| {
        overtaken = o.events != events_before;
        *o = Observed {
            state: NodeState::Online,
            version: Some(info.version.clone()),
            error: None,
            pools: info.pools.clone(),
            replicas,
            failures,
            orphans,
            events: o.events,
        }
    });
    if overtaken {
        // An event came while the report was read: read again rather than show a
        // status older than the event's until the next visit.
        c.wake_reconcilers();
    }
    if was != NodeState::Online {
        // A node that comes online may be the third vote a two-replica volume lacks.
        c.settle_tiebreakers();
    }
    // A candidate that comes online may be the next replica of the system volume.
    c.settle_system_volume();
    Ok(())
}

/// Records the node's peer address and pools in the model when they changed.
pub(crate) fn remember_node(c: &Controller, node: &NodeName, row: &NodeRow, info: &NodeInfo) {
    let peer = peer_address(info, &row.address);
    let pools: Vec<_> = info
        .pools
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                PoolRow {
                    kind: p.kind.clone(),
                    path: p.path.clone(),
                },
            )
        })
        .collect();
    let mut d = c.desired();
    let Some(current) = d.model.nodes.get(node).cloned() else {
        return;
    };
    let known: Vec<_> = d
        .model
        .pools
        .iter()
        .filter(|((n, _), _)| n == node)
        .map(|((_, name), p)| (name.clone(), p.clone()))
        .collect();
    if current.peer_address == peer && known == pools {
        return;
    }
    let updated = NodeRow {
        peer_address: peer,
        ..current
    };
    let result = c.commit(
        &mut d,
        |w| {
            w.node(node, &updated)?;
            w.pools(node, &pools)
        },
        |m| {
            m.nodes.insert(node.clone(), updated.clone());
            m.pools.retain(|(n, _), _| n != node);
            for (name, p) in pools.clone() {
                m.pools.insert((node.clone(), name), p);
            }
        },
    );
    if let Err(e) = result {
        tracing::error!(%node, error = %e.error, "cannot record the node's addresses and pools");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(peer: &str) -> NodeInfo {
        NodeInfo {
            name: "n1".parse().unwrap(),
            version: "0".into(),
            api_version: NODE_API_VERSION,
            peer_address: peer.into(),
            nbd_socket: None,
            cluster_id: None,
            pools: Vec::new(),
        }
    }

    #[test]
    fn peers_reach_a_wildcard_listener_at_the_api_host() {
        assert_eq!(
            peer_address(&info("0.0.0.0:7700"), "198.18.77.2:3370"),
            "198.18.77.2:7700"
        );
        assert_eq!(
            peer_address(&info("127.0.0.1:7701"), "198.18.77.2:3370"),
            "127.0.0.1:7701"
        );
    }
}
