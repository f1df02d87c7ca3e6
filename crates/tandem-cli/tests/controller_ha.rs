//! Controller high availability: every node started with `--controller` is a candidate
//! holding a replica of the system volume (the controller's database), and the
//! controller runs on whichever candidate is its Primary. Three candidates on hosts in
//! network namespaces (see `tandem_lab::netns`): the controller's host is killed, or
//! cut off, and another candidate takes over with everything committed before.
//!
//! These tests need root (they create network namespaces); without it they print
//! "skipped" and pass.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_lab::changes;
use tandem_lab::netns::Lab;
use tandem_lab::{Node, logs, output, poll, wait_for};

/// The longest a takeover may take.
const TAKEOVER: Duration = Duration::from_secs(10);

/// `tandem -o json ARGS` run on `from`'s host, trying the APIs of `apis` in order.
fn cli(from: &Node, apis: &[&Node], args: &[&str]) -> Result<Value, String> {
    changes::cli_in(from.ns.as_deref(), &changes::apis(apis), args)
}

fn must(from: &Node, apis: &[&Node], args: &[&str]) -> Value {
    cli(from, apis, args).unwrap_or_else(|e| panic!("tandem {args:?}: {e}"))
}

/// The system volume as `tandem volume list --all` shows it.
fn system_volume(from: &Node, apis: &[&Node]) -> Option<Value> {
    let all = cli(from, apis, &["volume", "list", "--all"]).ok()?;
    all.as_array()?
        .iter()
        .find(|v| v["name"] == "tandem-controller")
        .cloned()
}

