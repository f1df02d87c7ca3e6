//! `tandem group`: resource groups, the placement rules volumes are created with.

use clap::Subcommand;
use serde::Serialize;
use tandem_api::{Group, GroupName, NodeName, OnNoQuorum, PoolName, QuorumPolicy};

use super::{Output, api_words, deleted, emit, replica_count, word};
use crate::client::{CliError, Client};
use crate::table::Table;

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List the resource groups.
    List,
    /// Show one resource group.
    Show { name: GroupName },
    /// Create a resource group; options left out take the controller's defaults.
    Create {
        name: GroupName,
        /// Diskful replicas per volume, 1 to 31 [controller default: 2].
        #[arg(long, value_parser = replica_count())]
        replicas: Option<u8>,
        /// The pool replicas go in, on every node [controller default: default].
        #[arg(long)]
        pool: Option<PoolName>,
        /// Only these nodes hold replicas, e.g. n1,n2 [default: any node].
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<NodeName>,
        /// Whether writes need a majority of the voting participants.
        #[arg(long, value_parser = api_words::<QuorumPolicy>(&["majority", "off"]))]
        quorum: Option<QuorumPolicy>,
        /// What I/O does without quorum: fail, or wait for quorum to return.
        #[arg(long, value_parser = api_words::<OnNoQuorum>(&["io-error", "suspend-io"]))]
        on_no_quorum: Option<OnNoQuorum>,
    },
    /// Delete a resource group.
    Delete { name: GroupName },
}

/// The body of `POST /v1/groups`: only the options given, the controller fills in the rest.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct NewGroup<'a> {
    name: &'a GroupName,
    #[serde(skip_serializing_if = "Option::is_none")]
    replicas: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pool: Option<&'a PoolName>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    nodes: &'a [NodeName],
    #[serde(skip_serializing_if = "Option::is_none")]
    quorum: Option<QuorumPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    on_no_quorum: Option<OnNoQuorum>,
}

pub fn run(api: &Client, out: Output, cmd: &GroupCommand) -> Result<(), CliError> {
    match cmd {
        GroupCommand::List => {
            let groups: Vec<Group> = api.get("/v1/groups")?;
            emit(out, &groups, |g| group_table(g));
        }
        GroupCommand::Show { name } => {
            let group: Group = api.get(&format!("/v1/groups/{name}"))?;
            emit(out, &group, |g| group_table(std::slice::from_ref(g)));
        }
        GroupCommand::Create {
            name,
            replicas,
            pool,
            nodes,
            quorum,
            on_no_quorum,
        } => {
            let req = NewGroup {
                name,
                replicas: *replicas,
                pool: pool.as_ref(),
                nodes,
                quorum: *quorum,
                on_no_quorum: *on_no_quorum,
            };
            let group: Group = api.send("POST", "/v1/groups", &req)?;
            emit(out, &group, |g| group_table(std::slice::from_ref(g)));
        }
        GroupCommand::Delete { name } => {
            api.delete(&format!("/v1/groups/{name}"))?;
            deleted(
                out,
                format!("group {name}"),
                serde_json::json!({ "group": name }),
            );
        }
    }
    Ok(())
}

fn group_table(groups: &[Group]) -> Table {
    let mut t = Table::new([
        "NAME",
        "REPLICAS",
        "POOL",
        "NODES",
        "QUORUM",
        "ON-NO-QUORUM",
    ]);
    for g in groups {
        let nodes: Vec<String> = g.nodes.iter().map(|n| n.to_string()).collect();
        t.row([
            g.name.to_string(),
            g.replicas.to_string(),
            g.pool.to_string(),
            if nodes.is_empty() {
                "any".into()
            } else {
                nodes.join(",")
            },
            word(&g.quorum),
            word(&g.on_no_quorum),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_group_sends_only_the_options_given() {
        let name: GroupName = "fast".parse().unwrap();
        let nodes: Vec<NodeName> = vec!["n1".parse().unwrap(), "n2".parse().unwrap()];
        let bare = NewGroup {
            name: &name,
            replicas: None,
            pool: None,
            nodes: &[],
            quorum: None,
            on_no_quorum: None,
        };
        assert_eq!(serde_json::to_string(&bare).unwrap(), r#"{"name":"fast"}"#);
        let full = NewGroup {
            replicas: Some(3),
            nodes: &nodes,
            on_no_quorum: Some(OnNoQuorum::SuspendIo),
            ..bare
        };
        let group: Group = serde_json::from_str(&serde_json::to_string(&full).unwrap()).unwrap();
        assert_eq!(group.replicas, 3);
        assert_eq!(group.nodes, nodes);
        assert_eq!(group.on_no_quorum, OnNoQuorum::SuspendIo);
        assert_eq!(group.quorum, QuorumPolicy::Majority);
    }

    #[test]
    fn groups_print_their_rules() {
        let group: Group = serde_json::from_str(r#"{"name":"g","quorum":"off"}"#).unwrap();
        let text = group_table(&[group]).to_string();
        assert_eq!(
            text.lines().nth(1).unwrap(),
            "g     2         default  any    off     io-error"
        );
    }
}
