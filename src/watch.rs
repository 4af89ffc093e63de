//! `alkfs watch`: prints committed outbox events as JSON lines from a consumer's saved
//! cursor, then follows new commits. The cursor advances only after a batch is printed, so a
//! watcher that dies re-prints at most one batch (at-least-once) and never skips one.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use alknet_actors::engine::{Access, Engine};
use alknet_actors::store::outbox;
use anyhow::{Context, Result};

use crate::cli::WatchArgs;

/// How often the honker watcher checks the database for commits. A CLI watcher is for
/// people; 50 ms is instant to them and costs little CPU.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Re-read at least this often even without a wake, in case a wake was missed.
const SAFETY_POLL: Duration = Duration::from_secs(5);

/// Runs the watch loop.
pub fn run(dir: &Path, args: &WatchArgs) -> Result<()> {
    let engine = Engine::open(dir, Access::Read)?;
    let conn = engine.tree().conn();
    let config = honker_core::WatcherConfig::default().with_poll_interval(POLL_INTERVAL).map_err(anyhow::Error::msg)?;
    let watcher = honker_core::SharedUpdateWatcher::new_with_config(engine.tree().path().to_path_buf(), config);
    let (_id, wake) = watcher.subscribe();
    let stdout = std::io::stdout();
    loop {
        let mut cursor = outbox::cursor(conn, &args.consumer)?;
        loop {
            let batch = outbox::read_after(conn, cursor, outbox::READ_BATCH_EVENTS_MAX)?;
            let Some(&(last, _)) = batch.last() else { break };
            let mut out = stdout.lock();
            for (offset, event) in &batch {
                let mut line = serde_json::to_value(event)?;
                line["offset"] = (*offset).into();
                writeln!(out, "{line}")?;
            }
            out.flush()?;
            outbox::save_cursor(conn, &args.consumer, last).context("saving the watch cursor")?;
            cursor = last;
        }
        if args.once {
            return Ok(());
        }
        match wake.recv_timeout(SAFETY_POLL) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => anyhow::bail!("the database file was replaced or removed while watching: restart watch"),
        }
    }
}
