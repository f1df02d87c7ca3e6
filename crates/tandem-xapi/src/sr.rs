//! Storage repositories: a resource group of the cluster plus a key-value store of its
//! metadata on the controller, so every host of the pool attaches the same SR.

use serde_json::{Value, json};
use tandem_api::{ClusterVolume, Group, GroupName, KvCondition, PoolName, StoreName, VolumeState};

use crate::Context;
use crate::error::{Kind, XapiError};
use crate::idl::{self, Dict};
use crate::journal;
use crate::lock::SrLock;
use crate::meta::{self, Key, SR_KEY, SrRecord, VOLUME_PREFIX, VolumeMeta};

/// Keys `SR.create` takes in its configuration (`xe sr-create device-config:KEY=...`).
pub const CONFIGURATION: &[(&str, &str)] = &[
    ("replicas", "Diskful replicas of each volume, 1 to 3 [2]"),
    (
        "group",
        "An existing Tandem resource group to place volumes by (instead of replicas and pool)",
    ),
    (
        "pool",
        "The storage pool replicas go in on every node [default]",
    ),
];
/// The key `SR.create` adds to the configuration it returns, which xapi passes to
/// `SR.attach` on every host.
const SR_UUID: &str = "sr_uuid";

/// An SR of the cluster, by its uuid (the `sr` of every call after `SR.attach`).
pub struct Sr<'c> {
    pub ctx: &'c Context,
    pub uuid: String,
    pub store: StoreName,
}

fn store_of(uuid: &str) -> Result<StoreName, XapiError> {
    format!("{}{uuid}", meta::STORE_PREFIX)
        .parse()
        .map_err(|e| {
            XapiError::invalid(format!("{uuid:?} is not an SR uuid this plugin knows: {e}"))
        })
}

impl<'c> Sr<'c> {
    /// An SR that exists.
    pub fn open(ctx: &'c Context, uuid: &str) -> Result<Sr<'c>, XapiError> {
        let sr = Sr {
            ctx,
            uuid: uuid.to_owned(),
            store: store_of(uuid)?,
        };
        sr.record()?;
        Ok(sr)
    }

    pub fn record(&self) -> Result<SrRecord, XapiError> {
        let text = self
            .ctx
            .tandem
            .kv_get(&self.store, SR_KEY)?
            .ok_or_else(|| {
                XapiError::new(
                    Kind::SrDoesNotExist,
                    [
                        self.uuid.clone(),
                        format!(
                            "the cluster has no SR {}: `tandem sr list` shows those it has",
                            self.uuid
                        ),
                    ],
                )
            })?;
        decode(&self.uuid, SR_KEY, &text)
    }

    fn put_record(&self, record: &SrRecord) -> Result<(), XapiError> {
        let value = serde_json::to_string(record).expect("serialisable");
        self.ctx.tandem.kv_set(&self.store, SR_KEY, &value, None)?;
        Ok(())
    }

    /// Takes the SR's lock and settles what operations cut short left.
    pub fn lock(&self) -> Result<SrLock<'c>, XapiError> {
        let node = self.ctx.node()?;
        let lock = SrLock::acquire(&self.ctx.tandem, &self.store, &node.name)?;
        journal::recover(self)?;
        Ok(lock)
    }

    pub fn meta(&self, key: &Key) -> Result<Option<VolumeMeta>, XapiError> {
        let k = meta::volume_key(key);
        match self.ctx.tandem.kv_get(&self.store, &k)? {
            None => Ok(None),
            Some(text) => decode(&self.uuid, &k, &text).map(Some),
        }
    }

    /// The metadata of a volume the SR has and shows (not hidden, not being destroyed).
    pub fn visible(&self, key: &Key) -> Result<VolumeMeta, XapiError> {
        match self.meta(key)? {
            Some(m) if !m.hidden && !m.destroying => Ok(m),
            _ => Err(XapiError::no_volume(&key.to_string())),
        }
    }

    pub fn put_meta(&self, key: &Key, meta: &VolumeMeta) -> Result<(), XapiError> {
        let value = serde_json::to_string(meta).expect("serialisable");
        self.ctx
            .tandem
            .kv_set(&self.store, &meta::volume_key(key), &value, None)?;
        Ok(())
    }

    /// Changes the metadata of a volume the SR shows (see [`Sr::change_meta`]).
    pub fn update_meta(
        &self,
        key: &Key,
        change: impl Fn(&mut VolumeMeta),
    ) -> Result<VolumeMeta, XapiError> {
        self.change_meta(key, |m| {
            if m.hidden || m.destroying {
                return Err(XapiError::no_volume(&key.to_string()));
            }
            change(m);
            Ok(())
        })
    }

