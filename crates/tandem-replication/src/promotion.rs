//! A peer asks to become Primary: this node's answer. Without allow-two-primaries, it
//! refuses while it is Primary itself, while it is connected to another Primary (the
//! asker cannot see that one, or it would not ask: granting would make two), and while
//! it is asking too with the lower node id (of two nodes asking at once, the lower id
//! wins: each grants the other's request only if the other's id is lower).

use tandem_api::NodeId;

/// What this node is doing about its own role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Own {
    pub id: NodeId,
    pub primary: bool,
    /// It is asking its peers to agree to its own promotion.
    pub promoting: bool,
    /// It is connected to a Primary other than the asker.
    pub other_primary: bool,
}

/// Whether a promotion asked by node `from` is granted.
pub(crate) fn grant(own: Own, from: NodeId, two_primaries: bool) -> bool {
    two_primaries || !(own.primary || own.other_primary || (own.promoting && own.id < from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::new(n).unwrap()
    }

    #[test]
    fn promotion_answers() {
        let own = |primary, promoting| Own {
            id: id(1),
            primary,
            promoting,
            other_primary: false,
        };
        let seeing_one = Own {
            other_primary: true,
            ..own(false, false)
        };
        // (own, asker, two primaries allowed, granted)
        for (o, from, two, want) in [
            (own(false, false), 2, false, true),
            (own(true, false), 2, false, false),
            (seeing_one, 2, false, false),
            (seeing_one, 2, true, true),
            (own(true, false), 0, false, false),
            (own(true, false), 2, true, true),
            // Both asking: the lower id wins.
            (own(false, true), 2, false, false),
            (own(false, true), 0, false, true),
        ] {
            assert_eq!(
                grant(o, id(from), two),
                want,
                "{o:?} asked by {from} (two: {two})"
            );
        }
    }

    #[test]
    fn of_two_nodes_asking_at_once_exactly_one_is_granted() {
        for a in 0..4u8 {
            for b in (0..4u8).filter(|b| *b != a) {
                let asking = |n| Own {
                    id: id(n),
                    primary: false,
                    promoting: true,
                    other_primary: false,
                };
                let a_granted_by_b = grant(asking(b), id(a), false);
                let b_granted_by_a = grant(asking(a), id(b), false);
                assert!(a_granted_by_b != b_granted_by_a, "{a} and {b}");
            }
        }
    }
}
