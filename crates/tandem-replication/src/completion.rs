//! A request waiting for the answers of several peers.

use std::sync::{Condvar, Mutex};

use tandem_api::NodeId;

use crate::wire::Buffer;

#[derive(Default)]
pub(crate) struct Outcome {
    /// Peers whose connection dropped before they answered.
    pub lost: Vec<NodeId>,
    /// Peers that answered with an errno.
    pub failed: Vec<(NodeId, u32)>,
    /// Data a peer answered a read with.
    pub data: Option<Buffer>,
}

pub(crate) struct Completion {
    state: Mutex<(usize, Outcome)>,
    done: Condvar,
}

impl Completion {
    pub fn new(waiting_for: usize) -> Completion {
        Completion {
            state: Mutex::new((waiting_for, Outcome::default())),
            done: Condvar::new(),
        }
    }

    fn settle(&self, record: impl FnOnce(&mut Outcome)) {
        let mut s = self.state.lock().unwrap();
        record(&mut s.1);
        s.0 -= 1;
        if s.0 == 0 {
            self.done.notify_all();
        }
    }

    pub fn answered(&self, peer: NodeId, status: u32, data: Option<Buffer>) {
        self.settle(|o| {
            if status != 0 {
                o.failed.push((peer, status));
            } else if data.is_some() {
                o.data = data;
            }
        });
    }

    pub fn lost(&self, peer: NodeId) {
        self.settle(|o| o.lost.push(peer));
    }

    /// Waits until every peer answered or was lost.
    pub fn wait(&self) -> Outcome {
        let s = self
            .done
            .wait_while(self.state.lock().unwrap(), |s| s.0 > 0)
            .unwrap();
        let mut s = s;
        std::mem::take(&mut s.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn waits_for_every_peer() {
        let c = Arc::new(Completion::new(2));
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.wait());
        c.answered(NodeId::new(1).unwrap(), 0, None);
        c.lost(NodeId::new(2).unwrap());
        let o = t.join().unwrap();
        assert_eq!(o.lost, [NodeId::new(2).unwrap()]);
        assert!(o.failed.is_empty());
    }
}
