//! The verifying workload: writes 4 KiB blocks through NBD, each stamped with its block
//! number and a sequence number, and logs every write the server acknowledged. After
//! faults, [`check`] reads every logged block back and proves no acknowledged write
//! was lost (a block may hold a later, unacknowledged write, never an older one).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Stdio};

use crate::nbdsh;

/// nbdsh puts the connected handle in `h`; the log gets "block seq" per acked write.
const WRITER: &str = r#"
import random, struct, sys
log = open(LOG, "a", buffering=1)
rng = random.Random(SEED)
blocks = h.get_size() // 4096
seq = START
while True:
    b = rng.randrange(blocks)
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
    let script = format!(
        "LOG = {:?}\nSEED = {seed}\nSTART = {start}\n{WRITER}",
        log.display().to_string()
    );
    nbdsh()
        .args(["-u", uri, "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbdsh")
}

/// Highest acknowledged sequence per block, from the log.
pub fn acknowledged(log: &Path) -> HashMap<u64, u64> {
    let mut last = HashMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let mut it = line.split_whitespace().map(|v| v.parse::<u64>());
        // A line cut by a kill is no acknowledgement.
        if let (Some(Ok(b)), Some(Ok(seq)), None) = (it.next(), it.next(), it.next()) {
            let e = last.entry(b).or_insert(seq);
            *e = (*e).max(seq);
        }
    }
    last
}

/// Reads every acknowledged block through `uri`; returns the violations found.
pub fn check(uri: &str, log: &Path) -> Vec<String> {
    let acked = acknowledged(log);
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
        for b in acked.keys() {
            writeln!(stdin, "{b}").unwrap();
        }
    }
    let out = child.wait_with_output().expect("nbdsh");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut problems = Vec::new();
    let mut seen = 0;
    for line in text.lines() {
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        let [b, got_b, got_seq] = v[..] else { continue };
        seen += 1;
        let want = acked[&b];
        if got_b != b || got_seq < want {
            problems.push(format!(
                "block {b}: acknowledged seq {want}, found block {got_b} seq {got_seq}"
            ));
        }
    }
    if seen != acked.len() {
        problems.push(format!(
            "read back {seen} of {} acknowledged blocks; nbdsh said: {}",
            acked.len(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    problems
}
