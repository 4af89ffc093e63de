//! Directories a mount made, and the names it made in them since: any other name there is
//! known to be absent without asking the tree.
//!
//! Why: unpacking a tree (`tar x`, `cp -r`, `git checkout`) makes each directory and then
//! files in it. Every new file costs a lookup of a name that is not there and a create that
//! checks its parent and the name again: three reads of SQLite per file, each paying its
//! locks, in a burst where the node's commits keep emptying the reader's page cache. In a
//! directory this mount made, the answer is known.
//!
//! What keeps it true: a directory is recorded only when the mount makes it and the tree
//! shows nothing in it; names made through the mount are added before they can show; and a
//! change from elsewhere (a peer, the CLI, SFTP, another mount) drops the record of the
//! directory it touched as the mount's outbox follower sees it ([`super::invalidate`]). Until
//! then, for the follower's poll interval, a name just made elsewhere in such a directory
//! looks absent: as a kernel's negative name cache would, and a create over it is a
//! concurrent write that last-writer-wins settles, the other version kept in history.
//! Nothing is recorded where no follower runs (SFTP, read-only mounts).

use std::collections::{HashMap, HashSet};

use alknet_actors::proto::path::TreePath;

/// Names recorded in all directories together before the records are dropped (a mount
/// making millions of files goes back to asking the tree, at no more memory than this).
pub const NAMES_MAX: usize = 200_000;

/// Directories made here, with the names made in each since.
#[derive(Default)]
pub struct FreshDirs {
    dirs: HashMap<TreePath, HashSet<String>>,
    names: usize,
    /// Counts the records dropped: a directory is recorded only if none was dropped since
    /// the mount looked into it, or a change seen meanwhile would be lost.
    epoch: u64,
}

impl FreshDirs {
    /// The epoch to give [`made`](Self::made): read it before looking into the directory.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// `dir` was just made here, and the tree showed nothing in it when looked at in
    /// `epoch`. Not recorded when a change was seen since (it may be in there).
    pub fn made(&mut self, dir: &TreePath, epoch: u64) {
        if epoch != self.epoch {
            return;
        }
        if self.names + self.dirs.len() >= NAMES_MAX {
            self.clear();
        }
        self.dirs.insert(dir.clone(), HashSet::new());
    }

    /// `path` is being made here (a file, directory or link, or a rename's target): from
    /// now on its name may be in the tree.
    pub fn named(&mut self, path: &TreePath) {
        let Some(parent) = path.parent() else { return };
        if let Some(names) = self.dirs.get_mut(&parent) {
            if names.insert(path.name().to_string()) {
                self.names += 1;
            }
        }
        if self.names + self.dirs.len() > NAMES_MAX {
            self.clear();
        }
    }

    /// True when `path` is known to be absent from the tree: its parent was made here and
    /// the name was never made in it.
    pub fn absent(&self, path: &TreePath) -> bool {
        path.parent().and_then(|p| self.dirs.get(&p)).is_some_and(|names| !names.contains(path.name()))
    }

    /// True when `dir` is a directory made here (and not removed, renamed or changed
    /// elsewhere since).
    pub fn is_fresh(&self, dir: &TreePath) -> bool {
        self.dirs.contains_key(dir)
    }

    /// `path` changed elsewhere, in a way the records do not follow: the records of every
    /// directory above it go (the store makes missing parents of what it writes, and an
    /// event names only the deepest path), and those of it and below it.
    pub fn forget(&mut self, path: &TreePath) {
        for dir in path.ancestors() {
            if let Some(names) = self.dirs.remove(&dir) {
                self.names -= names.len();
            }
        }
        self.forget_below(path);
    }

    /// The records of `path` and below it go (it was removed or renamed here; its
    /// directory's record stays: the name is in it already, or was never made).
    pub fn forget_below(&mut self, path: &TreePath) {
        self.epoch += 1;
        if self.dirs.keys().any(|d| d.is_within(path)) {
            let mut dropped = 0;
            self.dirs.retain(|d, names| {
                let keep = !d.is_within(path);
                if !keep {
                    dropped += names.len();
                }
                keep
            });
            self.names -= dropped;
        }
    }

    /// Anything may have changed (a merge into the branch): every record goes.
    pub fn clear(&mut self) {
        self.epoch += 1;
        self.dirs.clear();
        self.names = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TreePath {
        TreePath::parse(s).unwrap()
    }

    #[test]
    fn only_names_never_made_in_a_directory_made_here_are_known_absent() {
        let mut f = FreshDirs::default();
        assert!(!f.absent(&p("/d/x")), "nothing is known of a directory not made here");
        f.made(&p("/d"), f.epoch());
        assert!(f.absent(&p("/d/x")));
        f.named(&p("/d/x"));
        assert!(!f.absent(&p("/d/x")), "a name made here may be in the tree");
        assert!(f.absent(&p("/d/y")));
        assert!(!f.absent(&p("/d/sub/z")), "a subdirectory not made here");
        f.named(&p("/d/sub"));
        f.made(&p("/d/sub"), f.epoch());
        assert!(f.absent(&p("/d/sub/z")));
        assert!(f.is_fresh(&p("/d/sub")));
    }

    #[test]
    fn a_change_not_followed_drops_its_directory_and_everything_below() {
        let mut f = FreshDirs::default();
        for d in ["/a", "/a/b", "/a/b/c", "/e"] {
            f.made(&p(d), f.epoch());
        }
        f.named(&p("/a/b/c/file"));
        f.forget(&p("/a/b/new-elsewhere"));
        assert!(!f.is_fresh(&p("/a/b")), "the directory that changed");
        assert!(f.is_fresh(&p("/a/b/c")), "a directory below it keeps its record");
        f.forget(&p("/e/made/with/parents"));
        assert!(!f.is_fresh(&p("/e")), "parents made by the store show only in the deepest path");
        f.made(&p("/e"), f.epoch());
        f.forget(&p("/a"));
        assert!(!f.is_fresh(&p("/a/b/c")), "below a removed or renamed directory");
        assert!(f.is_fresh(&p("/e")));
        assert_eq!(f.names, 0, "the names counted went with their directories");
        f.clear();
        assert!(!f.is_fresh(&p("/e")));
        let before = f.epoch();
        f.forget(&p("/x/changed-while-looking"));
        f.made(&p("/x"), before);
        assert!(!f.is_fresh(&p("/x")), "a change seen while the mount looked into it");
    }

    #[test]
    fn the_records_stay_within_their_bound() {
        let mut f = FreshDirs::default();
        f.made(&p("/big"), f.epoch());
        for i in 0..NAMES_MAX + 10 {
            f.named(&p(&format!("/big/f{i}")));
        }
        assert!(f.names + f.dirs.len() <= NAMES_MAX);
        assert!(!f.absent(&p("/big/f1")), "past the bound nothing is known absent");
    }
}
