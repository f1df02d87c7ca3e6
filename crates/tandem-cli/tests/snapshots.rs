//! Snapshots through the `tandem` binary: three loopback nodes whose pools sit on xfs
//! (reflink) on loop devices, a 2-replica volume with a tiebreaker, verifying writers
//! on it while snapshots are taken, and real NBD clients reading `VOLUME@SNAPSHOT`.

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use tandem_lab::{
    CONVERGE, Cluster, HeldClient, SmallFs, first_difference, nbdsh, output, qemu_io, qemu_io_with,
    run, wait_for, workload,
};

const SIZE_BLOCKS: u64 = 64 << 8; // 64 MiB in 4 KiB blocks
const WRITERS: u64 = 4;

/// A cluster of three nodes whose `default` pools are directories of `fs`.
fn cluster_on(prefix: &str, fs: &SmallFs) -> Cluster {
    let mnt = fs.mnt.clone();
    Cluster::start_with(prefix, 3, move |name| {
        vec![
            "--pool".into(),
            format!("default={}", mnt.join(name).display()),
        ]
    })
}

/// A volume of 64 MiB with two replicas (and a tiebreaker), attached on its first
/// replica's node: (that node, the other replica's node).
fn volume(c: &Cluster, name: &str) -> (String, String) {
    run(c.tandem().args(["volume", "create", name, "--size", "64M"]));
    let volumes = c.wait_up_to_date(Duration::from_secs(60));
    let v = volumes
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap();
    let mut diskful = Cluster::participants(v, "diskful");
    assert_eq!(diskful.len(), 2, "{v:#}");
    let other = diskful.pop().unwrap();
    let primary = diskful.pop().unwrap();
    run(c
        .tandem()
        .args(["volume", "attach", name, "--node", &primary]));
    let node = c.node(&primary);
    wait_for("the volume is served", CONVERGE, &[node], || {
        c.held_by(&primary).contains(&name.to_owned())
    });
    (primary, other)
}

fn snapshot_file(fs: &SmallFs, node: &str, volume: &str, snap: &str) -> PathBuf {
    fs.mnt.join(node).join(format!("{volume}@{snap}.raw"))
}