    /// Changes a volume's metadata with a conditional write, again if another call
    /// changed it meanwhile: no SR lock needed.
    pub fn change_meta(
        &self,
        key: &Key,
        change: impl Fn(&mut VolumeMeta) -> Result<(), XapiError>,
    ) -> Result<VolumeMeta, XapiError> {
        let k = meta::volume_key(key);
        loop {
            let text = self
                .ctx
                .tandem
                .kv_get(&self.store, &k)?
                .ok_or_else(|| XapiError::no_volume(&key.to_string()))?;
            let mut meta: VolumeMeta = decode(&self.uuid, &k, &text)?;
            change(&mut meta)?;
            let value = serde_json::to_string(&meta).expect("serialisable");
            if self
                .ctx
                .tandem
                .kv_set(&self.store, &k, &value, Some(KvCondition::Value(text)))?
            {
                return Ok(meta);
            }
        }
    }

    pub fn delete_meta(&self, key: &Key) -> Result<(), XapiError> {
        self.ctx
            .tandem
            .kv_delete(&self.store, &meta::volume_key(key), None)?;
        Ok(())
    }

    /// Every volume and snapshot the SR has metadata for, hidden ones included.
    pub fn metas(&self) -> Result<Vec<(Key, VolumeMeta)>, XapiError> {
        let mut out = Vec::new();
        for e in self.ctx.tandem.kv_list(&self.store)? {
            if let Some(k) = e.key.strip_prefix(VOLUME_PREFIX) {
                out.push((k.parse()?, decode(&self.uuid, &e.key, &e.value)?));
            }
        }
        Ok(out)
    }
}

fn decode<T: serde::de::DeserializeOwned>(sr: &str, key: &str, text: &str) -> Result<T, XapiError> {
    serde_json::from_str(text).map_err(|e| {
        XapiError::backend(format!(
            "metadata {key} of SR {sr} is unreadable ({e}): inspect it with `tandem sr dump {sr}`"
        ))
    })
}

fn parse_replicas(text: &str) -> Result<u8, XapiError> {
    match text.parse::<u8>() {
        Ok(n @ 1..=3) => Ok(n),
        _ => Err(XapiError::invalid(format!(
            "replicas={text:?}: give 1, 2 or 3 diskful replicas per volume"
        ))),
    }
}

/// `SR.create`: checks the configuration, makes the resource group (unless one is
/// named) and the SR's record; returns the configuration `SR.attach` gets.
/// Refuses keys a Tandem SR does not take (`also`: others the caller accepts).
fn check_configuration(config: &Dict, also: &[&str]) -> Result<(), XapiError> {
    for key in config.keys() {
        if !CONFIGURATION.iter().any(|(k, _)| k == key) && !also.contains(&key.as_str()) {
            let known: Vec<&str> = CONFIGURATION.iter().map(|(k, _)| *k).collect();
            return Err(XapiError::invalid(format!(
                "device-config key {key:?} is unknown: a Tandem SR takes {}",
                known.join(", ")
            )));
        }
    }
    if let Some(r) = config.get("replicas") {
        parse_replicas(r)?;
    }
    Ok(())
}

pub fn create(ctx: &Context, p: idl::SrCreate) -> Result<Value, XapiError> {
    check_configuration(&p.configuration, &[])?;
    let store = store_of(&p.uuid)?;
    let tandem = &ctx.tandem;
    let config = &p.configuration;
    let (group, new_group) = match config.get("group") {
        Some(name) => {
            if config.contains_key("replicas") || config.contains_key("pool") {
                return Err(XapiError::invalid(
                    "group names the placement: give either group, or replicas and pool",
                ));
            }
            let name: GroupName = name
                .parse()
                .map_err(|e| XapiError::invalid(format!("group: {e}")))?;
            if tandem.group(&name)?.is_none() {
                return Err(XapiError::invalid(format!(
                    "the cluster has no resource group {name}: `tandem group list` shows those it has"
                )));
            }
            (name, None)
        }
        None => {
            let replicas = config
                .get("replicas")
                .map_or(Ok(2), |r| parse_replicas(r))?;
            let pool: PoolName = match config.get("pool") {
                Some(p) => p
                    .parse()
                    .map_err(|e| XapiError::invalid(format!("pool: {e}")))?,
                None => "default".parse().expect("a valid name"),
            };
            let name: GroupName = format!("{}{}", meta::STORE_PREFIX, p.uuid)
                .parse()
                .map_err(|e| XapiError::invalid(format!("uuid: {e}")))?;
            (
                name.clone(),
                Some(Group {
                    name,
                    replicas,
                    pool,
                    nodes: Vec::new(),
                    quorum: Default::default(),
                    on_no_quorum: Default::default(),
                }),
            )
        }
    };
    // The record first, written only if absent: of two creations of one SR, one wins;
    // the group after, so no group is made for an SR that is not recorded.
    let record = SrRecord {
        uuid: p.uuid.clone(),
        name: p.name,
        description: p.description,
        group: group.clone(),
        own_group: new_group.is_some(),
    };
    let value = serde_json::to_string(&record).expect("serialisable");
    if !tandem.kv_set(&store, SR_KEY, &value, Some(KvCondition::Absent))? {
        return Err(XapiError::invalid(format!(
            "the cluster already has an SR {}",
            p.uuid
        )));
    }
    if let Some(g) = new_group
        && let Err(e) = tandem.create_group(&g)
    {
        tandem.kv_delete(&store, SR_KEY, Some(&value))?;
        return Err(e);
    }
    let mut out = p.configuration.clone();
    out.insert(SR_UUID.into(), p.uuid);
    Ok(json!(out))
}

