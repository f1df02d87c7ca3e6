//! Control-plane changes under faults: a loop that creates, grows, attaches, detaches
//! and deletes volumes, takes and deletes snapshots and sets keys through the CLI (the
//! first of a list of nodes that answers), recording what each request was told; and
//! the checks that the cluster then holds every acknowledged change and nothing it was
//! not asked for, and that every node holds the replicas the model gives it.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

use crate::{Node, json, output};

/// `tandem -o json ARGS` run in network namespace `ns`, trying the comma-separated
/// API addresses `apis` in order.
pub fn cli_in(ns: Option<&str>, apis: &str, args: &[&str]) -> Result<Value, String> {
    let mut cmd = match ns {
        Some(ns) => crate::netns::exec(ns, crate::tandem_bin()),
        None => Command::new(crate::tandem_bin()),
    };
    cmd.args(["--controller", apis, "-o", "json"]).args(args);
    let out = output(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        Ok(if stdout.trim().is_empty() {
            Value::Null
        } else {
            json(&stdout)
        })
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The API addresses of `nodes`, as [`cli_in`] takes them.
pub fn apis(nodes: &[&Node]) -> String {
    let list: Vec<String> = nodes.iter().map(|n| n.api_url()).collect();
    list.join(",")
}

/// What the loop does besides creating and deleting volumes and setting keys.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Nodes the loop attaches each new volume on (and detaches it from again).
    pub attach_on: Vec<String>,
    /// Volumes the loop snapshots (on pools that can take snapshots).
    pub snapshot: Vec<String>,
}

/// A request's name and whether it succeeded.
type Asked = Vec<(String, bool)>;

/// What the change loop asked for, and what it was told.
#[derive(Debug, Default)]
pub struct History {
    /// Volumes `l<i>` whose creation / deletion succeeded (true) or failed (outcome
    /// unknown).
    pub created: Asked,
    pub deleted: Asked,
    /// Volumes grown to [`GROWN`].
    pub grown: Asked,
    /// Attachments and detachments: volume@node.
    pub attached: Asked,
    pub detached: Asked,
    /// Snapshots `volume@s<i>`.
    pub snapped: Asked,
    pub unsnapped: Asked,
    /// Keys of store `ha` with their values.
    pub set: Vec<((String, String), bool)>,
}

const SIZE: &str = "16M";
const DELETE_TRIES: u32 = 5;
const GROWN: u64 = 32 << 20;

fn record(list: &mut Asked, name: String, outcome: &Result<Value, String>) {
    list.push((name, outcome.is_ok()));
}

/// Runs changes in namespace `ns` through the APIs `apis` (see [`cli_in`]) until
/// `stop`.
pub fn change_loop(ns: Option<&str>, apis: &str, stop: &AtomicBool, opts: &Options) -> History {
    let cli = |args: &[&str]| cli_in(ns, apis, args);
    let mut h = History::default();
    // Deletions that failed are asked again in the next rounds (up to 5 times: the
    // object may never have been made), as an operator would: a long loop must not
    // pile up what it meant to remove.
    let (mut volumes_to_delete, mut snapshots_to_delete) = (Vec::new(), Vec::new());
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("l{i}");
        let made = cli(&["volume", "create", &name, "--size", SIZE, "--replicas", "2"]);
        record(&mut h.created, name.clone(), &made);
        let (key, value) = (format!("k{i}"), format!("v{i}"));
        let set = cli(&["kv", "set", "ha", &key, &value]);
        h.set.push(((key, value), set.is_ok()));
        if made.is_ok() {
            let grown = cli(&["volume", "resize", &name, "--size", "32M"]);
            record(&mut h.grown, name.clone(), &grown);
            if let Some(node) =
                (!opts.attach_on.is_empty()).then(|| &opts.attach_on[i % opts.attach_on.len()])
            {
                let at = format!("{name}@{node}");
                let attached = cli(&["volume", "attach", &name, "--node", node]);
                record(&mut h.attached, at.clone(), &attached);
                let detached = cli(&["volume", "detach", &name, "--node", node]);
                record(&mut h.detached, at, &detached);
            }
        }
        if !opts.snapshot.is_empty() {
            let volume = &opts.snapshot[i % opts.snapshot.len()];
            let snap = format!("s{i}");
            let taken = cli(&["snapshot", "create", volume, &snap]);
            record(&mut h.snapped, format!("{volume}@{snap}"), &taken);
            if i >= 2 {
                let volume = &opts.snapshot[(i - 2) % opts.snapshot.len()];
                snapshots_to_delete.push((volume.clone(), format!("s{}", i - 2), 0));
            }
        }
        snapshots_to_delete.retain_mut(|(volume, snap, tries)| {
            let gone = cli(&["snapshot", "delete", volume, snap]);
            record(&mut h.unsnapped, format!("{volume}@{snap}"), &gone);
            *tries += 1;
            gone.is_err() && *tries < DELETE_TRIES
        });
        // Each volume goes again two rounds later, but for the first four odd ones,
        // which stay for the checks to find (and a long loop holds a bounded number).
        if i >= 2 && !(i - 2 < 8 && i % 2 == 1) {
            volumes_to_delete.push((format!("l{}", i - 2), 0));
        }
        volumes_to_delete.retain_mut(|(old, tries)| {
            let gone = cli(&["volume", "delete", old]);
            record(&mut h.deleted, old.clone(), &gone);
            *tries += 1;
            gone.is_err() && *tries < DELETE_TRIES
        });
        i += 1;
    }
    h
}

