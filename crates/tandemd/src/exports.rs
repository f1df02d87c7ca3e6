//! The node's volumes as NBD exports.

use std::io;
use std::sync::Arc;

use tandem_api::VolumeName;
use tandem_nbd::{BlockSizes, Catalog, Export, ExportInfo, Extent, OpenError, ZeroMode};
use tandem_pool::{PoolError, Volume, VolumeHandle};

use crate::node::Node;

pub struct NodeExports {
    node: Arc<Node>,
}

impl NodeExports {
    pub fn new(node: Arc<Node>) -> Self {
        NodeExports { node }
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

fn info(volume: &Volume, read_only: bool) -> ExportInfo {
    ExportInfo {
        size: volume.size(),
        read_only,
        block_sizes: BlockSizes {
            // Requests aligned like this take the direct-I/O path.
            minimum: volume.data().alignment() as u32,
            preferred: 4096,
            maximum: tandem_nbd::proto::MAX_PAYLOAD,
        },
        description: format!("Tandem volume {}", volume.name()),
    }
}

impl Catalog for NodeExports {
    fn list(&self) -> Vec<(String, String)> {
        self.node
            .volumes()
            .into_iter()
            .filter(|v| v.error.is_none())
            .map(|v| (v.name.to_string(), format!("Tandem volume {}", v.name)))
            .collect()
    }

    fn describe(&self, name: &str) -> Result<ExportInfo, OpenError> {
        let volume = self.volume(name)?;
        Ok(info(&volume, volume.read_only()))
    }

    fn open(&self, name: &str) -> Result<Box<dyn Export>, OpenError> {
        let volume = self.volume(name)?;
        let handle = volume
            .open(!volume.read_only())
            .map_err(|e| OpenError::Unavailable(e.to_string()))?;
        Ok(Box::new(VolumeExport { handle }))
    }
}

/// One client's open volume.
struct VolumeExport {
    handle: VolumeHandle,
}

impl VolumeExport {
    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua {
            self.handle.data().flush()
        } else {
            Ok(())
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

impl Export for VolumeExport {
    fn info(&self) -> ExportInfo {
        info(&self.handle, !self.handle.writable())
    }

    fn size(&self) -> u64 {
        self.handle.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.handle.data().read_at(buf, offset)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.handle.data().write_at(data, offset, fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.handle.data().flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let data = self.handle.data();
        // A thick volume keeps its blocks reserved: trimmed ranges are zeroed in place.
        let result = if self.handle.thick() {
            data.zero_range(offset, len)
        } else {
            data.punch_hole(offset, len)
        };
        match result {
            // TRIM is advisory: a file system that cannot deallocate simply keeps the data.
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }?;
        self.sync_if(fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        let data = self.handle.data();
        let fast = if mode.may_punch && !self.handle.thick() {
            data.punch_hole(offset, len)
        } else {
            data.zero_range(offset, len)
        };
        match fast {
            Err(e) if unsupported(&e) && !mode.fast_only => data.write_zeros(offset, len),
            other => other,
        }?;
        self.sync_if(fua)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.handle.data().prefetch(offset, len)
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(self
            .handle
            .data()
            .extents(offset, len)?
            .into_iter()
            .map(|e| Extent {
                len: e.len,
                hole: e.hole,
            })
            .collect())
    }
}
