//! What the API asks of the controller: each operation checks the request against the
//! model and what nodes report, then commits the change (database first), and the
//! reconcilers carry it to the nodes.

use std::sync::Arc;

use tandem_api::{
    ChangeReplicas, ClusterInfo, ClusterNode, ClusterPool, ClusterVolume, CreateClusterVolume,
    CreateNode, CreatePool, DiskState, Group, GroupName, Health, KvCondition, KvEntry, NodeName,
    ParticipantKind, PoolName, StoreName, VolumeId, VolumeName,
};

use crate::controller::{Controller, Desired, Refusal, RefusalKind};
use crate::model::{NodeRow, ParticipantRow, VolumeRow};
use crate::node_client::{CallError, NodeClient};
use crate::placement::{self, Candidate};
use crate::view::Snapshot;

use RefusalKind::{BadRequest, Conflict, NotFound, Unreachable};

/// Replica data lives in 4 KiB blocks.
const BLOCK: u64 = 4096;
const MAX_REPLICAS: u8 = 31;
/// How long an attach waits for the node to serve the volume.
const ATTACH_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

pub(crate) fn no_volume(name: &VolumeName) -> Refusal {
    Refusal::new(
        NotFound,
        format!("volume {name} does not exist"),
        "list volumes with `tandem volume list`",
    )
}

pub(crate) fn no_node(name: &NodeName) -> Refusal {
    Refusal::new(
        NotFound,
        format!("node {name} does not exist"),
        "list nodes with `tandem node list`",
    )
}

pub(crate) fn node_call(node: &NodeName, what: &str, e: CallError) -> Refusal {
    let kind = match &e {
        CallError::Unreachable(_) => Unreachable,
        CallError::Refused(404, _) => NotFound,
        CallError::Refused(400, _) => BadRequest,
        CallError::Refused(..) => Conflict,
    };
    let correction = match &e {
        CallError::Refused(_, api) => api
            .correction
            .clone()
            .unwrap_or_else(|| format!("see the tandemd log on {node}")),
        CallError::Unreachable(_) => format!("check that tandemd runs on {node}"),
    };
    Refusal::new(kind, format!("node {node} could not {what}"), correction).with_cause(e)
}

fn check_size(size: u64) -> Result<(), Refusal> {
    if size == 0 || size % BLOCK != 0 {
        return Err(Refusal::new(
            BadRequest,
            format!("size {size} is not a positive multiple of 4 KiB"),
            "give a size such as 10G or 512M",
        ));
    }
    Ok(())
}

