//! The controller role of `tandemd`: the cluster's object model in an embedded
//! database, placement of replicas, reconciliation of every node toward its desired
//! volume specs, and the cluster API (`/v1/...`, `/openapi.json`).

mod api;
pub mod backups;
pub mod blockfile;
mod controller;
mod follow;
pub mod http;
mod metrics;
mod model;
mod node_client;
mod openapi;
mod ops;
mod orphans;
mod placement;
mod reconcile;
mod snapshots;
mod store;
pub mod system;
mod view;

pub use api::router;
pub use backups::restore;
pub use controller::Controller;
pub use node_client::{CONTROLLER_HEADER, EPOCH_HEADER};
pub use store::{Store, StoreError};
