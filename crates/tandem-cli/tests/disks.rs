//! Dying disks under writes: a replica's file system shut down (xfs returns EIO from
//! then on, as a failing disk does), or full (ENOSPC). The replica goes Failed at once,
//! the volume goes on from its peer with every acknowledged write, `tandem health`
//! names the node, the pool and what to do, and once repaired and restarted the
//! replica is resynced to be identical. With three replicas, the Primary dying while a
//! peer's disk is dead leaves the last whole replica serving.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use tandem_lab::{CONVERGE, Cluster, SmallFs, run, wait_for, workload};

/// Two nodes, each with its pool on its own small file system; a 2-replica volume `v`
/// of `size` attached on the first, a verifying writer running on it.
struct Setup {
    c: Cluster,
    n1: String,
    n2: String,
    log: PathBuf,
    writer: Child,
}

fn setup(prefix: &str, fs1: &SmallFs, fs2: &SmallFs, size: &str, blocks: u64) -> Setup {
    let mnts = [fs1.mnt.clone(), fs2.mnt.clone()];
    let names = [format!("{prefix}1"), format!("{prefix}2")];
    let c = Cluster::start_with(prefix, 2, move |name| {
        let i = names.iter().position(|n| n == name).unwrap();
        vec![
            "--pool".into(),
            format!("default={}", mnts[i].join(name).display()),
        ]
    });
    let (n1, n2) = (c.nodes[0].name.clone(), c.nodes[1].name.clone());
    run(c
        .tandem()
        .args(["volume", "create", "v", "--size", size, "--replicas", "2"]));
    c.wait_up_to_date(CONVERGE);
    run(c.tandem().args(["volume", "attach", "v", "--node", &n1]));
    let log = c.nodes[0].dir.join("writer.log");
    let writer = workload::start_in(&c.node(&n1).uri("v"), &log, 7, 0, 0..blocks);
    Setup {
        c,
        n1,
        n2,
        log,
        writer,
    }
}

