//! The chaos run: three hosts in network namespaces, each a controller candidate with
//! its pool on its own small xfs, two volumes (two replicas and a tiebreaker; three
//! replicas) attached on every node (the tiebreaker's host is a diskless client), a
//! verifying writer each (sizes from 4 KiB to 4 MiB, up to 32 in flight), a loop of
//! control-plane changes (volumes created, grown, attached, detached, deleted;
//! snapshots taken and deleted; keys set), and faults drawn from a seed: SIGKILL and
//! restart of any node (the Primary and the controller's included: the writer then
//! goes on through another node), cables pulled without reset, a node frozen with
//! SIGSTOP, a link throttled with `tbf`, a pool's file system shut down (EIO) or
//! filled (ENOSPC), then repaired and its node restarted. One fault at a time, each
//! held a few seconds, so a majority stays. The schedule depends only on the seed
//! (the event log says what was done and when).
//!
//! After the last fault everything is healed and the check is a history check: every
//! written block holds its last acknowledged write or a later one whose outcome the
//! writer never learned, never an older one; every acknowledged change is in the
//! cluster and nothing it was not asked for; the replicas verify identical; every
//! volume is UpToDate and every node holds what the model says within a bound (else
//! it is stuck); no log holds a panic.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::changes::{self, change_loop};
use crate::netns::Lab;
use crate::workload::{self, Load};
use crate::{Node, SmallFs, poll};

/// How long every volume gets to be UpToDate once the faults have ended.
const SETTLE: Duration = Duration::from_secs(120);
const VOLUMES: [(&str, &str); 2] = [("c2", "2"), ("c3", "3")];

pub struct Config {
    pub seed: u64,
    pub duration: Duration,
    /// Where the event log goes (one line per step).
    pub log: PathBuf,
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct Summary {
    pub seed: u64,
    pub faults: BTreeMap<&'static str, u32>,
    /// Writes acknowledged, and their bytes.
    pub acknowledged: u64,
    pub bytes: u64,
    /// Control-plane changes asked for, and those that failed.
    pub changes: usize,
    pub changes_failed: usize,
    /// Acknowledged writes not found, replicas differing, volumes not UpToDate, panics.
    pub lost: Vec<String>,
    pub differing: Vec<String>,
    pub stuck: Vec<String>,
    pub crashes: Vec<String>,
    /// Volumes whose every replica had failed, each declared whole on the node the
    /// product accepted (`tandem volume trust`, as `tandem health` advises).
    pub trusted: Vec<String>,
}

impl Summary {
    pub fn clean(&self) -> bool {
        self.lost.is_empty()
            && self.differing.is_empty()
            && self.stuck.is_empty()
            && self.crashes.is_empty()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        write!(
            f,
            "chaos seed={} faults[{}] acknowledged={} bytes={} changes={} failed={} lost={} differing={} stuck={} crashes={} trusted={}",
            self.seed,
            faults.join(" "),
            self.acknowledged,
            self.bytes,
            self.changes,
            self.changes_failed,
            self.lost.len(),
            self.differing.len(),
            self.stuck.len(),
            self.crashes.len(),
            self.trusted.len()
        )
    }
}

/// xorshift64*: a seeded schedule, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    /// SIGKILL of the node a volume's writer goes through (its Primary): the host is
    /// chosen when the fault comes, by the writer (the schedule's host picks which).
    KillPrimary,
    Cut,
    Freeze,
    Throttle,
    /// The pool's file system shut down: every I/O fails with EIO.
    DiskDies,
    /// The pool's file system filled up: writes needing space fail with ENOSPC.
    DiskFull,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::Kill,
        Fault::KillPrimary,
        Fault::Cut,
        Fault::Freeze,
        Fault::Throttle,
        Fault::DiskDies,
        Fault::DiskFull,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::KillPrimary => "kill-primary",
            Fault::Cut => "cut",
            Fault::Freeze => "freeze",
            Fault::Throttle => "throttle",
            Fault::DiskDies => "disk-dies",
            Fault::DiskFull => "disk-full",
        }
    }
}

