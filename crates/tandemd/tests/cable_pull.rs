//! A peer that stops answering while the Primary streams large writes at depth (socket
//! buffers full) must never freeze the Primary: its writes resume within the dead-peer
//! timeout, the client sees no error, and the Primary keeps quorum through the peers it
//! still reaches. Three hosts in network namespaces (two replicas and a tiebreaker);
//! fio writes 4 MiB blocks at queue depth 4 through NBD on the Primary's host.
//!
//! These tests need root (they create network namespaces); without it they print
//! "skipped" and pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tandem_lab::netns::Lab;
use tandem_lab::{Node, WITH_TIEBREAKER, assert_same_replicas, logs, put_replicated, wait_for};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;
/// Writing before the fault, the fault itself, and writing after it heals.
const BEFORE: Duration = Duration::from_secs(8);
const FAULT: Duration = Duration::from_secs(30);
const AFTER: Duration = Duration::from_secs(6);
/// The longest a write may take across the fault: the dead-peer timeout (5 s) and a
/// margin for the tick that notices it.
const MAX_STALL: Duration = Duration::from_secs(6);

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The host's cable is pulled: no reset reaches anyone, frames are dropped.
    Cut(usize),
    /// The node's process is stopped (SIGSTOP): its host still acknowledges TCP until
    /// its receive buffer is full, then advertises a zero window.
    Freeze(usize),
}

impl Fault {
    /// The host the fault hits.
    fn host(self) -> usize {
        match self {
            Fault::Cut(i) | Fault::Freeze(i) => i,
        }
    }

    fn begin(self, lab: &Lab, nodes: &[Node]) {
        match self {
            Fault::Cut(i) => lab.cut(i),
            Fault::Freeze(i) => signal(&nodes[i], libc::SIGSTOP),
        }
    }

    fn end(self, lab: &Lab, nodes: &[Node]) {
        match self {
            Fault::Cut(i) => lab.heal(i),
            Fault::Freeze(i) => signal(&nodes[i], libc::SIGCONT),
        }
    }
}

fn signal(node: &Node, sig: libc::c_int) {
    // SAFETY: signals a child process of this test.
    assert_eq!(unsafe { libc::kill(node.pid() as i32, sig) }, 0);
}

/// What fio reported for its one job: errors, the longest write, bytes written.
struct Report {
    error: i64,
    max_latency: Duration,
    written: u64,
}

fn fio_report(path: &std::path::Path) -> Report {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let job = tandem_lab::json(&text)["jobs"][0].clone();
    Report {
        error: job["error"].as_i64().expect("fio error field"),
        max_latency: Duration::from_nanos(job["write"]["lat_ns"]["max"].as_u64().expect("max")),
        written: job["write"]["io_bytes"].as_u64().expect("io_bytes"),
    }
}

