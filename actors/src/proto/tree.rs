//! A bucket's replicated tree in memory: the set of [`Change`]s a node holds, and what it
//! shows from them by the rules of [`super::replica`] (the head of each path, the conflict
//! losers). The node keeps the same set in SQLite and applies the same rule
//! ([`path_outcome`]) there; the simulations keep it here, so many nodes fit in one thread.
//!
//! The set only grows, and what a node shows depends on the set alone, never on the order
//! changes arrived in: that is what makes replicas that hold the same changes show the same
//! tree.

use std::collections::{BTreeMap, BTreeSet};

use super::entry::{Entry, Version};
use super::ids::{OrderKey, Uid, VersionId};
use super::limits::BRANCH_CHAIN_DEPTH_MAX;
use super::path::TreePath;
use super::replica::{path_outcome, BranchRecord, Change, LoserKind, Origin, PathVersion};

/// What a branch reads: itself (all of it), then each ancestor up to the key its fork bounds
/// it at (the earliest fork on the way), nearest first, as the store's views read.
pub type Chain = Vec<(Uid, OrderKey)>;

/// A conflict loser as every node lists it: the path, the losing version, the version that
/// beat it, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    /// The path.
    pub path: TreePath,
    /// The version that lost (kept, restorable).
    pub loser: VersionId,
    /// The version that beat it.
    pub winner: VersionId,
    /// Written concurrently with the winner, or the side a merge did not take.
    pub merge: bool,
}

/// A listed loser as the rule names it: (loser, the version that beat it, why).
type Loser<'a> = (&'a Change, &'a Change, LoserKind);

/// The replicated changes of one bucket, by branch and path.
#[derive(Clone, Debug, Default)]
pub struct ReplicaTree {
    changes: BTreeMap<VersionId, Change>,
    paths: BTreeMap<(Uid, TreePath), Vec<VersionId>>,
}

