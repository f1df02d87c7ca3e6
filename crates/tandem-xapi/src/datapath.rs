//! The datapath plugin (`tandem://SR/KEY`): makes a volume reachable on this host over
//! NBD and tracks who writes to it. `attach` attaches the Tandem volume to this host's
//! node (diskless when it holds no replica) and answers with the node's NBD socket;
//! `activate` claims the volume for this host, one host at a time.

use serde_json::{Value, json};
use tandem_api::KvCondition;

use crate::Context;
use crate::error::XapiError;
use crate::idl;
use crate::meta::{self, Key};
use crate::sr::Sr;

/// The export a key is served as, and where.
fn nbd_uri(socket: &str, key: &Key) -> String {
    format!("nbd:unix:{socket}:exportname={key}")
}

pub fn attach(ctx: &Context, p: idl::DatapathCall) -> Result<Value, XapiError> {
    let (sr, key) = meta::parse_uri(&p.uri)?;
    let sr = Sr::open(ctx, &sr)?;
    sr.visible(&key)?;
    let node = ctx.node()?;
    let socket = node.nbd_socket.clone().ok_or_else(|| {
        XapiError::backend(format!(
            "tandemd on node {} does not tell its NBD socket: is it the same version as the plugin?",
            node.name
        ))
    })?;
    // The mark first: a detach of another key of the volume running meanwhile sees it.
    ctx.tandem.kv_set(
        &sr.store,
        &meta::attached_key(&node.name, &key),
        &p.domain,
        None,
    )?;
    ctx.tandem.attach(key.volume(), &node.name)?;
    let uri = nbd_uri(&socket, &key);
    Ok(json!({
        "implementations": [
            ["XenDisk", { "backend_type": "qdisk", "params": uri, "extra": {} }],
            ["Nbd", { "uri": uri }],
        ]
    }))
}

/// Who has a volume activated: `HOST DOMAIN`.
fn holder(host: &str, domain: &str) -> String {
    format!("{host} {domain}")
}

pub fn activate(ctx: &Context, p: idl::DatapathCall) -> Result<Value, XapiError> {
    let (sr, key) = meta::parse_uri(&p.uri)?;
    let sr = Sr::open(ctx, &sr)?;
    sr.visible(&key)?;
    if matches!(key, Key::Snapshot(..)) {
        // Read-only: any number of hosts may read a snapshot.
        return Ok(Value::Null);
    }
    let host = ctx.host()?;
    let mark = meta::active_key(&key);
    let mine = holder(&host, &p.domain);
    loop {
        match ctx.tandem.kv_get(&sr.store, &mark)? {
            None => {
                if ctx
                    .tandem
                    .kv_set(&sr.store, &mark, &mine, Some(KvCondition::Absent))?
                {
                    return Ok(Value::Null);
                }
            }
            Some(now) => {
                let other = now.split(' ').next().unwrap_or_default();
                if other != host {
                    return Err(XapiError::activated_elsewhere(other));
                }
                // Activated here already (again for another domain, as on a migration
                // within the host): the latest holds it.
                if ctx.tandem.kv_set(
                    &sr.store,
                    &mark,
                    &mine,
                    Some(KvCondition::Value(now.clone())),
                )? {
                    return Ok(Value::Null);
                }
            }
        }
    }
}

pub fn deactivate(ctx: &Context, p: idl::DatapathCall) -> Result<Value, XapiError> {
    let (sr, key) = meta::parse_uri(&p.uri)?;
    let sr = Sr::open(ctx, &sr)?;
    let host = ctx.host()?;
    let mark = meta::active_key(&key);
    if let Some(now) = ctx.tandem.kv_get(&sr.store, &mark)?
        && now.split(' ').next() == Some(host.as_str())
    {
        ctx.tandem.kv_delete(&sr.store, &mark, Some(&now))?;
    }
    Ok(Value::Null)
}

/// Drops this host's attachment of the key; the Tandem volume is detached from the
/// node once no key of it (the volume, its snapshots) is attached here any more.
pub fn detach(ctx: &Context, p: idl::DatapathCall) -> Result<Value, XapiError> {
    let (sr, key) = meta::parse_uri(&p.uri)?;
    let sr = Sr::open(ctx, &sr)?;
    let node = ctx.node()?;
    ctx.tandem
        .kv_delete(&sr.store, &meta::attached_key(&node.name, &key), None)?;
    let prefix = meta::attached_prefix(&node.name, key.volume());
    let still = ctx.tandem.kv_list(&sr.store)?.into_iter().any(|e| {
        e.key
            .strip_prefix(&prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('@'))
    });
    if !still && ctx.tandem.volume(key.volume())?.is_some() {
        ctx.tandem.detach(key.volume(), &node.name)?;
    }
    Ok(Value::Null)
}