/// The faults of a run: when each starts (from the run's start), on which host, for
/// how long.
fn schedule(seed: u64, duration: Duration) -> Vec<(Duration, Fault, usize, Duration)> {
    let mut rng = Rng(seed.max(1));
    let mut at = Duration::from_secs(3);
    let mut faults = Vec::new();
    while at < duration {
        let fault = Fault::ALL[rng.below(Fault::ALL.len() as u64) as usize];
        let host = rng.below(3) as usize;
        let hold = Duration::from_millis(1000 + rng.below(5000));
        faults.push((at, fault, host, hold));
        at += hold + Duration::from_millis(2000 + rng.below(3000));
    }
    faults
}

/// A volume's verifying writer, and the node it writes through (its Primary).
struct Writer {
    volume: &'static str,
    log: PathBuf,
    child: Option<Child>,
    node: usize,
    seed: u64,
}

impl Writer {
    /// (Re)starts the writer through node `at` if it is not running (it ends when the
    /// node it writes through dies, or refuses a write), at a depth of 1, 8 or 32.
    fn ensure(&mut self, nodes: &[Node], at: usize) {
        if let Some(c) = &mut self.child
            && c.try_wait().ok().flatten().is_none()
        {
            return;
        }
        self.seed += 1;
        self.node = at;
        let start = workload::last_issued(&self.log) + 1;
        let uri = nodes[at].unix_uri(self.volume);
        let load = Load {
            depth: [1, 8, 32][(self.seed % 3) as usize],
            ..Load::mixed()
        };
        self.child = Some(workload::start_load(
            &uri, &self.log, self.seed, start, &load,
        ));
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn note(log: &mut std::fs::File, started: Instant, what: &str) {
    let _ = writeln!(log, "{:8.3} {what}", started.elapsed().as_secs_f64());
}

/// The hosts, their nodes and pools, the writers, and what the run saw so far.
struct Run<'a> {
    lab: &'a Lab,
    nodes: Vec<Node>,
    /// Each host's pool file system; `None` where this machine cannot make xfs (no
    /// disk faults then, and no snapshots).
    disks: Option<Vec<SmallFs>>,
    writers: Vec<Writer>,
    events: std::fs::File,
    started: Instant,
    summary: Summary,
}

/// How long a node may take to stop on SIGTERM.
const STOP: Duration = Duration::from_secs(30);

impl Run<'_> {
    fn note(&mut self, what: &str) {
        note(&mut self.events, self.started, what);
    }

    /// Injects `fault` on `host`, holds it, heals it.
    fn fault(&mut self, fault: Fault, host: usize, hold: Duration, rng: &mut Rng) {
        let host = match fault {
            Fault::KillPrimary => self.writers[host % self.writers.len()].node,
            _ => host,
        };
        let name = self.nodes[host].name.clone();
        let disk = matches!(fault, Fault::DiskDies | Fault::DiskFull);
        if disk && self.disks.is_none() {
            self.note(&format!("{} {name}: skipped (no xfs here)", fault.name()));
            return;
        }
        self.note(&format!("{} {name} for {hold:?}", fault.name()));
        *self.summary.faults.entry(fault.name()).or_default() += 1;
        let pid = self.nodes[host].pid() as i32;
        match fault {
            Fault::Kill | Fault::KillPrimary => {
                self.nodes[host].kill();
                // The Primary died with the node: its writer goes on through another.
                for i in 0..self.writers.len() {
                    if self.writers[i].node == host {
                        self.writers[i].stop();
                        let volume = self.writers[i].volume;
                        self.note(&format!("{volume} writer moves"));
                        let to = (host + 1 + rng.below(2) as usize) % 3;
                        self.writers[i].ensure(&self.nodes, to);
                    }
                }
            }
            Fault::Cut => self.lab.cut(host),
            // SAFETY: signals a tandemd this run started.
            Fault::Freeze => unsafe {
                libc::kill(pid, libc::SIGSTOP);
            },
            Fault::Throttle => self.lab.limit(host, "1mbit"),
            Fault::DiskDies => self.disk(host).shut_down(),
            Fault::DiskFull => {
                let took = self.disk(host).fill();
                self.note(&format!("{name}'s pool filled with {} MiB", took >> 20));
            }
        }
        std::thread::sleep(hold);
        match fault {
            Fault::Kill | Fault::KillPrimary => self.nodes[host].restart(),
            Fault::Cut => self.lab.heal(host),
            // SAFETY: as above.
            Fault::Freeze => unsafe {
                libc::kill(pid, libc::SIGCONT);
            },
            Fault::Throttle => self.lab.unlimit(host),
            // The operator's repair: the node stopped, the file system mended (its
            // log replayed by a new mount; the filler removed), the node started.
            Fault::DiskDies | Fault::DiskFull => {
                if self.nodes[host].stop_within(STOP).is_none() {
                    self.summary
                        .stuck
                        .push(format!("{name} did not stop within {STOP:?} of SIGTERM"));
                }
                match fault {
                    Fault::DiskDies => self.disk(host).remount(),
                    _ => self.disk(host).unfill(),
                }
                self.nodes[host].restart();
            }
        }
        self.note(&format!("healed {name}"));
    }

