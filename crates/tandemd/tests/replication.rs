//! Replicated volumes across several `tandemd` nodes on loopback, driven through NBD by
//! real clients; replicas are compared byte for byte.

use std::process::Command;
use std::time::Duration;

use tandem_lab::{
    Kind, Node, QUORUM_OFF, SmallFs, TWO_REPLICAS, WITH_TIEBREAKER, assert_same_replicas, fio_jobs,
    first_difference, nbdsh, not_filled, output, put_replicated, qemu_io, qemu_io_command,
    qemu_io_result, scratch, start_replicated, wait_for,
};

const MIB: u64 = 1 << 20;

#[test]
fn two_replicas_and_a_tiebreaker_hold_identical_bytes_after_random_writes() {
    let nodes = start_replicated("vm1", 256 * MIB, ["r1", "r2", "r3"], WITH_TIEBREAKER, "");
    nodes[0].wait_connected("vm1", Duration::from_secs(20));
    assert!(
        !nodes[2].data_file("vm1").exists(),
        "a tiebreaker holds no data"
    );

    let dir = scratch("fio-repl");
    let jobs = fio_jobs(
        Command::new("fio")
            .current_dir(&dir)
            .args([
                "--name=w",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bsrange=4k-1m",
                "--iodepth=16",
            ])
            .args([
                "--size=256M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_state_save=0",
            ])
            .arg(format!("--uri={}", nodes[0].unix_uri("vm1"))),
        &dir.join("fio.json"),
    );
    let job = &jobs[0];
    assert_eq!(job["error"], 0, "{job:#}");
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap() >= 256 * MIB,
        "{job:#}"
    );

    let status = nodes[0].status("vm1");
    assert_eq!(
        status["role"], "Secondary",
        "the last close demotes: {status:#}"
    );
    assert_eq!(status["peers"][0]["disk"], "UpToDate", "{status:#}");
    assert_same_replicas(&nodes[0], &nodes[1], "vm1");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_diskless_node_reads_and_writes_over_the_network() {
    let nodes = start_replicated(
        "vm2",
        64 * MIB,
        ["d1", "d2", "d3"],
        [Kind::Diskful, Kind::Diskful, Kind::Diskless],
        "",
    );
    nodes[2].wait_connected("vm2", Duration::from_secs(20));

    qemu_io(
        &nodes[2].uri("vm2"),
        &["write -P 0x5c 1M 3M", "write -z 2M 64k", "flush"],
    );
    qemu_io(
        &nodes[2].uri("vm2"),
        &[
            "read -P 0x5c 1M 1M",
            "read -P 0 2M 64k",
            "read -P 0x5c 3M 1M",
        ],
    );
    for n in &nodes[..2] {
        let file = n.data_file("vm2");
        for (offset, len, byte) in [(MIB, MIB, 0x5c), (2 * MIB, 65536, 0), (3 * MIB, MIB, 0x5c)] {
            assert_eq!(not_filled(&file, offset, len, byte), None, "{}", n.name);
        }
    }
    assert_same_replicas(&nodes[0], &nodes[1], "vm2");
    let status = nodes[2].status("vm2");
    assert_eq!(status["disk"], "Diskless", "{status:#}");
}

#[test]
fn a_second_node_cannot_open_a_volume_another_node_writes() {
    let nodes = start_replicated("vm3", 16 * MIB, ["p1", "p2"], TWO_REPLICAS, QUORUM_OFF);
    nodes[0].wait_connected("vm3", Duration::from_secs(20));
    // Hold the volume open on p1 while p2 tries.
    let mut holder = nbdsh()
        .args([
            "-u",
            &nodes[0].uri("vm3"),
            "-c",
            "import time; time.sleep(4)",
        ])
        .spawn()
        .unwrap();
    nodes[1].wait_status(
        "vm3",
        "p2 sees p1 become Primary",
        Duration::from_secs(10),
        |s| s["peers"][0]["role"] == "Primary",
    );
    let out = output(&mut qemu_io_command(
        &["-f", "raw"],
        &["write 0 4k"],
        &[&nodes[1].uri("vm3")],
    ));
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || text.contains("failed"),
        "second open succeeded: {text}"
    );
    assert!(text.contains("p1"), "the refusal names the holder: {text}");
    holder.wait().unwrap();
    // Once closed there, the other node may open it.
    nodes[1].wait_status("vm3", "p1 demotes", Duration::from_secs(10), |s| {
        s["peers"][0]["role"] != "Primary"
    });
    qemu_io(&nodes[1].uri("vm3"), &["write -P 7 0 4k"]);
}

