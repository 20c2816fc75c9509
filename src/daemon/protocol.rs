//! The daemon's wire protocol: newline-delimited JSON over a Unix socket, one message per
//! line, at most [`MAX_MESSAGE`] bytes.
//!
//! A client first sends [`ClientMsg::Hello`] with [`PROTOCOL_VERSION`]; the daemon answers
//! [`ServerMsg::Hello`] (or [`ServerMsg::Error`] and closes when the versions differ). Then the
//! client sends requests and reads replies. The orchestrator's own [`Command`] and [`Event`]
//! enums travel unchanged inside [`ClientMsg::Command`] and [`ServerMsg::Event`]:
//!
//! ```text
//! > {"type":"hello","version":1}
//! < {"type":"hello","version":1,"pid":4242,"now":12.5}
//! > {"type":"command","command":{"cmd":"move","id":"3f2a9c01b2d4","to":"top"}}
//! < {"type":"ok","message":"done"}
//! > {"type":"attach"}
//! < {"type":"attached","now":12.6,"sweep":{...},"replay":[...]}
//! < {"type":"event","t":13.0,"event":{"event":"step",...}}
//! ```
//!
//! A malformed line (not JSON, not a message, or not UTF-8) gets an [`ServerMsg::Error`]
//! reply and the connection stays open (before hello: the reply, then the connection is
//! closed); a line longer than [`MAX_MESSAGE`] gets an error reply and the connection is
//! closed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio_util::bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder, LinesCodec, LinesCodecError};

use crate::orchestrator::{Command, EntryId, Event, QueueSnapshot};
use crate::telemetry::TelemetrySample;

/// The protocol version; [`ClientMsg::Hello`] must carry this one.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest message line accepted (bytes, newline excluded): 1 MiB.
pub const MAX_MESSAGE: usize = 1 << 20;

/// The longest line a client accepts from the daemon (bytes): an attach replay of a long
/// sweep is big, so 256 MiB.
pub const MAX_REPLY: usize = 256 << 20;

/// A line a client sent: text, or bytes that are not UTF-8 (consumed whole, so the
/// connection can carry on after the error reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A UTF-8 line (newline and a trailing `\r` removed).
    Text(String),
    /// A line that is not UTF-8.
    NotUtf8,
}

/// The daemon side's codec: [`LinesCodec`] with at most [`MAX_MESSAGE`] bytes a line, except
/// that a line that is not UTF-8 decodes to [`Line::NotUtf8`] instead of ending the stream.
#[derive(Debug, Clone)]
pub struct ServerCodec(LinesCodec);

impl ServerCodec {
    /// Maps the lines codec's "not UTF-8" error (`InvalidData`, raised after the line was
    /// consumed) to [`Line::NotUtf8`].
    fn map(r: Result<Option<String>, LinesCodecError>) -> Result<Option<Line>, LinesCodecError> {
        match r {
            Ok(l) => Ok(l.map(Line::Text)),
            Err(LinesCodecError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                Ok(Some(Line::NotUtf8))
            }
            Err(e) => Err(e),
        }
    }
}

impl Decoder for ServerCodec {
    type Item = Line;
    type Error = LinesCodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, LinesCodecError> {
        Self::map(self.0.decode(buf))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, LinesCodecError> {
        Self::map(self.0.decode_eof(buf))
    }
}

impl<T: AsRef<str>> Encoder<T> for ServerCodec {
    type Error = LinesCodecError;

    fn encode(&mut self, line: T, buf: &mut BytesMut) -> Result<(), LinesCodecError> {
        self.0.encode(line, buf)
    }
}

/// The line codec of the daemon side.
pub fn server_codec() -> ServerCodec {
    ServerCodec(LinesCodec::new_with_max_length(MAX_MESSAGE))
}

/// The line codec of the client side.
pub fn client_codec() -> LinesCodec {
    LinesCodec::new_with_max_length(MAX_REPLY)
}

/// A sweep to queue on the daemon (`lorascope run PROFILE --detach`). Paths are absolute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submit {
    /// The profile file; `None` runs the embedded quick-start profile.
    pub profile: Option<PathBuf>,
    /// The results database.
    pub db: PathBuf,
    /// Continue this profile's latest sweep in `db` instead of starting a new one.
    pub resume: bool,
    /// With `resume`, also re-run failed and cancelled points.
    pub retry_failed: bool,
}

/// Messages from a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// First message of every connection.
    Hello { version: u32 },
    /// One [`ServerMsg::Status`] reply.
    Status,
    /// A [`ServerMsg::Attached`] reply, then every [`ServerMsg::Event`] until the client
    /// leaves. Commands may still be sent on the same connection.
    Attach,
    /// An orchestrator command for the running sweep; [`ServerMsg::Ok`] or
    /// [`ServerMsg::Error`] with the queue's reason.
    Command { command: Command },
    /// Queue a sweep; [`ServerMsg::Submitted`].
    Submit(Box<Submit>),
    /// Reply [`ServerMsg::Done`] once sweep `sweep` (or, with `None`, every queued sweep) has
    /// finished. Sweep ids are per results database: `db` (absolute) picks one when the id is
    /// queued from several (absent in messages from older clients).
    Wait {
        sweep: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        db: Option<PathBuf>,
    },
    /// Stop the daemon: interrupt the running runs (re-run at the next start), or with
    /// `finish`, start nothing new and exit once the running runs have finished.
    Stop { finish: bool },
}

