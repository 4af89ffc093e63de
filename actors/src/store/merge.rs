//! Three-way merge of one branch into another, at path level.
//!
//! 1. **Base.** The last merge between the two (either direction) if any: merging `s@x` into `t`
//!    left `t` holding `s@x` (or a resolved winner), so the next merge starts from `s@x`.
//!    Otherwise the nearest common ancestor in the fork chains, as of the earlier of the two
//!    forks. Unrelated histories merge from an empty base.
//! 2. **Candidates.** Only paths with rows in the seq ranges one view sees and the other does
//!    not, leaving out rows an earlier merge between the two already took in: the cost
//!    follows what changed since they were last in step, not the size of the tree or its
//!    history ([`MergeReport::examined`]).
//! 3. **Decide** each path with [`crate::proto::merge::decide`]; a path changed on both sides is
//!    settled by last-writer-wins, and the loser is written as a version (`conflict-loser`) just
//!    before the winner, so `alkfs log` shows it and `alkfs restore` brings it back; the pair is
//!    listed by `alkfs conflicts`.
//! 4. **Tree shape.** A live path whose parent ended up deleted gets its parent back as a
//!    directory, so a merge never leaves orphans. Where one side made a path a file and the
//!    other put something below it, the directory wins (as in [`crate::proto::merge::lww`])
//!    and the file is recorded as the conflict's loser, restorable like any other.
//!
//! The base of the next merge between two branches must outlive GC retention:
//! [`next_merge_bases`] names those views for the collector.
//!
//! When the target changed nothing since the base, the merge is a fast-forward: the target
//! takes the source's versions of every changed path, and no conflict is possible.

use std::collections::BTreeSet;

use rusqlite::{params, Connection, OptionalExtension};

use super::outbox::Event;
use super::read::{self, View};
use super::tx::{Tx, DIR_MODE_DEFAULT};
use super::{Branch, StoreError, VersionRow};
use crate::proto::entry::{Entry, EntryKind, Version};
use crate::proto::ids::{OrderKey, VersionId};
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
    /// Paths the merge looked at: those changed on either side since the branches were last
    /// in step (the merge's cost follows this, not the size of the tree or its history).
    #[serde(default)]
    pub examined: u64,
}

/// The last merge between branches `a` and `b`, either direction: (merged from, its seq).
fn last_merge_point(conn: &Connection, a: i64, b: i64) -> Result<Option<(i64, i64)>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT from_branch, from_seq FROM merge_point
             WHERE (from_branch = ?1 AND into_branch = ?2) OR (from_branch = ?2 AND into_branch = ?1)
             ORDER BY into_seq DESC LIMIT 1",
        )?
        .query_row(params![a, b], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// The base view of a merge of `from` into `into`.
fn merge_base(conn: &Connection, from: &Branch, into: &Branch) -> Result<View, StoreError> {
    if let Some((merged_from, from_seq)) = last_merge_point(conn, from.id, into.id)? {
        let side = if merged_from == from.id { from } else { into };
        return View::at(conn, side, from_seq);
    }
    let (vf, vi) = (View::head(conn, from)?, View::head(conn, into)?);
    for lf in &vf.links {
        if let Some(li) = vi.link_of(lf.branch) {
            let common = super::branch_by_id(conn, lf.branch)?;
            return View::within(conn, &common, lf.seq_max.min(li.seq_max), lf.key_max.min(li.key_max));
        }
    }
    Ok(View::empty())
}

/// The bases the next merges between `live` branches will start from, for every two that
/// merged before: GC keeps what these views see. (Two branches that never merged start from
/// their common ancestor as of a fork, which a live branch's own view already reaches.)
pub fn next_merge_bases(conn: &Connection, live: &[Branch]) -> Result<Vec<View>, StoreError> {
    let by_id: std::collections::HashMap<i64, &Branch> = live.iter().map(|b| (b.id, b)).collect();
    let mut pairs = BTreeSet::new();
    let mut st = conn.prepare_cached("SELECT from_branch, into_branch FROM merge_point")?;
    for row in st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
        let (a, b) = row?;
        if by_id.contains_key(&a) && by_id.contains_key(&b) {
            pairs.insert((a.min(b), a.max(b)));
        }
    }
    let mut bases = Vec::with_capacity(pairs.len());
    for (a, b) in pairs {
        bases.push(merge_base(conn, by_id[&a], by_id[&b])?);
    }
    Ok(bases)
}

