//! `tandem cluster`: which cluster the CLI talks to, and which node runs its controller.

use tandem_api::ClusterInfo;

use super::{Output, emit};
use crate::client::{CliError, Client};
use crate::table::Table;

pub fn run(api: &Client, out: Output) -> Result<(), CliError> {
    let info: ClusterInfo = api.get("/v1/cluster")?;
    emit(out, &info, |i| {
        let mut t = Table::new(["CLUSTER", "CONTROLLER", "VERSION"]);
        t.row([
            i.cluster_id.to_string(),
            i.controller.to_string(),
            i.version.clone(),
        ]);
        t
    });
    Ok(())
}
