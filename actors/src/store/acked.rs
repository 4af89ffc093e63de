//! Writes acknowledged before they commit: a mount's closed files, new directories and
//! directory attribute changes (its write-behind queue, or the journal of a mount that
//! died). The program was told they succeeded, so nothing that happened meanwhile may drop
//! them:
//!
//! - **The version its writer opened.** A write names as its predecessor the version its
//!   writer opened (or the path's state when it saw it absent), not the head at commit: a
//!   version that arrived meanwhile (a peer's save) is concurrent with it, and the loser is
//!   listed by `conflicts` (on every node: the rule is `proto::replica::path_outcome`).
//! - **The tree's shape.** A directory removed elsewhere comes back; a file or symlink where
//!   a directory is needed loses to the directory; a file written where a directory now
//!   stands loses to the directory. The directory is a repair (`store::shape`) naming what
//!   lost, which `conflicts` lists and `restore` brings back.
//! - **Once.** Each change carries the id its mount gave it, recorded with what it wrote
//!   (`acked_change`): a change sent again (a lost reply, a journal adopted twice) is not
//!   applied twice.

use rusqlite::{params, OptionalExtension};

use super::outbox::Event;
use super::read::{self, View};
use super::{Branch, StoreError, Tx, VersionRow};
use crate::proto::entry::{Entry, EntryKind, Version};
use crate::proto::ids::VersionId;
use crate::proto::path::TreePath;
use crate::proto::replica::Origin;

/// What a write replaces, as its writer saw the path: its predecessor.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seen {
    /// Whatever the branch holds when the write commits (a write that read nothing first).
    AtCommit,
    /// The branch's own newest version of the path when the writer opened it (`None`: it
    /// had none, or saw the path absent), whatever arrived since.
    Opened(Option<VersionId>),
    /// The version an earlier acknowledged change (by its id) wrote; `or` if that change
    /// never committed (the writer had opened `or` before it).
    After {
        /// The earlier change's id.
        change: String,
        /// What the writer had opened before that change.
        or: Option<VersionId>,
    },
}

/// What a path is when a write of it commits.
pub(crate) struct PathNow {
    /// Its newest row in the view (a deletion included).
    pub shown: Option<VersionRow>,
    /// The branch's own head of it.
    pub own: Option<VersionId>,
    /// The predecessor the writer's [`Seen`] names.
    pub pred: Option<VersionId>,
}

impl Tx<'_> {
    /// What acknowledged change `id` wrote (a version's seq, 0 for nothing), if it was
    /// applied before.
    pub fn acked(&self, id: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.conn().prepare_cached("SELECT seq FROM acked_change WHERE id = ?1")?.query_row([id], |r| r.get(0)).optional()?)
    }

    /// Records acknowledged change `id` as applied, having written `seq` (0: nothing).
    pub fn record_acked(&mut self, id: &str, seq: i64) -> Result<(), StoreError> {
        let at = self.now_ms();
        self.conn().prepare_cached("INSERT OR IGNORE INTO acked_change(id, seq, at_ms) VALUES (?1, ?2, ?3)")?.execute(params![id, seq, at])?;
        Ok(())
    }

    /// The predecessor `seen` names, the branch's own head of the path being `own` (its id,
    /// and whether it is a deletion). A writer that saw the path absent replaces a deletion
    /// at its head: absent is what it saw (a mount that knows a name absent without reading
    /// the tree says `Opened(None)`).
    fn pred_of(&self, own: Option<(VersionId, bool)>, seen: &Seen) -> Result<Option<VersionId>, StoreError> {
        Ok(match seen {
            Seen::AtCommit => own.map(|(id, _)| id),
            Seen::Opened(None) => own.filter(|(_, deleted)| *deleted).map(|(id, _)| id),
            Seen::Opened(v) => *v,
            Seen::After { change, or } => match self.acked(change)?.filter(|s| *s > 0) {
                Some(seq) => Some(VersionId { node: self.me(), seq }),
                None => *or,
            },
        })
    }

    /// What `path` is when a write of it commits, in one read (the head view's first link
    /// is the branch's own rows, unbounded).
    pub(crate) fn path_now(&self, branch: &Branch, view: &View, path: &TreePath, seen: &Seen) -> Result<PathNow, StoreError> {
        let shown = read::resolve(self.conn(), view, path)?;
        let own = shown.as_ref().filter(|r| r.branch_id == branch.id).map(|r| (r.id(), r.version.entry.is_none()));
        let pred = self.pred_of(own, seen)?;
        Ok(PathNow { shown, own: own.map(|(id, _)| id), pred })
    }

    /// Writes a file or symlink `entry` at `path` for a write acknowledged before its commit
    /// (see the module's notes): never refused for the tree's shape. Returns the seq of the
    /// version holding `entry` (a listed loser when a directory took the path meanwhile).
    pub fn put_acked(&mut self, branch: &Branch, path: &TreePath, entry: Entry, seen: &Seen) -> Result<i64, StoreError> {
        if path.is_root() || entry.kind == EntryKind::Dir {
            return Err(StoreError::Invalid(format!("{path}: an acknowledged write is of a file or symlink below the root")));
        }
        let view = View::head(self.conn(), branch)?;
        let first = self.clock() + 1;
        self.make_parents(branch, &view, path)?;
        let PathNow { shown: cur, own, pred } = self.path_now(branch, &view, path, seen)?;
        let (kind, hash, size) = (entry.kind, entry.hash, entry.size);
        let version = Version { entry: Some(entry), written: self.stamp() };
        let (seq, lost) = match cur.filter(|r| r.version.entry.is_some()) {
            Some(dir) if dir.entry().is_some_and(|e| e.kind == EntryKind::Dir) => {
                // A directory took the path meanwhile: the write loses to it, kept and listed
                // (the directory, written again as a repair, names the write).
                let write = self.insert_row_with_pred(branch.id, path, &version, Origin::Write.as_str(), pred)?;
                let again = Version { entry: dir.version.entry.clone(), written: self.stamp() };
                self.insert_row(branch.id, path, &again, Origin::Repair.as_str())?;
                (write, true)
            }
            _ => (self.insert_row_with_pred(branch.id, path, &version, Origin::Write.as_str(), pred)?, false),
        };
        if lost || pred != own {
            self.relist_conflicts(branch.id, path)?;
        }
        self.emit(Event::write(branch, first, self.clock(), path, kind, hash, size));
        Ok(seq)
    }

    /// Makes directory `path` (and its parents) for a mkdir acknowledged before its commit:
    /// a directory there already is kept (0 is returned), a file or symlink there loses to
    /// the new directory, listed. Returns the new directory version's seq.
    pub fn mkdir_acked(&mut self, branch: &Branch, path: &TreePath, mode: u32, mtime_ms: i64) -> Result<i64, StoreError> {
        if path.is_root() {
            return Ok(0);
        }
        let view = View::head(self.conn(), branch)?;
        let first = self.clock() + 1;
        self.make_parents(branch, &view, path)?;
        let seq = match read::live(self.conn(), &view, path)? {
            Some(row) if row.entry().is_some_and(|e| e.kind == EntryKind::Dir) => return Ok(0),
            Some(_) => self.make_dir(branch, &view, path, mode, mtime_ms)?.unwrap_or(0),
            None => {
                let v = Version { entry: Some(Entry::dir(mode, mtime_ms)), written: self.stamp() };
                self.insert_row(branch.id, path, &v, Origin::Mkdir.as_str())?
            }
        };
        self.emit(Event::path_op("mkdir", branch, first, self.clock(), path));
        Ok(seq)
    }
}
