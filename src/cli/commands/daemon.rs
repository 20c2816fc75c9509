//! `lorascope daemon`: run the daemon in the foreground, or `daemon stop [--finish]` it.

use anyhow::Result;

use crate::cli::{DaemonAction, DaemonArgs, client_rt, grace, worker_command, worker_overridden};
use crate::daemon::client::Client;
use crate::daemon::server::{self, DaemonOptions};

/// Runs the daemon until it is stopped, or stops the one on `--socket` and waits until it
/// has exited.
///
/// Errors: another daemon runs on the socket, the socket or state directory is unusable;
/// for `stop`, no daemon answers.
pub fn run(args: DaemonArgs) -> Result<()> {
    let socket = args.socket.path();
    match args.action {
        Some(DaemonAction::Stop { finish }) => client_rt()?.block_on(async {
            let mut c = Client::connect(&socket).await?;
            let pid = c.pid;
            let message = c.stop(finish).await?;
            eprintln!("daemon (pid {pid}): {message}");
            c.until_closed().await;
            eprintln!("daemon (pid {pid}) stopped");
            Ok(())
        }),
        None => {
            let worker_overridden = worker_overridden(args.worker.as_deref());
            let worker = worker_command(args.worker)?;
            server::run(DaemonOptions {
                socket,
                state_dir: crate::daemon::state_dir(),
                worker,
                worker_overridden,
                grace: grace(args.grace_secs),
            })?;
            Ok(())
        }
    }
}
