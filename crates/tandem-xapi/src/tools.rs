//! What operators use to look into SRs from any node: `tandem sr list|dump|volumes|
//! forget` and the SR findings of `tandem health`.

use serde::Serialize;
use serde_json::Value;
use tandem_api::{Finding, NodeName, ParticipantKind, Severity};

use crate::Context;
use crate::error::XapiError;
use crate::meta::{self, Key};
use crate::sr::{self, Sr};

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SrSummary {
    pub uuid: String,
    pub name: String,
    pub group: String,
    pub volumes: usize,
    /// Hosts (nodes) it is attached on.
    pub hosts: Vec<String>,
}

pub fn list(ctx: &Context) -> Result<Vec<SrSummary>, XapiError> {
    let mut out = Vec::new();
    for record in sr::all(ctx)? {
        let sr = Sr::open(ctx, &record.uuid)?;
        let entries = ctx.tandem.kv_list(&sr.store)?;
        out.push(SrSummary {
            volumes: entries
                .iter()
                .filter(|e| e.key.starts_with(meta::VOLUME_PREFIX))
                .count(),
            hosts: entries
                .iter()
                .filter_map(|e| meta::host_of(&e.key).map(str::to_owned))
                .collect(),
            uuid: record.uuid,
            name: record.name,
            group: record.group.to_string(),
        });
    }
    Ok(out)
}

/// Every key of the SR's store, values decoded where they are JSON.
pub fn dump(ctx: &Context, uuid: &str) -> Result<Value, XapiError> {
    let sr = Sr::open(ctx, uuid)?;
    let mut out = serde_json::Map::new();
    for e in ctx.tandem.kv_list(&sr.store)? {
        let value = serde_json::from_str(&e.value).unwrap_or(Value::String(e.value));
        out.insert(e.key, value);
    }
    Ok(Value::Object(out))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SrVolume {
    pub key: String,
    pub name: String,
    /// The Tandem volume holding its bytes.
    pub volume: String,
    pub hidden: bool,
    /// Nodes holding a replica (of the snapshot, for a snapshot).
    pub replicas: Vec<NodeName>,
    pub attached: Vec<NodeName>,
    pub open: Vec<NodeName>,
    /// The host that has it activated, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<String>,
    /// What is wrong with it, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

pub fn volumes(ctx: &Context, uuid: &str) -> Result<Vec<SrVolume>, XapiError> {
    let sr = Sr::open(ctx, uuid)?;
    let entries = ctx.tandem.kv_list(&sr.store)?;
    let all = ctx.tandem.volumes()?;
    let snaps = ctx.tandem.all_snapshots()?;
    let mut out = Vec::new();
    for (key, m) in sr.metas()? {
        let v = all.iter().find(|v| &v.name == key.volume());
        let nodes = |f: &dyn Fn(&tandem_api::ClusterParticipant) -> bool| -> Vec<NodeName> {
            v.map(|v| {
                v.participants
                    .iter()
                    .filter(|p| f(p))
                    .map(|p| p.node.clone())
                    .collect()
            })
            .unwrap_or_default()
        };
        let (replicas, problem) = match &key {
            Key::Volume(_) => (
                nodes(&|p| p.kind == ParticipantKind::Diskful),
                v.is_none().then(|| "no Tandem volume".to_owned()),
            ),
            Key::Snapshot(vol, s) => {
                match snaps.iter().find(|x| &x.volume == vol && &x.name == s) {
                    Some(x) => (x.replicas.clone(), None),
                    None => (Vec::new(), Some("no Tandem snapshot".to_owned())),
                }
            }
        };
        let active = entries
            .iter()
            .find(|e| e.key == meta::active_key(&key))
            .map(|e| e.value.clone());
        out.push(SrVolume {
            key: key.to_string(),
            name: m.name,
            volume: key.volume().to_string(),
            hidden: m.hidden,
            replicas,
            attached: nodes(&|p| p.attached),
            open: nodes(&|p| p.open),
            active,
            problem,
        });
    }
    Ok(out)
}

/// Drops a key of an SR's store. The metadata of a volume Tandem still has is kept:
/// dropping it would leave the volume unreachable from xapi.
pub fn forget(ctx: &Context, uuid: &str, key: &str) -> Result<(), XapiError> {
    let sr = Sr::open(ctx, uuid)?;
    if let Some(k) = key.strip_prefix(meta::VOLUME_PREFIX) {
        let k: Key = k.parse()?;
        let exists = match &k {
            Key::Volume(v) => ctx.tandem.volume(v)?.is_some(),
            Key::Snapshot(v, s) => ctx.tandem.snapshots(v)?.iter().any(|x| &x.name == s),
        };
        if exists {
            return Err(XapiError::invalid(format!(
                "Tandem still has {k}: destroy it through xapi (or `tandem volume delete`) rather than forget it"
            )));
        }
    }
    if !ctx.tandem.kv_delete(&sr.store, key, None)? {
        return Err(XapiError::invalid(format!("SR {uuid} has no key {key}")));
    }
    Ok(())
}

/// Inconsistencies between SRs and Tandem: metadata without a volume, volumes of an
/// SR's own group without metadata, operations left half done.
pub fn findings(ctx: &Context) -> Result<Vec<Finding>, XapiError> {
    let mut out = Vec::new();
    let mut push = |object: &str, message: String, correction: String| {
        out.push(Finding {
            severity: Severity::Warning,
            object: object.to_owned(),
            message,
            correction,
        })
    };
    let all = ctx.tandem.volumes()?;
    for record in sr::all(ctx)? {
        let object = format!("SR {}", record.uuid);
        for v in volumes(ctx, &record.uuid)? {
            if let Some(problem) = v.problem {
                push(
                    &object,
                    format!("volume {} has metadata but {problem}", v.key),
                    format!(
                        "drop it with `tandem sr forget {} volume/{}`",
                        record.uuid, v.key
                    ),
                );
            }
        }
        let sr = Sr::open(ctx, &record.uuid)?;
        let metas = sr.metas()?;
        if record.own_group {
            for v in all.iter().filter(|v| v.group == record.group) {
                if !metas.iter().any(|(k, _)| k.volume() == &v.name) {
                    push(
                        &object,
                        format!(
                            "Tandem volume {} is in the SR's group but the SR has no metadata for it",
                            v.name
                        ),
                        format!(
                            "delete it with `tandem volume delete {} --force` if nothing uses it",
                            v.name
                        ),
                    );
                }
            }
        }
        for e in ctx.tandem.kv_list(&sr.store)? {
            if e.key.starts_with(meta::JOURNAL_PREFIX) {
                push(
                    &object,
                    format!("an operation was cut short ({}: {})", e.key, e.value),
                    "the SR's next operation completes or undoes it (e.g. `xe sr-scan`)".into(),
                );
            }
        }
    }
    Ok(out)
}
