//! Garbage collection: history retention, then mark and sweep of blobs.
//!
//! 1. **Retention** decides which version rows live. A row is kept when some retained view
//!    reaches it *and* it is the head of its path in that view, or one of the
//!    `keep_versions` newest versions before the head, or written within `keep_days`. The
//!    retained views are every live branch's head and the base of the next merge between
//!    every two live branches (their last merge point), so a later merge always finds its
//!    base. Rows of deleted branches live on only as far as a retained view reaches into
//!    them. The versions a listed conflict names (its loser above all) stay until the user
//!    dismisses the conflict (`alkfs conflicts dismiss`).
//! 2. **Mark**: every hash a kept row names.
//! 3. **Sweep**: blob rows no kept row names and no write in flight holds ([`Holds`]) are
//!    deleted in the same transaction as the pruned rows; their files after the commit,
//!    each under the holds lock, so an import that dedups onto a blob in that instant keeps
//!    it. Files in `content/` that no blob row names (a crash between the rename and the
//!    commit) are swept too.
//! 4. The outbox drops events no active consumer needs ([`outbox::prune`]); consumers idle
//!    for `outbox_keep_days` expire.
//!
//! All of it is one SQLite write transaction plus file deletions: concurrent commits wait
//! for it, and a crash halfway leaves at worst orphan files for the next run.

use std::collections::HashSet;
use std::fs;
use std::time::Instant;

use rusqlite::params;

use crate::content::{ContentError, ContentStore, Holds};
use crate::proto::entry::ContentHash;
use crate::store::read::View;
use crate::store::{outbox, StoreError, TreeStore};

/// How much history to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Retention {
    /// Old versions kept per path besides the head.
    pub keep_versions: u32,
    /// Old versions younger than this many days are kept whatever their number (0: no
    /// time rule).
    pub keep_days: u32,
    /// Outbox consumers idle for this many days expire; with none active, events older than
    /// this are pruned (at least 1).
    pub outbox_keep_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { keep_versions: 16, keep_days: 30, outbox_keep_days: 7 }
    }
}

impl Retention {
    /// The policy of `alkfs gc [--keep-versions N] [--keep-days D]` on top of the configured
    /// one: no flag keeps the configured policy; one flag alone means only that rule applies.
    /// The one mapping of flags, used with and without a node.
    pub fn with_flags(self, keep_versions: Option<u32>, keep_days: Option<u32>) -> Retention {
        match (keep_versions, keep_days) {
            (None, None) => self,
            (v, d) => Retention { keep_versions: v.unwrap_or(0), keep_days: d.unwrap_or(0), ..self },
        }
    }
}

/// What a collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    /// Version rows removed by retention.
    pub versions_pruned: u64,
    /// Blobs freed.
    pub blobs_freed: u64,
    /// Bytes those blobs held.
    pub bytes_freed: u64,
    /// Blobs spared because a write in flight holds them.
    pub blobs_held: u64,
    /// Outbox events dropped.
    pub events_pruned: u64,
    /// Blobs still referenced.
    pub blobs_live: u64,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
}

/// Errors of a collection.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// From the path tree.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// From the content store.
    #[error(transparent)]
    Content(#[from] ContentError),
}

impl From<rusqlite::Error> for GcError {
    fn from(e: rusqlite::Error) -> Self {
        GcError::Store(e.into())
    }
}