/// The scenario: 4 MiB sequential writes at depth 4 on the Primary (host 0), `fault`
/// on another host for [`FAULT`], then healed; every write succeeds, none takes longer
/// than [`MAX_STALL`], the Primary never loses quorum, and once healed the two replicas
/// hold the same bytes.
fn writes_go_on_through(prefix: &str, fault: Fault) {
    let Some(lab) = Lab::new(3) else { return };
    assert!(tandem_lab::have("fio"), "fio is not installed");
    let volume = format!("{prefix}v");
    let nodes = lab.start_all([
        &format!("{prefix}a"),
        &format!("{prefix}b"),
        &format!("{prefix}c"),
    ]);
    put_replicated(&nodes, &volume, SIZE, &WITH_TIEBREAKER, "");
    let all: Vec<&Node> = nodes.iter().collect();
    let (a, b) = (&nodes[0], &nodes[1]);
    a.wait_connected(&volume, Duration::from_secs(20));
    b.wait_connected(&volume, Duration::from_secs(20));
    // Links as between racks: the replication stream fills every buffer on the way.
    for i in 0..3 {
        lab.limit(i, "1gbit");
    }

    let report = tandem_lab::scratch(&format!("{prefix}-fio")).join("fio.json");
    let runtime = (BEFORE + FAULT + AFTER).as_secs();
    let mut fio = std::process::Command::new("fio");
    fio.args([
        "--name=stream",
        "--ioengine=nbd",
        &format!("--uri={}", a.uri(&volume)),
        "--rw=write",
        "--bs=4m",
        "--iodepth=4",
        &format!("--size={SIZE}"),
        "--time_based",
        &format!("--runtime={runtime}"),
        // Above the link's rate, so the link (not fio) limits before the fault; the
        // cap keeps the local disk's work during the fault modest.
        "--rate=200m",
        "--output-format=json",
        &format!("--output={}", report.display()),
    ]);
    let mut fio = a.here(fio).spawn().expect("start fio");

    // The Primary's quorum, watched throughout.
    let lost_quorum = Arc::new(AtomicBool::new(false));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (lost, watching, a_status) = (lost_quorum.clone(), watching.clone(), {
            let volume = volume.clone();
            let url = a.url(&format!("/v1/node/volumes/{volume}/status"));
            let ns = lab.host(0).ns.clone();
            move || {
                tandem_lab::netns::in_ns(&ns, || tandem_lab::http("GET", &url, None))
                    .ok()
                    .map(|r| r.json())
            }
        });
        std::thread::spawn(move || {
            while watching.load(Ordering::Acquire) {
                if let Some(s) = a_status() {
                    if s["quorum"] == false {
                        lost.store(true, Ordering::Release);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    std::thread::sleep(BEFORE);
    assert_eq!(a.status(&volume)["role"], "Primary", "{}", logs(&all));
    fault.begin(&lab, &nodes);
    let began = Instant::now();
    // The Primary's metrics show the peer lost once it is declared dead.
    let lost = &nodes[fault.host()].name;
    wait_for(
        "the Primary's metrics show the peer lost",
        FAULT,
        &all,
        || {
            a.metrics().value(
                "tandem_peer_connection_state",
                &[("volume", &volume), ("peer", lost), ("state", "Connecting")],
            ) == 1.0
        },
    );
    std::thread::sleep(FAULT.saturating_sub(began.elapsed()));
    fault.end(&lab, &nodes);

    let status = fio.wait().expect("wait for fio");
    watching.store(false, Ordering::Release);
    watcher.join().unwrap();
    let r = fio_report(&report);
    assert!(
        status.success() && r.error == 0,
        "fio failed (error {}): a write reached the client as an error\n{}",
        r.error,
        logs(&all)
    );
    assert!(
        r.max_latency <= MAX_STALL,
        "a write took {:?} (at most {MAX_STALL:?} allowed)\n{}",
        r.max_latency,
        logs(&all)
    );
    assert!(
        !lost_quorum.load(Ordering::Acquire),
        "the Primary lost quorum during the fault\n{}",
        logs(&all)
    );
    assert!(r.written > 0);
    eprintln!(
        "{prefix}: {} MiB written, longest write {:?}",
        r.written / MIB,
        r.max_latency
    );

    // Healed: the secondary catches up and the replicas converge.
    wait_for(
        "the secondary has resynced",
        Duration::from_secs(60),
        &all,
        || {
            let s = a.status(&volume);
            let peer = s["peers"]
                .as_array()?
                .iter()
                .find(|p| p["node"] == b.name)?
                .clone();
            (peer["connection"] == "Connected"
                && peer["replication"] == "Established"
                && peer["disk"] == "UpToDate"
                && peer["out-of-sync"] == 0)
                .then_some(())
        },
    );
    assert_same_replicas(a, b, &volume);
}

#[test]
fn the_secondarys_cable_pulled_under_large_writes_stalls_the_primary_at_most_the_dead_peer_timeout()
{
    writes_go_on_through("sc", Fault::Cut(1));
}

#[test]
fn the_tiebreakers_cable_pulled_under_large_writes_never_stalls_the_primary() {
    writes_go_on_through("tc", Fault::Cut(2));
}

#[test]
fn a_frozen_secondary_under_large_writes_stalls_the_primary_at_most_the_dead_peer_timeout() {
    writes_go_on_through("fz", Fault::Freeze(1));
}

#[test]
fn the_primarys_cable_pulled_under_large_writes_loses_no_acknowledged_write() {
    use tandem_lab::workload;
    let Some(lab) = Lab::new(3) else { return };
    let nodes = lab.start_all(["pca", "pcb", "pcc"]);
    // Two volumes on the same links: one streams 4 MiB writes at depth 4, filling the
    // buffers; the other carries the verifying workload, whose every acknowledged
    // write is checked on the majority after the Primary is cut off.
    put_replicated(&nodes, "pbulk", SIZE, &WITH_TIEBREAKER, "");
    put_replicated(&nodes, "pcheck", 64 * MIB, &WITH_TIEBREAKER, "");
    let all: Vec<&Node> = nodes.iter().collect();
    let (a, b) = (&nodes[0], &nodes[1]);
    for v in ["pbulk", "pcheck"] {
        a.wait_connected(v, Duration::from_secs(20));
        b.wait_connected(v, Duration::from_secs(20));
    }
    for i in 0..3 {
        lab.limit(i, "1gbit");
    }
    let mut fio = std::process::Command::new("fio");
    fio.args([
        "--name=bulk",
        "--ioengine=nbd",
        &format!("--uri={}", a.uri("pbulk")),
        "--rw=write",
        "--bs=4m",
        "--iodepth=4",
        &format!("--size={SIZE}"),
        "--time_based",
        "--runtime=30",
        "--output=/dev/null",
    ]);
    let mut fio = a.here(fio).spawn().expect("start fio");
    let log = tandem_lab::scratch("pc-workload").join("acked.log");
    let mut writer = workload::start(&a.unix_uri("pcheck"), &log, 7, 0);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(a.status("pbulk")["role"], "Primary", "{}", logs(&all));

    // The Primary's cable is pulled with both streams in flight.
    lab.cut(0);
    wait_for(
        "the majority sees the Primary gone",
        Duration::from_secs(15),
        &all,
        || {
            ["pbulk", "pcheck"]
                .iter()
                .all(|v| b.peer_status(v, "pca")["connection"] != "Connected")
        },
    );
    let _ = writer.kill();
    let _ = writer.wait();
    let _ = fio.kill();
    let _ = fio.wait();
    let acked = workload::acknowledged(&log);
    assert!(
        acked.len() > 20,
        "too few writes to mean anything: {}",
        acked.len()
    );
    // Every write the cut-off Primary acknowledged is on the majority's replica.
    let problems = workload::check(&b.unix_uri("pcheck"), &log);
    assert!(
        problems.is_empty(),
        "acknowledged writes lost: {problems:?}\n{}",
        logs(&all)
    );

    // Healed: the old Primary comes back, resyncs, and both replicas match.
    lab.heal(0);
    for v in ["pbulk", "pcheck"] {
        wait_for(
            "the replicas are in sync again",
            Duration::from_secs(60),
            &all,
            || {
                let s = b.status(v);
                let peer = s["peers"]
                    .as_array()?
                    .iter()
                    .find(|p| p["node"] == "pca")?
                    .clone();
                (peer["connection"] == "Connected"
                    && peer["replication"] == "Established"
                    && peer["disk"] == "UpToDate"
                    && peer["out-of-sync"] == 0
                    && a.status(v)["disk"] == "UpToDate")
                    .then_some(())
            },
        );
        assert_same_replicas(a, b, v);
    }
    assert!(workload::check(&a.unix_uri("pcheck"), &log).is_empty());
}

/// A snapshot asked while the secondary's cable is out and 4 MiB writes stream at QD4:
/// the Primary takes it alone (the secondary is reported missing once declared dead),
/// writes wait at most the dead-peer timeout, and after the heal the replicas converge.
#[test]
fn a_snapshot_asked_while_the_secondarys_cable_is_out_stalls_writes_at_most_the_dead_peer_timeout()
{
    let Some(lab) = Lab::new(3) else { return };
    let Some(fs) = tandem_lab::SmallFs::xfs(1024) else {
        return;
    };
    let volume = "snv";
    let names = ["sna", "snb", "snc"];
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let pool = format!("default={}", fs.mnt.join(names[i]).display());
            lab.start_with(i, names[i], &["--pool", &pool])
        })
        .collect();
    put_replicated(&nodes, volume, SIZE, &WITH_TIEBREAKER, "");
    let all: Vec<&Node> = nodes.iter().collect();
    let (a, b) = (&nodes[0], &nodes[1]);
    a.wait_connected(volume, Duration::from_secs(20));
    b.wait_connected(volume, Duration::from_secs(20));
    for i in 0..3 {
        lab.limit(i, "1gbit");
    }
    let report = tandem_lab::scratch("snap-cut-fio").join("fio.json");
    let mut fio = std::process::Command::new("fio");
    fio.args([
        "--name=stream",
        "--ioengine=nbd",
        &format!("--uri={}", a.uri(volume)),
        "--rw=write",
        "--bs=4m",
        "--iodepth=4",
        &format!("--size={SIZE}"),
        "--time_based",
        "--runtime=20",
        "--rate=200m",
        "--output-format=json",
        &format!("--output={}", report.display()),
    ]);
    let mut fio = a.here(fio).spawn().expect("start fio");
    std::thread::sleep(Duration::from_secs(4));
    lab.cut(1);
    let r = a.api(
        "POST",
        &format!("/v1/node/volumes/{volume}/snapshots"),
        Some(r#"{"name":"s1"}"#),
    );
    assert_eq!(r.status, 201, "{}\n{}", r.body, logs(&all));
    let taken = r.json();
    assert_eq!(taken["replicas"], serde_json::json!([a.name]), "{taken:#}");
    assert_eq!(taken["missing"][0]["node"], b.name.as_str(), "{taken:#}");
    assert!(
        taken["paused-us"].as_u64().unwrap() <= MAX_STALL.as_micros() as u64,
        "{taken:#}"
    );
    eprintln!(
        "snapshot with the secondary cut: writes held {} µs; {} missing: {}",
        taken["paused-us"], b.name, taken["missing"][0]["reason"]
    );
    std::thread::sleep(Duration::from_secs(6));
    lab.heal(1);
    let status = fio.wait().expect("wait for fio");
    let r = fio_report(&report);
    assert!(
        status.success() && r.error == 0,
        "fio failed (error {})\n{}",
        r.error,
        logs(&all)
    );
    assert!(
        r.max_latency <= MAX_STALL,
        "a write took {:?}\n{}",
        r.max_latency,
        logs(&all)
    );
    let file = |n: &str, f: &str| fs.mnt.join(n).join(f);
    assert!(file(&a.name, "snv@s1.raw").exists() && !file(&b.name, "snv@s1.raw").exists());
    wait_for(
        "the replicas converge",
        Duration::from_secs(60),
        &all,
        || {
            tandem_lab::first_difference(&file(&a.name, "snv.raw"), &file(&b.name, "snv.raw"))
                .is_none()
                && a.status(volume)["peers"].as_array().is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p["node"] == b.name && p["out-of-sync"] == 0 && p["disk"] == "UpToDate"
                    })
                })
        },
    );
}
