//! The verifying workload: writes through NBD (libnbd's asynchronous calls, up to a
//! set depth, of sizes drawn from a set), every 4 KiB block of a write stamped with
//! its block number and the write's sequence number, and keeps a history of every
//! request: issued (`w SEQ FIRST BLOCKS`), acknowledged (`a SEQ`) or failed
//! (`e SEQ`); a request cut off by a kill has no outcome. Writes in flight never
//! overlap, so the writes to one block follow each other in time and in sequence.
//!
//! After faults, [`check`] reads every written block back: each holds its last
//! acknowledged write, or a later one whose outcome the writer never learned or was
//! told failed, never an older one, never a mix. With depth 1 the sequence numbers
//! follow time across blocks too: [`check_snapshot`] proves a snapshot holds every
//! write acknowledged before it was asked and none started after it was taken.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::process::{Child, Stdio};

use crate::nbdsh;

/// How a writer loads the volume: writes in flight at once, and the sizes (in 4 KiB
/// blocks) it draws from, each equally likely.
#[derive(Debug, Clone)]
pub struct Load {
    pub depth: u32,
    pub sizes: Vec<u64>,
    /// The blocks written (clipped to the volume).
    pub blocks: Range<u64>,
}

impl Load {
    /// One 4 KiB write at a time, anywhere.
    pub fn serial() -> Load {
        Load {
            depth: 1,
            sizes: vec![1],
            blocks: 0..u64::MAX,
        }
    }

    /// Mixed sizes from 4 KiB to 4 MiB, most of them small, up to 32 in flight.
    pub fn mixed() -> Load {
        Load {
            depth: 32,
            sizes: vec![1, 1, 1, 1, 2, 4, 16, 64, 256, 1024],
            blocks: 0..u64::MAX,
        }
    }
}

/// nbdsh puts the connected handle in `h`. A write is logged before it leaves, its
/// outcome when it is known; the first failure ends the writer (the node refused it),
/// like a lost connection does.
const WRITER: &str = r#"
import random, struct, nbd
log = open(LOG, "a", buffering=1)
rng = random.Random(SEED)
lo, hi = FIRST, min(END, h.get_size() // 4096)
seq = START
inflight = {}
def free(b, n):
    return all(b + n <= f or f + m <= b for (_, f, m, _) in inflight.values())
while True:
    while len(inflight) < DEPTH:
        n = min(rng.choice(SIZES), hi - lo)
        b = rng.randrange(lo, hi - n + 1)
        if not free(b, n):
            break
        seq += 1
        data = bytearray(b"".join(struct.pack(">QQ", b + i, seq) * 256 for i in range(n)))
        log.write("w %d %d %d\n" % (seq, b, n))
        buf = nbd.Buffer.from_bytearray(data)
        inflight[h.aio_pwrite(buf, b * 4096)] = (seq, b, n, buf)
    h.poll(-1)
    for cookie in list(inflight):
        try:
            done = h.aio_command_completed(cookie)
        except nbd.Error:
            log.write("e %d\n" % inflight.pop(cookie)[0])
            raise
        if done:
            log.write("a %d\n" % inflight.pop(cookie)[0])
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

/// Starts writing 4 KiB blocks one at a time to `uri` until killed; sequence numbers
/// start after `start`, so several runs on one log never reuse one.
pub fn start(uri: &str, log: &Path, seed: u64, start: u64) -> Child {
    start_load(uri, log, seed, start, &Load::serial())
}

/// [`start`], writing only the 4 KiB blocks numbered in `blocks`.
pub fn start_in(uri: &str, log: &Path, seed: u64, start: u64, blocks: Range<u64>) -> Child {
    start_load(
        uri,
        log,
        seed,
        start,
        &Load {
            blocks,
            ..Load::serial()
        },
    )
}

/// Starts writing to `uri` as `load` says, until killed or refused.
pub fn start_load(uri: &str, log: &Path, seed: u64, start: u64, load: &Load) -> Child {
    let script = format!(
        "LOG = {:?}\nSEED = {seed}\nSTART = {start}\nFIRST = {}\nEND = {}\nDEPTH = {}\nSIZES = {:?}\n{WRITER}",
        log.display().to_string(),
        load.blocks.start,
        load.blocks.end,
        load.depth,
        load.sizes,
    );
    nbdsh()
        .args(["-u", uri, "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbdsh")
}

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Acknowledged,
    Failed,
    /// The writer was cut off before it learned.
    Unknown,
}

#[derive(Debug, Clone, Copy)]
struct Write {
    seq: u64,
    first: u64,
    blocks: u64,
    outcome: Outcome,
}

/// Every request in the log, in the order issued.
fn history(log: &Path) -> Vec<Write> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut writes: Vec<Write> = Vec::new();
    let mut at: HashMap<u64, usize> = HashMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
        // A line cut by a kill says nothing.
        match (words.first().copied(), words.len()) {
            (Some("w"), 4) => {
                if let (Some(seq), Some(first), Some(blocks)) = (num(1), num(2), num(3)) {
                    at.insert(seq, writes.len());
                    writes.push(Write {
                        seq,
                        first,
                        blocks,
                        outcome: Outcome::Unknown,
                    });
                }
            }
            (Some(kind @ ("a" | "e")), 2) => {
                if let Some(i) = num(1).and_then(|seq| at.get(&seq)) {
                    writes[*i].outcome = if kind == "a" {
                        Outcome::Acknowledged
                    } else {
                        Outcome::Failed
                    };
                }
            }
            _ => {}
        }
    }
    writes
}

