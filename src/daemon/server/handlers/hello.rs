//! `hello`: the first message of every connection. The daemon answers with its own hello
//! (protocol version, pid, clock) or, for another protocol version or any other first
//! message, with an error, and closes the connection.

use crate::daemon::error::DaemonError;
use crate::daemon::protocol::{ClientMsg, PROTOCOL_VERSION, ServerMsg};
use crate::daemon::server::hub::Hub;

/// The reply to the first message: [`ServerMsg::Hello`] to go on.
///
/// Errors (send it, then close): [`DaemonError::VersionMismatch`] or
/// [`DaemonError::HelloExpected`].
pub(in crate::daemon::server) fn first(
    msg: &ClientMsg,
    hub: &Hub,
) -> Result<ServerMsg, DaemonError> {
    match msg {
        ClientMsg::Hello { version } if *version == PROTOCOL_VERSION => Ok(ServerMsg::Hello {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            now: hub.now(),
        }),
        ClientMsg::Hello { version } => Err(DaemonError::VersionMismatch { version: *version }),
        _ => Err(DaemonError::HelloExpected),
    }
}

/// A hello after the first: refused, the connection stays open.
pub(in crate::daemon::server) fn again() -> DaemonError {
    DaemonError::HelloAgain
}