struct Writers {
    logs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Writers {
    /// One verifying writer per quarter of the volume: together they keep several
    /// writes in flight, each its own in sequence.
    fn start(uri: &str, dir: &std::path::Path) -> Writers {
        let quarter = SIZE_BLOCKS / WRITERS;
        let logs: Vec<PathBuf> = (0..WRITERS)
            .map(|k| dir.join(format!("writer{k}.log")))
            .collect();
        let children = (0..WRITERS)
            .map(|k| {
                workload::start_in(
                    uri,
                    &logs[k as usize],
                    k + 1,
                    k << 40,
                    k * quarter..(k + 1) * quarter,
                )
            })
            .collect();
        Writers { logs, children }
    }

    fn acknowledged(&self) -> Vec<u64> {
        self.logs
            .iter()
            .map(|l| workload::last_acknowledged(l))
            .collect()
    }

    fn wait_writes(&self, at_least: u64) {
        let first = self.acknowledged();
        wait_for(
            "the writers make progress",
            Duration::from_secs(30),
            &[],
            || {
                let now = self.acknowledged();
                let behind: Vec<String> = (first.iter().zip(&now))
                    .filter(|(a, b)| **b < **a + at_least)
                    .map(|(a, b)| format!("{a}->{b}"))
                    .collect();
                if behind.is_empty() {
                    Ok(())
                } else {
                    Err(behind.join(" "))
                }
            },
        );
    }

    fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn a_snapshot_under_writes_is_one_point_of_the_write_order_on_every_replica() {
    let Some(fs) = SmallFs::xfs(1024) else {
        eprintln!("skipped: needs root, loop devices and mkfs.xfs (Debian: xfsprogs)");
        return;
    };
    let c = cluster_on("sn", &fs);
    let pools = c.json(&["pool", "list"]);
    assert!(
        pools
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "default")
            .all(|p| p["snapshots"] == true),
        "pools on xfs take snapshots: {pools:#}"
    );
    let (primary, other) = volume(&c, "vm");
    let node = c.node(&primary);
    let mut writers = Writers::start(&node.unix_uri("vm"), &node.dir);
    writers.wait_writes(50);

    let before = writers.acknowledged();
    let taken = c.json(&["snapshot", "create", "vm", "s1"]);
    let after = writers.acknowledged();
    let mut replicas: Vec<&str> = taken["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    replicas.sort();
    let mut want = vec![primary.as_str(), other.as_str()];
    want.sort();
    assert_eq!(replicas, want, "{taken:#}");
    assert!(taken["missing"].as_array().unwrap().is_empty(), "{taken:#}");
    // The writers go on: the live volume moves past the snapshot.
    writers.wait_writes(50);

    // Read while the writes go on: every write acknowledged before the snapshot was
    // asked is in it, none that started after it was taken.
    let uri = node.unix_uri("vm@s1");
    for (k, log) in writers.logs.iter().enumerate() {
        let problems = workload::check_snapshot(&uri, log, before[k], after[k]);
        assert!(problems.is_empty(), "writer {k}: {problems:#?}");
    }
    writers.stop();
    for (k, log) in writers.logs.iter().enumerate() {
        assert!(
            workload::last_acknowledged(log) > after[k] + 50,
            "writer {k} went on after the snapshot"
        );
    }

    // Both replicas took it at the same point: their snapshot files are identical,
    // as a real client compares them (the export against the other node's file).
    let (mine, theirs) = (
        snapshot_file(&fs, &primary, "vm", "s1"),
        snapshot_file(&fs, &other, "vm", "s1"),
    );
    assert_eq!(
        first_difference(&mine, &theirs),
        None,
        "{} and {} differ",
        mine.display(),
        theirs.display()
    );
    let compare = output(
        std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &uri])
            .arg(&theirs),
    );
    assert!(
        compare.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&compare.stdout)
    );

    // The export is read-only: a write is refused as the NBD spec says (EPERM).
    let refused = output(nbdsh().args([
        "-u",
        &uri,
        "-c",
        r#"
import errno
print("read-only" if h.is_read_only() else "writable")
try:
    h.pwrite(b"x" * 4096, 0)
    print("written")
except nbd.Error as e:
    print(errno.errorcode.get(e.errno, e.errno))
"#,
    ]));
    let said = String::from_utf8_lossy(&refused.stdout);
    assert_eq!(
        said.split_whitespace().collect::<Vec<_>>(),
        ["read-only", "EPERM"],
        "{said} {}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Listed where it is, and gone from every replica when deleted.
    let listed = c.json(&["snapshot", "list", "vm"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed:#}");
    assert_eq!(listed[0]["name"], "s1");
    assert_eq!(listed[0]["size"], 64 << 20);
    run(c.tandem().args(["snapshot", "delete", "vm", "s1"]));
    assert!(c.json(&["snapshot", "list"]).as_array().unwrap().is_empty());
    assert!(!mine.exists() && !theirs.exists());
}

#[test]
fn a_replica_offline_misses_the_snapshot_and_bad_requests_change_nothing() {
    let Some(fs) = SmallFs::xfs(1024) else {
        eprintln!("skipped: needs root, loop devices and mkfs.xfs (Debian: xfsprogs)");
        return;
    };
    let mut c = cluster_on("so", &fs);
    let (primary, other) = volume(&c, "vm");
    qemu_io(
        &c.node(&primary).uri("vm"),
        &["write -P 0x11 0 1M", "flush"],
    );
    c.node_mut(&other).stop();

    // The volume is closed: the node holding the UpToDate replica takes it.
    let taken = c.json(&["snapshot", "create", "vm", "s2"]);
    assert_eq!(taken["replicas"], serde_json::json!([primary]), "{taken:#}");
    assert_eq!(taken["missing"][0]["node"], other.as_str(), "{taken:#}");
    let listed = c.json(&["snapshot", "list", "vm"]);
    assert_eq!(
        listed[0]["replicas"],
        serde_json::json!([primary]),
        "{listed:#}"
    );
    qemu_io(
        &c.node(&primary).uri("vm"),
        &["write -P 0x22 0 1M", "flush"],
    );
    let read = qemu_io_with(
        &["-r", "-f", "raw"],
        &c.node(&primary).uri("vm@s2"),
        &["read -P 0x11 0 1M", "read -P 0 1M 1M"],
    );
    assert!(!read.contains("verification failed"), "{read}");
    assert!(!snapshot_file(&fs, &other, "vm", "s2").exists());
    c.node_mut(&other).restart();
    c.wait_up_to_date(Duration::from_secs(60));
    // The nodes without it (the replica that missed it, the tiebreaker) serve it
    // through the one that has it.
    let third = (c.nodes.iter().map(|n| n.name.clone()))
        .find(|n| n != &primary && n != &other)
        .unwrap();
    for n in [&other, &third] {
        let read = qemu_io_with(
            &["-r", "-f", "raw"],
            &c.node(n).uri("vm@s2"),
            &["read -P 0x11 0 1M", "read -P 0 1M 1M"],
        );
        assert!(!read.contains("verification failed"), "{n}: {read}");
    }

    // Bad requests: a clear error each, and nothing changes.
    for (args, says) in [
        (vec!["snapshot", "create", "vm", "s2"], "already exists"),
        (vec!["snapshot", "create", "nosuch", "s3"], "does not exist"),
        (
            vec!["snapshot", "create", "vm", "bad@name"],
            "may only contain",
        ),
        (
            vec!["volume", "create", "a@b", "--size", "1M"],
            "may only contain",
        ),
        (vec!["snapshot", "delete", "vm", "nosuch"], "does not exist"),
        (vec!["volume", "delete", "vm"], "has 1 snapshot"),
    ] {
        let err = c.fails(&args);
        assert!(err.contains(says), "tandem {args:?}: {err}");
    }
    assert_eq!(c.json(&["snapshot", "list"]).as_array().unwrap().len(), 1);
    assert!(snapshot_file(&fs, &primary, "vm", "s2").exists());

    // A snapshot deleted while a replica's node is away: the record goes at once, the
    // away node's copy once the controller visits it again. And one taken on the nodes
    // with no record (a controller replaced before it recorded it) goes too.
    let taken = c.json(&["snapshot", "create", "vm", "s3"]);
    assert_eq!(taken["replicas"].as_array().unwrap().len(), 2, "{taken:#}");
    c.node_mut(&other).stop();
    run(c.tandem().args(["snapshot", "delete", "vm", "s3"]));
    let names: Vec<String> = (c
        .json(&["snapshot", "list", "vm"])
        .as_array()
        .unwrap()
        .iter())
    .map(|s| s["name"].as_str().unwrap().to_owned())
    .collect();
    assert_eq!(names, ["s2"]);
    assert!(!snapshot_file(&fs, &primary, "vm", "s3").exists());
    assert!(snapshot_file(&fs, &other, "vm", "s3").exists());
    c.node_mut(&other).restart();
    c.wait_up_to_date(Duration::from_secs(60));
    let unrecorded = c.node(&primary).api_as(
        &c.secret(),
        "POST",
        "/v1/node/volumes/vm/snapshots",
        Some(r#"{"name": "s4"}"#),
    );
    assert_eq!(unrecorded.status, 201, "{}", unrecorded.body);
    wait_for(
        "copies that no record names are removed",
        CONVERGE,
        &[c.node(&primary), c.node(&other)],
        || {
            let left: Vec<String> = [(&other, "s3"), (&primary, "s4"), (&other, "s4")]
                .iter()
                .filter(|(n, s)| snapshot_file(&fs, n, "vm", s).exists())
                .map(|(n, s)| format!("{n}: vm@{s}"))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(left.join(", "))
            }
        },
    );
    assert!(snapshot_file(&fs, &primary, "vm", "s2").exists());

    // Deleting the volume with --force takes its snapshots along.
    run(c
        .tandem()
        .args(["volume", "detach", "vm", "--node", &primary]));
    run(c.tandem().args(["volume", "delete", "vm", "--force"]));
    assert!(c.json(&["snapshot", "list"]).as_array().unwrap().is_empty());
    wait_for(
        "the replicas and their snapshots are gone",
        CONVERGE,
        &[],
        || {
            let left: Vec<String> = [&primary, &other]
                .iter()
                .flat_map(|n| std::fs::read_dir(fs.mnt.join(n)).unwrap())
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|f| f.starts_with("vm"))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(left.join(" "))
            }
        },
    );
}

