//! A replica's data file: a plain raw image read and written with positional I/O.
//!
//! With [`CacheMode::None`] (the default) aligned requests go through an `O_DIRECT`
//! descriptor, bypassing the host page cache like QEMU's `cache=none`; requests that
//! are not aligned to what the file system demands for direct I/O use a second,
//! buffered descriptor of the same file (the kernel writes back and invalidates cached
//! pages around direct I/O, so both views stay coherent).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::buffer::Buffer;

/// How the data file uses the host page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// `O_DIRECT`: no host page cache.
    #[default]
    None,
    /// Buffered I/O through the host page cache.
    Writeback,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(CacheMode::None),
            "writeback" => Ok(CacheMode::Writeback),
            _ => Err(format!("unknown cache mode {s:?} (use none or writeback)")),
        }
    }
}

/// A run of bytes that is either allocated data or a hole (reads as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub hole: bool,
}

pub struct DataFile {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    /// Alignment of offset, length and memory that direct I/O needs on this file.
    align: usize,
}

/// Alignment used when the kernel cannot tell (no `STATX_DIOALIGN`): safe on every
/// file system that supports `O_DIRECT`.
const FALLBACK_ALIGN: usize = 4096;
/// Writes through the page cache go in pieces of at most this size. The kernel sizes
/// the page-cache folios a write creates by the write's length, and a later small
/// write into a large folio costs time in proportion to the folio (ext4 walks its
/// every block): after 4 MiB writes, 4 KiB random writes through the page cache ran at
/// 17,000 IOPS instead of 120,000, and the 4 MiB writes themselves got slower too
/// (measured on Linux 6.18, ext4; 16 KiB pieces favour small writes more, 256 KiB
/// large ones; docs/benchmarks.md).
const BUFFERED_CHUNK: usize = 64 << 10;

fn direct_io_alignment(file: &File) -> usize {
    // SAFETY: statx writes into the zeroed struct we own; the path is an empty C string
    // used with AT_EMPTY_PATH on a valid descriptor.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        (stx.stx_dio_offset_align.max(stx.stx_dio_mem_align) as usize).max(512)
    } else {
        FALLBACK_ALIGN
    }
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

