//! `tandem`: the command line for a Tandem cluster.

mod client;
mod commands;
mod demo;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tandem_api::ByteSize;

use crate::client::Client;
use crate::commands::cluster::ClusterCommand;
use crate::commands::group::GroupCommand;
use crate::commands::kv::KvCommand;
use crate::commands::node::NodeCommand;
use crate::commands::pool::PoolCommand;
use crate::commands::snapshot::SnapshotCommand;
use crate::commands::sr::SrCommand;
use crate::commands::volume::VolumeCommand;
use crate::commands::xapi::XapiCommand;
use crate::commands::{Output, cluster, group, health, kv, node, pool, snapshot, sr, volume, xapi};

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "Manage a Tandem cluster: nodes, pools, groups, volumes, snapshots and key-value stores"
)]
struct Cli {
    /// API of a node of the cluster: the one running the controller, or any other (it
    /// forwards the cluster API to the controller). Several, comma-separated, are tried
    /// in order until one answers.
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

#[derive(Debug, Subcommand)]
enum Command {
    /// The cluster's identity, the node running its controller, its last database backup;
    /// `tandem cluster backup FILE` makes one.
    Cluster {
        #[command(subcommand)]
        cmd: Option<ClusterCommand>,
    },
    /// Nodes: the hosts of the cluster.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Storage pools: directories on the nodes that hold replicas.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Resource groups: replica count, pool and nodes for the volumes created in them.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Volumes: create, list, attach, resize, delete.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshots of volumes: create, list, delete; read one over NBD as VOLUME@SNAPSHOT.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Key-value stores.
    #[command(subcommand)]
    Kv(KvCommand),
    /// XCP-ng storage repositories (SRs) made by the Tandem storage plugins.
    #[command(subcommand)]
    Sr(SrCommand),
    /// The XCP-ng storage plugins (SMAPIv3): install them, or run one call.
    #[command(subcommand)]
    Xapi(XapiCommand),
    /// What needs attention; exits 0 when all is well, 1 on warnings, 2 on errors.
    Health,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let api = Client::new(&cli.controller);
    let out = cli.output;
    let done = match &cli.command {
        Command::Demo { dir, size } => {
            return match demo::run(dir, size.0) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Health => return ExitCode::from(health::run(&api, out)),
        Command::Xapi(cmd) => return xapi::run(&cli.controller, cmd),
        Command::Cluster { cmd } => cluster::run(&api, out, cmd.as_ref()),
        Command::Node(cmd) => node::run(&api, out, cmd),
        Command::Pool(cmd) => pool::run(&api, out, cmd),
        Command::Group(cmd) => group::run(&api, out, cmd),
        Command::Volume(cmd) => volume::run(&api, out, cmd),
        Command::Snapshot(cmd) => snapshot::run(&api, out, cmd),
        Command::Kv(cmd) => kv::run(&api, out, cmd),
        Command::Sr(cmd) => sr::run(&api, out, cmd),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tandem").chain(args.iter().copied()))
    }

    fn refused(args: &[&str]) -> clap::Error {
        match parse(args) {
            Ok(cli) => panic!("{args:?} accepted: {:?}", cli.command),
            Err(e) => e,
        }
    }

    #[test]
    fn volume_create_reads_binary_sizes_and_optional_placement() {
        let cli = parse(&["volume", "create", "vm1", "--size", "10G"]).unwrap();
        let Command::Volume(VolumeCommand::Create {
            name,
            size,
            replicas,
            group,
        }) = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!((name.as_str(), size.0), ("vm1", 10 << 30));
        assert_eq!((replicas, group), (None, None));

        let cli = parse(&[
            "-o",
            "json",
            "volume",
            "create",
            "vm1",
            "--size",
            "1.5T",
            "--replicas",
            "3",
            "--group",
            "fast",
        ])
        .unwrap();
        assert_eq!(cli.output, Output::Json);
        let Command::Volume(VolumeCommand::Create {
            size,
            replicas,
            group,
            ..
        }) = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(size.0, 3 << 39);
        assert_eq!(replicas, Some(3));
        assert_eq!(group.unwrap().as_str(), "fast");

        let e = refused(&["volume", "create", "vm1", "--size", "12Q"]);
        assert!(
            e.to_string().contains("cannot read \"12Q\" as a size"),
            "{e}"
        );
        let e = refused(&["volume", "resize", "vm1", "--size", "lots"]);
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn replica_counts_stay_within_1_to_31() {
        for n in ["1", "31"] {
            assert!(parse(&["volume", "create", "v", "--size", "1G", "--replicas", n]).is_ok());
            assert!(parse(&["group", "create", "g", "--replicas", n]).is_ok());
        }
        for n in ["0", "32", "-1", "two"] {
            refused(&["volume", "create", "v", "--size", "1G", "--replicas", n]);
            refused(&["group", "create", "g", "--replicas", n]);
        }
    }

    #[test]
    fn names_are_checked_before_anything_is_sent() {
        let e = refused(&["volume", "show", "../etc"]);
        assert!(e.to_string().contains("volume name"), "{e}");
        refused(&["node", "create", "n/1", "10.0.0.1:3370"]);
        refused(&["pool", "create", "n1", ".hidden", "--path", "/srv"]);
    }

    #[test]
    fn kv_keys_are_paths() {
        let cli = parse(&["kv", "set", "xcp-sr", "sr/vdi/vm1", "-1"]).unwrap();
        let Command::Kv(KvCommand::Set { key, value, .. }) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(
            (key.to_string().as_str(), value.as_str()),
            ("sr/vdi/vm1", "-1")
        );
        for bad in ["sr//vdi", "/sr", "a b", ""] {
            let e = refused(&["kv", "get", "xcp-sr", bad]);
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{bad:?}");
            assert!(e.to_string().contains("a key is a path"), "{e}");
        }
    }

    #[test]
    fn a_replica_change_is_either_an_add_or_a_remove() {
        let cli = parse(&["volume", "replicas", "vm1", "--add", "n3"]).unwrap();
        let Command::Volume(VolumeCommand::Replicas { add, remove, .. }) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!((add.unwrap().as_str(), remove), ("n3", None));
        let both = refused(&["volume", "replicas", "vm1", "--add", "n3", "--remove", "n1"]);
        assert_eq!(both.kind(), ErrorKind::ArgumentConflict);
        let neither = refused(&["volume", "replicas", "vm1"]);
        assert_eq!(neither.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn group_options_take_the_apis_words() {
        let cli = parse(&[
            "group",
            "create",
            "fast",
            "--nodes",
            "n1,n2",
            "--quorum",
            "off",
            "--on-no-quorum",
            "suspend-io",
            "--pool",
            "ssd",
        ])
        .unwrap();
        let Command::Group(GroupCommand::Create {
            nodes,
            quorum,
            on_no_quorum,
            pool,
            replicas,
            ..
        }) = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        let nodes: Vec<&str> = nodes.iter().map(|n| n.as_str()).collect();
        assert_eq!(nodes, ["n1", "n2"]);
        assert_eq!(quorum, Some(tandem_api::QuorumPolicy::Off));
        assert_eq!(on_no_quorum, Some(tandem_api::OnNoQuorum::SuspendIo));
        assert_eq!(pool.unwrap().as_str(), "ssd");
        assert_eq!(replicas, None);
        assert_eq!(
            refused(&["group", "create", "g", "--quorum", "most"]).kind(),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn delete_takes_force_where_the_api_does() {
        let cli = parse(&["volume", "delete", "vm1", "--force"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Volume(VolumeCommand::Delete { force: true, .. })
        ));
        let cli = parse(&["node", "delete", "n1"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Node(NodeCommand::Delete { force: false, .. })
        ));
        refused(&["group", "delete", "g", "--force"]);
    }

    #[test]
    fn the_old_node_local_commands_are_gone() {
        refused(&["node"]);
        refused(&["volume", "read-only", "vm1"]);
        refused(&["volume", "create", "vm1", "--size", "1G", "--thick"]);
        refused(&[
            "volume", "create", "vm1", "--size", "1G", "--pool", "default",
        ]);
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
