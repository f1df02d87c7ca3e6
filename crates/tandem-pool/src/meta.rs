//! The metadata file of a replica.
//!
//! ```text
//! offset          size                 content
//! 0               4 KiB                superblock slot 0
//! 4 KiB           4 KiB                superblock slot 1
//! 8 KiB           AL_BLOCKS × 4 KiB    activity log: a ring of 4 KiB transactions
//! bitmap_offset   …                    dirty bitmaps, one per peer slot, 1 bit per 4 KiB
//! ```
//!
//! Crash safety comes from the two superblock slots: every update writes the slot the
//! other one is not, with a higher sequence number and a CRC32C over the slot, then
//! syncs. A torn write leaves one slot failing its checksum and the other intact, so
//! loading picks the valid slot with the highest sequence. A file with no valid slot is
//! refused, never reformatted.
//!
//! Bitmaps are interleaved by 4 KiB page (`page p of slot s` at
//! `bitmap_offset + (p × bitmap_slots + s) × 4 KiB`, one page covering 128 MiB of
//! volume), so growing a volume appends pages and never moves existing ones. The file
//! is sparse: room costs nothing until a peer's blocks are marked.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tandem_api::{DiskState, NodeId, VolumeId, VolumeName};

use crate::BLOCK_SIZE;

const MAGIC: [u8; 8] = *b"TNDMMETA";
const FORMAT_VERSION: u32 = 1;
const SLOT_SIZE: usize = 4096;
const CRC_AT: usize = SLOT_SIZE - 4;
/// Transactions in the activity-log ring.
const AL_BLOCKS: u32 = 64;
const AL_OFFSET: u64 = 2 * SLOT_SIZE as u64;
/// A replica keeps a bitmap for every other node id a volume can have.
pub const MAX_PEERS: usize = 31;
/// Volume bytes covered by one 4 KiB bitmap page.
const BYTES_PER_BITMAP_PAGE: u64 = BLOCK_SIZE * 8 * BLOCK_SIZE;
const NAME_MAX: usize = 64;

/// A generation identifier (DRBD's "UUID"): a random 64-bit tag of a data generation.
/// 0 means "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GenerationId(pub u64);

impl GenerationId {
    pub fn random() -> Self {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("the OS random source is available");
        // Never 0, which means "none".
        GenerationId(u64::from_le_bytes(b) | 1)
    }
}

/// Earlier generations a replica remembers besides its bitmap one. Each time a
/// replica drops out under writes its peers start a generation, so a replica away
/// through many faults must still find its own among theirs: else it is taken for
/// unrelated data and never resynced.
pub const HISTORY: usize = 30;

/// The generation identifiers of a replica, as DRBD keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generations {
    pub current: GenerationId,
    pub bitmap: GenerationId,
    /// Newest first (0: none).
    pub history: [GenerationId; HISTORY],
}

impl Generations {
    /// Generations from a line, newest first: current, bitmap, then history. Missing
    /// ones are 0; those beyond the history's depth are forgotten.
    pub fn from_line(line: impl IntoIterator<Item = u64>) -> Self {
        let mut all = line.into_iter().map(GenerationId);
        let mut next = || all.next().unwrap_or_default();
        Generations {
            current: next(),
            bitmap: next(),
            history: std::array::from_fn(|_| next()),
        }
    }

    /// Its generations, newest first: current, bitmap, then history.
    pub fn line(&self) -> impl Iterator<Item = GenerationId> + '_ {
        [self.current, self.bitmap]
            .into_iter()
            .chain(self.history.iter().copied())
    }

    /// `g` becomes the newest earlier generation; the oldest is forgotten.
    pub fn remember(&mut self, g: GenerationId) {
        self.history.rotate_right(1);
        self.history[0] = g;
    }
}

/// A peer this replica tracks changes for: the bitmap slot belongs to that node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSlot {
    pub node: NodeId,
    /// The generation the peer was at when its bitmap started recording.
    pub bitmap_generation: GenerationId,
}

/// Where the activity log and bitmaps live in the file; recorded so a later format can
/// place them differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub al_offset: u64,
    pub al_blocks: u32,
    pub bitmap_offset: u64,
    pub bitmap_slots: u32,
}

