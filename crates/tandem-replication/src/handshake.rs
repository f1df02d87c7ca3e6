//! The handshake decision: what a new connection between two replicas that hold data
//! must do first, from what each side says about itself. DRBD's rule, by generation
//! identifiers, never by guesswork: equal generations are in sync unless either side
//! knows of writes the other missed (its bitmap or activity log); a side whose
//! generation is the one the other recorded when it started tracking changes for it is
//! behind by exactly what that bitmap marks; a side whose generation is among the
//! other's earlier ones is behind by more than a bitmap can tell, and resynced in
//! full; anything else between two UpToDate replicas is split brain.

use tandem_api::DiskState;

use crate::wire::History;

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
    /// Its earlier generations (0: none).
    pub history: History,
    /// Its data is a resync in progress (Inconsistent), or its disk failed: what it
    /// lacks is known only to its source, or everything, so another one sends
    /// everything.
    pub partial: bool,
    /// The newest of its generations that holds every acknowledged write of its line:
    /// its current one, or an earlier one if it started one no majority confirmed
    /// (no write was acknowledged in that one).
    pub confirmed: u64,
    /// It is Primary, and its replica is never resynced under its clients (nor does
    /// it take resync pieces, which would share the connection with its writes).
    pub serving: bool,
}

impl Side {
    /// A replica as its state says. One whose disk failed holds nothing worth keeping:
    /// whoever resyncs it sends everything, and it is placed by the generations it
    /// followed since (a Primary's, which it repeats), not by the data it held.
    pub fn replica(
        disk: DiskState,
        generation: u64,
        mark: u64,
        dirty: bool,
        history: History,
        confirmed: u64,
        serving: bool,
    ) -> Side {
        let failed = disk == DiskState::Failed;
        Side {
            up_to_date: disk == DiskState::UpToDate,
            generation,
            mark,
            dirty,
            history,
            partial: failed || disk == DiskState::Inconsistent,
            confirmed: if failed { generation } else { confirmed },
            serving,
        }
    }

    /// Whether `generation` is one this side moved on from.
    pub fn moved_on_from(&self, generation: u64) -> bool {
        generation != 0 && self.history.contains(&generation)
    }

    /// Whether all it changed since its line and `other`'s parted is unconfirmed: its
    /// confirmed generation is `other`'s, or one `other` moved on from.
    fn unconfirmed_after(&self, other: Side) -> bool {
        self.confirmed != self.generation
            && (self.confirmed == other.generation || other.moved_on_from(self.confirmed))
    }

    /// Its generations, newest first.
    fn line(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.generation).chain(self.history)
    }

    /// Whether its confirmed generation descends from `ancestor`: this side holds
    /// acknowledged writes made after `ancestor`.
    fn confirmed_after(&self, ancestor: u64) -> bool {
        let at = |g: u64| self.line().position(|x| x == g && g != 0);
        matches!((at(self.confirmed), at(ancestor)), (Some(c), Some(a)) if a > c)
    }
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
    /// This side is UpToDate, but the other, not whole, moved on from this side's
    /// generation: this side was left behind and is Outdated; nothing to send.
    Behind,
    /// Neither replica descends from the other: split brain, or unrelated data.
    Diverged(String),
}

/// Whether `other`, not whole, may take `whole`'s data: it holds no acknowledged
/// write of its own (generation 0), or its confirmed generation is one `whole` had
/// (it fell behind on the same line, perhaps starting a generation no majority
/// confirmed). A replica holding acknowledged writes of a newer line (it followed a
/// Primary `whole` never saw) must not be overwritten by older data.
fn on_line(whole: Side, other: Side) -> bool {
    let line = other.confirmed;
    other.generation == 0
        || line == 0
        || line == whole.generation
        || (whole.mark != 0 && line == whole.mark)
        || whole.moved_on_from(line)
}

/// The decision for `me`, facing `peer`; `me_first` breaks the one tie (both missed
/// writes of the other): the lower node id. A serving Primary that would be resynced
/// is Outdated instead (its writes fail, its reads go to whole peers) until it is
/// closed and connects afresh; its peer then sends nothing.
pub(crate) fn decide(me: Side, peer: Side, me_first: bool) -> Direction {
    match by_data(me, peer, me_first) {
        Direction::Target | Direction::Behind if me.serving => Direction::Behind,
        Direction::Source { .. } if peer.serving => Direction::Neither,
        direction => direction,
    }
}

