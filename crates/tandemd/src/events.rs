//! Volume state changes as server-sent events: the replication engine reports each
//! change as it happens (see `tandem_replication::OnChange`); every subscriber gets the
//! changed volume's new status, once, and nothing when a report changed nothing it
//! sees. No stream polls.
//!
//! - `GET /v1/node/events`: every replicated volume of the node, as [`VolumeEvent`]s
//!   (event `volume`), starting with each one's current status.
//! - `GET /v1/node/volumes/{name}/events`: one volume's status (event `status`).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use tandem_api::{VolumeEvent, VolumeName, VolumeStatus};
use tandem_replication::OnChange;
use tokio::sync::broadcast;

use crate::node::Node;

/// Changes not yet taken by a slow subscriber, at most; one that falls further behind
/// is sent every volume's status afresh.
const BACKLOG: usize = 4096;

/// Subscribers are sent a comment this often, so a dead one is noticed and a live one
/// can tell a quiet stream from a dead node.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The node's change reports, fanned out to every subscriber.
pub struct Events {
    /// None once closed: every stream then ends.
    tx: Mutex<Option<broadcast::Sender<VolumeName>>>,
}

impl Events {
    pub fn new() -> Arc<Events> {
        Arc::new(Events {
            tx: Mutex::new(Some(broadcast::channel(BACKLOG).0)),
        })
    }

    fn sender(&self) -> MutexGuard<'_, Option<broadcast::Sender<VolumeName>>> {
        self.tx.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the replication engine calls on each change: never blocks.
    pub fn on_change(self: &Arc<Self>) -> OnChange {
        let events = self.clone();
        Arc::new(move |name: &VolumeName| {
            if let Some(tx) = &*events.sender() {
                // No subscriber: nobody to tell.
                let _ = tx.send(name.clone());
            }
        })
    }

    /// Ends every stream (the node is shutting down: a stream would otherwise keep
    /// its connection, and the API server, open for ever).
    pub fn close(&self) {
        self.sender().take();
    }

    /// A new subscription; one that ends at once when the node is shutting down.
    fn subscribe(&self) -> broadcast::Receiver<VolumeName> {
        match &*self.sender() {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }
}

/// The status changes of the volumes `only` names (all when `None`): each volume's
/// current status first, then its status after each change that altered it; `None`
/// once a volume is gone.
fn changes(
    node: Arc<Node>,
    only: Option<VolumeName>,
) -> impl Stream<Item = (VolumeName, Option<VolumeStatus>)> {
    struct Follow {
        node: Arc<Node>,
        only: Option<VolumeName>,
        rx: broadcast::Receiver<VolumeName>,
        /// What each subscriber was last sent, by volume.
        sent: BTreeMap<VolumeName, VolumeStatus>,
        due: VecDeque<VolumeName>,
    }
    impl Follow {
        /// Every volume followed, to be sent afresh.
        fn all(&self) -> VecDeque<VolumeName> {
            match &self.only {
                Some(name) => VecDeque::from([name.clone()]),
                None => self.node.replicated_names().into(),
            }
        }
    }
    let mut follow = Follow {
        rx: node.events().subscribe(),
        node,
        only,
        sent: BTreeMap::new(),
        due: VecDeque::new(),
    };
    follow.due = follow.all();
    futures_util::stream::unfold(follow, |mut f| async move {
        loop {
            let Some(name) = f.due.pop_front() else {
                match f.rx.recv().await {
                    Ok(name) if f.only.as_ref().is_none_or(|o| *o == name) => f.due.push_back(name),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        f.due = f.all();
                        // Volumes gone meanwhile are reported gone too.
                        f.due.extend(f.sent.keys().cloned());
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
                continue;
            };
            let status = f.node.status(&name).ok();
            let changed = match &status {
                Some(s) => f.sent.insert(name.clone(), s.clone()).as_ref() != Some(s),
                None => f.sent.remove(&name).is_some(),
            };
            if changed {
                return Some(((name, status), f));
            }
        }
    })
}

/// The response that streams `events`, with keep-alive comments.
fn respond(events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// `GET /v1/node/events`.
pub fn all(node: Arc<Node>) -> Response {
    let stream = futures_util::StreamExt::map(changes(node, None), |(volume, status)| {
        let event = VolumeEvent { volume, status };
        Ok(Event::default()
            .event("volume")
            .data(serde_json::to_string(&event).expect("serialisable")))
    });
    respond(stream)
}

/// `GET /v1/node/volumes/{name}/events`: ends when the volume is gone.
pub fn one(node: Arc<Node>, name: VolumeName) -> Response {
    use futures_util::StreamExt;
    let stream = changes(node, Some(name))
        .take_while(|(_, status)| std::future::ready(status.is_some()))
        .filter_map(|(_, status)| {
            std::future::ready(status.map(|s| {
                Ok(Event::default()
                    .event("status")
                    .data(serde_json::to_string(&s).expect("serialisable")))
            }))
        });
    respond(stream)
}
