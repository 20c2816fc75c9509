//! `lorascope queue ...`: an orchestrator command for the daemon's running sweep.

use std::path::Path;

use anyhow::Result;
use clap::builder::PossibleValue;

use crate::cli::{QueueAction, client_rt};
use crate::daemon::client::Client;
use crate::orchestrator::{Command, MoveTo};

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

/// Sends `action` to the daemon on `socket`; returns once the queue applied it.
///
/// Errors: no daemon, no sweep running, or the queue's reason for rejecting it.
pub fn run(socket: &Path, action: &QueueAction) -> Result<()> {
    let command = action.command();
    client_rt()?.block_on(async {
        let mut c = Client::connect(socket).await?;
        c.command(command).await?;
        Ok(())
    })
}
