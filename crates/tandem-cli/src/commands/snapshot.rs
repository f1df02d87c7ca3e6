//! `tandem snapshot`: point-in-time images of volumes, taken at one point of the write
//! order on every replica, readable over NBD as `VOLUME@SNAPSHOT`.

use clap::Subcommand;
use tandem_api::{
    ByteSize, CloneSnapshot, ClusterSnapshot, ClusterVolume, CreateSnapshot, SnapshotName,
    SnapshotTaken, VolumeName,
};

use super::{Output, deleted, emit};
use crate::client::{CliError, Client};
use crate::table::Table;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a volume, in use or not; new writes wait only while the
    /// writes in flight complete.
    Create {
        volume: VolumeName,
        name: SnapshotName,
    },
    /// List snapshots (of one volume, or all) and the nodes holding each.
    List { volume: Option<VolumeName> },
    /// Delete a snapshot from every node holding it.
    Delete {
        volume: VolumeName,
        name: SnapshotName,
    },
    /// Put a volume back as it was at a snapshot, on every replica; the volume must be
    /// closed everywhere.
    Rollback {
        volume: VolumeName,
        name: SnapshotName,
    },
    /// Create volume NEW as a copy of a snapshot, independent of its origin from then on.
    Clone {
        volume: VolumeName,
        name: SnapshotName,
        new: VolumeName,
    },
}

pub fn run(api: &Client, out: Output, cmd: &SnapshotCommand) -> Result<(), CliError> {
    match cmd {
        SnapshotCommand::Create { volume, name } => {
            let req = CreateSnapshot { name: name.clone() };
            let taken: SnapshotTaken =
                api.send("POST", &format!("/v1/volumes/{volume}/snapshots"), &req)?;
            emit(out, &taken, taken_text);
        }
        SnapshotCommand::List { volume } => {
            let path = match volume {
                Some(v) => format!("/v1/volumes/{v}/snapshots"),
                None => "/v1/snapshots".into(),
            };
            let snapshots: Vec<ClusterSnapshot> = api.get(&path)?;
            emit(out, &snapshots, |s| snapshot_table(s));
        }
        SnapshotCommand::Rollback { volume, name } => {
            let path = format!("/v1/volumes/{volume}/snapshots/{name}/rollback");
            let rolled: ClusterVolume = api.post(&path)?;
            emit(out, &rolled, |v| {
                format!("volume {} rolled back to {name}\n", v.name)
            });
        }
        SnapshotCommand::Clone { volume, name, new } => {
            let req = CloneSnapshot { name: new.clone() };
            let path = format!("/v1/volumes/{volume}/snapshots/{name}/clone");
            let created: ClusterVolume = api.send("POST", &path, &req)?;
            emit(out, &created, |v| {
                format!(
                    "volume {} cloned from {volume}@{name} ({})\n",
                    v.name,
                    ByteSize(v.size)
                )
            });
        }
        SnapshotCommand::Delete { volume, name } => {
            api.delete(&format!("/v1/volumes/{volume}/snapshots/{name}"))?;
            deleted(
                out,
                format!("snapshot {volume}@{name}"),
                serde_json::json!({ "volume": volume, "snapshot": name }),
            );
        }
    }
    Ok(())
}

fn taken_text(t: &SnapshotTaken) -> String {
    let s = &t.snapshot;
    let mut text = format!(
        "snapshot {}@{} taken on {} (writes held back {:.1} ms)\n",
        s.volume,
        s.name,
        t.replicas
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        t.paused_us as f64 / 1000.0
    );
    for m in &t.missing {
        text += &format!("  not on {}: {}\n", m.node, m.reason);
    }
    text
}

fn snapshot_table(snapshots: &[ClusterSnapshot]) -> Table {
    let mut t = Table::new(["VOLUME", "SNAPSHOT", "CREATED (UTC)", "SIZE", "REPLICAS"]);
    for s in snapshots {
        let replicas: Vec<&str> = s.replicas.iter().map(|n| n.as_str()).collect();
        t.row([
            s.volume.to_string(),
            s.name.to_string(),
            utc(s.created),
            ByteSize(s.size).to_string(),
            replicas.join(","),
        ]);
    }
    t
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time, in UTC.
fn utc(secs: u64) -> String {
    // SAFETY: gmtime_r fills the zeroed struct we own from a value we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let t = secs as libc::time_t;
    if unsafe { libc::gmtime_r(&t, &mut tm) }.is_null() {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_796_000_000), "2026-11-30 00:53:20");
    }
}