/// An orchestrator event stamped with the daemon clock (seconds since the daemon started).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamped {
    pub t: f64,
    pub event: Event,
}

/// What a client needs to show a sweep: its profile (to expand the same grid) and where its
/// results go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepInfo {
    pub sweep_id: i64,
    pub name: String,
    pub profile_path: String,
    /// The profile's TOML as submitted.
    pub profile_source: String,
    /// Directory that relative data paths of the profile resolve against.
    pub base_dir: PathBuf,
    pub db: PathBuf,
}

/// A run in flight, as `lorascope status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningStatus {
    pub id: EntryId,
    pub label: String,
    pub device: String,
    pub attempt: u32,
    /// Last step reported (0 before the first).
    pub step: u64,
    /// Steps per run.
    pub steps: u32,
    /// Seconds since it started.
    pub elapsed_s: f64,
    /// The latest telemetry sample (per GPU for CUDA runs).
    pub telemetry: Option<TelemetrySample>,
}

/// The sweep the daemon is running (or ran last).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepStatus {
    pub info: SweepInfo,
    /// Whether it has ended (finished, or stopped with the daemon).
    pub ended: bool,
    pub queue: Option<QueueSnapshot>,
    pub running: Vec<RunningStatus>,
    /// Entries per state: `queued`, `running`, and each final status.
    pub counts: BTreeMap<String, usize>,
}

/// `lorascope status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: u32,
    pub pid: u32,
    pub socket: PathBuf,
    pub uptime_s: f64,
    /// A stop was asked for (`finish`: waiting for the running runs).
    pub stopping: Option<String>,
    /// Queue paused (also for sweeps that start later).
    pub paused: bool,
    pub current: Option<SweepStatus>,
    /// Sweeps waiting to start, in order.
    pub pending: Vec<SweepInfo>,
}

/// Messages from the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Hello {
        version: u32,
        pid: u32,
        /// The daemon clock (s) when the connection was accepted.
        now: f64,
    },
    /// A request failed or a message was malformed; one line for people.
    Error {
        message: String,
    },
    Ok {
        message: String,
    },
    /// A sweep was queued; `position` 0 = starts now (or is running), n = after n others.
    Submitted {
        sweep_id: i64,
        position: usize,
    },
    Status(Box<StatusReport>),
    /// The state to rebuild a dashboard from: the sweep and its events so far (compacted:
    /// structural events, the latest queue, and each run's recent steps and samples). Sent
    /// again whenever the daemon starts another sweep, or when a client fell behind.
    Attached {
        now: f64,
        sweep: Option<SweepInfo>,
        replay: Vec<Stamped>,
    },
    Event(Stamped),
    /// The awaited sweep(s) ended; `complete` is false when a stop interrupted them.
    Done {
        sweep_id: Option<i64>,
        complete: bool,
        message: String,
    },
}

impl ServerMsg {
    /// The message type's name (its `type` tag), for errors about unexpected replies.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMsg::Hello { .. } => "hello",
            ServerMsg::Error { .. } => "error",
            ServerMsg::Ok { .. } => "ok",
            ServerMsg::Submitted { .. } => "submitted",
            ServerMsg::Status(_) => "status",
            ServerMsg::Attached { .. } => "attached",
            ServerMsg::Event(_) => "event",
            ServerMsg::Done { .. } => "done",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::MoveTo;

    #[test]
    fn messages_are_tagged_json() {
        let m = ClientMsg::Command {
            command: Command::Move {
                id: "abc".into(),
                to: MoveTo::Top,
            },
        };
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(
            j,
            r#"{"type":"command","command":{"cmd":"move","id":"abc","to":"top"}}"#
        );
        assert_eq!(serde_json::from_str::<ClientMsg>(&j).unwrap(), m);
        let e = ServerMsg::Event(Stamped {
            t: 1.5,
            event: Event::QueueChanged {
                queue: QueueSnapshot {
                    paused: true,
                    shutting_down: false,
                    queued: vec![],
                    entries: vec![],
                },
            },
        });
        let j = serde_json::to_string(&e).unwrap();
        assert!(j.starts_with(r#"{"type":"event","t":1.5,"event":{"event":"queue_changed""#));
        assert_eq!(serde_json::from_str::<ServerMsg>(&j).unwrap(), e);
        assert_eq!(
            serde_json::from_str::<ClientMsg>(r#"{"type":"hello","version":1}"#).unwrap(),
            ClientMsg::Hello { version: 1 }
        );
    }

    /// `kind` is the serde tag.
    #[test]
    fn kind_is_the_type_tag() {
        let msgs = [
            ServerMsg::Ok {
                message: "m".into(),
            },
            ServerMsg::Submitted {
                sweep_id: 1,
                position: 0,
            },
            ServerMsg::Done {
                sweep_id: None,
                complete: true,
                message: String::new(),
            },
        ];
        for m in msgs {
            let v: serde_json::Value = serde_json::to_value(&m).unwrap();
            assert_eq!(v["type"], m.kind());
        }
    }
}