#[test]
fn a_pool_without_reflink_refuses_snapshots_clearly() {
    let Some(fs) = SmallFs::ext4(64) else {
        eprintln!("skipped: needs root, loop devices and mkfs.ext4");
        return;
    };
    let mnt = fs.mnt.clone();
    let c = Cluster::start_with("sx", 1, move |_| {
        vec![
            "--pool".into(),
            format!("default={}", mnt.join("p").display()),
        ]
    });
    let pools = c.json(&["pool", "list"]);
    assert_eq!(pools[0]["snapshots"], false, "{pools:#}");
    run(c
        .tandem()
        .args(["volume", "create", "vm", "--size", "16M", "--replicas", "1"]));
    c.wait_up_to_date(Duration::from_secs(30));
    let err = c.fails(&["snapshot", "create", "vm", "s1"]);
    assert!(err.contains("reflink"), "{err}");
    assert!(c.json(&["snapshot", "list"]).as_array().unwrap().is_empty());
    let files: Vec<String> = std::fs::read_dir(fs.mnt.join("p"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.contains('@'))
        .collect();
    assert!(files.is_empty(), "{files:?}");
}

/// Blocks of 4 KiB written by [`write_blocks`], by number.
fn random_blocks(count: usize, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    let mut blocks: Vec<u64> = (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % SIZE_BLOCKS
        })
        .collect();
    blocks.sort_unstable();
    blocks.dedup();
    blocks
}

