//! SQLite's files on a block device: the controller's database kept on the cluster's
//! replicated system volume, with no file system in between (there is no kernel block
//! device to mount one on, and SQLite needs only three files).
//!
//! Layout of the device:
//! - bytes 0..40 of the first 4 KiB: the superblock, the lengths of the database file,
//!   its rollback journal and its write-ahead log, with a checksum; it fits in one
//!   sector, so a write of it is never torn;
//! - from 1 MiB: the regions of the three files, thirds of the rest.
//!
//! SQLite keeps its transactions and crash safety: write-ahead log with
//! `synchronous=FULL` (a commit appends its pages to the log and syncs once),
//! `locking_mode=EXCLUSIVE` (one process has the database, the node that is Primary of
//! the volume; the log's index then lives in its memory, no shared memory is used).
//! Writes go to a cache of 4 KiB blocks; a sync writes the blocks changed since the
//! last one (runs of adjacent blocks as one write each), the superblock when a length
//! changed (the log grows by 1 MiB at a time), and flushes the device: on the replicated volume, a flush that every
//! replica in reach has made durable.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, ErrorKind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sqlite_vfs::{DatabaseHandle, LockKind, OpenKind, OpenOptions, Vfs, WalDisabled};

/// What the database is kept on: the replicated volume in `tandemd`.
pub trait BlockDevice: Send + Sync {
    fn size(&self) -> u64;
    /// Reads bytes, including those of writes not yet flushed.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// May return before the write is durable, or known to have succeeded: a failure
    /// may be reported by the next flush instead.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every write before it durable, or fails if any of them failed.
    fn flush(&self) -> io::Result<()>;
    /// Writes and makes durable this write and every one before it: what a write
    /// followed by a flush does, in one step where the device can.
    fn write_durable(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_at(offset, data)?;
        self.flush()
    }
}

/// The name SQLite knows this VFS by.
const VFS_NAME: &str = "tandem-block";
const MAGIC: &[u8; 8] = b"TNDMDB01";
/// Granularity of the cache and of writes to the device.
const BLOCK: u64 = 4096;
/// Where the files' regions start.
const DATA_START: u64 = 1 << 20;
/// The smallest device that holds a useful database.
pub const MIN_DEVICE: u64 = 8 << 20;
/// Changed blocks kept in memory before they are written without waiting for a sync
/// (a large transaction, an import).
const CACHE_LIMIT: usize = 4096;
/// The longest run of blocks written at once.
const RUN_LIMIT: usize = 256;
/// The write-ahead log grows by this much at a time, so that a commit rarely changes
/// its length (and writes the superblock): SQLite reads a log longer than its frames
/// as it does one reused after a checkpoint, stopping at the first frame that is not
/// of the current log (its salt and checksum say so).
const WAL_CHUNK: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Db = 0,
    Journal = 1,
    Wal = 2,
}

/// The lengths of the three files, as the superblock keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Lengths([u64; 3]);

impl Lengths {
    fn get(&self, which: Which) -> u64 {
        self.0[which as usize]
    }

    fn set(&mut self, which: Which, len: u64) {
        self.0[which as usize] = len;
    }

    fn encode(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[..8].copy_from_slice(MAGIC);
        for (i, len) in self.0.iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&len.to_le_bytes());
        }
        let sum = checksum(&b[..32]);
        b[32..40].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// `None` for a device never formatted (all zeroes); an error for anything else
    /// that is not a superblock.
    fn decode(b: &[u8]) -> io::Result<Option<Lengths>> {
        if b[..40].iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if &b[..8] != MAGIC || word(32) != checksum(&b[..32]) {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "the system volume holds no controller database (bad superblock)",
            ));
        }
        Ok(Some(Lengths([word(8), word(16), word(24)])))
    }
}

/// FNV-1a: enough to tell a superblock from other bytes.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A device holding the database: the files' lengths and where their regions are, and
/// the blocks changed since the last sync.
struct Disk {
    device: Arc<dyn BlockDevice>,
    state: Mutex<DiskState>,
    region: u64,
    /// Why this opening of the database may no longer write, once it may not.
    fenced: OnceLock<String>,
}

