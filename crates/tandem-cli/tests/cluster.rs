//! The cluster through the `tandem` binary: a controller on the first of three loopback
//! nodes, real NBD clients on the volumes it places.

use std::collections::BTreeMap;
use std::time::Duration;

use tandem_lab::{CONVERGE, Cluster, HeldClient, http, qemu_io, run, wait_for};

const G: u64 = 1 << 30;

#[test]
fn placement_is_balanced_and_a_volume_attaches_on_a_node_without_replica() {
    let c = Cluster::start("pl", 3);
    for node in &c.nodes {
        let dir = node.dir.join("fast");
        run(c.tandem().args([
            "pool",
            "create",
            &node.name,
            "fast",
            "--path",
            dir.to_str().unwrap(),
        ]));
    }
    let pools = c.json(&["pool", "list"]);
    assert_eq!(
        pools
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "fast")
            .count(),
        3,
        "{pools:#}"
    );
    run(c.tandem().args([
        "group",
        "create",
        "vms",
        "--pool",
        "fast",
        "--replicas",
        "2",
    ]));
    for i in 0..20 {
        run(c.tandem().args([
            "volume",
            "create",
            &format!("vm{i}"),
            "--size",
            "1G",
            "--group",
            "vms",
        ]));
    }
    let volumes = c.wait_up_to_date(Duration::from_secs(90));
    let mut held: BTreeMap<String, u32> = BTreeMap::new();
    for v in volumes.as_array().unwrap() {
        let diskful = Cluster::participants(v, "diskful");
        assert_eq!(diskful.len(), 2, "{v:#}");
        // Two replicas and a third node: a tiebreaker on it.
        assert_eq!(Cluster::participants(v, "tiebreaker").len(), 1, "{v:#}");
        for n in diskful {
            *held.entry(n).or_default() += 1;
        }
        for p in v["participants"].as_array().unwrap() {
            if p["kind"] == "diskful" {
                assert_eq!(p["pool"], "fast", "{v:#}");
            }
        }
    }
    // 40 replicas on 3 nodes: an even share is 13.3; nobody holds more than one above.
    assert_eq!(held.values().sum::<u32>(), 40);
    assert!(held.values().all(|&h| h <= 14), "{held:?}");
    for node in &c.nodes {
        let files = std::fs::read_dir(node.dir.join("fast"))
            .unwrap()
            .filter(|e| {
                let path = e.as_ref().unwrap().path();
                path.extension().is_some_and(|x| x == "raw" || x == "meta")
            })
            .count() as u32;
        assert_eq!(
            files,
            2 * held[&node.name],
            "{} holds {:?}",
            node.name,
            held
        );
    }

    // Attach vm0 where it has no replica: that node serves it over NBD.
    let vm0 = &volumes.as_array().unwrap()[0];
    assert_eq!(vm0["name"], "vm0");
    let elsewhere = Cluster::participants(vm0, "tiebreaker").remove(0);
    let replica = Cluster::participants(vm0, "diskful").remove(0);
    let attached = c.json(&["volume", "attach", "vm0", "--node", &elsewhere]);
    let p = attached["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == elsewhere.as_str())
        .unwrap();
    assert_eq!(
        (p["kind"].as_str(), p["attached"].as_bool()),
        (Some("diskless"), Some(true))
    );
    let there = c.node(&elsewhere);
    wait_for(
        "the diskless participant is configured",
        CONVERGE,
        &[there],
        || c.held_by(&elsewhere).contains(&"vm0".to_owned()),
    );
    qemu_io(
        &there.uri("vm0"),
        &["write -P 0x5a 1M 3M", "write -P 0xc3 1020M 4M", "flush"],
    );
    let read = qemu_io(
        &c.node(&replica).uri("vm0"),
        &[
            "read -P 0x5a 1M 3M",
            "read -P 0xc3 1020M 4M",
            "read -P 0 0 1M",
        ],
    );
    assert!(!read.contains("Pattern verification failed"), "{read}");
    let data = std::fs::read(c.node(&replica).dir.join("fast/vm0.raw")).unwrap();
    assert_eq!(data.len() as u64, G);
    assert!(data[1 << 20..4 << 20].iter().all(|&b| b == 0x5a));

    // Detached, it goes back to being the tiebreaker.
    let detached = c.json(&["volume", "detach", "vm0", "--node", &elsewhere]);
    assert_eq!(Cluster::participants(&detached, "tiebreaker"), [elsewhere]);
}