fn write_blocks(uri: &str, blocks: &[u64], pattern: u8) {
    let commands: Vec<String> = blocks
        .iter()
        .map(|b| format!("write -P {pattern} {} 4k", b * 4096))
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(uri, &commands);
}

/// The runs `nbdinfo --map=CONTEXT` reports dirty (flag bit 0), as (offset, length).
fn dirty_map(uri: &str, context: &str) -> Vec<(u64, u64)> {
    let out = output(std::process::Command::new("nbdinfo").args([
        "--json",
        &format!("--map={context}"),
        uri,
    ]));
    assert!(
        out.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (map.as_array().unwrap().iter())
        .filter(|e| e["type"].as_u64().unwrap() & 1 != 0)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// Whether every block is inside a run; the bytes the runs hold beyond those blocks.
fn covers(runs: &[(u64, u64)], blocks: &[u64]) -> (Vec<u64>, u64) {
    let inside = |b: &u64| {
        runs.iter()
            .any(|(o, l)| *o <= b * 4096 && b * 4096 + 4096 <= o + l)
    };
    let missed: Vec<u64> = blocks.iter().copied().filter(|b| !inside(b)).collect();
    let total: u64 = runs.iter().map(|r| r.1).sum();
    (missed, total.saturating_sub(blocks.len() as u64 * 4096))
}

#[test]
fn changed_blocks_reach_real_clients_survive_a_killed_primary_and_back_up_incrementally() {
    let Some(fs) = SmallFs::xfs(1024) else {
        eprintln!("skipped: needs root, loop devices and mkfs.xfs (Debian: xfsprogs)");
        return;
    };
    let mut c = cluster_on("sc", &fs);
    let (primary, other) = volume(&c, "vm");
    let uri = c.node(&primary).uri("vm");
    qemu_io(&uri, &["write -P 0x01 0 64M", "flush"]);
    run(c.tandem().args(["snapshot", "create", "vm", "s1"]));
    let first = random_blocks(150, 7);
    write_blocks(&uri, &first, 0x02);
    run(c.tandem().args(["snapshot", "create", "vm", "s2"]));

    // On either replica, through nbdinfo: every written block, and hardly more.
    let limit = SIZE_BLOCKS * 4096 / 100;
    for node in [&primary, &other] {
        let runs = dirty_map(&c.node(node).uri("vm@s2"), "qemu:dirty-bitmap:s1");
        let (missed, extra) = covers(&runs, &first);
        assert!(missed.is_empty(), "{node} misses blocks {missed:?}");
        assert!(extra < limit, "{node} over-reports {extra} bytes");
    }
    // The live volume since s2: nothing yet.
    assert!(dirty_map(&uri, "qemu:dirty-bitmap:s2").is_empty());
    // qemu-img reads the same context (its map turns dirty into "data": false).
    let out = output(std::process::Command::new("qemu-img").args([
        "map",
        "--output=json",
        "--image-opts",
        &format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=vm@s2,x-dirty-bitmap=qemu:dirty-bitmap:s1",
            c.node(&primary).nbd.port()
        ),
    ]));
    assert!(
        out.status.success(),
        "qemu-img map: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let qemu_dirty: Vec<(u64, u64)> = (map.as_array().unwrap().iter())
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        covers(&qemu_dirty, &first).0,
        Vec::<u64>::new(),
        "qemu-img map: {map}"
    );

    // The same extents as JSON from the cluster API.
    let api = tandem_lab::http(
        "GET",
        &c.nodes[0].url("/v1/volumes/vm/snapshots/s2/changes?since=s1"),
        None,
    )
    .unwrap();
    assert_eq!(api.status, 200, "{}", api.body);
    let changes = api.json();
    let extents: Vec<(u64, u64)> = (changes["extents"].as_array().unwrap().iter())
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(covers(&extents, &first).0, Vec::<u64>::new(), "{changes:#}");
    assert_eq!(
        changes["changed-bytes"].as_u64().unwrap(),
        extents.iter().map(|e| e.1).sum::<u64>()
    );

    // The Primary killed between two snapshots: no change goes missing on either node.
    let second = random_blocks(150, 11);
    write_blocks(&uri, &second[..75], 0x03);
    c.node_mut(&primary).kill();
    c.node_mut(&primary).restart();
    c.wait_up_to_date(Duration::from_secs(60));
    write_blocks(&uri, &second[75..], 0x04);
    run(c.tandem().args(["snapshot", "create", "vm", "s3"]));
    for node in [&primary, &other] {
        let runs = dirty_map(&c.node(node).uri("vm@s3"), "qemu:dirty-bitmap:s2");
        let (missed, _) = covers(&runs, &second);
        assert!(
            missed.is_empty(),
            "{node} misses blocks {missed:?} after the Primary was killed"
        );
    }

    // Incremental backup as a user runs it: full from s1, only the changes up to s3,
    // restored into a new volume that then equals s3.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/tandem-backup");
    let dir = c.node(&primary).dir.join("backup");
    std::fs::create_dir_all(&dir).unwrap();
    let (full, inc) = (dir.join("full.raw"), dir.join("inc.raw"));
    let node = c.node(&other);
    run(std::process::Command::new(script)
        .args(["full", &node.uri("vm@s1")])
        .arg(&full));
    std::fs::copy(&full, &inc).unwrap();
    let said = run(std::process::Command::new(script)
        .args(["incremental", &node.uri("vm@s3"), "--since", "s1"])
        .arg(&inc));
    let copied: u64 = said
        .split_whitespace()
        .skip_while(|w| *w != "copied")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut all: Vec<u64> = first.iter().chain(&second).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert!(
        copied >= all.len() as u64 * 4096 && copied < all.len() as u64 * 4096 + 2 * limit,
        "{said}"
    );
    run(c.tandem().args([
        "volume",
        "create",
        "restored",
        "--size",
        "64M",
        "--replicas",
        "1",
    ]));
    c.wait_up_to_date(Duration::from_secs(60));
    let held: Vec<String> = c.json(&["volume", "show", "restored"])["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_owned())
        .collect();
    let target = c.node(&held[0]);
    run(std::process::Command::new(script)
        .arg("restore")
        .arg(&inc)
        .arg(target.uri("restored")));
    let compare = output(std::process::Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &target.uri("restored"),
        &node.uri("vm@s3"),
    ]));
    assert!(
        compare.status.success(),
        "restored differs from s3: {}",
        String::from_utf8_lossy(&compare.stdout)
    );
}

