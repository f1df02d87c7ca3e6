//! Request buffers aligned for direct I/O, so a backend using `O_DIRECT` reads and
//! writes them in place instead of bouncing through a copy.
//!
//! Large buffers are backed by huge pages where the kernel has them: a 4 MiB direct
//! read into 4 KiB pages is 1024 memory segments, which the block layer splits into
//! several device requests (a virtio disk takes 254 segments per request); into 2 MiB
//! pages it is one request. On the test VM that took 4 MiB reads at queue depth 4 from
//! about 1,200 to about 1,530 MiB/s (docs/benchmarks.md).

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};

const ALIGN: usize = 4096;
/// Buffers at least this large are aligned to it and asked to be backed by huge pages.
const HUGE: usize = 2 << 20;
/// Buffers up to this size are kept between requests; larger ones are freed after use,
/// so an idle connection does not pin 32 MiB.
const KEEP: usize = 4 << 20;

pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: the buffer is plain memory owned by one worker at a time.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new() -> Self {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    /// A slice of `len` bytes (contents unspecified but initialised).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        if len > self.cap {
            self.free();
            let cap = match len.next_multiple_of(ALIGN) {
                cap if cap >= HUGE => cap.next_multiple_of(HUGE),
                cap => cap,
            };
            let layout = layout(cap);
            // SAFETY: non-zero size; zeroing is unnecessary, but reads of fresh memory
            // must not expose uninitialised bytes, so the memory is zeroed once here
            // (after the advice, so the pages it faults in can be huge ones).
            let ptr = unsafe { alloc(layout) };
            if ptr.is_null() {
                handle_alloc_error(layout);
            }
            if cap >= HUGE {
                // SAFETY: advice on memory this buffer owns; a refusal changes nothing.
                unsafe { libc::madvise(ptr.cast(), cap, libc::MADV_HUGEPAGE) };
            }
            unsafe { ptr.write_bytes(0, cap) };
            self.ptr = ptr;
            self.cap = cap;
        }
        if len == 0 {
            return &mut [];
        }
        // SAFETY: ptr is valid for cap ≥ len initialised bytes, borrowed mutably via self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    /// Frees an oversized buffer after the request that needed it.
    pub fn trim(&mut self) {
        if self.cap > KEEP {
            self.free();
        }
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated in `get` with this layout.
            unsafe { dealloc(self.ptr, layout(self.cap)) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

/// How a buffer of `cap` bytes (as rounded by [`AlignedBuf::get`]) is allocated.
fn layout(cap: usize) -> Layout {
    let align = if cap >= HUGE { HUGE } else { ALIGN };
    Layout::from_size_align(cap, align).expect("valid layout")
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_grow() {
        let mut b = AlignedBuf::new();
        assert_eq!(b.get(0).len(), 0);
        let s = b.get(100);
        assert_eq!(s.as_ptr() as usize % ALIGN, 0);
        s[99] = 1;
        let s = b.get(10 << 20);
        assert_eq!(s.len(), 10 << 20);
        let large = s.as_ptr();
        assert_eq!(
            large as usize % HUGE,
            0,
            "large buffers sit on huge-page bounds"
        );
        let s = b.get((3 << 20) + 1);
        assert_eq!(s.len(), (3 << 20) + 1);
        assert_eq!(s.as_ptr(), large, "a smaller request reuses the buffer");
        b.trim();
        assert_eq!(b.cap, 0);
    }
}
