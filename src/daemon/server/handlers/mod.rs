//! One handler per client message type. A handler takes the message's fields and the
//! [`Hub`] and says what the connection does next ([`Outcome`]); a refusal is a
//! [`DaemonError`], which the connection sends as [`ServerMsg::Error`] (the connection stays
//! open). Handlers that change something ask the manager through [`ask`].

pub(super) mod attach;
pub(super) mod command;
pub(super) mod hello;
pub(super) mod status;
pub(super) mod stop;
pub(super) mod submit;
pub(super) mod wait;

use tokio::sync::oneshot;

use super::hub::Hub;
use super::manager::Ctl;
use crate::daemon::error::DaemonError;
use crate::daemon::protocol::{ClientMsg, ServerMsg};

/// What the connection does after a request.
pub(super) enum Outcome {
    /// Send this reply.
    Reply(ServerMsg),
    /// Send this reply (the replay), then forward every event of the subscription.
    Attach(ServerMsg, attach::Subscription),
    /// Reply later, once [`wait::Waiting`] is over.
    Wait(wait::Waiting),
}

/// Dispatches a message (after the hello) to its handler.
pub(super) async fn handle(msg: ClientMsg, hub: &Hub) -> Result<Outcome, DaemonError> {
    match msg {
        ClientMsg::Hello { .. } => Err(hello::again()),
        ClientMsg::Status => Ok(status::handle(hub)),
        ClientMsg::Attach => Ok(attach::handle(hub)),
        ClientMsg::Command { command } => command::handle(hub, command).await,
        ClientMsg::Submit(s) => submit::handle(hub, s).await,
        ClientMsg::Wait { sweep, db } => wait::handle(hub, sweep, db),
        ClientMsg::Stop { finish } => stop::handle(hub, finish).await,
    }
}

/// Sends a request to the manager and waits for its reply.
///
/// Errors: [`DaemonError::Stopping`] when the manager no longer takes requests,
/// [`DaemonError::NotApplied`] when it dropped the request unanswered (the sweep ended, or
/// the daemon is stopping, before the request was taken).
pub(super) async fn ask<T>(
    hub: &Hub,
    request: impl FnOnce(oneshot::Sender<T>) -> Ctl,
) -> Result<T, DaemonError> {
    let (tx, rx) = oneshot::channel();
    hub.ctl
        .send(request(tx))
        .map_err(|_| DaemonError::Stopping)?;
    rx.await.map_err(|_| DaemonError::NotApplied)
}