impl Layout {
    fn standard() -> Self {
        Layout {
            al_offset: AL_OFFSET,
            al_blocks: AL_BLOCKS,
            bitmap_offset: AL_OFFSET + AL_BLOCKS as u64 * BLOCK_SIZE,
            bitmap_slots: MAX_PEERS as u32,
        }
    }

    /// Length of a metadata file whose bitmaps cover `size` bytes of volume (at most
    /// `MAX_VOLUME_SIZE`). A layout read from a file is checked to allow every size.
    pub fn file_len(&self, size: u64) -> u64 {
        self.checked_file_len(size)
            .expect("layouts are checked when decoded")
    }

    fn checked_file_len(&self, size: u64) -> Option<u64> {
        let pages = size.div_ceil(BYTES_PER_BITMAP_PAGE);
        (pages * self.bitmap_slots as u64 * BLOCK_SIZE).checked_add(self.bitmap_offset)
    }
}

/// What a new replica is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVolume {
    pub name: VolumeName,
    pub size: u64,
    pub thick: bool,
    /// The volume's identity, shared by all its replicas.
    pub id: VolumeId,
    /// This replica's node id in the volume.
    pub node_id: NodeId,
    /// The data generation the replica starts at. Replicas created empty from one spec
    /// share it, since they hold the same (all-zero) data.
    pub generation: GenerationId,
}

impl NewVolume {
    /// A volume of its own: a new identity, node id 0.
    pub fn single(name: VolumeName, size: u64, thick: bool) -> Self {
        NewVolume {
            name,
            size,
            thick,
            id: VolumeId::random(),
            node_id: NodeId::default(),
            generation: GenerationId::random(),
        }
    }
}

/// Everything the superblock records about a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub volume_id: VolumeId,
    pub name: VolumeName,
    pub size: u64,
    pub node_id: NodeId,
    pub disk_state: DiskState,
    pub thick: bool,
    pub read_only: bool,
    /// Set when the last writer closed the volume after a flush; cleared while writers
    /// have it open, so a crash is visible at the next start.
    pub clean: bool,
    pub generations: Generations,
    /// The generation at which the data was last whole (the current one while
    /// UpToDate). A replica whose disk failed keeps it: once repaired, it tells
    /// whether this replica held the data last (0: not recorded, as by the first
    /// release).
    pub whole_at: GenerationId,
    /// The newest generation known to hold every acknowledged write of the replica's
    /// line: the current one, unless it started one as Primary that no majority
    /// confirmed before it stopped (0: not recorded, as by a release before it; then
    /// the current one is taken).
    pub confirmed: GenerationId,
    pub peers: Vec<PeerSlot>,
    pub layout: Layout,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
}

impl Superblock {
    /// A fresh replica, UpToDate with a new data generation.
    pub fn new(volume: &NewVolume, created: u64) -> Self {
        Superblock {
            volume_id: volume.id,
            name: volume.name.clone(),
            size: volume.size,
            node_id: volume.node_id,
            disk_state: DiskState::UpToDate,
            thick: volume.thick,
            read_only: false,
            clean: true,
            generations: Generations {
                current: volume.generation,
                ..Default::default()
            },
            whole_at: volume.generation,
            confirmed: volume.generation,
            peers: Vec::new(),
            layout: Layout::standard(),
            created,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cannot access metadata file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a Tandem metadata file (unknown magic); refusing to touch it")]
    Foreign { path: PathBuf },
    #[error("metadata file {path} is corrupt: {reason}; refusing to use it")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "metadata file {path} has format version {version}; this tandemd reads up to {FORMAT_VERSION}"
    )]
    UnsupportedVersion { path: PathBuf, version: u32 },
}

/// Slot contents as found on disk.
enum Slot {
    Valid(u64, Box<Superblock>),
    Blank,
    Foreign,
    Unsupported(u32),
    Invalid(String),
}