/// Names asked for with success, and with any outcome.
fn names(list: &Asked) -> (BTreeSet<&str>, BTreeSet<&str>) {
    let ok = (list.iter()).filter(|(_, ok)| *ok).map(|(n, _)| n.as_str());
    (ok.collect(), list.iter().map(|(n, _)| n.as_str()).collect())
}

/// Every object made with success is listed unless a deletion (of any outcome) may
/// have removed it; none deleted with success is; every listed one was asked for.
fn made_and_deleted(
    what: &str,
    made: &Asked,
    deleted: &Asked,
    listed: &BTreeSet<String>,
    problems: &mut Vec<String>,
) {
    let ((created, asked), (gone, maybe_gone)) = (names(made), names(deleted));
    for v in created.difference(&maybe_gone) {
        if !listed.contains(*v) {
            problems.push(format!("{what} {v}, created with success, is gone"));
        }
    }
    for v in gone {
        if listed.contains(v) {
            problems.push(format!("{what} {v}, deleted with success, is still listed"));
        }
    }
    for v in listed {
        if !asked.contains(v.as_str()) {
            problems.push(format!("{what} {v} was never asked for"));
        }
    }
}

impl History {
    /// Requests made, and those that failed.
    pub fn counts(&self) -> (usize, usize) {
        let lists = [
            &self.created,
            &self.deleted,
            &self.grown,
            &self.attached,
            &self.detached,
            &self.snapped,
            &self.unsnapped,
        ];
        let all = lists.iter().map(|l| l.len()).sum::<usize>() + self.set.len();
        let failed = (lists.iter().flat_map(|l| l.iter()))
            .filter(|(_, ok)| !ok)
            .count()
            + self.set.iter().filter(|(_, ok)| !ok).count();
        (all, failed)
    }

    /// What the cluster, asked through `apis` from `ns`, holds that contradicts what
    /// the loop was told.
    pub fn problems(&self, ns: Option<&str>, apis: &str) -> Vec<String> {
        let cli = |args: &[&str]| cli_in(ns, apis, args);
        let mut problems = Vec::new();
        let volumes = match cli(&["volume", "list"]) {
            Ok(v) => v,
            Err(e) => return vec![format!("volume list: {e}")],
        };
        let ours = |name: &str| {
            name.strip_prefix('l')
                .is_some_and(|n| n.parse::<u64>().is_ok())
        };
        let listed: BTreeSet<String> = (volumes.as_array().into_iter().flatten())
            .filter_map(|v| v["name"].as_str())
            .filter(|n| ours(n))
            .map(str::to_owned)
            .collect();
        made_and_deleted(
            "volume",
            &self.created,
            &self.deleted,
            &listed,
            &mut problems,
        );
        for v in volumes.as_array().into_iter().flatten() {
            let name = v["name"].as_str().unwrap_or_default();
            let grown = self.grown.iter().any(|(n, ok)| n == name && *ok);
            if grown && v["size"].as_u64().is_none_or(|s| s < GROWN) {
                problems.push(format!(
                    "volume {name}, grown with success, is {}",
                    v["size"]
                ));
            }
        }
        if !self.snapped.is_empty() {
            match cli(&["snapshot", "list"]) {
                Ok(s) => {
                    let listed: BTreeSet<String> = (s.as_array().into_iter().flatten())
                        .map(|s| {
                            format!(
                                "{}@{}",
                                s["volume"].as_str().unwrap_or("?"),
                                s["name"].as_str().unwrap_or("?")
                            )
                        })
                        .collect();
                    made_and_deleted(
                        "snapshot",
                        &self.snapped,
                        &self.unsnapped,
                        &listed,
                        &mut problems,
                    );
                }
                Err(e) => problems.push(format!("snapshot list: {e}")),
            }
        }
        match cli(&["kv", "list", "ha"]) {
            Ok(kv) => {
                let kv: BTreeSet<(String, String)> = (kv.as_array().into_iter().flatten())
                    .map(|e| {
                        let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
                        (s("key"), s("value"))
                    })
                    .collect();
                for (pair, ok) in &self.set {
                    if *ok && !kv.contains(pair) {
                        problems.push(format!("key {pair:?}, set with success, is gone"));
                    }
                }
            }
            Err(e) => problems.push(format!("kv list: {e}")),
        }
        problems
    }
}

/// The cluster's secret, from a node's data directory.
pub fn secret(node: &Node) -> String {
    let text = std::fs::read_to_string(node.dir.join("cluster.json")).expect("cluster.json");
    json(&text)["secret"].as_str().expect("secret").to_owned()
}

/// Whether each node holds exactly the volumes it takes part in by the model (asked
/// through `apis` from `from`'s host), the system volume included.
pub fn replicas_match_model(from: &Node, apis: &str, nodes: &[&Node]) -> Result<(), String> {
    let secret = secret(from);
    let volumes = cli_in(from.ns.as_deref(), apis, &["volume", "list", "--all"])?;
    for n in nodes {
        let wanted: BTreeSet<String> = (volumes.as_array().into_iter().flatten())
            .filter(|v| {
                (v["participants"].as_array().into_iter().flatten())
                    .any(|p| p["node"] == n.name.as_str())
            })
            .filter_map(|v| v["name"].as_str().map(str::to_owned))
            .collect();
        let r = n.api_as(&secret, "GET", "/v1/node/replicated", None);
        let held: BTreeSet<String> = (r.json().as_array().into_iter().flatten())
            .filter_map(|r| r["spec"]["name"].as_str().map(str::to_owned))
            .collect();
        if held != wanted {
            return Err(format!(
                "{} holds {held:?}, the model says {wanted:?}",
                n.name
            ));
        }
    }
    Ok(())
}
