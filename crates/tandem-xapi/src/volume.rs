//! Volumes of an SR: Tandem volumes, and Tandem snapshots as read-only volumes
//! (`VOLUME@SNAPSHOT`). Multi-step operations hold the SR's lock and keep an intent in
//! its journal; changes of metadata alone are conditional writes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tandem_api::{
    ClusterSnapshot, ClusterVolume, CreateClusterVolume, SnapshotName, VolumeName, VolumeState,
};

use crate::Context;
use crate::cbt;
use crate::error::{Kind, XapiError};
use crate::fault;
use crate::idl::{self, VolumeRecord};
use crate::journal::{self, Intent};
use crate::meta::{self, Key, VolumeMeta, fresh};
use crate::sr::Sr;

const BLOCK: u64 = 4096;

/// A size from xapi, rounded up to whole 4 KiB blocks (Tandem's unit).
fn size_of(what: &str, size: i64) -> Result<u64, XapiError> {
    if size <= 0 {
        return Err(XapiError::invalid(format!(
            "{what} {size}: a volume has a positive size in bytes"
        )));
    }
    (size as u64)
        .checked_next_multiple_of(BLOCK)
        .ok_or_else(|| XapiError::invalid(format!("{what} {size} is too large")))
}

/// What Tandem knows of the SR's volumes and snapshots, fetched once per call.
struct Facts {
    volumes: BTreeMap<VolumeName, ClusterVolume>,
    snapshots: BTreeMap<(VolumeName, SnapshotName), ClusterSnapshot>,
}

impl Facts {
    fn of_volume(sr: &Sr<'_>, volume: &VolumeName) -> Result<Facts, XapiError> {
        let tandem = &sr.ctx.tandem;
        let volumes = tandem.volume(volume)?.into_iter().collect();
        let snapshots = tandem.snapshots(volume)?;
        Ok(Facts::new(volumes, snapshots))
    }

    fn all(sr: &Sr<'_>) -> Result<Facts, XapiError> {
        let tandem = &sr.ctx.tandem;
        Ok(Facts::new(tandem.volumes()?, tandem.all_snapshots()?))
    }

    fn new(volumes: Vec<ClusterVolume>, snapshots: Vec<ClusterSnapshot>) -> Facts {
        Facts {
            volumes: volumes.into_iter().map(|v| (v.name.clone(), v)).collect(),
            snapshots: snapshots
                .into_iter()
                .map(|s| ((s.volume.clone(), s.name.clone()), s))
                .collect(),
        }
    }

    fn record(&self, sr: &Sr<'_>, key: &Key, meta: &VolumeMeta) -> Result<VolumeRecord, XapiError> {
        let gone = || {
            XapiError::backend(format!(
                "volume {key} has metadata in SR {} but Tandem has no such {}: `tandem sr forget {} volume/{key}` drops it",
                sr.uuid,
                if matches!(key, Key::Volume(_)) {
                    "volume"
                } else {
                    "snapshot"
                },
                sr.uuid
            ))
        };
        let size = match key {
            Key::Volume(v) => self.volumes.get(v).ok_or_else(gone)?.size,
            Key::Snapshot(v, s) => {
                self.snapshots
                    .get(&(v.clone(), s.clone()))
                    .ok_or_else(gone)?
                    .size
            }
        };
        Ok(VolumeRecord {
            key: key.to_string(),
            name: meta.name.clone(),
            description: meta.description.clone(),
            read_write: matches!(key, Key::Volume(_)),
            virtual_size: size,
            // Logical bytes, as the SR's total and free space are (replicas divided
            // out); thin, so at most this much.
            physical_utilisation: size,
            uri: meta::uri(&sr.uuid, key),
            keys: meta.keys.clone(),
            cbt_enabled: meta.cbt_enabled,
            volume_type: if meta.data_destroyed {
                "CBT_Metadata"
            } else {
                "Data"
            },
        })
    }
}