/// Runs one collection.
pub fn collect(tree: &mut TreeStore, content: &ContentStore, policy: Retention, now_ms: i64) -> Result<GcReport, GcError> {
    let started = Instant::now();
    let holds = content.holds().clone();
    let mut report = GcReport::default();
    // keep_days = 0 means no time rule at all (not "younger than now", which would keep
    // whatever was written this millisecond).
    let cutoff_ms = match policy.keep_days {
        0 => i64::MAX,
        days => now_ms - i64::from(days) * 86_400_000,
    };
    let mut doomed: Vec<(ContentHash, bool, u64)> = Vec::new();
    tree.transact(crate::store::Ids::AtMost(0), now_ms, |tx| -> Result<(), GcError> {
        let conn = tx.conn();
        conn.execute_batch("CREATE TEMP TABLE IF NOT EXISTS gc_keep(seq INTEGER PRIMARY KEY); DELETE FROM gc_keep;")?;
        let mut keep = conn.prepare(
            "INSERT OR IGNORE INTO gc_keep(seq)
             SELECT seq FROM (SELECT seq, written_ms,
                    ROW_NUMBER() OVER (PARTITION BY dir, name ORDER BY vkey DESC) AS rank
                    FROM version WHERE branch_id = ?1 AND seq <= ?2 AND vkey <= ?5)
             WHERE rank <= ?3 OR written_ms >= ?4",
        )?;
        for view in retained_views(conn)? {
            for l in view.links {
                keep.execute(params![l.branch, l.seq_max, i64::from(policy.keep_versions) + 1, cutoff_ms, l.key_max.0])?;
            }
        }
        drop(keep);
        // Conflicts of deleted branches are moot; the versions the others name stay listed
        // and restorable until dismissed.
        conn.execute("DELETE FROM conflict WHERE branch_id IN (SELECT id FROM branch WHERE deleted_seq IS NOT NULL)", [])?;
        conn.execute("INSERT OR IGNORE INTO gc_keep(seq) SELECT loser_seq FROM conflict UNION SELECT winner_seq FROM conflict", [])?;
        report.versions_pruned = conn.execute("DELETE FROM version WHERE seq NOT IN (SELECT seq FROM gc_keep)", [])? as u64;
        conn.execute(
            "DELETE FROM branch WHERE deleted_seq IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM version v WHERE v.branch_id = branch.id)
               AND NOT EXISTS (SELECT 1 FROM branch c WHERE c.parent_id = branch.id)",
            [],
        )?;
        crate::store::merge::prune_merge_points(conn)?;
        let mut unreferenced = conn.prepare(
            "SELECT hash, data IS NULL, size FROM blob b
             WHERE NOT EXISTS (SELECT 1 FROM version v WHERE v.hash = b.hash)",
        )?;
        let rows = unreferenced.query_map([], |r| {
            let hash: Vec<u8> = r.get(0)?;
            Ok((hash, r.get::<_, bool>(1)?, r.get::<_, i64>(2)? as u64))
        })?;
        let mut delete = conn.prepare("DELETE FROM blob WHERE hash = ?1")?;
        let mut unserve = conn.prepare("DELETE FROM bucket_blob WHERE hash = ?1")?;
        for row in rows {
            let (raw, is_file, size) = row?;
            let Ok(bytes) = <[u8; 32]>::try_from(raw.as_slice()) else { continue };
            let hash = ContentHash(bytes);
            if holds.is_held(&hash) {
                report.blobs_held += 1;
                continue;
            }
            delete.execute([&raw])?;
            unserve.execute([&raw])?;
            doomed.push((hash, is_file, size));
        }
        drop((delete, unserve));
        drop(unreferenced);
        let outbox_since_ms = now_ms - i64::from(policy.outbox_keep_days.max(1)) * 86_400_000;
        report.events_pruned = outbox::prune(conn, outbox_since_ms)? as u64;
        // Mounts' acknowledged changes are recorded so one sent again is not applied twice:
        // a mount resends within seconds, a dead mount's journal is adopted when the node
        // runs; past the outbox retention the record has served.
        conn.execute("DELETE FROM acked_change WHERE at_ms < ?1", [outbox_since_ms])?;
        report.blobs_live = conn.query_row("SELECT count(*) FROM blob", [], |r| r.get::<_, i64>(0))? as u64;
        Ok(())
    })?;
    for (hash, is_file, size) in doomed {
        if is_file && !delete_file(content, &holds, &hash) {
            continue;
        }
        report.blobs_freed += 1;
        report.bytes_freed += size;
    }
    sweep_orphans(tree, content, &holds, &mut report)?;
    report.took_ms = started.elapsed().as_millis() as u64;
    tracing::info!(?report, "gc done");
    Ok(report)
}

/// The views whose heads retention keeps: every live branch as it is now, and, for every two
/// live branches that merged before, the base their next merge will start from.
fn retained_views(conn: &rusqlite::Connection) -> Result<Vec<View>, StoreError> {
    let live: Vec<crate::store::Branch> = {
        let mut st = conn.prepare(&format!("SELECT {} FROM branch WHERE deleted_seq IS NULL", crate::store::BRANCH_COLS))?;
        let rows = st.query_map([], crate::store::branch_from_row)?.collect::<Result<_, _>>()?;
        rows
    };
    let mut views = Vec::with_capacity(live.len());
    for branch in &live {
        views.push(View::head(conn, branch)?);
    }
    views.extend(crate::store::merge::next_merge_bases(conn, &live)?);
    Ok(views)
}

/// Deletes file blob `hash` unless held; true when it is gone.
fn delete_file(content: &ContentStore, holds: &Holds, hash: &ContentHash) -> bool {
    let path = content.blob_path(hash);
    let mut result = Ok(());
    let ran = holds.unless_held(hash, || result = fs::remove_file(&path));
    match result {
        Ok(()) => ran,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ran,
        Err(e) => {
            tracing::warn!(%hash, error = %e, "could not delete a freed blob file; the next gc retries");
            false
        }
    }
}

/// Deletes files under `content/<hh>/` that no blob row names.
fn sweep_orphans(tree: &TreeStore, content: &ContentStore, holds: &Holds, report: &mut GcReport) -> Result<(), GcError> {
    let known: HashSet<Vec<u8>> = {
        let mut st = tree.conn().prepare("SELECT hash FROM blob WHERE data IS NULL")?;
        let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let root = content.root();
    let Ok(dirs) = fs::read_dir(root) else { return Ok(()) };
    for dir in dirs.flatten() {
        let name = dir.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.len() != 2 || !dir.path().is_dir() {
            continue; // staging/ and anything that is not a fan-out dir
        }
        for file in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            let Some(hash) = file.file_name().to_str().and_then(ContentHash::from_hex) else { continue };
            if known.contains(hash.0.as_slice()) {
                continue;
            }
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            if delete_file(content, holds, &hash) {
                report.blobs_freed += 1;
                report.bytes_freed += size;
            }
        }
    }
    Ok(())
}
