//! `tandem`: the command line for Tandem.

mod client;
mod demo;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tandem_api::{
    ByteSize, CreateVolume, NodeInfo, PoolInfo, PoolName, UpdateVolume, VolumeInfo, VolumeName,
    VolumeStatus,
};

use crate::client::{CliError, Client};
use crate::table::Table;

#[derive(Parser)]
#[command(name = "tandem", version, about = "Manage Tandem volumes and pools")]
struct Cli {
    /// API of the node or controller to talk to.
    #[arg(
        long,
        global = true,
        env = "TANDEM_CONTROLLER",
        default_value = "http://127.0.0.1:3370"
    )]
    controller: String,
    /// Output format: a table for people, JSON for scripts.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Volumes: create, list, resize, delete.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Storage pools of the node.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// The node's name, version and pools.
    Node,
    /// Start a local three-node cluster with a replicated volume, until Ctrl-C.
    Demo {
        /// Where the nodes keep their data.
        #[arg(long, default_value = "tandem-demo")]
        dir: std::path::PathBuf,
        /// Size of the demo volume.
        #[arg(long, default_value = "1G")]
        size: ByteSize,
    },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume.
    Create {
        name: VolumeName,
        /// Size, e.g. 10G (units K, M, G, T are binary).
        #[arg(long)]
        size: ByteSize,
        /// Reserve all space now instead of on first write.
        #[arg(long)]
        thick: bool,
        /// Pool to create it in [default: the node's first pool].
        #[arg(long)]
        pool: Option<PoolName>,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show { name: VolumeName },
    /// Grow a volume.
    Resize {
        name: VolumeName,
        #[arg(long)]
        size: ByteSize,
    },
    /// Make a volume read-only, or writable again with --off.
    ReadOnly {
        name: VolumeName,
        #[arg(long)]
        off: bool,
    },
    /// Delete a volume and its data.
    Delete { name: VolumeName },
    /// Replication status of a replicated volume, as `drbdadm status` shows it.
    Status { name: VolumeName },
    /// Compare the replicas by checksum; differing blocks are resynced.
    Verify { name: VolumeName },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// List storage pools with capacity and free space.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Demo { dir, size } = &cli.command {
        return match demo::run(dir, size.0) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `value` as JSON for scripts, or in its human form (a table, a status text).
fn emit<T: Serialize, H: std::fmt::Display>(
    output: Output,
    value: &T,
    human: impl FnOnce(&T) -> H,
) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).expect("serialisable")
        ),
        Output::Table => print!("{}", human(value)),
    }
}

fn volume_table(volumes: &[VolumeInfo]) -> Table {
    let mut t = Table::new([
        "NAME",
        "SIZE",
        "ALLOCATED",
        "POOL",
        "TYPE",
        "ACCESS",
        "DISK",
        "OPEN",
    ]);
    for v in volumes {
        t.row([
            v.name.to_string(),
            ByteSize(v.size).to_string(),
            ByteSize(v.allocated).to_string(),
            v.pool.to_string(),
            (if v.thick { "thick" } else { "thin" }).into(),
            (if v.read_only { "ro" } else { "rw" }).into(),
            match &v.error {
                Some(e) => format!("{} ({e})", v.disk),
                None => v.disk.to_string(),
            },
            v.open.to_string(),
        ]);
    }
    t
}

fn pool_table(pools: &[PoolInfo]) -> Table {
    let mut t = Table::new(["POOL", "KIND", "PATH", "CAPACITY", "FREE", "VOLUMES"]);
    for p in pools {
        t.row([
            p.name.to_string(),
            p.kind.clone(),
            p.path.clone(),
            ByteSize(p.capacity).to_string(),
            ByteSize(p.free).to_string(),
            p.volumes.to_string(),
        ]);
    }
    t
}

fn run(cli: &Cli) -> Result<(), CliError> {
    let api = Client::new(&cli.controller);
    let out = cli.output;
    match &cli.command {
        Command::Demo { .. } => unreachable!("handled in main"),
        Command::Node => {
            let node: NodeInfo = api.get("/v1/node")?;
            emit(out, &node, |n| {
                let mut t = Table::new(["NODE", "VERSION", "POOLS"]);
                t.row([
                    n.name.to_string(),
                    n.version.clone(),
                    n.pools.len().to_string(),
                ]);
                t
            });
        }
        Command::Pool(PoolCommand::List) => {
            let pools: Vec<PoolInfo> = api.get("/v1/node/pools")?;
            emit(out, &pools, |p| pool_table(p));
        }
        Command::Volume(cmd) => match cmd {
            VolumeCommand::Create {
                name,
                size,
                thick,
                pool,
            } => {
                let req = CreateVolume {
                    name: name.clone(),
                    size: size.0,
                    pool: pool.clone(),
                    thick: *thick,
                };
                let v: VolumeInfo = api.send("POST", "/v1/node/volumes", &req)?;
                emit(out, &v, |v| volume_table(std::slice::from_ref(v)));
            }
            VolumeCommand::List => {
                let volumes: Vec<VolumeInfo> = api.get("/v1/node/volumes")?;
                emit(out, &volumes, |v| volume_table(v));
            }
            VolumeCommand::Show { name } => {
                let v: VolumeInfo = api.get(&format!("/v1/node/volumes/{name}"))?;
                emit(out, &v, |v| volume_table(std::slice::from_ref(v)));
            }
            VolumeCommand::Resize { name, size } => {
                let change = UpdateVolume {
                    size: Some(size.0),
                    ..Default::default()
                };
                let v: VolumeInfo =
                    api.send("PATCH", &format!("/v1/node/volumes/{name}"), &change)?;
                emit(out, &v, |v| volume_table(std::slice::from_ref(v)));
            }
            VolumeCommand::ReadOnly { name, off } => {
                let change = UpdateVolume {
                    read_only: Some(!off),
                    ..Default::default()
                };
                let v: VolumeInfo =
                    api.send("PATCH", &format!("/v1/node/volumes/{name}"), &change)?;
                emit(out, &v, |v| volume_table(std::slice::from_ref(v)));
            }
            VolumeCommand::Status { name } => {
                let status: VolumeStatus = api.get(&format!("/v1/node/volumes/{name}/status"))?;
                emit(out, &status, |s| s.to_string());
            }
            VolumeCommand::Verify { name } => {
                let report: serde_json::Value =
                    api.send("POST", &format!("/v1/node/volumes/{name}/verify"), &())?;
                emit(out, &report, |r| {
                    let mut t = Table::new(["PEER", "DIFFERING BLOCKS"]);
                    for p in r["peers"].as_array().into_iter().flatten() {
                        t.row([
                            p["node"].as_str().unwrap_or("?").to_owned(),
                            p["differing-blocks"].to_string(),
                        ]);
                    }
                    t
                });
            }
            VolumeCommand::Delete { name } => {
                api.delete(&format!("/v1/node/volumes/{name}"))?;
                if out == Output::Json {
                    println!("{}", serde_json::json!({ "deleted": name }));
                } else {
                    println!("volume {name} deleted");
                }
            }
        },
    }
    Ok(())
}
