//! Changed-block bitmaps as xapi hands them to backup tools: one bit per 64 KiB block,
//! the first block in the highest bit of the first byte, base64.

use base64::Engine;

/// Bytes per bit.
pub const GRANULARITY: u64 = 64 * 1024;

/// The bitmap of the blocks of `[start, end)` that any of `extents` (offset, length)
/// touches; block `i` covers `start + i × GRANULARITY`.
pub fn bitmap(extents: &[(u64, u64)], start: u64, end: u64) -> String {
    let blocks = (end - start).div_ceil(GRANULARITY);
    let mut bits = vec![0u8; blocks.div_ceil(8) as usize];
    for &(offset, length) in extents {
        let (from, to) = (offset.max(start), offset.saturating_add(length).min(end));
        if from >= to {
            continue;
        }
        for block in (from - start) / GRANULARITY..=(to - 1 - start) / GRANULARITY {
            bits[(block / 8) as usize] |= 0x80 >> (block % 8);
        }
    }
    base64::engine::general_purpose::STANDARD.encode(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }

    #[test]
    fn bits_cover_every_touched_block_and_no_other() {
        let g = GRANULARITY;
        // 20 blocks: 3 bytes. A write of one byte in block 0, one spanning blocks 8-9,
        // block 11 whole (ending where block 12 starts, which it leaves alone).
        let extents = [(10, 1), (8 * g + g / 2, g), (11 * g, g)];
        let bits = decode(&bitmap(&extents, 0, 20 * g));
        assert_eq!(bits, [0b1000_0000, 0b1101_0000, 0]);
        // A window: block 0 of the bitmap is the window's first.
        let bits = decode(&bitmap(&extents, 8 * g, 10 * g));
        assert_eq!(bits, [0b1100_0000]);
        // Nothing changed, and an empty range.
        assert_eq!(decode(&bitmap(&[], 0, 9 * g)), [0, 0]);
        assert_eq!(bitmap(&extents, 5, 5), "");
    }
}
