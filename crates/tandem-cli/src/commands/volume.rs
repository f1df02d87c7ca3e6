//! `tandem volume`: replicated volumes across the cluster.

use clap::{ArgGroup, Subcommand};
use tandem_api::{
    ByteSize, ChangeReplicas, ClusterParticipant, ClusterVolume, CreateClusterVolume, GroupName,
    NodeName, OnNode, ParticipantKind, ResizeVolume, VolumeName, VolumeStatus,
};

use super::{Output, deleted, emit, force_query, or_dash, replica_count, word, yes_no};
use crate::client::{CliError, Client};
use crate::table::Table;

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume; its group's rules place the replicas.
    Create {
        name: VolumeName,
        /// Size, e.g. 10G (units K, M, G, T are binary).
        #[arg(long)]
        size: ByteSize,
        /// Diskful replicas, 1 to 31 [default: the group's].
        #[arg(long, value_parser = replica_count())]
        replicas: Option<u8>,
        /// Resource group [default: default].
        #[arg(long)]
        group: Option<GroupName>,
    },
    /// List volumes with the state of every participant.
    List {
        /// Include the system volume that holds the controller's database.
        #[arg(long)]
        all: bool,
    },
    /// Show a volume and each of its participants.
    Show { name: VolumeName },
    /// Replication status, as `drbdadm status` shows it.
    Status { name: VolumeName },
    /// Grow a volume on every replica.
    Resize {
        name: VolumeName,
        /// New size, e.g. 20G; volumes only grow.
        #[arg(long)]
        size: ByteSize,
    },
    /// Export a volume over NBD on a node; a node without a replica reads and writes
    /// over the network.
    Attach {
        name: VolumeName,
        #[arg(long)]
        node: NodeName,
    },
    /// Stop exporting a volume on a node.
    Detach {
        name: VolumeName,
        #[arg(long)]
        node: NodeName,
    },
    /// Add a replica on a node (it resyncs in full), or remove one.
    #[command(group(ArgGroup::new("change").required(true).args(["add", "remove"])))]
    Replicas {
        name: VolumeName,
        /// Node to place a new replica on.
        #[arg(long)]
        add: Option<NodeName>,
        /// Node whose replica to delete.
        #[arg(long)]
        remove: Option<NodeName>,
    },
    /// Compare the replicas by checksum; differing blocks are resynced.
    Verify { name: VolumeName },
    /// Declare the replica on a node whole as it is, when no replica of the volume is
    /// (the disks of every replica failed in turn, then were repaired); the others are
    /// resynced from it. Refused for any but the replica that held the data last.
    Trust {
        name: VolumeName,
        #[arg(long)]
        node: NodeName,
    },
    /// End a split brain (or a replica refused as unrelated data): the replica on the
    /// node named is discarded and resynced in full from the others. Refused unless
    /// another replica is UpToDate.
    Resolve {
        name: VolumeName,
        /// The node whose replica's data is given up.
        #[arg(long)]
        discard: NodeName,
    },
    /// Delete a volume and all its replicas.
    Delete {
        name: VolumeName,
        /// Delete it even while it is attached or a node holding it is unreachable.
        #[arg(long)]
        force: bool,
        /// Have the nodes delete the volume of this name they hold and the controller
        /// has no record of (an orphan, as `tandem health` reports it).
        #[arg(long, conflicts_with = "force")]
        orphan: bool,
    },
    /// Take a volume nodes hold that the controller has no record of (an orphan, as
    /// `tandem health` reports it) into the cluster, as it stands on its nodes.
    Adopt { name: VolumeName },
}

/// `POST /v1/volumes/NAME/ACTION` with a body naming a node; prints the volume after.
fn on_node(
    api: &Client,
    out: Output,
    name: &VolumeName,
    action: &str,
    node: &NodeName,
) -> Result<(), CliError> {
    let req = OnNode { node: node.clone() };
    let v: ClusterVolume = api.send("POST", &format!("/v1/volumes/{name}/{action}"), &req)?;
    emit(out, &v, volume_details);
    Ok(())
}

