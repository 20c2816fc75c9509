//! `submit`: queue a sweep (`lorascope run PROFILE --detach`). The manager loads and
//! checks the profile, opens the results database and creates (or, with `resume`, finds)
//! the sweep.

use super::{Outcome, ask};
use crate::daemon::error::DaemonError;
use crate::daemon::protocol::{ServerMsg, Submit};
use crate::daemon::server::hub::Hub;
use crate::daemon::server::manager::Ctl;

/// Replies [`ServerMsg::Submitted`] with the sweep id and its place in the queue.
///
/// Errors: the profile, its preflight checks or the database fail, the sweep is already
/// queued, or as [`ask`].
pub(in crate::daemon::server) async fn handle(
    hub: &Hub,
    submit: Box<Submit>,
) -> Result<Outcome, DaemonError> {
    let (sweep_id, position) = ask(hub, |tx| Ctl::Submit(submit, tx)).await??;
    Ok(Outcome::Reply(ServerMsg::Submitted { sweep_id, position }))
}
