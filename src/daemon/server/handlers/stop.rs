//! `stop`: stop the daemon (`lorascope daemon stop`): the running runs are interrupted and
//! re-queued for the next start, or with `finish` nothing new starts and the daemon exits
//! once they have finished. The daemon closes every connection as it exits.

use super::{Outcome, ask};
use crate::daemon::error::DaemonError;
use crate::daemon::protocol::ServerMsg;
use crate::daemon::server::hub::Hub;
use crate::daemon::server::manager::Ctl;

/// Replies [`ServerMsg::Ok`] saying what will happen.
///
/// Errors: as [`ask`].
pub(in crate::daemon::server) async fn handle(
    hub: &Hub,
    finish: bool,
) -> Result<Outcome, DaemonError> {
    let message = ask(hub, |tx| Ctl::Stop(finish, tx)).await?;
    Ok(Outcome::Reply(ServerMsg::Ok { message }))
}
