//! Who belongs to a bucket, and whose versions a node accepts, from the entries of the
//! bucket's document alone (so every node that holds the same entries decides the same).
//!
//! A member is added by a member and removed for good. What makes this more than a set: a
//! removed node does not hear of its removal until someone tells it, and everyone who knows
//! refuses it. Meanwhile it still believes it is a member: it may write, and admit others,
//! and a member that was offline during the removal may accept all that and relay it. The
//! partition harness found exactly that (seed 656). So a removal records what its remover
//! had *seen* of the removed node (how far its versions went, whom it had admitted), and:
//!
//! - an admission stands if its adder stands and is not removed, or some removal of the
//!   adder had seen it (admissions made after the removal, unseen by every remover, fall,
//!   and with them everything the admitted node wrote or admitted);
//! - a removed node's versions are accepted up to the last one a remover had seen (its seq:
//!   a writer's seqs only grow, so everything it wrote before that one is accepted too);
//! - only removals by nodes whose admission stands count, so a node cut off cannot cut
//!   others in turn;
//! - a version whose writer is not (yet) known to be a member waits: its admission may
//!   still be on its way (the bucket's document and the shards sync apart).
//!
//! Nodes that applied versions before hearing of a removal take them back out
//! ([`Membership::cutoff`]); the documents keep them (their entries are write-once), so a
//! decision that changes with later entries can be made again.

use std::collections::{BTreeMap, BTreeSet};

use super::ids::{NodeId, VersionId};
use super::replica::MetaEntry;

/// What the remover of a node had seen of it when it removed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Everything it will ever do: a removal written before removals said what they had
    /// seen (the node is cut off from then on, its past stands).
    All,
    /// Its versions up to seq `last_seq` (0: none), and the members it had admitted.
    Upto {
        /// The largest seq of the removed node's versions the remover held.
        last_seq: i64,
        /// The nodes the removed node had admitted, as far as the remover knew.
        admitted: Vec<NodeId>,
    },
}

impl Seen {
    fn admitted(&self, node: &NodeId) -> bool {
        match self {
            Seen::All => true,
            Seen::Upto { admitted, .. } => admitted.contains(node),
        }
    }

    fn last_seq(&self) -> i64 {
        match self {
            Seen::All => i64::MAX,
            Seen::Upto { last_seq, .. } => *last_seq,
        }
    }
}

/// The membership entries of one bucket's document and what they decide.
#[derive(Clone, Debug, Default)]
pub struct Membership {
    /// Each node's admission: who added it (itself for a bucket's first member).
    added: BTreeMap<NodeId, NodeId>,
    /// Each node's removals, one per remover.
    removals: BTreeMap<NodeId, BTreeMap<NodeId, Seen>>,
    /// Nodes whose admission stands (decided from the above; see [`Self::decide`]).
    standing: BTreeSet<NodeId>,
}

/// Most rounds of [`Membership::decide`]. A round walks every admission chain once; real
/// histories settle in two or three (a removal counts once its remover's own admission is
/// known to stand). A contrived cycle of removals stops here, the same on every node.
const DECIDE_ROUNDS_MAX: usize = 16;

impl Membership {
    /// No entries: nobody is a member.
    pub fn new() -> Self {
        Self::default()
    }