impl Controller {
    pub(crate) fn snapshot<T>(&self, d: &Desired, f: impl FnOnce(&Snapshot<'_>) -> T) -> T {
        let observed = self.observed.read().unwrap();
        f(&Snapshot {
            model: &d.model,
            observed: &observed,
        })
    }

    /// Runs `f` on a snapshot of the model and the nodes' reports.
    pub fn view<T>(&self, f: impl FnOnce(&Snapshot<'_>) -> T) -> T {
        let d = self.desired();
        self.snapshot(&d, f)
    }

    pub fn info(&self) -> ClusterInfo {
        let system = crate::system::volume_name();
        // One guard, dropped before the backup is looked at.
        let (cluster, candidates, database) = self.view(|s| {
            let candidates = (s.model.pools.keys())
                .filter(|(_, pool)| pool.as_str() == crate::system::SYSTEM_POOL)
                .map(|(node, _)| node.clone())
                .collect();
            (s.model.cluster.clone(), candidates, s.volume(&system))
        });
        ClusterInfo {
            cluster_id: cluster.id,
            controller: self.host.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            epoch: cluster.epoch,
            last_backup: self.last_backup(),
            candidates,
            database,
        }
    }

    pub fn health(&self) -> Health {
        self.view(|s| s.health())
    }

    pub fn volume(&self, name: &VolumeName) -> Result<ClusterVolume, Refusal> {
        self.view(|s| s.volume(name)).ok_or_else(|| no_volume(name))
    }

    pub fn node(&self, name: &NodeName) -> Result<ClusterNode, Refusal> {
        self.view(|s| s.node(name)).ok_or_else(|| no_node(name))
    }

    // ---- nodes ----

    /// Registers a node: it must answer at its address, be the node named, speak this
    /// API and not belong to another cluster. Nothing is recorded otherwise.
    pub fn create_node(self: &Arc<Self>, req: &CreateNode) -> Result<ClusterNode, Refusal> {
        if !req.address.contains(':')
            || req.address.parse::<std::net::SocketAddr>().is_err()
                && req
                    .address
                    .rsplit_once(':')
                    .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        {
            return Err(Refusal::new(
                BadRequest,
                format!("node address {:?} is not host:port", req.address),
                "give the node's API address, e.g. 192.0.2.10:3370",
            ));
        }
        let cluster = {
            let d = self.desired();
            if d.model.nodes.contains_key(&req.name) {
                return Err(Refusal::new(
                    Conflict,
                    format!("node {} already exists", req.name),
                    "choose another name, or delete the node first",
                ));
            }
            (d.model.cluster.clone(), d.model.caller(&self.host))
        };
        let (cluster, caller) = cluster;
        let client = NodeClient::new(&req.address, caller);
        crate::reconcile::admit(&client, &req.name, &req.address, &cluster).map_err(|t| {
            let kind = if t.unreachable { Unreachable } else { Conflict };
            Refusal::new(
                kind,
                format!(
                    "node {} at {} cannot join the cluster",
                    req.name, req.address
                ),
                format!(
                    "start tandemd on that host with --name {} --api-listen {}, then retry",
                    req.name, req.address
                ),
            )
            .with_cause(t.why)
        })?;
        let row = NodeRow {
            address: req.address.clone(),
            peer_address: String::new(),
        };
        {
            let mut d = self.desired();
            if d.model.nodes.contains_key(&req.name) {
                return Err(Refusal::new(
                    Conflict,
                    format!("node {} already exists", req.name),
                    "choose another name",
                ));
            }
            self.commit(
                &mut d,
                |w| w.node(&req.name, &row),
                |m| {
                    m.nodes.insert(req.name.clone(), row.clone());
                },
            )?;
        }
        tracing::info!(node = %req.name, address = %req.address, "node joined the cluster");
        // A first visit now, so the answer shows the node as it is.
        self.revisit(&req.name);
        self.reconcile(req.name.clone());
        self.node(&req.name)
    }

    /// Removes a node from the cluster: its participants leave every volume. Refused
    /// while it holds the only UpToDate replica of a volume, unless `force`.
    pub fn delete_node(&self, name: &NodeName, force: bool) -> Result<(), Refusal> {
        let client = {
            let mut d = self.desired();
            let row = d
                .model
                .nodes
                .get(name)
                .cloned()
                .ok_or_else(|| no_node(name))?;
            if !force {
                let sole: Vec<String> = self.snapshot(&d, |s| {
                    d.model
                        .volumes
                        .keys()
                        .filter(|v| s.sole_up_to_date(v, name))
                        .map(|v| v.to_string())
                        .collect()
                });
                if !sole.is_empty() {
                    return Err(Refusal::new(
                        Conflict,
                        format!(
                            "node {name} holds the only UpToDate replica of: {}",
                            sole.join(", ")
                        ),
                        "add a replica elsewhere first (`tandem volume replicas NAME --add NODE`), \
                         or delete with --force and lose that data",
                    ));
                }
            }
            let candidates = self.snapshot(&d, |s| candidates_for(s, None, None));
            let mut changed = Vec::new();
            for (vname, v) in &d.model.volumes {
                if v.participant(name).is_none() {
                    continue;
                }
                let mut v = v.clone();
                v.participants.retain(|p| &p.node != name);
                v.replicas = v.diskful().count() as u8;
                let others: Vec<Candidate> = candidates
                    .iter()
                    .filter(|c| &c.node != name)
                    .cloned()
                    .map(|mut c| {
                        c.taken = v.participant(&c.node).is_some();
                        c
                    })
                    .collect();
                settle_tiebreaker(&mut v, &others);
                changed.push((vname.clone(), v));
            }
            self.commit(
                &mut d,
                |w| {
                    for (vname, v) in &changed {
                        w.volume(vname, v)?;
                    }
                    w.delete_node(name)
                },
                |m| {
                    for (vname, v) in changed.clone() {
                        m.volumes.insert(vname, v);
                    }
                    m.nodes.remove(name);
                    m.pools.retain(|(n, _), _| n != name);
                },
            )?;
            NodeClient::new(&row.address, d.model.caller(&self.host))
        };
        let was_online = self.observed(name).online();
        self.forget(name);
        tracing::info!(node = %name, force, "node removed from the cluster");
        if was_online {
            // Best effort: the node drops this cluster's volumes and forgets the secret.
            // An unreachable node keeps them; it is no longer managed either way.
            if let Ok(reports) = client.replicated() {
                let id = self.desired().model.cluster.id;
                for r in reports.iter().filter(|r| r.spec.cluster_id == id) {
                    if let Err(e) = client.delete_volume(&r.spec.name) {
                        tracing::warn!(node = %name, volume = %r.spec.name, error = %e,
                            "removed node kept a volume");
                    }
                }
            }
            if let Err(e) = client.leave() {
                tracing::warn!(node = %name, error = %e, "removed node did not leave the cluster");
            }
        }
        Ok(())
    }

    // ---- pools ----

    fn online_client(&self, node: &NodeName) -> Result<NodeClient, Refusal> {
        let client = self.client(node).ok_or_else(|| no_node(node))?;
        let o = self.observed(node);
        if !o.online() {
            return Err(Refusal::new(
                Unreachable,
                format!("node {node} is {}", o.state),
                format!(
                    "start tandemd on {node} and retry once `tandem node list` shows it Online"
                ),
            ));
        }
        Ok(client)
    }

    /// Refreshes what a node reports right away (after a change made on it).
    fn revisit(&self, node: &NodeName) {
        crate::reconcile::visit(self, node);
    }

    pub fn create_pool(&self, node: &NodeName, req: &CreatePool) -> Result<ClusterPool, Refusal> {
        let client = self.online_client(node)?;
        client
            .create_pool(req)
            .map_err(|e| node_call(node, &format!("create pool {}", req.name), e))?;
        self.revisit(node);
        self.view(|s| {
            s.pools()
                .into_iter()
                .find(|p| &p.node == node && p.name == req.name)
        })
        .ok_or_else(|| {
            Refusal::new(
                RefusalKind::Internal,
                format!("node {node} created pool {} but does not list it", req.name),
                format!("see the tandemd log on {node}"),
            )
        })
    }

    pub fn delete_pool(&self, node: &NodeName, pool: &PoolName) -> Result<(), Refusal> {
        let used: Vec<String> = {
            let d = self.desired();
            if !d.model.pools.contains_key(&(node.clone(), pool.clone())) {
                return Err(Refusal::new(
                    NotFound,
                    format!("node {node} has no pool {pool}"),
                    "list pools with `tandem pool list`",
                ));
            }
            d.model
                .volumes
                .iter()
                .filter(|(_, v)| {
                    v.participant(node)
                        .is_some_and(|p| p.kind.diskful() && p.pool.as_ref() == Some(pool))
                })
                .map(|(n, _)| n.to_string())
                .collect()
        };
        if !used.is_empty() {
            return Err(Refusal::new(
                Conflict,
                format!("pool {node}/{pool} holds replicas of: {}", used.join(", ")),
                "move or delete those volumes first",
            ));
        }
        let client = self.online_client(node)?;
        client
            .delete_pool(pool)
            .map_err(|e| node_call(node, &format!("delete pool {pool}"), e))?;
        self.revisit(node);
        Ok(())
    }

    // ---- groups ----

    pub fn create_group(&self, group: &Group) -> Result<Group, Refusal> {
        crate::system::refuse_change(group.name.as_str(), "created or changed")?;
        if !(1..=MAX_REPLICAS).contains(&group.replicas) {
            return Err(Refusal::new(
                BadRequest,
                format!(
                    "a group has 1 to {MAX_REPLICAS} replicas, not {}",
                    group.replicas
                ),
                "give --replicas between 1 and 31",
            ));
        }
        let mut d = self.desired();
        if d.model.groups.contains_key(&group.name) {
            return Err(Refusal::new(
                Conflict,
                format!("group {} already exists", group.name),
                "choose another name",
            ));
        }
        if let Some(unknown) = group.nodes.iter().find(|n| !d.model.nodes.contains_key(*n)) {
            return Err(no_node(unknown));
        }
        self.commit(
            &mut d,
            |w| w.group(group),
            |m| {
                m.groups.insert(group.name.clone(), group.clone());
            },
        )?;
        Ok(group.clone())
    }

    pub fn delete_group(&self, name: &GroupName) -> Result<(), Refusal> {
        crate::system::refuse_change(name.as_str(), "deleted")?;
        let mut d = self.desired();
        if !d.model.groups.contains_key(name) {
            return Err(Refusal::new(
                NotFound,
                format!("group {name} does not exist"),
                "list groups with `tandem group list`",
            ));
        }
        if name.as_str() == "default" {
            return Err(Refusal::new(
                Conflict,
                "group default cannot be deleted",
                "volumes created without --group use it",
            ));
        }
        let users: Vec<String> = d
            .model
            .volumes
            .iter()
            .filter(|(_, v)| &v.group == name)
            .map(|(n, _)| n.to_string())
            .collect();
        if !users.is_empty() {
            return Err(Refusal::new(
                Conflict,
                format!("group {name} is used by: {}", users.join(", ")),
                "delete those volumes first",
            ));
        }
        self.commit(
            &mut d,
            |w| w.delete_group(name),
            |m| {
                m.groups.remove(name);
            },
        )
    }

    // ---- volumes ----

    pub fn create_volume(&self, req: &CreateClusterVolume) -> Result<ClusterVolume, Refusal> {
        crate::system::refuse_change(req.name.as_str(), "created")?;
        check_size(req.size)?;
        let mut d = self.desired();
        if d.model.volumes.contains_key(&req.name) {
            return Err(Refusal::new(
                Conflict,
                format!("volume {} already exists", req.name),
                "choose another name",
            ));
        }
        let group_name = req
            .group
            .clone()
            .unwrap_or_else(|| "default".parse().expect("valid"));
        let group = d.model.groups.get(&group_name).cloned().ok_or_else(|| {
            Refusal::new(
                NotFound,
                format!("group {group_name} does not exist"),
                "list groups with `tandem group list`",
            )
        })?;
        let replicas = req.replicas.unwrap_or(group.replicas);
        if !(1..=MAX_REPLICAS).contains(&replicas) {
            return Err(Refusal::new(
                BadRequest,
                format!("a volume has 1 to {MAX_REPLICAS} replicas, not {replicas}"),
                "give --replicas between 1 and 31",
            ));
        }
        let candidates = self.snapshot(&d, |s| candidates_for(s, Some(&group), Some(&group.pool)));
        let chosen = placement::place(replicas as usize, req.size, &group.pool, &candidates)
            .map_err(|e| {
                Refusal::new(
                    Conflict,
                    format!("cannot place volume {}: {e}", req.name),
                    "add nodes or pools, free space, or ask for fewer replicas",
                )
            })?;
        let mut v = VolumeRow {
            id: VolumeId::random(),
            revision: 0,
            size: req.size,
            group: group_name,
            replicas,
            participants: Vec::new(),
            origin: None,
        };
        for node in chosen {
            let node_id = v.free_node_id().expect("at most 31 replicas");
            v.participants.push(ParticipantRow {
                node,
                node_id,
                kind: ParticipantKind::Diskful,
                pool: Some(group.pool.clone()),
                attached: false,
                fresh: false,
            });
        }
        let others = retaken(&candidates, &v);
        settle_tiebreaker(&mut v, &others);
        self.commit(
            &mut d,
            |w| w.volume(&req.name, &v),
            |m| {
                m.volumes.insert(req.name.clone(), v.clone());
            },
        )?;
        tracing::info!(volume = %req.name, size = req.size, nodes = ?v.participants.iter()
            .map(|p| format!("{}:{}", p.node, kind_word(p.kind))).collect::<Vec<_>>(), "volume created");
        Ok(self
            .snapshot(&d, |s| s.volume(&req.name))
            .expect("just created"))
    }

    /// Changes one volume under the lock: `f` edits a copy, which is then committed.
    fn change_volume(
        &self,
        name: &VolumeName,
        f: impl FnOnce(&Snapshot<'_>, &mut VolumeRow) -> Result<(), Refusal>,
    ) -> Result<ClusterVolume, Refusal> {
        let mut d = self.desired();
        let mut v = d
            .model
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| no_volume(name))?;
        self.snapshot(&d, |s| f(s, &mut v))?;
        self.commit(
            &mut d,
            |w| w.volume(name, &v),
            |m| {
                m.volumes.insert(name.clone(), v.clone());
            },
        )?;
        Ok(self.snapshot(&d, |s| s.volume(name)).expect("exists"))
    }

    pub fn resize_volume(&self, name: &VolumeName, size: u64) -> Result<ClusterVolume, Refusal> {
        crate::system::refuse_change(name.as_str(), "resized")?;
        check_size(size)?;
        self.change_volume(name, |_, v| {
            if size < v.size {
                return Err(Refusal::new(
                    BadRequest,
                    format!(
                        "volume {name} is {}; volumes only grow",
                        tandem_api::ByteSize(v.size)
                    ),
                    "give a size at least the current one",
                ));
            }
            v.size = size;
            Ok(())
        })
    }

    pub fn delete_volume(&self, name: &VolumeName, force: bool) -> Result<(), Refusal> {
        crate::system::refuse_change(name.as_str(), "deleted")?;
        let mut d = self.desired();
        if !d.model.volumes.contains_key(name) {
            return Err(no_volume(name));
        }
        let snapshots = (d.model.snapshots.keys())
            .filter(|(v, _)| v == name)
            .count();
        if snapshots > 0 && !force {
            return Err(Refusal::new(
                Conflict,
                format!("volume {name} has {snapshots} snapshot(s)"),
                "delete them first (`tandem snapshot list`), or delete with --force, which deletes them too",
            ));
        }
        let open = self.snapshot(&d, |s| s.open_on(name));
        if !open.is_empty() && !force {
            return Err(Refusal::new(
                Conflict,
                format!(
                    "volume {name} is open on {}",
                    open.iter()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "disconnect its NBD clients first, or delete with --force (its replicas go as \
                 soon as the clients disconnect)",
            ));
        }
        self.commit(
            &mut d,
            |w| w.delete_volume(name),
            |m| {
                m.volumes.remove(name);
                m.snapshots.retain(|(v, _), _| v != name);
            },
        )?;
        tracing::info!(volume = %name, force, "volume deleted");
        Ok(())
    }

    /// Makes the volume usable on `node`: a diskless participant if it holds no replica.
    /// Answers once the node serves it (connected to its peers, with quorum), or after
    /// [`ATTACH_WAIT`] with the volume as it then stands (an offline node gets it when it
    /// returns).
    pub fn attach(&self, name: &VolumeName, node: &NodeName) -> Result<ClusterVolume, Refusal> {
        crate::system::refuse_change(name.as_str(), "attached")?;
        self.change_attachment(name, node)?;
        if self.observed(node).online() {
            self.wait_serving(name, node);
        }
        self.volume(name)
    }

    /// Polls the node until it reports the volume connected to every peer and quorate.
    fn wait_serving(&self, name: &VolumeName, node: &NodeName) {
        let (Some(client), Some(spec)) = (self.client(node), self.desired().model.spec(name))
        else {
            return;
        };
        let Some(kind) = spec.me(node).map(|p| p.kind) else {
            return;
        };
        let deadline = std::time::Instant::now() + ATTACH_WAIT;
        while std::time::Instant::now() < deadline {
            let ready = client
                .status(name, false)
                .ok()
                .and_then(|text| serde_json::from_str::<tandem_api::VolumeStatus>(&text).ok())
                .is_some_and(|s| {
                    // Its current configuration, not the one it had before the change.
                    s.kind == kind
                        && s.peers.len() + 1 == spec.participants.len()
                        && s.quorum
                        && s.peers
                            .iter()
                            .all(|p| p.connection == tandem_api::ConnectionState::Connected)
                });
            if ready {
                tracing::debug!(volume = %name, %node, "attached volume serves");
                self.revisit(node);
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        tracing::warn!(volume = %name, %node, "attached volume is not serving yet");
    }

    fn change_attachment(
        &self,
        name: &VolumeName,
        node: &NodeName,
    ) -> Result<ClusterVolume, Refusal> {
        self.change_volume(name, |s, v| {
            if !s.model.nodes.contains_key(node) {
                return Err(no_node(node));
            }
            match v.participants.iter_mut().find(|p| &p.node == node) {
                Some(p) => {
                    if p.kind == ParticipantKind::Tiebreaker {
                        p.kind = ParticipantKind::Diskless;
                    }
                    p.attached = true;
                }
                None => {
                    let node_id = v.free_node_id().ok_or_else(|| {
                        Refusal::new(
                            Conflict,
                            format!("volume {name} already has 32 participants"),
                            "detach it from a node it is no longer used on",
                        )
                    })?;
                    v.participants.push(ParticipantRow {
                        node: node.clone(),
                        node_id,
                        kind: ParticipantKind::Diskless,
                        pool: None,
                        attached: true,
                        fresh: false,
                    });
                }
            }
            Ok(())
        })
    }

    pub fn detach(&self, name: &VolumeName, node: &NodeName) -> Result<ClusterVolume, Refusal> {
        crate::system::refuse_change(name.as_str(), "detached")?;
        self.change_volume(name, |s, v| {
            let p = v.participant(node).filter(|p| p.attached).ok_or_else(|| {
                Refusal::new(
                    Conflict,
                    format!("volume {name} is not attached on {node}"),
                    "see where it is attached with `tandem volume show NAME`",
                )
            })?;
            if s.open_on(name).contains(node) {
                return Err(Refusal::new(
                    Conflict,
                    format!("volume {name} is open on {node}"),
                    "disconnect its NBD clients on that node first",
                ));
            }
            if p.kind.diskful() {
                v.participants
                    .iter_mut()
                    .filter(|p| &p.node == node)
                    .for_each(|p| p.attached = false);
            } else {
                v.participants.retain(|p| &p.node != node);
                let others = retaken(&candidates_for(s, None, None), v);
                settle_tiebreaker(v, &others);
            }
            Ok(())
        })
    }

    pub fn change_replicas(
        &self,
        name: &VolumeName,
        change: &ChangeReplicas,
    ) -> Result<ClusterVolume, Refusal> {
        crate::system::refuse_change(name.as_str(), "given or relieved of replicas")?;
        match (&change.add, &change.remove) {
            (Some(node), None) => self.add_replica(name, node),
            (None, Some(node)) => self.remove_replica(name, node),
            _ => Err(Refusal::new(
                BadRequest,
                "give exactly one of add and remove",
                "e.g. `tandem volume replicas NAME --add NODE`",
            )),
        }
    }

    pub(crate) fn add_replica(
        &self,
        name: &VolumeName,
        node: &NodeName,
    ) -> Result<ClusterVolume, Refusal> {
        self.change_volume(name, |s, v| {
            if !s.model.nodes.contains_key(node) {
                return Err(no_node(node));
            }
            let group = s.model.groups.get(&v.group).cloned().ok_or_else(|| {
                Refusal::new(
                    RefusalKind::Internal,
                    format!("volume {name} names a missing group {}", v.group),
                    "recreate the group",
                )
            })?;
            let mut candidates = candidates_for(s, Some(&group), Some(&group.pool));
            for c in &mut candidates {
                c.taken = v.participant(&c.node).is_some_and(|p| p.kind.diskful());
            }
            let target: Vec<Candidate> = candidates
                .iter()
                .filter(|c| &c.node == node)
                .cloned()
                .collect();
            placement::place(1, v.size, &group.pool, &target).map_err(|e| {
                Refusal::new(
                    Conflict,
                    format!("cannot add a replica of {name} on {node}: {e}"),
                    "choose another node (see `tandem pool list`)",
                )
            })?;
            match v.participants.iter_mut().find(|p| &p.node == node) {
                Some(p) => {
                    p.kind = ParticipantKind::Diskful;
                    p.pool = Some(group.pool.clone());
                    p.fresh = true;
                }
                None => {
                    let node_id = v.free_node_id().ok_or_else(|| {
                        Refusal::new(
                            Conflict,
                            format!("volume {name} already has 32 participants"),
                            "remove a participant first",
                        )
                    })?;
                    v.participants.push(ParticipantRow {
                        node: node.clone(),
                        node_id,
                        kind: ParticipantKind::Diskful,
                        pool: Some(group.pool.clone()),
                        attached: false,
                        fresh: true,
                    });
                }
            }
            v.replicas = v.diskful().count() as u8;
            let others = retaken(&candidates, v);
            settle_tiebreaker(v, &others);
            Ok(())
        })
    }

    fn remove_replica(&self, name: &VolumeName, node: &NodeName) -> Result<ClusterVolume, Refusal> {
        self.change_volume(name, |s, v| {
            let p = v
                .participant(node)
                .filter(|p| p.kind.diskful())
                .ok_or_else(|| {
                    Refusal::new(
                        NotFound,
                        format!("node {node} holds no replica of {name}"),
                        "see the replicas with `tandem volume show NAME`",
                    )
                })?;
            if v.diskful().count() == 1 {
                return Err(Refusal::new(
                    Conflict,
                    format!("{node} holds the last replica of {name}"),
                    "add a replica elsewhere first, or delete the volume",
                ));
            }
            if s.sole_up_to_date(name, node) {
                return Err(Refusal::new(
                    Conflict,
                    format!("{node} holds the only UpToDate replica of {name}"),
                    "wait for the other replicas to finish syncing (`tandem volume status NAME`)",
                ));
            }
            if p.attached {
                // Still used there: it keeps serving, over the network.
                v.participants
                    .iter_mut()
                    .filter(|p| &p.node == node)
                    .for_each(|p| {
                        p.kind = ParticipantKind::Diskless;
                        p.pool = None;
                        p.fresh = false;
                    });
            } else {
                v.participants.retain(|p| &p.node != node);
            }
            v.replicas = v.diskful().count() as u8;
            let others = retaken(&candidates_for(s, None, None), v);
            settle_tiebreaker(v, &others);
            Ok(())
        })
    }

    pub(crate) fn speaker(&self, name: &VolumeName) -> Result<(NodeName, NodeClient), Refusal> {
        let node = self
            .view(|s| {
                if s.model.volumes.contains_key(name) {
                    Ok(s.speaker(name))
                } else {
                    Err(no_volume(name))
                }
            })?
            .ok_or_else(|| {
                Refusal::new(
                    Unreachable,
                    format!("no online node reports volume {name} yet"),
                    "wait for its nodes to come online (`tandem node list`)",
                )
            })?;
        let client = self.client(&node).ok_or_else(|| no_node(&node))?;
        Ok((node, client))
    }

    /// The volume's status as its best-placed node sees it: JSON or the text form.
    pub fn status(&self, name: &VolumeName, text: bool) -> Result<String, Refusal> {
        let (node, client) = self.speaker(name)?;
        client
            .status(name, text)
            .map_err(|e| node_call(&node, &format!("report volume {name}"), e))
    }

    pub fn verify(&self, name: &VolumeName) -> Result<serde_json::Value, Refusal> {
        let (node, client) = self.speaker(name)?;
        let mut report = client
            .verify(name)
            .map_err(|e| node_call(&node, &format!("verify volume {name}"), e))?;
        report["node"] = serde_json::Value::String(node.to_string());
        Ok(report)
    }

    /// Has `node` declare its replica of `name` whole as it is: for a volume whose
    /// replicas all failed in turn, once their disks are repaired (see the replication
    /// engine's `Trust`; the node refuses any but the replica that held the data last).
    pub fn trust(&self, name: &VolumeName, node: &NodeName) -> Result<ClusterVolume, Refusal> {
        self.participants_if_replica_on(name, node)?;
        let client = self.client(node).ok_or_else(|| no_node(node))?;
        client
            .trust(name)
            .map_err(|e| node_call(node, &format!("trust the replica of {name}"), e))?;
        tracing::warn!(volume = %name, %node, "replica declared whole by an operator");
        self.volume(name)
    }

    /// Ends a split brain, or a replica refused as unrelated data: `node`'s replica of
    /// `name` gives up its data and is resynced in full, and every other participant
    /// reconnects (the node API's `resolve` on each, the discarded one first: if that
    /// fails nothing changed). Refused unless another replica is UpToDate, which is
    /// what the discarded one is resynced from.
    pub fn resolve(&self, name: &VolumeName, node: &NodeName) -> Result<ClusterVolume, Refusal> {
        let participants = self.participants_if_replica_on(name, node)?;
        let whole_elsewhere =
            self.volume(name)?.participants.iter().any(|p| {
                p.node != *node && p.kind.diskful() && p.disk == Some(DiskState::UpToDate)
            });
        if !whole_elsewhere {
            return Err(Refusal::new(
                Conflict,
                format!(
                    "no replica of volume {name} is UpToDate but the one on {node}: discarding it would leave none whole"
                ),
                "discard a replica while another is UpToDate (`tandem volume show NAME` gives their states); if none is, see `tandem volume trust`",
            ));
        }
        let others = participants.iter().filter(|p| *p != node);
        for p in std::iter::once(node).chain(others) {
            let client = self.client(p).ok_or_else(|| no_node(p))?;
            client
                .resolve(name, node)
                .map_err(|e| node_call(p, &format!("resolve volume {name}"), e))?;
        }
        tracing::warn!(volume = %name, %node, "replica discarded by an operator: it is resynced from the others");
        self.volume(name)
    }

    /// The nodes of `name`'s participants, if `node` holds one of its replicas.
    fn participants_if_replica_on(
        &self,
        name: &VolumeName,
        node: &NodeName,
    ) -> Result<Vec<NodeName>, Refusal> {
        let d = self.desired();
        let row = d.model.volumes.get(name).ok_or_else(|| no_volume(name))?;
        if !row.participant(node).is_some_and(|p| p.kind.diskful()) {
            return Err(Refusal::new(
                Conflict,
                format!("node {node} holds no replica of volume {name}"),
                "name a node holding one: `tandem volume show NAME` lists them",
            ));
        }
        Ok(row.participants.iter().map(|p| p.node.clone()).collect())
    }

    /// Gives a tiebreaker to every two-replica volume without one, where a node is free
    /// for it (volumes created while only their two nodes were online).
    pub(crate) fn settle_tiebreakers(&self) {
        let mut d = self.desired();
        let candidates = self.snapshot(&d, |s| candidates_for(s, None, None));
        let changed: Vec<(VolumeName, VolumeRow)> = d
            .model
            .volumes
            .iter()
            .filter_map(|(name, v)| {
                let others = retaken(&candidates, v);
                let mut v2 = v.clone();
                settle_tiebreaker(&mut v2, &others);
                (v2 != *v).then(|| (name.clone(), v2))
            })
            .collect();
        if changed.is_empty() {
            return;
        }
        let result = self.commit(
            &mut d,
            |w| changed.iter().try_for_each(|(n, v)| w.volume(n, v)),
            |m| {
                for (n, v) in changed.clone() {
                    m.volumes.insert(n, v);
                }
            },
        );
        match result {
            Ok(()) => tracing::info!(volumes = changed.len(), "tiebreakers added"),
            Err(e) => tracing::error!(error = %e.error, "cannot record new tiebreakers"),
        }
    }

    // ---- key-value stores ----

    /// The stores holding at least one key.
    pub fn kv_stores(&self) -> Vec<StoreName> {
        let d = self.desired();
        let mut stores: Vec<StoreName> = d.model.kv.keys().map(|(s, _)| s.clone()).collect();
        stores.dedup();
        stores
    }

    pub fn kv_list(&self, store: &StoreName) -> Vec<KvEntry> {
        self.desired()
            .model
            .kv
            .iter()
            .filter(|((s, _), _)| s == store)
            .map(|((s, k), v)| KvEntry {
                store: s.clone(),
                key: k.clone(),
                value: v.clone(),
            })
            .collect()
    }

    pub fn kv_get(&self, store: &StoreName, key: &str) -> Result<KvEntry, Refusal> {
        check_key(key)?;
        let d = self.desired();
        let value = kv_value(&d, store, key).ok_or_else(|| no_key(store, key))?;
        Ok(KvEntry {
            store: store.clone(),
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }

    /// Sets a key; with `only_if`, only if the key is in that state (checked and changed
    /// under the one lock of the model, so two callers never both succeed).
    pub fn kv_set(
        &self,
        store: &StoreName,
        key: &str,
        value: &str,
        only_if: Option<&KvCondition>,
    ) -> Result<KvEntry, Refusal> {
        check_key(key)?;
        let mut d = self.desired();
        check_condition(&d, store, key, only_if)?;
        self.commit(
            &mut d,
            |w| w.kv_set(store, key, value),
            |m| {
                m.kv.insert((store.clone(), key.to_owned()), value.to_owned());
            },
        )?;
        Ok(KvEntry {
            store: store.clone(),
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }

    /// Deletes a key; with `only_if_value`, only if it holds that value.
    pub fn kv_delete(
        &self,
        store: &StoreName,
        key: &str,
        only_if_value: Option<&str>,
    ) -> Result<(), Refusal> {
        check_key(key)?;
        let mut d = self.desired();
        if kv_value(&d, store, key).is_none() {
            return Err(no_key(store, key));
        }
        let only_if = only_if_value.map(|v| KvCondition::Value(v.to_owned()));
        check_condition(&d, store, key, only_if.as_ref())?;
        self.commit(
            &mut d,
            |w| w.kv_delete(store, key),
            |m| {
                m.kv.remove(&(store.clone(), key.to_owned()));
            },
        )
    }
}

fn kv_value<'a>(d: &'a Desired, store: &StoreName, key: &str) -> Option<&'a str> {
    d.model
        .kv
        .get(&(store.clone(), key.to_owned()))
        .map(String::as_str)
}

fn no_key(store: &StoreName, key: &str) -> Refusal {
    Refusal::new(
        NotFound,
        format!("store {store} has no key {key}"),
        format!("list its keys with `tandem kv list {store}`"),
    )
}

fn check_condition(
    d: &Desired,
    store: &StoreName,
    key: &str,
    only_if: Option<&KvCondition>,
) -> Result<(), Refusal> {
    let now = kv_value(d, store, key);
    let holds = match only_if {
        None => true,
        Some(KvCondition::Absent) => now.is_none(),
        Some(KvCondition::Value(v)) => now == Some(v.as_str()),
    };
    if holds {
        return Ok(());
    }
    let found = match now {
        None => "does not exist".to_owned(),
        Some(v) => format!("holds {v:?}"),
    };
    Err(Refusal::new(
        Conflict,
        format!(
            "key {key} of store {store} {found}: the condition of the change does not hold, nothing was changed"
        ),
        "read the key again and decide on what it holds now",
    ))
}

fn check_key(key: &str) -> Result<(), Refusal> {
    tandem_api::check_kv_key(key).map_err(|why| {
        Refusal::new(
            BadRequest,
            why,
            "use a path of printable words such as sr/vdi/vm1",
        )
    })
}

fn kind_word(kind: ParticipantKind) -> &'static str {
    match kind {
        ParticipantKind::Diskful => "diskful",
        ParticipantKind::Diskless => "diskless",
        ParticipantKind::Tiebreaker => "tiebreaker",
    }
}

/// Every node as a placement candidate for the group's pool (`pool` absent: for
/// tiebreakers, which need none).
pub(crate) fn candidates_for(
    s: &Snapshot<'_>,
    group: Option<&Group>,
    pool: Option<&PoolName>,
) -> Vec<Candidate> {
    s.model
        .nodes
        .keys()
        .map(|node| {
            let o = s.observed.get(node);
            let free = pool.and_then(|pool| {
                o.and_then(|o| o.pools.iter().find(|p| &p.name == pool))
                    .map(|p| p.free)
            });
            let provisioned = pool.map_or(0, |pool| {
                s.model
                    .volumes
                    .values()
                    .filter(|v| {
                        v.participant(node)
                            .is_some_and(|p| p.kind.diskful() && p.pool.as_ref() == Some(pool))
                    })
                    .map(|v| v.size)
                    .sum()
            });
            Candidate {
                node: node.clone(),
                online: o.is_some_and(|o| o.online()),
                allowed: group.is_none_or(|g| g.nodes.is_empty() || g.nodes.contains(node)),
                free,
                provisioned,
                participations: s.model.participations(node),
                taken: false,
            }
        })
        .collect()
}

/// The candidates with `taken` set for the volume's current participants.
pub(crate) fn retaken(candidates: &[Candidate], v: &VolumeRow) -> Vec<Candidate> {
    candidates
        .iter()
        .cloned()
        .map(|mut c| {
            c.taken = v.participant(&c.node).is_some();
            c
        })
        .collect()
}

/// Two replicas cannot form a majority alone: a third, diskless vote (tiebreaker) is
/// added when a node is free for it, and dropped when the replica count changes.
pub(crate) fn settle_tiebreaker(v: &mut VolumeRow, candidates: &[Candidate]) {
    let diskful = v.diskful().count();
    let has_tiebreaker = v
        .participants
        .iter()
        .any(|p| p.kind == ParticipantKind::Tiebreaker);
    if diskful == 2 && !has_tiebreaker {
        if let (Some(node), Some(node_id)) = (placement::tiebreaker(candidates), v.free_node_id()) {
            v.participants.push(ParticipantRow {
                node,
                node_id,
                kind: ParticipantKind::Tiebreaker,
                pool: None,
                attached: false,
                fresh: false,
            });
        }
    } else if diskful != 2 && has_tiebreaker {
        v.participants
            .retain(|p| p.kind != ParticipantKind::Tiebreaker);
    }
}
