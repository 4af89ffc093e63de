//! Which versions a compacted bucket keeps: the first piece of bounded storage (ARCHITECTURE.md,
//! "Keeping documents bounded").
//!
//! Automerge keeps every op, and a bucket's shards hold a key per version ever written, so a
//! bucket whose few paths churn grows without end. An epoch replaces the shards with documents
//! holding only what a node needs to show every branch as it is shown now: [`kept`] is that
//! set. It is a pure function of the versions and branch records at heads every member agreed
//! on, so each member derives the same set (and from it byte-identical documents) with no
//! member trusted to choose what others lose.
//!
//! What must not change is what [`path_outcome`] decides, for every path on every branch, in
//! every view a node can take of it: the branch's own (everything) and each descendant's
//! (the branch's versions up to a fork key, the least along the chain of forks down to that
//! descendant). For one path on one branch the rule reads: which versions are tips (nobody
//! names them as predecessor), the merge losers, and for a version named by others, the
//! first that names it, the first repair that does, and whether any non-repair does. So:
//!
//! - every version that is a tip in some view is kept (a version is a tip in the views whose
//!   bound lies at or past its key and before the first version that names it), and so is
//!   every merge loser and every file or symlink a repair names (a shape loser in some view);
//! - every kept version keeps the first version that names it, the first repair that names
//!   it, and the first non-repair that names it: then in every view it is named exactly when
//!   it was, first by the same version, knowingly or not as before;
//!
//! repeated until nothing is added. A path written over and over on one branch keeps its head;
//! history a view can still see (behind a fork, or a conflict nobody resolved) stays.
//!
//! Operations are not kept whole: an operation's versions on other paths may have been
//! replaced since (keeping them would keep every version that replaced them, and so on to
//! the heads: all history). A receiver applies what a genesis holds as it comes, not waiting
//! for the rest of its operations, which were applied everywhere long before
//! (`engine::mesh`, by the genesis's actor, [`EpochBase::genesis_actor`]).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::ids::{NodeId, OrderKey, Uid, VersionId};
use super::limits::BRANCH_CHAIN_DEPTH_MAX;
use super::path::TreePath;
use super::replica::{BranchRecord, Change, Origin, PathVersion, SHARDS};

/// The most heads a shard of an announced epoch may have (concurrent writers at the cut).
pub const EPOCH_HEADS_MAX: usize = 256;

/// The highest epoch: an announced one past it is refused (no counter a peer names can be
/// made to overflow here).
pub const EPOCH_MAX: u32 = u32::MAX / 2;

/// The most writers a shard of an announced epoch may name.
pub const EPOCH_WRITERS_MAX: usize = 4096;

/// An epoch of a bucket's shards as a member announces it: its number, the heads of each
/// shard (of the epoch before) it was derived from, and for each shard the highest seq of
/// each writer's versions those heads held. A member that holds every head derives the
/// epoch itself ([`kept`] at those heads, [`super::doc::ReplicaDoc::genesis`]); one that
/// does not (it was away) starts the epoch from nothing, receives its documents whole, and
/// puts back what it holds past `seen` (written after the cut, so no peer compacted it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochBase {
    /// The epoch (the first compaction makes epoch 1).
    pub epoch: u32,
    /// Per shard, the heads it was derived from.
    pub heads: Vec<Vec<[u8; 32]>>,
    /// Per shard, (writer, highest seq of its versions in those heads).
    pub seen: Vec<Vec<(NodeId, i64)>>,
}

