//! The controller follows its nodes' event streams: what `tandem` shows and checks
//! follows a node's own status within a second, not at the controller's next visit.

use std::time::{Duration, Instant};

use tandem_lab::{CONVERGE, Cluster, output, run, wait_for};

/// How soon after a node's own status changes the cluster view must show it.
const FOLLOW: Duration = Duration::from_secs(1);

/// Polls `node`'s own status of `volume` until `check` holds; the moment it did.
fn node_status_until(
    c: &Cluster,
    node: &str,
    volume: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Instant {
    let secret = c.secret();
    let path = format!("/v1/node/volumes/{volume}/status");
    wait_for("the node's own status changes", CONVERGE, &[], || {
        let r = c.node(node).api_as(&secret, "GET", &path, None);
        check(&r.json()).then(Instant::now)
    })
}

#[test]
fn health_reports_a_killed_secondary_within_a_second_of_its_peer_noticing() {
    let mut c = Cluster::start("ev", 3);
    run(c
        .tandem()
        .args(["volume", "create", "vm1", "--size", "32M"]));
    let volumes = c.wait_up_to_date(CONVERGE);
    let diskful = Cluster::participants(&volumes[0], "diskful");
    // The secondary killed is not the controller's node; the survivor reports it.
    let victim = diskful.iter().find(|n| *n != "ev1").unwrap().clone();
    let survivor = diskful.iter().find(|n| **n != victim).unwrap().clone();
    let (code, out) = c.health();
    assert_eq!(code, 0, "{out}");

    c.node_mut(&victim).kill();
    let noticed = node_status_until(&c, &survivor, "vm1", |s| {
        s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["node"] == victim.as_str() && p["connection"] != "Connected")
    });
    let (code, out) = wait_for("health reports the loss", CONVERGE, &[], || {
        let (code, out) = c.health();
        if code == 2 { Ok((code, out)) } else { Err(out) }
    });
    let took = noticed.elapsed();
    eprintln!("health followed in {took:?}");
    assert!(
        took <= FOLLOW,
        "health exited 2 only {took:?} after {survivor} saw {victim} go:\n{out}"
    );
    assert_eq!(code, 2);
    assert!(out.contains("volume vm1"), "{out}");
}

#[test]
fn detach_succeeds_as_soon_as_the_client_has_gone() {
    let c = Cluster::start("dt", 3);
    run(c
        .tandem()
        .args(["volume", "create", "vm2", "--size", "32M"]));
    let volumes = c.wait_up_to_date(CONVERGE);
    let diskful = Cluster::participants(&volumes[0], "diskful");
    let elsewhere = c
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| !diskful.contains(n))
        .unwrap();
    run(c
        .tandem()
        .args(["volume", "attach", "vm2", "--node", &elsewhere]));
    let there = c.node(&elsewhere);
    wait_for("the attachment is served", CONVERGE, &[there], || {
        c.held_by(&elsewhere).contains(&"vm2".to_owned())
    });
    let mut client = there.qemu_io_session("vm2");
    assert!(client.command("write -P 7 0 64k", CONVERGE).is_some());
    node_status_until(&c, &elsewhere, "vm2", |s| s["open"] == true);
    let refused = output(
        c.tandem()
            .args(["volume", "detach", "vm2", "--node", &elsewhere]),
    );
    assert!(!refused.status.success(), "detached while open");

    client.quit();
    let closed = node_status_until(&c, &elsewhere, "vm2", |s| s["open"] == false);
    let detached = wait_for("the detach succeeds", CONVERGE, &[], || {
        let out = output(
            c.tandem()
                .args(["volume", "detach", "vm2", "--node", &elsewhere]),
        );
        out.status
            .success()
            .then(Instant::now)
            .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
    });
    let took = detached.duration_since(closed);
    eprintln!("detach followed in {took:?}");
    assert!(
        took <= FOLLOW,
        "detach was refused for {took:?} after {elsewhere} closed the volume"
    );
}
