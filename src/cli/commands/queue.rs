//! `lorascope queue ...`: an orchestrator command for the daemon's running sweep.

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use clap::builder::PossibleValue;

use crate::cli::{QueueAction, client_rt};
use crate::daemon::client::Client;
use crate::daemon::protocol::StatusReport;
use crate::orchestrator::{Command, EntryId, EntryState, MoveTo, resolve_id, short_id};

/// `queue move ... up|down|top`: the [`MoveTo`] spellings.
impl clap::ValueEnum for MoveTo {
    fn value_variants<'a>() -> &'a [Self] {
        &[MoveTo::Up, MoveTo::Down, MoveTo::Top]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(match self {
            MoveTo::Up => "up",
            MoveTo::Down => "down",
            MoveTo::Top => "top",
        }))
    }
}

impl QueueAction {
    /// The orchestrator command.
    pub fn command(&self) -> Command {
        match self.clone() {
            QueueAction::Pause => Command::Pause,
            QueueAction::Resume => Command::Resume,
            QueueAction::Move { id, to } => Command::Move { id, to },
            QueueAction::Skip { id } => Command::Skip { id },
            QueueAction::Cancel { id } => Command::Cancel { id },
            QueueAction::Retry { id } => Command::Retry { id },
        }
    }
}

/// Sends `action` to the daemon on `socket` and prints what it did (`moved 2cafed75 (bs2
/// seq1024 nf4) up: now 2nd of 5`, `paused: ...`). An id may be a unique prefix of a run's
/// id (the dashboard and `status` show 8 characters).
///
/// Errors: no daemon, no sweep running, an unknown or ambiguous id (one line listing the
/// matches), or the queue's reason for rejecting it.
pub fn run(socket: &Path, action: &QueueAction) -> Result<()> {
    let command = action.command();
    let said = client_rt()?.block_on(async {
        let mut c = Client::connect(socket).await?;
        let before = c.status().await?;
        // Resolved here too, to name the run in what is printed (the daemon resolves the
        // same way).
        let command = match (&before.current, id_of(&command)) {
            (Some(cur), Some(id)) if !cur.ended => {
                let entries = cur
                    .queue
                    .as_ref()
                    .map(|q| q.entries.as_slice())
                    .unwrap_or(&[]);
                with_id(&command, resolve_id(entries, id)?)
            }
            _ => command,
        };
        c.command(command.clone()).await?;
        // The daemon's status follows the queue's event a moment after the reply.
        let queue_of = |r: &StatusReport| r.current.as_ref().and_then(|c| c.queue.clone());
        let mut after = c.status().await?;
        for _ in 0..20 {
            if id_of(&command).is_none() || queue_of(&after) != queue_of(&before) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            after = c.status().await?;
        }
        anyhow::Ok(describe(&command, &before, &after))
    })?;
    writeln!(std::io::stdout().lock(), "{said}")?;
    Ok(())
}

/// The id a command names, if any.
fn id_of(cmd: &Command) -> Option<&str> {
    match cmd {
        Command::Move { id, .. }
        | Command::Skip { id }
        | Command::Cancel { id }
        | Command::Retry { id } => Some(id),
        Command::Pause | Command::Resume | Command::Shutdown => None,
    }
}

/// `cmd` naming `id` instead.
fn with_id(cmd: &Command, id: EntryId) -> Command {
    match cmd {
        Command::Move { to, .. } => Command::Move { id, to: *to },
        Command::Skip { .. } => Command::Skip { id },
        Command::Cancel { .. } => Command::Cancel { id },
        Command::Retry { .. } => Command::Retry { id },
        other => other.clone(),
    }
}

/// `1st`, `2nd`, `3rd`, `4th`, `11th`, `21st`.
fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// What a command that the daemon applied did, for people, from the status before and
/// after it.
pub fn describe(cmd: &Command, before: &StatusReport, after: &StatusReport) -> String {
    let cur = after.current.as_ref();
    let queue = cur.and_then(|c| c.queue.as_ref());
    let specs = cur
        .and_then(|c| {
            crate::profile::parse_str(&c.info.profile_source, &c.info.profile_path)
                .ok()
                .map(|p| crate::grid::expand_profile(&p, &c.info.base_dir))
        })
        .unwrap_or_default();
    let name = |id: &str| {
        let label = queue
            .and_then(|q| q.entries.iter().find(|e| e.id == id))
            .map(|e| crate::grid::varying_label(&specs, e.spec_index))
            .filter(|l| !l.is_empty());
        match label {
            Some(l) => format!("{} ({l})", short_id(id)),
            None => short_id(id),
        }
    };
    let place = |id: &str| {
        let q = queue.map(|q| q.queued.as_slice()).unwrap_or(&[]);
        match q.iter().position(|x| x == id) {
            Some(i) => format!("now {} of {} queued", ordinal(i + 1), q.len()),
            None => "no longer queued".to_string(),
        }
    };
    let running = |id: &str| {
        before
            .current
            .as_ref()
            .and_then(|c| c.queue.as_ref())
            .and_then(|q| q.entries.iter().find(|e| e.id == id))
            .is_some_and(|e| matches!(e.state, EntryState::Running { .. }))
    };
    match cmd {
        Command::Pause => {
            "paused: running runs go on, nothing new starts (`lorascope queue resume`)".into()
        }
        Command::Resume => "resumed: queued runs start again".into(),
        Command::Move { id, to } => {
            let to = match to {
                MoveTo::Up => "up",
                MoveTo::Down => "down",
                MoveTo::Top => "to the top",
            };
            format!("moved {} {to}: {}", name(id), place(id))
        }
        Command::Skip { id } => format!(
            "skipped {} (recorded skipped; `lorascope queue retry {}` queues it again)",
            name(id),
            short_id(id)
        ),
        Command::Cancel { id } if running(id) => {
            format!("cancelling {}: stopping its worker", name(id))
        }
        Command::Cancel { id } => format!(
            "cancelled {} before it started (recorded skipped)",
            name(id)
        ),
        Command::Retry { id } => format!("queued {} again: {}", name(id), place(id)),
        Command::Shutdown => "stopping the sweep".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::ordinal;

    #[test]
    fn ordinals() {
        let got: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 102].map(ordinal).to_vec();
        assert_eq!(
            got,
            [
                "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "102nd"
            ]
        );
    }
}