// Field offsets inside a slot.
const O_MAGIC: usize = 0;
const O_VERSION: usize = 8;
const O_SEQ: usize = 16;
const O_VOLUME_ID: usize = 24;
const O_SIZE: usize = 40;
const O_NODE_ID: usize = 48;
const O_DISK_STATE: usize = 49;
const O_FLAGS: usize = 50;
const O_GENERATIONS: usize = 56;
const O_CREATED: usize = 88;
const O_AL_OFFSET: usize = 96;
const O_AL_BLOCKS: usize = 104;
const O_BITMAP_SLOTS: usize = 108;
const O_BITMAP_OFFSET: usize = 112;
const O_NAME_LEN: usize = 120;
const O_NAME: usize = 121;
const O_PEER_COUNT: usize = 192;
const O_PEERS: usize = 193;
const PEER_ENTRY: usize = 16;
/// After the 31 peer entries (zero in a slot written before it existed).
const O_WHOLE_AT: usize = 696;
const O_CONFIRMED: usize = 704;
/// The history beyond the two earlier generations the first release kept (0 in its
/// files: none).
const O_MORE_HISTORY: usize = 712;
const _: () = assert!(O_MORE_HISTORY + 8 * (HISTORY - 2) <= CRC_AT);
const _: () = assert!(O_PEERS + MAX_PEERS * PEER_ENTRY <= O_WHOLE_AT);

const FLAG_THICK: u16 = 1 << 0;
const FLAG_READ_ONLY: u16 = 1 << 1;
const FLAG_CLEAN: u16 = 1 << 2;
const KNOWN_FLAGS: u16 = FLAG_THICK | FLAG_READ_ONLY | FLAG_CLEAN;

/// On-disk codes of disk states: the index in this table. Append only.
const DISK_STATES: [DiskState; 6] = [
    DiskState::UpToDate,
    DiskState::Inconsistent,
    DiskState::Outdated,
    DiskState::Diskless,
    DiskState::Failed,
    DiskState::DUnknown,
];

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn encode(sb: &Superblock, seq: u64) -> Box<[u8; SLOT_SIZE]> {
    let mut b = Box::new([0u8; SLOT_SIZE]);
    b[O_MAGIC..O_MAGIC + 8].copy_from_slice(&MAGIC);
    put_u32(&mut b[..], O_VERSION, FORMAT_VERSION);
    put_u64(&mut b[..], O_SEQ, seq);
    b[O_VOLUME_ID..O_VOLUME_ID + 16].copy_from_slice(&sb.volume_id.0);
    put_u64(&mut b[..], O_SIZE, sb.size);
    b[O_NODE_ID] = sb.node_id.get();
    b[O_DISK_STATE] = DISK_STATES
        .iter()
        .position(|d| *d == sb.disk_state)
        .unwrap() as u8;
    let flags = (sb.thick as u16 * FLAG_THICK)
        | (sb.read_only as u16 * FLAG_READ_ONLY)
        | (sb.clean as u16 * FLAG_CLEAN);
    put_u16(&mut b[..], O_FLAGS, flags);
    let g = &sb.generations;
    for (i, id) in g.line().enumerate() {
        let at = match i {
            0..4 => O_GENERATIONS + 8 * i,
            _ => O_MORE_HISTORY + 8 * (i - 4),
        };
        put_u64(&mut b[..], at, id.0);
    }
    put_u64(&mut b[..], O_CREATED, sb.created);
    put_u64(&mut b[..], O_AL_OFFSET, sb.layout.al_offset);
    put_u32(&mut b[..], O_AL_BLOCKS, sb.layout.al_blocks);
    put_u32(&mut b[..], O_BITMAP_SLOTS, sb.layout.bitmap_slots);
    put_u64(&mut b[..], O_BITMAP_OFFSET, sb.layout.bitmap_offset);
    let name = sb.name.as_str().as_bytes();
    b[O_NAME_LEN] = name.len() as u8;
    b[O_NAME..O_NAME + name.len()].copy_from_slice(name);
    b[O_PEER_COUNT] = sb.peers.len() as u8;
    for (i, p) in sb.peers.iter().enumerate() {
        let at = O_PEERS + i * PEER_ENTRY;
        b[at] = p.node.get();
        put_u64(&mut b[..], at + 8, p.bitmap_generation.0);
    }
    put_u64(&mut b[..], O_WHOLE_AT, sb.whole_at.0);
    put_u64(&mut b[..], O_CONFIRMED, sb.confirmed.0);
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    put_u32(&mut b[..], CRC_AT, crc);
    b
}

