//! SQLite's files on a block device: the controller's database kept on the cluster's
//! replicated system volume, with no file system in between (there is no kernel block
//! device to mount one on, and SQLite needs only two files).
//!
//! Layout of the device:
//! - bytes 0..64 of the first 4 KiB: the superblock, the length of the database file
//!   and of its rollback journal, with a checksum; it fits in one sector, so a write of
//!   it is never torn;
//! - from 1 MiB: the database file's region, then the journal's region, halves of the
//!   rest.
//!
//! SQLite keeps its transactions and crash safety: it runs in rollback-journal mode
//! (`journal_mode=PERSIST`, so a commit invalidates the journal by zeroing its header
//! rather than deleting it), `synchronous=FULL`, `locking_mode=EXCLUSIVE` (one process
//! has the database: the node that is Primary of the volume). Every `xSync` writes the
//! superblock when a length changed and flushes the device: on the replicated volume,
//! a flush that every replica has made durable.

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sqlite_vfs::{DatabaseHandle, LockKind, OpenKind, OpenOptions, Vfs, WalDisabled};

/// What the database is kept on: the replicated volume in `tandemd`.
pub trait BlockDevice: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every write before it durable.
    fn flush(&self) -> io::Result<()>;
}

/// The name SQLite knows this VFS by.
const VFS_NAME: &str = "tandem-block";
const MAGIC: &[u8; 8] = b"TNDMDB01";
/// Granularity of writes to the device: partial blocks are read, patched and written.
const BLOCK: u64 = 4096;
/// Where the files' regions start.
const DATA_START: u64 = 1 << 20;
/// The smallest device that holds a useful database.
pub const MIN_DEVICE: u64 = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Db,
    Journal,
}

/// The lengths of both files, as the superblock keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Lengths {
    db: u64,
    journal: u64,
}

impl Lengths {
    fn get(&self, which: Which) -> u64 {
        match which {
            Which::Db => self.db,
            Which::Journal => self.journal,
        }
    }

    fn set(&mut self, which: Which, len: u64) {
        match which {
            Which::Db => self.db = len,
            Which::Journal => self.journal = len,
        }
    }

    fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.db.to_le_bytes());
        b[16..24].copy_from_slice(&self.journal.to_le_bytes());
        let sum = checksum(&b[..24]);
        b[24..32].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// `None` for a device never formatted (all zeroes); an error for anything else
    /// that is not a superblock.
    fn decode(b: &[u8]) -> io::Result<Option<Lengths>> {
        if b[..32].iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if &b[..8] != MAGIC || word(24) != checksum(&b[..24]) {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "the system volume holds no controller database (bad superblock)",
            ));
        }
        Ok(Some(Lengths {
            db: word(8),
            journal: word(16),
        }))
    }
}

/// FNV-1a: enough to tell a superblock from other bytes.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A device holding the database: its lengths, whether they changed since the last
/// superblock write, and where each file's region is.
struct Disk {
    device: Arc<dyn BlockDevice>,
    state: Mutex<DiskState>,
    region: u64,
}

struct DiskState {
    lengths: Lengths,
    dirty: bool,
}

