//! The controller's Prometheus metrics, served with the node's at `/metrics`: nodes and
//! volumes by state (from the same view `tandem health` reads), and how long a visit
//! of a node (reconciliation) takes.

use std::fmt;
use std::sync::Arc;

use tandem_api::{NodeState, VolumeState};
use tandem_metrics::{Collector, DescriptorEncoder, Family, Labels, MetricType, Unit, label};

use crate::controller::Controller;

struct ClusterMetrics(Arc<Controller>);

impl fmt::Debug for ClusterMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterMetrics")
    }
}

impl Controller {
    /// The cluster's metrics, read from the controller at each scrape.
    pub fn metrics(self: &Arc<Self>) -> Box<dyn Collector> {
        Box::new(ClusterMetrics(self.clone()))
    }
}

impl Collector for ClusterMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let (nodes, volumes) = self.0.view(|s| {
            let nodes: Vec<NodeState> = s.nodes().iter().map(|n| n.state).collect();
            let volumes: Vec<VolumeState> = s.volumes().iter().map(|v| v.state).collect();
            (nodes, volumes)
        });
        let mut f = Family::new(&mut encoder);
        f.gauge(
            "cluster_nodes",
            "Nodes of the cluster, by state.",
            None,
            by_state(NodeState::ALL, &nodes),
        )?;
        f.gauge(
            "cluster_volumes",
            "Volumes of the cluster, by state.",
            None,
            by_state(VolumeState::ALL, &volumes),
        )?;
        f.live(
            "controller_reconcile_duration",
            "Time a visit of one node takes: reading its report and sending what differs.",
            Some(Unit::Seconds),
            MetricType::Histogram,
            [(vec![], &self.0.reconcile_seconds)],
        )
    }
}

/// How many of `items` are in each of the states `all`, labelled `state`.
fn by_state<S: PartialEq + fmt::Display>(all: &[S], items: &[S]) -> Vec<(Labels, f64)> {
    all.iter()
        .map(|state| {
            let n = items.iter().filter(|s| *s == state).count();
            (vec![label("state", state)], n as f64)
        })
        .collect()
}