/// The writes to each block, in sequence.
fn per_block(writes: &[Write]) -> HashMap<u64, Vec<Write>> {
    let mut blocks: HashMap<u64, Vec<Write>> = HashMap::new();
    for w in writes {
        for b in w.first..w.first + w.blocks {
            blocks.entry(b).or_default().push(*w);
        }
    }
    blocks
}

/// Highest acknowledged sequence per block.
pub fn acknowledged(log: &Path) -> HashMap<u64, u64> {
    per_block(&history(log))
        .into_iter()
        .filter_map(|(b, ws)| {
            let acked = ws.iter().filter(|w| w.outcome == Outcome::Acknowledged);
            acked.map(|w| w.seq).max().map(|seq| (b, seq))
        })
        .collect()
}

/// The highest sequence acknowledged so far (0 before any).
pub fn last_acknowledged(log: &Path) -> u64 {
    let acked = history(log)
        .into_iter()
        .filter(|w| w.outcome == Outcome::Acknowledged);
    acked.map(|w| w.seq).max().unwrap_or(0)
}

/// The highest sequence issued so far (0 before any): a writer taking over the log
/// starts after it.
pub fn last_issued(log: &Path) -> u64 {
    history(log).iter().map(|w| w.seq).max().unwrap_or(0)
}

/// Requests acknowledged, and their bytes.
pub fn acknowledged_totals(log: &Path) -> (u64, u64) {
    let acked = history(log)
        .into_iter()
        .filter(|w| w.outcome == Outcome::Acknowledged);
    acked.fold((0, 0), |(n, bytes), w| (n + 1, bytes + 4096 * w.blocks))
}

/// Reads every written block through `uri`; returns the violations found.
pub fn check(uri: &str, log: &Path) -> Vec<String> {
    let all = history(log);
    // A writer still running issues writes after the log was read.
    let logged = all.iter().map(|w| w.seq).max().unwrap_or(0);
    let blocks = per_block(&all);
    let (found, mut problems) = read_blocks(uri, blocks.keys().copied());
    for (b, (got_b, got_seq)) in found {
        let writes = &blocks[&b];
        let floor = (writes.iter())
            .filter(|w| w.outcome == Outcome::Acknowledged)
            .map(|w| w.seq)
            .max();
        // The last acknowledged write, or any later one (its outcome unknown, or an
        // error, which leaves the range undefined; or not logged yet); zeros while
        // none was acknowledged.
        let ok = if got_b == b {
            got_seq > logged
                || (writes.iter()).any(|w| w.seq == got_seq && floor.is_none_or(|f| w.seq >= f))
        } else {
            floor.is_none() && (got_b, got_seq) == (0, 0)
        };
        if !ok {
            let seqs: Vec<String> = (writes.iter().rev().take(4))
                .map(|w| format!("{}:{:?}", w.seq, w.outcome))
                .collect();
            problems.push(format!(
                "block {b}: found block {got_b} seq {got_seq}; last writes {}",
                seqs.join(" ")
            ));
        }
    }
    problems
}

/// Checks a snapshot read through `uri` against the log of a serial writer that ran
/// while it was taken: `before` is the last sequence acknowledged when the snapshot
/// was asked, `after` the last when it had been taken. Every block holds its last
/// acknowledged write up to `before`, or a later one up to `after + 1` (the write in
/// flight then, which may not be acknowledged yet), never anything else.
pub fn check_snapshot(uri: &str, log: &Path, before: u64, after: u64) -> Vec<String> {
    let blocks = per_block(&history(log));
    let (found, mut problems) = read_blocks(uri, blocks.keys().copied());
    for (b, (got_b, got_seq)) in found {
        let writes = &blocks[&b];
        let floor = (writes.iter())
            .filter(|w| w.outcome == Outcome::Acknowledged && w.seq <= before)
            .map(|w| w.seq)
            .max();
        let written = |s: u64| writes.iter().any(|w| w.seq == s);
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
            let seqs: Vec<u64> = writes.iter().map(|w| w.seq).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_gives_each_block_its_writes_and_their_outcomes() {
        let dir = crate::scratch("workload-history");
        let log = dir.join("log");
        // 3 acknowledged over blocks 0..4, 4 failed on block 1, 5 cut off on 2..3, 6
        // acknowledged on block 9; a torn last line.
        std::fs::write(
            &log,
            "w 3 0 4\nw 4 1 1\na 3\nw 5 2 2\ne 4\nw 6 9 1\na 6\nw 7 1",
        )
        .unwrap();
        let writes = history(&log);
        let outcomes: Vec<(u64, Outcome)> = writes.iter().map(|w| (w.seq, w.outcome)).collect();
        assert_eq!(
            outcomes,
            [
                (3, Outcome::Acknowledged),
                (4, Outcome::Failed),
                (5, Outcome::Unknown),
                (6, Outcome::Acknowledged)
            ]
        );
        let acked = acknowledged(&log);
        assert_eq!(acked.len(), 5);
        assert_eq!((acked[&0], acked[&3], acked[&9]), (3, 3, 6));
        assert_eq!(per_block(&writes)[&2].len(), 2);
        assert_eq!((last_acknowledged(&log), last_issued(&log)), (6, 6));
        assert_eq!(acknowledged_totals(&log), (2, 5 * 4096));
    }
}
