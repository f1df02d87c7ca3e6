//! Which blocks differ between two files that shared their blocks (a snapshot and its
//! volume, or two snapshots of one volume), read from the file system's own block map
//! (`FIEMAP`).
//!
//! A snapshot is a reflink: right after it is taken, it and the volume map every block
//! to the same place on disk. A write to either goes to a new place (copy on write), so
//! a block both files still map to the same place was written in neither since they
//! shared it; a block mapped to different places, or mapped in one and a hole in the
//! other, may have changed. Nothing is recorded on the write path, so the answer
//! survives restarts and crashes as the file system does; it errs only towards
//! reporting more: a range whose place the file system does not tell (data not yet
//! written back, inline or encoded data) counts as changed.

use std::io;

use crate::blockmap::{Mapped, map};
use crate::data::DataFile;

/// A run of bytes of a compared range, and whether it may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub len: u64,
    pub changed: bool,
}

/// What holds byte `at`: a hole (`None`), or its disk address if known.
fn place_at(runs: &[Mapped], at: u64) -> Option<Option<u64>> {
    let i = runs.partition_point(|m| m.logical + m.len <= at);
    let m = runs.get(i).filter(|m| m.logical <= at)?;
    Some(m.place.map(|p| p + (at - m.logical)))
}

/// Compares two block maps over `[offset, end)`; consecutive spans alternate.
fn compare(a: &[Mapped], b: &[Mapped], offset: u64, end: u64) -> Vec<Span> {
    let mut cuts = vec![offset, end];
    for m in a.iter().chain(b) {
        cuts.push(m.logical.clamp(offset, end));
        cuts.push((m.logical + m.len).clamp(offset, end));
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut spans: Vec<Span> = Vec::new();
    for w in cuts.windows(2) {
        let (x, y) = (w[0], w[1]);
        let changed = match (place_at(a, x), place_at(b, x)) {
            (None, None) => false,
            (Some(Some(p)), Some(Some(q))) => p != q,
            _ => true,
        };
        match spans.last_mut() {
            Some(last) if last.changed == changed => last.len += y - x,
            _ => spans.push(Span {
                len: y - x,
                changed,
            }),
        }
    }
    spans
}

impl DataFile {
    /// Which bytes of `[offset, offset + len)` may differ between this file and `other`,
    /// a file it shared its blocks with (see the module's notes). This file's pending
    /// writes are written back first, so they count.
    pub fn changes_against(
        &self,
        other: &DataFile,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<Span>> {
        let end = offset + len;
        let mine = map(self.file(), offset, end, true)?;
        let theirs = map(other.file(), offset, end, true)?;
        Ok(compare(&theirs, &mine, offset, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(logical: u64, len: u64, place: Option<u64>) -> Mapped {
        Mapped {
            logical,
            len,
            place,
        }
    }

    fn span(len: u64, changed: bool) -> Span {
        Span { len, changed }
    }

    #[test]
    fn shared_places_are_unchanged_and_anything_else_changed() {
        // a: [0,100) at 1000, [200,300) at 5000. b: the same, but [40,50) moved and
        // [200,300) gone, [300,310) new, [310,320) with no known place.
        let a = [run(0, 100, Some(1000)), run(200, 100, Some(5000))];
        let b = [
            run(0, 40, Some(1000)),
            run(40, 10, Some(9000)),
            run(50, 50, Some(1050)),
            run(300, 10, Some(7000)),
            run(310, 10, None),
        ];
        assert_eq!(
            compare(&a, &b, 0, 400),
            [
                span(40, false),
                span(10, true),
                span(150, false),
                span(120, true),
                span(80, false)
            ]
        );
        // Only the range asked for, and the same place at another offset is a change.
        assert_eq!(compare(&a, &b, 45, 55), [span(5, true), span(5, false)]);
        assert_eq!(
            compare(&[run(0, 10, Some(1))], &[run(0, 10, Some(2))], 0, 10),
            [span(10, true)]
        );
        assert_eq!(compare(&[], &[], 0, 10), [span(10, false)]);
    }
}