impl Disk {
    fn open(device: Arc<dyn BlockDevice>) -> io::Result<Disk> {
        let size = device.size();
        if size < MIN_DEVICE {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "a device of {size} bytes is too small for the database (at least {MIN_DEVICE})"
                ),
            ));
        }
        let mut first = vec![0u8; BLOCK as usize];
        device.read_at(0, &mut first)?;
        let lengths = Lengths::decode(&first)?;
        let region = (size - DATA_START) / 2 / BLOCK * BLOCK;
        Ok(Disk {
            device,
            state: Mutex::new(DiskState {
                lengths: lengths.unwrap_or_default(),
                dirty: lengths.is_none(),
            }),
            region,
        })
    }

    fn start(&self, which: Which) -> u64 {
        match which {
            Which::Db => DATA_START,
            Which::Journal => DATA_START + self.region,
        }
    }

    fn len(&self, which: Which) -> u64 {
        self.state.lock().unwrap().lengths.get(which)
    }

    fn set_len(&self, which: Which, len: u64) -> io::Result<()> {
        if len > self.region {
            return Err(full(which, self.region));
        }
        let mut s = self.state.lock().unwrap();
        if s.lengths.get(which) != len {
            s.lengths.set(which, len);
            s.dirty = true;
        }
        Ok(())
    }

    fn read(&self, which: Which, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = self.len(which);
        let have = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        if have > 0 {
            self.device
                .read_at(self.start(which) + offset, &mut buf[..have])?;
        }
        if have < buf.len() {
            // SQLite zero-fills a short read itself only for its own buffers' tail;
            // do it here so what follows the end reads as zeroes either way.
            buf[have..].fill(0);
            return Err(ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    fn write(&self, which: Which, data: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + data.len() as u64;
        if end > self.region {
            return Err(full(which, self.region));
        }
        let at = self.start(which) + offset;
        let first = at / BLOCK * BLOCK;
        let last = (at + data.len() as u64).div_ceil(BLOCK) * BLOCK;
        if first == at && last == at + data.len() as u64 {
            self.device.write_at(at, data)?;
        } else {
            // Partial blocks: read, patch, write whole blocks.
            let mut blocks = vec![0u8; (last - first) as usize];
            self.device.read_at(first, &mut blocks)?;
            let from = (at - first) as usize;
            blocks[from..from + data.len()].copy_from_slice(data);
            self.device.write_at(first, &blocks)?;
        }
        let mut s = self.state.lock().unwrap();
        if end > s.lengths.get(which) {
            s.lengths.set(which, end);
            s.dirty = true;
        }
        Ok(())
    }

    /// Writes the superblock if a length changed, then flushes the device.
    fn sync(&self) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if s.dirty {
            let mut block = vec![0u8; BLOCK as usize];
            block[..32].copy_from_slice(&s.lengths.encode());
            self.device.write_at(0, &block)?;
            s.dirty = false;
        }
        drop(s);
        self.device.flush()
    }
}

fn full(which: Which, region: u64) -> io::Error {
    // `WriteZero` is what SQLite's VFS layer turns into SQLITE_FULL.
    io::Error::new(
        ErrorKind::WriteZero,
        format!(
            "the {which:?} file would pass the end of its {region}-byte region on the system volume"
        ),
    )
}

/// Devices by the database name SQLite opens them under.
fn devices() -> &'static Mutex<HashMap<String, Arc<Disk>>> {
    static DEVICES: OnceLock<Mutex<HashMap<String, Arc<Disk>>>> = OnceLock::new();
    DEVICES.get_or_init(Mutex::default)
}

/// A device registered for SQLite to open, unregistered when dropped.
pub struct Mounted {
    name: String,
}

impl Mounted {
    /// Registers `device` under a fresh name; the `file:` URI to open it with.
    pub fn new(device: Arc<dyn BlockDevice>) -> io::Result<Mounted> {
        register_vfs()?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!("volume-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let disk = Arc::new(Disk::open(device)?);
        devices().lock().unwrap().insert(name.clone(), disk);
        Ok(Mounted { name })
    }

    pub fn uri(&self) -> String {
        format!("file:{}?vfs={VFS_NAME}", self.name)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        devices().lock().unwrap().remove(&self.name);
    }
}

fn register_vfs() -> io::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            sqlite_vfs::register(VFS_NAME, BlockVfs, false).map_err(|e| format!("{e:?}"))
        })
        .clone()
        .map_err(|e| io::Error::other(format!("cannot register the SQLite VFS: {e}")))
}

struct BlockVfs;

