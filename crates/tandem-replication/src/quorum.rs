//! Quorum: whether this node may accept writes, and what a write does without it.
//! Votes are those of the diskful participants and tiebreakers; this node's own, and
//! each peer's while it is connected and heard from (see `VOTE_FRESH`).

use tandem_api::{OnNoQuorum, QuorumPolicy};

/// Voting participants reachable from here, and how many vote in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Votes {
    pub have: usize,
    pub total: usize,
}

impl Votes {
    /// A strict majority: two partitions can never both have one.
    pub fn majority(self) -> bool {
        2 * self.have > self.total
    }
}

/// Whether writes may proceed under `policy` with `votes`.
pub(crate) fn holds(policy: QuorumPolicy, votes: Votes) -> bool {
    policy == QuorumPolicy::Off || votes.majority()
}

/// What a write may do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admit {
    Go,
    /// Fail it (on-no-quorum io-error), saying why.
    Fail(Votes),
    /// Hold it until quorum returns (on-no-quorum suspend-io).
    Wait,
    /// This node's replica is not whole (it was found behind while the volume was
    /// open here, or while a write waited for quorum): the others moved on, so it
    /// takes no write.
    Outdated,
    /// Quorum holds, but not yet among the voters that confirmed this node's current
    /// data generation (it just started one): hold the write for their answer, under
    /// either policy. Acknowledging it first would let a replica that missed it be
    /// promoted by voters that never heard of the newer generation.
    Confirming,
}

/// The decision for a write: `votes` reachable, of which `agreeing` confirmed this
/// node's generation; `behind` when this node's replica is not UpToDate (a diskless
/// node never is behind).
pub(crate) fn admit(
    policy: QuorumPolicy,
    on_no_quorum: OnNoQuorum,
    votes: Votes,
    agreeing: Votes,
    behind: bool,
) -> Admit {
    if holds(policy, votes) {
        // A Primary whose own replica is not whole (it was found behind while open)
        // writes nothing: its changes would land on its peers outside any generation.
        return if behind {
            Admit::Outdated
        } else if !holds(policy, agreeing) {
            Admit::Confirming
        } else {
            Admit::Go
        };
    }
    match on_no_quorum {
        OnNoQuorum::IoError => Admit::Fail(votes),
        OnNoQuorum::SuspendIo => Admit::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn votes(have: usize, total: usize) -> Votes {
        Votes { have, total }
    }

    #[test]
    fn quorum_is_a_strict_majority_of_the_voters() {
        // (reachable, voters, quorum)
        for (have, total, want) in [
            (1, 1, true),
            (1, 2, false),
            (2, 2, true),
            (1, 3, false),
            (2, 3, true),
            (2, 4, false),
            (3, 4, true),
            (3, 5, true),
        ] {
            assert_eq!(votes(have, total).majority(), want, "{have} of {total}");
        }
    }

    #[test]
    fn writes_go_fail_or_wait_by_quorum_and_policy() {
        use Admit::*;
        use OnNoQuorum::{IoError, SuspendIo};
        use QuorumPolicy::{Majority, Off};
        let v = |have| votes(have, 3);
        // (policy, on no quorum, votes, agreeing, behind, decision)
        let cases = [
            // Quorum kept, lost and regained.
            (Majority, IoError, v(2), v(2), false, Go),
            (Majority, IoError, v(1), v(1), false, Fail(v(1))),
            (Majority, SuspendIo, v(1), v(1), false, Wait),
            (Majority, SuspendIo, v(2), v(2), false, Go),
            // Back, but left behind meanwhile.
            (Majority, SuspendIo, v(2), v(2), true, Outdated),
            // Behind without having waited: refused all the same.
            (Majority, IoError, v(2), v(2), true, Outdated),
            // A new generation not yet confirmed by a majority: held, whatever the
            // policy; without quorum at all the policy decides.
            (Majority, IoError, v(2), v(1), false, Confirming),
            (Majority, SuspendIo, v(3), v(1), false, Confirming),
            (Majority, IoError, v(1), v(1), false, Fail(v(1))),
            // Quorum off: always.
            (Off, IoError, v(1), v(1), false, Go),
        ];
        for (policy, on_no, have, agreeing, behind, want) in cases {
            assert_eq!(
                admit(policy, on_no, have, agreeing, behind),
                want,
                "{policy:?} {on_no:?} {have:?} agreeing {agreeing:?} behind={behind}"
            );
        }
    }
}