struct DiskState {
    lengths: Lengths,
    /// The lengths changed since the superblock was last written.
    dirty: bool,
    /// Changed blocks not yet written to the device, by block number on the device.
    blocks: BTreeMap<u64, Box<[u8]>>,
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
        let region = (size - DATA_START) / 3 / BLOCK * BLOCK;
        Ok(Disk {
            device,
            state: Mutex::new(DiskState {
                lengths: lengths.unwrap_or_default(),
                dirty: lengths.is_none(),
                blocks: BTreeMap::new(),
            }),
            region,
            fenced: OnceLock::new(),
        })
    }

    /// Refuses every later change to the device: the database is another
    /// controller's now, and what this opening would still write (closing it
    /// checkpoints its log and deletes it, as far as it knows them) would undo that
    /// controller's commits.
    fn fence(&self, why: &str) {
        let _ = self.fenced.set(why.to_owned());
    }

    fn check_fence(&self) -> io::Result<()> {
        match self.fenced.get() {
            Some(why) => Err(io::Error::new(
                ErrorKind::PermissionDenied,
                format!("this controller no longer writes its database: {why}"),
            )),
            None => Ok(()),
        }
    }

    fn start(&self, which: Which) -> u64 {
        DATA_START + which as u64 * self.region
    }

    fn len(&self, which: Which) -> u64 {
        self.state.lock().unwrap().lengths.get(which)
    }

    fn set_len(&self, which: Which, len: u64) -> io::Result<()> {
        self.check_fence()?;
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
        let s = self.state.lock().unwrap();
        let have = s
            .lengths
            .get(which)
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        if have > 0 {
            let at = self.start(which) + offset;
            self.device.read_at(at, &mut buf[..have])?;
            // What the cache holds is newer than what the device has.
            let end = at + have as u64;
            for (&b, block) in s.blocks.range(at / BLOCK..end.div_ceil(BLOCK)) {
                let (from, to) = ((b * BLOCK).max(at), ((b + 1) * BLOCK).min(end));
                buf[(from - at) as usize..(to - at) as usize].copy_from_slice(
                    &block[(from - b * BLOCK) as usize..(to - b * BLOCK) as usize],
                );
            }
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
        self.check_fence()?;
        let end = offset + data.len() as u64;
        if end > self.region {
            return Err(full(which, self.region));
        }
        let at = self.start(which) + offset;
        let last = at + data.len() as u64;
        let mut s = self.state.lock().unwrap();
        for b in at / BLOCK..last.div_ceil(BLOCK) {
            let (from, to) = ((b * BLOCK).max(at), ((b + 1) * BLOCK).min(last));
            if !s.blocks.contains_key(&b) {
                let mut block = vec![0u8; BLOCK as usize].into_boxed_slice();
                if to - from < BLOCK {
                    // Part of the block: the rest as the device has it.
                    self.device.read_at(b * BLOCK, &mut block)?;
                }
                s.blocks.insert(b, block);
            }
            let block = s.blocks.get_mut(&b).expect("inserted");
            block[(from - b * BLOCK) as usize..(to - b * BLOCK) as usize]
                .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
        }
        if end > s.lengths.get(which) {
            let len = match which {
                Which::Wal => end
                    .div_ceil(WAL_CHUNK)
                    .saturating_mul(WAL_CHUNK)
                    .min(self.region),
                Which::Db | Which::Journal => end,
            };
            s.lengths.set(which, len);
            s.dirty = true;
        }
        if s.blocks.len() > CACHE_LIMIT {
            self.write_back(&mut s)?;
        }
        Ok(())
    }

    /// Writes the changed blocks to the device, runs of adjacent ones at once.
    fn write_back(&self, s: &mut DiskState) -> io::Result<()> {
        for (at, run) in runs(std::mem::take(&mut s.blocks)) {
            self.device.write_at(at, &run)?;
        }
        Ok(())
    }

    /// Writes the changed blocks and, if a length changed, the superblock; then
    /// flushes the device. A commit that changed one run of blocks (the usual one:
    /// pages appended to the log) is one durable write.
    fn sync(&self) -> io::Result<()> {
        self.check_fence()?;
        let mut s = self.state.lock().unwrap();
        let mut runs = runs(std::mem::take(&mut s.blocks));
        if s.dirty {
            let mut block = vec![0u8; BLOCK as usize];
            block[..40].copy_from_slice(&s.lengths.encode());
            runs.push((0, block));
        }
        let last = runs.pop();
        for (at, run) in &runs {
            self.device.write_at(*at, run)?;
        }
        match last {
            Some((at, run)) => self.device.write_durable(at, &run)?,
            None => self.device.flush()?,
        }
        s.dirty = false;
        Ok(())
    }
}

/// Changed blocks as runs of adjacent ones (at most [`RUN_LIMIT`] each): where each
/// starts on the device, and its bytes.
fn runs(blocks: BTreeMap<u64, Box<[u8]>>) -> Vec<(u64, Vec<u8>)> {
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = None;
    for (b, block) in blocks {
        match runs.last_mut() {
            Some((_, run)) if next == Some(b) && run.len() < RUN_LIMIT * BLOCK as usize => {
                run.extend_from_slice(&block)
            }
            _ => runs.push((b * BLOCK, block.into_vec())),
        }
        next = Some(b + 1);
    }
    runs
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

    /// From now on, nothing more is written to the device through this opening (see
    /// `Disk::fence`).
    pub fn fence(&self, why: &str) {
        if let Some(disk) = devices().lock().unwrap().get(&self.name) {
            disk.fence(why);
        }
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
    let (base, which) = if let Some(base) = name.strip_suffix("-journal") {
        (base, Which::Journal)
    } else if let Some(base) = name.strip_suffix("-wal") {
        (base, Which::Wal)
    } else {
        (name, Which::Db)
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
        if !matches!(
            opts.kind,
            OpenKind::MainDb | OpenKind::MainJournal | OpenKind::Wal
        ) {
            // Temporary files are kept in memory (`temp_store=MEMORY`).
            return Err(io::Error::other(format!(
                "the system volume holds only the database, its journal and its log, not {:?} files",
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
            Ok((_, Which::Db)) => true,
            Ok((disk, which)) => disk.len(which) > 0,
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
        let l = Lengths([12288, 4096, 8192]);
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
