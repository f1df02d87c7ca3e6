//! Buffers aligned for direct I/O, so data files read and write them in place instead
//! of falling back to the page cache.

/// Alignment that satisfies direct I/O on every file system.
const ALIGN: usize = 4096;

/// A zero-initialised byte buffer whose start is 4 KiB aligned.
pub struct Buffer {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buffer {
    pub fn zeroed(len: usize) -> Buffer {
        let bytes = vec![0u8; len + ALIGN];
        // Moving the Vec never moves its heap block, so the alignment holds.
        let start = bytes.as_ptr().align_offset(ALIGN);
        Buffer { bytes, start, len }
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_for_direct_io() {
        for len in [0, 1, 4096, 1 << 20] {
            let b = Buffer::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        }
    }
}