#[test]
fn a_clone_is_independent_of_its_origin_both_ways() {
    let Some(fs) = SmallFs::xfs(1024) else {
        eprintln!("skipped: needs root, loop devices and mkfs.xfs (Debian: xfsprogs)");
        return;
    };
    let c = cluster_on("sk", &fs);
    let (primary, other) = volume(&c, "vm");
    let vm = c.node(&primary).uri("vm");
    qemu_io(&vm, &["write -P 0x11 0 1M", "flush"]);
    run(c.tandem().args(["snapshot", "create", "vm", "s1"]));
    qemu_io(&vm, &["write -P 0x22 0 1M", "flush"]);

    let clone = c.json(&["snapshot", "clone", "vm", "s1", "copy"]);
    let mut placed = Cluster::participants(&clone, "diskful");
    placed.sort();
    let mut holders = vec![primary.clone(), other.clone()];
    holders.sort();
    assert_eq!(
        placed, holders,
        "the clone's replicas go where the snapshot is: {clone:#}"
    );
    assert_eq!(clone["size"], 64 << 20);
    c.wait_up_to_date(Duration::from_secs(60));
    run(c
        .tandem()
        .args(["volume", "attach", "copy", "--node", &other]));
    let node = c.node(&other);
    wait_for("the clone is served", CONVERGE, &[node], || {
        c.held_by(&other).contains(&"copy".to_owned())
    });
    let copy = node.uri("copy");
    let read = qemu_io(&copy, &["read -P 0x11 0 1M", "read -P 0 1M 1M"]);
    assert!(
        !read.contains("verification failed"),
        "the clone holds the snapshot: {read}"
    );
    // Its replicas started as the same copy: nothing to resync, identical files.
    let files = |n: &str| fs.mnt.join(n).join("copy.raw");
    assert_eq!(first_difference(&files(&primary), &files(&other)), None);

    // Writes to either leave the other (and the snapshot) alone.
    qemu_io(&copy, &["write -P 0x33 0 1M", "flush"]);
    qemu_io(&vm, &["write -P 0x44 1M 1M", "flush"]);
    let read = qemu_io(&vm, &["read -P 0x22 0 1M", "read -P 0x44 1M 1M"]);
    assert!(!read.contains("verification failed"), "{read}");
    let read = qemu_io(&copy, &["read -P 0x33 0 1M", "read -P 0 1M 1M"]);
    assert!(!read.contains("verification failed"), "{read}");
    let snap = qemu_io_with(
        &["-r", "-f", "raw"],
        &c.node(&primary).uri("vm@s1"),
        &["read -P 0x11 0 1M"],
    );
    assert!(!snap.contains("verification failed"), "{snap}");

    // Bad requests.
    assert!(
        c.fails(&["snapshot", "clone", "vm", "s1", "copy"])
            .contains("already exists")
    );
    assert!(
        c.fails(&["snapshot", "clone", "vm", "nosuch", "x"])
            .contains("does not exist")
    );

    // The origin deleted, snapshot and all: the clone keeps its bytes.
    run(c
        .tandem()
        .args(["volume", "detach", "vm", "--node", &primary]));
    run(c.tandem().args(["volume", "delete", "vm", "--force"]));
    wait_for("the origin's files are gone", CONVERGE, &[], || {
        let left: Vec<String> = [&primary, &other]
            .iter()
            .flat_map(|n| std::fs::read_dir(fs.mnt.join(n)).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.starts_with("vm"))
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(left.join(" "))
        }
    });
    let read = qemu_io(&copy, &["read -P 0x33 0 1M", "read -P 0 1M 63M"]);
    assert!(!read.contains("verification failed"), "{read}");
}