/// Three candidates on three hosts, joined into one cluster whose system volume has
/// a replica on each, all UpToDate.
fn candidates(lab: &Lab, prefix: &str) -> Vec<Node> {
    let nodes: Vec<Node> = (0..3)
        .map(|i| lab.start_with(i, &format!("{prefix}{}", i + 1), &["--controller"]))
        .collect();
    for n in &nodes[1..] {
        must(
            &nodes[0],
            &[&nodes[0]],
            &["node", "create", &n.name, &n.api.to_string()],
        );
    }
    let all: Vec<&Node> = nodes.iter().collect();
    wait_for(
        "the system volume has three UpToDate replicas",
        Duration::from_secs(60),
        &all,
        || {
            let v = system_volume(&nodes[0], &all).ok_or("not listed")?;
            let up: Vec<&Value> = v["participants"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["kind"] == "diskful" && p["disk"] == "UpToDate")
                .collect();
            if up.len() == 3 && v["state"] == "UpToDate" {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    );
    nodes
}

/// What the cluster holds, as the CLI lists it: names of nodes, groups, volumes, and
/// every key-value pair of store `ha`.
fn objects(from: &Node, apis: &[&Node]) -> Value {
    let names = |args: &[&str]| -> Vec<String> {
        let list = must(from, apis, args);
        let mut names: Vec<String> = (list.as_array().unwrap().iter())
            .map(|o| o["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    serde_json::json!({
        "nodes": names(&["node", "list"]),
        "groups": names(&["group", "list"]),
        "volumes": names(&["volume", "list"]),
        "kv": must(from, apis, &["kv", "list", "ha"]),
    })
}

/// Waits until the cluster, asked through `apis`, names a controller among `among`;
/// that controller's node and how long it took.
fn await_controller(
    from: &Node,
    apis: &[&Node],
    among: &[&Node],
    since: Instant,
) -> (String, Duration) {
    let name = poll(TAKEOVER + Duration::from_secs(20), || {
        let info = cli(from, apis, &["cluster"]).ok()?;
        let name = info["controller"].as_str()?.to_owned();
        among.iter().any(|n| n.name == name).then_some(name)
    })
    .unwrap_or_else(|| panic!("no controller among the candidates\n{}", logs(among)));
    (name, since.elapsed())
}

/// The nodes but the one at `index`.
fn others(nodes: &[Node], index: usize) -> Vec<&Node> {
    (nodes.iter().enumerate())
        .filter(|(i, _)| *i != index)
        .map(|(_, n)| n)
        .collect()
}

/// SIGKILLs the controller's node and waits for another candidate to run the
/// controller (within [`TAKEOVER`]): the killed node's index, the new controller, and
/// how long the takeover took as the CLI sees it.
fn kill_controller(nodes: &mut [Node]) -> (usize, String, Duration) {
    let all: Vec<&Node> = nodes.iter().collect();
    let info = must(&nodes[0], &all, &["cluster"]);
    let victim = (nodes.iter())
        .position(|n| info["controller"] == n.name.as_str())
        .unwrap();
    nodes[victim].kill();
    let killed = Instant::now();
    let survivors = others(nodes, victim);
    let (name, took) = await_controller(survivors[0], &survivors, &survivors, killed);
    assert!(
        took <= TAKEOVER,
        "takeover took {took:?}\n{}",
        logs(&survivors)
    );
    (victim, name, took)
}

/// Sends a node-API request as the controller of `epoch` at `address` would.
fn as_controller(node: &Node, secret: &str, epoch: u64, address: &str) -> (u16, String) {
    let url = node.url("/v1/node/replicated");
    let cmd = format!(
        "curl -s -o /dev/stderr -w '%{{http_code}}' -H 'Authorization: Bearer {secret}' \
         -H 'X-Tandem-Epoch: {epoch}' -H 'X-Tandem-Controller: {address}' {url}"
    );
    let mut sh = Command::new("sh");
    sh.args(["-c", &cmd]);
    let out = output(&mut node.here(sh));
    let status = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Waits until the system volume, as `from` lists it, is UpToDate on every replica.
fn await_whole_system_volume(from: &Node, nodes: &[&Node]) {
    wait_for(
        "the system volume is whole again",
        Duration::from_secs(60),
        nodes,
        || {
            let v = system_volume(from, &[from]).ok_or("not listed")?;
            (v["state"] == "UpToDate")
                .then_some(())
                .ok_or(v.to_string())
        },
    );
}

/// Whether the cluster, asked through `node`, names `controller` as its controller.
fn names_controller(node: &Node, controller: &str) -> Result<(), String> {
    let info = cli(node, &[node], &["cluster"])?;
    (info["controller"] == controller)
        .then_some(())
        .ok_or(info.to_string())
}

#[test]
fn killing_the_controllers_host_hands_the_controller_to_another_candidate() {
    let Some(lab) = Lab::new(3) else { return };
    let mut nodes = candidates(&lab, "hk");
    let all: Vec<&Node> = nodes.iter().collect();
    let first = &nodes[0];
    must(first, &all, &["group", "create", "pair", "--replicas", "2"]);
    must(
        first,
        &all,
        &["volume", "create", "v1", "--size", "16M", "--group", "pair"],
    );
    for i in 0..5 {
        must(
            first,
            &all,
            &["kv", "set", "ha", &format!("key{i}"), &format!("value {i}")],
        );
    }
    let before = objects(first, &all);
    // Every candidate keeps copies of the database's backups, checked there.
    wait_for(
        "every candidate holds a backup",
        Duration::from_secs(30),
        &all,
        || {
            nodes.iter().all(|n| {
                std::fs::read_dir(n.dir.join("backups")).is_ok_and(|files| {
                    files.flatten().any(|f| {
                        let name = f.file_name().to_string_lossy().into_owned();
                        name.starts_with("controller-")
                            && name.ends_with(".db")
                            && std::fs::read(f.path())
                                .is_ok_and(|b| b.starts_with(b"SQLite format 3\0"))
                    })
                })
            })
        },
    );
    let info = must(first, &all, &["cluster"]);
    let (old_epoch, old_name) = (info["epoch"].as_u64().unwrap(), info["controller"].clone());
    let (victim, name, took) = kill_controller(&mut nodes);
    eprintln!("takeover after the kill: {took:?}");
    let survivors = others(&nodes, victim);
    let from = survivors[0];
    assert_ne!(Value::String(name.clone()), old_name);
    let info = must(from, &survivors, &["cluster"]);
    assert!(info["epoch"].as_u64().unwrap() > old_epoch, "{info:#}");

    // Everything committed before is there, through either survivor alone.
    for n in &survivors {
        assert_eq!(objects(from, &[n]), before, "through {}", n.name);
    }
    // And the new controller changes things.
    must(
        from,
        &[survivors[1]],
        &["kv", "set", "ha", "after", "takeover"],
    );
    must(
        from,
        &[survivors[0]],
        &["volume", "create", "v2", "--size", "16M", "--group", "pair"],
    );

    // Each change raises the volume's spec revision, which the nodes hold.
    let revision = |n: &Node| {
        let r = n.api_as(&changes::secret(n), "GET", "/v1/node/replicated", None);
        (r.json().as_array().unwrap().iter())
            .find(|v| v["spec"]["name"] == "v1")
            .and_then(|v| v["spec"]["revision"].as_u64())
            .unwrap_or(0)
    };
    let holder = (survivors.iter())
        .find(|n| revision(n) > 0)
        .expect("a survivor holds v1");
    let before = revision(holder);
    must(
        from,
        &survivors,
        &["volume", "resize", "v1", "--size", "32M"],
    );
    wait_for("the resize reaches the node", TAKEOVER, &survivors, || {
        revision(holder) > before
    });

    // A request replayed with the old epoch is refused by a node, saying why.
    let (status, body) = as_controller(
        survivors[0],
        &changes::secret(survivors[0]),
        old_epoch,
        "10.0.0.1:3370",
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("this controller was replaced"), "{body}");

    // The killed candidate comes back as one more replica, and answers through the new
    // controller.
    nodes[victim].restart();
    let all: Vec<&Node> = nodes.iter().collect();
    let back = &nodes[victim];
    wait_for(
        "the old host forwards to the new controller",
        TAKEOVER,
        &all,
        || names_controller(back, &name),
    );
    await_whole_system_volume(back, &all);
    let after = objects(back, &[back]);
    assert_eq!(after["kv"].as_array().unwrap().len(), 6, "{after:#}");
    assert_eq!(after["volumes"], serde_json::json!(["v1", "v2"]));
}

#[test]
fn a_partitioned_controller_stops_and_the_majority_elects_another() {
    let Some(lab) = Lab::new(3) else { return };
    let nodes = candidates(&lab, "hp");
    let all: Vec<&Node> = nodes.iter().collect();
    must(&nodes[0], &all, &["kv", "set", "ha", "before", "cut"]);
    let info = must(&nodes[0], &all, &["cluster"]);
    let cut = nodes
        .iter()
        .position(|n| info["controller"] == n.name.as_str())
        .unwrap();
    let lonely = &nodes[cut];
    let majority = others(&nodes, cut);

    lab.cut(cut);
    let since = Instant::now();
    // The cut-off side stops accepting changes, with a clear reason.
    let refused = poll(TAKEOVER, || {
        cli(lonely, &[lonely], &["kv", "set", "ha", "lonely", "write"])
            .err()
            .filter(|e| e.contains("no controller"))
    })
    .unwrap_or_else(|| {
        panic!(
            "the cut-off controller still accepts changes\n{}",
            logs(&all)
        )
    });
    assert!(
        refused.contains("stopped") || refused.contains("no quorum among candidates"),
        "{refused}"
    );
    // Once it has stopped, it says why no controller runs there.
    let expected = format!(
        "no quorum among candidates {} (node {} reaches 1 of 3)",
        ["hp1", "hp2", "hp3"].join(","),
        lonely.name
    );
    let said = poll(TAKEOVER, || {
        cli(lonely, &[lonely], &["kv", "set", "ha", "lonely", "write"])
            .err()
            .filter(|e| e.contains("no quorum among candidates"))
    })
    .unwrap_or_else(|| panic!("no reason given\n{}", logs(&all)));
    assert!(said.contains(&expected), "{said}");
    // The majority elects another within the bound.
    let (name, took) = await_controller(majority[0], &majority, &majority, since);
    eprintln!("takeover after the cut: {took:?}");
    assert!(took <= TAKEOVER, "takeover took {took:?}\n{}", logs(&all));
    must(
        majority[0],
        &majority,
        &["kv", "set", "ha", "majority", "write"],
    );

    // Healed: one controller, whichever node is asked; the write the cut-off side
    // refused is nowhere, the majority's is everywhere.
    lab.heal(cut);
    for n in &nodes {
        wait_for(
            "every node names the same controller",
            TAKEOVER * 2,
            &all,
            || names_controller(n, &name),
        );
    }
    let kv = must(lonely, &[lonely], &["kv", "list", "ha"]);
    let keys: Vec<&str> = (kv.as_array().unwrap().iter())
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["before", "majority"], "{kv:#}");
    await_whole_system_volume(lonely, &all);
}

#[test]
fn ten_controller_kills_under_a_loop_of_changes_lose_nothing_acknowledged() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(lab) = Lab::new(3) else { return };
    let mut nodes = candidates(&lab, "hl");
    let stop = AtomicBool::new(false);
    let mut takeovers = Vec::new();
    let apis = changes::apis(&nodes.iter().collect::<Vec<_>>());
    let history = std::thread::scope(|s| {
        let (ns, apis, stop) = (nodes[2].ns.clone(), &apis, &stop);
        let opts = changes::Options {
            attach_on: vec![nodes[0].name.clone()],
            snapshot: vec![],
        };
        let looping = s.spawn(move || changes::change_loop(ns.as_deref(), apis, stop, &opts));
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(1500));
            let (victim, _, took) = kill_controller(&mut nodes);
            takeovers.push(took);
            nodes[victim].restart();
            let all: Vec<&Node> = nodes.iter().collect();
            await_whole_system_volume(&nodes[victim], &all);
        }
        stop.store(true, Ordering::Relaxed);
        looping.join().unwrap()
    });
    let (requests, failed) = history.counts();
    eprintln!(
        "10 kills: takeovers {takeovers:?}; {requests} changes asked, {failed} failed; {history:?}"
    );
    let created = history.created.iter().filter(|(_, ok)| *ok).count();
    assert!(created >= 10, "the loop made progress");

    // Every acknowledged change is there; nothing is gone that the loop did not
    // delete, nothing there that it did not ask for.
    let all: Vec<&Node> = nodes.iter().collect();
    let from = &nodes[0];
    let problems = history.problems(from.ns.as_deref(), &apis);
    assert!(problems.is_empty(), "{problems:#?}");
    // The replicas on the nodes come to match the model: each node holds exactly the
    // volumes it takes part in, the system volume included.
    wait_for(
        "every node holds what the model says",
        Duration::from_secs(60),
        &all,
        || changes::replicas_match_model(from, &apis, &all),
    );
}
