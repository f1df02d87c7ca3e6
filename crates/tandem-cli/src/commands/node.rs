//! `tandem node`: the hosts of the cluster.

use clap::Subcommand;
use tandem_api::{ClusterNode, CreateNode, NodeName};

use super::{Output, deleted, emit, force_query, or_dash};
use crate::client::{CliError, Client};
use crate::table::Table;

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List the nodes and their state.
    List,
    /// Show one node.
    Show { name: NodeName },
    /// Add the tandemd whose API answers at ADDRESS (host:port) to the cluster.
    Create { name: NodeName, address: String },
    /// Remove a node from the cluster.
    Delete {
        name: NodeName,
        /// Remove it even though it is unreachable or still has participants.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(api: &Client, out: Output, cmd: &NodeCommand) -> Result<(), CliError> {
    match cmd {
        NodeCommand::List => {
            let nodes: Vec<ClusterNode> = api.get("/v1/nodes")?;
            emit(out, &nodes, |n| node_table(n));
        }
        NodeCommand::Show { name } => {
            let node: ClusterNode = api.get(&format!("/v1/nodes/{name}"))?;
            emit(out, &node, |n| node_table(std::slice::from_ref(n)));
        }
        NodeCommand::Create { name, address } => {
            let req = CreateNode {
                name: name.clone(),
                address: address.clone(),
            };
            let node: ClusterNode = api.send("POST", "/v1/nodes", &req)?;
            emit(out, &node, |n| node_table(std::slice::from_ref(n)));
        }
        NodeCommand::Delete { name, force } => {
            api.delete(&format!("/v1/nodes/{name}{}", force_query(*force)))?;
            deleted(
                out,
                format!("node {name}"),
                serde_json::json!({ "node": name }),
            );
        }
    }
    Ok(())
}

fn node_table(nodes: &[ClusterNode]) -> Table {
    let mut t = Table::new([
        "NAME",
        "ADDRESS",
        "STATE",
        "VERSION",
        "PARTICIPANTS",
        "ERROR",
    ]);
    for n in nodes {
        t.row([
            n.name.to_string(),
            n.address.clone(),
            n.state.to_string(),
            or_dash(n.version.as_ref()),
            n.participants.to_string(),
            n.error.clone().unwrap_or_default(),
        ]);
    }
    t
}