impl Setup {
    /// Waits for n2's replica to fail; checks that writes go on without it, that no
    /// acknowledged write is lost, and what `tandem health` says.
    fn check_failed_and_going_on(&mut self) {
        let (c, n2) = (&self.c, &self.n2);
        wait_for("n2's replica is Failed", CONVERGE, &[], || {
            let v = c.json(&["volume", "show", "v"]);
            v["participants"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["node"] == n2.as_str() && p["disk"] == "Failed")
        });
        let count = || std::fs::read_to_string(&self.log).unwrap().lines().count();
        let before = count();
        std::thread::sleep(Duration::from_secs(2));
        // The dying disk is not written again for each change the volume goes through.
        let records = c
            .node(n2)
            .log()
            .matches("cannot record the Failed state")
            .count();
        assert!(
            records <= 1,
            "{records} attempts to record the Failed state"
        );
        let after = count();
        assert!(after > before + 10, "writes stopped: {before} then {after}");
        let _ = self.writer.kill();
        let _ = self.writer.wait();
        let lost = workload::check(&c.node(&self.n1).uri("v"), &self.log);
        assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
        // The node whose replica failed does not open the volume, and says why (once
        // the clients on n1 have closed it there).
        wait_for(
            "the node whose replica failed refuses clients, saying why",
            CONVERGE,
            &[c.node(n2)],
            || {
                let opened = tandem_lab::qemu_io_result(&mut tandem_lab::qemu_io_command(
                    &["-f", "raw", "-r"],
                    &["read 0 4k"],
                    &[&c.node(n2).uri("v")],
                ));
                match opened {
                    Err(e) if e.contains("this node's replica has failed") => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        );
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
    }

    /// n2 stopped, its file system repaired by `repair`, started again: its replica is
    /// resynced to be identical, every acknowledged write in place.
    fn check_repaired(&mut self, repair: impl FnOnce()) {
        let n2 = self.n2.clone();
        self.c.node_mut(&n2).stop();
        repair();
        self.c.node_mut(&n2).restart();
        self.c.wait_up_to_date(CONVERGE);
        let verify = self.c.json(&["volume", "verify", "v"]);
        assert_eq!(verify["peers"][0]["differing-blocks"], 0, "{verify:#}");
        assert!(workload::check(&self.c.node(&self.n1).uri("v"), &self.log).is_empty());
    }
}

#[test]
fn a_replica_whose_file_system_fails_goes_failed_and_the_volume_goes_on() {
    let (Some(fs1), Some(fs2)) = (SmallFs::xfs(300), SmallFs::xfs(300)) else {
        eprintln!("skipped: this machine cannot make xfs file systems on loop devices");
        return;
    };
    // The verifying writer on the first 64 MiB; 4 MiB writes at depth 8 on the rest,
    // so the disk dies with large writes in flight (socket buffers full).
    let mut s = setup("dk", &fs1, &fs2, "128M", 64 << 8);
    let uri = s.c.node(&s.n1).uri("v");
    let mut stream = Command::new("fio")
        .args([
            "--name=stream",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=write",
            "--bs=4m",
            "--iodepth=8",
            "--offset=64m",
            "--size=64m",
            "--time_based",
            "--runtime=6",
            "--buffer_pattern=0xab",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start fio");
    std::thread::sleep(Duration::from_secs(1));
    // n2's disk dies under the writes.
    fs2.shut_down();
    s.check_failed_and_going_on();
    // Every large write was acknowledged (fio stops at the first error) and holds its
    // bytes.
    assert!(stream.wait().unwrap().success(), "a large write failed");
    tandem_lab::qemu_io(&uri, &["read -P 0xab 64M 64M"]);
    s.check_repaired(|| fs2.remount());
}

#[test]
fn a_replica_whose_file_system_fills_up_goes_failed_and_the_volume_goes_on() {
    let (Some(fs1), Some(fs2)) = (SmallFs::ext4(128), SmallFs::ext4(64)) else {
        eprintln!("skipped: this machine cannot make ext4 file systems on loop devices");
        return;
    };
    // n2's file system all but full: the thin replica runs out of room under writes
    // that n1's has room for.
    let filler = fs2.mnt.join("filler");
    let free = || {
        let out = Command::new("df")
            .args(["--output=avail", "-B1", fs2.mnt.to_str().unwrap()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let mut s = setup("df", &fs1, &fs2, "48M", 48 << 8);
    let leave = 8 << 20;
    std::fs::write(&filler, vec![0xeeu8; (free() - leave) as usize]).unwrap();
    s.check_failed_and_going_on();
    s.check_repaired(|| std::fs::remove_file(&filler).unwrap());
}

#[test]
fn the_primary_dying_while_a_peers_disk_is_failed_leaves_the_last_replica_serving() {
    let (Some(fs1), Some(fs2), Some(fs3)) =
        (SmallFs::xfs(300), SmallFs::xfs(300), SmallFs::xfs(300))
    else {
        eprintln!("skipped: this machine cannot make xfs file systems on loop devices");
        return;
    };
    let mnts = [fs1.mnt.clone(), fs2.mnt.clone(), fs3.mnt.clone()];
    let mut c = Cluster::start_with("dp", 3, move |name| {
        let i = name[2..].parse::<usize>().unwrap() - 1;
        vec![
            "--pool".into(),
            format!("default={}", mnts[i].join(name).display()),
        ]
    });
    let (n1, n2, n3) = ("dp1", "dp2", "dp3");
    run(c
        .tandem()
        .args(["volume", "create", "v", "--size", "64M", "--replicas", "3"]));
    c.wait_up_to_date(CONVERGE);
    for n in [n1, n2] {
        run(c.tandem().args(["volume", "attach", "v", "--node", n]));
    }
    let log = c.nodes[1].dir.join("writer.log");
    let mut writer = workload::start(&c.node(n1).uri("v"), &log, 11, 0);
    // n3's disk dies under the writes: its replica goes Failed, the writes go on.
    std::thread::sleep(Duration::from_secs(1));
    fs3.shut_down();
    wait_for("n3's replica is Failed", CONVERGE, &[], || {
        let v = c.json(&["volume", "show", "v"]);
        (v["participants"].as_array().unwrap().iter())
            .any(|p| p["node"] == n3 && p["disk"] == "Failed")
    });
    let before = workload::last_acknowledged(&log);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        workload::last_acknowledged(&log) > before + 10,
        "writes stopped"
    );

    // The Primary (and the controller with it) dies: n2, whose replica is the last
    // whole one, takes the writes over, n3's vote (diskless now) making the majority.
    c.node_mut(n1).kill();
    let _ = writer.kill();
    let _ = writer.wait();
    let start = workload::last_issued(&log) + 1;
    let mut writer = workload::start(&c.node(n2).uri("v"), &log, 12, start);
    wait_for("n2 takes writes", Duration::from_secs(30), &[], || {
        workload::last_acknowledged(&log) > start + 10
    });
    let _ = writer.kill();
    let _ = writer.wait();
    let lost = workload::check(&c.node(n2).uri("v"), &log);
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

    // n3 repaired and n1 back: every replica resynced to be identical.
    c.node_mut(n3).stop();
    fs3.remount();
    c.node_mut(n3).restart();
    c.node_mut(n1).restart();
    c.wait_up_to_date(CONVERGE);
    let verify = c.json(&["volume", "verify", "v"]);
    let peers = verify["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{verify:#}");
    assert!(
        peers.iter().all(|p| p["differing-blocks"] == 0),
        "{verify:#}"
    );
    assert!(workload::check(&c.node(n1).uri("v"), &log).is_empty());
}

/// Seen in a chaos run: a node whose pool had filled up could not start again (it
/// tries whether the file system shares blocks by writing two small files). It starts,
/// its pool listed full and able to take snapshots (judged by the file system's type),
/// its volume's data readable; freed space is writable again.
#[test]
fn a_node_whose_pool_is_full_starts() {
    let Some(fs) = SmallFs::xfs(300) else {
        eprintln!("skipped: this machine cannot make xfs file systems on loop devices");
        return;
    };
    let pool = format!("default={}", fs.mnt.join("pf1").display());
    let mut node = tandem_lab::Node::start_with("pf1", &["--pool", &pool]);
    node.create_volume("v", 16 << 20);
    node.qemu_io("v", &["write -P 0x11 0 1M"]);
    node.stop();
    assert!(fs.fill() > 100 << 20, "the file system had room to fill");
    node.restart();
    assert!(
        node.log().contains(
            "the pool's file system is full: whether it shares blocks was judged by its type"
        ),
        "the guess is logged"
    );
    let pools = node.api("GET", "/v1/node/pools", None).json();
    let default = &pools.as_array().unwrap()[0];
    assert_eq!(default["reflink"], true, "{pools:#}");
    assert!(default["free"].as_u64().unwrap() < 2 << 20, "{pools:#}");
    let out = node.qemu_io("v", &["read -P 0x11 0 1M"]);
    assert!(out.contains("read 1048576/1048576"), "{out}");
    fs.unfill();
    let out = node.qemu_io("v", &["write -P 0x22 1M 1M", "read -P 0x22 1M 1M"]);
    assert!(out.contains("read 1048576/1048576"), "{out}");
}

/// Both replicas of a two-replica volume lose their disks in turn (full file systems:
/// each records its Failed state): the second went on alone, so once both are repaired
/// it holds every acknowledged write, but neither is whole by itself. The operator
/// declares it whole (`tandem volume trust`); the node refuses the one that failed
/// first, whose data the other moved on from. (Disks that die outright record nothing:
/// each comes back as it was last recorded, and the generations sort them out alone.)
#[test]
fn when_every_replica_failed_in_turn_the_one_that_failed_last_is_trusted() {
    let fss: Vec<SmallFs> = (0..3).filter_map(|_| SmallFs::xfs(300)).collect();
    if fss.len() < 3 {
        eprintln!("skipped: this machine cannot make xfs file systems on loop devices");
        return;
    }
    let mnts: Vec<PathBuf> = fss.iter().map(|f| f.mnt.clone()).collect();
    let mut c = Cluster::start_with("dt", 3, move |name| {
        let i = name[2..].parse::<usize>().unwrap() - 1;
        vec![
            "--pool".into(),
            format!("default={}", mnts[i].join(name).display()),
        ]
    });
    let fs_of = |node: &str| &fss[node[2..].parse::<usize>().unwrap() - 1];
    run(c
        .tandem()
        .args(["volume", "create", "v", "--size", "16M", "--replicas", "2"]));
    let volumes = c.wait_up_to_date(CONVERGE);
    let v = (volumes.as_array().unwrap().iter())
        .find(|v| v["name"] == "v")
        .unwrap();
    let diskful = Cluster::participants(v, "diskful");
    let (last, first) = (diskful[0].clone(), diskful[1].clone());
    run(c.tandem().args(["volume", "attach", "v", "--node", &last]));
    let failed = |c: &Cluster, node: &str| {
        let v = c.json(&["volume", "show", "v"]);
        (v["participants"].as_array().unwrap().iter())
            .any(|p| p["node"] == node && p["disk"] == "Failed")
    };
    // One client session throughout: the volume stays open, its activity log holds the
    // extent written, and only data writes need new blocks.
    let mut io = c.node(&last).qemu_io_session("v");
    let mut run_io = |command: &str| {
        io.command(command, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{command}: no answer"))
    };
    for command in ["write -P 0x11 0 1M", "flush"] {
        let out = run_io(command);
        assert!(!out.contains("failed"), "{command}: {out}");
    }
    // The first disk fills up; the other replica goes on alone.
    assert!(fs_of(&first).fill() > 0);
    for command in ["write -P 0x22 1M 1M", "flush"] {
        let out = run_io(command);
        assert!(!out.contains("failed"), "{command}: {out}");
    }
    wait_for("the first replica is Failed", CONVERGE, &[], || {
        failed(&c, &first)
    });
    for command in ["write -P 0x33 2M 1M", "flush"] {
        let out = run_io(command);
        assert!(!out.contains("failed"), "{command}: {out}");
    }
    // Then the second: nothing takes writes any more.
    assert!(fs_of(&last).fill() > 0);
    let out = run_io("write -P 0x44 3M 1M");
    assert!(
        out.contains("failed"),
        "a write with no whole replica: {out}"
    );
    drop(io);
    wait_for("the second replica is Failed", CONVERGE, &[], || {
        failed(&c, &last)
    });

    // Both repaired and restarted: neither is whole, and health says what to do.
    for node in [&first, &last] {
        c.node_mut(node).stop();
        fs_of(node).unfill();
        c.node_mut(node).restart();
    }
    wait_for("both replicas report, Failed", CONVERGE, &[], || {
        failed(&c, &first) && failed(&c, &last)
    });
    let (_, report) = c.health();
    assert!(report.contains("tandem volume trust"), "{report}");
    // (Refused while the replicas' nodes are still connecting to each other, too.)
    wait_for(
        "trusting the first to fail is refused: the other failed after it",
        CONVERGE,
        &[],
        || {
            let err = c.fails(&["volume", "trust", "v", "--node", &first]);
            err.contains("failed after this one")
                .then_some(())
                .ok_or(err)
        },
    );
    run(c.tandem().args(["volume", "trust", "v", "--node", &last]));
    c.wait_up_to_date(CONVERGE);
    for node in [&last, &first] {
        let out = tandem_lab::qemu_io(
            &c.node(node).uri("v"),
            &[
                "read -P 0x11 0 1M",
                "read -P 0x22 1M 1M",
                "read -P 0x33 2M 1M",
            ],
        );
        assert!(!out.contains("verification failed"), "{node}: {out}");
    }
    let verify = c.json(&["volume", "verify", "v"]);
    assert_eq!(verify["peers"][0]["differing-blocks"], 0, "{verify:#}");
}