/// `name` → its device and which of its files.
fn lookup(name: &str) -> io::Result<(Arc<Disk>, Which)> {
    let (base, which) = match name.strip_suffix("-journal") {
        Some(base) => (base, Which::Journal),
        None => (name, Which::Db),
    };
    let disk = devices().lock().unwrap().get(base).cloned();
    disk.map(|d| (d, which)).ok_or_else(|| {
        io::Error::new(
            ErrorKind::NotFound,
            format!("no device for SQLite file {name}"),
        )
    })
}

impl Vfs for BlockVfs {
    type Handle = BlockFile;

    fn open(&self, db: &str, opts: OpenOptions) -> io::Result<BlockFile> {
        if !matches!(opts.kind, OpenKind::MainDb | OpenKind::MainJournal) {
            // Temporary files are kept in memory (`temp_store=MEMORY`).
            return Err(io::Error::other(format!(
                "the system volume holds only the database and its journal, not {:?} files",
                opts.kind
            )));
        }
        let (disk, which) = lookup(db)?;
        Ok(BlockFile {
            disk,
            which,
            lock: LockKind::None,
        })
    }

    fn delete(&self, db: &str) -> io::Result<()> {
        let (disk, which) = lookup(db)?;
        disk.set_len(which, 0)?;
        disk.sync()
    }

    fn exists(&self, db: &str) -> io::Result<bool> {
        Ok(match lookup(db) {
            Ok((disk, Which::Journal)) => disk.len(Which::Journal) > 0,
            Ok((_, Which::Db)) => true,
            Err(_) => false,
        })
    }

    fn temporary_name(&self) -> String {
        String::from("temporary")
    }

    fn random(&self, buffer: &mut [i8]) {
        let mut bytes = vec![0u8; buffer.len()];
        getrandom::fill(&mut bytes).expect("system randomness");
        for (b, r) in buffer.iter_mut().zip(bytes) {
            *b = r as i8;
        }
    }

    fn sleep(&self, duration: Duration) -> Duration {
        std::thread::sleep(duration);
        duration
    }
}

pub struct BlockFile {
    disk: Arc<Disk>,
    which: Which,
    lock: LockKind,
}

impl DatabaseHandle for BlockFile {
    type WalIndex = WalDisabled;