#[test]
fn a_node_that_was_offline_converges_when_it_returns() {
    let mut c = Cluster::start("off", 3);
    for v in ["keep", "gone"] {
        run(c.tandem().args(["volume", "create", v, "--size", "64M"]));
    }
    let volumes = c.wait_up_to_date(CONVERGE);
    // The node that goes away holds a replica of both volumes (3 nodes, 2 replicas:
    // pick one that holds "gone").
    let gone = &volumes.as_array().unwrap()[0];
    assert_eq!(gone["name"], "gone");
    let away = Cluster::participants(gone, "diskful")
        .into_iter()
        .find(|n| n != "off1")
        .unwrap();
    let keep_replicas = Cluster::participants(&volumes.as_array().unwrap()[1], "diskful");
    c.node_mut(&away).stop();
    wait_for(
        "the controller sees the node Offline",
        CONVERGE,
        &[],
        || c.json(&["node", "show", &away])["state"] == "Offline",
    );

    run(c.tandem().args(["volume", "delete", "gone"]));
    run(c
        .tandem()
        .args(["volume", "create", "new", "--size", "64M"]));
    let new = c.json(&["volume", "show", "new"]);
    assert!(
        !Cluster::participants(&new, "diskful").contains(&away),
        "placed on an offline node: {new:#}"
    );
    run(c
        .tandem()
        .args(["volume", "attach", "new", "--node", &away]));
    run(c
        .tandem()
        .args(["volume", "resize", "keep", "--size", "128M"]));

    // What the node must hold when back: every volume it takes part in now.
    let want: Vec<String> = c
        .json(&["volume", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| {
            v["participants"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["node"] == away.as_str())
        })
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(want.contains(&"new".to_owned()), "{want:?}");
    c.node_mut(&away).restart();
    let node = c.node(&away);
    wait_for("the returning node converges", CONVERGE, &[node], || {
        let held = c.held_by(&away);
        let gone_files = node.dir.join("pools/default/gone.raw").exists()
            || node.dir.join("pools/default/gone.meta").exists();
        if held == want && !gone_files {
            Ok(())
        } else {
            Err(format!("holds {held:?}, gone files left: {gone_files}"))
        }
    });
    if keep_replicas.contains(&away) {
        wait_for("its replica of keep grew", CONVERGE, &[node], || {
            std::fs::metadata(node.data_file("keep")).unwrap().len() == 128 << 20
        });
    }
    let volumes = c.wait_up_to_date(CONVERGE);
    let names: Vec<&str> = volumes
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["keep", "new"]);
    let (code, out) = c.health();
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_restarted_controller_keeps_every_object_and_resumes_reconciling() {
    let mut c = Cluster::start("rs", 3);
    run(c
        .tandem()
        .args(["group", "create", "solo", "--replicas", "1"]));
    run(c.tandem().args(["volume", "create", "a", "--size", "64M"]));
    run(c
        .tandem()
        .args(["volume", "create", "b", "--size", "64M", "--group", "solo"]));
    run(c.tandem().args(["kv", "set", "sr", "vdi/a", "uuid-1"]));
    c.wait_up_to_date(CONVERGE);
    let before = (
        c.json(&["node", "list"]),
        c.json(&["group", "list"]),
        c.json(&["volume", "list"]),
    );

    // Work left for a node that is down while the controller restarts.
    c.node_mut("rs3").stop();
    wait_for("rs3 is Offline", CONVERGE, &[], || {
        c.json(&["node", "show", "rs3"])["state"] == "Offline"
    });
    run(c.tandem().args(["volume", "attach", "b", "--node", "rs3"]));
    c.node_mut("rs1").stop();
    c.node_mut("rs1").restart();
    c.node_mut("rs3").restart();
    c.wait_nodes_online();
    wait_for(
        "rs3 got the attachment made before the restart",
        CONVERGE,
        &[],
        || c.held_by("rs3").contains(&"b".to_owned()),
    );
    c.wait_up_to_date(CONVERGE);
    let strip = |v: serde_json::Value| {
        // Observed states may differ; the objects themselves may not.
        v.as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["name"].clone(),
                    o["id"].clone(),
                    o["size"].clone(),
                    o["group"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(c.json(&["node", "list"])), strip(before.0));
    assert_eq!(c.json(&["group", "list"]), before.1);
    assert_eq!(strip(c.json(&["volume", "list"])), strip(before.2));
    assert_eq!(c.json(&["kv", "get", "sr", "vdi/a"])["value"], "uuid-1");
}

#[test]
fn bad_input_fails_clearly_and_changes_nothing() {
    let c = Cluster::start("bad", 3);
    run(c
        .tandem()
        .args(["volume", "create", "vm1", "--size", "64M"]));
    c.wait_up_to_date(CONVERGE);
    let before = (c.json(&["volume", "list"]), c.json(&["node", "list"]));
    let dead = tandem_lab::free_addr().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["volume", "attach", "vm1", "--node", "nope"],
            "node nope does not exist",
        ),
        (&["node", "delete", "nope"], "node nope does not exist"),
        (
            &["volume", "create", "vm1", "--size", "64M"],
            "volume vm1 already exists",
        ),
        (
            &["node", "create", "bad2", "127.0.0.1:1"],
            "node bad2 already exists",
        ),
        (
            &["volume", "create", "x", "--size", "0"],
            "not a positive multiple of 4 KiB",
        ),
        (&["volume", "create", "x", "--size", "12Q"], "12Q"),
        (
            &["volume", "create", "x", "--size", "1G", "--replicas", "4"],
            "3 found",
        ),
        (&["volume", "resize", "vm1", "--size", "1M"], "only grow"),
        (&["volume", "delete", "nope"], "volume nope does not exist"),
        (
            &["node", "create", "ghost", &dead],
            "cannot join the cluster",
        ),
        (
            &["group", "create", "g", "--nodes", "nope"],
            "node nope does not exist",
        ),
        (&["kv", "get", "sr", "missing"], "no key missing"),
    ];
    for (args, expected) in cases {
        let stderr = c.fails(args);
        assert!(stderr.contains(expected), "tandem {args:?}: {stderr}");
        assert!(
            stderr.contains("hint:") || stderr.contains("--help"),
            "tandem {args:?}: {stderr}"
        );
    }

    // Delete of an open volume: refused while a client holds it.
    let on = Cluster::participants(&before.0[0], "diskful").remove(0);
    let holder = HeldClient::start(&c.node(&on).uri("vm1"), "h.pread(512, 0)");
    wait_for("the controller sees vm1 open", CONVERGE, &[], || {
        c.json(&["volume", "show", "vm1"])["participants"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["open"] == true)
    });
    let stderr = c.fails(&["volume", "delete", "vm1"]);
    assert!(
        stderr.contains(&format!("volume vm1 is open on {on}")),
        "{stderr}"
    );
    drop(holder);

    // Malformed JSON straight to the API.
    for (method, path, body) in [
        ("POST", "/v1/volumes", "{\"name\": \"x\", \"size\": "),
        (
            "POST",
            "/v1/volumes",
            "{\"name\": \"x\", \"size\": 4096, \"colour\": 1}",
        ),
        ("POST", "/v1/nodes", "[]"),
        ("PATCH", "/v1/volumes/vm1", "{\"size\": \"big\"}"),
        ("POST", "/v1/volumes/vm1/resolve", "{\"node\": 7}"),
        ("POST", "/v1/volumes/vm1/trust", "{}"),
    ] {
        let r = http(method, &c.nodes[0].url(path), Some(body)).unwrap();
        assert_eq!(r.status, 400, "{method} {path} {body}: {}", r.body);
        assert!(
            r.json()["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            r.body
        );
    }
    let r = http("GET", &c.nodes[0].url("/v1/volumes/a%2Fb"), None).unwrap();
    assert_eq!(r.status, 400, "{}", r.body);

    let strip = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|o| (o["name"].clone(), o["size"].clone(), o["id"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&c.json(&["volume", "list"])), strip(&before.0));
    assert_eq!(strip(&c.json(&["node", "list"])), strip(&before.1));
    assert!(c.json(&["group", "list"]).as_array().unwrap().len() == 1);
}

#[test]
fn health_reports_a_killed_node_and_is_ok_once_healed() {
    let mut c = Cluster::start("hl", 3);
    run(c
        .tandem()
        .args(["volume", "create", "vm1", "--size", "64M"]));
    let volumes = c.wait_up_to_date(CONVERGE);
    let (code, out) = c.health();
    assert_eq!(code, 0, "{out}");
    // Not the controller's node: the CLI talks to it.
    let victim = Cluster::participants(&volumes[0], "diskful")
        .into_iter()
        .find(|n| n != "hl1")
        .unwrap();
    c.node_mut(&victim).kill();
    // The volume's state comes with the survivors' events, the node's with the
    // controller's next visit: both are awaited.
    let (code, out) = wait_for("health reports the loss", CONVERGE, &[], || {
        let (code, out) = c.health();
        if code == 2 && out.contains("Degraded") && out.contains(&format!("node {victim}")) {
            Ok((code, out))
        } else {
            Err(out)
        }
    });
    assert_eq!(code, 2);
    assert!(out.contains(&format!("node {victim}")), "{out}");
    assert!(out.contains("volume vm1"), "{out}");
    let out = tandem_lab::output(c.tandem().args(["-o", "json", "health"]));
    assert_eq!(out.status.code(), Some(2));
    let json = tandem_lab::json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(json["severity"], "Error", "{json:#}");

    c.node_mut(&victim).restart();
    wait_for("health is ok again", CONVERGE, &[], || {
        let (code, out) = c.health();
        if code == 0 { Ok(()) } else { Err(out) }
    });
    // The drbdadm-like status, from a node of the volume, through the controller.
    let status = run(c.tandem().args(["volume", "status", "vm1"]));
    assert!(status.starts_with("vm1 role:Secondary\n"), "{status}");
    for node in &c.nodes {
        assert!(
            status.contains(&format!("  {} disk:", node.name)),
            "{status}"
        );
    }
    assert!(status.contains("replication:Established"), "{status}");
    assert!(status.contains("tiebreaker:yes"), "{status}");
    let verify = c.json(&["volume", "verify", "vm1"]);
    assert_eq!(verify["peers"][0]["differing-blocks"], 0, "{verify:#}");
}

#[test]
fn kv_stores_keep_namespaced_keys() {
    let c = Cluster::start("kv", 1);
    run(c.tandem().args(["kv", "set", "sr", "vdi/a", "one"]));
    run(c.tandem().args(["kv", "set", "sr", "vdi/b", "two"]));
    run(c
        .tandem()
        .args(["kv", "set", "other", "vdi/a", "elsewhere"]));
    run(c.tandem().args(["kv", "set", "sr", "vdi/a", "uno"]));
    let list = c.json(&["kv", "list", "sr"]);
    let pairs: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["key"].as_str().unwrap(), e["value"].as_str().unwrap()))
        .collect();
    assert_eq!(pairs, [("vdi/a", "uno"), ("vdi/b", "two")]);
    run(c.tandem().args(["kv", "delete", "sr", "vdi/a"]));
    assert!(c.fails(&["kv", "get", "sr", "vdi/a"]).contains("no key"));
    assert_eq!(
        c.json(&["kv", "get", "other", "vdi/a"])["value"],
        "elsewhere"
    );
    // Conditional changes: what locks and journals of tools sharing a store rest on.
    let key = c.nodes[0].url("/v1/kv/sr/lock");
    let put = |body: &str| http("PUT", &key, Some(body)).unwrap().status;
    assert_eq!(put(r#"{"value": "a", "only-if": "absent"}"#), 200);
    assert_eq!(put(r#"{"value": "b", "only-if": "absent"}"#), 409);
    assert_eq!(put(r#"{"value": "b", "only-if": {"value": "x"}}"#), 409);
    assert_eq!(c.json(&["kv", "get", "sr", "lock"])["value"], "a");
    assert_eq!(put(r#"{"value": "b", "only-if": {"value": "a"}}"#), 200);
    assert_eq!(put(r#"{"value": "c", "only-if": "maybe"}"#), 400);
    let delete = |query: &str| {
        http("DELETE", &format!("{key}{query}"), None)
            .unwrap()
            .status
    };
    assert_eq!(delete("?if-value=a"), 409);
    assert_eq!(c.json(&["kv", "get", "sr", "lock"])["value"], "b");
    assert_eq!(delete("?if-value=b"), 204);
    assert_eq!(delete("?if-value=b"), 404);
    let stores = tandem_lab::json(&http("GET", &c.nodes[0].url("/v1/kv"), None).unwrap().body);
    assert_eq!(stores, serde_json::json!(["other", "sr"]));
    let doc = tandem_lab::json(
        &http("GET", &c.nodes[0].url("/openapi.json"), None)
            .unwrap()
            .body,
    );
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/v1/kv/{store}/{key}"]["put"].is_object());
}

#[test]
fn a_node_holding_the_only_current_replica_is_not_deleted_unless_forced() {
    let mut c = Cluster::start("nd", 3);
    // Replicas on nd2 and nd3 (the controller's node nd1 stays up throughout).
    run(c
        .tandem()
        .args(["group", "create", "pair", "--nodes", "nd2,nd3"]));
    run(c.tandem().args([
        "volume", "create", "vm1", "--size", "64M", "--group", "pair",
    ]));
    let volumes = c.wait_up_to_date(CONVERGE);
    let mut diskful = Cluster::participants(&volumes[0], "diskful");
    diskful.sort();
    assert_eq!(diskful, ["nd2", "nd3"]);
    let (x, y) = ("nd2".to_owned(), "nd3".to_owned());
    c.node_mut(&y).stop();
    wait_for("the other replica's node is Offline", CONVERGE, &[], || {
        c.json(&["node", "show", &y])["state"] == "Offline"
    });
    let stderr = c.fails(&["node", "delete", &x]);
    assert!(
        stderr.contains(&format!("node {x} holds the only UpToDate replica of: vm1")),
        "{stderr}"
    );
    assert_eq!(c.json(&["node", "list"]).as_array().unwrap().len(), 3);
    c.node_mut(&y).restart();
    c.wait_up_to_date(CONVERGE);
    run(c.tandem().args(["node", "delete", &x]));
    let nodes = c.json(&["node", "list"]);
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes:#}");
    let v = c.json(&["volume", "show", "vm1"]);
    assert_eq!(Cluster::participants(&v, "diskful"), [y.clone()]);
    assert!(Cluster::participants(&v, "tiebreaker").is_empty(), "{v:#}");
    let gone = c.node(&x);
    wait_for(
        "the deleted node dropped its replica",
        CONVERGE,
        &[gone],
        || !gone.data_file("vm1").exists(),
    );
    assert!(
        !gone.dir.join("cluster.json").exists(),
        "it left the cluster"
    );
    c.wait_up_to_date(CONVERGE);
    // It may join again.
    run(c
        .tandem()
        .args(["node", "create", &x, &gone.api.to_string()]));
    c.wait_nodes_online();
}

#[test]
fn replicas_move_between_nodes_and_keep_the_data() {
    let c = Cluster::start("mv", 3);
    run(c
        .tandem()
        .args(["volume", "create", "vm1", "--size", "64M"]));
    let volumes = c.wait_up_to_date(CONVERGE);
    let diskful = Cluster::participants(&volumes[0], "diskful");
    let third = Cluster::participants(&volumes[0], "tiebreaker").remove(0);
    qemu_io(
        &c.node(&diskful[0]).uri("vm1"),
        &["write -P 0x3c 0 8M", "write -P 0x7e 40M 2M", "flush"],
    );
    // The tiebreaker's node gets a replica: it starts empty and is fully resynced.
    let v = c.json(&["volume", "replicas", "vm1", "--add", &third]);
    assert_eq!(Cluster::participants(&v, "diskful").len(), 3, "{v:#}");
    assert!(Cluster::participants(&v, "tiebreaker").is_empty(), "{v:#}");
    c.wait_up_to_date(Duration::from_secs(60));
    let added = c.node(&third);
    tandem_lab::assert_same_replicas(c.node(&diskful[0]), added, "vm1");

    // Then one of the original replicas goes.
    let v = c.json(&["volume", "replicas", "vm1", "--remove", &diskful[0]]);
    let mut left = Cluster::participants(&v, "diskful");
    left.sort();
    let mut want = vec![diskful[1].clone(), third.clone()];
    want.sort();
    assert_eq!(left, want);
    let removed = c.node(&diskful[0]);
    wait_for(
        "the removed replica's files are gone",
        CONVERGE,
        &[removed],
        || !removed.data_file("vm1").exists(),
    );
    c.wait_up_to_date(CONVERGE);
    let read = qemu_io(
        &added.uri("vm1"),
        &[
            "read -P 0x3c 0 8M",
            "read -P 0x7e 40M 2M",
            "read -P 0 8M 32M",
        ],
    );
    assert!(!read.contains("Pattern verification failed"), "{read}");
    let stderr = c.fails(&["volume", "replicas", "vm1", "--remove", &diskful[0]]);
    assert!(stderr.contains("holds no replica"), "{stderr}");
}

#[test]
fn a_third_node_that_joins_becomes_the_tiebreaker_of_two_replica_volumes() {
    let mut c = Cluster::start("tb", 2);
    run(c
        .tandem()
        .args(["volume", "create", "vm1", "--size", "64M"]));
    let v = c.wait_up_to_date(CONVERGE);
    assert!(
        Cluster::participants(&v[0], "tiebreaker").is_empty(),
        "{v:#}"
    );
    let third = tandem_lab::Node::start("tb3");
    run(c
        .tandem()
        .args(["node", "create", "tb3", &third.api.to_string()]));
    c.nodes.push(third);
    wait_for("tb3 is the tiebreaker of vm1", CONVERGE, &[], || {
        let v = c.json(&["volume", "show", "vm1"]);
        Cluster::participants(&v, "tiebreaker") == ["tb3"]
    });
    c.wait_up_to_date(CONVERGE);
    assert_eq!(c.held_by("tb3"), ["vm1"]);
}

#[test]
fn the_cluster_api_can_require_a_token() {
    let dir = tandem_lab::scratch("token");
    let file = dir.join("token");
    std::fs::write(&file, "correct-horse-battery-staple\n").unwrap();
    let node = tandem_lab::Node::start_with(
        "tok1",
        &["--controller", "--api-token-file", file.to_str().unwrap()],
    );
    let r = http("GET", &node.url("/v1/volumes"), None).unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("access token"),
        "{}",
        r.body
    );
    let r = tandem_lab::http_as(
        Some("wrong-horse-battery-staple"),
        "GET",
        &node.url("/v1/volumes"),
        None,
    )
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    // The API description stays readable.
    assert_eq!(
        http("GET", &node.url("/openapi.json"), None)
            .unwrap()
            .status,
        200
    );

    let out = tandem_lab::output(node.tandem().args(["volume", "list"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TANDEM_TOKEN"));
    let out = tandem_lab::output(node.tandem().arg("health"));
    assert_eq!(out.status.code(), Some(2));
    // With the token, once the controller has seen its own node online.
    let listed = wait_for("the volume is created", CONVERGE, &[&node], || {
        let out = tandem_lab::output(
            node.tandem()
                .env("TANDEM_TOKEN", "correct-horse-battery-staple")
                .args([
                    "-o",
                    "json",
                    "volume",
                    "create",
                    "vm1",
                    "--size",
                    "64M",
                    "--replicas",
                    "1",
                ]),
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    assert!(listed.contains("\"vm1\""), "{listed}");

    // A token file that is too short stops tandemd at start, saying why.
    std::fs::write(&file, "short\n").unwrap();
    let out = tandem_lab::output(
        std::process::Command::new(tandem_lab::tandemd_bin())
            .args(["--name", "tok2", "--controller", "--api-token-file"])
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.join("tok2")),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at least 16"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cluster API through any node: a node forwards it to the controller it was
/// joined by; the CLI takes several addresses and uses the first that answers.
#[test]
fn any_node_answers_the_cluster_api() {
    let c = Cluster::start("fw", 2);
    let other = c.nodes[1].api_url();
    let via = |api: &str, args: &[&str]| {
        tandem_lab::json(&run(std::process::Command::new(tandem_lab::tandem_bin())
            .args(["--controller", api, "-o", "json"])
            .args(args)))
    };
    via(&other, &["volume", "create", "v1", "--size", "16M"]);
    let listed = via(&other, &["volume", "list"]);
    assert_eq!(listed[0]["name"], "v1", "{listed:#}");
    assert_eq!(
        via(&other, &["cluster"])["controller"],
        c.nodes[0].name.as_str()
    );
    // The first address does not answer: the next one does.
    let dead = format!("http://{}", tandem_lab::free_addr());
    let both = format!("{dead},{other}");
    assert_eq!(via(&both, &["volume", "list"])[0]["name"], "v1");
    // What the controller does not serve either ends there: the controller's node,
    // which would forward it to itself, does not forward a forwarded request again.
    let r = http("GET", &c.nodes[1].url("/v1/nowhere"), None).unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("no such API route"), "{}", r.body);
    // A node outside any cluster knows no controller.
    let lone = tandem_lab::Node::start("fwlone");
    let r = http("GET", &lone.url("/v1/volumes"), None).unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("knows no controller"), "{}", r.body);
}

/// Each controller that starts raises the epoch; nodes refuse calls carrying an older one
/// (a deposed controller's), and say which controller replaced it.
#[test]
fn nodes_refuse_calls_from_a_deposed_controller() {
    let mut c = Cluster::start("ep", 2);
    let (n1, n2) = (c.nodes[0].name.clone(), c.nodes[1].name.clone());
    let old = c.json(&["cluster"])["epoch"].as_u64().unwrap();
    assert!(old > 0);
    c.node_mut(&n1).stop();
    c.node_mut(&n1).restart();
    c.wait_nodes_online();
    let new = c.json(&["cluster"])["epoch"].as_u64().unwrap();
    assert!(new > old, "{new} after {old}");
    // The node has seen the new one (the controller visited it).
    let node = c.node(&n2);
    let call = |epoch: u64| {
        tandem_lab::http_headers(
            "GET",
            &node.url("/v1/node/replicated"),
            &[
                ("authorization", &format!("Bearer {}", c.secret())),
                ("x-tandem-epoch", &epoch.to_string()),
                ("x-tandem-controller", &c.nodes[0].api.to_string()),
            ],
        )
    };
    let stale = call(old);
    assert_eq!(stale.status, 409, "{}", stale.body);
    assert!(
        stale
            .body
            .contains(&format!("controller epoch {old} is older than {new}")),
        "{}",
        stale.body
    );
    assert_eq!(call(new).status, 200);
    // An operator's call with the secret and no epoch is not a controller's: not fenced.
    let r = tandem_lab::http_as(
        Some(&c.secret()),
        "GET",
        &node.url("/v1/node/replicated"),
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // The cluster works on.
    run(c.tandem().args(["volume", "create", "e1", "--size", "16M"]));
    c.wait_up_to_date(CONVERGE);
}

/// The operator's way out of a split brain: the replica named gives up its data (here
/// blocks only it holds, written behind its node's back, as the losing side's changes)
/// and is resynced in full from the other.
#[test]
fn a_discarded_replica_is_resynced_in_full_from_the_other() {
    use std::os::unix::fs::FileExt;
    let mut c = Cluster::start("rs", 3);
    run(c
        .tandem()
        .args(["volume", "create", "vm1", "--size", "64M"]));
    let volumes = c.wait_up_to_date(CONVERGE);
    let tiebreaker = Cluster::participants(&volumes[0], "tiebreaker").remove(0);
    // The replica kept is not on the controller's node: it is stopped below.
    let mut diskful = Cluster::participants(&volumes[0], "diskful");
    diskful.sort_by_key(|n| n == "rs1");
    let (keep, discard) = (diskful[0].clone(), diskful[1].clone());
    qemu_io(&c.node(&keep).uri("vm1"), &["write -P 0x5a 0 8M", "flush"]);
    c.wait_up_to_date(CONVERGE);
    let theirs = c.node(&discard).data_file("vm1");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&theirs)
        .unwrap();
    f.write_all_at(&[0xee; 1 << 20], 4 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let e = c.fails(&["volume", "resolve", "vm1", "--discard", &tiebreaker]);
    assert!(e.contains("holds no replica"), "{e}");
    let v = c.json(&["volume", "resolve", "vm1", "--discard", &discard]);
    assert_eq!(v["name"], "vm1", "{v:#}");
    let (kept, given_up) = (c.node(&keep), c.node(&discard));
    wait_for(
        "the discarded replica holds the other's data",
        CONVERGE,
        &[kept, given_up],
        || tandem_lab::first_difference(&kept.data_file("vm1"), &theirs).is_none(),
    );
    c.wait_up_to_date(CONVERGE);
    let read = qemu_io(
        &given_up.uri("vm1"),
        &["read -P 0x5a 0 8M", "read -P 0 8M 56M"],
    );
    assert!(!read.contains("Pattern verification failed"), "{read}");
    let verify = c.json(&["volume", "verify", "vm1"]);
    assert_eq!(verify["peers"][0]["differing-blocks"], 0, "{verify:#}");

    // With the kept replica's node down, the other holds the only data: not discarded.
    c.node_mut(&keep).kill();
    wait_for("the controller sees the node down", CONVERGE, &[], || {
        let v = c.json(&["volume", "show", "vm1"]);
        let p = &v["participants"].as_array().unwrap();
        p.iter()
            .any(|p| p["node"] == keep.as_str() && p.get("disk").is_none())
    });
    let e = c.fails(&["volume", "resolve", "vm1", "--discard", &discard]);
    assert!(e.contains("discarding it would leave none whole"), "{e}");
    let v = c.json(&["volume", "show", "vm1"]);
    let left = v["participants"].as_array().unwrap().iter();
    let disks: Vec<_> = left
        .map(|p| (p["node"].clone(), p["disk"].clone()))
        .collect();
    assert!(
        disks.contains(&(discard.as_str().into(), "UpToDate".into())),
        "{v:#}"
    );
}