/// Records of every volume xapi sees. Metadata whose Tandem volume or snapshot is gone
/// (deleted outside xapi) is left out rather than failing the scan; `tandem health`
/// reports it.
pub fn records(sr: &Sr<'_>) -> Result<Vec<VolumeRecord>, XapiError> {
    let facts = Facts::all(sr)?;
    Ok(sr
        .metas()?
        .into_iter()
        .filter(|(_, m)| !m.hidden && !m.destroying)
        .filter_map(|(k, m)| facts.record(sr, &k, &m).ok())
        .collect())
}

fn record(sr: &Sr<'_>, key: &Key) -> Result<Value, XapiError> {
    let meta = sr.visible(key)?;
    let facts = Facts::of_volume(sr, key.volume())?;
    Ok(facts.record(sr, key, &meta)?.to_json())
}

fn live(key: &Key, what: &str) -> Result<VolumeName, XapiError> {
    match key {
        Key::Volume(v) => Ok(v.clone()),
        Key::Snapshot(..) => Err(XapiError::invalid(format!(
            "{key} is a snapshot, read-only: {what} works on volumes"
        ))),
    }
}

pub fn create(ctx: &Context, p: idl::VolumeCreate) -> Result<Value, XapiError> {
    if p.sharable {
        return Err(XapiError::invalid(
            "sharable volumes are not supported: a Tandem volume has one writer at a time",
        ));
    }
    let size = size_of("size", p.size)?;
    let sr = Sr::open(ctx, &p.sr)?;
    let _lock = sr.lock()?;
    let group = sr.record()?.group;
    let volume: VolumeName = fresh("vdi");
    let entry = journal::begin(
        &sr,
        Intent::Create {
            volume: volume.clone(),
        },
    )?;
    fault::point("create.1");
    ctx.tandem.create_volume(&CreateClusterVolume {
        name: volume.clone(),
        size,
        replicas: None,
        group: Some(group),
    })?;
    fault::point("create.2");
    wait_ready(ctx, &volume);
    let key = Key::Volume(volume);
    sr.put_meta(
        &key,
        &VolumeMeta {
            name: p.name,
            description: p.description,
            ..VolumeMeta::default()
        },
    )?;
    fault::point("create.3");
    entry.finish();
    record(&sr, &key)
}

/// How long a new volume's replicas may take to connect.
const READY_WAIT: Duration = Duration::from_secs(30);

