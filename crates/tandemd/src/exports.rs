//! The node's volumes as NBD exports, and their snapshots as read-only exports named
//! `VOLUME@SNAPSHOT`.

use std::io;
use std::sync::Arc;

use tandem_api::{SnapshotName, VolumeName};
use tandem_nbd::proto::{DIRTY_BITMAP, STATE_DIRTY};
use tandem_nbd::{BlockSizes, Catalog, Export, ExportInfo, Extent, OpenError, WriteDone, ZeroMode};
use tandem_pool::{DataFile, PoolError, Volume, VolumeHandle};
use tandem_replication::ReplicatedVolume;

use crate::metrics::{IoBook, Op, VolumeIo};
use crate::node::Node;

pub struct NodeExports {
    node: Arc<Node>,
    io: Arc<IoBook>,
}

impl NodeExports {
    /// The node's volumes as exports, their requests counted in `io`.
    pub fn new(node: Arc<Node>, io: Arc<IoBook>) -> Self {
        NodeExports { node, io }
    }

    fn volume(&self, name: &str) -> Result<Arc<Volume>, OpenError> {
        let unknown = || {
            OpenError::Unknown(format!(
                "no volume named {name:?} on node {}",
                self.node.name()
            ))
        };
        let name: VolumeName = name.parse().map_err(|_| unknown())?;
        self.node.volume(&name).map_err(|e| match e {
            PoolError::NotFound { .. } => unknown(),
            e => OpenError::Unavailable(e.to_string()),
        })
    }
}

/// An export name `VOLUME@SNAPSHOT`, split; `None` for any other name.
fn snapshot_of(name: &str) -> Option<(VolumeName, SnapshotName)> {
    let (volume, snap) = name.split_once('@')?;
    Some((volume.parse().ok()?, snap.parse().ok()?))
}

fn description(name: &str) -> String {
    match snapshot_of(name) {
        Some((volume, snap)) => format!("Tandem volume {volume}, snapshot {snap}"),
        None => format!("Tandem volume {name}"),
    }
}

fn info(name: &str, size: u64, alignment: usize, read_only: bool) -> ExportInfo {
    ExportInfo {
        size,
        read_only,
        block_sizes: BlockSizes {
            // Requests aligned like this take the direct-I/O path.
            minimum: alignment as u32,
            preferred: 4096,
            maximum: tandem_nbd::proto::MAX_PAYLOAD,
        },
        description: description(name),
    }
}

fn local_info(volume: &Volume, read_only: bool) -> ExportInfo {
    info(
        volume.name().as_str(),
        volume.size(),
        volume.data().alignment(),
        read_only,
    )
}

fn replicated_info(volume: &ReplicatedVolume) -> ExportInfo {
    let alignment = volume.local().map_or(512, |v| v.data().alignment());
    info(volume.name().as_str(), volume.size(), alignment, false)
}

impl NodeExports {
    fn replicated(&self, name: &str) -> Option<Arc<ReplicatedVolume>> {
        self.node.replicated(&name.parse().ok()?)
    }

    /// Snapshot `snap` of this node's replica of `volume`, opened for reading.
    /// Snapshot `snap` of `volume`, opened for reading: from this node's replica if it
    /// holds it, else through a connected peer that does.
    fn snapshot(
        &self,
        volume: &VolumeName,
        snap: &SnapshotName,
    ) -> Result<SnapshotExport, OpenError> {
        let name = format!("{volume}@{snap}");
        let local = self
            .node
            .volume(volume)
            .ok()
            .filter(|v| v.snapshot(snap).is_some());
        if let Some(local) = local {
            let size = local.snapshot(snap).map_or(0, |s| s.size);
            let data = local
                .open_snapshot(snap)
                .map_err(|e| OpenError::Unavailable(e.to_string()))?;
            return Ok(SnapshotExport {
                info: info(&name, size, data.alignment(), true),
                source: Source::Here {
                    data,
                    volume: local,
                },
            });
        }
        let missing = |why: String| {
            OpenError::Unknown(format!(
                "node {} cannot serve snapshot {snap} of volume {volume}: {why}; `tandem snapshot list` shows where it is",
                self.node.name()
            ))
        };
        let replicated = self
            .node
            .replicated(volume)
            .ok_or_else(|| missing("it does not take part in that volume".into()))?;
        let (size, holder) = replicated
            .snapshot_size(snap)
            .map_err(|e| missing(e.to_string()))?;
        Ok(SnapshotExport {
            info: info(&name, size, 512, true),
            source: Source::Peer {
                volume: replicated,
                snap: snap.clone(),
                holder,
            },
        })
    }
}

