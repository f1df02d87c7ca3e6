//! Dying disks: a replica's file system shut down under writes (xfs returns EIO from
//! then on, as a failing disk does). The replica goes Failed at once, the volume goes
//! on from its peer with every acknowledged write, and `tandem health` names the node
//! and the volume.

use std::process::Command;
use std::time::Duration;

use tandem_lab::{CONVERGE, Cluster, SmallFs, run, wait_for, workload};

#[test]
fn a_replica_whose_file_system_fails_goes_failed_and_the_volume_goes_on() {
    let (Some(fs1), Some(fs2)) = (SmallFs::xfs(300), SmallFs::xfs(300)) else {
        eprintln!("skipped: this machine cannot make xfs file systems on loop devices");
        return;
    };
    let mnts = [fs1.mnt.clone(), fs2.mnt.clone()];
    let names = ["dk1", "dk2"];
    let mut c = Cluster::start_with("dk", 2, move |name| {
        let i = names.iter().position(|n| *n == name).unwrap();
        vec![
            "--pool".into(),
            format!("default={}", mnts[i].join(name).display()),
        ]
    });
    let (n1, n2) = (c.nodes[0].name.clone(), c.nodes[1].name.clone());
    run(c
        .tandem()
        .args(["volume", "create", "v", "--size", "64M", "--replicas", "2"]));
    c.wait_up_to_date(CONVERGE);
    run(c.tandem().args(["volume", "attach", "v", "--node", &n1]));
    let log = c.nodes[0].dir.join("writer.log");
    let mut writer = workload::start_in(&c.node(&n1).uri("v"), &log, 7, 0, 0..(64 << 8));
    std::thread::sleep(Duration::from_secs(1));

    // n2's disk dies under the writes.
    let out = Command::new("xfs_io")
        .args(["-x", "-c", "shutdown", fs2.mnt.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("n2's replica is Failed", CONVERGE, &[], || {
        let v = c.json(&["volume", "show", "v"]);
        v["participants"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["node"] == n2.as_str() && p["disk"] == "Failed")
    });
    // Writes go on, acknowledged by the Primary alone.
    let before = std::fs::read_to_string(&log).unwrap().lines().count();
    std::thread::sleep(Duration::from_secs(2));
    let after = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(after > before + 10, "writes stopped: {before} then {after}");
    let _ = writer.kill();
    let _ = writer.wait();
    let lost = workload::check(&c.node(&n1).uri("v"), &log);
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let (code, report) = c.health();
    assert_eq!(code, 2, "{report}");
    assert!(
        report.contains(&format!("{n2} Failed in pool default")),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "the file system of pool default on {n2} returns errors"
        )),
        "{report}"
    );
    // Repaired (stopped, the file system mounted again) and started again: the replica
    // catches up with what it missed and is identical to the Primary's.
    c.node_mut(&n2).stop();
    fs2.remount();
    c.node_mut(&n2).restart();
    c.wait_up_to_date(CONVERGE);
    let verify = c.json(&["volume", "verify", "v"]);
    assert_eq!(verify["peers"][0]["differing-blocks"], 0, "{verify:#}");
    assert!(workload::check(&c.node(&n1).uri("v"), &log).is_empty());
}
