//! Replication across real network links that fail: `tandemd` nodes on separate hosts
//! (network namespaces on a switch, see `tandem_lab::netns`), whose cables are pulled
//! and plugged back while real NBD clients write. Replicas are compared byte for byte.
//!
//! These tests need root (they create network namespaces); without it they print
//! "skipped" and pass.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use tandem_lab::netns::Lab;
use tandem_lab::{
    Node, QUORUM_OFF, QemuIo, TWO_REPLICAS, WITH_TIEBREAKER, assert_same_replicas,
    first_difference, logs, not_filled, poll, put_replicated, wait_for,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4 * KIB;

/// True when qemu-io's answer to one write says it was written.
fn wrote(answer: &str) -> bool {
    answer.contains("wrote") && !answer.contains("failed")
}

/// Runs one write in a session; panics unless it is written within `timeout`.
fn must_write(io: &mut QemuIo, command: &str, timeout: Duration, nodes: &[&Node]) {
    match io.command(command, timeout) {
        Some(answer) if wrote(&answer) => {}
        Some(answer) => panic!("{command}: {answer}\n{}", logs(nodes)),
        None => panic!("{command}: no answer within {timeout:?}\n{}", logs(nodes)),
    }
}

/// Asserts nothing went wrong; otherwise panics with every problem and the nodes' logs.
fn assert_no_problems(problems: &[String], nodes: &[&Node]) {
    assert!(
        problems.is_empty(),
        "{}\n\n{}",
        problems.join("\n"),
        logs(nodes)
    );
}

fn checksum(path: &Path) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    let mut h = DefaultHasher::new();
    h.write(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    h.finish()
}

/// 4 KiB blocks touched by `[offset, offset + len)`.
fn blocks(offset: u64, len: u64) -> impl Iterator<Item = u64> {
    offset / BLOCK..(offset + len).div_ceil(BLOCK)
}

/// `node`'s view of `peer` is a finished, connected replication.
fn in_sync(node: &Node, volume: &str, peer: &str) -> Option<serde_json::Value> {
    let status = node.status(volume);
    let p = status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node"] == peer)?
        .clone();
    (p["connection"] == "Connected"
        && p["replication"] == "Established"
        && p["disk"] == "UpToDate"
        && p["out-of-sync"] == 0
        && status["disk"] == "UpToDate")
        .then_some(status)
}

fn connection(node: &Node, volume: &str, peer: &str) -> String {
    node.peer_status(volume, peer)["connection"]
        .as_str()
        .unwrap_or("?")
        .to_owned()
}

#[test]
fn cutting_the_secondarys_link_during_writes_resyncs_only_changed_blocks() {
    let Some(lab) = Lab::new(3) else { return };
    let volume = "pv1";
    let nodes = lab.start_all(["ca", "cb", "cc"]);
    put_replicated(&nodes, volume, 64 * MIB, &WITH_TIEBREAKER, "");
    let all: Vec<&Node> = nodes.iter().collect();
    let (a, b) = (&nodes[0], &nodes[1]);
    a.wait_connected(volume, Duration::from_secs(20));
    b.wait_connected(volume, Duration::from_secs(20));
    // A slower link to the secondary, as between racks.
    lab.limit(1, "500mbit");

    // The Primary writes through NBD over its host's network address.
    let mut io = a.qemu_io_session(volume);
    for i in 0..64 {
        must_write(
            &mut io,
            &format!("write -P 0x11 {} 64k", i * 64 * KIB),
            Duration::from_secs(10),
            &all,
        );
    }
    assert_eq!(a.status(volume)["role"], "Primary");

    lab.cut(1);
    let cut = Instant::now();
    // While the secondary is cut off: scattered 64 KiB writes, some overwriting each
    // other, and single blocks. The first one waits until the secondary is declared
    // dead; all must succeed (the primary and the tiebreaker keep quorum).
    let mut writes: Vec<(u64, u64)> = Vec::new();
    for i in 0..24 {
        writes.push((8 * MIB + i * 2 * MIB + 8 * KIB, 64 * KIB));
    }
    for i in 0..8 {
        writes.push((8 * MIB + i * 2 * MIB + 40 * KIB, 64 * KIB));
    }
    for i in 0..32 {
        writes.push((60 * MIB + i * 12 * KIB, 4 * KIB));
    }
    let mut changed = BTreeSet::new();
    let mut slowest = Duration::ZERO;
    for (n, (offset, len)) in writes.iter().enumerate() {
        let started = Instant::now();
        must_write(
            &mut io,
            &format!("write -P 0x{:02x} {offset} {len}", 0x20 + n % 16),
            Duration::from_secs(20),
            &all,
        );
        slowest = slowest.max(started.elapsed());
        changed.extend(blocks(*offset, *len));
    }
    let changed = changed.len() as u64 * BLOCK;
    eprintln!(
        "{} writes ({changed} bytes) while cut, {:?} after the cut; slowest {slowest:?}",
        writes.len(),
        cut.elapsed()
    );
    let status = a.status(volume);
    let peer_b = a.peer_status(volume, "cb");
    assert_ne!(peer_b["connection"], "Connected", "{status:#}");
    assert_eq!(status["quorum"], true, "{status:#}");
    assert_eq!(status["role"], "Primary", "{status:#}");
    assert_eq!(
        peer_b["out-of-sync"].as_u64().unwrap(),
        changed,
        "4 KiB-aligned writes mark exactly their blocks: {status:#}"
    );

    lab.heal(1);
    let healed = Instant::now();
    let status = wait_for(
        "the primary sees the secondary Established/UpToDate again",
        Duration::from_secs(30),
        &all,
        || in_sync(a, volume, "cb"),
    );
    eprintln!("in sync {:?} after the heal", healed.elapsed());
    let peer_b = &status["peers"][0];
    assert_eq!(peer_b["node"], "cb");
    let sent = peer_b["resync-transferred"].as_u64().unwrap();
    eprintln!("resync sent {sent} bytes for {changed} changed while cut");
    assert!(
        sent >= changed && sent as f64 <= 1.1 * changed as f64,
        "resync sent {sent} bytes for {changed} changed: {status:#}"
    );
    assert!(
        b.log()
            .contains("resync starts: this replica is SyncTarget"),
        "{}",
        b.log()
    );
    // Replication goes on synchronously once the link is back.
    must_write(
        &mut io,
        "write -P 0x44 0 64k",
        Duration::from_secs(10),
        &all,
    );
    io.quit().expect("qemu-io quits");
    let back = wait_for(
        "the secondary is UpToDate",
        Duration::from_secs(10),
        &all,
        || in_sync(b, volume, "ca"),
    );
    assert_eq!(back["disk"], "UpToDate", "{back:#}");
    assert_same_replicas(a, b, volume);
    assert_eq!(not_filled(&b.data_file(volume), 0, 64 * KIB, 0x44), None);
    assert_eq!(
        not_filled(&b.data_file(volume), 64 * KIB, 4 * MIB - 64 * KIB, 0x11),
        None
    );
}

/// One write on a session and what became of it.
struct Attempt {
    offset: u64,
    written: bool,
    took: Duration,
    answer: String,
}

fn summary(attempts: &[Attempt]) -> String {
    attempts
        .iter()
        .map(|a| {
            format!(
                "\n  at {}: {} after {:?}{}",
                a.offset,
                if a.written { "written" } else { "FAILED" },
                a.took,
                if a.written {
                    String::new()
                } else {
                    format!(" ({})", a.answer.trim())
                }
            )
        })
        .collect()
}

/// 3 hosts: A (Primary, diskful), B (diskful), C (tiebreaker). A's cable is pulled
/// while it writes, then B (the majority side) takes over.
struct Isolation {
    // Nodes first: they stop before their namespaces go.
    nodes: [Node; 3],
    lab: Lab,
}

const ISOLATED: &str = "iv1";

impl Isolation {
    fn new(prefix: &str, on_no_quorum: &str) -> Option<Isolation> {
        let lab = Lab::new(3)?;
        let names = ["a", "b", "c"].map(|node| format!("{prefix}{node}"));
        let nodes = lab.start_all(names.each_ref().map(String::as_str));
        // A slow resync, so that the SyncTarget state lasts long enough to be seen.
        let options = format!(r#""on-no-quorum":"{on_no_quorum}","resync-rate":1048576"#);
        put_replicated(&nodes, ISOLATED, 32 * MIB, &WITH_TIEBREAKER, &options);
        for n in &nodes {
            n.wait_connected(ISOLATED, Duration::from_secs(20));
        }
        Some(Isolation { nodes, lab })
    }

    fn all(&self) -> Vec<&Node> {
        self.nodes.iter().collect()
    }

    /// A qemu-io session on A, which makes it Primary, after writing A's data from before
    /// the cut: 4 MiB of 0xa1.
    fn primary_session(&self) -> QemuIo {
        let mut io = self.nodes[0].qemu_io_session(ISOLATED);
        must_write(
            &mut io,
            "write -P 0xa1 0 4M",
            Duration::from_secs(20),
            &self.all(),
        );
        io
    }

    /// Waits until B has declared A dead and has quorum without it.
    fn wait_majority(&self) {
        let (a, b) = (&self.nodes[0], &self.nodes[1]);
        wait_for(
            "B notices A is gone and keeps quorum with C",
            Duration::from_secs(15),
            &self.all(),
            || {
                let status = b.status(ISOLATED);
                (connection(b, ISOLATED, &a.name) != "Connected"
                    && status["quorum"] == true
                    && b.peer_status(ISOLATED, &a.name)["role"] != "Primary")
                    .then_some(())
            },
        );
    }

    /// Heals every link and waits until all replicas agree again, noting whether A was
    /// seen as SyncTarget on the way; `None` if they do not within `timeout`.
    fn heal_and_converge(&self, timeout: Duration) -> Option<bool> {
        let (a, b) = (&self.nodes[0], &self.nodes[1]);
        for i in 0..3 {
            self.lab.heal(i);
        }
        let mut saw_target = false;
        poll(timeout, || {
            let sa = a.status(ISOLATED);
            saw_target |= sa["disk"] == "Inconsistent"
                || b.peer_status(ISOLATED, &a.name)["replication"] == "SyncTarget";
            (in_sync(a, ISOLATED, &b.name).is_some()
                && in_sync(b, ISOLATED, &a.name).is_some()
                && connection(a, ISOLATED, &self.nodes[2].name) == "Connected")
                .then_some(())
        })?;
        Some(saw_target)
    }
}

#[test]
fn an_isolated_primary_loses_quorum_and_the_majority_takes_over() {
    let Some(t) = Isolation::new("q", "io-error") else {
        return;
    };
    let all = t.all();
    let [a, b, _c] = &t.nodes;
    let mut io = t.primary_session();

    // Pull A's cable and keep writing, one 64 KiB block every 100 ms at fresh offsets,
    // until writes fail.
    t.lab.cut(0);
    let cut = Instant::now();
    let mut attempts: Vec<Attempt> = Vec::new();
    loop {
        let offset = 8 * MIB + attempts.len() as u64 * 64 * KIB;
        let started = Instant::now();
        let answer = io
            .command(
                &format!("write -P 0xa2 {offset} 64k"),
                Duration::from_secs(20),
            )
            .unwrap_or_else(|| panic!("a write on isolated A hangs\n{}", logs(&all)));
        let written = wrote(&answer);
        attempts.push(Attempt {
            offset,
            written,
            took: started.elapsed(),
            answer,
        });
        if !written {
            break;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "writes on isolated A keep succeeding: {}\n{}",
            summary(&attempts),
            logs(&all)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let failed_after = cut.elapsed();
    eprintln!(
        "isolated A:{}\nfirst failure {failed_after:?} after the cut",
        summary(&attempts)
    );
    assert!(
        failed_after < Duration::from_secs(12),
        "writes on isolated A failed only {failed_after:?} after the cut"
    );
    // From now on they fail at once, and reads of A's own replica still work.
    let failed_offset = attempts.last().unwrap().offset;
    let second_failed = 12 * MIB;
    let started = Instant::now();
    let answer = io
        .command(
            &format!("write -P 0xa3 {second_failed} 64k"),
            Duration::from_secs(5),
        )
        .expect("a write on A without quorum answers");
    assert!(
        answer.contains("failed") && started.elapsed() < Duration::from_secs(2),
        "{answer}"
    );
    let answer = io
        .command("read -P 0xa1 0 64k", Duration::from_secs(5))
        .expect("read");
    assert!(answer.contains("read 65536/65536"), "{answer}");
    let status = a.status(ISOLATED);
    assert_eq!(status["quorum"], false, "{status:#}");
    let acked_after_cut: Vec<u64> = attempts
        .iter()
        .filter(|a| a.written)
        .map(|a| a.offset)
        .collect();

    // The majority side takes over: B opens the volume and writes, also where A's
    // writes failed.
    t.wait_majority();
    b.qemu_io(
        ISOLATED,
        &[
            "write -P 0xb5 16M 2M",
            &format!("write -P 0xb6 {failed_offset} 64k"),
        ],
    );
    let b_before = checksum(&b.data_file(ISOLATED));

    // A's client goes away, then A's cable is plugged back in.
    assert!(io.quit().is_some(), "qemu-io on A did not quit");
    wait_for("A demotes", Duration::from_secs(10), &all, || {
        (a.status(ISOLATED)["role"] == "Secondary").then_some(())
    });
    let mut problems = Vec::new();
    let healed = Instant::now();
    match t.heal_and_converge(Duration::from_secs(40)) {
        None => problems.push(format!(
            "replicas did not converge within 40 s of the heal:\nA: {:#}\nB: {:#}",
            a.status(ISOLATED),
            b.status(ISOLATED)
        )),
        Some(saw_target) => {
            eprintln!("converged {:?} after the heal", healed.elapsed());
            if !saw_target
                && !a
                    .log()
                    .contains("resync starts: this replica is SyncTarget")
            {
                problems.push("A never became SyncTarget".into());
            }
        }
    }

    let (fa, fb) = (a.data_file(ISOLATED), b.data_file(ISOLATED));
    if let Some(at) = first_difference(&fa, &fb) {
        let block = at / BLOCK * BLOCK;
        problems.push(format!(
            "A's replica differs from B's at byte {at} (block at {block}; A's writes acknowledged after the cut: {acked_after_cut:?})"
        ));
    }
    if checksum(&fb) != b_before {
        problems.push("B's replica changed when A came back".into());
    }
    for (what, offset, len, byte) in [
        ("B's pattern", 16 * MIB, 2 * MIB, 0xb5),
        (
            "B's write over A's failed one",
            failed_offset,
            64 * KIB,
            0xb6,
        ),
        (
            "A's second failed write (never written)",
            second_failed,
            64 * KIB,
            0,
        ),
        ("A's data from before the cut", 0, 4 * MIB, 0xa1),
    ] {
        if let Some(at) = not_filled(&fa, offset, len, byte) {
            problems.push(format!("{what}: A's replica has not 0x{byte:02x} at {at}"));
        }
    }
    // Quorum is there so that what was acknowledged survives a failover: a write
    // acknowledged by A once cut off, which the majority never received, is lost.
    for offset in &acked_after_cut {
        if not_filled(&fb, *offset, 64 * KIB, 0xa2).is_some() {
            problems.push(format!(
                "isolated A acknowledged the write at {offset} (64 KiB) without quorum; the majority never got it: a lost write"
            ));
        }
    }
    assert_no_problems(&problems, &all);
}

#[test]
fn an_isolated_primary_with_suspend_io_holds_writes_until_quorum_returns() {
    suspended_write_of_a_dead_client("s", false);
}

/// As above, but A's link comes back while B's is down for a moment: A regains quorum
/// through the tiebreaker alone, before it learns from B that the others moved on.
#[test]
fn a_write_held_by_suspend_io_is_not_applied_when_quorum_returns_through_the_tiebreaker() {
    suspended_write_of_a_dead_client("t", true);
}

/// A (Primary) is cut off with `suspend-io`; a write is held; B takes over and writes;
/// A's client is killed; then the links come back (A's alone first, if
/// `tiebreaker_first`).
fn suspended_write_of_a_dead_client(prefix: &str, tiebreaker_first: bool) {
    let Some(t) = Isolation::new(prefix, "suspend-io") else {
        return;
    };
    let all = t.all();
    let [a, b, _c] = &t.nodes;
    let mut io = t.primary_session();
    t.lab.cut(0);
    wait_for("A loses quorum", Duration::from_secs(15), &all, || {
        (a.status(ISOLATED)["quorum"] == false).then_some(())
    });
    // A write now is held, not failed.
    let held = 16 * MIB + 64 * KIB;
    let answer = io.command(&format!("write -P 0xa3 {held} 64k"), Duration::from_secs(4));
    assert!(
        answer.is_none(),
        "a write on A without quorum completed: {answer:?}"
    );

    t.wait_majority();
    b.qemu_io(ISOLATED, &["write -P 0xb5 16M 2M"]);
    let b_before = checksum(&b.data_file(ISOLATED));

    // The client holding the suspended write dies; then the link comes back.
    io.kill();
    std::thread::sleep(Duration::from_secs(1));
    let before_heal = a.status(ISOLATED);
    // The held write outlives its client: the export stays open, A stays Primary.
    eprintln!(
        "A after its client was killed, still cut off: role {}, open {}",
        before_heal["role"], before_heal["open"]
    );
    let mut problems = Vec::new();
    if tiebreaker_first {
        t.lab.cut(1);
        t.lab.heal(0);
        let regained = poll(Duration::from_secs(15), || {
            let status = a.status(ISOLATED);
            (status["quorum"] == true && status["role"] == "Secondary").then_some(())
        });
        eprintln!(
            "A with quorum through the tiebreaker only ({regained:?}): {:#}",
            a.status(ISOLATED)
        );
        if not_filled(&a.data_file(ISOLATED), held, 64 * KIB, 0xa3).is_none() {
            problems.push(format!(
                "A applied the held write of its dead client (at {held}) once the tiebreaker gave it quorum, although B had taken over meanwhile"
            ));
        }
    }
    let healed = Instant::now();
    let converged = t.heal_and_converge(Duration::from_secs(25));
    eprintln!(
        "after the heal ({:?}): converged {converged:?}\nA: {:#}\nB: {:#}",
        healed.elapsed(),
        a.status(ISOLATED),
        b.status(ISOLATED)
    );
    if converged.is_none() {
        problems.push(format!(
            "replicas did not converge within 25 s of the heal:\nA: {:#}\nB: {:#}",
            a.status(ISOLATED),
            b.status(ISOLATED)
        ));
    }
    let (fa, fb) = (a.data_file(ISOLATED), b.data_file(ISOLATED));
    if let Some(at) = first_difference(&fa, &fb) {
        problems.push(format!("A's replica differs from B's at byte {at}"));
    }
    if not_filled(&fa, held, 64 * KIB, 0xa3).is_none() {
        problems.push(format!(
            "the held write of the killed client (at {held}) was applied on A after the heal"
        ));
    }
    if checksum(&fb) != b_before {
        problems.push(
            "B's replica changed when A came back (the dead client's suspended write landed on the majority?)"
                .into(),
        );
    }
    // B's data, written after the failover, is what both replicas must hold.
    let replicas: &[(&str, &Path)] = if converged.is_some() {
        &[("A", &fa), ("B", &fb)]
    } else {
        &[("B", &fb)]
    };
    for (who, f) in replicas {
        if let Some(at) = not_filled(f, 16 * MIB, 2 * MIB, 0xb5) {
            problems.push(format!(
                "{who}'s replica lost B's newer data at {at} (the held write of the killed client, at {held}, landed after the failover)"
            ));
        }
    }
    assert_no_problems(&problems, &all);
}

#[test]
fn split_brain_is_detected_and_resolved_by_discarding_one_side() {
    let Some(lab) = Lab::new(2) else { return };
    let volume = "sv1";
    let nodes = lab.start_all(["ba", "bb"]);
    put_replicated(&nodes, volume, 16 * MIB, &TWO_REPLICAS, QUORUM_OFF);
    let all: Vec<&Node> = nodes.iter().collect();
    let [a, b] = &nodes;
    a.wait_connected(volume, Duration::from_secs(20));
    b.wait_connected(volume, Duration::from_secs(20));
    a.qemu_io(volume, &["write -P 0x01 0 4M"]);
    wait_for("A demotes", Duration::from_secs(10), &all, || {
        (b.peer_status(volume, "ba")["role"] == "Secondary").then_some(())
    });

    lab.cut(0);
    wait_for(
        "both sides notice the partition",
        Duration::from_secs(15),
        &all,
        || {
            (connection(a, volume, "bb") != "Connected"
                && connection(b, volume, "ba") != "Connected")
                .then_some(())
        },
    );
    // With quorum off, each side opens the volume and becomes Primary.
    let mut on_a = a.qemu_io_session(volume);
    let mut on_b = b.qemu_io_session(volume);
    must_write(
        &mut on_a,
        "write -P 0xaa 1M 1M",
        Duration::from_secs(10),
        &all,
    );
    must_write(
        &mut on_b,
        "write -P 0xbb 2M 1M",
        Duration::from_secs(10),
        &all,
    );
    assert_eq!(a.status(volume)["role"], "Primary");
    assert_eq!(b.status(volume)["role"], "Primary");
    on_a.quit().expect("qemu-io quits");
    on_b.quit().expect("qemu-io quits");
    let (fa, fb) = (a.data_file(volume), b.data_file(volume));
    let (ca, cb) = (checksum(&fa), checksum(&fb));
    assert_ne!(ca, cb);

    lab.heal(0);
    wait_for(
        "both sides refuse each other (StandAlone)",
        Duration::from_secs(20),
        &all,
        || {
            (connection(a, volume, "bb") == "StandAlone"
                && connection(b, volume, "ba") == "StandAlone")
                .then_some(())
        },
    );
    assert!(a.log().contains("split brain"), "{}", a.log());
    std::thread::sleep(Duration::from_secs(3));
    for (n, peer) in [(a, "bb"), (b, "ba")] {
        assert_eq!(connection(n, volume, peer), "StandAlone");
    }
    assert_eq!(checksum(&fa), ca, "A's data changed after split brain");
    assert_eq!(checksum(&fb), cb, "B's data changed after split brain");

    // The operator keeps A's data: B's is discarded.
    for n in [b, a] {
        let r = n.api(
            "POST",
            &format!("/v1/node/volumes/{volume}/resolve"),
            Some(r#"{"discard":"bb"}"#),
        );
        assert_eq!(
            r.status, 200,
            "resolve on {}: {} {}",
            n.name, r.status, r.body
        );
    }
    wait_for(
        "the replicas connect and resync after the resolution",
        Duration::from_secs(30),
        &all,
        || (in_sync(a, volume, "bb").is_some() && in_sync(b, volume, "ba").is_some()).then_some(()),
    );
    assert_same_replicas(a, b, volume);
    assert_eq!(checksum(&fa), ca, "the kept side's data changed");
    assert_eq!(not_filled(&fb, MIB, MIB, 0xaa), None);
    assert_eq!(
        not_filled(&fb, 2 * MIB, MIB, 0x01),
        None,
        "B's discarded write is still there"
    );
}

#[test]
fn idle_links_stay_connected() {
    let Some(lab) = Lab::new(3) else { return };
    let volume = "kv1";
    let nodes = lab.start_all(["ka", "kb", "kc"]);
    put_replicated(&nodes, volume, 16 * MIB, &WITH_TIEBREAKER, "");
    let all: Vec<&Node> = nodes.iter().collect();
    for n in &nodes {
        n.wait_connected(volume, Duration::from_secs(20));
    }
    // Nobody writes for 12 s: keepalives alone must hold every link up (pings every
    // second, a peer declared dead after 5 s of silence).
    let until = Instant::now() + Duration::from_secs(12);
    let mut drops = BTreeSet::new();
    while Instant::now() < until {
        for n in &nodes {
            for p in n.status(volume)["peers"].as_array().unwrap() {
                if p["connection"] != "Connected" {
                    drops.insert(format!("{} -> {}", n.name, p["node"].as_str().unwrap()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let silent: Vec<String> = all
        .iter()
        .flat_map(|n| {
            n.log()
                .lines()
                .filter(|l| l.contains("peer is silent"))
                .map(|l| format!("{}: {l}", n.name))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        drops.is_empty() && silent.is_empty(),
        "healthy idle links were dropped: {drops:?}\n{}\n\n{}",
        silent.join("\n"),
        logs(&all)
    );
}

#[test]
fn the_primary_dying_while_it_resyncs_a_replica_hands_the_resync_to_another() {
    let Some(lab) = Lab::new(3) else { return };
    let volume = "pr1";
    let mut nodes = lab.start_all(["ea", "eb", "ec"]);
    put_replicated(
        &nodes,
        volume,
        64 * MIB,
        &[tandem_lab::Kind::Diskful; 3],
        "",
    );
    for n in &nodes {
        n.wait_connected(volume, Duration::from_secs(20));
    }
    // Node c misses 32 MiB written while it is down, then comes back over a slow link:
    // the Primary resyncs it.
    nodes[2].kill();
    let mut io = nodes[0].qemu_io_session(volume);
    let all: Vec<&Node> = nodes.iter().collect();
    must_write(
        &mut io,
        "write -P 0x5a 0 32M",
        Duration::from_secs(60),
        &all,
    );
    lab.limit(2, "20mbit");
    nodes[2].restart();
    nodes[0].wait_status(
        volume,
        "node ec is SyncTarget",
        Duration::from_secs(30),
        |s| {
            (s["peers"].as_array().unwrap().iter())
                .any(|p| p["node"] == "ec" && p["replication"] == "SyncTarget")
        },
    );
    // The Primary dies mid-resync; the link comes back to speed.
    nodes[0].kill();
    drop(io);
    lab.unlimit(2);
    // Another node writes: its new data generation needs a majority that includes the
    // half-resynced replica, which gets its resync from it.
    let (b, c) = (&nodes[1], &nodes[2]);
    // (Opening may be refused for a moment while node ec reconnects to it.)
    let write = || {
        let mut cmd = std::process::Command::new("qemu-io");
        cmd.args(["-f", "raw", "-c", "write -P 0x77 1M 1M", &b.uri(volume)]);
        let out = tandem_lab::output(&mut b.here(cmd));
        (out.status.success() && wrote(&String::from_utf8_lossy(&out.stdout))).then_some(())
    };
    if poll(Duration::from_secs(30), write).is_none() {
        panic!("node eb could not write\n{}", logs(&[b, c]));
    }
    c.wait_status(
        volume,
        "the resync is finished",
        Duration::from_secs(60),
        |s| {
            s["disk"] == "UpToDate"
                && (s["peers"].as_array().unwrap().iter())
                    .any(|p| p["node"] == "eb" && p["replication"] == "Established")
        },
    );
    assert_same_replicas(b, c, volume);
    let written = tandem_lab::qemu_io(
        &c.unix_uri(volume),
        &[
            "read -P 0x5a 0 1M",
            "read -P 0x77 1M 1M",
            "read -P 0x5a 2M 30M",
        ],
    );
    assert!(!written.contains("fail"), "{written}");
}
