//! `wait`: reply [`ServerMsg::Done`] once a sweep (or every queued sweep) has ended. The
//! reply comes at once if it already has; otherwise the connection keeps a [`Waiting`] and
//! looks again each time the manager changes something.

use std::path::PathBuf;

use tokio::sync::watch;

use super::Outcome;
use crate::daemon::error::DaemonError;
use crate::daemon::protocol::ServerMsg;
use crate::daemon::server::hub::Hub;

/// A `wait` not answered yet.
pub(in crate::daemon::server) struct Waiting {
    sweep: Option<i64>,
    /// The database the sweep id was found in (kept, so that a later sweep with the same id
    /// from another database does not make the wait ambiguous).
    db: Option<PathBuf>,
    changed: watch::Receiver<u64>,
}

/// Replies [`ServerMsg::Done`] if the sweep(s) ended, else waits.
///
/// Errors: the sweep is not queued, or its id is queued from several databases and `db`
/// does not pick one.
pub(in crate::daemon::server) fn handle(
    hub: &Hub,
    sweep: Option<i64>,
    db: Option<PathBuf>,
) -> Result<Outcome, DaemonError> {
    Ok(match hub.wait_state(sweep, db.as_deref())? {
        (Some((complete, message)), _) => Outcome::Reply(ServerMsg::Done {
            sweep_id: sweep,
            complete,
            message,
        }),
        (None, resolved) => Outcome::Wait(Waiting {
            sweep,
            db: resolved.or(db),
            changed: hub.changed.subscribe(),
        }),
    })
}

impl Waiting {
    /// Waits for the manager's next change. `false`: the daemon is going away (close).
    /// Cancel-safe.
    pub(in crate::daemon::server) async fn changed(&mut self) -> bool {
        self.changed.changed().await.is_ok()
    }

    /// After a change: the reply if the wait is over (done, or an error), `None` to keep
    /// waiting.
    pub(in crate::daemon::server) fn recheck(&self, hub: &Hub) -> Option<ServerMsg> {
        match hub.wait_state(self.sweep, self.db.as_deref()) {
            Ok((None, _)) => None,
            Ok((Some((complete, message)), _)) => Some(ServerMsg::Done {
                sweep_id: self.sweep,
                complete,
                message,
            }),
            Err(e) => Some(ServerMsg::Error {
                message: e.to_string(),
            }),
        }
    }
}
