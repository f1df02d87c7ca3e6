//! Following each node's event stream (`GET /v1/node/events`), so that what the
//! controller shows (`tandem health`, volume states) and what it checks (is a volume
//! still open before a detach or delete?) follows a node's changes as they happen,
//! not at its next visit. The periodic visit stays: it is what admits the node, applies
//! specs and catches anything a lost stream missed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tandem_api::{NodeName, VolumeEvent};

use crate::controller::Controller;

/// A stream silent this long (the node sends a keep-alive every 5 s) is taken for dead.
const SILENCE: Duration = Duration::from_secs(15);
/// A stream that failed is opened again after this.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Reads server-sent events line by line: `event:` and `data:` fields, comments (`:`)
/// skipped, an event complete at a blank line.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    event: String,
    data: String,
}

impl SseParser {
    /// Takes one line (without its end); the event's kind and data when it completes
    /// one.
    pub fn line(&mut self, line: &str) -> Option<(String, String)> {
        if line.is_empty() {
            let event = std::mem::take(&mut self.event);
            let data = std::mem::take(&mut self.data);
            return (!data.is_empty()).then(|| {
                let kind = if event.is_empty() {
                    "message".into()
                } else {
                    event
                };
                (kind, data)
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
            }
            _ => {}
        }
        None
    }
}

impl Controller {
    /// Starts following `node`'s events until `stop` is set.
    pub(crate) fn follow(self: &Arc<Self>, node: NodeName, stop: Arc<AtomicBool>) {
        let controller = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name(format!("follow-{node}"))
            .spawn(move || follow(&controller, &node, &stop));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a thread following a node's events");
        }
    }

    /// Applies one event of `node` to what the node last reported.
    fn observe_event(&self, node: &NodeName, event: VolumeEvent) {
        self.set_observed(node, |o| {
            // The visits decide which volumes a node holds for this cluster; an event
            // only brings a known one's status up to date.
            if !o.online() {
                return;
            }
            match event.status {
                Some(status) => {
                    if let Some(r) = o.replicas.get_mut(&event.volume) {
                        r.status = status;
                        o.events += 1;
                    }
                }
                None => {
                    if o.replicas.remove(&event.volume).is_some() {
                        o.events += 1;
                    }
                }
            }
        });
    }
}

fn follow(controller: &Weak<Controller>, node: &NodeName, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let Some(client) = controller.upgrade().and_then(|c| c.client(node)) else {
            return;
        };
        let result = client.follow(SILENCE, |event| {
            match controller.upgrade() {
                Some(c) if !stop.load(Ordering::Relaxed) => c.observe_event(node, event),
                _ => return false,
            }
            true
        });
        if let Err(e) = result {
            tracing::debug!(%node, error = %e, "event stream of the node ended");
        }
        // Whatever ended the stream (the node went away, say), a visit tells now.
        if let Some(c) = controller.upgrade() {
            c.wake_reconcilers();
        }
        std::thread::sleep(RETRY_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_make_events() {
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for line in [
            ": keep-alive",
            "",
            "event: volume",
            "data: {\"a\":",
            "data: 1}",
            "",
            "data:plain",
            "",
            "event: empty",
            "",
            "retry: 10",
        ] {
            got.extend(p.line(line));
        }
        assert_eq!(
            got,
            [
                ("volume".to_owned(), "{\"a\":\n1}".to_owned()),
                ("message".to_owned(), "plain".to_owned())
            ]
        );
    }
}