#[test]
fn a_rollback_restores_the_snapshot_on_every_replica_and_waits_for_the_volume_to_close() {
    let Some(fs) = SmallFs::xfs(1024) else {
        eprintln!("skipped: needs root, loop devices and mkfs.xfs (Debian: xfsprogs)");
        return;
    };
    let c = cluster_on("sb", &fs);
    let (primary, other) = volume(&c, "vm");
    let vm = c.node(&primary).uri("vm");
    qemu_io(&vm, &["write -P 0x11 0 1M", "flush"]);
    run(c.tandem().args(["snapshot", "create", "vm", "s1"]));
    qemu_io(&vm, &["write -P 0x22 0 1M", "write -P 0x33 2M 1M", "flush"]);

    // Open by a client: refused, naming where.
    let held = HeldClient::start(&vm, "h.pread(512, 0)");
    wait_for("the controller sees the volume open", CONVERGE, &[], || {
        let err = c.fails(&["snapshot", "rollback", "vm", "s1"]);
        if err.contains(&format!("open on {primary}")) {
            Ok(())
        } else {
            Err(err)
        }
    });
    drop(held);
    wait_for("the rollback is taken", CONVERGE, &[], || {
        let out = output(c.tandem().args(["snapshot", "rollback", "vm", "s1"]));
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    c.wait_up_to_date(Duration::from_secs(60));
    for node in [&primary, &other] {
        let read = qemu_io(
            &c.node(node).uri("vm"),
            &["read -P 0x11 0 1M", "read -P 0 2M 1M"],
        );
        assert!(!read.contains("verification failed"), "{node}: {read}");
    }
    // In step afterwards: a write reaches both, and the replicas are the same.
    qemu_io(&vm, &["write -P 0x44 4M 1M", "flush"]);
    let files = |n: &str| fs.mnt.join(n).join("vm.raw");
    wait_for(
        "the replicas are identical",
        CONVERGE,
        &[],
        || match first_difference(&files(&primary), &files(&other)) {
            None => Ok(()),
            Some(at) => Err(format!("differ at {at}")),
        },
    );
    assert!(
        c.fails(&["snapshot", "rollback", "vm", "nosuch"])
            .contains("does not exist")
    );
}