/// Waits (bounded) until a new volume (created or cloned) is UpToDate on its replicas:
/// xapi may snapshot or attach it right after, which needs its replicas connected, and
/// a clone's snapshot may go only then. Whether it got there; past the bound the volume
/// is returned as it is, and what needs it says why it cannot.
fn wait_ready(ctx: &Context, volume: &VolumeName) -> bool {
    let deadline = Instant::now() + READY_WAIT;
    let mut pause = Duration::from_millis(10);
    while Instant::now() < deadline {
        match ctx.tandem.volume(volume) {
            Ok(Some(v)) if v.state == VolumeState::UpToDate => return true,
            Ok(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(_) => return false,
        }
    }
    false
}

/// `Volume.snapshot`: a Tandem snapshot, crash-consistent across the replicas, as a
/// read-only volume `VOLUME@SNAPSHOT`.
pub fn snapshot(ctx: &Context, p: idl::VolumeKey) -> Result<Value, XapiError> {
    let key: Key = p.key.parse()?;
    let sr = Sr::open(ctx, &p.sr)?;
    let _lock = sr.lock()?;
    let source = sr.visible(&key)?;
    let volume = live(&key, "Volume.snapshot")?;
    let snap: SnapshotName = fresh("snap");
    let entry = journal::begin(
        &sr,
        Intent::Snapshot {
            volume: volume.clone(),
            snapshot: snap.clone(),
        },
    )?;
    fault::point("snapshot.1");
    ctx.tandem.create_snapshot(&volume, &snap)?;
    fault::point("snapshot.2");
    let new = Key::Snapshot(volume, snap);
    sr.put_meta(
        &new,
        &VolumeMeta {
            name: source.name,
            description: source.description,
            cbt_enabled: source.cbt_enabled,
            ..VolumeMeta::default()
        },
    )?;
    fault::point("snapshot.3");
    entry.finish();
    record(&sr, &new)
}

/// `Volume.clone`: a new writable volume with the bytes of a snapshot, or of a volume
/// as it is now (through a snapshot taken for the clone and deleted after).
pub fn clone(ctx: &Context, p: idl::VolumeKey) -> Result<Value, XapiError> {
    let key: Key = p.key.parse()?;
    let sr = Sr::open(ctx, &p.sr)?;
    let _lock = sr.lock()?;
    let source = sr.visible(&key)?;
    source.has_data(&key)?;
    let new: VolumeName = fresh("vdi");
    let (volume, snap, temporary) = match &key {
        Key::Volume(v) => (v.clone(), fresh("clone"), true),
        Key::Snapshot(v, s) => (v.clone(), s.clone(), false),
    };
    let entry = journal::begin(
        &sr,
        Intent::Clone {
            new: new.clone(),
            source: volume.clone(),
            snapshot: snap.clone(),
            temporary,
        },
    )?;
    fault::point("clone.1");
    if temporary {
        ctx.tandem.create_snapshot(&volume, &snap)?;
    }
    fault::point("clone.2");
    ctx.tandem.clone_snapshot(&volume, &snap, &new)?;
    let ready = wait_ready(ctx, &new);
    fault::point("clone.3");
    let new_key = Key::Volume(new);
    sr.put_meta(
        &new_key,
        &VolumeMeta {
            name: source.name,
            description: source.description,
            ..VolumeMeta::default()
        },
    )?;
    fault::point("clone.4");
    // The clone's replicas are built from the snapshot: a temporary one goes once
    // they are, now or (the intent kept) at a later call.
    if temporary && !(ready && ctx.tandem.delete_snapshot(&volume, &snap).is_ok()) {
        entry.keep();
    } else {
        entry.finish();
    }
    record(&sr, &new_key)
}

/// `Volume.destroy`. A volume whose snapshots xapi still has is hidden, not deleted
/// (its snapshots live on its blocks); it goes with the last of them. The volume is
/// marked first (no attach starts after), then checked unused, then deleted.
pub fn destroy(ctx: &Context, p: idl::VolumeKey) -> Result<Value, XapiError> {
    let key: Key = p.key.parse()?;
    let sr = Sr::open(ctx, &p.sr)?;
    let _lock = sr.lock()?;
    sr.visible(&key)?;
    if let Key::Volume(v) = &key
        && has_snapshots(&sr, v)?
    {
        in_use(&sr, &key)?;
        sr.update_meta(&key, |m| m.hidden = true)?;
        return Ok(Value::Null);
    }
    sr.update_meta(&key, |m| m.destroying = true)?;
    if let Err(e) = in_use(&sr, &key) {
        sr.change_meta(&key, |m| {
            m.destroying = false;
            Ok(())
        })?;
        return Err(e);
    }
    let entry = journal::begin(
        &sr,
        Intent::Destroy {
            key: key.to_string(),
        },
    )?;
    fault::point("destroy.1");
    destroy_steps(&sr, &key)?;
    entry.finish();
    Ok(Value::Null)
}

fn has_snapshots(sr: &Sr<'_>, volume: &VolumeName) -> Result<bool, XapiError> {
    Ok(sr
        .metas()?
        .iter()
        .any(|(k, _)| matches!(k, Key::Snapshot(v, _) if v == volume)))
}

/// Refuses what a host has attached (a datapath mark), or, for a volume, what Tandem
/// has attached or open anywhere (an operator's attachment, say).
pub fn in_use(sr: &Sr<'_>, key: &Key) -> Result<(), XapiError> {
    let me = key.to_string();
    let mut users: Vec<String> = sr
        .ctx
        .tandem
        .kv_list(&sr.store)?
        .iter()
        .filter_map(|e| meta::attachment_of(&e.key))
        .filter(|(_, k)| *k == me)
        .map(|(node, _)| format!("{node} (attached by xapi)"))
        .collect();
    if let Key::Volume(v) = key
        && let Some(v) = sr.ctx.tandem.volume(v)?
    {
        for p in v.participants.iter().filter(|p| p.attached || p.open) {
            let how = if p.open { "open" } else { "attached" };
            users.push(format!("{} ({how} in Tandem)", p.node));
        }
    }
    if users.is_empty() {
        return Ok(());
    }
    Err(XapiError::new(
        Kind::VolumeInUse,
        [
            me,
            format!(
                "in use on node {}: detach it (shut down the VM using it) first",
                users.join(", ")
            ),
        ],
    ))
}

/// The steps of a destruction, each one done again harmlessly (a journal's recovery
/// runs them after a crash).
pub fn destroy_steps(sr: &Sr<'_>, key: &Key) -> Result<(), XapiError> {
    let tandem = &sr.ctx.tandem;
    match key {
        Key::Volume(v) => tandem.delete_volume(v)?,
        Key::Snapshot(v, s) => tandem.delete_snapshot(v, s)?,
    };
    fault::point("destroy.2");
    sr.delete_meta(key)?;
    if let Key::Snapshot(v, _) = key {
        let origin = Key::Volume(v.clone());
        if sr.meta(&origin)?.is_some_and(|m| m.hidden) && !has_snapshots(sr, v)? {
            tandem.delete_volume(v)?;
            sr.delete_meta(&origin)?;
        }
    }
    Ok(())
}

pub fn stat(ctx: &Context, p: idl::VolumeKey) -> Result<Value, XapiError> {
    let key: Key = p.key.parse()?;
    let sr = Sr::open(ctx, &p.sr)?;
    record(&sr, &key)
}

/// Changes metadata only, then answers `null`.
fn change(
    ctx: &Context,
    sr: &str,
    key: &str,
    f: impl Fn(&mut VolumeMeta),
) -> Result<Value, XapiError> {
    let key: Key = key.parse()?;
    let sr = Sr::open(ctx, sr)?;
    sr.update_meta(&key, f)?;
    Ok(Value::Null)
}

pub fn set_name(ctx: &Context, p: idl::VolumeSetName) -> Result<Value, XapiError> {
    change(ctx, &p.sr, &p.key, |m| m.name = p.new_name.clone())
}

pub fn set_description(ctx: &Context, p: idl::VolumeSetDescription) -> Result<Value, XapiError> {
    change(ctx, &p.sr, &p.key, |m| {
        m.description = p.new_description.clone()
    })
}

pub fn set(ctx: &Context, p: idl::VolumeSet) -> Result<Value, XapiError> {
    change(ctx, &p.sr, &p.key, |m| {
        m.keys.insert(p.k.clone(), p.v.clone());
    })
}

pub fn unset(ctx: &Context, p: idl::VolumeUnset) -> Result<Value, XapiError> {
    change(ctx, &p.sr, &p.key, |m| {
        m.keys.remove(&p.k);
    })
}

/// `Volume.data_destroy`: a snapshot becomes changed-block metadata only (see
/// [`VolumeMeta::data_destroyed`]); a backup tool destroys it once a later snapshot
/// has been backed up, which frees its blocks.
pub fn data_destroy(ctx: &Context, p: idl::VolumeKey) -> Result<Value, XapiError> {
    let key: Key = p.key.parse()?;
    let sr = Sr::open(ctx, &p.sr)?;
    sr.visible(&key)?;
    if matches!(key, Key::Volume(_)) {
        return Err(XapiError::invalid(format!(
            "{key} is a volume: only a snapshot's data is destroyed (xapi's VDI.data_destroy)"
        )));
    }
    in_use(&sr, &key)?;
    sr.update_meta(&key, |m| m.data_destroyed = true)?;
    Ok(Value::Null)
}

pub fn enable_cbt(ctx: &Context, p: idl::VolumeKey) -> Result<Value, XapiError> {
    change(ctx, &p.sr, &p.key, |m| m.cbt_enabled = true)
}

pub fn disable_cbt(ctx: &Context, p: idl::VolumeKey) -> Result<Value, XapiError> {
    change(ctx, &p.sr, &p.key, |m| m.cbt_enabled = false)
}

/// `Volume.resize`: grows a volume on every replica (Tandem does not shrink).
pub fn resize(ctx: &Context, p: idl::VolumeResize) -> Result<Value, XapiError> {
    let key: Key = p.key.parse()?;
    let size = size_of("new_size", p.new_size)?;
    let sr = Sr::open(ctx, &p.sr)?;
    let _lock = sr.lock()?;
    sr.visible(&key)?;
    let volume = live(&key, "Volume.resize")?;
    let now = ctx
        .tandem
        .volume(&volume)?
        .ok_or_else(|| XapiError::no_volume(&p.key))?;
    if size < now.size {
        return Err(XapiError::invalid(format!(
            "new_size {size} is smaller than the volume ({} bytes): volumes only grow",
            now.size
        )));
    }
    if size > now.size {
        ctx.tandem.resize_volume(&volume, size)?;
    }
    Ok(Value::Null)
}

/// `Volume.revert`: the volume takes the bytes of one of its snapshots back, on every
/// replica (Tandem's rollback: the volume closed everywhere).
pub fn revert(ctx: &Context, p: idl::VolumeRevert) -> Result<Value, XapiError> {
    let key: Key = p.key.parse()?;
    let snapshot: Key = p.snapshot.parse()?;
    let sr = Sr::open(ctx, &p.sr)?;
    let _lock = sr.lock()?;
    sr.visible(&key)?;
    sr.visible(&snapshot)?.has_data(&snapshot)?;
    let volume = live(&key, "Volume.revert")?;
    let snap = match &snapshot {
        Key::Snapshot(v, s) if *v == volume => s.clone(),
        _ => {
            return Err(XapiError::invalid(format!(
                "{snapshot} is not a snapshot of {key}"
            )));
        }
    };
    in_use(&sr, &key)?;
    ctx.tandem.rollback(&volume, &snap)?;
    Ok(Value::Null)
}

/// `Volume.list_changed_blocks`: what changed between two snapshots of one volume, as
/// a bitmap of 64 KiB blocks.
pub fn list_changed_blocks(ctx: &Context, p: idl::ChangedBlocks) -> Result<Value, XapiError> {
    let older: Key = p.key.parse()?;
    let newer: Key = p.key2.parse()?;
    let sr = Sr::open(ctx, &p.sr)?;
    sr.visible(&older)?;
    sr.visible(&newer)?;
    let (Key::Snapshot(v1, s1), Key::Snapshot(v2, s2)) = (&older, &newer) else {
        return Err(XapiError::invalid(
            "changed blocks are known between two snapshots of one volume: key and key2 are snapshots",
        ));
    };
    if v1 != v2 {
        return Err(XapiError::invalid(format!(
            "{older} and {newer} are snapshots of different volumes"
        )));
    }
    if p.offset < 0 {
        return Err(XapiError::invalid(format!(
            "offset {}: not negative",
            p.offset
        )));
    }
    let changes = ctx.tandem.changes(v1, s2, s1)?;
    let size = Facts::of_volume(&sr, v1)?
        .snapshots
        .get(&(v2.clone(), s2.clone()))
        .map_or(0, |s| s.size);
    let start = p.offset as u64;
    let end = if p.length < 0 {
        size
    } else {
        start.saturating_add(p.length as u64).min(size)
    };
    let extents: Vec<(u64, u64)> = changes
        .extents
        .iter()
        .map(|e| (e.offset, e.length))
        .collect();
    let bitmap = cbt::bitmap(&extents, start, end.max(start));
    Ok(json!({ "granularity": cbt::GRANULARITY, "bitmap": bitmap }))
}
