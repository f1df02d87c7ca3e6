//! The verifying workload: writes 4 KiB blocks through NBD, each stamped with its block
//! number and a sequence number, and logs every write the server acknowledged. After
//! faults, [`check`] reads every logged block back and proves no acknowledged write
//! was lost (a block may hold a later, unacknowledged write, never an older one).
//! Writes go one at a time, so sequence numbers follow time: [`check_snapshot`] proves
//! a snapshot holds every write acknowledged before it was asked and none started
//! after it was taken.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::process::{Child, Stdio};

use crate::nbdsh;

/// nbdsh puts the connected handle in `h`; the log gets "block seq" per acked write.
const WRITER: &str = r#"
import random, struct, sys
log = open(LOG, "a", buffering=1)
rng = random.Random(SEED)
lo, hi = FIRST, min(END, h.get_size() // 4096)
seq = START
while True:
    b = rng.randrange(lo, hi)
    seq += 1
    h.pwrite(struct.pack(">QQ", b, seq) * 256, b * 4096)
    log.write("%d %d\n" % (b, seq))
"#;

const READER: &str = r#"
import struct, sys
for line in sys.stdin:
    b = int(line)
    data = h.pread(4096, b * 4096)
    got_b, got_seq = struct.unpack(">QQ", data[:16])
    # A block must be one whole write, never a mix of two.
    if data != data[:16] * 256:
        got_b = 2**64 - 1
    print(b, got_b, got_seq)
"#;

/// Starts writing to `uri` until killed; sequence numbers start after `start`, so
/// several runs on one log never reuse one.
pub fn start(uri: &str, log: &Path, seed: u64, start: u64) -> Child {
    start_in(uri, log, seed, start, 0..u64::MAX)
}

/// [`start`], writing only the 4 KiB blocks numbered in `blocks`.
pub fn start_in(uri: &str, log: &Path, seed: u64, start: u64, blocks: Range<u64>) -> Child {
    let script = format!(
        "LOG = {:?}\nSEED = {seed}\nSTART = {start}\nFIRST = {}\nEND = {}\n{WRITER}",
        log.display().to_string(),
        blocks.start,
        blocks.end
    );
    nbdsh()
        .args(["-u", uri, "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbdsh")
}

/// Every acknowledged write in the log, in order: (block, sequence).
fn writes(log: &Path) -> Vec<(u64, u64)> {
    let mut all = Vec::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let mut it = line.split_whitespace().map(|v| v.parse::<u64>());
        // A line cut by a kill is no acknowledgement.
        if let (Some(Ok(b)), Some(Ok(seq)), None) = (it.next(), it.next(), it.next()) {
            all.push((b, seq));
        }
    }
    all
}

/// Highest acknowledged sequence per block, from the log.
pub fn acknowledged(log: &Path) -> HashMap<u64, u64> {
    let mut last = HashMap::new();
    for (b, seq) in writes(log) {
        let e = last.entry(b).or_insert(seq);
        *e = (*e).max(seq);
    }
    last
}

/// The highest sequence acknowledged so far (0 before any).
pub fn last_acknowledged(log: &Path) -> u64 {
    writes(log).iter().map(|w| w.1).max().unwrap_or(0)
}

/// Reads every acknowledged block through `uri`; returns the violations found.
pub fn check(uri: &str, log: &Path) -> Vec<String> {
    let acked = acknowledged(log);
    let (found, mut problems) = read_blocks(uri, acked.keys().copied());
    for (b, (got_b, got_seq)) in found {
        let want = acked[&b];
        if got_b != b || got_seq < want {
            problems.push(format!(
                "block {b}: acknowledged seq {want}, found block {got_b} seq {got_seq}"
            ));
        }
    }
    problems
}

/// Checks a snapshot read through `uri` against the log of a writer that ran while it
/// was taken: `before` is the last sequence acknowledged when the snapshot was asked,
/// `after` the last when it had been taken. Every block holds its last write up to
/// `before`, or a later one up to `after + 1` (the write in flight then, which may not
/// be logged yet), never anything else.
pub fn check_snapshot(uri: &str, log: &Path, before: u64, after: u64) -> Vec<String> {
    let mut history: HashMap<u64, Vec<u64>> = HashMap::new();
    for (b, seq) in writes(log) {
        history.entry(b).or_default().push(seq);
    }
    let (found, mut problems) = read_blocks(uri, history.keys().copied());
    for (b, (got_b, got_seq)) in found {
        let seqs = &history[&b];
        let floor = seqs.iter().copied().filter(|s| *s <= before).max();
        let written = |s| seqs.contains(&s) || s == after + 1;
        let ok = match floor {
            // Never written before the snapshot: zeros, or a write that came during it.
            None => {
                (got_b, got_seq) == (0, 0)
                    || (got_b == b && got_seq > before && got_seq <= after + 1 && written(got_seq))
            }
            Some(floor) => {
                got_b == b && got_seq >= floor && got_seq <= after + 1 && written(got_seq)
            }
        };
        if !ok {
            problems.push(format!(
                "block {b}: in the snapshot block {got_b} seq {got_seq}; writes {seqs:?}, acknowledged by {before} when asked, {after} when taken"
            ));
        }
    }
    problems
}

/// Reads blocks through `uri`: what each holds (block, sequence; block u64::MAX when
/// it is not one whole write), and problems reading.
fn read_blocks(
    uri: &str,
    blocks: impl Iterator<Item = u64>,
) -> (HashMap<u64, (u64, u64)>, Vec<String>) {
    let blocks: Vec<u64> = blocks.collect();
    let mut child = nbdsh()
        .args(["-u", uri, "-c", READER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nbdsh");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for b in &blocks {
            // nbdsh gone (it could not open the export): reported below, with what
            // it said, as blocks not read back.
            if writeln!(stdin, "{b}").is_err() {
                break;
            }
        }
    }
    let out = child.wait_with_output().expect("nbdsh");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = HashMap::new();
    for line in text.lines() {
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [b, got_b, got_seq] = v[..] {
            found.insert(b, (got_b, got_seq));
        }
    }
    let mut problems = Vec::new();
    if found.len() != blocks.len() {
        problems.push(format!(
            "read back {} of {} blocks; nbdsh said: {}",
            found.len(),
            blocks.len(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    (found, problems)
}