    fn size(&self) -> io::Result<u64> {
        Ok(self.disk.len(self.which))
    }

    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.disk.read(self.which, buf, offset)
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.disk.write(self.which, buf, offset)
    }

    fn sync(&mut self, _data_only: bool) -> io::Result<()> {
        self.disk.sync()
    }

    fn set_len(&mut self, size: u64) -> io::Result<()> {
        self.disk.set_len(self.which, size)
    }

    // One process holds the database (the volume's Primary) with one connection in
    // exclusive locking mode: every lock is granted.
    fn lock(&mut self, lock: LockKind) -> io::Result<bool> {
        self.lock = lock;
        Ok(true)
    }

    fn reserved(&mut self) -> io::Result<bool> {
        Ok(matches!(
            self.lock,
            LockKind::Reserved | LockKind::Pending | LockKind::Exclusive
        ))
    }

    fn current_lock(&self) -> io::Result<LockKind> {
        Ok(self.lock)
    }

    fn wal_index(&self, _readonly: bool) -> io::Result<WalDisabled> {
        Ok(WalDisabled)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A device in memory that can lose every write after a point, as a crash does:
    /// what was flushed stays, later writes vanish.
    pub(crate) struct MemDevice {
        durable: Mutex<Vec<u8>>,
        /// Writes since the last flush, applied to reads too.
        pending: Mutex<Vec<(u64, Vec<u8>)>>,
        /// Writes (counting flushes) left before the crash; `u64::MAX` for none.
        crash_after: AtomicU64,
    }

    impl MemDevice {
        pub(crate) fn new(size: usize) -> Arc<MemDevice> {
            Arc::new(MemDevice {
                durable: Mutex::new(vec![0; size]),
                pending: Mutex::default(),
                crash_after: AtomicU64::new(u64::MAX),
            })
        }

        pub(crate) fn crash_after(&self, ops: u64) {
            self.crash_after.store(ops, Ordering::SeqCst);
        }

        /// Operations left before the crash.
        pub(crate) fn left(&self) -> u64 {
            self.crash_after.load(Ordering::SeqCst)
        }

        /// The device after a crash: the durable bytes, plus some of the writes not
        /// flushed (`keep` picks which), as a disk may have written them or not.
        pub(crate) fn after_crash(&self, keep: impl Fn(usize) -> bool) -> Arc<MemDevice> {
            let mut bytes = self.durable.lock().unwrap().clone();
            for (i, (at, data)) in self.pending.lock().unwrap().iter().enumerate() {
                if keep(i) {
                    bytes[*at as usize..*at as usize + data.len()].copy_from_slice(data);
                }
            }
            let size = bytes.len();
            let dev = MemDevice::new(size);
            *dev.durable.lock().unwrap() = bytes;
            dev
        }

        fn spend(&self) -> io::Result<()> {
            let left = self.crash_after.load(Ordering::SeqCst);
            if left == 0 {
                return Err(io::Error::other("crashed"));
            }
            if left != u64::MAX {
                self.crash_after.store(left - 1, Ordering::SeqCst);
            }
            Ok(())
        }
    }

    impl BlockDevice for MemDevice {
        fn size(&self) -> u64 {
            self.durable.lock().unwrap().len() as u64
        }

        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let at = offset as usize;
            buf.copy_from_slice(&self.durable.lock().unwrap()[at..at + buf.len()]);
            for (p, data) in self.pending.lock().unwrap().iter() {
                let (p, end) = (*p as usize, *p as usize + data.len());
                let (from, to) = (p.max(at), end.min(at + buf.len()));
                if from < to {
                    buf[from - at..to - at].copy_from_slice(&data[from - p..to - p]);
                }
            }
            Ok(())
        }

        fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.spend()?;
            self.pending.lock().unwrap().push((offset, data.to_vec()));
            Ok(())
        }

        fn flush(&self) -> io::Result<()> {
            self.spend()?;
            let mut durable = self.durable.lock().unwrap();
            for (at, data) in self.pending.lock().unwrap().drain(..) {
                durable[at as usize..at as usize + data.len()].copy_from_slice(&data);
            }
            Ok(())
        }
    }

    #[test]
    fn superblock_round_trips_and_rejects_other_bytes() {
        let l = Lengths {
            db: 12288,
            journal: 4096,
        };
        assert_eq!(Lengths::decode(&l.encode()).unwrap(), Some(l));
        assert_eq!(Lengths::decode(&[0; 64]).unwrap(), None);
        let mut bad = l.encode();
        bad[9] ^= 1;
        assert!(Lengths::decode(&bad).is_err());
    }

    #[test]
    fn unaligned_writes_keep_their_neighbours() {
        let dev = MemDevice::new(MIN_DEVICE as usize);
        let disk = Disk::open(dev.clone()).unwrap();
        disk.write(Which::Journal, &[7; 5000], 0).unwrap();
        disk.write(Which::Journal, &[9; 10], 4090).unwrap();
        let mut back = vec![0; 5000];
        disk.read(Which::Journal, &mut back, 0).unwrap();
        assert!(back[..4090].iter().all(|&b| b == 7));
        assert!(back[4090..4100].iter().all(|&b| b == 9));
        assert!(back[4100..].iter().all(|&b| b == 7));
        // Reading past the end: zeroes and a short read.
        let mut tail = vec![1; 100];
        let e = disk.read(Which::Journal, &mut tail, 4950).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
        assert!(tail[..50].iter().all(|&b| b == 7) && tail[50..].iter().all(|&b| b == 0));
        // A write past the region is a full disk, not a corruption.
        let e = disk.write(Which::Db, &[1], disk.region).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WriteZero);
    }
}
