//! Out-of-sync bitmap towards one peer: one bit per 4 KiB block, in 4 KiB pages (the
//! unit the metadata file stores).

use std::ops::Range;

use tandem_pool::BLOCK_SIZE;

/// 64-bit words in one 4 KiB page.
pub(crate) const WORDS_PER_PAGE: usize = 512;
const BLOCKS_PER_PAGE: u64 = (WORDS_PER_PAGE * 64) as u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
    blocks: u64,
    set: u64,
}

impl Bitmap {
    /// A bitmap over `size` bytes, from stored words (whole pages, possibly longer).
    pub fn from_words(size: u64, mut words: Vec<u64>) -> Bitmap {
        let blocks = size.div_ceil(BLOCK_SIZE);
        words.resize(
            (blocks.div_ceil(BLOCKS_PER_PAGE) as usize) * WORDS_PER_PAGE,
            0,
        );
        // Bits past the end are meaningless; never let them count.
        for b in blocks..(words.len() as u64 * 64) {
            words[(b / 64) as usize] &= !(1 << (b % 64));
        }
        let set = words.iter().map(|w| w.count_ones() as u64).sum();
        Bitmap { words, blocks, set }
    }

    /// Covers a volume grown to `size` bytes; the new blocks start in sync (every
    /// replica's data file grows with zeros).
    pub fn grow(&mut self, size: u64) {
        let blocks = size.div_ceil(BLOCK_SIZE);
        if blocks <= self.blocks {
            return;
        }
        self.words.resize(
            (blocks.div_ceil(BLOCKS_PER_PAGE) as usize) * WORDS_PER_PAGE,
            0,
        );
        self.blocks = blocks;
    }

    /// Bytes marked out of sync.
    pub fn bytes(&self) -> u64 {
        self.set * BLOCK_SIZE
    }

    fn blocks_of(&self, offset: u64, len: u64) -> Range<u64> {
        (offset / BLOCK_SIZE).min(self.blocks)..(offset + len).div_ceil(BLOCK_SIZE).min(self.blocks)
    }

    fn apply(&mut self, offset: u64, len: u64, on: bool) -> Range<usize> {
        // The first and last block that changed: a range marked already (a peer out
        // for a while, written over and over) stores no page again.
        let mut changed: Option<(u64, u64)> = None;
        for b in self.blocks_of(offset, len) {
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            let was = self.words[w] & bit != 0;
            if was != on {
                self.words[w] ^= bit;
                if on {
                    self.set += 1
                } else {
                    self.set -= 1
                }
                changed = Some(changed.map_or((b, b), |(first, _)| (first, b)));
            }
        }
        match changed {
            Some((first, last)) => {
                (first / BLOCKS_PER_PAGE) as usize..(last / BLOCKS_PER_PAGE) as usize + 1
            }
            None => 0..0,
        }
    }

    /// Marks the blocks touching `[offset, offset + len)`; the pages that changed.
    pub fn mark(&mut self, offset: u64, len: u64) -> Range<usize> {
        self.apply(offset, len, true)
    }

    /// Clears whole blocks inside `[offset, offset + len)`; the pages that changed.
    pub fn clear(&mut self, offset: u64, len: u64) -> Range<usize> {
        self.apply(offset, len, false)
    }

    pub fn page(&self, page: usize) -> &[u64] {
        &self.words[page * WORDS_PER_PAGE..(page + 1) * WORDS_PER_PAGE]
    }

    /// The next run of marked blocks at or after byte `from`, at most `max` bytes long,
    /// as a byte range.
    pub fn next_run(&self, from: u64, max: u64) -> Option<Range<u64>> {
        let mut b = from / BLOCK_SIZE;
        while b < self.blocks {
            let w = self.words[(b / 64) as usize] >> (b % 64);
            if w == 0 {
                b = (b / 64 + 1) * 64;
                continue;
            }
            b += w.trailing_zeros() as u64;
            break;
        }
        if b >= self.blocks {
            return None;
        }
        let start = b;
        let limit = (start + max / BLOCK_SIZE).min(self.blocks);
        while b < limit && self.words[(b / 64) as usize] & (1 << (b % 64)) != 0 {
            b += 1;
        }
        Some(start * BLOCK_SIZE..b * BLOCK_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_count_and_runs() {
        let mut b = Bitmap::from_words(1 << 30, Vec::new());
        assert_eq!(b.bytes(), 0);
        assert_eq!(b.mark(4096 + 10, 8192), 0..1);
        assert_eq!(b.bytes(), 3 * 4096, "partial blocks count whole");
        assert_eq!(b.next_run(0, 1 << 20), Some(4096..4 * 4096));
        let page = (200 << 20) / (BLOCKS_PER_PAGE * 4096) as usize;
        assert_eq!(b.mark(200 << 20, 4096), page..page + 1);
        assert!(
            b.mark(200 << 20, 4096).is_empty(),
            "marked already: no page to store"
        );
        assert!(b.mark(4096, 4096).is_empty());
        assert_eq!(
            b.next_run(4 * 4096, 1 << 20),
            Some((200 << 20)..(200 << 20) + 4096)
        );
        b.clear(0, 1 << 30);
        assert_eq!(b.bytes(), 0);
        assert_eq!(b.next_run(0, 1 << 20), None);
    }

    #[test]
    fn a_grown_bitmap_marks_past_the_old_end() {
        let mut b = Bitmap::from_words(10 * 4096, Vec::new());
        b.mark(0, 1 << 30);
        assert_eq!(b.bytes(), 10 * 4096, "marks stop at the end");
        b.grow(1 << 30);
        assert_eq!(b.bytes(), 10 * 4096, "the new part starts in sync");
        assert_eq!(b.mark(512 << 20, 4096), 4..5);
        assert_eq!(b.bytes(), 11 * 4096);
        assert_eq!(
            b.next_run(10 * 4096, 1 << 20),
            Some((512 << 20)..(512 << 20) + 4096)
        );
    }

    #[test]
    fn runs_are_capped_and_stored_words_are_trimmed_to_size() {
        let mut b = Bitmap::from_words(10 * 4096, vec![u64::MAX; 3]);
        assert_eq!(b.bytes(), 10 * 4096);
        assert_eq!(b.next_run(0, 4 * 4096), Some(0..4 * 4096));
        b.clear(0, 4 * 4096);
        assert_eq!(b.next_run(0, 1 << 20), Some(4 * 4096..10 * 4096));
    }
}
