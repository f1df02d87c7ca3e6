//! Intents of multi-step operations, written to the SR's store before the first step:
//! an operation cut short (the process killed, the host lost) is completed or undone by
//! the next call that takes the SR's lock, so no Tandem volume or snapshot is left
//! without metadata and no metadata without its volume.

use serde::{Deserialize, Serialize};
use tandem_api::{KvCondition, SnapshotName, VolumeName};

use crate::error::XapiError;
use crate::meta::{JOURNAL_PREFIX, Key, fresh};
use crate::sr::Sr;
use crate::volume;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Intent {
    /// A new volume: undone unless its metadata was written.
    Create { volume: VolumeName },
    /// A snapshot: undone unless its metadata was written.
    Snapshot {
        volume: VolumeName,
        snapshot: SnapshotName,
    },
    /// A clone of `source@snapshot` (a snapshot taken for the clone alone when
    /// `temporary`): undone unless the clone's metadata was written; the temporary
    /// snapshot goes either way.
    Clone {
        new: VolumeName,
        source: VolumeName,
        snapshot: SnapshotName,
        temporary: bool,
    },
    /// A destruction: always completed.
    Destroy { key: String },
}

/// An intent on record; [`Entry::finish`] once every step is done.
pub struct Entry<'s, 'c> {
    sr: &'s Sr<'c>,
    key: String,
}

pub fn begin<'s, 'c>(sr: &'s Sr<'c>, intent: &Intent) -> Result<Entry<'s, 'c>, XapiError> {
    let id: VolumeName = fresh("op");
    let key = format!("{JOURNAL_PREFIX}{id}");
    let value = serde_json::to_string(intent).expect("serialisable");
    sr.ctx
        .tandem
        .kv_set(&sr.store, &key, &value, Some(KvCondition::Absent))?;
    Ok(Entry { sr, key })
}

impl Entry<'_, '_> {
    pub fn finish(self) -> Result<(), XapiError> {
        self.sr
            .ctx
            .tandem
            .kv_delete(&self.sr.store, &self.key, None)?;
        Ok(())
    }
}

/// Settles every intent left by operations cut short (the caller holds the SR's lock).
pub fn recover(sr: &Sr<'_>) -> Result<usize, XapiError> {
    let entries = sr.ctx.tandem.kv_list(&sr.store)?;
    let mut settled = 0;
    for entry in entries.iter().filter(|e| e.key.starts_with(JOURNAL_PREFIX)) {
        let intent: Intent = serde_json::from_str(&entry.value).map_err(|e| {
            XapiError::backend(format!(
                "journal entry {} of the SR is unreadable ({e}): inspect it with `tandem sr dump {}` and drop it with `tandem sr forget {} {}`",
                entry.key, sr.uuid, sr.uuid, entry.key
            ))
        })?;
        settle(sr, &intent)?;
        sr.ctx.tandem.kv_delete(&sr.store, &entry.key, None)?;
        settled += 1;
    }
    Ok(settled)
}

fn settle(sr: &Sr<'_>, intent: &Intent) -> Result<(), XapiError> {
    let tandem = &sr.ctx.tandem;
    match intent {
        Intent::Create { volume } => {
            if sr.meta(&Key::Volume(volume.clone()))?.is_none() {
                tandem.delete_volume(volume)?;
            }
        }
        Intent::Snapshot { volume, snapshot } => {
            if sr
                .meta(&Key::Snapshot(volume.clone(), snapshot.clone()))?
                .is_none()
            {
                tandem.delete_snapshot(volume, snapshot)?;
            }
        }
        Intent::Clone {
            new,
            source,
            snapshot,
            temporary,
        } => {
            if sr.meta(&Key::Volume(new.clone()))?.is_none() {
                tandem.delete_volume(new)?;
            }
            if *temporary {
                tandem.delete_snapshot(source, snapshot)?;
            }
        }
        Intent::Destroy { key } => volume::destroy_steps(sr, &key.parse()?)?,
    }
    Ok(())
}
