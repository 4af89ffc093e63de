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
/// How often an idle follower records that it is alive (well inside any outbox retention).
const TOUCH_INTERVAL: Duration = Duration::from_secs(3600);

/// Runs the watch loop.
pub fn run(dir: &Path, args: &WatchArgs) -> Result<()> {
    let engine = Engine::open(dir, Access::Read)?;
    let conn = engine.tree().conn();
    let config = honker_core::WatcherConfig::default().with_poll_interval(POLL_INTERVAL).map_err(anyhow::Error::msg)?;
    let watcher = honker_core::SharedUpdateWatcher::new_with_config(engine.tree().path().to_path_buf(), config);
    let (_id, wake) = watcher.subscribe();
    let stdout = std::io::stdout();
    let mut cursor = outbox::cursor(conn, &args.consumer)?;
    warn_if_events_were_missed(conn, &args.consumer, cursor)?;
    let mut touched = std::time::Instant::now();
    loop {
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
            outbox::save_cursor(conn, &args.consumer, last, alknet_actors::engine::now_ms()).context("saving the watch cursor")?;
            touched = std::time::Instant::now();
            cursor = last;
        }
        if args.once {
            return Ok(());
        }
        match wake.recv_timeout(SAFETY_POLL) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => anyhow::bail!("the database file was replaced or removed while watching: restart watch"),
        }
        // A follower with nothing to read is still a consumer: say so, so it does not expire.
        if touched.elapsed() >= TOUCH_INTERVAL {
            outbox::touch(conn, &args.consumer, alknet_actors::engine::now_ms()).context("saving the watch cursor")?;
            touched = std::time::Instant::now();
        }
    }
}

/// Says on stderr when events after this consumer's cursor were pruned (it is new, or it was
/// idle past the outbox retention and expired): what follows starts at the oldest event kept.
fn warn_if_events_were_missed(conn: &rusqlite::Connection, consumer: &str, cursor: i64) -> Result<()> {
    // The next event this consumer can still read: the oldest kept, or the next to come.
    let next = match outbox::oldest(conn)? {
        Some(oldest) => oldest,
        None => outbox::head(conn)? + 1,
    };
    if next > cursor + 1 {
        eprintln!(
            "alkfs: warning: consumer {consumer:?} missed events {}..={} (pruned before it read them: it is new, or was idle past the outbox retention, gc.outbox_keep_days); continuing from {next}",
            cursor + 1,
            next - 1
        );
    }
    Ok(())
}