fn decode(b: &[u8]) -> Slot {
    if b.iter().all(|&x| x == 0) {
        return Slot::Blank;
    }
    if b[O_MAGIC..O_MAGIC + 8] != MAGIC {
        return Slot::Foreign;
    }
    if crc32c::crc32c(&b[..CRC_AT]) != get_u32(b, CRC_AT) {
        return Slot::Invalid("checksum mismatch (torn or damaged write)".into());
    }
    let version = get_u32(b, O_VERSION);
    if version != FORMAT_VERSION {
        return Slot::Unsupported(version);
    }
    match decode_fields(b) {
        Ok(sb) => Slot::Valid(get_u64(b, O_SEQ), Box::new(sb)),
        Err(reason) => Slot::Invalid(reason),
    }
}

/// The fuzz target `meta_slot` (and the replay of its corpus): `data` sealed into a
/// slot with the magic, the format version and a correct checksum, so that the field
/// checks behind them are what is exercised, as with a hand-edited file; decoded as
/// opening the file does, with the file length computed from what decodes. Returns the
/// superblock, `None` for a blank slot, or why the slot is refused; never panics.
#[doc(hidden)]
pub fn fuzz_slot(data: &[u8]) -> Result<Option<Superblock>, String> {
    let mut slot = vec![0u8; SLOT_SIZE];
    slot[O_MAGIC..O_MAGIC + 8].copy_from_slice(&MAGIC);
    put_u32(&mut slot, O_VERSION, FORMAT_VERSION);
    let n = data.len().min(CRC_AT - O_SEQ);
    slot[O_SEQ..O_SEQ + n].copy_from_slice(&data[..n]);
    let crc = crc32c::crc32c(&slot[..CRC_AT]);
    put_u32(&mut slot, CRC_AT, crc);
    match decode(&slot) {
        Slot::Valid(_, sb) => {
            sb.layout.file_len(sb.size);
            Ok(Some(*sb))
        }
        Slot::Blank => Ok(None),
        Slot::Foreign => Err("unknown magic".into()),
        Slot::Unsupported(v) => Err(format!("format version {v}")),
        Slot::Invalid(why) => Err(why),
    }
}

