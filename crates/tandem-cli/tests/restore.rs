//! A controller started from an older backup of its database: volumes created since are
//! on the nodes but not in its records. They are reported as orphans and left alone
//! (never deleted for being unknown), then adopted with their data, or deleted on
//! request. Backups are made on demand and after changes, each checked.

use tandem_lab::{CONVERGE, Cluster, run, wait_for};

#[test]
fn volumes_unknown_to_a_restored_database_are_orphans_adopted_with_their_data() {
    let mut c = Cluster::start("rs", 2);
    let (n1, n2) = (c.nodes[0].name.clone(), c.nodes[1].name.clone());
    run(c.tandem().args([
        "volume",
        "create",
        "before",
        "--size",
        "16M",
        "--replicas",
        "2",
    ]));
    c.wait_up_to_date(CONVERGE);

    // A backup on demand, checked; automatic ones follow changes.
    let backup = c.nodes[1].dir.join("cluster.backup");
    run(c
        .tandem()
        .args(["cluster", "backup", backup.to_str().unwrap()]));
    let head = std::fs::read(&backup).unwrap();
    assert!(head.starts_with(b"SQLite format 3\0"), "not an SQLite file");
    wait_for("an automatic backup is made", CONVERGE, &[], || {
        c.json(&["cluster"])["last-backup"]["volumes"] == 1
    });

    // Volumes made after it: one with data to keep, one to drop.
    for v in ["later", "stray"] {
        run(c
            .tandem()
            .args(["volume", "create", v, "--size", "16M", "--replicas", "2"]));
    }
    c.wait_up_to_date(CONVERGE);
    run(c
        .tandem()
        .args(["volume", "attach", "later", "--node", &n2]));
    c.node(&n2).qemu_io("later", &["write -P 0xcd 0 1M"]);
    run(c
        .tandem()
        .args(["volume", "detach", "later", "--node", &n2]));

    // The controller's database is lost with the only candidate's system volume; the
    // candidate founds a new one for the backup's cluster and loads the backup into it.
    c.node_mut(&n1).kill();
    c.nodes[0].destroy_system_volume();
    c.node_mut(&n1)
        .restart_with(&["--restore-db", backup.to_str().unwrap()]);
    c.wait_nodes_online();
    assert_eq!(c.volume_names(), ["before"]);
    let system = c.json(&["volume", "list", "--all"]);
    assert!(
        system
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "tandem-controller"),
        "the new system volume is listed: {system:#}"
    );
    wait_for("the orphans are reported", CONVERGE, &[], || {
        let (_, report) = c.health();
        ["later", "stray"]
            .iter()
            .all(|v| report.contains(&format!("nodes {n1}, {n2} hold volume {v} (id ")))
            && report.contains("which the controller has no record of")
    });
    // Left on their nodes, after several visits.
    std::thread::sleep(std::time::Duration::from_secs(2));
    for n in [&n1, &n2] {
        let held = c.held_by(n);
        for v in ["before", "later", "stray"] {
            assert!(held.contains(&v.to_owned()), "{n} lost {v}: {held:?}");
        }
    }
    let (_, report) = c.health();
    assert!(report.contains("tandem volume adopt NAME"), "{report}");

    // Adopted: in the model again, its bytes as written.
    let v = c.json(&["volume", "adopt", "later"]);
    assert_eq!(v["name"], "later");
    assert_eq!(v["size"], 16 << 20);
    assert_eq!(Cluster::participants(&v, "diskful").len(), 2, "{v:#}");
    c.wait_up_to_date(CONVERGE);
    run(c
        .tandem()
        .args(["volume", "attach", "later", "--node", &n1]));
    c.node(&n1)
        .qemu_io("later", &["read -P 0xcd 0 1M", "read -P 0 1M 1M"]);
    // Adopting what is not an orphan is refused.
    assert!(
        c.fails(&["volume", "adopt", "before"])
            .contains("no node reports an orphan volume before")
    );

    // Deleted on request: gone from its nodes, and from the report.
    run(c.tandem().args(["volume", "delete", "stray", "--orphan"]));
    wait_for("the orphan is deleted", CONVERGE, &[], || {
        [&n1, &n2]
            .iter()
            .all(|n| !c.held_by(n).contains(&"stray".to_owned()))
    });
    wait_for("nothing is reported", CONVERGE, &[], || {
        !c.health().1.contains("stray")
    });
    assert_eq!(c.volume_names(), ["before", "later"]);

    // Started again with the same flag, it does not roll back a second time.
    c.node_mut(&n1).stop();
    c.node_mut(&n1).restart();
    c.wait_nodes_online();
    assert_eq!(c.volume_names(), ["before", "later"]);
    // A file that is no database is refused, and the node does not start on it.
    let junk = c.nodes[1].dir.join("junk.db");
    std::fs::write(&junk, b"not a database").unwrap();
    let out = tandem_lab::output(
        std::process::Command::new(tandem_lab::tandemd_bin())
            .args([
                "--name",
                "x",
                "--data-dir",
                c.nodes[1].dir.join("x").to_str().unwrap(),
            ])
            .args(["--controller", "--restore-db", junk.to_str().unwrap()]),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("restoring the controller database"));

    // An ordinary deletion still deletes (on the record the controller keeps of it).
    run(c.tandem().args(["volume", "delete", "before"]));
    wait_for(
        "the deleted volume is gone from its nodes",
        CONVERGE,
        &[],
        || {
            [&n1, &n2]
                .iter()
                .all(|n| !c.held_by(n).contains(&"before".to_owned()))
        },
    );
}
