//! The chaos run: three hosts in network namespaces, each a controller candidate, two
//! volumes (two replicas and a tiebreaker; three replicas) with a verifying writer
//! each, and faults drawn from a seed: SIGKILL and restart of any node (the Primary
//! and the controller's included: the writer then goes on through another node),
//! cables pulled without reset, a node frozen with SIGSTOP, a link throttled with
//! `tbf`. One fault at a time, each held a few seconds, so a majority stays. The
//! schedule depends only on the seed (the event log says what was done and when).
//!
//! After the last fault everything is healed and the check is a history check: every
//! acknowledged write is read back (a block may hold a later write whose outcome the
//! writer never learned, never an older one), the replicas verify identical, every
//! volume is UpToDate within a bound (else it is stuck), and no log holds a panic.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::netns::Lab;
use crate::{Node, json, output, poll, workload};

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
    /// Acknowledged writes not found, replicas differing, volumes not UpToDate, panics.
    pub lost: Vec<String>,
    pub differing: Vec<String>,
    pub stuck: Vec<String>,
    pub crashes: Vec<String>,
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
            "chaos seed={} faults[{}] acknowledged={} bytes={} lost={} differing={} stuck={} crashes={}",
            self.seed,
            faults.join(" "),
            self.acknowledged,
            self.bytes,
            self.lost.len(),
            self.differing.len(),
            self.stuck.len(),
            self.crashes.len()
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
    Cut,
    Freeze,
    Throttle,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Cut => "cut",
            Fault::Freeze => "freeze",
            Fault::Throttle => "throttle",
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
        let fault =
            [Fault::Kill, Fault::Cut, Fault::Freeze, Fault::Throttle][rng.below(4) as usize];
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
    /// node it writes through dies, or refuses a write).
    fn ensure(&mut self, nodes: &[Node], at: usize) {
        if let Some(c) = &mut self.child
            && c.try_wait().ok().flatten().is_none()
        {
            return;
        }
        self.seed += 1;
        self.node = at;
        let start = workload::last_acknowledged(&self.log) + 1;
        let uri = nodes[at].unix_uri(self.volume);
        self.child = Some(workload::start(&uri, &self.log, self.seed, start));
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

fn cli(node: &Node, args: &[&str]) -> Result<String, String> {
    let out = output(&mut node.here(node.tandem()).args(args));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Runs the chaos; `None` where network namespaces cannot be made (not root).
pub fn run(cfg: &Config) -> Option<Summary> {
    let lab = Lab::new(3)?;
    let mut events = std::fs::File::create(&cfg.log).expect("event log");
    let started = Instant::now();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| lab.start_with(i, &format!("ch{}", i + 1), &["--controller"]))
        .collect();
    for n in &nodes[1..] {
        cli(&nodes[0], &["node", "create", &n.name, &n.api.to_string()]).expect("node create");
    }
    for (v, replicas) in VOLUMES {
        cli(
            &nodes[0],
            &[
                "volume",
                "create",
                v,
                "--size",
                "64M",
                "--replicas",
                replicas,
            ],
        )
        .expect("volume create");
        for n in &nodes {
            cli(&nodes[0], &["volume", "attach", v, "--node", &n.name]).expect("attach");
        }
    }
    note(
        &mut events,
        started,
        &format!("seed {} duration {:?}", cfg.seed, cfg.duration),
    );
    let dir = crate::scratch("chaos");
    let mut writers: Vec<Writer> = VOLUMES
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
    let mut summary = Summary {
        seed: cfg.seed,
        ..Summary::default()
    };
    let mut rng = Rng(cfg.seed ^ 0x9e37_79b9_7f4a_7c15);
    for (at, fault, host, hold) in schedule(cfg.seed, cfg.duration) {
        // A writer that ended goes on through any node, maybe the next fault's.
        for w in &mut writers {
            w.ensure(&nodes, rng.below(3) as usize);
        }
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        note(
            &mut events,
            started,
            &format!("{} {} for {hold:?}", fault.name(), nodes[host].name),
        );
        *summary.faults.entry(fault.name()).or_default() += 1;
        match fault {
            Fault::Kill => {
                nodes[host].kill();
                // The Primary died with the node: its writer goes on through another.
                for w in writers.iter_mut().filter(|w| w.node == host) {
                    w.stop();
                    note(&mut events, started, &format!("{} writer moves", w.volume));
                    w.ensure(&nodes, (host + 1 + rng.below(2) as usize) % 3);
                }
            }
            Fault::Cut => lab.cut(host),
            // SAFETY: signals a tandemd this run started.
            Fault::Freeze => unsafe {
                libc::kill(nodes[host].pid() as i32, libc::SIGSTOP);
            },
            Fault::Throttle => lab.limit(host, "1mbit"),
        }
        std::thread::sleep(hold);
        match fault {
            Fault::Kill => nodes[host].restart(),
            Fault::Cut => lab.heal(host),
            // SAFETY: as above.
            Fault::Freeze => unsafe {
                libc::kill(nodes[host].pid() as i32, libc::SIGCONT);
            },
            Fault::Throttle => lab.unlimit(host),
        }
        note(
            &mut events,
            started,
            &format!("healed {}", nodes[host].name),
        );
    }
    for w in &mut writers {
        w.stop();
    }
    note(&mut events, started, "faults over; checking");
    check(&nodes, &writers, &mut summary);
    note(&mut events, started, &summary.to_string());
    for n in &mut nodes {
        n.stop();
    }
    if summary.clean() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Some(summary)
}

fn check(nodes: &[Node], writers: &[Writer], summary: &mut Summary) {
    let up = poll(SETTLE, || {
        let list = cli(&nodes[0], &["-o", "json", "volume", "list", "--all"]).ok()?;
        let list = json(&list);
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
    for w in writers {
        let acked = count_lines(&w.log);
        summary.acknowledged += acked;
        summary.bytes += 4096 * acked;
        summary
            .lost
            .extend(workload::check(&nodes[0].unix_uri(w.volume), &w.log));
        match cli(&nodes[0], &["-o", "json", "volume", "verify", w.volume]) {
            Ok(out) => {
                let v = json(&out);
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

fn count_lines(path: &Path) -> u64 {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count() as u64)
}
