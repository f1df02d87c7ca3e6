//! `tandem pool`: the storage pools of every node.

use clap::Subcommand;
use tandem_api::{ByteSize, ClusterPool, CreatePool, NodeName, PoolName};

use super::{Output, deleted, emit, or_dash};
use crate::client::{CliError, Client};
use crate::table::Table;

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// List the pools of every node, with capacity and free space.
    List,
    /// Create a pool on NODE: a directory there, created if missing.
    Create {
        node: NodeName,
        name: PoolName,
        /// The directory on the node that holds the replicas.
        #[arg(long)]
        path: String,
    },
    /// Remove a pool from its node.
    Delete { node: NodeName, name: PoolName },
}

pub fn run(api: &Client, out: Output, cmd: &PoolCommand) -> Result<(), CliError> {
    match cmd {
        PoolCommand::List => {
            let pools: Vec<ClusterPool> = api.get("/v1/pools")?;
            emit(out, &pools, |p| pool_table(p));
        }
        PoolCommand::Create { node, name, path } => {
            let req = CreatePool {
                name: name.clone(),
                path: path.clone(),
            };
            let pool: ClusterPool = api.send("POST", &format!("/v1/nodes/{node}/pools"), &req)?;
            emit(out, &pool, |p| pool_table(std::slice::from_ref(p)));
        }
        PoolCommand::Delete { node, name } => {
            api.delete(&format!("/v1/nodes/{node}/pools/{name}"))?;
            deleted(
                out,
                format!("pool {node}/{name}"),
                serde_json::json!({ "node": node, "pool": name }),
            );
        }
    }
    Ok(())
}

fn pool_table(pools: &[ClusterPool]) -> Table {
    let mut t = Table::new([
        "NODE",
        "POOL",
        "KIND",
        "PATH",
        "CAPACITY",
        "FREE",
        "PROVISIONED",
        "REPLICAS",
        "SNAPSHOTS",
    ]);
    for p in pools {
        t.row([
            p.node.to_string(),
            p.name.to_string(),
            p.kind.clone(),
            p.path.clone(),
            or_dash(p.capacity.map(ByteSize)),
            or_dash(p.free.map(ByteSize)),
            ByteSize(p.provisioned).to_string(),
            p.replicas.to_string(),
            or_dash(p.snapshots.map(|s| if s { "reflink" } else { "no" })),
        ]);
    }
    t
}