/// `SR.attach` on a host: the SR's uuid, the `sr` of later calls.
pub fn attach(ctx: &Context, p: idl::SrConfiguration) -> Result<Value, XapiError> {
    let uuid = p.configuration.get(SR_UUID).ok_or_else(|| {
        XapiError::invalid(format!(
            "the configuration has no {SR_UUID}: attach an SR made by SR.create"
        ))
    })?;
    let sr = Sr::open(ctx, uuid)?;
    let node = ctx.node()?;
    ctx.tandem
        .kv_set(&sr.store, &meta::host_key(&node.name), "", None)?;
    Ok(json!(sr.uuid))
}

pub fn detach(ctx: &Context, p: idl::SrOnly) -> Result<Value, XapiError> {
    let sr = Sr::open(ctx, &p.sr)?;
    let node = ctx.node()?;
    ctx.tandem
        .kv_delete(&sr.store, &meta::host_key(&node.name), None)?;
    Ok(Value::Null)
}

/// `SR.destroy`: refused while the SR holds volumes; drops its group if it made one.
pub fn destroy(ctx: &Context, p: idl::SrOnly) -> Result<Value, XapiError> {
    let sr = Sr::open(ctx, &p.sr)?;
    let _lock = sr.lock()?;
    let volumes = sr.metas()?;
    if !volumes.is_empty() {
        let keys: Vec<String> = volumes.iter().map(|(k, _)| k.to_string()).collect();
        return Err(XapiError::new(
            Kind::VolumeInUse,
            [format!(
                "SR {} still holds {} volumes ({}): destroy them first",
                sr.uuid,
                keys.len(),
                keys.join(", ")
            )],
        ));
    }
    let record = sr.record()?;
    if record.own_group {
        ctx.tandem.delete_group(&record.group)?;
    }
    // The record last: cut short, the SR is still listed and destroyed again. The lock
    // goes with the guard.
    for e in ctx.tandem.kv_list(&sr.store)? {
        if e.key != meta::LOCK_KEY && e.key != SR_KEY {
            ctx.tandem.kv_delete(&sr.store, &e.key, None)?;
        }
    }
    ctx.tandem.kv_delete(&sr.store, SR_KEY, None)?;
    Ok(Value::Null)
}

/// Changes the SR's record (its name, its description).
fn change_record(
    ctx: &Context,
    uuid: &str,
    change: impl FnOnce(&mut SrRecord),
) -> Result<Value, XapiError> {
    let sr = Sr::open(ctx, uuid)?;
    let _lock = sr.lock()?;
    let mut record = sr.record()?;
    change(&mut record);
    sr.put_record(&record)?;
    Ok(Value::Null)
}

pub fn set_name(ctx: &Context, p: idl::SrSetName) -> Result<Value, XapiError> {
    change_record(ctx, &p.sr, |r| r.name = p.new_name)
}

pub fn set_description(ctx: &Context, p: idl::SrSetDescription) -> Result<Value, XapiError> {
    change_record(ctx, &p.sr, |r| r.description = p.new_description)
}

/// `SR.stat`: capacity as volumes can use it (the pools of the SR's group divided by
/// its replica count; volumes are thin) and health from its volumes' states.
pub fn stat(ctx: &Context, p: idl::SrOnly) -> Result<Value, XapiError> {
    let sr = Sr::open(ctx, &p.sr)?;
    stat_of(&sr)
}

