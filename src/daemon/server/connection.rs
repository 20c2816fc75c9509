//! One client connection: the hello (within [`HELLO_TIMEOUT`]), then requests until the
//! client leaves. A malformed line gets an error reply and the connection stays open; a line
//! over [`MAX_MESSAGE`](crate::daemon::protocol::MAX_MESSAGE) bytes, or no hello in time,
//! closes it. While attached it also forwards events, and while a `wait` is pending it
//! answers once the wait is over.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LinesCodecError};

use super::HELLO_TIMEOUT;
use super::handlers::attach::{Next, Subscription};
use super::handlers::wait::Waiting;
use super::handlers::{self, Outcome};
use super::hub::Hub;
use crate::daemon::error::DaemonError;
use crate::daemon::protocol::{ClientMsg, Line, ServerCodec, ServerMsg, server_codec};

type Conn = Framed<UnixStream, ServerCodec>;

/// Sends one message; `false` when the client is gone.
async fn send(io: &mut Conn, msg: &ServerMsg) -> bool {
    match serde_json::to_string(msg) {
        Ok(line) => io.send(line).await.is_ok(),
        Err(_) => false,
    }
}

fn error(e: &DaemonError) -> ServerMsg {
    ServerMsg::Error {
        message: e.to_string(),
    }
}

/// What a line from a client is.
enum Incoming {
    Msg(Box<ClientMsg>),
    /// Malformed: reply this error and carry on.
    Bad(DaemonError),
    /// Close the connection after replying this (if anything).
    Close(Option<DaemonError>),
}

fn incoming(line: Option<Result<Line, LinesCodecError>>) -> Incoming {
    match line {
        None => Incoming::Close(None),
        Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
            Incoming::Close(Some(DaemonError::TooLong))
        }
        Some(Err(LinesCodecError::Io(_))) => Incoming::Close(None),
        Some(Ok(Line::NotUtf8)) => Incoming::Bad(DaemonError::NotUtf8),
        Some(Ok(Line::Text(line))) => match serde_json::from_str::<ClientMsg>(&line) {
            Ok(m) => Incoming::Msg(Box::new(m)),
            Err(e) => Incoming::Bad(DaemonError::BadMessage(e)),
        },
    }
}

/// The hello exchange; `false` when the connection is to be closed.
async fn greet(io: &mut Conn, hub: &Hub) -> bool {
    let first = match tokio::time::timeout(HELLO_TIMEOUT, io.next()).await {
        Ok(l) => incoming(l),
        Err(_) => Incoming::Close(Some(DaemonError::HelloTimeout)),
    };
    let reply = match first {
        Incoming::Msg(m) => handlers::hello::first(&m, hub),
        Incoming::Bad(e) => Err(e),
        Incoming::Close(None) => return false,
        Incoming::Close(Some(e)) => Err(e),
    };
    match reply {
        Ok(hello) => send(io, &hello).await,
        Err(e) => {
            let _ = send(io, &error(&e)).await;
            false
        }
    }
}

/// Serves one connection until the client leaves, breaks the protocol, or the daemon goes
/// away. Nothing a client sends reaches the sweep except through the handlers.
pub(super) async fn serve(stream: UnixStream, hub: Arc<Hub>) {
    let mut io = Framed::new(stream, server_codec());
    if !greet(&mut io, &hub).await {
        return;
    }
    let mut sub: Option<Subscription> = None;
    let mut waiting: Option<Waiting> = None;
    loop {
        tokio::select! {
            line = io.next() => {
                let reply = match incoming(line) {
                    Incoming::Close(e) => {
                        if let Some(e) = e {
                            let _ = send(&mut io, &error(&e)).await;
                        }
                        return;
                    }
                    Incoming::Bad(e) => error(&e),
                    Incoming::Msg(m) => match handlers::handle(*m, &hub).await {
                        Ok(Outcome::Reply(msg)) => msg,
                        Ok(Outcome::Attach(msg, s)) => {
                            sub = Some(s);
                            msg
                        }
                        Ok(Outcome::Wait(w)) => {
                            waiting = Some(w);
                            continue;
                        }
                        Err(e) => error(&e),
                    },
                };
                if !send(&mut io, &reply).await {
                    return;
                }
            }
            next = async { sub.as_mut().unwrap().next(&hub).await }, if sub.is_some() => {
                let msg = match next {
                    Next::Send(msg) => msg,
                    Next::Skip => continue,
                    Next::End => return,
                };
                if !send(&mut io, &msg).await {
                    return;
                }
            }
            alive = async { waiting.as_mut().unwrap().changed().await }, if waiting.is_some() => {
                if !alive {
                    return;
                }
                let Some(reply) = waiting.as_ref().and_then(|w| w.recheck(&hub)) else {
                    continue;
                };
                waiting = None;
                if !send(&mut io, &reply).await {
                    return;
                }
            }
        }
    }
}