impl ReplicaTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a change; false if it was already here (delivery may repeat).
    pub fn insert(&mut self, change: Change) -> bool {
        let id = change.id();
        if self.changes.contains_key(&id) {
            return false;
        }
        let ids = self.paths.entry((change.branch, change.path.clone())).or_default();
        let at = ids.partition_point(|x| *x < id);
        ids.insert(at, id);
        self.changes.insert(id, change);
        true
    }

    /// Takes version `id` out (its writer is no longer accepted: see
    /// [`super::membership`]); what the tree shows is then as if it had never arrived.
    pub fn remove(&mut self, id: &VersionId) -> Option<Change> {
        let change = self.changes.remove(id)?;
        let key = (change.branch, change.path.clone());
        if let Some(ids) = self.paths.get_mut(&key) {
            ids.retain(|x| x != id);
            if ids.is_empty() {
                self.paths.remove(&key);
            }
        }
        Some(change)
    }

    /// Whether version `id` is here.
    pub fn contains(&self, id: &VersionId) -> bool {
        self.changes.contains_key(id)
    }

    /// Version `id`, if here.
    pub fn get(&self, id: &VersionId) -> Option<&Change> {
        self.changes.get(id)
    }

    /// Every change, in version-id order.
    pub fn changes(&self) -> impl Iterator<Item = &Change> {
        self.changes.values()
    }

    /// How many changes it holds.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// True when it holds no change.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The versions of `path` on `branch`, in version-id order (not arrival order).
    pub fn versions(&self, branch: &Uid, path: &TreePath) -> Vec<&Change> {
        match self.paths.get(&(*branch, path.clone())) {
            Some(ids) => ids.iter().map(|id| &self.changes[id]).collect(),
            None => Vec::new(),
        }
    }

    fn outcome_of<'a>(versions: &[&'a Change]) -> Option<(&'a Change, Vec<Loser<'a>>)> {
        let input: Vec<PathVersion> = versions.iter().map(|c| PathVersion::of(c)).collect();
        let outcome = path_outcome(&input)?;
        let losers = outcome.losers.iter().map(|&(l, w, kind)| (versions[l], versions[w], kind)).collect();
        Some((versions[outcome.head], losers))
    }

    /// The version `path` on `branch` reads as (a tombstone when deleted), if it has any.
    pub fn head(&self, branch: &Uid, path: &TreePath) -> Option<&Change> {
        Self::outcome_of(&self.versions(branch, path)).map(|(head, _)| head)
    }

    /// The chain branch `branch` reads through, from the branch records (`None` while a
    /// record of the chain has not arrived, or past the depth the store allows).
    pub fn chain(records: &BTreeMap<Uid, BranchRecord>, branch: &Uid) -> Option<Chain> {
        let mut out = vec![(*branch, OrderKey::MAX)];
        let mut bound = OrderKey::MAX;
        let mut rec = records.get(branch)?;
        while let (Some(parent), Some(fork)) = (rec.parent, rec.fork) {
            if out.len() > BRANCH_CHAIN_DEPTH_MAX {
                return None;
            }
            bound = bound.min(fork);
            out.push((parent, bound));
            rec = records.get(&parent)?;
        }
        Some(out)
    }

    /// The version `path` reads as through `chain`: the head of the nearest link that has a
    /// version of it within its bound (a tombstone stops the fall).
    pub fn head_in(&self, chain: &[(Uid, OrderKey)], path: &TreePath) -> Option<&Change> {
        chain.iter().find_map(|(branch, bound)| {
            let versions: Vec<&Change> = self.versions(branch, path).into_iter().filter(|c| c.key <= *bound).collect();
            Self::outcome_of(&versions).map(|(head, _)| head)
        })
    }

    /// The version each live path reads as through `chain`.
    pub fn heads_in(&self, chain: &[(Uid, OrderKey)]) -> BTreeMap<TreePath, &Change> {
        let paths: BTreeSet<&TreePath> = self.paths.keys().filter(|(b, _)| chain.iter().any(|(c, _)| c == b)).map(|(_, p)| p).collect();
        paths.into_iter().filter_map(|p| Some((p.clone(), self.head_in(chain, p).filter(|h| h.version.entry.is_some())?))).collect()
    }

    /// Every live path read through `chain`, and its entry.
    pub fn listing_in(&self, chain: &[(Uid, OrderKey)]) -> BTreeMap<TreePath, Entry> {
        self.heads_in(chain).into_iter().filter_map(|(p, h)| Some((p, h.version.entry.clone()?))).collect()
    }

    /// Every live path of `branch` and its entry.
    pub fn listing(&self, branch: &Uid) -> BTreeMap<TreePath, Entry> {
        let mut out = BTreeMap::new();
        for (b, path) in self.paths.keys() {
            if b != branch {
                continue;
            }
            if let Some(entry) = self.head(b, path).and_then(|h| h.version.entry.clone()) {
                out.insert(path.clone(), entry);
            }
        }
        out
    }

    /// The conflict losers of `branch`, sorted.
    pub fn conflicts(&self, branch: &Uid) -> Vec<Conflict> {
        let mut out = Vec::new();
        for (b, path) in self.paths.keys() {
            if b != branch {
                continue;
            }
            if let Some((_, losers)) = Self::outcome_of(&self.versions(b, path)) {
                for (loser, winner, kind) in losers {
                    out.push(Conflict { path: path.clone(), loser: loser.id(), winner: winner.id(), merge: kind == LoserKind::Merge });
                }
            }
        }
        out.sort();
        out
    }

    /// The change a local write of `version` to `path` on `branch` replicates as: it names
    /// the path's current head as what it replaced (the writer saw it), and is ordered by
    /// `key` (stamped by the writer's [`Hlc`](super::clock::Hlc) after all it has seen).
    pub fn local_change(&self, branch: Uid, path: TreePath, key: OrderKey, version: Version, origin: Origin) -> Change {
        let pred = self.head(&branch, &path).map(Change::id);
        Change { branch, path, key, pred, version, origin, commit: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::clock::Stamp;
    use crate::proto::entry::{ContentHash, EntryKind};
    use crate::proto::ids::NodeId;

    fn file(byte: u8) -> Version {
        Version { entry: Some(Entry { kind: EntryKind::File, hash: ContentHash([byte; 32]), size: 1, mode: 0o644, mtime_ms: 0 }), written: Stamp::default() }
    }

    fn key(ms: i64, node: u8, seq: i64) -> OrderKey {
        OrderKey::new(Stamp::at(ms), &VersionId { node: NodeId([node; 32]), seq })
    }

    #[test]
    fn replicas_holding_the_same_changes_show_the_same_tree_in_any_order_of_arrival() {
        let (branch, path) = (Uid([1; 16]), TreePath::parse("/a").unwrap());
        let empty = ReplicaTree::new();
        let base = empty.local_change(branch, path.clone(), key(10, 1, 1), file(1), Origin::Write);
        let mut seen = ReplicaTree::new();
        seen.insert(base.clone());
        // Two writers that both saw `base`, unaware of each other; one's clock is behind.
        let x = seen.local_change(branch, path.clone(), key(20, 2, 1), file(2), Origin::Write);
        let y = seen.local_change(branch, path.clone(), key(15, 3, 1), file(3), Origin::Write);
        let orders = [[&base, &x, &y], [&y, &x, &base], [&x, &base, &y]];
        let results: Vec<_> = orders
            .iter()
            .map(|order| {
                let mut t = ReplicaTree::new();
                for c in order {
                    t.insert((*c).clone());
                    t.insert((*c).clone());
                }
                (t.listing(&branch), t.conflicts(&branch))
            })
            .collect();
        assert!(results.windows(2).all(|w| w[0] == w[1]));
        let (listing, conflicts) = &results[0];
        assert_eq!(listing[&path].hash, ContentHash([2; 32]), "the later stamp wins");
        assert_eq!(conflicts.len(), 1);
        assert_eq!((conflicts[0].loser, conflicts[0].winner), (y.id(), x.id()));
    }

    #[test]
    fn a_branch_reads_its_parent_as_it_was_at_the_fork_and_its_own_tombstones_stop_the_fall() {
        let (main, feat) = (Uid([1; 16]), Uid([2; 16]));
        let (a, b) = (TreePath::parse("/a").unwrap(), TreePath::parse("/b").unwrap());
        let mut t = ReplicaTree::new();
        for (path, k, byte) in [(&a, key(10, 1, 1), 1), (&b, key(10, 1, 2), 2)] {
            let c = t.local_change(main, path.clone(), k, file(byte), Origin::Write);
            t.insert(c);
        }
        let fork = OrderKey::upto(Stamp::at(20));
        let records: BTreeMap<Uid, BranchRecord> = [
            (main, BranchRecord { uid: main, name: "main".into(), parent: None, fork: None, created_ms: 0 }),
            (feat, BranchRecord { uid: feat, name: "feat".into(), parent: Some(main), fork: Some(fork), created_ms: 20 }),
        ]
        .into();
        // After the fork: main rewrites /a; feat deletes /b.
        let later = t.local_change(main, a.clone(), key(30, 1, 3), file(3), Origin::Write);
        t.insert(later);
        let gone = t.local_change(feat, b.clone(), key(30, 2, 1), Version { entry: None, written: Stamp::default() }, Origin::Delete);
        t.insert(gone);
        let chain = ReplicaTree::chain(&records, &feat).unwrap();
        let listing = t.listing_in(&chain);
        assert_eq!(listing.keys().collect::<Vec<_>>(), [&a], "the delete on feat hides main's /b");
        assert_eq!(listing[&a].hash, ContentHash([1; 32]), "main's write after the fork is not seen");
        assert_eq!(t.listing_in(&ReplicaTree::chain(&records, &main).unwrap())[&a].hash, ContentHash([3; 32]));
        assert!(ReplicaTree::chain(&records, &Uid([9; 16])).is_none(), "no record, no view");
    }

    #[test]
    fn a_write_after_seeing_a_version_supersedes_it_whatever_its_stamp() {
        let (branch, path) = (Uid([1; 16]), TreePath::parse("/a").unwrap());
        let mut t = ReplicaTree::new();
        let first = t.local_change(branch, path.clone(), key(50, 1, 1), file(1), Origin::Write);
        t.insert(first.clone());
        let second = t.local_change(branch, path.clone(), key(60, 2, 1), Version { entry: None, written: Stamp::default() }, Origin::Delete);
        t.insert(second.clone());
        assert_eq!(second.pred, Some(first.id()), "the delete names the write it saw");
        assert!(t.listing(&branch).is_empty(), "deleted");
        assert!(t.conflicts(&branch).is_empty(), "no conflict: the delete saw the write");
    }
}