pub fn stat_of(sr: &Sr<'_>) -> Result<Value, XapiError> {
    let record = sr.record()?;
    let tandem = &sr.ctx.tandem;
    let group = tandem.group(&record.group)?.ok_or_else(|| {
        XapiError::backend(format!(
            "the SR's resource group {} is gone from the cluster",
            record.group
        ))
    })?;
    let (mut total, mut free) = (0u64, 0u64);
    for pool in tandem.pools()? {
        if pool.name == group.pool && (group.nodes.is_empty() || group.nodes.contains(&pool.node)) {
            total += pool.capacity.unwrap_or(0);
            free += pool.free.unwrap_or(0);
        }
    }
    let replicas = u64::from(group.replicas.max(1));
    let names: Vec<Key> = sr.metas()?.into_iter().map(|(k, _)| k).collect();
    let volumes = tandem.volumes()?;
    let health = health(&names, &volumes);
    Ok(json!({
        "sr": sr.uuid,
        "uuid": sr.uuid,
        "name": record.name,
        "description": record.description,
        "total_space": total / replicas,
        "free_space": free / replicas,
        "datasources": [],
        "clustered": false,
        "health": health,
    }))
}

/// Healthy while the SR answers: xapi fails a scan on any other health (and takes the
/// SR's state from it), while a volume resyncing after a reboot is routine. What is
/// not UpToDate is said in the message, and in `tandem health`.
fn health(keys: &[Key], volumes: &[ClusterVolume]) -> Value {
    let troubled: Vec<String> = volumes
        .iter()
        .filter(|v| keys.iter().any(|k| k.volume() == &v.name))
        .filter(|v| !matches!(v.state, VolumeState::UpToDate | VolumeState::Creating))
        .map(|v| format!("{} {}", v.name, v.state))
        .collect();
    let message = if troubled.is_empty() {
        String::new()
    } else {
        format!(
            "volumes not UpToDate: {} (`tandem volume status NAME` tells more)",
            troubled.join(", ")
        )
    };
    json!(["Healthy", message])
}

/// `SR.ls` (xapi's scan): every volume and snapshot xapi sees (volumes it destroyed
/// while they had snapshots stay out), after settling operations cut short.
pub fn ls(ctx: &Context, p: idl::SrOnly) -> Result<Value, XapiError> {
    let sr = Sr::open(ctx, &p.sr)?;
    let _lock = sr.lock()?;
    let records = crate::volume::records(&sr)?;
    Ok(Value::Array(records.iter().map(|r| r.to_json()).collect()))
}

/// `SR.probe`: with an `sr_uuid`, the SR if the cluster has it (how an SR is introduced
/// again to a pool); without, the configuration as `SR.create` would take it.
pub fn probe(ctx: &Context, p: idl::SrConfiguration) -> Result<Value, XapiError> {
    check_configuration(&p.configuration, &[SR_UUID])?;
    match p.configuration.get(SR_UUID) {
        Some(uuid) => match Sr::open(ctx, uuid) {
            Ok(sr) => Ok(json!([{
                "configuration": p.configuration,
                "complete": true,
                "sr": stat_of(&sr)?,
                "extra_info": {},
            }])),
            Err(e) if e.kind == Kind::SrDoesNotExist => Ok(json!([])),
            Err(e) => Err(e),
        },
        None => Ok(json!([{
                "configuration": p.configuration,
                "complete": true,
                "extra_info": Dict::new(),
        }])),
    }
}

/// The SRs of the cluster (stores named `sr-UUID` holding an SR record).
pub fn all(ctx: &Context) -> Result<Vec<SrRecord>, XapiError> {
    let mut out = Vec::new();
    for store in ctx.tandem.kv_stores()? {
        if let Some(uuid) = store.as_str().strip_prefix(meta::STORE_PREFIX) {
            let sr = Sr {
                ctx,
                uuid: uuid.to_owned(),
                store: store.clone(),
            };
            match sr.record() {
                Ok(r) => out.push(r),
                // Another tool's store of the same shape.
                Err(e) if e.kind == Kind::SrDoesNotExist => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

/// `Plugin.ls`: the SRs attached on this host.
pub fn attached_here(ctx: &Context) -> Result<Value, XapiError> {
    let node = ctx.node()?;
    let mut out = Vec::new();
    for record in all(ctx)? {
        let store = store_of(&record.uuid)?;
        if ctx
            .tandem
            .kv_get(&store, &meta::host_key(&node.name))?
            .is_some()
        {
            out.push(record.uuid);
        }
    }
    Ok(json!(out))
}
