//! The handshake decision: what a new connection between two replicas that hold data
//! must do first, from what each side says about itself. DRBD's rule, by generation
//! identifiers, never by guesswork: equal generations are in sync unless either side
//! knows of writes the other missed (its bitmap or activity log); a side whose
//! generation is the one the other recorded when it started tracking changes for it is
//! behind by exactly what that bitmap marks; anything else between two UpToDate
//! replicas is split brain.

/// What one side of a connection says about its replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Side {
    pub up_to_date: bool,
    /// Its current data generation.
    pub generation: u64,
    /// Its generation when it started tracking changes for the other side (0: it
    /// tracks none).
    pub mark: u64,
    /// It knows of ranges that differ on the other side (its bitmap for it, or extents
    /// a crash left in its activity log).
    pub dirty: bool,
}

/// What this side must do first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Direction {
    InSync,
    /// This side sends what the other lacks; `full` when it lacks everything.
    Source {
        full: bool,
    },
    Target,
    /// Neither side is UpToDate: connected, nothing to send until one is.
    Neither,
    /// Neither replica descends from the other: split brain, or unrelated data.
    Diverged(String),
}

/// The decision for `me`, facing `peer`; `me_first` breaks the one tie (both missed
/// writes of the other): the lower node id.
pub(crate) fn decide(me: Side, peer: Side, me_first: bool) -> Direction {
    match (me.up_to_date, peer.up_to_date) {
        (true, true) if me.generation == peer.generation => match (me.dirty, peer.dirty) {
            (false, false) => Direction::InSync,
            (true, false) => Direction::Source { full: false },
            (false, true) => Direction::Target,
            (true, true) if me_first => Direction::Source { full: false },
            (true, true) => Direction::Target,
        },
        (true, true) if me.mark != 0 && peer.generation == me.mark => {
            Direction::Source { full: false }
        }
        (true, true) if peer.mark != 0 && me.generation == peer.mark => Direction::Target,
        (true, true) => Direction::Diverged(format!(
            "split brain: both replicas changed since they last agreed (generation {:016x} here, {:016x} on the peer)",
            me.generation, peer.generation
        )),
        (true, false) => Direction::Source {
            full: !(me.mark != 0 && peer.generation == me.mark),
        },
        (false, true) => Direction::Target,
        // Each waits for an UpToDate replica; whichever becomes one first reconnects
        // to resync the other.
        (false, false) => Direction::Neither,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::*;

    const G1: u64 = 0x11;
    const G2: u64 = 0x22;
    const G3: u64 = 0x33;

    fn side(up_to_date: bool, generation: u64, mark: u64, dirty: bool) -> Side {
        Side {
            up_to_date,
            generation,
            mark,
            dirty,
        }
    }

    #[test]
    fn the_decision_table() {
        let up = |g, mark, dirty| side(true, g, mark, dirty);
        let behind = |g, mark, dirty| side(false, g, mark, dirty);
        let cases = [
            // Same generation: the bitmaps (and activity logs) decide.
            (
                "same, clean",
                up(G1, 0, false),
                up(G1, 0, false),
                true,
                InSync,
            ),
            (
                "same, I know their gaps",
                up(G1, 0, true),
                up(G1, 0, false),
                true,
                Source { full: false },
            ),
            (
                "same, they know mine",
                up(G1, 0, false),
                up(G1, 0, true),
                true,
                Target,
            ),
            (
                "same, both, I win",
                up(G1, 0, true),
                up(G1, 0, true),
                true,
                Source { full: false },
            ),
            (
                "same, both, they win",
                up(G1, 0, true),
                up(G1, 0, true),
                false,
                Target,
            ),
            // One moved on while tracking changes for the other.
            (
                "I moved on from theirs",
                up(G2, G1, true),
                up(G1, 0, false),
                true,
                Source { full: false },
            ),
            (
                "they moved on from mine",
                up(G1, 0, false),
                up(G2, G1, true),
                true,
                Target,
            ),
            // Both moved on: neither descends from the other.
            (
                "both moved on",
                up(G2, G1, true),
                up(G3, G1, true),
                true,
                Diverged(String::new()),
            ),
            (
                "unrelated",
                up(G2, 0, false),
                up(G3, 0, false),
                true,
                Diverged(String::new()),
            ),
            // One side is not UpToDate.
            (
                "they are behind, tracked",
                up(G2, G1, true),
                behind(G1, 0, false),
                true,
                Source { full: false },
            ),
            (
                "they are behind, untracked",
                up(G2, 0, false),
                behind(G1, 0, false),
                true,
                Source { full: true },
            ),
            (
                "they are empty",
                up(G2, G1, false),
                behind(0, 0, false),
                true,
                Source { full: true },
            ),
            (
                "I am behind",
                behind(G1, 0, false),
                up(G2, 0, false),
                true,
                Target,
            ),
            (
                "neither",
                behind(G1, 0, false),
                behind(G1, 0, false),
                true,
                Neither,
            ),
        ];
        for (what, me, peer, me_first, want) in cases {
            let got = decide(me, peer, me_first);
            match (&got, &want) {
                (Diverged(_), Diverged(_)) => {}
                _ => assert_eq!(got, want, "{what}"),
            }
        }
    }

    #[test]
    fn both_sides_always_agree() {
        // For every pair of sides, one's decision mirrors the other's: never two
        // sources, never two targets, split brain seen by both.
        let gens = [0, G1, G2, G3];
        let mut sides = Vec::new();
        for up in [false, true] {
            for g in gens {
                for mark in gens {
                    for dirty in [false, true] {
                        sides.push(side(up, g, mark, dirty));
                    }
                }
            }
        }
        for a in &sides {
            for b in &sides {
                let (x, y) = (decide(*a, *b, true), decide(*b, *a, false));
                let agree = match (&x, &y) {
                    (InSync, InSync) | (Neither, Neither) => true,
                    (Source { .. }, Target) | (Target, Source { .. }) => true,
                    (Diverged(_), Diverged(_)) => true,
                    _ => false,
                };
                // Histories that cannot happen are left out: a side marking its own
                // current generation, or each side behind the other (generations
                // only move forward).
                let crossed = a.mark == b.generation
                    && b.mark == a.generation
                    && a.generation != b.generation;
                let coherent = a.mark != a.generation && b.mark != b.generation && !crossed;
                assert!(!coherent || agree, "{a:?} vs {b:?}: {x:?} / {y:?}");
            }
        }
    }
}
