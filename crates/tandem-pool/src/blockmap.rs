//! A file's block map, from the file system (`FIEMAP`): which byte ranges hold
//! allocated blocks, and where on disk. It reports the holes of a range at a cost in
//! proportion to the extents in that range, where `SEEK_HOLE` walks to the next hole
//! (on an xfs file written in full and in pieces that is its end: 0.8 ms a call, for
//! every read); and it tells a snapshot's changes (see `changes.rs`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `FS_IOC_FIEMAP`: `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Flags under which an extent's physical address means nothing to compare.
const FIEMAP_EXTENT_NO_PLACE: u32 = 0x2 /* UNKNOWN */ | 0x4 /* DELALLOC */ | 0x8 /* ENCODED */
    | 0x80 /* DATA_ENCRYPTED */ | 0x100 /* NOT_ALIGNED */ | 0x200 /* DATA_INLINE */ | 0x400 /* DATA_TAIL */;
/// Extents asked for per call.
const BATCH: usize = 512;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap<const N: usize> {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; N],
}

impl<const N: usize> Fiemap<N> {
    fn new() -> Self {
        Fiemap {
            start: 0,
            length: 0,
            flags: 0,
            mapped_extents: 0,
            extent_count: N as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); N],
        }
    }
}

/// Extents asked for per call when the range is small (a read's): the request fits on
/// the stack.
const SMALL: usize = 8;

/// Where a run of a file's bytes lives: `place` is the disk address of its first byte,
/// `None` when the file system does not give one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapped {
    pub logical: u64,
    pub len: u64,
    pub place: Option<u64>,
}

/// The mapped runs of `file` overlapping `[offset, end)`, in order; holes are absent.
pub(crate) fn map(file: &File, offset: u64, end: u64, sync: bool) -> io::Result<Vec<Mapped>> {
    if end - offset <= SMALL as u64 * 4096 {
        map_with(file, offset, end, sync, &mut Fiemap::<SMALL>::new())
    } else {
        map_with(
            file,
            offset,
            end,
            sync,
            &mut Box::new(Fiemap::<BATCH>::new()),
        )
    }
}

fn map_with<const N: usize>(
    file: &File,
    offset: u64,
    end: u64,
    sync: bool,
    fm: &mut Fiemap<N>,
) -> io::Result<Vec<Mapped>> {
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        fm.start = at;
        fm.length = end - at;
        fm.flags = if sync && out.is_empty() {
            FIEMAP_FLAG_SYNC
        } else {
            0
        };
        fm.mapped_extents = 0;
        // SAFETY: FIEMAP fills at most `extent_count` (N) extents of the struct we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, fm as *mut Fiemap<N>) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let got = &fm.extents[..(fm.mapped_extents as usize).min(N)];
        let Some(last) = got.last() else { break };
        for e in got {
            out.push(Mapped {
                logical: e.logical,
                len: e.length,
                place: (e.flags & FIEMAP_EXTENT_NO_PLACE == 0).then_some(e.physical),
            });
        }
        if last.flags & FIEMAP_EXTENT_LAST != 0 {
            break;
        }
        at = last.logical + last.length;
    }
    Ok(out)
}
