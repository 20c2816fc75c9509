//! `attach`: the state to rebuild a dashboard from ([`ServerMsg::Attached`]: the sweep and
//! its compacted events), then every event as it happens. A client that falls behind, and
//! every client when the daemon starts another sweep, gets a fresh replay instead.

use tokio::sync::broadcast;

use super::Outcome;
use crate::daemon::protocol::ServerMsg;
use crate::daemon::server::hub::{Bcast, Hub};

/// An attached connection's event feed.
pub(in crate::daemon::server) struct Subscription {
    rx: broadcast::Receiver<(u64, Bcast)>,
    /// The sequence number of the last broadcast the client has (in a replay or an event).
    last: u64,
}

/// What the feed gives next.
pub(in crate::daemon::server) enum Next {
    /// Send this.
    Send(ServerMsg),
    /// Nothing: an event the replay already had.
    Skip,
    /// The daemon is going away: close the connection.
    End,
}

/// Replies the replay and subscribes the connection to what follows it.
pub(in crate::daemon::server) fn handle(hub: &Hub) -> Outcome {
    let (msg, rx, last) = hub.attach();
    Outcome::Attach(msg, Subscription { rx, last })
}

impl Subscription {
    /// Waits for the next broadcast and turns it into what to send. Cancel-safe (only the
    /// broadcast receive awaits).
    pub(in crate::daemon::server) async fn next(&mut self, hub: &Hub) -> Next {
        match self.rx.recv().await {
            Ok((seq, Bcast::Event(s))) => {
                if seq <= self.last {
                    return Next::Skip;
                }
                self.last = seq;
                Next::Send(ServerMsg::Event(s))
            }
            // A new sweep, or this client fell behind: start it over from a replay.
            Ok((_, Bcast::NewSweep)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                let (msg, seq) = {
                    let sh = hub.lock();
                    (hub.attached_msg(&sh), sh.seq)
                };
                self.last = seq;
                Next::Send(msg)
            }
            Err(broadcast::error::RecvError::Closed) => Next::End,
        }
    }
}
