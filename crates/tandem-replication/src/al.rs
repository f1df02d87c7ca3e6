//! The activity log: the 4 MiB extents a Primary may be writing, recorded in the
//! metadata file before any write to them starts. After a Primary crash, its replica
//! may differ from the others only inside these extents, so they, and not the whole
//! volume, are resynced.
//!
//! Each log block is a complete snapshot (magic, sequence, extents, CRC32C), written
//! round-robin into the ring and synced; the valid block with the highest sequence is
//! the log.

use std::collections::{HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::sync::{Arc, Condvar, Mutex};

use crate::locks::Locked;
use tandem_pool::{PoolError, Volume};

pub(crate) const EXTENT: u64 = 4 << 20;
/// Extents active at once: 1 GiB of hot data.
const MAX_ACTIVE: usize = 256;
const MAGIC: u32 = 0x5441_4c31;
const BLOCK: usize = 4096;

struct State {
    /// Active extents, least recently used first.
    active: VecDeque<u64>,
    inflight: HashMap<u64, u32>,
    seq: u64,
    /// Writes waiting for an extent to become idle: only then does a release wake
    /// anyone.
    waiting: usize,
}

pub(crate) struct ActivityLog {
    local: Arc<Volume>,
    state: Mutex<State>,
    released: Condvar,
}

/// Extents a write is covered by, until it completes (and this is dropped, on
/// whichever thread finishes the write).
pub(crate) struct Covered {
    log: Arc<ActivityLog>,
    extents: RangeInclusive<u64>,
}

fn encode(seq: u64, extents: &VecDeque<u64>) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..12].copy_from_slice(&seq.to_le_bytes());
    b[12..16].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    for (i, e) in extents.iter().enumerate() {
        b[16 + 8 * i..24 + 8 * i].copy_from_slice(&e.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b[..BLOCK - 4]);
    b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A valid snapshot: its sequence and extents.
fn decode(b: &[u8]) -> Option<(u64, Vec<u64>)> {
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    if b.len() != BLOCK
        || u32_at(0) != MAGIC
        || crc32c::crc32c(&b[..BLOCK - 4]) != u32_at(BLOCK - 4)
    {
        return None;
    }
    let count = u32_at(12) as usize;
    (count <= MAX_ACTIVE).then(|| (u64_at(4), (0..count).map(|i| u64_at(16 + 8 * i)).collect()))
}

/// What the previous run left in the log blocks `blocks` of a volume of `size` bytes:
/// the newest valid snapshot's sequence (0: none) and its extents that lie in the
/// volume, each once. A block damaged in a way its checksum misses could name
/// others: they hold nothing to resync, and their offsets would not even fit a u64.
fn recover(blocks: &[Vec<u8>], size: u64) -> (u64, Vec<u64>) {
    let last = blocks
        .iter()
        .filter_map(|b| decode(b))
        .max_by_key(|(seq, _)| *seq);
    let (seq, mut left) = last.unwrap_or((0, Vec::new()));
    let extents = size.div_ceil(EXTENT);
    left.retain(|e| *e < extents);
    left.sort_unstable();
    left.dedup();
    (seq, left)
}

/// The fuzz target `activity_log` (and the replay of its corpus): the first 8 bytes
/// are the volume's size, the rest log blocks of 4 KiB, each sealed with the magic
/// and a correct checksum so that the fields behind them are what is exercised, as
/// with a hand-edited file. The sequence and extents recovered, or why none; never
/// panics.
#[doc(hidden)]
pub fn fuzz_activity_log(data: &[u8]) -> Result<String, String> {
    let Some((size, rest)) = data.split_first_chunk::<8>() else {
        return Err("shorter than a size".into());
    };
    let blocks: Vec<Vec<u8>> = rest
        .chunks(BLOCK - 8)
        .map(|chunk| {
            let mut b = vec![0u8; BLOCK];
            b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            b[4..4 + chunk.len()].copy_from_slice(chunk);
            let crc = crc32c::crc32c(&b[..BLOCK - 4]);
            b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
            b
        })
        .collect();
    match recover(&blocks, u64::from_le_bytes(*size)) {
        (0, _) => Err("no valid log block".into()),
        (seq, extents) => Ok(format!("sequence {seq}, extents {extents:?}")),
    }
}

impl ActivityLog {
    /// Opens the log; also returns the extents the previous run left active (empty
    /// after a clean close).
    pub fn open(local: Arc<Volume>) -> Result<(ActivityLog, Vec<u64>), PoolError> {
        let (seq, left) = recover(&local.read_activity_log()?, local.size());
        let log = ActivityLog {
            local,
            state: Mutex::new(State {
                active: VecDeque::new(),
                inflight: HashMap::new(),
                seq,
                waiting: 0,
            }),
            released: Condvar::new(),
        };
        Ok((log, left))
    }

    fn store(&self, state: &mut State) -> Result<(), PoolError> {
        state.seq += 1;
        self.local
            .write_activity_log(state.seq as u32, &encode(state.seq, &state.active))
    }

    /// Makes sure the extents of `[offset, offset + len)` are logged before a write to
    /// them starts.
    pub fn cover(self: &Arc<Self>, offset: u64, len: u64) -> Result<Covered, PoolError> {
        let extents = offset / EXTENT..=(offset + len.max(1) - 1) / EXTENT;
        let mut state = self.state.locked();
        loop {
            let missing: Vec<u64> = extents
                .clone()
                .filter(|e| !state.active.contains(e))
                .collect();
            if missing.is_empty() {
                break;
            }
            // Evict idle extents, oldest first, to make room.
            while state.active.len() + missing.len() > MAX_ACTIVE {
                let idle = state.active.iter().position(|e| {
                    !extents.contains(e) && state.inflight.get(e).copied().unwrap_or(0) == 0
                });
                match idle {
                    Some(i) => {
                        state.active.remove(i);
                    }
                    None => break,
                }
            }
            if state.active.len() + missing.len() > MAX_ACTIVE {
                state.waiting += 1;
                state = crate::locks::wait(&self.released, state);
                state.waiting -= 1;
                continue;
            }
            state.active.extend(missing);
            self.store(&mut state)?;
            break;
        }
        for e in extents.clone() {
            *state.inflight.entry(e).or_insert(0) += 1;
            if let Some(i) = state.active.iter().position(|a| *a == e) {
                let e = state.active.remove(i).expect("present");
                state.active.push_back(e);
            }
        }
        Ok(Covered {
            log: self.clone(),
            extents,
        })
    }

    /// Empties the log (the volume closed cleanly, or a resync covered what it held).
    pub fn clear(&self) -> Result<(), PoolError> {
        let mut guard = self.state.locked();
        let state = &mut *guard;
        state
            .active
            .retain(|e| state.inflight.get(e).copied().unwrap_or(0) > 0);
        self.store(state)
    }
}

impl Drop for Covered {
    fn drop(&mut self) {
        let mut state = self.log.state.locked();
        for e in self.extents.clone() {
            if let Some(n) = state.inflight.get_mut(&e) {
                *n -= 1;
                if *n == 0 {
                    state.inflight.remove(&e);
                }
            }
        }
        if state.waiting > 0 {
            self.log.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_damage_is_detected() {
        let extents: VecDeque<u64> = [3, 9, 1 << 20].into_iter().collect();
        let block = encode(7, &extents);
        assert_eq!(decode(&block), Some((7, vec![3, 9, 1 << 20])));
        let mut torn = block.clone();
        torn[20] ^= 1;
        assert_eq!(decode(&torn), None);
        assert_eq!(decode(&vec![0u8; BLOCK]), None);
    }

    #[test]
    fn the_newest_snapshot_is_recovered_with_the_extents_inside_the_volume() {
        let block = |seq, extents: &[u64]| encode(seq, &extents.iter().copied().collect());
        // Extent 9 is the last of a 40 MiB volume; 10 and 2^60 (whose offset overflows)
        // lie past its end.
        let blocks = [
            block(5, &[1]),
            block(7, &[9, 3, 10, 1 << 60, 3]),
            vec![0u8; BLOCK],
        ];
        assert_eq!(recover(&blocks, 40 << 20), (7, vec![3, 9]));
        assert_eq!(recover(&blocks[2..], 40 << 20), (0, vec![]));
    }
}
