//! The node adopts what dead mounts acknowledged. A mount journals every change before it
//! acknowledges it (`mount::journal`) and holds a lock on its staging directory while it
//! runs; a directory whose lock nobody holds belongs to a mount that ended (killed, or
//! unmounted while this node was away). At start and every [`ADOPT_EVERY`] the node commits
//! what such a journal holds, in order and as the mount would have (each change names the
//! version its writer opened, and one already committed is not applied twice), then removes
//! the directory. What does not commit stays for the next round.

use std::path::Path;
use std::time::Duration;

use alknet_actors::content::MOUNT_STAGING_PREFIX;
use alknet_actors::engine::Scope;

use super::server::{put_staged, ServerCtx};
use super::{StagedAttr, StagedDir, StagedFile, WireScope};
use crate::mount::journal::{self, Claim, Record};

/// How often the node looks for directories of mounts that ended.
pub const ADOPT_EVERY: Duration = Duration::from_secs(5);
/// Changes committed per request, as a mount sends them.
const BATCH_MAX: usize = 64;

/// Adopts at once and then every [`ADOPT_EVERY`], until the node stops.
pub async fn run(ctx: ServerCtx) {
    let mut stopping = ctx.stopping.clone();
    loop {
        adopt(&ctx).await;
        tokio::select! {
            _ = tokio::time::sleep(ADOPT_EVERY) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

/// Adopts the staging directory of every mount that ended; returns how many changes were
/// committed.
pub async fn adopt(ctx: &ServerCtx) -> usize {
    let staging = ctx.content.staging_dir();
    let Ok(entries) = std::fs::read_dir(&staging) else { return 0 };
    let dirs: Vec<std::path::PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(MOUNT_STAGING_PREFIX)) && e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    let mut committed = 0;
    for dir in dirs {
        match adopt_one(ctx, &dir).await {
            Ok(n) => committed += n,
            Err(e) => tracing::warn!(dir = %dir.display(), error = %format!("{e:#}"), "could not adopt what an ended mount left; tried again later"),
        }
    }
    committed
}

async fn adopt_one(ctx: &ServerCtx, dir: &Path) -> anyhow::Result<usize> {
    let (lock, records) = {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            match journal::claim(&dir)? {
                Claim::Alive | Claim::Legacy { alive: true } => Ok(None),
                Claim::Legacy { alive: false } => {
                    // An older alkfs's mount: its staging files are sessions never closed.
                    std::fs::remove_dir_all(&dir)?;
                    Ok(None)
                }
                Claim::Ended(lock) => Ok(Some((lock, journal::read(&dir)?))),
            }
        })
        .await??
        .unzip()
    };
    let (Some(_lock), Some(records)) = (lock, records) else { return Ok(0) };
    let changes = latest_per_id(records);
    let total = changes.len();
    let mut done = 0;
    for batch in batches(changes) {
        let (scope, dirs, items, attrs) = batch;
        let n = dirs.len() + items.len() + attrs.len();
        let failed = put_staged(ctx, Scope { bucket: scope.bucket.clone(), branch: scope.branch.clone(), at: None }, dirs, items, attrs).await?;
        if let Some(f) = failed.first() {
            anyhow::bail!("{} of {n} changes did not commit ({}: {}); {done} of {total} are", failed.len(), f.id, f.error);
        }
        done += n;
    }
    // Whatever else is there are sessions never closed: the old versions stay, as after
    // a crash.
    std::fs::remove_dir_all(dir)?;
    if total > 0 {
        tracing::info!(dir = %dir.display(), changes = total, "committed what a mount acknowledged before it ended");
    }
    Ok(total)
}

/// The records in journal order, each id once, with its last content (an amendment
/// journals a change again: a chmod right after its close).
fn latest_per_id(records: Vec<(WireScope, Record, Vec<u8>)>) -> Vec<(WireScope, Record)> {
    let id = |r: &Record| match r {
        Record::File(f) => Some(f.id.clone()),
        Record::Dir(d) => Some(d.id.clone()),
        Record::Attr(a) => Some(a.id.clone()),
        Record::Scope(_) => None,
    };
    let mut out: Vec<(WireScope, Record)> = Vec::new();
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (scope, mut record, data) in records {
        if let Record::File(f) = &mut record {
            if f.staging.is_none() {
                f.data = Some(data_encoding::BASE64.encode(&data));
            }
        }
        let Some(key) = id(&record) else { continue };
        match at.get(&key) {
            Some(&i) => out[i].1 = record,
            None => {
                at.insert(key, out.len());
                out.push((scope, record));
            }
        }
    }
    out
}

type Batch = (WireScope, Vec<StagedDir>, Vec<StagedFile>, Vec<StagedAttr>);

/// Changes in order, in requests of at most [`BATCH_MAX`] of one scope.
fn batches(changes: Vec<(WireScope, Record)>) -> Vec<Batch> {
    let mut out: Vec<Batch> = Vec::new();
    for (scope, record) in changes {
        let fits = out.last().is_some_and(|(s, d, f, a)| s.bucket == scope.bucket && s.branch == scope.branch && d.len() + f.len() + a.len() < BATCH_MAX);
        if !fits {
            out.push((scope, Vec::new(), Vec::new(), Vec::new()));
        }
        let (_, dirs, files, attrs) = out.last_mut().expect("pushed");
        match record {
            Record::Dir(d) => dirs.push(d),
            Record::File(f) => files.push(f),
            Record::Attr(a) => attrs.push(a),
            Record::Scope(_) => {}
        }
    }
    out
}