#[test]
fn a_returning_replica_gets_only_the_blocks_it_missed() {
    let mut nodes = start_replicated("vm4", 128 * MIB, ["s1", "s2", "s3"], WITH_TIEBREAKER, "");
    nodes[0].wait_connected("vm4", Duration::from_secs(20));
    qemu_io(&nodes[0].unix_uri("vm4"), &["write -P 1 0 16M"]);

    nodes[1].kill();
    // 40 scattered 64 KiB writes while the second replica is away: 2.5 MiB changed.
    let writes: Vec<String> = (0..40)
        .map(|i| format!("write -P 9 {} 64k", i * 3 * MIB + 4096))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&nodes[0].unix_uri("vm4"), &writes);
    let changed = 40 * 64 * 1024;
    let status = nodes[0].status("vm4");
    assert_eq!(
        status["peers"][0]["out-of-sync"].as_u64().unwrap(),
        changed,
        "4 KiB-aligned writes mark exactly their blocks: {status:#}"
    );

    nodes[1].restart();
    let status = nodes[0].wait_peer("vm4", 0, "Established", "UpToDate");
    let sent = status["peers"][0]["resync-transferred"].as_u64().unwrap();
    assert!(
        sent >= changed && sent as f64 <= 1.1 * changed as f64,
        "resync sent {sent} for {changed}: {status:#}"
    );
    assert_eq!(status["peers"][0]["out-of-sync"], 0, "{status:#}");
    assert_same_replicas(&nodes[0], &nodes[1], "vm4");
    let back = nodes[1].status("vm4");
    assert_eq!(back["disk"], "UpToDate", "{back:#}");
}

#[test]
fn online_verify_finds_bytes_flipped_behind_its_back_and_resync_repairs_them() {
    let nodes = start_replicated("vm5", 32 * MIB, ["v1", "v2"], TWO_REPLICAS, QUORUM_OFF);
    nodes[0].wait_connected("vm5", Duration::from_secs(20));
    qemu_io(&nodes[0].unix_uri("vm5"), &["write -P 0x33 0 8M"]);
    assert_same_replicas(&nodes[0], &nodes[1], "vm5");

    // Damage three blocks of the second replica directly in its file.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(nodes[1].data_file("vm5"))
            .unwrap();
        for offset in [4096u64, 3 * MIB + 100, 7 * MIB + 4095] {
            f.write_all_at(&[0xEE], offset).unwrap();
        }
        f.sync_all().unwrap();
    }
    let r = nodes[0].api("POST", "/v1/node/volumes/vm5/verify", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let report = r.json();
    assert_eq!(report["peers"][0]["node"], "v2", "{report:#}");
    assert_eq!(report["peers"][0]["differing-blocks"], 3, "{report:#}");
    nodes[0].wait_peer("vm5", 0, "Established", "UpToDate");
    wait_for(
        "resync repairs the damaged blocks",
        Duration::from_secs(20),
        &[],
        || match first_difference(&nodes[0].data_file("vm5"), &nodes[1].data_file("vm5")) {
            None => Ok(()),
            Some(at) => Err(format!("the replicas differ at byte {at}")),
        },
    );
    // A second verify finds nothing.
    let report = nodes[0]
        .api("POST", "/v1/node/volumes/vm5/verify", None)
        .json();
    assert_eq!(report["peers"][0]["differing-blocks"], 0, "{report:#}");
}

