//! Committing changes a mount acknowledged before they commit (see `store::acked` for the
//! rules): its batches, and the journal of a mount that died. A batch commits in one
//! transaction; when that fails, each change commits alone, and each answer says which did
//! not (the mount keeps those and sends them again). A change already applied (its id is
//! recorded) is not applied twice.

use std::collections::HashMap;

use super::{Engine, Result, Scope};
use crate::content::Imported;
use crate::proto::entry::Entry;
use crate::proto::path::TreePath;
use crate::store::acked::Seen;
use crate::store::{Branch, Ids, StoreError, Tx};

/// One acknowledged change, with the id its mount gave it.
#[derive(Debug)]
pub struct AckedChange {
    /// Unique per change (the mount's id and the change's ticket).
    pub id: String,
    /// What it does.
    pub what: Acked,
}

/// What an acknowledged change does.
#[derive(Debug)]
pub enum Acked {
    /// A new directory (and its parents).
    Dir {
        /// Where.
        path: TreePath,
        /// Permission bits.
        mode: u32,
        /// Modification time.
        mtime_ms: i64,
    },
    /// A closed file: its entry and blob, and what its writer had opened.
    File {
        /// Where.
        path: TreePath,
        /// What.
        entry: Entry,
        /// Its bytes, in the content store (or inline).
        blob: Imported,
        /// The version its writer had opened.
        seen: Seen,
    },
    /// A directory's new mode and/or mtime; moot (and done) when the path is gone.
    Attr {
        /// Whose.
        path: TreePath,
        /// New permission bits.
        mode: Option<u32>,
        /// New modification time.
        mtime_ms: Option<i64>,
    },
    /// Sent again after its bytes were taken: it must have been applied already.
    Recorded,
}

impl Acked {
    /// The path it changes.
    fn path(&self) -> Option<&TreePath> {
        match self {
            Acked::Dir { path, .. } | Acked::File { path, .. } | Acked::Attr { path, .. } => Some(path),
            Acked::Recorded => None,
        }
    }

    /// The most ids this change takes: per parent a directory and a listed loser, the
    /// version itself, a loser and a directory written again, its outbox event.
    fn ids(&self) -> u64 {
        match self {
            Acked::Dir { path, .. } | Acked::File { path, .. } | Acked::Attr { path, .. } => 2 * path.ancestors().len() as u64 + 4,
            Acked::Recorded => 0,
        }
    }
}

/// Applies `c` in the open transaction unless it was applied before (`applied` holds the
/// batch's ids already recorded, read at once); returns what it wrote (0 for nothing).
pub fn apply(tx: &mut Tx<'_>, branch: &Branch, c: &AckedChange, applied: &HashMap<String, i64>) -> std::result::Result<i64, StoreError> {
    if let Some(seq) = applied.get(&c.id) {
        return Ok(*seq);
    }
    let seq = match &c.what {
        Acked::Dir { path, mode, mtime_ms } => tx.mkdir_acked(branch, path, *mode, *mtime_ms)?,
        Acked::File { path, entry, blob, seen } => {
            tx.record_blob(blob)?;
            tx.put_acked(branch, path, entry.clone(), seen)?
        }
        Acked::Attr { path, mode, mtime_ms } => match tx.set_attr(branch, path, *mode, *mtime_ms) {
            Ok(seq) => seq,
            // Removed elsewhere meanwhile: nothing left to change.
            Err(StoreError::NotFound(_)) => 0,
            Err(e) => return Err(e),
        },
        Acked::Recorded => {
            return Err(StoreError::Invalid(format!("change {}: its staging file is gone and it was never committed", c.id)));
        }
    };
    tx.record_acked(&c.id, seq)?;
    Ok(seq)
}

/// Which of `changes` were applied before, and what each wrote: one read for the batch
/// (nearly always none: a change is sent again only when an answer was lost).
fn recorded(conn: &rusqlite::Connection, changes: &[AckedChange]) -> std::result::Result<HashMap<String, i64>, StoreError> {
    let mut out = HashMap::new();
    for chunk in changes.chunks(64) {
        let marks = vec!["?"; chunk.len()].join(",");
        let mut st = conn.prepare_cached(&format!("SELECT id, seq FROM acked_change WHERE id IN ({marks})"))?;
        let rows = st.query_map(rusqlite::params_from_iter(chunk.iter().map(|c| c.id.as_str())), |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (id, seq) = row?;
            out.insert(id, seq);
        }
    }
    Ok(out)
}

impl Engine {
    /// Commits `changes` (see the module's notes): one answer per change, in order, `Err`
    /// with the reason for each that did not commit.
    pub fn commit_acked(&mut self, scope: &Scope, changes: &[AckedChange]) -> Result<Vec<std::result::Result<i64, String>>> {
        let branch = self.branch(scope)?;
        let now = self.now_ms();
        let applied = recorded(self.tree.conn(), changes)?;
        let ids = changes.iter().map(|c| c.what.ids()).sum();
        let whole = self.tree.transact(Ids::AtMost(ids), now, |tx| changes.iter().map(|c| apply(tx, &branch, c, &applied)).collect::<std::result::Result<Vec<i64>, _>>());
        match whole {
            Ok(seqs) => Ok(seqs.into_iter().map(Ok).collect()),
            Err(e) if changes.len() == 1 => Ok(vec![Err(e.to_string())]),
            Err(e) => {
                tracing::debug!(error = %e, changes = changes.len(), "a batch of acknowledged changes did not commit whole; committing them one by one");
                // A path's changes commit in the order they were made: after one of them
                // fails, the later ones wait with it (else a later save could commit first
                // and then lose to the earlier one, committed later with a later stamp).
                let mut failed: std::collections::HashSet<&TreePath> = std::collections::HashSet::new();
                let mut out = Vec::with_capacity(changes.len());
                for c in changes {
                    let path = c.what.path();
                    if path.is_some_and(|p| failed.contains(p)) {
                        out.push(Err(format!("{}: waits for an earlier change of the same path, which did not commit", path.map(|p| p.as_str()).unwrap_or_default())));
                        continue;
                    }
                    let result = self.tree.transact(Ids::AtMost(c.what.ids()), now, |tx| apply(tx, &branch, c, &applied)).map_err(|e| e.to_string());
                    if let (Err(_), Some(p)) = (&result, path) {
                        failed.insert(p);
                    }
                    out.push(result);
                }
                Ok(out)
            }
        }
    }
}
