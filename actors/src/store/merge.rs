//! Three-way merge of one branch into another, at path level.
//!
//! 1. **Base.** The last merge between the two (either direction) if any: merging `s@x` into `t`
//!    left `t` holding `s@x` (or a resolved winner), so the next merge starts from `s@x`.
//!    Otherwise the nearest common ancestor in the fork chains, as of the earlier of the two
//!    forks. Unrelated histories merge from an empty base.
//! 2. **Candidates.** Only paths with rows in the seq ranges one view sees and the other does
//!    not: the cost follows what changed, not the size of the tree.
//! 3. **Decide** each path with [`crate::proto::merge::decide`]; a path changed on both sides is
//!    settled by last-writer-wins, and the loser is written as a version (`conflict-loser`) just
//!    before the winner, so `alkfs log` shows it and `alkfs restore` brings it back; the pair is
//!    listed by `alkfs conflicts`.
//! 4. **Tree shape.** A live path whose parent ended up deleted gets its parent back as a
//!    directory, so a merge never leaves orphans.
//!
//! When the target changed nothing since the base, the merge is a fast-forward: the target
//! takes the source's versions of every changed path, and no conflict is possible.

use std::collections::BTreeSet;

use rusqlite::{params, OptionalExtension};

use super::outbox::Event;
use super::read::{self, View};
use super::tx::{Tx, DIR_MODE_DEFAULT};
use super::{Branch, StoreError};
use crate::proto::entry::{Entry, EntryKind, Version};
use crate::proto::merge::{decide, Decision, Side};
use crate::proto::path::TreePath;

/// What a merge did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MergeReport {
    /// True when the target had no changes of its own since the base.
    pub fast_forward: bool,
    /// Paths whose version was taken from the source.
    pub taken: Vec<TreePath>,
    /// Paths both sides changed, with the side that won.
    pub conflicts: Vec<(TreePath, Side)>,
}