impl Catalog for NodeExports {
    fn list(&self) -> Vec<(String, String)> {
        let mut names: Vec<String> = self
            .node
            .volumes()
            .into_iter()
            .filter(|v| v.error.is_none())
            .map(|v| v.name.to_string())
            .collect();
        names.extend(
            self.node
                .replicated_names()
                .into_iter()
                .map(|n| n.to_string()),
        );
        let snapshots: Vec<String> = (names.iter())
            .filter_map(|n| self.node.snapshots(&n.parse().ok()?).ok())
            .flatten()
            .map(|s| format!("{}@{}", s.volume, s.name))
            .collect();
        names.extend(snapshots);
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|n| {
                let description = description(&n);
                (n, description)
            })
            .collect()
    }

    fn describe(&self, name: &str) -> Result<ExportInfo, OpenError> {
        if let Some((volume, snap)) = snapshot_of(name) {
            return Ok(self.snapshot(&volume, &snap)?.info);
        }
        if let Some(rv) = self.replicated(name) {
            return Ok(replicated_info(&rv));
        }
        let volume = self.volume(name)?;
        Ok(local_info(&volume, volume.read_only()))
    }

    /// The volume's snapshots on this node, but the one exported, each as the dirty
    /// bitmap of the blocks changed since it.
    fn contexts(&self, name: &str) -> Vec<String> {
        let (volume, exported) = match snapshot_of(name) {
            Some((volume, snap)) => (volume, Some(snap)),
            None => match name.parse::<VolumeName>() {
                Ok(volume) => (volume, None),
                Err(_) => return Vec::new(),
            },
        };
        let Ok(local) = self.volume(volume.as_str()) else {
            return Vec::new();
        };
        (local.snapshots().into_iter())
            .filter(|s| Some(&s.name) != exported.as_ref())
            .map(|s| format!("{DIRTY_BITMAP}{}", s.name))
            .collect()
    }

    fn open(&self, name: &str) -> Result<Box<dyn Export>, OpenError> {
        let inner = self.open_unmetered(name)?;
        Ok(Box::new(Metered {
            inner,
            io: self.io.volume(name),
        }))
    }
}

impl NodeExports {
    fn open_unmetered(&self, name: &str) -> Result<Box<dyn Export>, OpenError> {
        if let Some((volume, snap)) = snapshot_of(name) {
            return Ok(Box::new(self.snapshot(&volume, &snap)?));
        }
        if let Some(volume) = self.replicated(name) {
            let local = volume.open_local();
            volume.open(true).map_err(|e| OpenError::Refused(e.0))?;
            return Ok(Box::new(ReplicatedExport {
                volume,
                _local: local,
            }));
        }
        let volume = self.volume(name)?;
        let handle = volume
            .open(!volume.read_only())
            .map_err(|e| OpenError::Unavailable(e.to_string()))?;
        Ok(Box::new(VolumeExport { handle }))
    }
}

/// One client's open replicated volume; it keeps the local replica (if any) open, so
/// its metadata records the use.
struct ReplicatedExport {
    volume: Arc<ReplicatedVolume>,
    _local: Option<VolumeHandle>,
}

impl Drop for ReplicatedExport {
    fn drop(&mut self) {
        self.volume.close(true);
    }
}

impl Export for ReplicatedExport {
    fn info(&self) -> ExportInfo {
        replicated_info(&self.volume)
    }

    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.volume.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool, done: WriteDone) {
        // The reply goes out from the thread that sees the peers' last answer.
        self.volume.write(offset, data, fua, done)
    }

    fn flush(&self) -> io::Result<()> {
        self.volume.flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.volume.trim(offset, len, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        self.volume
            .write_zeroes(offset, len, mode.may_punch, mode.fast_only, fua)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        // Only the replica reads are served from is worth warming.
        self.volume
            .local_up_to_date()
            .map_or(Ok(()), |v| v.data().prefetch(offset, len))
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        match self.volume.local_up_to_date() {
            Some(v) => extents_of(v.data(), offset, len),
            // Without an UpToDate local replica, claim data everywhere: always safe.
            None => Ok(vec![Extent { len, hole: false }]),
        }
    }

    fn context_extents(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        match self.volume.local() {
            Some(v) => changes_since(v, v.data(), context, offset, len),
            None => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }
}

/// Context `qemu:dirty-bitmap:SNAP` of `current`, data of `volume` (its live data or
/// one of its snapshots): the runs changed since snapshot SNAP.
fn changes_since(
    volume: &Volume,
    current: &DataFile,
    context: &str,
    offset: u64,
    len: u64,
) -> io::Result<Vec<(u64, u32)>> {
    let unknown = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no meta context {context}"),
        )
    };
    let snap: SnapshotName = (context.strip_prefix(DIRTY_BITMAP))
        .and_then(|s| s.parse().ok())
        .ok_or_else(unknown)?;
    let older = volume
        .open_snapshot(&snap)
        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))?;
    Ok((current.changes_against(&older, offset, len)?.into_iter())
        .map(|s| (s.len, if s.changed { STATE_DIRTY } else { 0 }))
        .collect())
}

