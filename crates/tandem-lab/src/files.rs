//! Byte-level checks of data files and images, and a small file system to fill up.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::scratch;

/// The first offset where two files differ (length counts), or `None` if identical.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    use std::io::Read;
    let open = |p: &Path| std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if let Some(i) = (0..na.min(nb)).find(|&i| ba[i] != bb[i]) {
            return Some(at + i as u64);
        }
        if na != nb {
            return Some(at + na.min(nb) as u64);
        }
        if na == 0 {
            return None;
        }
        at += na as u64;
    }

    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).expect("read") {
                0 => break,
                k => n += k,
            }
        }
        n
    }
}

/// The bytes `[offset, offset + len)` of a file.
pub fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    buf
}

/// The first offset in `[offset, offset + len)` of a file that does not hold `byte`.
pub fn not_filled(path: &Path, offset: u64, len: u64, byte: u8) -> Option<u64> {
    read_range(path, offset, len)
        .iter()
        .position(|&b| b != byte)
        .map(|i| offset + i as u64)
}

/// Asserts the bytes `[offset, offset + len)` of a file all equal `byte`.
pub fn assert_file_filled(path: &Path, offset: u64, len: u64, byte: u8) {
    if let Some(at) = not_filled(path, offset, len, byte) {
        panic!(
            "{}: byte {at} is {:#04x}, expected {byte:#04x} over [{offset}, +{len})",
            path.display(),
            read_range(path, at, 1)[0]
        );
    }
}

/// Asserts two byte strings are equal, naming the first difference instead of dumping them.
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!(
            "{what}: first difference at byte {i} ({i:#x}): {:#04x}, expected {:#04x}",
            actual[i], expected[i]
        );
    }
}

/// Asserts a file holds `expected` at `offset`, naming the first difference.
pub fn assert_file_holds(path: &Path, offset: u64, expected: &[u8], what: &str) {
    let actual = read_range(path, offset, expected.len() as u64);
    assert_same_bytes(&actual, expected, what);
}

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A small file system on a loop device: ext4, for a pool that can be filled without
/// filling the machine's disk, or xfs with reflink, for snapshots. Unmounted and
/// removed on drop.
pub struct SmallFs {
    dir: PathBuf,
    /// Where it is mounted.
    pub mnt: PathBuf,
}

impl SmallFs {
    /// An ext4 file system of `mib` MiB; `None` where this machine cannot make one (not
    /// root, no loop devices, no mkfs.ext4).
    pub fn ext4(mib: u64) -> Option<SmallFs> {
        SmallFs::make(mib, &["mkfs.ext4", "-q", "-F"])
    }

    /// An xfs file system with reflink, of at least 300 MiB (xfs's least); `None`
    /// where this machine cannot make one (not root, no loop devices, no mkfs.xfs).
    pub fn xfs(mib: u64) -> Option<SmallFs> {
        SmallFs::make(mib.max(300), &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"])
    }

    fn make(mib: u64, mkfs: &[&str]) -> Option<SmallFs> {
        let dir = scratch("smallfs");
        let img = dir.join("fs.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let ok = |cmd: &mut Command| {
            cmd.stdin(Stdio::null())
                .output()
                .is_ok_and(|o| o.status.success())
        };
        // The directory becomes a shared mount: nodes started in network namespaces
        // (`ip netns exec`) get a copy of every mount, and only under a shared parent
        // does an unmount here reach their copies (else the file system stays
        // mounted there, shut down, and a remount here repairs nothing for them).
        let shared = ok(Command::new("mount").arg("--bind").arg(&dir).arg(&dir))
            && ok(Command::new("mount").arg("--make-shared").arg(&dir));
        if shared
            && ok(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&img))
            && ok(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt))
        {
            Some(SmallFs { dir, mnt })
        } else {
            let _ = Command::new("umount").arg(&dir).output();
            let _ = std::fs::remove_dir_all(&dir);
            None
        }
    }
}

impl SmallFs {
    /// Shuts an xfs file system down as a dying disk would: every I/O on it fails with
    /// EIO from then on (`xfs_io -x -c shutdown`), until [`SmallFs::remount`].
    pub fn shut_down(&self) {
        let out = Command::new("xfs_io")
            .args(["-x", "-c", "shutdown"])
            .arg(&self.mnt)
            .output()
            .expect("run xfs_io");
        assert!(
            out.status.success(),
            "xfs_io shutdown {}: {}",
            self.mnt.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Fills it up: a file takes every free block, so writes that need a new one
    /// fail with ENOSPC, until [`SmallFs::unfill`]. The bytes it took (none when the
    /// file system was full already).
    pub fn fill(&self) -> u64 {
        use std::os::fd::AsRawFd;
        let filler = match std::fs::File::create(self.mnt.join("filler")) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return 0,
            Err(e) => panic!("creating the filler in {}: {e}", self.mnt.display()),
        };
        let (mut at, mut len) = (0, self.free_bytes());
        // Metadata takes a little of what statvfs counts free: ask for less until
        // not a block is left.
        while len >= 4096 {
            // SAFETY: fallocate on a file this function holds open.
            let rc = unsafe {
                libc::fallocate(filler.as_raw_fd(), 0, at as libc::off_t, len as libc::off_t)
            };
            if rc == 0 {
                at += len;
                len = self.free_bytes();
            } else {
                len /= 2;
            }
        }
        at
    }

    /// Frees what [`SmallFs::fill`] took.
    pub fn unfill(&self) {
        let _ = std::fs::remove_file(self.mnt.join("filler"));
    }

    /// Bytes free for files.
    pub fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs writes into the zeroed struct it is given.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs {}", self.mnt.display());
        st.f_bavail as u64 * st.f_frsize as u64
    }

    /// Unmounts and mounts it again (what repairs an xfs shut down by `xfs_io -x -c
    /// shutdown`: the mount replays its log). Nothing may hold it open meanwhile.
    pub fn remount(&self) {
        let img = self.dir.join("fs.img");
        for cmd in [
            Command::new("umount").arg(&self.mnt).output(),
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&self.mnt)
                .output(),
        ] {
            let out = cmd.expect("umount and mount run");
            assert!(
                out.status.success(),
                "remounting {}: {}",
                self.mnt.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        for at in [&self.mnt, &self.dir] {
            let unmounted = Command::new("umount")
                .arg(at)
                .output()
                .is_ok_and(|o| o.status.success());
            if !unmounted {
                let _ = Command::new("umount").arg("-l").arg(at).output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
