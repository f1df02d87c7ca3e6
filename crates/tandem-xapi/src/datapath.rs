//! The datapath plugin (`tandem://SR/KEY`): makes a volume reachable on this host over
//! NBD and tracks who writes to it. `attach` attaches the Tandem volume to this host's
//! node (diskless when it holds no replica) and answers with the node's NBD socket;
//! `activate` claims the volume for this host, one host at a time.
//!
//! A host's attachments of a volume's keys (the volume, its snapshots) share the one
//! Tandem attachment of the volume: they are serialised on the host by a file lock, and
//! each leaves a mark `attached/NODE/KEY` in the SR's store, which `Volume.destroy`
//! reads.

use std::fs::File;
use std::os::fd::AsRawFd;

use serde_json::{Value, json};
use tandem_api::{KvCondition, NodeState, VolumeName};

use crate::Context;
use crate::error::XapiError;
use crate::idl;
use crate::meta::{self, Activation, Key};
use crate::sr::Sr;

/// The SR and key a call's URI names.
fn target<'c>(ctx: &'c Context, uri: &str) -> Result<(Sr<'c>, Key), XapiError> {
    let (sr, key) = meta::parse_uri(uri)?;
    Ok((Sr::open(ctx, &sr)?, key))
}

/// Serialises this host's attach and detach calls of one volume's keys (an exclusive
/// `flock`, released when the file closes).
fn host_lock(volume: &VolumeName) -> Result<File, XapiError> {
    let path = std::env::temp_dir().join(format!("tandem-xapi-{volume}.lock"));
    let file = File::create(&path)
        .map_err(|e| XapiError::backend(format!("creating {}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(XapiError::backend(format!(
            "locking {}: {e}",
            path.display()
        )));
    }
    Ok(file)
}

pub fn attach(ctx: &Context, p: idl::DatapathCall) -> Result<Value, XapiError> {
    let (sr, key) = target(ctx, &p.uri)?;
    sr.visible(&key)?.has_data(&key)?;
    let node = ctx.node()?;
    let socket = node.nbd_socket.clone().ok_or_else(|| {
        XapiError::backend(format!(
            "tandemd on node {} does not tell its NBD socket: is it the same version as the plugin?",
            node.name
        ))
    })?;
    let _host = host_lock(key.volume())?;
    let mark = meta::attached_key(&node.name, &key);
    ctx.tandem.kv_set(&sr.store, &mark, &p.domain, None)?;
    // A destruction marks the volume first and reads the marks after: seen from here,
    // either it has begun (and the volume is not visible now) or it sees this mark.
    let attached = sr
        .visible(&key)
        .and_then(|_| ctx.tandem.attach(key.volume(), &node.name));
    if let Err(e) = attached {
        ctx.tandem.kv_delete(&sr.store, &mark, None)?;
        return Err(e);
    }
    let uri = format!("nbd:unix:{socket}:exportname={key}");
    Ok(json!({
        "implementations": [
            ["XenDisk", { "backend_type": "qdisk", "params": uri, "extra": {} }],
            ["Nbd", { "uri": uri }],
        ]
    }))
}

/// Whether the host holding an activation is gone: its node is not online, or the
/// volume is no longer attached there (its host crashed and was cleaned up, say).
fn stale(ctx: &Context, key: &Key, holder: &Activation) -> Result<bool, XapiError> {
    let online = ctx
        .tandem
        .nodes()?
        .iter()
        .any(|n| n.name.as_str() == holder.node && n.state == NodeState::Online);
    let attached = ctx.tandem.volume(key.volume())?.is_some_and(|v| {
        v.participants
            .iter()
            .any(|p| p.node.as_str() == holder.node && p.attached)
    });
    Ok(!online || !attached)
}

pub fn activate(ctx: &Context, p: idl::DatapathCall) -> Result<Value, XapiError> {
    let (sr, key) = target(ctx, &p.uri)?;
    sr.visible(&key)?;
    if matches!(key, Key::Snapshot(..)) {
        // Read-only: any number of hosts may read a snapshot.
        return Ok(Value::Null);
    }
    let host = ctx.host()?;
    let mine = Activation {
        host: host.clone(),
        node: ctx.node()?.name.to_string(),
        domain: p.domain,
    }
    .to_string();
    let mark = meta::active_key(&key);
    loop {
        let condition = match ctx.tandem.kv_get(&sr.store, &mark)? {
            None => KvCondition::Absent,
            // Here already (again for another domain, as a migration within the host
            // does): the latest holds it. Elsewhere: refused unless that host is gone.
            Some(now) => match Activation::parse(&now) {
                Some(h) if h.host != host && !stale(ctx, &key, &h)? => {
                    return Err(XapiError::activated_elsewhere(&h.host));
                }
                _ => KvCondition::Value(now),
            },
        };
        if ctx
            .tandem
            .kv_set(&sr.store, &mark, &mine, Some(condition))?
        {
            return Ok(Value::Null);
        }
    }
}

/// Drops this host's activation for this domain (not one made since for another).
pub fn deactivate(ctx: &Context, p: idl::DatapathCall) -> Result<Value, XapiError> {
    let (sr, key) = target(ctx, &p.uri)?;
    let mine = Activation {
        host: ctx.host()?,
        node: ctx.node()?.name.to_string(),
        domain: p.domain,
    };
    ctx.tandem
        .kv_delete(&sr.store, &meta::active_key(&key), Some(&mine.to_string()))?;
    Ok(Value::Null)
}

/// Drops this host's attachment of the key; the Tandem volume is detached from the
/// node once no key of it is attached here any more. Done again, it does nothing.
pub fn detach(ctx: &Context, p: idl::DatapathCall) -> Result<Value, XapiError> {
    let (sr, key) = target(ctx, &p.uri)?;
    let node = ctx.node()?;
    let _host = host_lock(key.volume())?;
    let mark = meta::attached_key(&node.name, &key);
    let others = ctx.tandem.kv_list(&sr.store)?.into_iter().any(|e| {
        e.key != mark
            && meta::attachment_of(&e.key).is_some_and(|(n, k)| {
                n == node.name.as_str()
                    && k.parse::<Key>().is_ok_and(|k| k.volume() == key.volume())
            })
    });
    let attached_here = ctx.tandem.volume(key.volume())?.is_some_and(|v| {
        v.participants
            .iter()
            .any(|p| p.node == node.name && p.attached)
    });
    if !others && attached_here {
        // Refused while a client still has the export open: the mark stays, so the
        // volume is not destroyed under it.
        ctx.tandem.detach(key.volume(), &node.name)?;
    }
    ctx.tandem.kv_delete(&sr.store, &mark, None)?;
    Ok(Value::Null)
}