/// The decision by the data alone (see [`decide`]).
fn by_data(me: Side, peer: Side, me_first: bool) -> Direction {
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
        (true, true) if me.moved_on_from(peer.generation) => Direction::Source { full: true },
        (true, true) if peer.moved_on_from(me.generation) => Direction::Target,
        // Changes no majority confirmed hold no acknowledged write: the side that
        // has only those yields (both: the lower node id keeps its own).
        (true, true) => match (me.unconfirmed_after(peer), peer.unconfirmed_after(me)) {
            (true, false) => Direction::Target,
            (false, true) => Direction::Source { full: true },
            (true, true) if me_first => Direction::Source { full: true },
            (true, true) => Direction::Target,
            (false, false) => Direction::Diverged(format!(
                "split brain: both replicas changed since they last agreed (generation {:016x} here, {:016x} on the peer)",
                me.generation, peer.generation
            )),
        },
        (true, false) if on_line(me, peer) => Direction::Source {
            full: peer.partial || !(me.mark != 0 && peer.generation == me.mark),
        },
        (true, false) if peer.confirmed_after(me.generation) => Direction::Behind,
        (false, true) if on_line(peer, me) => Direction::Target,
        (false, true) if me.confirmed_after(peer.generation) => Direction::Neither,
        (true, false) | (false, true) => Direction::Diverged(format!(
            "unrelated data: generation {:016x} here, {:016x} on the peer, neither descends from the other",
            me.generation, peer.generation
        )),
        // Each waits for an UpToDate replica; whichever becomes one first reconnects
        // to resync the other.
        (false, false) => Direction::Neither,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::history;
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
            history: history(&[]),
            partial: false,
            confirmed: generation,
            serving: false,
        }
    }

    /// An UpToDate side that moved on from `earlier`.
    fn after(generation: u64, earlier: u64) -> Side {
        Side {
            history: history(&[earlier]),
            ..side(true, generation, 0, false)
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
            // One moved on from the other's generation without a bitmap for it.
            (
                "I moved on from theirs, untracked",
                after(G2, G1),
                up(G1, 0, false),
                true,
                Source { full: true },
            ),
            (
                "they moved on from mine, untracked",
                up(G1, 0, false),
                after(G2, G1),
                true,
                Target,
            ),
            (
                "both moved on from the same",
                after(G2, G1),
                after(G3, G1),
                true,
                Diverged(String::new()),
            ),
            (
                "both moved on, they without a confirmed change",
                after(G2, G1),
                Side {
                    confirmed: G1,
                    ..after(G3, G1)
                },
                true,
                Source { full: true },
            ),
            (
                "both moved on, I without a confirmed change",
                Side {
                    confirmed: G1,
                    ..after(G2, G1)
                },
                after(G3, G1),
                true,
                Target,
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
                after(G2, G1),
                behind(G1, 0, false),
                true,
                Source { full: true },
            ),
            (
                "they followed a line I never saw",
                up(G1, 0, false),
                Side {
                    history: history(&[G1]),
                    ..behind(G2, 0, false)
                },
                true,
                Behind,
            ),
            (
                "I followed a line they never saw",
                Side {
                    history: history(&[G1]),
                    ..behind(G2, 0, false)
                },
                up(G1, 0, false),
                true,
                Neither,
            ),
            (
                "not whole, on an unrelated line",
                up(G2, 0, false),
                behind(G3, 0, false),
                true,
                Diverged(String::new()),
            ),
            (
                "they are being resynced, even by the bitmap's generation",
                up(G2, G1, true),
                Side {
                    partial: true,
                    ..behind(G1, 0, false)
                },
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
                after(G2, G1),
                true,
                Target,
            ),
            (
                "I serve clients, they hold newer data",
                Side {
                    serving: true,
                    ..up(G1, 0, false)
                },
                after(G2, G1),
                true,
                Behind,
            ),
            (
                "they serve clients, I hold newer data",
                after(G2, G1),
                Side {
                    serving: true,
                    ..up(G1, 0, false)
                },
                true,
                Neither,
            ),
            (
                "I hold nothing",
                behind(0, 0, false),
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
                        for earlier in gens.into_iter().filter(|e| *e != g) {
                            for confirmed in [g, earlier] {
                                for serving in [false, up] {
                                    sides.push(Side {
                                        history: history(&[earlier]),
                                        partial: !up && dirty,
                                        confirmed,
                                        serving,
                                        ..side(up, g, mark, dirty)
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        for a in &sides {
            for b in &sides {
                let (x, y) = (decide(*a, *b, true), decide(*b, *a, false));
                let agree = matches!(
                    (&x, &y),
                    (InSync, InSync)
                        | (Neither, Neither)
                        | (Behind, Neither)
                        | (Neither, Behind)
                        | (Source { .. }, Target)
                        | (Target, Source { .. })
                        | (Diverged(_), Diverged(_))
                );
                // Histories that cannot happen are left out: a side marking its own
                // current generation, or each side behind the other (generations
                // only move forward).
                let behind = |x: &Side, y: &Side| {
                    x.generation != y.generation
                        && (x.mark == y.generation
                            || x.moved_on_from(y.generation)
                            || x.moved_on_from(y.confirmed))
                };
                let crossed = behind(a, b) && behind(b, a);
                let coherent = a.mark != a.generation && b.mark != b.generation && !crossed;
                assert!(!coherent || agree, "{a:?} vs {b:?}: {x:?} / {y:?}");
            }
        }
    }
}