/// The base view of a merge of `from` into `into`.
fn merge_base(tx: &Tx<'_>, from: &Branch, into: &Branch) -> Result<View, StoreError> {
    let conn = tx.conn();
    let last: Option<(i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT from_branch, from_seq, into_seq FROM merge_point
             WHERE (from_branch = ?1 AND into_branch = ?2) OR (from_branch = ?2 AND into_branch = ?1)
             ORDER BY into_seq DESC LIMIT 1",
        )?
        .query_row(params![from.id, into.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((merged_from, from_seq, _)) = last {
        let side = if merged_from == from.id { from } else { into };
        return View::at(conn, side, from_seq);
    }
    let (vf, vi) = (View::head(conn, from)?, View::head(conn, into)?);
    for (branch_id, limit_f) in &vf.links {
        if let Some(limit_i) = vi.limit_of(*branch_id) {
            let common = super::branch_by_id(conn, *branch_id)?;
            return View::at(conn, &common, (*limit_f).min(limit_i));
        }
    }
    Ok(View::empty())
}

/// Paths with rows that `view` sees and `base` does not, or the other way round.
fn changed_between(tx: &Tx<'_>, view: &View, base: &View, upto: i64, out: &mut BTreeSet<TreePath>) -> Result<bool, StoreError> {
    let mut any = false;
    for (a, b) in [(view, base), (base, view)] {
        for (branch, limit) in &a.links {
            let hi = (*limit).min(upto);
            let lo = b.limit_of(*branch).unwrap_or(0).min(hi);
            if hi > lo {
                let paths = read::changed_paths(tx.conn(), *branch, lo, hi)?;
                any |= !paths.is_empty();
                out.extend(paths);
            }
        }
    }
    Ok(any)
}

impl Tx<'_> {
    /// Merges branch `from` into branch `into` (same bucket), committing the result as new
    /// versions on `into`.
    pub fn merge(&mut self, from: &Branch, into: &Branch) -> Result<MergeReport, StoreError> {
        if from.id == into.id {
            return Err(StoreError::Invalid(format!("cannot merge branch {} into itself", from.name)));
        }
        if from.bucket_id != into.bucket_id {
            return Err(StoreError::Invalid("branches of different buckets cannot be merged".into()));
        }
        let now_seq = self.clock();
        let base = merge_base(self, from, into)?;
        let (vf, vi) = (View::head(self.conn(), from)?, View::head(self.conn(), into)?);
        let mut candidates = BTreeSet::new();
        changed_between(self, &vf, &base, now_seq, &mut candidates)?;
        let into_changed = changed_between(self, &vi, &base, now_seq, &mut candidates)?;
        let mut report = MergeReport { fast_forward: !into_changed, ..Default::default() };
        let first = self.clock() + 1;
        for path in &candidates {
            self.merge_path(from, into, &base, &vf, &vi, path, &mut report)?;
        }
        self.restore_parents(into, &report)?;
        self.conn().execute(
            "INSERT INTO merge_point(from_branch, into_branch, from_seq, into_seq) VALUES (?1, ?2, ?3, ?4)",
            params![from.id, into.id, now_seq, self.clock()],
        )?;
        let last = self.clock();
        self.emit(Event::merge(into, first, last, &from.name));
        Ok(report)
    }

    #[allow(clippy::too_many_arguments)]
    fn merge_path(
        &mut self,
        from: &Branch,
        into: &Branch,
        base: &View,
        vf: &View,
        vi: &View,
        path: &TreePath,
        report: &mut MergeReport,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        let b = read::resolve(conn, base, path)?.map(|r| r.version);
        let s = read::resolve(conn, vf, path)?.map(|r| r.version);
        let t = read::resolve(conn, vi, path)?.map(|r| r.version);
        let now = self.now_ms();
        let tomb = || Version { entry: None, written_ms: now };
        match decide(b.as_ref(), s.as_ref(), t.as_ref()) {
            Decision::Keep => {}
            Decision::Take => {
                // The source's write time travels with the version, so a later merge elsewhere
                // still orders it by when it was written, not when it was merged.
                self.insert_row(into.id, path, &s.unwrap_or_else(tomb), "merge")?;
                report.taken.push(path.clone());
            }
            Decision::Conflict { winner } => {
                let (win, lose) = match winner {
                    Side::Source => (s.unwrap_or_else(tomb), t.unwrap_or_else(tomb)),
                    Side::Target => (t.unwrap_or_else(tomb), s.unwrap_or_else(tomb)),
                };
                let loser_seq = self.insert_row(into.id, path, &lose, "conflict-loser")?;
                let winner_seq = self.insert_row(into.id, path, &win, "merge")?;
                self.conn().execute(
                    "INSERT INTO conflict(branch_id, path, from_branch, winner_seq, loser_seq, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![into.id, path.as_str(), from.name, winner_seq, loser_seq, self.now_ms()],
                )?;
                report.conflicts.push((path.clone(), winner));
            }
        }
        Ok(())
    }

    /// Gives every live path the merge touched its parent directories back, where the merge
    /// deleted them.
    fn restore_parents(&mut self, into: &Branch, report: &MergeReport) -> Result<(), StoreError> {
        let view = View::head(self.conn(), into)?;
        let touched = report.taken.iter().chain(report.conflicts.iter().map(|(p, _)| p));
        let mut needed = BTreeSet::new();
        for path in touched {
            if read::live(self.conn(), &view, path)?.is_some() {
                needed.extend(path.ancestors());
            }
        }
        // Also the children of directories this merge deleted, if they are still live.
        for path in &report.taken {
            if read::live(self.conn(), &view, path)?.is_none() && !read::subtree(self.conn(), &view, path)?.is_empty() {
                needed.insert(path.clone());
            }
        }
        for dir in needed {
            match read::live(self.conn(), &view, &dir)? {
                Some(r) if r.entry().is_some_and(|e| e.kind == EntryKind::Dir) => {}
                _ => {
                    let v = Version { entry: Some(Entry::dir(DIR_MODE_DEFAULT, self.now_ms())), written_ms: self.now_ms() };
                    self.insert_row(into.id, &dir, &v, "merge")?;
                }
            }
        }
        Ok(())
    }
}

/// A recorded conflict, for `alkfs conflicts`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflictRow {
    /// The path both sides changed.
    pub path: String,
    /// The branch merged from.
    pub from_branch: String,
    /// The version that became the head.
    pub winner_seq: i64,
    /// The losing version, restorable with `alkfs restore PATH --version N`.
    pub loser_seq: i64,
    /// When the merge ran.
    pub at_ms: i64,
}

/// Conflicts recorded on `branch`, newest first.
pub fn conflicts(conn: &rusqlite::Connection, branch: &Branch) -> Result<Vec<ConflictRow>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT path, from_branch, winner_seq, loser_seq, at_ms FROM conflict WHERE branch_id = ?1 ORDER BY id DESC",
    )?;
    let rows = st.query_map([branch.id], |r| {
        Ok(ConflictRow { path: r.get(0)?, from_branch: r.get(1)?, winner_seq: r.get(2)?, loser_seq: r.get(3)?, at_ms: r.get(4)? })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