impl EpochBase {
    /// The automerge actor of shard `shard`'s genesis change in this epoch of `bucket`: the
    /// same on every member that derives it from the same heads, and another for other heads
    /// (two different geneses never share an actor and sequence number).
    pub fn genesis_actor(&self, bucket: &Uid, shard: u16) -> [u8; 16] {
        let mut h = blake3::Hasher::new();
        h.update(b"alknet-fs epoch genesis");
        h.update(&bucket.0);
        h.update(&self.epoch.to_be_bytes());
        h.update(&shard.to_be_bytes());
        for heads in &self.heads {
            h.update(&(heads.len() as u64).to_be_bytes());
            for head in heads {
                h.update(head);
            }
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }

    /// Whether a peer's announcement has the shape this build makes: a list of heads and of
    /// writers per shard, each within bounds (the frame's size bounds the rest).
    pub fn within_bounds(&self) -> bool {
        self.epoch <= EPOCH_MAX
            && self.heads.len() == SHARDS as usize
            && self.seen.len() == SHARDS as usize
            && self.heads.iter().all(|h| h.len() <= EPOCH_HEADS_MAX)
            && self.seen.iter().all(|s| s.len() <= EPOCH_WRITERS_MAX)
    }

    /// Whether `writer`'s version `seq` in shard `shard` came after the cut (not in the
    /// heads the epoch was derived from).
    pub fn after_cut(&self, shard: u16, writer: &NodeId, seq: i64) -> bool {
        let seen = self.seen.get(shard as usize).and_then(|s| s.iter().find(|(w, _)| w == writer)).map(|(_, s)| *s);
        seen.is_none_or(|s| seq > s)
    }
}

/// The versions of `changes` (every version of one bucket at agreed heads) that a compacted
/// bucket keeps, given its branch records and the branches deleted (no view is taken from a
/// deleted branch; one a live branch sees through still counts). See the module's doc.
pub fn kept(changes: &[Change], branches: &[BranchRecord], deleted: &HashSet<Uid>) -> HashSet<VersionId> {
    let bounds = fork_bounds(branches, deleted);
    let mut groups: HashMap<(Uid, &TreePath), Vec<usize>> = HashMap::new();
    for (i, c) in changes.iter().enumerate() {
        groups.entry((c.branch, &c.path)).or_default().push(i);
    }
    // For each version, the versions of its group that it needs kept beside it.
    let mut needs: Vec<Vec<usize>> = vec![Vec::new(); changes.len()];
    let mut seeds: Vec<usize> = Vec::new();
    let no_bounds = Vec::new();
    for ((branch, _), members) in &groups {
        let bounds = bounds.get(branch).unwrap_or(&no_bounds);
        let index: HashMap<VersionId, usize> = members.iter().map(|&i| (changes[i].id(), i)).collect();
        // Of the versions naming each one: the first, the first repair, the first non-repair.
        let mut first: HashMap<usize, [Option<usize>; 3]> = HashMap::new();
        for &i in members {
            let Some(&named) = changes[i].pred.as_ref().and_then(|p| index.get(p)) else { continue };
            let slots = first.entry(named).or_default();
            let repair = changes[i].origin == Origin::Repair;
            for slot in [Some(0), Some(if repair { 1 } else { 2 })].into_iter().flatten() {
                if slots[slot].is_none_or(|j| changes[i].key < changes[j].key) {
                    slots[slot] = Some(i);
                }
            }
        }
        for &i in members {
            let c = &changes[i];
            let slots = first.get(&i).copied().unwrap_or_default();
            needs[i].extend(slots.iter().flatten().copied());
            let tip_in_some_view = match slots[0] {
                None => true,
                Some(namer) => bounds.iter().any(|b| c.key <= *b && *b < changes[namer].key),
            };
            let v = PathVersion::of(c);
            let shape_candidate = slots[1].is_some() && v.kind.is_some_and(|k| k != super::entry::EntryKind::Dir);
            if tip_in_some_view || v.merge_loser || shape_candidate {
                seeds.push(i);
            }
        }
    }
    let mut keep = vec![false; changes.len()];
    let mut work = seeds;
    while let Some(i) = work.pop() {
        if std::mem::replace(&mut keep[i], true) {
            continue;
        }
        work.extend(needs[i].iter().copied().filter(|&j| !keep[j]));
    }
    (0..changes.len()).filter(|&i| keep[i]).map(|i| changes[i].id()).collect()
}

/// For each branch, the bounds under which its descendants see it: for a descendant, the
/// least fork key along the chain of forks from it up to the branch (as `store::read::View`
/// takes them), for each descendant not in `deleted`. A chain that loops or runs past the
/// depth limit stops there.
pub fn fork_bounds(branches: &[BranchRecord], deleted: &HashSet<Uid>) -> HashMap<Uid, Vec<OrderKey>> {
    let by_uid: HashMap<Uid, &BranchRecord> = branches.iter().map(|b| (b.uid, b)).collect();
    let mut out: HashMap<Uid, Vec<OrderKey>> = HashMap::new();
    for b in branches.iter().filter(|b| !deleted.contains(&b.uid)) {
        let (mut bound, mut at) = (OrderKey::MAX, b);
        for _ in 0..BRANCH_CHAIN_DEPTH_MAX {
            let Some(parent) = at.parent else { break };
            bound = bound.min(at.fork.unwrap_or(OrderKey::MAX));
            out.entry(parent).or_default().push(bound);
            match by_uid.get(&parent) {
                Some(p) => at = p,
                None => break,
            }
        }
    }
    for bounds in out.values_mut() {
        bounds.sort();
        bounds.dedup();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::clock::Stamp;
    use crate::proto::entry::{ContentHash, Entry, EntryKind, Version};
    use crate::proto::replica::{path_outcome, CommitRef};
    use proptest::prelude::*;

    fn key(ms: i64, node: u8, seq: i64) -> OrderKey {
        OrderKey::new(Stamp { ms, counter: 0 }, &VersionId { node: NodeId([node; 32]), seq })
    }

    fn change(branch: u8, path: &str, key: OrderKey, pred: Option<OrderKey>, kind: Option<EntryKind>, origin: Origin) -> Change {
        Change {
            branch: Uid([branch; 16]),
            path: TreePath::parse(path).unwrap(),
            key,
            pred: pred.map(|k| k.version()),
            version: Version {
                entry: kind.map(|kind| Entry { kind, hash: ContentHash([key.0[51]; 32]), size: 1, mode: 0o644, mtime_ms: 0 }),
                written: Stamp { ms: 0, counter: 0 },
            },
            origin,
            commit: None,
        }
    }

    fn branch(uid: u8, parent: Option<u8>, fork: Option<OrderKey>) -> BranchRecord {
        BranchRecord { uid: Uid([uid; 16]), name: format!("b{uid}"), parent: parent.map(|p| Uid([p; 16])), fork, created_ms: 0 }
    }

    /// What every view of every path shows, by version id: (branch, path, bound) → (head,
    /// losers as (loser, beaten by, why)).
    type Shown = Vec<((Uid, String, OrderKey), Option<(VersionId, Vec<(VersionId, VersionId, &'static str)>)>)>;

    fn shown(changes: &[Change], branches: &[BranchRecord]) -> Shown {
        let bounds = fork_bounds(branches, &HashSet::new());
        let mut groups: std::collections::BTreeMap<(Uid, String), Vec<&Change>> = Default::default();
        for c in changes {
            groups.entry((c.branch, c.path.as_str().to_string())).or_default().push(c);
        }
        let mut out = Vec::new();
        for ((b, path), versions) in groups {
            let mut views = bounds.get(&b).cloned().unwrap_or_default();
            views.push(OrderKey::MAX);
            for bound in views {
                let seen: Vec<&Change> = versions.iter().copied().filter(|c| c.key <= bound).collect();
                let input: Vec<PathVersion> = seen.iter().map(|c| PathVersion::of(c)).collect();
                let outcome = path_outcome(&input).map(|o| {
                    let mut losers: Vec<_> = o.losers.iter().map(|&(l, w, why)| (seen[l].id(), seen[w].id(), why.as_str())).collect();
                    losers.sort();
                    (seen[o.head].id(), losers)
                });
                out.push(((b, path.clone(), bound), outcome));
            }
        }
        out
    }

    fn compacted(changes: &[Change], branches: &[BranchRecord]) -> Vec<Change> {
        let keep = kept(changes, branches, &HashSet::new());
        changes.iter().filter(|c| keep.contains(&c.id())).cloned().collect()
    }

    #[test]
    fn a_path_written_over_and_over_keeps_its_head_alone() {
        let mut changes = Vec::new();
        let mut prev = None;
        for seq in 1..=1000 {
            let k = key(seq, 1, seq);
            changes.push(change(1, "/f", k, prev, Some(EntryKind::File), Origin::Write));
            prev = Some(k);
        }
        let keep = kept(&changes, &[branch(1, None, None)], &HashSet::new());
        assert_eq!(keep.len(), 1);
        assert!(keep.contains(&key(1000, 1, 1000).version()));
    }

    #[test]
    fn what_a_fork_still_sees_stays() {
        // main: v1 (t=10) then v2 (t=30, names v1); a branch forked at t=20 sees v1.
        let (v1, v2) = (key(10, 1, 1), key(30, 1, 2));
        let changes = vec![change(1, "/f", v1, None, Some(EntryKind::File), Origin::Write), change(1, "/f", v2, Some(v1), Some(EntryKind::File), Origin::Write)];
        let branches = [branch(1, None, None), branch(2, Some(1), Some(key(20, 9, 0)))];
        assert_eq!(kept(&changes, &branches, &HashSet::new()).len(), 2);
        // Forked after v2 instead: v1 goes.
        let branches = [branch(1, None, None), branch(2, Some(1), Some(key(40, 9, 0)))];
        assert_eq!(kept(&changes, &branches, &HashSet::new()).len(), 1);
        // A grandchild forked (from the later child) before v2 sees v1 through both forks.
        let branches = [branch(1, None, None), branch(2, Some(1), Some(key(40, 9, 0))), branch(3, Some(2), Some(key(20, 9, 0)))];
        assert_eq!(kept(&changes, &branches, &HashSet::new()).len(), 2);
    }

    #[test]
    fn an_operation_whose_other_paths_were_written_since_keeps_only_what_is_live() {
        // One operation made /d and wrote /d/a and /d/b; both files were written again since:
        // the directory's version stays, the files' first versions go (keeping them would
        // keep what replaced them too).
        let (d, a1, b1, a2, b2) = (key(10, 1, 1), key(10, 1, 2), key(10, 1, 3), key(20, 1, 4), key(20, 1, 5));
        let op = Some(CommitRef { first_seq: 1, len: 3 });
        let mut changes = vec![
            change(1, "/d", d, None, Some(EntryKind::Dir), Origin::Mkdir),
            change(1, "/d/a", a1, None, Some(EntryKind::File), Origin::Write),
            change(1, "/d/b", b1, None, Some(EntryKind::File), Origin::Write),
            change(1, "/d/a", a2, Some(a1), Some(EntryKind::File), Origin::Write),
            change(1, "/d/b", b2, Some(b1), Some(EntryKind::File), Origin::Write),
        ];
        for c in &mut changes[..3] {
            c.commit = op;
        }
        let keep = kept(&changes, &[branch(1, None, None)], &HashSet::new());
        assert_eq!(keep, HashSet::from([d.version(), a2.version(), b2.version()]));
    }

    /// A random history: versions of a few paths on a few branches (each branch forked from
    /// an earlier one at some key), each naming an earlier version of its path on its branch
    /// (or none), of random kinds and origins, some grouped into operations.
    fn history() -> impl Strategy<Value = (Vec<Change>, Vec<BranchRecord>)> {
        let branches = proptest::collection::vec((0u8..3, 0i64..60), 0..3);
        let versions = proptest::collection::vec((0u8..3, 0u8..3, 1i64..60, 1u8..4, prop::option::of(0usize..40), 0u8..8, 0u8..3), 1..40);
        (branches, versions).prop_map(|(forks, specs)| {
            let mut records = vec![branch(1, None, None)];
            for (i, (parent, at)) in forks.iter().enumerate() {
                let parent = 1 + (*parent as usize % records.len()) as u8;
                records.push(branch(2 + i as u8, Some(parent), Some(key(*at, 0, 0))));
            }
            let mut changes: Vec<Change> = Vec::new();
            for (seq, (b, p, ms, node, pred, what, op)) in specs.into_iter().enumerate() {
                let b = 1 + (b as usize % records.len()) as u8;
                let path = format!("/p{p}");
                let k = key(ms, node, seq as i64 + 1);
                let earlier: Vec<&Change> = changes.iter().filter(|c| c.branch == Uid([b; 16]) && c.path.as_str() == path).collect();
                let pred = pred.and_then(|i| earlier.get(i % earlier.len().max(1)).map(|c| c.key));
                let (kind, origin) = match what {
                    0 => (None, Origin::Delete),
                    1 => (Some(EntryKind::Dir), Origin::Mkdir),
                    2 => (Some(EntryKind::Dir), Origin::Repair),
                    3 => (Some(EntryKind::File), Origin::ConflictLoser),
                    4 => (Some(EntryKind::Symlink), Origin::Write),
                    _ => (Some(EntryKind::File), Origin::Write),
                };
                let mut c = change(b, &path, k, pred, kind, origin);
                // Operations of one writer: consecutive versions with the same `op` mark.
                if op > 0 {
                    c.commit = Some(CommitRef { first_seq: i64::from(op) * 1000 + i64::from(node), len: 2 });
                }
                changes.push(c);
            }
            (changes, records)
        })
    }

    proptest! {
        #[test]
        fn every_view_of_every_path_shows_the_same_after_compaction((changes, branches) in history()) {
            let after = compacted(&changes, &branches);
            let before_shown = shown(&changes, &branches);
            let after_shown: std::collections::HashMap<_, _> = shown(&after, &branches).into_iter().collect();
            for (view, outcome) in before_shown {
                // A view with nothing left in it showed nothing before either.
                prop_assert_eq!(after_shown.get(&view).cloned().flatten(), outcome, "view {:?}", view);
            }
        }

        #[test]
        fn compacting_again_keeps_everything((changes, branches) in history()) {
            let once = compacted(&changes, &branches);
            let twice = compacted(&once, &branches);
            prop_assert_eq!(once.len(), twice.len());
        }
    }
}