pub fn run(api: &Client, out: Output, cmd: &VolumeCommand) -> Result<(), CliError> {
    let one = |v: &ClusterVolume| volume_details(v);
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            replicas,
            group,
        } => {
            let req = CreateClusterVolume {
                name: name.clone(),
                size: size.0,
                replicas: *replicas,
                group: group.clone(),
            };
            let v: ClusterVolume = api.send("POST", "/v1/volumes", &req)?;
            emit(out, &v, one);
        }
        VolumeCommand::List { all } => {
            let volumes: Vec<ClusterVolume> = api.get(if *all {
                "/v1/volumes?all=true"
            } else {
                "/v1/volumes"
            })?;
            emit(out, &volumes, |v| volume_table(v));
        }
        VolumeCommand::Show { name } => {
            let v: ClusterVolume = api.get(&format!("/v1/volumes/{name}"))?;
            emit(out, &v, one);
        }
        VolumeCommand::Status { name } => match out {
            Output::Table => {
                let text = api.get_text(&format!("/v1/volumes/{name}/status?format=text"))?;
                print!("{text}");
                if !text.ends_with('\n') {
                    println!();
                }
            }
            Output::Json => {
                let status: VolumeStatus = api.get(&format!("/v1/volumes/{name}/status"))?;
                emit(out, &status, |s| s.to_string());
            }
        },
        VolumeCommand::Resize { name, size } => {
            let req = ResizeVolume { size: size.0 };
            let v: ClusterVolume = api.send("PATCH", &format!("/v1/volumes/{name}"), &req)?;
            emit(out, &v, one);
        }
        VolumeCommand::Attach { name, node } => on_node(api, out, name, "attach", node)?,
        VolumeCommand::Detach { name, node } => on_node(api, out, name, "detach", node)?,
        VolumeCommand::Replicas { name, add, remove } => {
            let req = ChangeReplicas {
                add: add.clone(),
                remove: remove.clone(),
            };
            let v: ClusterVolume =
                api.send("POST", &format!("/v1/volumes/{name}/replicas"), &req)?;
            emit(out, &v, one);
        }
        VolumeCommand::Trust { name, node } => on_node(api, out, name, "trust", node)?,
        VolumeCommand::Resolve { name, discard } => on_node(api, out, name, "resolve", discard)?,
        VolumeCommand::Verify { name } => {
            let report: serde_json::Value = api.post(&format!("/v1/volumes/{name}/verify"))?;
            emit(out, &report, verify_table);
        }
        VolumeCommand::Adopt { name } => {
            let v: ClusterVolume = api.post(&format!("/v1/volumes/{name}/adopt"))?;
            emit(out, &v, one);
        }
        VolumeCommand::Delete {
            name,
            force: _,
            orphan: true,
        } => {
            api.delete(&format!("/v1/volumes/{name}?orphan=true"))?;
            deleted(
                out,
                format!("orphan volume {name} (its nodes drop it on their next visit)"),
                serde_json::json!({ "volume": name, "orphan": true }),
            );
        }
        VolumeCommand::Delete {
            name,
            force,
            orphan: false,
        } => {
            api.delete(&format!("/v1/volumes/{name}{}", force_query(*force)))?;
            deleted(
                out,
                format!("volume {name}"),
                serde_json::json!({ "volume": name }),
            );
        }
    }
    Ok(())
}

fn volume_table(volumes: &[ClusterVolume]) -> Table {
    let mut t = Table::new(["NAME", "SIZE", "GROUP", "REPLICAS", "STATE", "PARTICIPANTS"]);
    for v in volumes {
        let participants: Vec<String> = v.participants.iter().map(compact).collect();
        t.row([
            v.name.to_string(),
            ByteSize(v.size).to_string(),
            v.group.to_string(),
            v.replicas.to_string(),
            v.state.to_string(),
            participants.join(" "),
        ]);
    }
    t
}

/// One participant in a word: `n1:UpToDate`, `n2:Inconsistent(42.17%)`, `n3:tiebreaker`.
fn compact(p: &ClusterParticipant) -> String {
    let state = match p.kind {
        ParticipantKind::Diskful => p.disk.map_or_else(|| "?".into(), |d| d.to_string()),
        kind => word(&kind),
    };
    match p.done {
        Some(done) => format!("{}:{state}({done:.2}%)", p.node),
        None => format!("{}:{state}", p.node),
    }
}