    fn disk(&self, host: usize) -> &SmallFs {
        &self.disks.as_ref().expect("pools on xfs")[host]
    }
}

/// Sets its flag when dropped: the change loop ends even when a fault's injection
/// panics (a scope waits for every thread it started before passing a panic on).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs the chaos; `None` where network namespaces cannot be made (not root).
pub fn run(cfg: &Config) -> Option<Summary> {
    let lab = Lab::new(3)?;
    let events = std::fs::File::create(&cfg.log).expect("event log");
    let started = Instant::now();
    let disks: Vec<SmallFs> = (0..3).map_while(|_| SmallFs::xfs(2048)).collect();
    let disks = (disks.len() == 3).then_some(disks);
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let name = format!("ch{}", i + 1);
            let pool =
                (disks.as_ref()).map(|d| format!("default={}", d[i].mnt.join(&name).display()));
            let mut args = vec!["--controller"];
            if let Some(pool) = &pool {
                args.extend(["--pool", pool]);
            }
            lab.start_with(i, &name, &args)
        })
        .collect();
    // Every change goes through the CLI from the first host, to whichever node answers.
    let apis = changes::apis(&nodes.iter().collect::<Vec<_>>());
    let ns = nodes[0].ns.clone();
    let cli = |args: &[&str]| changes::cli_in(ns.as_deref(), &apis, args);
    for n in &nodes[1..] {
        cli(&["node", "create", &n.name, &n.api.to_string()]).expect("node create");
    }
    for (v, replicas) in VOLUMES {
        cli(&[
            "volume",
            "create",
            v,
            "--size",
            "64M",
            "--replicas",
            replicas,
        ])
        .expect("volume create");
        for n in &nodes {
            cli(&["volume", "attach", v, "--node", &n.name]).expect("attach");
        }
    }
    let dir = crate::scratch("chaos");
    let writers: Vec<Writer> = VOLUMES
        .iter()
        .enumerate()
        .map(|(i, (v, _))| Writer {
            volume: v,
            log: dir.join(format!("{v}.log")),
            child: None,
            node: 0,
            seed: cfg.seed * 100 + i as u64 * 10,
        })
        .collect();
    let mut run = Run {
        lab: &lab,
        nodes,
        disks,
        writers,
        events,
        started,
        summary: Summary {
            seed: cfg.seed,
            ..Summary::default()
        },
    };
    run.note(&format!("seed {} duration {:?}", cfg.seed, cfg.duration));
    let opts = changes::Options {
        attach_on: run.nodes.iter().map(|n| n.name.clone()).collect(),
        snapshot: match run.disks {
            Some(_) => VOLUMES.iter().map(|(v, _)| v.to_string()).collect(),
            None => vec![],
        },
    };
    let stop = AtomicBool::new(false);
    let mut rng = Rng(cfg.seed ^ 0x9e37_79b9_7f4a_7c15);
    let history = std::thread::scope(|s| {
        let looping = s.spawn(|| change_loop(ns.as_deref(), &apis, &stop, &opts));
        let stopping = StopOnDrop(&stop);
        for (at, fault, host, hold) in schedule(cfg.seed, cfg.duration) {
            // A writer that ended goes on through any node, maybe the next fault's.
            for w in &mut run.writers {
                w.ensure(&run.nodes, rng.below(3) as usize);
            }
            if let Some(wait) = at.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            run.fault(fault, host, hold, &mut rng);
        }
        drop(stopping);
        looping.join().expect("the change loop")
    });
    for w in &mut run.writers {
        w.stop();
    }
    run.note("faults over; checking");
    check(&run.nodes, &run.writers, &apis, &history, &mut run.summary);
    let line = run.summary.to_string();
    run.note(&line);
    for n in &mut run.nodes {
        n.stop();
    }
    if run.summary.clean() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        // The nodes' directories go with them: their logs stay with the writers'.
        for n in &run.nodes {
            let _ = std::fs::write(dir.join(format!("{}.log", n.name)), n.log());
        }
        run.note(&format!("logs kept in {}", dir.display()));
    }
    Some(run.summary)
}