fn extents_of(data: &DataFile, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
    Ok(data
        .extents(offset, len)?
        .into_iter()
        .map(|e| Extent {
            len: e.len,
            hole: e.hole,
        })
        .collect())
}

/// One client's open volume.
struct VolumeExport {
    handle: VolumeHandle,
}

impl Export for VolumeExport {
    fn info(&self) -> ExportInfo {
        local_info(&self.handle, !self.handle.writable())
    }

    fn size(&self) -> u64 {
        self.handle.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.handle.data().read_at(buf, offset)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool, done: WriteDone) {
        done(self.handle.write_at(data, offset, fua))
    }

    fn flush(&self) -> io::Result<()> {
        self.handle.data().flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.handle.trim(offset, len, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        self.handle
            .write_zeroes(offset, len, mode.may_punch, mode.fast_only, fua)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.handle.data().prefetch(offset, len)
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        extents_of(self.handle.data(), offset, len)
    }

    fn context_extents(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        changes_since(&self.handle, self.handle.data(), context, offset, len)
    }
}

/// One client's open snapshot: read-only (the NBD layer refuses changes to a read-only
/// export with EPERM before they get here).
struct SnapshotExport {
    info: ExportInfo,
    source: Source,
}

/// Where a snapshot export's data comes from.
enum Source {
    /// This node's replica holds the snapshot; `volume` is the replica, whose other
    /// snapshots it is compared with.
    Here { data: DataFile, volume: Arc<Volume> },
    /// A peer holding it, through the replicated volume.
    Peer {
        volume: Arc<ReplicatedVolume>,
        snap: SnapshotName,
        /// The peer that answered its size: read from first.
        holder: tandem_api::NodeId,
    },
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

impl Export for SnapshotExport {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    fn size(&self) -> u64 {
        self.info.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &self.source {
            Source::Here { data, .. } => data.read_at(buf, offset),
            Source::Peer {
                volume,
                snap,
                holder,
            } => volume.read_snapshot(snap, *holder, offset, buf),
        }
    }

    fn write(&self, _offset: u64, _data: &[u8], _fua: bool, done: WriteDone) {
        done(Err(read_only()))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _mode: ZeroMode, _fua: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.source {
            Source::Here { data, .. } => data.prefetch(offset, len),
            Source::Peer { .. } => Ok(()),
        }
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        match &self.source {
            Source::Here { data, .. } => extents_of(data, offset, len),
            // Data everywhere: always true of what a read returns.
            Source::Peer { .. } => Ok(vec![Extent { len, hole: false }]),
        }
    }

    fn context_extents(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        match &self.source {
            Source::Here { data, volume } => changes_since(volume, data, context, offset, len),
            Source::Peer { .. } => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }
}

/// Any export, its requests counted for the node's metrics.
struct Metered {
    inner: Box<dyn Export>,
    io: Arc<VolumeIo>,
}

impl Metered {
    fn count<T>(&self, op: Op, len: usize, run: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let at = self.io.start();
        let result = run();
        self.io.done(op, at, len, &result);
        result
    }
}

impl Export for Metered {
    fn info(&self) -> ExportInfo {
        self.inner.info()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len();
        self.count(Op::Read, len, || self.inner.read(offset, buf))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool, done: WriteDone) {
        let (io, at, len) = (self.io.clone(), self.io.start(), data.len());
        self.inner.write(
            offset,
            data,
            fua,
            Box::new(move |result| {
                io.done(Op::Write, at, len, &result);
                done(result)
            }),
        )
    }

    fn flush(&self) -> io::Result<()> {
        self.count(Op::Flush, 0, || self.inner.flush())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.count(Op::Trim, 0, || self.inner.trim(offset, len, fua))
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        self.count(Op::Zero, 0, || {
            self.inner.write_zeroes(offset, len, mode, fua)
        })
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.cache(offset, len)
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.extents(offset, len)
    }

    fn context_extents(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        self.inner.context_extents(context, offset, len)
    }
}