/// Deletes merge points no later merge will read: all but the last in each direction between
/// two branches (the last of either is the next base; the last of each is a scan floor), and
/// those of branches that no longer exist.
pub fn prune_merge_points(conn: &Connection) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "DELETE FROM merge_point WHERE
             NOT EXISTS (SELECT 1 FROM branch WHERE id = merge_point.from_branch AND deleted_seq IS NULL)
          OR NOT EXISTS (SELECT 1 FROM branch WHERE id = merge_point.into_branch AND deleted_seq IS NULL)
          OR EXISTS (SELECT 1 FROM merge_point later
                     WHERE later.from_branch = merge_point.from_branch AND later.into_branch = merge_point.into_branch
                       AND later.into_seq > merge_point.into_seq)",
        [],
    )?)
}

/// The last seq of `from` that a merge into `into` already took in (0 when none): rows of
/// `from` up to it were weighed by that merge, and `into` holds its result.
fn merged_upto(conn: &Connection, from: i64, into: i64) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT COALESCE(MAX(from_seq), 0) FROM merge_point WHERE from_branch = ?1 AND into_branch = ?2")?
        .query_row(params![from, into], |r| r.get(0))?)
}

/// Paths with rows that `view` sees and `base` does not, or the other way round, leaving
/// out each branch's rows up to its floor in `floors` (what an earlier merge already took
/// in): so the scan covers what changed since the two branches were last in step, not whole
/// histories. Two links of one branch differ by the rows that arrived between their seq
/// bounds and those ordered between their fork stamps.
fn changed_between(tx: &Tx<'_>, view: &View, base: &View, floors: &[(i64, i64)], upto: i64, out: &mut BTreeSet<TreePath>) -> Result<bool, StoreError> {
    let floor = |branch: i64| floors.iter().find(|(b, _)| *b == branch).map_or(0, |(_, seq)| *seq);
    let mut any = false;
    for (a, b) in [(view, base), (base, view)] {
        for l in &a.links {
            let hi = l.seq_max.min(upto);
            let other = b.link_of(l.branch);
            let lo = other.map_or(0, |o| o.seq_max).max(floor(l.branch)).min(hi);
            if hi > lo {
                let paths = read::changed_paths(tx.conn(), l.branch, lo, hi)?;
                any |= !paths.is_empty();
                out.extend(paths);
            }
            if let Some(o) = other.filter(|o| o.key_max < l.key_max) {
                let paths = read::changed_paths_by_key(tx.conn(), l.branch, &o.key_max, &l.key_max, floor(l.branch), hi)?;
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
        let base = merge_base(self.conn(), from, into)?;
        let (vf, vi) = (View::head(self.conn(), from)?, View::head(self.conn(), into)?);
        let floors = [(from.id, merged_upto(self.conn(), from.id, into.id)?), (into.id, merged_upto(self.conn(), into.id, from.id)?)];
        let mut candidates = BTreeSet::new();
        changed_between(self, &vf, &base, &floors, now_seq, &mut candidates)?;
        let into_changed = changed_between(self, &vi, &base, &floors, now_seq, &mut candidates)?;
        let mut report = MergeReport { fast_forward: !into_changed, examined: candidates.len() as u64, ..Default::default() };
        let first = self.clock() + 1;
        for path in &candidates {
            self.merge_path(from, into, &base, &vf, &vi, path, &mut report)?;
        }
        self.repair_shape(from, into, &candidates, &mut report)?;
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
        let now = self.stamp();
        let tomb = || Version { entry: None, written: now };
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
                self.record_conflict(from, into, path, lose, win)?;
                report.conflicts.push((path.clone(), winner));
            }
        }
        Ok(())
    }

    /// Writes `lose` then `win` at `path` on `into` and lists the pair as a conflict: the
    /// winner is the head, the loser a version `alkfs conflicts` names and `restore` brings back.
    fn record_conflict(&mut self, from: &Branch, into: &Branch, path: &TreePath, lose: Version, win: Version) -> Result<(), StoreError> {
        let loser_seq = self.insert_row(into.id, path, &lose, "conflict-loser")?;
        let winner_seq = self.insert_row(into.id, path, &win, "merge")?;
        self.conn().execute(
            "INSERT INTO conflict(branch_id, path, from_branch, winner_seq, loser_seq, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![into.id, path.as_str(), from.name, winner_seq, loser_seq, self.now_ms()],
        )?;
        Ok(())
    }

    /// Makes the merged branch a tree again. Every live candidate needs its ancestors to be
    /// live directories, and a candidate that ended as a file or tombstone with live paths
    /// below it needs to be a directory. A missing directory is recreated; a file where a
    /// directory is needed loses to it as a conflict (a directory beats a file, as in `lww`).
    fn repair_shape(&mut self, from: &Branch, into: &Branch, candidates: &BTreeSet<TreePath>, report: &mut MergeReport) -> Result<(), StoreError> {
        let view = View::head(self.conn(), into)?;
        let is_dir = |row: &VersionRow| row.entry().is_some_and(|e| e.kind == EntryKind::Dir);
        let mut needed = BTreeSet::new();
        for path in candidates {
            let row = read::live(self.conn(), &view, path)?;
            if row.is_some() {
                needed.extend(path.ancestors());
            }
            if !row.as_ref().is_some_and(is_dir) && !read::subtree(self.conn(), &view, path)?.is_empty() {
                needed.insert(path.clone());
            }
        }
        let now = self.stamp();
        let fresh_dir = || Version { entry: Some(Entry::dir(DIR_MODE_DEFAULT, now.ms)), written: now };
        // Parents before children (BTreeSet order), so each repair sees its parent repaired.
        for dir in needed {
            match read::live(self.conn(), &view, &dir)? {
                Some(row) if is_dir(&row) => {}
                None => {
                    self.insert_row(into.id, &dir, &fresh_dir(), "merge")?;
                }
                Some(file) => {
                    let file_from_source =
                        report.taken.contains(&dir) || report.conflicts.iter().any(|(p, w)| p == &dir && *w == Side::Source);
                    self.record_conflict(from, into, &dir, file.version, fresh_dir())?;
                    report.conflicts.push((dir, if file_from_source { Side::Target } else { Side::Source }));
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
    /// The version that became the head (its local seq).
    pub winner_seq: i64,
    /// The losing version (its local seq).
    pub loser_seq: i64,
    /// The winner's name on every node (`None` once retention dropped it).
    pub winner: Option<VersionId>,
    /// The loser's name on every node, restorable with `alkfs restore PATH --version ID`.
    pub loser: Option<VersionId>,
    /// When the merge ran.
    pub at_ms: i64,
}

/// Conflicts recorded on `branch`, newest first.
pub fn conflicts(conn: &rusqlite::Connection, branch: &Branch) -> Result<Vec<ConflictRow>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT c.path, c.from_branch, c.winner_seq, c.loser_seq, c.at_ms, w.vkey, l.vkey FROM conflict c
         LEFT JOIN version w ON w.seq = c.winner_seq LEFT JOIN version l ON l.seq = c.loser_seq
         WHERE c.branch_id = ?1 ORDER BY c.id DESC",
    )?;
    let id = |b: Option<Vec<u8>>| b.and_then(|b| OrderKey::from_bytes(&b)).map(|k| k.version());
    let rows = st.query_map([branch.id], |r| {
        Ok(ConflictRow {
            path: r.get(0)?,
            from_branch: r.get(1)?,
            winner_seq: r.get(2)?,
            loser_seq: r.get(3)?,
            at_ms: r.get(4)?,
            winner: id(r.get(5)?),
            loser: id(r.get(6)?),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Takes conflicts off `branch`'s list: the one at `path`, or all of them. Their versions then
/// fall under ordinary retention. Returns how many were dismissed.
pub fn dismiss_conflicts(conn: &Connection, branch: &Branch, path: Option<&TreePath>) -> Result<usize, StoreError> {
    // A loser stays a loser when more versions of its path arrive: remember it was
    // dismissed, or the next arrival would list it again.
    conn.execute(
        "INSERT OR IGNORE INTO conflict_dismissed(loser_key)
         SELECT v.vkey FROM conflict c JOIN version v ON v.seq = c.loser_seq
         WHERE c.branch_id = ?1 AND (?2 IS NULL OR c.path = ?2)",
        params![branch.id, path.map(|p| p.as_str())],
    )?;
    let n = match path {
        Some(p) => conn.execute("DELETE FROM conflict WHERE branch_id = ?1 AND path = ?2", params![branch.id, p.as_str()])?,
        None => conn.execute("DELETE FROM conflict WHERE branch_id = ?1", [branch.id])?,
    };
    Ok(n)
}