impl DataFile {
    /// Creates a new data file of `size` bytes; `thick` reserves every block now.
    pub fn create(path: &Path, size: u64, thick: bool, cache: CacheMode) -> io::Result<DataFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let result = (|| {
            file.set_len(size)?;
            if thick {
                fallocate(&file, 0, 0, size)?;
            }
            file.sync_all()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        drop(file);
        DataFile::open(path, cache)
    }

    /// Creates a new, empty (sparse) data file of `size` bytes, without waiting for it
    /// to be durable, and opens it without direct I/O (it is filled by sharing blocks).
    pub(crate) fn create_unsynced(path: &Path, size: u64) -> io::Result<DataFile> {
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        if let Err(e) = file.set_len(size) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        DataFile::open(path, CacheMode::Writeback)
    }

    pub fn open(path: &Path, cache: CacheMode) -> io::Result<DataFile> {
        DataFile::open_as(path, cache, true)
    }

    /// Opens a data file that is only read (a snapshot's).
    pub fn open_read_only(path: &Path, cache: CacheMode) -> io::Result<DataFile> {
        DataFile::open_as(path, cache, false)
    }

    fn open_as(path: &Path, cache: CacheMode, writable: bool) -> io::Result<DataFile> {
        let buffered = OpenOptions::new().read(true).write(writable).open(path)?;
        let direct = match cache {
            CacheMode::Writeback => None,
            CacheMode::None => Some(
                OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("{e}: the file system does not support direct I/O; use cache mode writeback"),
                        )
                    })?,
            ),
        };
        let align = direct.as_ref().map_or(1, direct_io_alignment);
        Ok(DataFile {
            path: path.to_owned(),
            buffered,
            direct,
            align,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The buffered descriptor, for calls that are not I/O (block maps, ioctls).
    pub(crate) fn file(&self) -> &File {
        &self.buffered
    }

    /// Smallest I/O unit that takes the fast (direct) path.
    pub fn alignment(&self) -> usize {
        self.align
    }

    pub fn len(&self) -> io::Result<u64> {
        Ok(self.buffered.metadata()?.len())
    }

    /// Bytes the file occupies on disk.
    pub fn allocated(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.buffered.metadata()?.blocks() * 512)
    }

    fn pick(&self, offset: u64, len: usize, addr: usize) -> &File {
        match &self.direct {
            Some(d) if (offset as usize | len | addr) % self.align == 0 => d,
            _ => &self.buffered,
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let file = self.pick(offset, buf.len(), buf.as_ptr() as usize);
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `data` at `offset`; `fua` makes it durable before returning.
    pub fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let file = self.pick(offset, data.len(), data.as_ptr() as usize);
        let direct = self.direct.as_ref().is_some_and(|d| std::ptr::eq(d, file));
        let chunk = if direct { data.len() } else { BUFFERED_CHUNK };
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let mut done = 0;
        while done < data.len() {
            let rest = &data[done..];
            let rest = &rest[..rest.len().min(chunk)];
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut _,
                iov_len: rest.len(),
            };
            // SAFETY: one iovec over a live slice; the kernel only reads from it.
            let n = unsafe {
                libc::pwritev2(
                    file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as i64,
                    flags,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(io::ErrorKind::WriteZero.into()),
                _ => {
                    let e = errno();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes every completed write durable (on whichever descriptor it went).
    pub fn flush(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }

    /// Deallocates the range; it reads as zeros afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(
            &self.buffered,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes the range and keeps (or makes) it allocated.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(
            &self.buffered,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes the range by writing zeros: the way that works on every file system.
    pub fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let zeros = Buffer::zeroed(CHUNK.min(len as usize));
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(CHUNK as u64) as usize;
            self.write_at(&zeros[..n], at, false)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Hints the kernel to read the range ahead into the page cache. With direct I/O
    /// no cache is used, so there is nothing to warm.
    pub fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.direct.is_some() {
            return Ok(());
        }
        // SAFETY: plain syscall on a valid descriptor.
        let rc = unsafe {
            libc::posix_fadvise(
                self.buffered.as_raw_fd(),
                offset as i64,
                len as i64,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    /// Allocation map of `[offset, offset + len)`: from the file system's block map
    /// for that range, or where it has none, from `SEEK_DATA`/`SEEK_HOLE`. Blocks
    /// written but not yet allocated (delayed allocation) are data in both. May end
    /// early (at least one extent is returned for a non-empty range).
    pub fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset + len;
        let runs = match crate::blockmap::map(&self.buffered, offset, end, false) {
            Ok(runs) => runs,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOTTY)) => {
                return self.extents_by_seeking(offset, len);
            }
            Err(e) => return Err(e),
        };
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |len: u64, hole: bool| match out.last_mut() {
            Some(last) if last.hole == hole => last.len += len,
            _ if len > 0 => out.push(Extent { len, hole }),
            _ => {}
        };
        let mut at = offset;
        for m in runs {
            let (start, stop) = (m.logical.clamp(at, end), (m.logical + m.len).clamp(at, end));
            push(start - at, true);
            push(stop - start, false);
            at = stop;
        }
        push(end - at, true);
        Ok(out)
    }

    fn extents_by_seeking(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        // SEEK_HOLE first: on written ranges one call shows the whole range is data.
        while at < end && out.len() < 1024 {
            let hole = seek(&self.buffered, at, libc::SEEK_HOLE)?
                .unwrap_or(end)
                .min(end);
            if hole > at {
                out.push(Extent {
                    len: hole - at,
                    hole: false,
                });
                at = hole;
                continue;
            }
            let data = seek(&self.buffered, at, libc::SEEK_DATA)?
                .unwrap_or(end)
                .min(end);
            if data > at {
                out.push(Extent {
                    len: data - at,
                    hole: true,
                });
                at = data;
            }
        }
        Ok(out)
    }

    /// Grows the file to `size` bytes; `thick` reserves the new blocks. On failure the
    /// file is put back to its old length, releasing what was reserved.
    pub fn grow(&self, size: u64, thick: bool) -> io::Result<()> {
        let old = self.len()?;
        if size <= old {
            return Ok(());
        }
        let result = if thick {
            fallocate(&self.buffered, 0, old, size - old)
        } else {
            self.buffered.set_len(size)
        };
        if let Err(e) = result.and_then(|()| self.buffered.sync_all()) {
            let _ = self.buffered.set_len(old);
            return Err(e);
        }
        Ok(())
    }

    /// Makes `dest` (a new file) a copy of this file that shares its blocks (reflink):
    /// instant, holes kept, and later writes to either file leave the other alone.
    /// Fails with `EOPNOTSUPP`, `EXDEV` or `EINVAL` where the file system cannot share.
    fn share_into(&self, dest: &Path) -> io::Result<()> {
        let file = OpenOptions::new().write(true).create_new(true).open(dest)?;
        // SAFETY: plain ioctl on two descriptors we own.
        let result =
            if unsafe { libc::ioctl(file.as_raw_fd(), libc::FICLONE, self.buffered.as_raw_fd()) }
                == 0
            {
                file.sync_all()
            } else {
                Err(errno())
            };
        if result.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        result
    }

    /// Replaces `[offset, offset + len)` of this file by the same range of `source`,
    /// sharing its blocks (reflink). Not durable until [`DataFile::flush`].
    pub fn share_range(&self, source: &DataFile, offset: u64, len: u64) -> io::Result<()> {
        let range = libc::file_clone_range {
            src_fd: source.buffered.as_raw_fd() as i64,
            src_offset: offset,
            src_length: len,
            dest_offset: offset,
        };
        // SAFETY: plain ioctl with a struct we own, on descriptors we own.
        if unsafe { libc::ioctl(self.buffered.as_raw_fd(), libc::FICLONERANGE, &range) } != 0 {
            return Err(errno());
        }
        Ok(())
    }
}

/// Whether files in `dir` can share blocks (reflink), tried on two scratch files there.
/// A full file system cannot be tried: it is judged by its type (xfs and btrfs share
/// blocks; an xfs made without reflink then refuses the first snapshot instead), so
/// that a pool that filled up does not keep its node from starting.
pub fn shares_blocks(dir: &Path) -> io::Result<bool> {
    match try_sharing(dir) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
            let shares = sharing_type(dir)?;
            tracing::warn!(dir = %dir.display(), shares,
                "the pool's file system is full: whether it shares blocks was judged by its type");
            Ok(shares)
        }
        tried => tried,
    }
}

/// Whether `dir` is on a file system of a type that shares blocks between files.
fn sharing_type(dir: &Path) -> io::Result<bool> {
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683e;
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: statfs fills the zeroed struct it is given.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(matches!(st.f_type as i64, XFS | BTRFS))
}

fn try_sharing(dir: &Path) -> io::Result<bool> {
    let (probe, copy) = (
        dir.join(".tandem-reflink-probe"),
        dir.join(".tandem-reflink-probe.copy"),
    );
    for p in [&probe, &copy] {
        let _ = std::fs::remove_file(p);
    }
    let result = (|| {
        std::fs::write(&probe, [0x5a; 4096])?;
        let source = DataFile::open(&probe, CacheMode::Writeback)?;
        match source.share_into(&copy) {
            Ok(()) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    })();
    for p in [&probe, &copy] {
        let _ = std::fs::remove_file(p);
    }
    result
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on a valid descriptor.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            return Ok(());
        }
        let e = errno();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`; `None` when nothing of that kind follows.
fn seek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: plain syscall on a valid descriptor.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let e = errno();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(cache: CacheMode) -> (tempfile::TempDir, DataFile) {
        // Inside the crate rather than /tmp, which may be a tmpfs without O_DIRECT.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let f = DataFile::create(&dir.path().join("d.raw"), 1 << 20, false, cache).unwrap();
        (dir, f)
    }

    #[test]
    fn aligned_and_unaligned_io_see_each_other() {
        for cache in [CacheMode::None, CacheMode::Writeback] {
            let (_d, f) = files(cache);
            let mut buf = Buffer::zeroed(8192);
            buf.fill(7);
            f.write_at(&buf, 4096, false).unwrap();
            f.write_at(b"hello", 4100, true).unwrap();
            let mut out = vec![0u8; 9];
            f.read_at(&mut out, 4096).unwrap();
            assert_eq!(out, [7, 7, 7, 7, b'h', b'e', b'l', b'l', b'o']);
            buf.fill(0);
            f.read_at(&mut buf, 4096).unwrap();
            assert_eq!(&buf[4..9], b"hello");
            assert_eq!(buf[9], 7);
        }
    }

    #[test]
    fn holes_are_reported_and_punched() {
        let (_d, f) = files(CacheMode::Writeback);
        assert_eq!(
            f.extents(0, 1 << 20).unwrap(),
            vec![Extent {
                len: 1 << 20,
                hole: true
            }]
        );
        f.write_at(&vec![1u8; 65536], 65536, false).unwrap();
        let map = f.extents(0, 1 << 20).unwrap();
        assert_eq!(
            map[0],
            Extent {
                len: 65536,
                hole: true
            }
        );
        assert!(!map[1].hole);
        f.punch_hole(65536, 65536).unwrap();
        assert!(f.extents(0, 1 << 20).unwrap().iter().all(|e| e.hole));
        let mut out = vec![9u8; 16];
        f.read_at(&mut out, 65536).unwrap();
        assert_eq!(out, vec![0u8; 16]);
    }
}