/// A volume whose every replica failed (their pools filled in turn, say) waits for an
/// operator once its disks are repaired: does what `tandem health` advises, trusting
/// each replica's node in turn until one is accepted (the node refuses all but the
/// one that failed last). The node trusted, if any.
fn trust_if_every_replica_failed(
    cli: &impl Fn(&[&str]) -> Result<serde_json::Value, String>,
    volume: &serde_json::Value,
) -> Option<String> {
    let diskful: Vec<&serde_json::Value> = (volume["participants"].as_array()?.iter())
        .filter(|p| p["kind"] == "diskful")
        .collect();
    if diskful.is_empty() || diskful.iter().any(|p| p["disk"] != "Failed") {
        return None;
    }
    let name = volume["name"].as_str()?;
    diskful.iter().find_map(|p| {
        let node = p["node"].as_str()?;
        cli(&["volume", "trust", name, "--node", node])
            .ok()
            .map(|_| node.to_owned())
    })
}

fn check(
    nodes: &[Node],
    writers: &[Writer],
    apis: &str,
    history: &changes::History,
    summary: &mut Summary,
) {
    let cli = |args: &[&str]| changes::cli_in(nodes[0].ns.as_deref(), apis, args);
    let up = poll(SETTLE, || {
        let list = cli(&["volume", "list", "--all"]).ok()?;
        for v in list.as_array()? {
            if let Some(node) = trust_if_every_replica_failed(&cli, v) {
                summary.trusted.push(format!("{} on {node}", v["name"]));
            }
        }
        let behind: Vec<String> = (list.as_array()?.iter())
            .filter(|v| v["state"] != "UpToDate")
            .map(|v| format!("{}:{}", v["name"], v["state"]))
            .collect();
        behind.is_empty().then_some(())
    });
    if up.is_none() {
        summary
            .stuck
            .push(format!("volumes not UpToDate after {SETTLE:?}"));
    }
    let all: Vec<&Node> = nodes.iter().collect();
    let matches = || changes::replicas_match_model(&nodes[0], apis, &all);
    if poll(SETTLE, || matches().ok()).is_none() {
        summary.stuck.push(matches().err().unwrap_or_default());
    }
    (summary.changes, summary.changes_failed) = history.counts();
    summary
        .lost
        .extend(history.problems(nodes[0].ns.as_deref(), apis));
    for w in writers {
        let (acked, bytes) = workload::acknowledged_totals(&w.log);
        summary.acknowledged += acked;
        summary.bytes += bytes;
        summary
            .lost
            .extend(workload::check(&nodes[0].unix_uri(w.volume), &w.log));
        match cli(&["volume", "verify", w.volume]) {
            Ok(v) => {
                for p in v["peers"].as_array().into_iter().flatten() {
                    if p["differing-blocks"] != 0 {
                        summary.differing.push(format!("{}: {p}", w.volume));
                    }
                }
            }
            Err(e) => summary
                .differing
                .push(format!("{}: verify failed: {e}", w.volume)),
        }
    }
    for n in nodes {
        if n.log().contains("panicked") {
            summary.crashes.push(format!("{} panicked", n.name));
        }
    }
}