    /// Built from a bucket document's entries (in any order).
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a MetaEntry>) -> Self {
        let mut m = Membership::new();
        for e in entries {
            m.record(e);
        }
        m.decide();
        m
    }

    /// Takes an entry into account; true if it is about membership and was new.
    pub fn note(&mut self, entry: &MetaEntry) -> bool {
        let new = self.record(entry);
        if new {
            self.decide();
        }
        new
    }

    fn record(&mut self, entry: &MetaEntry) -> bool {
        match entry {
            // Written once, by the adder; of two adders racing on one key, the document
            // shows every node the same one.
            MetaEntry::Member { node, added_by, .. } => self.added.insert(*node, *added_by) != Some(*added_by),
            MetaEntry::Removed { node, by, seen, .. } => {
                let r = self.removals.entry(*node).or_default();
                r.insert(*by, seen.clone()) != Some(seen.clone())
            }
            _ => false,
        }
    }

    /// The removals of `node` that count: by a node whose admission stands.
    fn removals_of<'a>(&'a self, node: &NodeId, standing: &'a BTreeSet<NodeId>) -> impl Iterator<Item = &'a Seen> + 'a {
        self.removals.get(node).into_iter().flatten().filter(|(by, _)| standing.contains(*by)).map(|(_, seen)| seen)
    }

    /// Which admissions stand: a bucket's first members (added by themselves), then anyone
    /// added by a standing node that is not removed, or whose admission some removal of its
    /// adder had seen. Each round walks the admissions from the first members, counting the
    /// removals by nodes that stood after the round before (none in the first), until a round
    /// changes nothing: linear in the entries per round, whatever the depth of the chains.
    /// A function of the entries alone (ordered maps, a fixed walk).
    fn decide(&mut self) {
        let mut admitted: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
        for (node, by) in &self.added {
            if node != by {
                admitted.entry(*by).or_default().push(*node);
            }
        }
        let roots: Vec<NodeId> = self.added.iter().filter(|(node, by)| node == by).map(|(node, _)| *node).collect();
        let mut counted: BTreeSet<NodeId> = BTreeSet::new();
        for _ in 0..DECIDE_ROUNDS_MAX {
            let mut standing: BTreeSet<NodeId> = roots.iter().copied().collect();
            let mut walk = roots.clone();
            while let Some(by) = walk.pop() {
                let removals: Vec<&Seen> = self.removals_of(&by, &counted).collect();
                for node in admitted.get(&by).into_iter().flatten() {
                    if !standing.contains(node) && (removals.is_empty() || removals.iter().any(|seen| seen.admitted(node))) {
                        standing.insert(*node);
                        walk.push(*node);
                    }
                }
            }
            if standing == counted {
                break;
            }
            counted = standing;
        }
        self.standing = counted;
    }

    /// Whether `node` is a member: its admission stands and no removal of it counts.
    pub fn is_member(&self, node: &NodeId) -> bool {
        self.standing.contains(node) && self.removals_of(node, &self.standing).next().is_none()
    }

    /// Whether a removal of `node` counts (a removed node is refused on every protocol).
    pub fn is_removed(&self, node: &NodeId) -> bool {
        self.removals_of(node, &self.standing).next().is_some()
    }

    /// Whether the bucket's document names `node` at all (added or removed).
    pub fn knows(&self, node: &NodeId) -> bool {
        self.added.contains_key(node) || self.removals.contains_key(node)
    }

    /// Every node the document names, each once, in order.
    pub fn nodes(&self) -> BTreeSet<NodeId> {
        self.added.keys().chain(self.removals.keys()).copied().collect()
    }

    /// Which versions of `node` are accepted: all (`None`), or those with a seq up to the
    /// bound (`Some(0)`: none; a node whose admission fell, or was never seen).
    pub fn cutoff(&self, node: &NodeId) -> Option<i64> {
        if !self.standing.contains(node) {
            return Some(0);
        }
        self.removals_of(node, &self.standing).map(Seen::last_seq).max()
    }

    /// Whether version `id` is accepted from peers (see [`Self::cutoff`]).
    pub fn accepts(&self, id: &VersionId) -> bool {
        self.cutoff(&id.node).is_none_or(|last| id.seq <= last)
    }

    /// The nodes `node` admitted, as this document records: what a removal of it says it saw.
    pub fn admitted_by(&self, node: &NodeId) -> Vec<NodeId> {
        self.added.iter().filter(|(n, by)| *by == node && *n != node).map(|(n, _)| *n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(b: u8) -> NodeId {
        NodeId([b; 32])
    }

    fn add(node: u8, by: u8) -> MetaEntry {
        MetaEntry::Member { node: n(node), added_by: n(by), at_ms: 0 }
    }

    fn remove(node: u8, by: u8, last_seq: i64, admitted: &[u8]) -> MetaEntry {
        MetaEntry::Removed { node: n(node), by: n(by), at_ms: 0, seen: Seen::Upto { last_seq, admitted: admitted.iter().map(|&b| n(b)).collect() } }
    }

    fn v(node: u8, seq: i64) -> VersionId {
        VersionId { node: n(node), seq }
    }

    #[test]
    fn members_are_added_by_members_and_removed_for_good() {
        let m = Membership::from_entries(&[add(1, 1), add(2, 1), add(3, 2)]);
        assert!(m.is_member(&n(1)) && m.is_member(&n(2)) && m.is_member(&n(3)));
        assert!(!m.is_member(&n(4)), "never added");
        assert!(!m.accepts(&v(4, 1)), "a stranger's versions wait");
        let m = Membership::from_entries(&[add(1, 1), add(2, 1), add(3, 2), remove(3, 1, 7, &[])]);
        assert!(!m.is_member(&n(3)) && m.is_removed(&n(3)));
        assert!(m.accepts(&v(3, 7)) && !m.accepts(&v(3, 8)), "what the remover had seen stays; later writes do not");
        assert!(m.accepts(&v(1, 1_000)));
    }

    #[test]
    fn a_removed_node_admits_nobody_its_remover_had_not_seen() {
        // Seed 656: 4 is removed by 1, who had seen it admit 5; 4, unaware, then admits 6,
        // who admits 7.
        let entries = [add(1, 1), add(4, 1), add(5, 4), remove(4, 1, 3, &[5]), add(6, 4), add(7, 6)];
        let m = Membership::from_entries(&entries);
        assert!(m.is_member(&n(5)), "admitted before the removal, and the remover knew");
        assert!(!m.is_member(&n(6)) && !m.is_member(&n(7)), "admitted after it: falls, and so does whom it admitted");
        assert!(!m.accepts(&v(6, 1)) && !m.accepts(&v(7, 1)));
        // Any order of the entries decides the same.
        let mut rev = entries.to_vec();
        rev.reverse();
        let r = Membership::from_entries(&rev);
        for b in 1..8 {
            assert_eq!((m.is_member(&n(b)), m.cutoff(&n(b))), (r.is_member(&n(b)), r.cutoff(&n(b))));
        }
    }

    #[test]
    fn of_two_removals_what_either_remover_had_seen_stands() {
        let base = [add(1, 1), add(2, 1), add(4, 1), add(5, 4)];
        let mut e = base.to_vec();
        e.push(remove(4, 1, 3, &[]));
        e.push(remove(4, 2, 9, &[5]));
        let m = Membership::from_entries(&e);
        assert!(m.is_member(&n(5)));
        assert_eq!(m.cutoff(&n(4)), Some(9));
    }

    #[test]
    fn a_node_whose_admission_fell_cannot_remove_anyone() {
        // 6 was admitted by 4 after 4's removal; its removal of 2 does not count.
        let m = Membership::from_entries(&[add(1, 1), add(2, 1), add(4, 1), remove(4, 1, 0, &[]), add(6, 4), remove(2, 6, 0, &[])]);
        assert!(m.is_member(&n(2)));
        assert_eq!(m.cutoff(&n(2)), None);
    }

    #[test]
    fn a_legacy_removal_keeps_the_past_and_cuts_the_node_off() {
        let m = Membership::from_entries(&[add(1, 1), add(4, 1), add(5, 4), MetaEntry::Removed { node: n(4), by: n(1), at_ms: 0, seen: Seen::All }]);
        assert!(!m.is_member(&n(4)) && m.is_member(&n(5)) && m.accepts(&v(4, 1 << 40)));
    }

    #[test]
    fn a_long_chain_of_admissions_is_decided_in_linear_time() {
        // 20,000 members, each admitted by the one before (entries any member can write).
        let id = |i: u32| {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_be_bytes());
            NodeId(b)
        };
        let mut entries = vec![MetaEntry::Member { node: id(0), added_by: id(0), at_ms: 0 }];
        entries.extend((1..20_000).map(|i| MetaEntry::Member { node: id(i), added_by: id(i - 1), at_ms: 0 }));
        entries.push(MetaEntry::Removed { node: id(10_000), by: id(0), at_ms: 0, seen: Seen::Upto { last_seq: 0, admitted: vec![] } });
        let t = std::time::Instant::now();
        let m = Membership::from_entries(&entries);
        assert!(m.is_member(&id(9_999)) && !m.is_member(&id(10_000)) && !m.is_member(&id(10_001)) && !m.is_member(&id(19_999)));
        assert!(t.elapsed() < std::time::Duration::from_secs(2), "took {:?}", t.elapsed());
    }

    #[test]
    fn noting_entries_one_by_one_decides_as_reading_them_all() {
        let entries = [add(1, 1), add(4, 1), add(5, 4), remove(4, 1, 3, &[]), add(6, 5)];
        let mut m = Membership::new();
        assert!(entries.iter().all(|e| m.note(e)));
        assert!(!m.note(&entries[0]), "again: nothing new");
        let all = Membership::from_entries(&entries);
        assert_eq!(m.standing, all.standing);
        assert!(!m.is_member(&n(5)) && !m.is_member(&n(6)));
    }
}
