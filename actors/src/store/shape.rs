//! The tree's shape: every live path's ancestors are live directories. Versions from peers
//! can break it: A removes `/d` (or moves it away, or puts a file there) while B, out of
//! reach, writes `/d/f`; once both are here, `/d/f` is live below a deletion or a file, and
//! `ls` would show no way to it. A node that applies versions leaving such a path repairs
//! the shape in the same transaction, as a merge does: the missing directory comes back, a
//! file or symlink in a directory's way loses to it (listed by `conflicts`, restorable). A
//! repair is a version of this node's (origin `repair`), published like any other write.
//!
//! Every node that sees the shape broken writes its own repair, so a path may get several;
//! they are directories beaten by a directory, which the winner rule does not list
//! (`proto::replica::path_outcome`), and the file they replace is listed once, whichever
//! repairs name it. Whatever the order of arrival, each node ends with the same versions,
//! and so the same tree.

use std::collections::BTreeSet;

use super::outbox::Event;
use super::read::{self, View};
use super::tx::DIR_MODE_DEFAULT;
use super::{Branch, StoreError, Tx};
use crate::proto::entry::{Entry, EntryKind, Version};
use crate::proto::path::TreePath;
use crate::proto::replica::Origin;

impl Tx<'_> {
    /// After versions arrived at `touched` paths of `branch`: makes a directory of every
    /// path a live one needs as its ancestor, and of every touched path that is no
    /// directory but has live children. Returns how many repairs it wrote (one `repair`
    /// outbox event names them).
    pub(crate) fn repair_arrivals(&mut self, branch: &Branch, touched: &BTreeSet<TreePath>) -> Result<usize, StoreError> {
        let view = View::head(self.conn(), branch)?;
        let mut needed: BTreeSet<TreePath> = BTreeSet::new();
        for path in touched {
            let row = read::live(self.conn(), &view, path)?;
            if row.is_some() {
                needed.extend(path.ancestors().into_iter().filter(|a| !a.is_root()));
            }
            let is_dir = row.as_ref().is_some_and(|r| r.entry().is_some_and(|e| e.kind == EntryKind::Dir));
            if !is_dir && read::list(self.conn(), &view, path)?.iter().any(|r| r.version.entry.is_some()) {
                needed.insert(path.clone());
                needed.extend(path.ancestors().into_iter().filter(|a| !a.is_root()));
            }
        }
        let first = self.clock() + 1;
        let mut repaired = 0;
        // Parents first (a prefix sorts first), so each repair stands on a repaired parent.
        for dir in &needed {
            let now = self.now_ms();
            if self.make_dir(branch, &view, dir, DIR_MODE_DEFAULT, now)?.is_some() {
                repaired += 1;
            }
        }
        if repaired > 0 {
            tracing::info!(branch = %branch.name, repaired, "versions from peers left paths below a deletion or a file; their directories were made again");
            self.emit(Event::path_op("repair", branch, first, self.clock(), needed.first().expect("repaired one")));
        }
        Ok(repaired)
    }

    /// Makes `dir` a live directory (`mode`, `mtime_ms`) unless it is one: a repair over
    /// what is there, a deletion or a file or symlink (which it names, and which is then a
    /// listed loser). Returns the repair's seq, `None` when `dir` was a directory already.
    pub(crate) fn make_dir(&mut self, branch: &Branch, view: &View, dir: &TreePath, mode: u32, mtime_ms: i64) -> Result<Option<i64>, StoreError> {
        if dir.is_root() || self.is_known_dir(branch.id, dir) {
            return Ok(None);
        }
        let was = read::live(self.conn(), view, dir)?;
        if was.as_ref().is_some_and(|r| r.entry().is_some_and(|e| e.kind == EntryKind::Dir)) {
            // A batch of a mount's files in one directory reads it once.
            self.note_dir(branch.id, dir);
            return Ok(None);
        }
        let v = Version { entry: Some(Entry::dir(mode, mtime_ms)), written: self.stamp() };
        let seq = self.insert_row(branch.id, dir, &v, Origin::Repair.as_str())?;
        // What it replaced may now be listed (a file), or no longer (directories that had
        // lost to a deletion lose to a directory now, which lists nothing).
        self.relist_conflicts(branch.id, dir)?;
        Ok(Some(seq))
    }

    /// Makes every ancestor of `path` a live directory (see [`make_dir`](Self::make_dir)).
    pub(crate) fn make_parents(&mut self, branch: &Branch, view: &View, path: &TreePath) -> Result<(), StoreError> {
        for dir in path.ancestors() {
            let now = self.now_ms();
            self.make_dir(branch, view, &dir, DIR_MODE_DEFAULT, now)?;
        }
        Ok(())
    }
}
