//! `status`: the daemon's [`StatusReport`](crate::daemon::protocol::StatusReport) (its
//! sweep, each device's run, the queue), answered from the hub without asking the manager.

use super::Outcome;
use crate::daemon::protocol::ServerMsg;
use crate::daemon::server::hub::Hub;

/// Replies [`ServerMsg::Status`].
pub(in crate::daemon::server) fn handle(hub: &Hub) -> Outcome {
    Outcome::Reply(ServerMsg::Status(Box::new(hub.status())))
}
