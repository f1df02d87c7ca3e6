//! Intents of multi-step operations, written to the SR's store before the first step:
//! an operation cut short (the process killed, the host lost) is completed or undone by
//! the next call that takes the SR's lock, so no Tandem volume or snapshot is left
//! without metadata and no metadata without its volume. An operation that fails with
//! an error settles its intent at once.

use serde::{Deserialize, Serialize};
use tandem_api::{KvCondition, SnapshotName, VolumeName, VolumeState};

use crate::error::XapiError;
use crate::meta::{JOURNAL_PREFIX, Key, random_hex};
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
    /// `temporary`): undone unless the clone's metadata was written. A temporary
    /// snapshot goes once the clone no longer needs it (its replicas built from it).
    Clone {
        new: VolumeName,
        source: VolumeName,
        snapshot: SnapshotName,
        temporary: bool,
    },
    /// A destruction: completed, unless the volume turned out to be in use (then given
    /// up, the volume kept).
    Destroy { key: String },
}

/// An intent on record. [`Entry::finish`] once every step is done, [`Entry::keep`] to
/// leave it to a later call; dropped otherwise (the operation failed), it is settled
/// there and then.
pub struct Entry<'s, 'c> {
    sr: &'s Sr<'c>,
    key: String,
    intent: Intent,
    open: bool,
}

pub fn begin<'s, 'c>(sr: &'s Sr<'c>, intent: Intent) -> Result<Entry<'s, 'c>, XapiError> {
    let key = format!("{JOURNAL_PREFIX}{}", random_hex());
    let value = serde_json::to_string(&intent).expect("serialisable");
    if !sr
        .ctx
        .tandem
        .kv_set(&sr.store, &key, &value, Some(KvCondition::Absent))?
    {
        return Err(XapiError::backend(format!(
            "journal entry {key} of SR {} exists already",
            sr.uuid
        )));
    }
    Ok(Entry {
        sr,
        key,
        intent,
        open: true,
    })
}

impl Entry<'_, '_> {
    /// Every step done: the intent goes. Failing to drop it only leaves it to be
    /// settled (as done) by a later call.
    pub fn finish(mut self) {
        self.open = false;
        let _ = self
            .sr
            .ctx
            .tandem
            .kv_delete(&self.sr.store, &self.key, None);
    }

    /// Leaves the intent to a later call (what remains cannot be done yet).
    pub fn keep(mut self) {
        self.open = false;
    }
}

impl Drop for Entry<'_, '_> {
    fn drop(&mut self) {
        if self.open {
            settle_entry(self.sr, &self.key, &self.intent);
        }
    }
}

/// Settles every intent left by operations cut short (the caller holds the SR's lock).
/// One that cannot be settled now stays, for a later call (and `tandem health`).
pub fn recover(sr: &Sr<'_>) -> Result<(), XapiError> {
    for entry in sr.ctx.tandem.kv_list(&sr.store)? {
        if !entry.key.starts_with(JOURNAL_PREFIX) {
            continue;
        }
        match serde_json::from_str::<Intent>(&entry.value) {
            Ok(intent) => settle_entry(sr, &entry.key, &intent),
            Err(e) => eprintln!(
                "tandem xapi: journal entry {} of SR {} is unreadable ({e}); `tandem sr forget {} {}` drops it",
                entry.key, sr.uuid, sr.uuid, entry.key
            ),
        }
    }
    Ok(())
}

fn settle_entry(sr: &Sr<'_>, key: &str, intent: &Intent) {
    match settle(sr, intent) {
        Ok(true) => {
            let _ = sr.ctx.tandem.kv_delete(&sr.store, key, None);
        }
        Ok(false) => {}
        Err(e) => eprintln!(
            "tandem xapi: cannot settle {key} of SR {} ({intent:?}) yet: {e}",
            sr.uuid
        ),
    }
}

/// Completes or undoes an intent; `false` when it must wait.
fn settle(sr: &Sr<'_>, intent: &Intent) -> Result<bool, XapiError> {
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
            } else if *temporary
                && !tandem
                    .volume(new)?
                    .is_some_and(|v| v.state == VolumeState::UpToDate)
            {
                // The clone's replicas may still be built from the snapshot.
                return Ok(false);
            }
            if *temporary {
                tandem.delete_snapshot(source, snapshot)?;
            }
        }
        Intent::Destroy { key } => {
            let key: Key = key.parse()?;
            if volume::in_use(sr, &key).is_err() {
                sr.change_meta(&key, |m| {
                    m.destroying = false;
                    Ok(())
                })?;
            } else {
                volume::destroy_steps(sr, &key)?;
            }
        }
    }
    Ok(true)
}