#[test]
fn killing_the_primary_loses_no_acknowledged_write_and_it_resyncs_on_return() {
    use tandem_lab::workload;
    let mut nodes = start_replicated("vm6", 64 * MIB, ["k1", "k2", "k3"], WITH_TIEBREAKER, "");
    nodes[0].wait_connected("vm6", Duration::from_secs(20));
    let dir = scratch("workload");
    let log = dir.join("acked.log");

    let mut writer = workload::start(&nodes[0].unix_uri("vm6"), &log, 1, 0);
    std::thread::sleep(Duration::from_millis(1500));
    nodes[0].kill();
    let _ = writer.kill();
    let _ = writer.wait();
    let acked = workload::acknowledged(&log);
    assert!(
        acked.len() > 50,
        "the workload wrote too little to mean anything: {}",
        acked.len()
    );

    // The survivor takes over: every acknowledged write is there.
    nodes[1].wait_status("vm6", "k2 notices k1 died", Duration::from_secs(20), |s| {
        s["peers"][0]["connection"] != "Connected"
    });
    let problems = workload::check(&nodes[1].unix_uri("vm6"), &log);
    assert!(
        problems.is_empty(),
        "acknowledged writes lost on k2: {problems:?}"
    );
    // It keeps writing on its own.
    let mut writer = workload::start(&nodes[1].unix_uri("vm6"), &log, 2, 1 << 40);
    std::thread::sleep(Duration::from_millis(700));
    let _ = writer.kill();
    let _ = writer.wait();

    // The old Primary returns, resyncs, and ends identical.
    nodes[0].restart();
    nodes[1].wait_peer("vm6", 0, "Established", "UpToDate");
    let back = nodes[0].status("vm6");
    assert_eq!(
        back["disk"],
        "UpToDate",
        "{back:#}\n{}",
        tandem_lab::logs(&[&nodes[0], &nodes[1]])
    );
    assert_same_replicas(&nodes[0], &nodes[1], "vm6");
    let problems = workload::check(&nodes[0].unix_uri("vm6"), &log);
    assert!(
        problems.is_empty(),
        "acknowledged writes missing on the returned replica: {problems:?}"
    );
    assert!(
        nodes[0].log().contains("crashed as Primary"),
        "{}",
        nodes[0].log()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_replica_whose_disk_fills_up_fails_and_the_volume_keeps_serving() {
    use tandem_lab::workload;
    let Some(fs) = SmallFs::ext4(48) else {
        println!("skipped: cannot mount a loop file system here");
        return;
    };
    let pool = format!("default={}", fs.mnt.join("pool").display());
    let nodes = [
        Node::start("f1"),
        Node::start_with("f2", &["--pool", &pool]),
        Node::start("f3"),
    ];
    put_replicated(&nodes, "vm7", 128 * MIB, &WITH_TIEBREAKER, "");
    nodes[0].wait_connected("vm7", Duration::from_secs(20));
    // 96 MiB of data cannot fit in f2's 48 MiB file system.
    qemu_io(&nodes[0].unix_uri("vm7"), &["write -P 0x42 0 96M"]);
    nodes[0].wait_status("vm7", "f2 fails", Duration::from_secs(20), |s| {
        s["peers"][0]["disk"] == "Failed"
    });
    assert_eq!(nodes[1].status("vm7")["disk"], "Failed");
    // Still serving, with every byte intact, and writes keep working.
    qemu_io(&nodes[0].unix_uri("vm7"), &["read -P 0x42 0 96M"]);
    let dir = scratch("fullfs");
    let log = dir.join("acked.log");
    let mut writer = workload::start(&nodes[0].unix_uri("vm7"), &log, 3, 0);
    std::thread::sleep(Duration::from_millis(800));
    let _ = writer.kill();
    let _ = writer.wait();
    let problems = workload::check(&nodes[0].unix_uri("vm7"), &log);
    assert!(problems.is_empty(), "{problems:?}");
    assert!(nodes[1].log().contains("detached"), "{}", nodes[1].log());
    drop(nodes);
    drop(fs);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn thirty_two_participants_read_what_each_other_wrote() {
    let names: [String; 32] = std::array::from_fn(|i| format!("m{i}"));
    let kinds = std::array::from_fn(|i| if i < 3 { Kind::Diskful } else { Kind::Diskless });
    let nodes = start_replicated(
        "vm8",
        8 * MIB,
        names.each_ref().map(String::as_str),
        kinds,
        "",
    );
    for n in &nodes {
        n.wait_connected("vm8", Duration::from_secs(60));
    }
    let open_retrying = |node: &Node, commands: &[&str]| {
        // The previous writer's demotion reaches every node a moment after it closed.
        wait_for(
            &format!("{} runs {commands:?}", node.name),
            Duration::from_secs(10),
            &[],
            || {
                qemu_io_result(&mut qemu_io_command(
                    &["-f", "raw"],
                    commands,
                    &[&node.uri("vm8")],
                ))
            },
        );
    };
    for i in 0..32 {
        let offset = i * 64 * 1024;
        open_retrying(
            &nodes[i as usize],
            &[&format!("write -P {} {offset} 64k", i + 1)],
        );
        let reader = &nodes[(i as usize + 1) % 32];
        open_retrying(reader, &[&format!("read -P {} {offset} 64k", i + 1)]);
    }
    for n in &nodes[1..3] {
        assert_same_replicas(&nodes[0], n, "vm8");
    }
}

#[test]
fn status_reads_like_drbdadm() {
    let nodes = start_replicated("vm9", 16 * MIB, ["c1", "c2", "c3"], WITH_TIEBREAKER, "");
    nodes[0].wait_connected("vm9", Duration::from_secs(20));
    let text = nodes[0].api("GET", "/v1/node/volumes/vm9/status?format=text", None);
    assert_eq!(text.status, 200, "{}", text.body);
    assert_eq!(
        text.body,
        "vm9 role:Secondary\n  c1 disk:UpToDate open:no\n  c2 disk:UpToDate replication:Established\n  c3 disk:Diskless tiebreaker:yes\n"
    );
    let status = nodes[1].status("vm9");
    assert_eq!(status["peers"][0]["node"], "c1");
    assert_eq!(status["quorum"], true);
}

#[test]
fn overlapping_writes_from_several_connections_leave_replicas_identical() {
    let nodes = start_replicated("vm10", 16 * MIB, ["o1", "o2"], TWO_REPLICAS, QUORUM_OFF);
    nodes[0].wait_connected("vm10", Duration::from_secs(20));
    // Four jobs, each its own NBD connection, hammering the same 4 MiB with
    // unaligned-size, overlapping writes.
    let dir = scratch("fio-overlap");
    let jobs = fio_jobs(
        Command::new("fio")
            .current_dir(&dir)
            .args([
                "--name=o",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bsrange=4k-256k",
                "--iodepth=16",
            ])
            .args([
                "--numjobs=4",
                "--size=4M",
                "--io_size=64M",
                "--randrepeat=0",
            ])
            .arg(format!("--uri={}", nodes[0].unix_uri("vm10"))),
        &dir.join("fio.json"),
    );
    for job in &jobs {
        assert_eq!(job["error"], 0, "{job:#}");
        assert!(
            job["write"]["io_bytes"].as_u64().unwrap() >= 64 * MIB,
            "{job:#}"
        );
    }
    assert_same_replicas(&nodes[0], &nodes[1], "vm10");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_node_event_stream_carries_every_volumes_changes_as_they_happen() {
    let nodes = start_replicated("vm12", 16 * MIB, ["f1", "f2"], TWO_REPLICAS, QUORUM_OFF);
    put_replicated(&nodes, "vm13", 16 * MIB, &TWO_REPLICAS, QUORUM_OFF);
    nodes[0].wait_connected("vm12", Duration::from_secs(20));
    nodes[0].wait_connected("vm13", Duration::from_secs(20));
    let events = Command::new("curl")
        .args(["-sN", "--max-time", "4", &nodes[0].url("/v1/node/events")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // Each volume opened for writing on f1: Primary, then Secondary again.
    nodes[0].qemu_io("vm13", &["write -P 1 0 4k"]);
    nodes[0].qemu_io("vm12", &["write -P 2 0 4k"]);
    let out = String::from_utf8(events.wait_with_output().unwrap().stdout).unwrap();
    let events: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    let roles = |volume: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["volume"] == volume)
            .map(|e| e["status"]["role"].as_str().unwrap().to_owned())
            .fold(Vec::new(), |mut seen, role| {
                if seen.last() != Some(&role) {
                    seen.push(role);
                }
                seen
            })
    };
    // The current state first, then each change, in order, for every volume.
    assert_eq!(
        roles("vm12"),
        ["Secondary", "Primary", "Secondary"],
        "{out}"
    );
    assert_eq!(
        roles("vm13"),
        ["Secondary", "Primary", "Secondary"],
        "{out}"
    );
    let first_primary = |v: &str| {
        events
            .iter()
            .position(|e| e["volume"] == v && e["status"]["role"] == "Primary")
    };
    assert!(
        first_primary("vm13") < first_primary("vm12"),
        "in the order they happened: {out}"
    );
}

#[test]
fn state_changes_stream_as_server_sent_events() {
    let mut nodes = start_replicated("vm11", 16 * MIB, ["e1", "e2"], TWO_REPLICAS, QUORUM_OFF);
    nodes[0].wait_connected("vm11", Duration::from_secs(20));
    let events = Command::new("curl")
        .args([
            "-sN",
            "--max-time",
            "6",
            &nodes[0].url("/v1/node/volumes/vm11/events"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    nodes[1].kill();
    std::thread::sleep(Duration::from_millis(1000));
    nodes[1].restart();
    std::thread::sleep(Duration::from_millis(1500));
    let out = String::from_utf8(events.wait_with_output().unwrap().stdout).unwrap();
    let states: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    let connections: Vec<&str> = states
        .iter()
        .map(|s| s["peers"][0]["connection"].as_str().unwrap())
        .collect();
    assert_eq!(connections.first(), Some(&"Connected"), "{out}");
    assert!(
        connections.contains(&"Connecting"),
        "the loss of e2 was an event: {connections:?}"
    );
    assert_eq!(
        connections.last(),
        Some(&"Connected"),
        "its return was an event: {connections:?}"
    );
}

#[test]
fn two_nodes_opening_at_once_never_both_become_primary() {
    let nodes = start_replicated("vm12", 16 * MIB, ["t1", "t2"], TWO_REPLICAS, QUORUM_OFF);
    nodes[0].wait_connected("vm12", Duration::from_secs(20));
    for round in 0..5 {
        // Both open for writing at the same moment and hold the export for a while.
        let holders: Vec<_> = nodes
            .iter()
            .map(|n| {
                nbdsh()
                    .args([
                        "-u",
                        &n.uri("vm12"),
                        "-c",
                        "import time; h.pwrite(b'x' * 4096, 0); time.sleep(1)",
                    ])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let ok: Vec<bool> = holders
            .into_iter()
            .map(|mut h| h.wait().unwrap().success())
            .collect();
        // Exactly one: never both, and a refusal must not leave neither.
        assert_eq!(
            ok.iter().filter(|o| **o).count(),
            1,
            "round {round}: writers that succeeded: {ok:?}"
        );
        // Let the demotions settle before the next round.
        wait_for(
            "no node sees its peer Primary",
            Duration::from_secs(10),
            &[&nodes[0], &nodes[1]],
            || {
                nodes
                    .iter()
                    .all(|n| n.status("vm12")["peers"][0]["role"] != "Primary")
            },
        );
    }
}

/// A raw peer-protocol message: the 40-byte header and its payload.
fn peer_message(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(40 + payload.len());
    m.extend_from_slice(&0x544e_4450u32.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&[0u8; 2 + 8 + 8 + 8]);
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// The earlier generations a Hello of protocol version 3 carries (version 2: 3).
const EARLIER: usize = 31;

/// A Hello as node `from` to node `to` of the volume `spec` describes, built by hand,
/// with `earlier` earlier generations.
fn hello(
    spec: &serde_json::Value,
    versions: (u16, u16),
    cluster: [u8; 16],
    (from, to): (u8, u8),
    earlier: usize,
) -> Vec<u8> {
    let hex = |s: &str| {
        (0..16)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
    };
    let mut h = Vec::new();
    h.extend_from_slice(&versions.0.to_be_bytes());
    h.extend_from_slice(&versions.1.to_be_bytes());
    h.extend_from_slice(&cluster);
    h.extend_from_slice(&hex(spec["volume-id"].as_str().unwrap()));
    h.extend_from_slice(&[from, to, 0, 5]); // Secondary, DUnknown
    // Generation, bitmap generation, the earlier generations, confirmed generation.
    h.extend(std::iter::repeat_n(0u8, 8 * (3 + earlier)));
    peer_message(1, &h)
}

#[test]
fn malformed_and_foreign_peer_messages_end_only_their_connection() {
    use std::io::{Read, Write};
    let nodes = start_replicated("vm13", 16 * MIB, ["w1", "w2"], TWO_REPLICAS, QUORUM_OFF);
    nodes[0].wait_connected("vm13", Duration::from_secs(20));
    let spec: serde_json::Value = serde_json::from_str(&tandem_lab::spec(
        "vm13",
        16 * MIB,
        &[(&nodes[0], Kind::Diskful), (&nodes[1], Kind::Diskful)],
        QUORUM_OFF,
    ))
    .unwrap();
    let cluster: [u8; 16] = (0..16)
        .map(|i| {
            u8::from_str_radix(&spec["cluster-id"].as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap()
        })
        .collect::<Vec<u8>>()
        .try_into()
        .unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", vec![0xAB; 64], "bad magic"),
        (
            "unknown kind",
            peer_message(999, &[]),
            "unknown message kind",
        ),
        (
            "oversized payload",
            {
                let mut m = peer_message(1, &[]);
                m[32..36].copy_from_slice(&(64u32 << 20).to_be_bytes());
                m
            },
            "over the limit",
        ),
        (
            "short hello",
            peer_message(1, &[1, 2, 3]),
            "hello of 3 bytes",
        ),
        (
            "foreign cluster",
            hello(&spec, (3, 3), [0x77; 16], (1, 0), EARLIER),
            "belongs to cluster",
        ),
        (
            "future version",
            hello(&spec, (9, 12), cluster, (1, 0), EARLIER),
            "no common protocol version",
        ),
        (
            "older release",
            hello(&spec, (2, 2), cluster, (1, 0), 3),
            "the peer speaks protocol versions 2..=2, this node 3..=3",
        ),
        (
            "unknown node",
            hello(&spec, (3, 3), cluster, (7, 0), EARLIER),
            "not a participant",
        ),
    ];
    for (what, bytes, reason) in &cases {
        let mut s = std::net::TcpStream::connect(nodes[0].peer).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(bytes).unwrap();
        // The node answers nothing acceptable and closes the connection.
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        wait_for(
            &format!("the log to give the reason for {what}"),
            Duration::from_secs(10),
            &[&nodes[0]],
            || nodes[0].log().contains(reason),
        );
    }
    // The real peer was never disturbed, and replication still works.
    let status = nodes[0].status("vm13");
    assert_eq!(status["peers"][0]["connection"], "Connected", "{status:#}");
    qemu_io(&nodes[0].uri("vm13"), &["write -P 0x61 0 1M"]);
    assert_same_replicas(&nodes[0], &nodes[1], "vm13");
}

#[test]
fn resizing_one_replica_of_a_replicated_volume_is_refused() {
    let nodes = start_replicated("vm14", 16 * MIB, ["g1", "g2"], TWO_REPLICAS, QUORUM_OFF);
    let r = nodes[0].api(
        "PATCH",
        "/v1/node/volumes/vm14",
        Some(r#"{"size":33554432}"#),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.json()["message"].as_str().unwrap().contains("spec"),
        "{}",
        r.body
    );
    for n in &nodes {
        assert_eq!(
            std::fs::metadata(n.data_file("vm14")).unwrap().len(),
            16 * MIB,
            "{}",
            n.name
        );
    }
}

/// The spec of `name` over `members` (node id = position) as JSON, to adjust before
/// sending: participants marked `fresh`, options.
fn spec_json(name: &str, size: u64, members: &[(&Node, Kind)], options: &str) -> serde_json::Value {
    serde_json::from_str(&tandem_lab::spec(name, size, members, options)).unwrap()
}

/// Gives every node in `to` the spec.
fn put_spec_to(to: &[&Node], name: &str, spec: &serde_json::Value) {
    for n in to {
        n.put_spec(name, &spec.to_string());
    }
}

/// Panics if the verifying workload stopped (its client saw an error); then stops it.
fn stop_writer(writer: &mut std::process::Child, nodes: &[&Node]) {
    if let Some(status) = writer.try_wait().unwrap() {
        panic!(
            "the writer stopped ({status}): a write failed\n{}",
            tandem_lab::logs(nodes)
        );
    }
    let _ = writer.kill();
    let _ = writer.wait();
}

#[test]
fn participants_join_change_kind_and_leave_while_a_client_writes() {
    use tandem_lab::workload;
    let [a, b] = start_replicated("vm15", 32 * MIB, ["j1", "j2"], TWO_REPLICAS, "");
    let c = Node::start("j3");
    a.wait_connected("vm15", Duration::from_secs(20));
    let dir = scratch("join");
    let log = dir.join("acked.log");
    let mut writer = workload::start(&a.unix_uri("vm15"), &log, 5, 0);
    wait_for(
        "the writer is under way",
        Duration::from_secs(10),
        &[&a],
        || workload::acknowledged(&log).len() > 20,
    );

    // C joins as a diskless participant; live-migration style, two primaries are
    // allowed for a while, so C can open the volume while A writes.
    let two = r#""allow-two-primaries":true"#;
    let with_c = spec_json(
        "vm15",
        32 * MIB,
        &[
            (&a, Kind::Diskful),
            (&b, Kind::Diskful),
            (&c, Kind::Diskless),
        ],
        two,
    );
    put_spec_to(&[&a, &b, &c], "vm15", &with_c);
    c.wait_connected("vm15", Duration::from_secs(20));
    let status = a.peer_status("vm15", "j3");
    assert_eq!(status["kind"], "diskless", "{status:#}");
    assert_eq!(a.status("vm15")["open"], true, "A kept its client");
    // C reads back through its own export what A's client wrote.
    let problems = workload::check(&c.unix_uri("vm15"), &log);
    assert!(problems.is_empty(), "read through C: {problems:?}");
    assert!(
        !c.data_file("vm15").exists(),
        "a diskless node holds no data"
    );

    // C becomes a tiebreaker; two primaries no longer.
    let tiebreaker = spec_json(
        "vm15",
        32 * MIB,
        &[
            (&a, Kind::Diskful),
            (&b, Kind::Diskful),
            (&c, Kind::Tiebreaker),
        ],
        "",
    );
    put_spec_to(&[&a, &b, &c], "vm15", &tiebreaker);
    a.wait_status("vm15", "C votes", Duration::from_secs(20), |s| {
        s["peers"][1]["kind"] == "tiebreaker" && s["peers"][1]["connection"] == "Connected"
    });
    let on_c = c.status("vm15");
    assert_eq!(on_c["kind"], "tiebreaker", "{on_c:#}");
    assert_eq!(on_c["quorum"], true, "{on_c:#}");
    let on_b = b.peer_status("vm15", "j3");
    assert_eq!(on_b["kind"], "tiebreaker", "{on_b:#}");

    // C leaves.
    let without_c = spec_json(
        "vm15",
        32 * MIB,
        &[(&a, Kind::Diskful), (&b, Kind::Diskful)],
        "",
    );
    put_spec_to(&[&a, &b], "vm15", &without_c);
    let r = c.api("DELETE", "/v1/node/volumes/vm15", None);
    assert!(r.status < 300, "{}", r.body);
    let status = a.status("vm15");
    assert_eq!(status["peers"].as_array().unwrap().len(), 1, "{status:#}");
    assert_eq!(status["quorum"], true, "{status:#}");

    // The writer went on through all of it; every acknowledged write is on both.
    std::thread::sleep(Duration::from_millis(500));
    stop_writer(&mut writer, &[&a, &b, &c]);
    a.wait_open("vm15", 0);
    for n in [&a, &b] {
        let problems = workload::check(&n.unix_uri("vm15"), &log);
        assert!(problems.is_empty(), "on {}: {problems:?}", n.name);
    }
    assert_same_replicas(&a, &b, "vm15");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_fresh_replica_added_to_a_volume_in_use_is_resynced_in_full() {
    use tandem_lab::workload;
    let [a, b] = start_replicated("vm16", 64 * MIB, ["n1", "n2"], TWO_REPLICAS, "");
    let c = Node::start("n3");
    a.wait_connected("vm16", Duration::from_secs(20));
    qemu_io(
        &a.unix_uri("vm16"),
        &[
            "write -P 0x3c 0 24M",
            "write -P 0x7e 40M 8M",
            "write -z 30M 1M",
        ],
    );
    let dir = scratch("fresh");
    let log = dir.join("acked.log");
    let mut writer = workload::start(&a.unix_uri("vm16"), &log, 6, 0);
    wait_for(
        "the writer is under way",
        Duration::from_secs(10),
        &[&a],
        || workload::acknowledged(&log).len() > 20,
    );

    let mut spec = spec_json(
        "vm16",
        64 * MIB,
        &[
            (&a, Kind::Diskful),
            (&b, Kind::Diskful),
            (&c, Kind::Diskful),
        ],
        "",
    );
    spec["participants"][2]["fresh"] = true.into();
    // C first: it cannot reach the others yet (they do not know it), so its new,
    // empty replica is all it has, and that is no ground to stand on.
    let status = c.put_spec("vm16", &spec.to_string());
    assert_eq!(status["disk"], "Inconsistent", "{status:#}");
    let refused = qemu_io_result(&mut qemu_io_command(
        &["-f", "raw"],
        &["read 0 4k"],
        &[&c.uri("vm16")],
    ));
    let why = refused.expect_err("a fresh replica alone must not be opened");
    assert!(why.contains("UpToDate"), "{why}");

    put_spec_to(&[&a, &b], "vm16", &spec);
    c.wait_status("vm16", "C is resynced", Duration::from_secs(45), |s| {
        s["disk"] == "UpToDate"
    });
    a.wait_status("vm16", "A sees C UpToDate", Duration::from_secs(20), |s| {
        s["peers"][1]["disk"] == "UpToDate" && s["peers"][1]["replication"] == "Established"
    });
    let sent = a.peer_status("vm16", "n3")["resync-transferred"]
        .as_u64()
        .unwrap();
    assert!(sent >= 64 * MIB, "a full resync, holes included: {sent}");
    stop_writer(&mut writer, &[&a, &b, &c]);
    a.wait_open("vm16", 0);
    for n in [&a, &b] {
        n.wait_status(
            "vm16",
            "nothing left to send C",
            Duration::from_secs(20),
            |s| s["peers"][1]["out-of-sync"] == 0 && s["peers"][1]["disk"] == "UpToDate",
        );
    }
    assert_same_replicas(&a, &c, "vm16");
    assert_same_replicas(&a, &b, "vm16");
    let problems = workload::check(&c.unix_uri("vm16"), &log);
    assert!(problems.is_empty(), "read from C: {problems:?}");
    // The flag only ever applies to a replica being created: sending it again (as a
    // controller does) changes nothing.
    let status = c.put_spec("vm16", &spec.to_string());
    assert_eq!(status["disk"], "UpToDate", "{status:#}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_volume_grows_while_open_and_new_connections_see_the_new_size() {
    use tandem_lab::workload;
    let nodes = start_replicated(
        "vm17",
        16 * MIB,
        ["z1", "z2", "z3"],
        [Kind::Diskful, Kind::Diskful, Kind::Diskless],
        "",
    );
    nodes[2].wait_connected("vm17", Duration::from_secs(20));
    let dir = scratch("grow");
    let log = dir.join("acked.log");
    let mut writer = workload::start(&nodes[0].unix_uri("vm17"), &log, 7, 0);
    wait_for(
        "the writer is under way",
        Duration::from_secs(10),
        &[&nodes[0]],
        || workload::acknowledged(&log).len() > 20,
    );

    let grown = spec_json(
        "vm17",
        48 * MIB,
        &[
            (&nodes[0], Kind::Diskful),
            (&nodes[1], Kind::Diskful),
            (&nodes[2], Kind::Diskless),
        ],
        "",
    );
    // A grows first: the new space is refused while B has not grown yet.
    nodes[0].put_spec("vm17", &grown.to_string());
    let early = qemu_io_result(&mut qemu_io_command(
        &["-f", "raw"],
        &["write -P 0x11 40M 1M"],
        &[&nodes[0].uri("vm17")],
    ));
    assert!(early.is_err(), "a write past B's end succeeded: {early:?}");
    assert!(
        nodes[0].log().contains("does not reach offset"),
        "{}",
        nodes[0].log()
    );
    put_spec_to(&[&nodes[1], &nodes[2]], "vm17", &grown);
    for n in &nodes[..2] {
        assert_eq!(
            std::fs::metadata(n.data_file("vm17")).unwrap().len(),
            48 * MIB,
            "{}",
            n.name
        );
    }
    // A second client on A (the writer keeps the first) sees the new size and writes
    // past the old end.
    let size = |n: &Node| -> u64 {
        let out =
            tandem_lab::run(nbdsh().args(["-u", &n.uri("vm17"), "-c", "print(h.get_size())"]));
        out.trim().parse().unwrap()
    };
    assert_eq!(size(&nodes[0]), 48 * MIB);
    qemu_io(
        &nodes[0].uri("vm17"),
        &["write -P 0x5d 20M 4M", "write -P 0x5e 47M 1M"],
    );
    for n in &nodes[..2] {
        let file = n.data_file("vm17");
        assert_eq!(
            not_filled(&file, 20 * MIB, 4 * MIB, 0x5d),
            None,
            "{}",
            n.name
        );
        assert_eq!(not_filled(&file, 47 * MIB, MIB, 0x5e), None, "{}", n.name);
    }
    stop_writer(&mut writer, &nodes.each_ref());
    nodes[0].wait_open("vm17", 0);
    // Every node's export is the new size now, the diskless one included, and reads
    // past the old end there come over the network.
    for n in &nodes {
        assert_eq!(size(n), 48 * MIB, "{}", n.name);
    }
    qemu_io(
        &nodes[2].uri("vm17"),
        &[
            "read -P 0x5d 20M 4M",
            "read -P 0x5e 47M 1M",
            "read -P 0 24M 8M",
        ],
    );
    let problems = workload::check(&nodes[1].unix_uri("vm17"), &log);
    assert!(problems.is_empty(), "{problems:?}");
    // What the refused write left on A reached B once it had grown.
    nodes[0].wait_status("vm17", "B has everything", Duration::from_secs(20), |s| {
        s["peers"][0]["out-of-sync"] == 0
    });
    assert_same_replicas(&nodes[0], &nodes[1], "vm17");
    assert!(
        nodes[0].log().contains("resync finished"),
        "{}",
        nodes[0].log()
    );
    // Shrinking is refused.
    let small = spec_json(
        "vm17",
        16 * MIB,
        &[
            (&nodes[0], Kind::Diskful),
            (&nodes[1], Kind::Diskful),
            (&nodes[2], Kind::Diskless),
        ],
        "",
    );
    for n in &nodes {
        let r = n.api(
            "PUT",
            "/v1/node/volumes/vm17/spec",
            Some(&small.to_string()),
        );
        assert_eq!(r.status, 400, "{}: {}", n.name, r.body);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_node_cannot_gain_or_lose_its_replica_while_the_volume_is_open_there() {
    let nodes = start_replicated("vm18", 16 * MIB, ["q1", "q2", "q3"], WITH_TIEBREAKER, "");
    nodes[0].wait_connected("vm18", Duration::from_secs(20));
    let holder = tandem_lab::HeldClient::start(&nodes[0].uri("vm18"), "h.pwrite(b'q' * 4096, 0)");
    let diskless_a = spec_json(
        "vm18",
        16 * MIB,
        &[
            (&nodes[0], Kind::Diskless),
            (&nodes[1], Kind::Diskful),
            (&nodes[2], Kind::Tiebreaker),
        ],
        "",
    );
    let r = nodes[0].api(
        "PUT",
        "/v1/node/volumes/vm18/spec",
        Some(&diskless_a.to_string()),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("open on this node"),
        "{}",
        r.body
    );
    assert_eq!(nodes[0].status("vm18")["disk"], "UpToDate");
    // Once closed there, the change is taken; the replica left behind is deleted (its
    // data lives on the other replica).
    drop(holder);
    nodes[0].wait_open("vm18", 0);
    let status = nodes[0].put_spec("vm18", &diskless_a.to_string());
    assert_eq!(status["disk"], "Diskless", "{status:#}");
    assert!(!nodes[0].data_file("vm18").exists());
    let r = nodes[0].api("GET", "/v1/node/volumes/vm18", None);
    assert_eq!(r.status, 404, "{}", r.body);
    // It still serves the volume, over the network.
    let read = tandem_lab::qemu_io(&nodes[0].uri("vm18"), &["read -P 0x71 0 4k"]);
    assert!(!read.contains("failed"), "{read}");
}

#[test]
fn a_lost_replica_comes_back_empty_and_is_resynced_in_full() {
    let mut nodes = start_replicated("vm19", 16 * MIB, ["l1", "l2", "l3"], WITH_TIEBREAKER, "");
    nodes[0].wait_connected("vm19", Duration::from_secs(20));
    nodes[0].qemu_io(
        "vm19",
        &["write -P 0x4d 0 6M", "write -P 0x2b 12M 1M", "flush"],
    );
    // l2 loses its replica's files while it is down (a disk replaced, say).
    nodes[1].stop();
    std::fs::remove_file(nodes[1].data_file("vm19")).unwrap();
    std::fs::remove_file(nodes[1].data_file("vm19").with_extension("meta")).unwrap();
    nodes[1].restart();
    // It must not pass for current: it comes back empty and takes everything from l1.
    nodes[1].wait_status("vm19", "UpToDate again", Duration::from_secs(60), |s| {
        s["disk"] == "UpToDate"
    });
    assert_same_replicas(&nodes[0], &nodes[1], "vm19");
    let read = nodes[1].qemu_io("vm19", &["read -P 0x4d 0 6M", "read -P 0x2b 12M 1M"]);
    assert!(!read.contains("failed"), "{read}");
}

/// Peer certificates: both ends of a connection present one (client and server use).
const PEER_EXT: &str = "basicConstraints=CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=serverAuth,clientAuth\n\
    subjectAltName=IP:127.0.0.1\n";

#[test]
fn peers_replicate_under_mutual_tls_and_refuse_strangers() {
    if !tandem_lab::have("openssl") {
        eprintln!("openssl is not installed: skipping this TLS test");
        return;
    }
    let pki = scratch("peer-pki");
    tandem_lab::make_ca(&pki, "ca");
    tandem_lab::make_ca(&pki, "rogue-ca");
    for n in ["t1", "t2", "t3"] {
        tandem_lab::make_cert(&pki, "ca", n, n, PEER_EXT);
    }
    tandem_lab::make_cert(&pki, "rogue-ca", "t4", "t4", PEER_EXT);
    let path = |f: String| pki.join(f).to_str().unwrap().to_owned();
    let start = |name: &str, ca: &str| {
        let (cert, key, ca) = (
            path(format!("{name}-cert.pem")),
            path(format!("{name}-key.pem")),
            path(format!("{ca}-cert.pem")),
        );
        Node::start_with(
            name,
            &[
                "--peer-tls-cert",
                &cert,
                "--peer-tls-key",
                &key,
                "--peer-tls-ca",
                &ca,
            ],
        )
    };
    let nodes = [start("t1", "ca"), start("t2", "ca"), start("t3", "ca")];
    put_replicated(&nodes, "vm20", 16 * MIB, &WITH_TIEBREAKER, "");
    nodes[0].wait_connected("vm20", Duration::from_secs(20));
    nodes[0].qemu_io(
        "vm20",
        &["write -P 0x6b 0 4M", "write -P 0x19 9M 1M", "flush"],
    );
    assert_same_replicas(&nodes[0], &nodes[1], "vm20");
    assert!(nodes[0].log().contains("tls=true"), "{}", nodes[0].log());

    // A node whose certificate another CA signed, and one without TLS, never connect.
    let rogue = start("t4", "ca");
    let plain = Node::start("t5");
    for stranger in [&rogue, &plain] {
        let kinds = [Kind::Diskful, Kind::Diskless];
        let pair = [&nodes[1], stranger];
        let members: Vec<(&Node, Kind)> = pair.iter().copied().zip(kinds).collect();
        let spec = tandem_lab::spec("vm21", 16 * MIB, &members, QUORUM_OFF);
        for n in pair {
            n.put_spec("vm21", &spec);
        }
        std::thread::sleep(Duration::from_secs(2));
        let status = stranger.status("vm21");
        assert_ne!(status["peers"][0]["connection"], "Connected", "{status:#}");
        let r = stranger.api("DELETE", "/v1/node/volumes/vm21", None);
        assert_eq!(r.status, 204, "{}", r.body);
        let r = nodes[1].api("DELETE", "/v1/node/volumes/vm21", None);
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let log = nodes[1].log();
    assert!(log.contains("TLS handshake failed"), "{log}");
}
