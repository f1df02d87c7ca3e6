//! `tandem cluster`: which cluster the CLI talks to, which node runs its controller,
//! the candidates and the replicas of the controller's database, and its backups.

use std::path::PathBuf;

use clap::Subcommand;
use tandem_api::{ByteSize, ClusterInfo};

use super::{Output, emit};
use crate::client::{CliError, Client};
use crate::table::Table;

/// The largest backup downloaded.
const BACKUP_LIMIT: u64 = 16 << 30;

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Write a fresh, checked backup of the controller's database to FILE (an SQLite
    /// file; `tandemd --controller --restore-db FILE` starts a controller from it).
    Backup { file: PathBuf },
}

pub fn run(api: &Client, out: Output, cmd: Option<&ClusterCommand>) -> Result<(), CliError> {
    match cmd {
        None => {
            let info: ClusterInfo = api.get("/v1/cluster")?;
            emit(out, &info, |i| {
                let mut t = Table::new([
                    "CLUSTER",
                    "CONTROLLER",
                    "EPOCH",
                    "CANDIDATES",
                    "DATABASE",
                    "VERSION",
                    "LAST BACKUP",
                ]);
                let names: Vec<String> = i.candidates.iter().map(ToString::to_string).collect();
                t.row([
                    i.cluster_id.to_string(),
                    i.controller.to_string(),
                    i.epoch.to_string(),
                    names.join(","),
                    i.database.as_ref().map_or("-".into(), |v| {
                        let replicas: Vec<String> = (v.participants.iter())
                            .filter(|p| p.kind == tandem_api::ParticipantKind::Diskful)
                            .map(|p| {
                                format!(
                                    "{}:{}",
                                    p.node,
                                    p.disk.map_or("?".into(), |d| d.to_string())
                                )
                            })
                            .collect();
                        format!("{} {}", v.state, replicas.join(" "))
                    }),
                    i.version.clone(),
                    i.last_backup.as_ref().map_or("-".into(), |b| {
                        format!("{} ({}, {} volumes)", b.file, ByteSize(b.bytes), b.volumes)
                    }),
                ]);
                t
            });
        }
        Some(ClusterCommand::Backup { file }) => {
            let bytes = api.get_bytes("/v1/cluster/backup", BACKUP_LIMIT)?;
            std::fs::write(file, &bytes).map_err(|e| CliError::Answer {
                url: api.base().to_owned(),
                why: format!("cannot write {}: {e}", file.display()),
            })?;
            emit(
                out,
                &serde_json::json!({ "file": file, "bytes": bytes.len() }),
                |_| {
                    format!(
                        "backup written to {} ({})\n",
                        file.display(),
                        ByteSize(bytes.len() as u64)
                    )
                },
            );
        }
    }
    Ok(())
}
