//! Where replicas go: distinct online nodes whose pool has room, the most free space
//! first, net of what is already promised to thin volumes there.
//!
//! Free space alone does not spread thin volumes (they take no space when created), so
//! each pool's free space is reduced by the sizes of the replicas already placed in it:
//! equal nodes then take turns, and a bigger or emptier pool gets more.

use std::fmt;

use tandem_api::{ByteSize, NodeName, PoolName};

/// A node as placement sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub node: NodeName,
    pub online: bool,
    /// Allowed by the group's node list.
    pub allowed: bool,
    /// Free bytes in the group's pool; `None` when the node has no such pool.
    pub free: Option<u64>,
    /// Sizes of the replicas already placed in that pool.
    pub provisioned: u64,
    /// Volumes the node takes part in at all (for tiebreakers).
    pub participations: usize,
    /// Already a participant of this volume.
    pub taken: bool,
}

impl Candidate {
    /// Why the node cannot take a replica of `size` bytes, if it cannot.
    fn unfit(&self, pool: &PoolName, size: u64) -> Option<String> {
        if self.taken {
            return Some("already holds a replica".into());
        }
        if !self.allowed {
            return Some("not in the group's node list".into());
        }
        if !self.online {
            return Some("not online".into());
        }
        match self.free {
            None => Some(format!("has no pool {pool}")),
            Some(free) if free < size => Some(format!(
                "pool {pool} has {} free, needs {}",
                ByteSize(free),
                ByteSize(size)
            )),
            Some(_) => None,
        }
    }

    fn score(&self) -> i128 {
        self.free.unwrap_or(0) as i128 - self.provisioned as i128
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementError {
    pub wanted: usize,
    pub pool: PoolName,
    pub fit: Vec<NodeName>,
    pub rejected: Vec<(NodeName, String)>,
}

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} replica(s) in pool {} need as many suitable nodes, {} found",
            self.wanted,
            self.pool,
            self.fit.len()
        )?;
        let reasons: Vec<String> = self
            .fit
            .iter()
            .map(|n| format!("{n}: suitable"))
            .chain(self.rejected.iter().map(|(n, why)| format!("{n}: {why}")))
            .collect();
        if !reasons.is_empty() {
            write!(f, " ({})", reasons.join("; "))?;
        }
        Ok(())
    }
}

/// Picks `count` nodes for diskful replicas of `size` bytes in `pool`.
pub fn place(
    count: usize,
    size: u64,
    pool: &PoolName,
    candidates: &[Candidate],
) -> Result<Vec<NodeName>, PlacementError> {
    let mut fit: Vec<&Candidate> = Vec::new();
    let mut rejected = Vec::new();
    for c in candidates {
        match c.unfit(pool, size) {
            None => fit.push(c),
            Some(why) => rejected.push((c.node.clone(), why)),
        }
    }
    fit.sort_by(|a, b| {
        b.score()
            .cmp(&a.score())
            .then(a.participations.cmp(&b.participations))
            .then(a.node.cmp(&b.node))
    });
    if fit.len() < count {
        return Err(PlacementError {
            wanted: count,
            pool: pool.clone(),
            fit: fit.iter().map(|c| c.node.clone()).collect(),
            rejected,
        });
    }
    Ok(fit[..count].iter().map(|c| c.node.clone()).collect())
}

/// The node for a diskless tiebreaker: online, not yet a participant, the least busy.
pub fn tiebreaker(candidates: &[Candidate]) -> Option<NodeName> {
    candidates
        .iter()
        .filter(|c| c.online && !c.taken)
        .min_by(|a, b| {
            a.participations
                .cmp(&b.participations)
                .then(a.node.cmp(&b.node))
        })
        .map(|c| c.node.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn node(name: &str, free: Option<u64>, provisioned: u64) -> Candidate {
        Candidate {
            node: name.parse().unwrap(),
            online: true,
            allowed: true,
            free,
            provisioned,
            participations: 0,
            taken: false,
        }
    }

    fn pool() -> PoolName {
        "default".parse().unwrap()
    }

    #[test]
    fn most_free_space_first() {
        let nodes = [
            node("n1", Some(10 * G), 0),
            node("n2", Some(50 * G), 0),
            node("n3", Some(30 * G), 0),
        ];
        let chosen = place(2, G, &pool(), &nodes).unwrap();
        assert_eq!(chosen, ["n2".parse().unwrap(), "n3".parse().unwrap()]);
    }

    #[test]
    fn equal_nodes_take_turns_as_thin_volumes_are_promised() {
        let mut nodes = vec![
            node("n1", Some(100 * G), 0),
            node("n2", Some(100 * G), 0),
            node("n3", Some(100 * G), 0),
        ];
        let mut held = [0u32; 3];
        for _ in 0..20 {
            for chosen in place(2, G, &pool(), &nodes).unwrap() {
                let i = nodes.iter().position(|c| c.node == chosen).unwrap();
                nodes[i].provisioned += G;
                held[i] += 1;
            }
        }
        // 40 replicas on 3 nodes: 13 or 14 each.
        assert!(held.iter().all(|&h| (13..=14).contains(&h)), "{held:?}");
    }

    #[test]
    fn impossible_requests_say_why_for_each_node() {
        let mut offline = node("n2", Some(100 * G), 0);
        offline.online = false;
        let nodes = [
            node("n1", Some(100 * G), 0),
            offline,
            node("n3", Some(G / 2), 0),
            node("n4", None, 0),
        ];
        let err = place(2, G, &pool(), &nodes).unwrap_err();
        let text = err.to_string();
        for expected in [
            "2 replica(s) in pool default",
            "1 found",
            "n1: suitable",
            "n2: not online",
            "n3: pool default has 512M free, needs 1G",
            "n4: has no pool default",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from {text}");
        }
    }

    #[test]
    fn tiebreaker_goes_to_the_least_busy_free_node() {
        let mut a = node("n1", None, 0);
        a.taken = true;
        let mut b = node("n2", None, 0);
        b.participations = 5;
        let c = node("n3", None, 0);
        let mut d = node("n4", None, 0);
        d.online = false;
        assert_eq!(tiebreaker(&[a, b, c, d]), Some("n3".parse().unwrap()));
    }
}
