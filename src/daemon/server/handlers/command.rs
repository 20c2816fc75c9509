//! `command`: an orchestrator [`Command`] for the running sweep (`lorascope queue ...`),
//! applied by the manager; the reply waits until the sweep's queue has applied or rejected
//! it.

use super::{Outcome, ask};
use crate::daemon::error::DaemonError;
use crate::daemon::protocol::ServerMsg;
use crate::daemon::server::hub::Hub;
use crate::daemon::server::manager::Ctl;
use crate::orchestrator::Command;

/// Replies [`ServerMsg::Ok`] (`done`) once applied.
///
/// Errors: the queue's reason ([`DaemonError::Queue`]), no sweep running, `Shutdown` (use
/// `daemon stop`), or as [`ask`].
pub(in crate::daemon::server) async fn handle(
    hub: &Hub,
    command: Command,
) -> Result<Outcome, DaemonError> {
    ask(hub, |tx| Ctl::Command(command, tx)).await??;
    Ok(Outcome::Reply(ServerMsg::Ok {
        message: "done".into(),
    }))
}