/// The volume's line, then one row per participant.
fn volume_details(v: &ClusterVolume) -> String {
    let mut head = Table::new(["NAME", "SIZE", "GROUP", "REPLICAS", "STATE", "ID"]);
    head.row([
        v.name.to_string(),
        ByteSize(v.size).to_string(),
        v.group.to_string(),
        v.replicas.to_string(),
        v.state.to_string(),
        v.id.to_string(),
    ]);
    let mut rows = Table::new([
        "NODE",
        "NODE-ID",
        "KIND",
        "POOL",
        "DISK",
        "REPLICATION",
        "ROLE",
        "OPEN",
        "ATTACHED",
        "ERROR",
    ]);
    for p in &v.participants {
        let replication = match (p.replication, p.done) {
            (Some(r), Some(done)) => format!("{r} {done:.2}%"),
            (r, _) => or_dash(r),
        };
        rows.row([
            p.node.to_string(),
            p.node_id.to_string(),
            word(&p.kind),
            or_dash(p.pool.as_ref()),
            or_dash(p.disk),
            replication,
            or_dash(p.role),
            yes_no(p.open).into(),
            yes_no(p.attached).into(),
            p.error.clone().unwrap_or_default(),
        ]);
    }
    format!("{head}\n{rows}")
}

/// `{"peers":[{"node":..,"differing-blocks":N}]}` as a table.
fn verify_table(report: &serde_json::Value) -> Table {
    let mut t = Table::new(["PEER", "DIFFERING BLOCKS"]);
    for p in report["peers"].as_array().into_iter().flatten() {
        t.row([
            p["node"].as_str().unwrap_or("?").to_owned(),
            p["differing-blocks"].to_string(),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> ClusterVolume {
        serde_json::from_str(
            r#"{"name":"vm1","id":"00112233445566778899aabbccddeeff","size":10737418240,
                "group":"default","replicas":2,"state":"Syncing","participants":[
                  {"node":"n1","node-id":0,"kind":"diskful","pool":"default","attached":true,
                   "disk":"UpToDate","role":"Primary","open":true},
                  {"node":"n2","node-id":1,"kind":"diskful","pool":"default","attached":false,
                   "disk":"Inconsistent","role":"Secondary","replication":"SyncTarget",
                   "done":42.17,"open":false},
                  {"node":"n3","node-id":2,"kind":"tiebreaker","attached":false,"open":false,
                   "error":"node n3 is offline"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_volume_lists_on_one_line_with_every_participant() {
        assert_eq!(
            volume_table(&[volume()]).to_string(),
            "NAME  SIZE  GROUP    REPLICAS  STATE    PARTICIPANTS\n\
             vm1   10G   default  2         Syncing  \
             n1:UpToDate n2:Inconsistent(42.17%) n3:tiebreaker\n"
        );
    }

    #[test]
    fn a_volume_shows_one_row_per_participant() {
        let text = volume_details(&volume());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7, "{text}");
        assert!(lines[1].starts_with("vm1   10G   default  2         Syncing  0011"));
        assert_eq!(lines[2], "");
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            [
                "NODE",
                "NODE-ID",
                "KIND",
                "POOL",
                "DISK",
                "REPLICATION",
                "ROLE",
                "OPEN",
                "ATTACHED",
                "ERROR"
            ]
        );
        let cells = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[4]),
            [
                "n1", "0", "diskful", "default", "UpToDate", "-", "Primary", "yes", "yes"
            ]
        );
        assert_eq!(
            cells(lines[5]),
            [
                "n2",
                "1",
                "diskful",
                "default",
                "Inconsistent",
                "SyncTarget",
                "42.17%",
                "Secondary",
                "no",
                "no"
            ]
        );
        assert!(lines[6].starts_with("n3  "));
        assert!(lines[6].contains("tiebreaker"));
        assert!(
            lines[6].ends_with("no    no        node n3 is offline"),
            "{}",
            lines[6]
        );
    }

    #[test]
    fn verify_reports_differing_blocks_per_peer() {
        let report = serde_json::json!({"peers":[{"node":"n2","differing-blocks":3}]});
        assert_eq!(
            verify_table(&report).to_string(),
            "PEER  DIFFERING BLOCKS\nn2    3\n"
        );
    }
}