/// Decodes a slot whose checksum matched: fields are still checked, because a valid
/// checksum over nonsense (a bug, or a hand-edited file) must not be trusted either.
fn decode_fields(b: &[u8]) -> Result<Superblock, String> {
    let name_len = b[O_NAME_LEN] as usize;
    if name_len == 0 || name_len > NAME_MAX {
        return Err(format!("name length {name_len} out of range"));
    }
    let name = std::str::from_utf8(&b[O_NAME..O_NAME + name_len])
        .map_err(|_| "name is not UTF-8".to_string())?
        .parse::<VolumeName>()
        .map_err(|e| e.to_string())?;
    let size = get_u64(b, O_SIZE);
    if size == 0 || size % BLOCK_SIZE != 0 || size > crate::MAX_VOLUME_SIZE {
        return Err(format!("volume size {size} is invalid"));
    }
    let node_id = NodeId::new(b[O_NODE_ID]).ok_or("node id above 31")?;
    let disk_state = *DISK_STATES
        .get(b[O_DISK_STATE] as usize)
        .ok_or("unknown disk state")?;
    let flags = get_u16(b, O_FLAGS);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let generations = (0..4)
        .map(|i| get_u64(b, O_GENERATIONS + 8 * i))
        .chain((0..HISTORY - 2).map(|i| get_u64(b, O_MORE_HISTORY + 8 * i)));
    let layout = Layout {
        al_offset: get_u64(b, O_AL_OFFSET),
        al_blocks: get_u32(b, O_AL_BLOCKS),
        bitmap_offset: get_u64(b, O_BITMAP_OFFSET),
        bitmap_slots: get_u32(b, O_BITMAP_SLOTS),
    };
    // Checked arithmetic: these come from the file, and a hand-edited one may hold
    // anything (a wrapped sum would make a nonsense layout look consistent).
    let al_end = (layout.al_blocks as u64 * BLOCK_SIZE).checked_add(layout.al_offset);
    if layout.al_offset < 2 * SLOT_SIZE as u64
        || al_end.is_none_or(|end| end > layout.bitmap_offset)
        || layout.bitmap_slots as usize > MAX_PEERS
        || layout.bitmap_offset % BLOCK_SIZE != 0
        || layout.checked_file_len(crate::MAX_VOLUME_SIZE).is_none()
    {
        return Err("layout of activity log and bitmaps is inconsistent".into());
    }
    let peer_count = b[O_PEER_COUNT] as usize;
    if peer_count > layout.bitmap_slots as usize {
        return Err(format!(
            "{peer_count} peers but {} bitmap slots",
            layout.bitmap_slots
        ));
    }
    let peers = (0..peer_count)
        .map(|i| {
            let at = O_PEERS + i * PEER_ENTRY;
            Ok(PeerSlot {
                node: NodeId::new(b[at]).ok_or("peer node id above 31")?,
                bitmap_generation: GenerationId(get_u64(b, at + 8)),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Superblock {
        volume_id: VolumeId(b[O_VOLUME_ID..O_VOLUME_ID + 16].try_into().unwrap()),
        name,
        size,
        node_id,
        disk_state,
        thick: flags & FLAG_THICK != 0,
        read_only: flags & FLAG_READ_ONLY != 0,
        clean: flags & FLAG_CLEAN != 0,
        generations: Generations::from_line(generations),
        whole_at: GenerationId(get_u64(b, O_WHOLE_AT)),
        confirmed: GenerationId(get_u64(b, O_CONFIRMED)),
        peers,
        layout,
        created: get_u64(b, O_CREATED),
    })
}

/// An open metadata file and the superblock it currently holds.
pub struct MetaFile {
    file: File,
    path: PathBuf,
    seq: u64,
    sb: Superblock,
}

fn open_file(path: &Path, create: bool) -> Result<File, MetaError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path)
        .map_err(|source| MetaError::Io {
            path: path.to_owned(),
            source,
        })
}

impl MetaFile {
    /// Writes a new metadata file (both slots) and syncs it. Fails if `path` exists.
    pub fn create(path: &Path, sb: Superblock) -> Result<MetaFile, MetaError> {
        let io_err = |source| MetaError::Io {
            path: path.to_owned(),
            source,
        };
        let file = open_file(path, true)?;
        file.set_len(sb.layout.file_len(sb.size)).map_err(io_err)?;
        let mut meta = MetaFile {
            file,
            path: path.to_owned(),
            seq: 0,
            sb: sb.clone(),
        };
        // Both slots hold the first version, so either can be torn later.
        meta.update(|_| ())?;
        meta.update(|_| ())?;
        Ok(meta)
    }

    /// Opens an existing metadata file, picking the newest valid superblock slot.
    pub fn open(path: &Path) -> Result<MetaFile, MetaError> {
        let io_err = |source| MetaError::Io {
            path: path.to_owned(),
            source,
        };
        let file = open_file(path, false)?;
        let mut buf = vec![0u8; 2 * SLOT_SIZE];
        let len = file.metadata().map_err(io_err)?.len();
        if len < buf.len() as u64 {
            // A file this short is not ours, or was truncated: both are refusals.
            let mut head = [0u8; 8];
            let n = file.read_at(&mut head, 0).map_err(io_err)?;
            if n < 8 || head != MAGIC {
                return Err(MetaError::Foreign {
                    path: path.to_owned(),
                });
            }
            return Err(MetaError::Corrupt {
                path: path.to_owned(),
                reason: format!("file is {len} bytes, shorter than its two superblock slots"),
            });
        }
        file.read_exact_at(&mut buf, 0).map_err(io_err)?;
        let slots = [decode(&buf[..SLOT_SIZE]), decode(&buf[SLOT_SIZE..])];
        // A newer tandemd wrote this file: its older slot must not be used as if current.
        if let Some(version) = slots.iter().find_map(|s| match s {
            Slot::Unsupported(v) => Some(*v),
            _ => None,
        }) {
            return Err(MetaError::UnsupportedVersion {
                path: path.to_owned(),
                version,
            });
        }
        let best = slots
            .iter()
            .filter_map(|s| match s {
                Slot::Valid(seq, sb) => Some((*seq, sb)),
                _ => None,
            })
            .max_by_key(|(seq, _)| *seq);
        let Some((seq, sb)) = best else {
            return Err(Self::refusal(path, &slots));
        };
        for (i, slot) in slots.iter().enumerate() {
            if let Slot::Invalid(reason) = slot {
                tracing::warn!(path = %path.display(), slot = i, %reason,
                    "one metadata slot is damaged; using the other");
            }
        }
        let sb = (**sb).clone();
        if len < sb.layout.file_len(sb.size) {
            return Err(MetaError::Corrupt {
                path: path.to_owned(),
                reason: format!("file is {len} bytes, too short for its bitmaps"),
            });
        }
        Ok(MetaFile {
            file,
            path: path.to_owned(),
            seq,
            sb,
        })
    }

    fn refusal(path: &Path, slots: &[Slot; 2]) -> MetaError {
        let path = path.to_owned();
        if slots
            .iter()
            .all(|s| matches!(s, Slot::Foreign | Slot::Blank))
        {
            return MetaError::Foreign { path };
        }
        let reasons: Vec<String> = slots
            .iter()
            .map(|s| match s {
                Slot::Invalid(r) => r.clone(),
                Slot::Foreign => "unknown magic".into(),
                Slot::Blank => "blank".into(),
                Slot::Valid(..) | Slot::Unsupported(_) => unreachable!("handled above"),
            })
            .collect();
        MetaError::Corrupt {
            path,
            reason: format!(
                "no valid superblock (slot 0: {}; slot 1: {})",
                reasons[0], reasons[1]
            ),
        }
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    fn bitmap_page_offset(&self, slot: usize, page: u64) -> u64 {
        let l = &self.sb.layout;
        l.bitmap_offset + (page * l.bitmap_slots as u64 + slot as u64) * BLOCK_SIZE
    }

    /// The stored bitmap of peer slot `slot`, as 64-bit words (little-endian on disk).
    pub fn read_bitmap(&self, slot: usize) -> Result<Vec<u64>, MetaError> {
        let pages = self.sb.size.div_ceil(BYTES_PER_BITMAP_PAGE);
        let mut words = Vec::with_capacity(pages as usize * 512);
        let mut page = [0u8; BLOCK_SIZE as usize];
        for p in 0..pages {
            self.file
                .read_exact_at(&mut page, self.bitmap_page_offset(slot, p))
                .map_err(|source| MetaError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            words.extend(
                page.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap())),
            );
        }
        Ok(words)
    }

    /// Stores one 4 KiB page (512 words) of slot `slot`'s bitmap; durable at the next
    /// [`MetaFile::sync`].
    pub fn write_bitmap_page(
        &self,
        slot: usize,
        page: u64,
        words: &[u64],
    ) -> Result<(), MetaError> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.file
            .write_all_at(&bytes, self.bitmap_page_offset(slot, page))
            .map_err(|source| MetaError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Reads every block of the activity-log ring.
    pub fn read_activity_log(&self) -> Result<Vec<Vec<u8>>, MetaError> {
        let l = &self.sb.layout;
        (0..l.al_blocks as u64)
            .map(|i| {
                let mut block = vec![0u8; BLOCK_SIZE as usize];
                self.file
                    .read_exact_at(&mut block, l.al_offset + i * BLOCK_SIZE)
                    .map_err(|source| MetaError::Io {
                        path: self.path.clone(),
                        source,
                    })?;
                Ok(block)
            })
            .collect()
    }

    /// Writes block `index` of the activity-log ring and syncs it: a write covered by
    /// the log must not reach the disk before the log entry does.
    pub fn write_activity_log(&self, index: u32, block: &[u8]) -> Result<(), MetaError> {
        let l = &self.sb.layout;
        let io_err = |source| MetaError::Io {
            path: self.path.clone(),
            source,
        };
        let at = l.al_offset + (index % l.al_blocks) as u64 * BLOCK_SIZE;
        self.file.write_all_at(block, at).map_err(io_err)?;
        self.file.sync_data().map_err(io_err)
    }

    pub fn sync(&self) -> Result<(), MetaError> {
        self.file.sync_data().map_err(|source| MetaError::Io {
            path: self.path.clone(),
            source,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `change` to a copy of the superblock and makes it durable in the older
    /// slot. The in-memory copy changes only once the write and sync succeeded.
    pub fn update(&mut self, change: impl FnOnce(&mut Superblock)) -> Result<(), MetaError> {
        let mut next = self.sb.clone();
        change(&mut next);
        let seq = self.seq + 1;
        let slot = encode(&next, seq);
        let io_err = |source| MetaError::Io {
            path: self.path.clone(),
            source,
        };
        let want_len = next.layout.file_len(next.size);
        if self.file.metadata().map_err(io_err)?.len() < want_len {
            self.file.set_len(want_len).map_err(io_err)?;
        }
        let at = (seq % 2) * SLOT_SIZE as u64;
        self.file.write_all_at(&slot[..], at).map_err(io_err)?;
        self.file.sync_data().map_err(io_err)?;
        self.seq = seq;
        self.sb = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        let mut sb = Superblock::new(
            &NewVolume::single("vm1".parse().unwrap(), 10 << 30, false),
            1_700_000_000,
        );
        sb.peers.push(PeerSlot {
            node: NodeId::new(2).unwrap(),
            bitmap_generation: GenerationId(77),
        });
        for g in [6, 5, 4, 3, 2, 1] {
            sb.generations.remember(GenerationId(g));
        }
        sb.generations.history[HISTORY - 1] = GenerationId(99);
        sb.whole_at = GenerationId(5);
        sb.confirmed = GenerationId(6);
        sb
    }

    #[test]
    fn superblock_round_trips() {
        let sb = sample();
        match decode(&encode(&sb, 9)[..]) {
            Slot::Valid(9, got) => assert_eq!(*got, sb),
            _ => panic!("slot did not decode"),
        }
    }

    #[test]
    fn updates_survive_reopen_and_alternate_slots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let mut m = MetaFile::create(&path, sample()).unwrap();
        m.update(|sb| sb.read_only = true).unwrap();
        let again = MetaFile::open(&path).unwrap();
        assert!(again.superblock().read_only);
        assert_eq!(again.seq, 3);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            sample().layout.file_len(10 << 30)
        );
    }

    #[test]
    fn torn_newest_slot_falls_back_to_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let mut m = MetaFile::create(&path, sample()).unwrap();
        m.update(|sb| sb.size = 20 << 30).unwrap(); // seq 3 → slot 1
        // Tear slot 1: half of it new, half garbage.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xAB; 2048], SLOT_SIZE as u64 + 2048)
            .unwrap();
        let m = MetaFile::open(&path).unwrap();
        assert_eq!(m.superblock().size, 10 << 30);
    }

    #[test]
    fn corrupt_foreign_and_truncated_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        MetaFile::create(&path, sample()).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[1], 100).unwrap();
        f.write_all_at(&[1], SLOT_SIZE as u64 + 100).unwrap();
        assert!(matches!(
            MetaFile::open(&path),
            Err(MetaError::Corrupt { .. })
        ));

        let foreign = dir.path().join("f");
        std::fs::write(&foreign, vec![0x55; 3 * SLOT_SIZE]).unwrap();
        assert!(matches!(
            MetaFile::open(&foreign),
            Err(MetaError::Foreign { .. })
        ));

        let short = dir.path().join("s");
        std::fs::write(&short, &MAGIC).unwrap();
        assert!(matches!(
            MetaFile::open(&short),
            Err(MetaError::Corrupt { .. })
        ));
        // Refusing must not have rewritten anything.
        assert_eq!(std::fs::read(&short).unwrap(), MAGIC);
    }

    #[test]
    fn newer_format_version_is_named_in_the_refusal() {
        let mut slot = encode(&sample(), 1);
        put_u32(&mut slot[..], O_VERSION, 7);
        let crc = crc32c::crc32c(&slot[..CRC_AT]);
        put_u32(&mut slot[..], CRC_AT, crc);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let mut file = slot.to_vec();
        file.extend_from_slice(&slot[..]);
        std::fs::write(&path, file).unwrap();
        assert!(matches!(
            MetaFile::open(&path),
            Err(MetaError::UnsupportedVersion { version: 7, .. })
        ));
    }

    #[test]
    fn checksummed_nonsense_is_still_refused() {
        let mut slot = encode(&sample(), 1);
        put_u64(&mut slot[..], O_SIZE, 12345); // not a multiple of 4 KiB
        let crc = crc32c::crc32c(&slot[..CRC_AT]);
        put_u32(&mut slot[..], CRC_AT, crc);
        assert!(matches!(decode(&slot[..]), Slot::Invalid(_)));
    }
}
