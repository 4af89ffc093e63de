//! Who belongs to a bucket, what each member may do, and whose versions a node accepts, from
//! the entries of the bucket's document alone (so every node that holds the same entries
//! decides the same, in any order of arrival).
//!
//! **Authority.** A bucket's first owner is the node that minted its identity
//! ([`Uid::is_minted_by`]): its self-admission is the only one that counts, so nobody makes
//! itself a root with a key of its own. Owners admit (with a role), remove, and grant roles;
//! a writer writes, and invites too (a writer or a read-only member, never an owner) while an
//! owner's policy lets writers invite (`policy/…` entries, the latest by a standing owner
//! counts; turned off, what the owner had seen writers admit stands, as with removals); a
//! read-only member receives everything and writes nothing anyone accepts. An owner is
//! never demoted, only removed. Every entry is signed by the node it names as its writer
//! (`proto::signed`), so what an entry says of its author is true; what it may *do* is
//! decided here, and an entry by a node without the authority stays in the document without
//! effect.
//!
//! **Removals.** A removed node does not hear of its removal until someone tells it, and
//! everyone who knows refuses it. Meanwhile it still believes it is a member: it may write,
//! and (an owner) admit others, and a member that was offline during the removal may accept
//! all that and relay it. The partition harness found exactly that (seed 656). So a removal
//! records what its remover had *seen* of the removed node (how far its versions went, whom
//! it had admitted or made an owner), and:
//!
//! - an admission (or a grant of ownership) stands if its owner stands and is not removed, or
//!   some removal of that owner had seen it (those made after the removal, unseen by every
//!   remover, fall, and with them everything the admitted node wrote or admitted);
//! - a removed node's versions are accepted up to the last one a remover had seen (its seq:
//!   a writer's seqs only grow, so everything it wrote before that one is accepted too); a
//!   member made read-only likewise keeps what its granter had seen;
//! - only removals by standing owners count, so a node cut off cannot cut others in turn, and
//!   a plain member cannot remove anyone; owners are cut off like anyone else;
//! - a version whose writer is not (yet) known to be a member waits: its admission may
//!   still be on its way (the bucket's document and the shards sync apart).
//!
//! Nodes that applied versions before hearing of a removal take them back out
//! ([`Membership::cutoff`]); the documents keep them (their entries are write-once), so a
//! decision that changes with later entries can be made again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::ids::{NodeId, Uid, VersionId};
use super::replica::MetaEntry;

/// What a member may do. Ordered by what it allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Receives everything; its writes are refused by every other member.
    ReadOnly,
    /// Reads and writes.
    Writer,
    /// Writes, admits, removes and grants roles.
    Owner,
}

impl Role {
    /// Its name in `alkfs members`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Writer => "writer",
            Role::Owner => "owner",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "read-only" => Role::ReadOnly,
            "writer" => Role::Writer,
            "owner" => Role::Owner,
            _ => return None,
        })
    }
}

/// What the remover of a node had seen of it when it removed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The largest seq of the removed node's versions the remover held (0: none).
    pub last_seq: i64,
    /// The nodes the removed node had admitted or made owners, as far as the remover knew
    /// (those acts stand).
    pub admitted: Vec<NodeId>,
    /// The nodes the removed node had removed, as far as the remover knew (those removals
    /// stand).
    pub removed: Vec<NodeId>,
}

impl Seen {
    fn admitted(&self, node: &NodeId) -> bool {
        self.admitted.contains(node)
    }

    fn removed(&self, node: &NodeId) -> bool {
        self.removed.contains(node)
    }
}

/// A role given to a member after its admission, and what the granter had seen of it
/// (its versions, and whom it had invited: those stand if the role is read-only).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Grant {
    role: Role,
    last_seq: i64,
    admitted: Vec<NodeId>,
}

/// Whether plain members (writers) may invite, as an owner set it, and the admissions by
/// plain members the owner had seen (those stand when it turns inviting off).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Policy {
    members_invite: bool,
    admitted: Vec<NodeId>,
}

/// The membership entries of one bucket's document and what they decide.
#[derive(Clone, Debug, Default)]
pub struct Membership {
    /// The bucket: its identity names its first owner.
    bucket: Option<Uid>,
    /// Each node's admissions: who added it, with what role.
    added: BTreeMap<NodeId, BTreeMap<NodeId, Role>>,
    /// Each node's removals, one per remover.
    removals: BTreeMap<NodeId, BTreeMap<NodeId, Seen>>,
    /// Roles granted to each node, by (when, granter).
    grants: BTreeMap<NodeId, BTreeMap<(i64, NodeId), Grant>>,
    /// The bucket's invitation policies, by (when, owner).
    policies: BTreeMap<(i64, NodeId), Policy>,
    /// Nodes whose admission stands (decided from the above; see [`Self::decide`]).
    standing: BTreeSet<NodeId>,
    /// Standing nodes that are owners.
    owners: BTreeSet<NodeId>,
    /// The role each standing node was admitted with (see [`Self::decide`]).
    admitted_roles: BTreeMap<NodeId, Role>,
    /// Whether plain members may invite (the policy in force).
    members_invite: bool,
    /// The removals that count, by removed node (decided with the above).
    counted: BTreeMap<NodeId, Vec<Seen>>,
}

/// Most rounds of [`Membership::decide`]. A round walks every admission chain once; real
/// histories settle in two or three (a removal counts once its remover's own admission is
/// known to stand). A contrived cycle of removals stops here, the same on every node.
const DECIDE_ROUNDS_MAX: usize = 16;

/// Deepest chain of removals (of removers of removers…) walked when deciding one removal;
/// past it, the remover is taken as standing (the same on every node).
const DECIDE_DEPTH_MAX: usize = 4096;

/// What one round of [`Membership::decide`] found.
#[derive(Default)]
struct Round {
    standing: BTreeSet<NodeId>,
    /// Owners in order of seniority (the first owner, then as the walk found them).
    owners: Vec<NodeId>,
    /// The role each standing node was admitted with, and whether an owner admitted it.
    roles: BTreeMap<NodeId, (bool, Role)>,
    members_invite: bool,
}

impl Round {
    /// Notes an admission of `node` as `role` (by an owner or not) that stands. An owner's
    /// admission outranks a plain member's, so nobody invites its way past the role an
    /// owner gave; a plain member admits a writer at most.
    fn note_role(&mut self, node: NodeId, by_owner: bool, role: Role) {
        let role = role.min(Role::Writer);
        let noted = self.roles.entry(node).or_insert((by_owner, role));
        if by_owner && !noted.0 {
            *noted = (true, role);
        } else if by_owner == noted.0 {
            noted.1 = noted.1.max(role);
        }
    }
}

impl Membership {
    /// No entries yet for bucket `bucket`: nobody is a member.
    pub fn new(bucket: Uid) -> Self {
        Membership { bucket: Some(bucket), ..Self::default() }
    }

    /// Built from bucket `bucket`'s document entries (in any order).
    pub fn from_entries<'a>(bucket: Uid, entries: impl IntoIterator<Item = &'a MetaEntry>) -> Self {
        let mut m = Membership::new(bucket);
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
            MetaEntry::Member { node, added_by, role, .. } => self.added.entry(*node).or_default().insert(*added_by, *role) != Some(*role),
            MetaEntry::Removed { node, by, seen, .. } => {
                let r = self.removals.entry(*node).or_default();
                r.insert(*by, seen.clone()) != Some(seen.clone())
            }
            MetaEntry::Grant { node, by, at_ms, role, last_seq, admitted } => {
                let g = Grant { role: *role, last_seq: *last_seq, admitted: admitted.clone() };
                self.grants.entry(*node).or_default().insert((*at_ms, *by), g.clone()) != Some(g)
            }
            MetaEntry::Policy { by, at_ms, members_invite, admitted } => {
                let p = Policy { members_invite: *members_invite, admitted: admitted.clone() };
                self.policies.insert((*at_ms, *by), p.clone()) != Some(p)
            }
            _ => false,
        }
    }

    /// The removals of `node` that count (see [`Self::decide`]).
    fn removals_of<'a>(&'a self, node: &NodeId) -> impl Iterator<Item = &'a Seen> + 'a {
        self.counted.get(node).into_iter().flatten()
    }

    /// The bucket's first owner: the node that minted its identity, if its self-admission
    /// is here.
    fn root(&self) -> Option<NodeId> {
        let bucket = self.bucket?;
        self.added.iter().find(|(node, by)| by.contains_key(node) && bucket.is_minted_by(node)).map(|(node, _)| *node)
    }

    /// Which removals count, given the owners in order of seniority (the first owner, then
    /// as the walk from it found them): a removal by an owner counts unless a removal of that
    /// owner counts and had not seen it (a removed owner's later acts fall, the first owner's
    /// too). Owners removing each other at once form a cycle; it is broken by seniority: the
    /// owner whose standing is decided first (the senior) is taken as standing while the
    /// cycle is walked, so its removal stands and the junior's falls (a stolen owner's laptop
    /// cannot cut off the owner who made it one). A function of the entries alone.
    fn count_removals(&self, owners: &[NodeId]) -> BTreeMap<NodeId, Vec<Seen>> {
        struct Walk<'a> {
            removals: &'a BTreeMap<NodeId, BTreeMap<NodeId, Seen>>,
            rank: BTreeMap<NodeId, usize>,
            decided: BTreeMap<NodeId, Vec<Seen>>,
            deciding: BTreeSet<NodeId>,
        }
        impl Walk<'_> {
            /// The removals of `node` that count (empty: it stands).
            fn counted(&mut self, node: NodeId, depth: usize) -> Vec<Seen> {
                if let Some(d) = self.decided.get(&node) {
                    return d.clone();
                }
                if depth > DECIDE_DEPTH_MAX || !self.deciding.insert(node) {
                    return Vec::new(); // in a cycle: the first to be decided stands
                }
                let mut by_rank: Vec<(usize, NodeId, &Seen)> = self
                    .removals
                    .get(&node)
                    .into_iter()
                    .flatten()
                    .filter_map(|(by, seen)| self.rank.get(by).map(|r| (*r, *by, seen)))
                    .collect();
                by_rank.sort_by_key(|(r, by, _)| (*r, *by));
                let mut counting = Vec::new();
                for (_, by, seen) in by_rank {
                    let cut = self.counted(by, depth + 1);
                    if cut.is_empty() || cut.iter().any(|s| s.removed(&node)) {
                        counting.push(seen.clone());
                    }
                }
                self.deciding.remove(&node);
                self.decided.insert(node, counting.clone());
                counting
            }
        }
        let rank: BTreeMap<NodeId, usize> = owners.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut order: Vec<NodeId> = self.removals.keys().copied().collect();
        order.sort_by_key(|n| (rank.get(n).copied().unwrap_or(usize::MAX), *n));
        let mut walk = Walk { removals: &self.removals, rank, decided: BTreeMap::new(), deciding: BTreeSet::new() };
        for node in order {
            walk.counted(node, 0);
        }
        walk.decided.into_iter().filter(|(_, c)| !c.is_empty()).collect()
    }

    /// Which admissions stand and who owns: the first owner, then anyone added by a standing
    /// owner that is not removed, or whose admission some removal of that owner had seen;
    /// an owner is a standing node added as one or granted ownership the same way. Plain
    /// members' admissions are walked after the owners': one stands if the policy in force
    /// lets plain members invite and its inviter is a writer, or if the owner who turned
    /// inviting off, or made the inviter read-only, had seen it (the rule of removals); it
    /// admits a writer at most, and a node an owner admitted keeps the role the owner gave.
    /// Each round walks from the first owner, counting the removals (and reading the policy
    /// and grants) the owners of the round before made (none in the first), until a round
    /// changes nothing: linear in the entries per round, whatever the depth of the chains.
    /// A function of the entries alone.
    fn decide(&mut self) {
        let mut by_adder: BTreeMap<NodeId, Vec<(NodeId, Role)>> = BTreeMap::new();
        for (node, adders) in &self.added {
            for (by, role) in adders {
                if node != by {
                    by_adder.entry(*by).or_default().push((*node, *role));
                }
            }
        }
        let mut made_owner_by: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
        for (node, grants) in &self.grants {
            for ((_, by), g) in grants {
                if g.role == Role::Owner {
                    made_owner_by.entry(*by).or_default().push(*node);
                }
            }
        }
        let root = self.root();
        self.counted = BTreeMap::new();
        let mut decided = Round::default();
        for _ in 0..DECIDE_ROUNDS_MAX {
            let round = self.walk(root, &by_adder, &made_owner_by, &decided);
            let settled = (&round.standing, &round.owners) == (&decided.standing, &decided.owners);
            if !settled {
                self.counted = self.count_removals(&round.owners);
            }
            decided = round;
            if settled {
                break;
            }
        }
        self.standing = decided.standing;
        self.owners = decided.owners.into_iter().collect();
        self.admitted_roles = decided.roles.into_iter().map(|(n, (_, r))| (n, r)).collect();
        self.members_invite = decided.members_invite;
    }

    /// One round of [`Self::decide`]: the walk from the first owner, reading removals,
    /// grants and the policy as the round before (`before`) decided them.
    fn walk(&self, root: Option<NodeId>, by_adder: &BTreeMap<NodeId, Vec<(NodeId, Role)>>, made_owner_by: &BTreeMap<NodeId, Vec<NodeId>>, before: &Round) -> Round {
        let owner_member = |n: &NodeId| before.owners.contains(n) && !self.counted.contains_key(n);
        let policy = self.policies.iter().rev().find(|((_, by), _)| owner_member(by)).map(|(_, p)| p);
        let members_invite = policy.is_some_and(|p| p.members_invite);
        let grant_of = |node: &NodeId| self.grants.get(node).into_iter().flatten().rev().find(|((_, by), g)| g.role != Role::Owner && owner_member(by)).map(|(_, g)| g);
        let mut round = Round { members_invite, ..Round::default() };
        round.standing.extend(root);
        round.owners.extend(root);
        let mut is_owner: BTreeSet<NodeId> = round.standing.clone();
        // Nodes a standing owner made owners before they were known to stand.
        let mut pending_owner: BTreeSet<NodeId> = BTreeSet::new();
        let mut owner_walk: VecDeque<NodeId> = round.owners.iter().copied().collect();
        let mut plain_walk: VecDeque<NodeId> = VecDeque::new();
        let mut plain_walked: BTreeSet<NodeId> = BTreeSet::new();
        loop {
            let (by, as_owner) = match owner_walk.pop_front() {
                Some(by) => (by, true),
                None => match plain_walk.pop_front() {
                    Some(by) if !is_owner.contains(&by) => (by, false),
                    Some(_) => continue,
                    None => break,
                },
            };
            let removals: Vec<&Seen> = self.removals_of(&by).collect();
            let stands = |node: &NodeId| removals.is_empty() || removals.iter().any(|seen| seen.admitted(node));
            // What `by` may do, if it is a plain member: invite (its role now), or have
            // what it did stand (an owner had seen it).
            let grant = if as_owner { None } else { grant_of(&by) };
            let role_now = grant.map(|g| g.role).or_else(|| round.roles.get(&by).map(|(_, r)| *r)).unwrap_or(Role::ReadOnly);
            let may_invite = as_owner || (members_invite && role_now == Role::Writer);
            let seen = |node: &NodeId| policy.is_some_and(|p| p.admitted.contains(node)) || grant.is_some_and(|g| g.role == Role::ReadOnly && g.admitted.contains(node));
            for (node, role) in by_adder.get(&by).into_iter().flatten() {
                if !stands(node) || !(may_invite || seen(node)) {
                    continue;
                }
                round.standing.insert(*node);
                round.note_role(*node, as_owner, *role);
                if (as_owner && *role == Role::Owner) || pending_owner.contains(node) {
                    if is_owner.insert(*node) {
                        round.owners.push(*node);
                        owner_walk.push_back(*node);
                    }
                } else if plain_walked.insert(*node) {
                    plain_walk.push_back(*node);
                }
            }
            if !as_owner {
                continue;
            }
            for node in made_owner_by.get(&by).into_iter().flatten() {
                if !stands(node) {
                    continue;
                }
                if round.standing.contains(node) {
                    if is_owner.insert(*node) {
                        round.owners.push(*node);
                        owner_walk.push_back(*node);
                    }
                } else {
                    pending_owner.insert(*node);
                }
            }
        }
        round
    }

    /// Whether `node` is a member: its admission stands and no removal of it counts.
    pub fn is_member(&self, node: &NodeId) -> bool {
        self.standing.contains(node) && self.removals_of(node).next().is_none()
    }

    /// Whether a removal of `node` counts (a removed node is refused on every protocol).
    pub fn is_removed(&self, node: &NodeId) -> bool {
        self.removals_of(node).next().is_some()
    }

    /// What a member may do (`None`: not a member).
    pub fn role(&self, node: &NodeId) -> Option<Role> {
        if !self.is_member(node) {
            return None;
        }
        Some(self.standing_role(node).0)
    }

    /// A standing node's role and, if read-only by a grant, what its granter had seen.
    fn standing_role(&self, node: &NodeId) -> (Role, i64) {
        if self.owners.contains(node) {
            return (Role::Owner, i64::MAX);
        }
        // The latest grant by an owner that is still a member; else the best admission.
        let granted = self.grants.get(node).into_iter().flatten().rev().find(|((_, by), g)| g.role != Role::Owner && self.is_member(by) && self.owners.contains(by));
        if let Some((_, g)) = granted {
            return (g.role, g.last_seq);
        }
        let admitted = self.admitted_roles.get(node).copied().unwrap_or(Role::ReadOnly);
        (admitted, 0)
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
    /// bound (`Some(0)`: none; a node whose admission fell, or was never seen, or was
    /// admitted read-only).
    pub fn cutoff(&self, node: &NodeId) -> Option<i64> {
        if !self.standing.contains(node) {
            return Some(0);
        }
        let removed = self.removals_of(node).map(|s| s.last_seq).max();
        let read_only = match self.standing_role(node) {
            (Role::ReadOnly, last_seq) => Some(last_seq),
            _ => None,
        };
        match (removed, read_only) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether version `id` is accepted from peers (see [`Self::cutoff`]).
    pub fn accepts(&self, id: &VersionId) -> bool {
        self.cutoff(&id.node).is_none_or(|last| id.seq <= last)
    }

    /// What a removal of `node` by this node says it saw: the last of its versions (`last_seq`,
    /// the caller's), whom it admitted or made owners, whom it removed, as this document
    /// records.
    pub fn seen_of(&self, node: &NodeId, last_seq: i64) -> Seen {
        let admitted = self.added.iter().filter(|(n, by)| by.contains_key(node) && *n != node).map(|(n, _)| *n);
        let promoted = self.grants.iter().filter(|(_, gs)| gs.iter().any(|((_, by), g)| by == node && g.role == Role::Owner)).map(|(n, _)| *n);
        let admitted = admitted.chain(promoted).collect::<BTreeSet<_>>().into_iter().collect();
        let removed = self.removals.iter().filter(|(_, rs)| rs.contains_key(node)).map(|(n, _)| *n).collect();
        Seen { last_seq, admitted, removed }
    }

    /// The owners (standing, not necessarily members: a removed owner is listed).
    pub fn owners(&self) -> impl Iterator<Item = &NodeId> {
        self.owners.iter()
    }

    /// Whether the bucket lets plain members (writers) invite (an owner's policy; off until
    /// an owner turns it on).
    pub fn members_invite(&self) -> bool {
        self.members_invite
    }

    /// Whether `node` may invite: an owner, or a writer while the policy lets members invite.
    pub fn may_invite(&self, node: &NodeId) -> bool {
        match self.role(node) {
            Some(Role::Owner) => true,
            Some(Role::Writer) => self.members_invite,
            _ => false,
        }
    }

    /// The nodes plain members (not owners) admitted, as this document records: what an
    /// owner turning inviting off has seen (those admissions stand).
    pub fn admitted_by_members(&self) -> Vec<NodeId> {
        self.added.iter().filter(|(node, by)| by.keys().any(|b| b != *node && !self.owners.contains(b))).map(|(n, _)| *n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(b: u8) -> NodeId {
        NodeId([b; 32])
    }

    /// The bucket of these tables: node 1 minted it (its first owner).
    fn bucket() -> Uid {
        Uid::mint(&n(1), [9; 8])
    }

    fn decide(entries: &[MetaEntry]) -> Membership {
        Membership::from_entries(bucket(), entries)
    }

    /// `by` admits `node` as an owner (the tables of removals need admitters that may admit).
    fn add(node: u8, by: u8) -> MetaEntry {
        add_as(node, by, Role::Owner)
    }

    fn add_as(node: u8, by: u8, role: Role) -> MetaEntry {
        MetaEntry::Member { node: n(node), added_by: n(by), at_ms: 0, role }
    }

    fn remove(node: u8, by: u8, last_seq: i64, admitted: &[u8]) -> MetaEntry {
        remove_seeing(node, by, last_seq, admitted, &[])
    }

    fn remove_seeing(node: u8, by: u8, last_seq: i64, admitted: &[u8], removed: &[u8]) -> MetaEntry {
        let seen = Seen { last_seq, admitted: admitted.iter().map(|&b| n(b)).collect(), removed: removed.iter().map(|&b| n(b)).collect() };
        MetaEntry::Removed { node: n(node), by: n(by), at_ms: 0, seen }
    }

    fn grant(node: u8, by: u8, at_ms: i64, role: Role, last_seq: i64) -> MetaEntry {
        grant_seeing(node, by, at_ms, role, last_seq, &[])
    }

    fn grant_seeing(node: u8, by: u8, at_ms: i64, role: Role, last_seq: i64, admitted: &[u8]) -> MetaEntry {
        MetaEntry::Grant { node: n(node), by: n(by), at_ms, role, last_seq, admitted: admitted.iter().map(|&b| n(b)).collect() }
    }

    /// Owner (or not) `by` says at `at_ms` whether writers may invite, having seen writers
    /// admit `admitted`.
    fn policy(by: u8, at_ms: i64, members_invite: bool, admitted: &[u8]) -> MetaEntry {
        MetaEntry::Policy { by: n(by), at_ms, members_invite, admitted: admitted.iter().map(|&b| n(b)).collect() }
    }

    fn v(node: u8, seq: i64) -> VersionId {
        VersionId { node: n(node), seq }
    }

    /// What a membership decides of nodes 1..=9, to compare decisions.
    fn decisions(m: &Membership) -> Vec<(bool, Option<Role>, Option<i64>)> {
        (1..10).map(|b| (m.is_member(&n(b)), m.role(&n(b)), m.cutoff(&n(b)))).collect()
    }

    /// Every order of the entries decides the same, noted at once or one by one.
    fn same_in_every_order(entries: &[MetaEntry]) -> Membership {
        let all = decide(entries);
        let mut order: Vec<usize> = (0..entries.len()).collect();
        // Heap's algorithm: every permutation (the tables are short).
        let mut c = vec![0usize; order.len()];
        let mut i = 0;
        let check = |order: &[usize]| {
            let mut m = Membership::new(bucket());
            for &k in order {
                m.note(&entries[k]);
            }
            assert_eq!(decisions(&m), decisions(&all), "order {order:?}");
        };
        check(&order);
        while i < order.len() {
            if c[i] < i {
                if i % 2 == 0 {
                    order.swap(0, i);
                } else {
                    order.swap(c[i], i);
                }
                check(&order);
                c[i] += 1;
                i = 0;
            } else {
                c[i] = 0;
                i += 1;
            }
        }
        all
    }

    #[test]
    fn members_are_added_by_owners_and_removed_for_good() {
        let m = same_in_every_order(&[add(1, 1), add(2, 1), add(3, 2)]);
        assert!(m.is_member(&n(1)) && m.is_member(&n(2)) && m.is_member(&n(3)));
        assert!(!m.is_member(&n(4)), "never added");
        assert!(!m.accepts(&v(4, 1)), "a stranger's versions wait");
        let m = same_in_every_order(&[add(1, 1), add(2, 1), add(3, 2), remove(3, 1, 7, &[])]);
        assert!(!m.is_member(&n(3)) && m.is_removed(&n(3)));
        assert!(m.accepts(&v(3, 7)) && !m.accepts(&v(3, 8)), "what the remover had seen stays; later writes do not");
        assert!(m.accepts(&v(1, 1_000)));
    }

    #[test]
    fn only_the_node_that_minted_the_bucket_is_its_first_owner() {
        // 2 admits itself (a key of its own, a self-signed entry): nothing.
        let m = same_in_every_order(&[add(2, 2), add(3, 2)]);
        assert!(!m.is_member(&n(2)) && !m.is_member(&n(3)));
        let m = same_in_every_order(&[add(1, 1), add(2, 2), add(3, 2)]);
        assert!(m.is_member(&n(1)) && !m.is_member(&n(2)) && !m.is_member(&n(3)));
        assert_eq!(m.role(&n(1)), Some(Role::Owner));
        assert_eq!(m.owners().copied().collect::<Vec<_>>(), [n(1)]);
    }

    #[test]
    fn a_writer_cannot_admit_remove_or_grant() {
        let entries = [add(1, 1), add_as(2, 1, Role::Writer), add_as(3, 1, Role::Writer), add(4, 2), remove(3, 2, 0, &[]), grant(2, 2, 5, Role::Owner, 0)];
        let m = same_in_every_order(&entries);
        assert!(!m.is_member(&n(4)), "admitted by a writer");
        assert!(m.is_member(&n(3)) && m.cutoff(&n(3)).is_none(), "removed by a writer");
        assert_eq!(m.role(&n(2)), Some(Role::Writer), "a writer making itself an owner");
    }

    #[test]
    fn a_writer_invites_only_while_an_owner_lets_writers_invite() {
        use Role::{ReadOnly, Writer};
        let base = [add(1, 1), add_as(2, 1, Writer), add_as(3, 2, Writer)];
        let m = same_in_every_order(&base);
        assert!(!m.is_member(&n(3)) && !m.members_invite() && !m.may_invite(&n(2)), "no policy: only owners invite");
        let on = [&base[..], &[policy(1, 10, true, &[]), add_as(4, 2, Role::Owner), add_as(5, 3, ReadOnly)]].concat();
        let m = same_in_every_order(&on);
        assert!(m.members_invite() && m.may_invite(&n(2)) && m.may_invite(&n(1)));
        assert_eq!(m.role(&n(3)), Some(Writer), "a writer's invitee");
        assert_eq!(m.role(&n(4)), Some(Writer), "a writer admits a writer at most");
        assert!(m.owners().all(|o| *o == n(1)));
        assert_eq!((m.role(&n(5)), m.cutoff(&n(5))), (Some(ReadOnly), Some(0)), "the invitee of an invitee, read-only");
        assert!(!m.may_invite(&n(5)), "a read-only member never invites");
        // The policy counts only from a standing owner: a writer turning it on, or an owner
        // removed since, does nothing.
        let m = same_in_every_order(&[&base[..], &[policy(2, 10, true, &[])]].concat());
        assert!(!m.is_member(&n(3)) && !m.members_invite());
        let m = same_in_every_order(&[add(1, 1), add(6, 1), add_as(2, 1, Writer), policy(6, 10, true, &[]), remove(6, 1, 0, &[]), add_as(3, 2, Writer)]);
        assert!(!m.is_member(&n(3)), "the policy of a removed owner");
        // The latest policy by an owner counts.
        let m = same_in_every_order(&[&base[..], &[policy(1, 10, true, &[]), policy(1, 20, false, &[3])]].concat());
        assert!(!m.members_invite() && m.is_member(&n(3)));
        let m = same_in_every_order(&[&base[..], &[policy(1, 20, true, &[]), policy(1, 10, false, &[])]].concat());
        assert!(m.members_invite() && m.is_member(&n(3)));
    }

    #[test]
    fn what_a_writer_invited_stands_as_far_as_the_owner_who_stopped_it_had_seen() {
        use Role::{ReadOnly, Writer};
        // Inviting turned off having seen 3, not 4.
        let m = same_in_every_order(&[add(1, 1), add_as(2, 1, Writer), policy(1, 10, true, &[]), add_as(3, 2, Writer), policy(1, 20, false, &[3]), add_as(4, 2, Writer)]);
        assert!(m.is_member(&n(3)) && !m.is_member(&n(4)));
        // The inviter made read-only, its granter having seen 3: 4 falls, and it invites no more.
        let m = same_in_every_order(&[add(1, 1), add_as(2, 1, Writer), policy(1, 10, true, &[]), add_as(3, 2, Writer), grant_seeing(2, 1, 30, ReadOnly, 0, &[3]), add_as(4, 2, Writer)]);
        assert!(m.is_member(&n(3)) && !m.is_member(&n(4)) && !m.may_invite(&n(2)));
        // The inviter removed, its remover having seen 3: the same.
        let m = same_in_every_order(&[add(1, 1), add_as(2, 1, Writer), policy(1, 10, true, &[]), add_as(3, 2, Writer), remove(2, 1, 0, &[3]), add_as(4, 2, Writer)]);
        assert!(m.is_member(&n(3)) && !m.is_member(&n(4)) && !m.is_member(&n(2)));
        // A member admitted read-only invites nobody.
        let m = same_in_every_order(&[add(1, 1), add_as(2, 1, ReadOnly), policy(1, 10, true, &[]), add_as(3, 2, Writer)]);
        assert!(!m.is_member(&n(3)));
    }

    #[test]
    fn a_writers_invitee_gets_no_more_than_the_owners_gave_and_no_authority() {
        use Role::{ReadOnly, Writer};
        // 3 was admitted read-only by the owner; a writer admitting it again as a writer
        // does not raise it.
        let m = same_in_every_order(&[add(1, 1), add_as(2, 1, Writer), add_as(3, 1, ReadOnly), policy(1, 10, true, &[]), add_as(3, 2, Writer)]);
        assert_eq!((m.role(&n(3)), m.cutoff(&n(3))), (Some(ReadOnly), Some(0)));
        // A writer's invitee removes nobody and grants nothing.
        let m = same_in_every_order(&[add(1, 1), add_as(2, 1, Writer), policy(1, 10, true, &[]), add_as(3, 2, Writer), remove(1, 3, 0, &[]), grant(3, 3, 5, Role::Owner, 0)]);
        assert!(m.is_member(&n(1)) && m.cutoff(&n(1)).is_none());
        assert_eq!(m.role(&n(3)), Some(Writer));
        // An owner may make it an owner; then it admits as one.
        let m = same_in_every_order(&[add(1, 1), add_as(2, 1, Writer), policy(1, 10, true, &[]), add_as(3, 2, Writer), grant(3, 1, 20, Role::Owner, 0), add(4, 3)]);
        assert_eq!((m.role(&n(3)), m.role(&n(4))), (Some(Role::Owner), Some(Role::Owner)));
    }

    #[test]
    fn an_owner_grants_roles_and_a_member_made_read_only_keeps_what_its_granter_had_seen() {
        let entries = [add(1, 1), add_as(2, 1, Role::Writer), grant(2, 1, 10, Role::ReadOnly, 5), add_as(3, 1, Role::ReadOnly)];
        let m = same_in_every_order(&entries);
        assert_eq!(m.role(&n(2)), Some(Role::ReadOnly));
        assert!(m.accepts(&v(2, 5)) && !m.accepts(&v(2, 6)));
        assert_eq!((m.role(&n(3)), m.cutoff(&n(3))), (Some(Role::ReadOnly), Some(0)), "admitted read-only: none of its versions");
        // A later grant makes it a writer again; the latest counts.
        let m = same_in_every_order(&[add(1, 1), add_as(2, 1, Role::Writer), grant(2, 1, 10, Role::ReadOnly, 5), grant(2, 1, 20, Role::Writer, 0)]);
        assert_eq!((m.role(&n(2)), m.cutoff(&n(2))), (Some(Role::Writer), None));
        // Ownership granted: it admits.
        let m = same_in_every_order(&[add(1, 1), add_as(2, 1, Role::Writer), grant(2, 1, 10, Role::Owner, 0), add_as(3, 2, Role::Writer)]);
        assert_eq!(m.role(&n(2)), Some(Role::Owner));
        assert!(m.is_member(&n(3)));
    }

    #[test]
    fn a_removal_cuts_off_an_owner_and_what_it_did_unseen() {
        // 2, an owner, is removed by 1 having admitted 3 (seen) and then 4 (unseen).
        let m = same_in_every_order(&[add(1, 1), add(2, 1), add(3, 2), remove(2, 1, 4, &[3]), add(4, 2)]);
        assert!(!m.is_member(&n(2)) && m.is_member(&n(3)) && !m.is_member(&n(4)));
        assert_eq!(m.cutoff(&n(2)), Some(4));
    }

    #[test]
    fn a_stolen_owners_laptop_cannot_cut_off_the_owner_that_made_it_one() {
        // 2 (an owner, stolen) removes 1 and 3; 1 removes 2 meanwhile, having seen nothing of
        // that: the senior owner's removal stands, and 2's removals fall.
        // (A remover has seen whom the removed node admitted: itself, at least.)
        let m = same_in_every_order(&[add(1, 1), add(2, 1), add(3, 1), remove(1, 2, 0, &[2, 3]), remove(3, 2, 0, &[]), remove(2, 1, 0, &[])]);
        assert!(m.is_member(&n(1)) && m.is_member(&n(3)) && !m.is_member(&n(2)));
        // Had 1 seen 2 remove 3 before it removed 2, that removal stands.
        let m = same_in_every_order(&[add(1, 1), add(2, 1), add(3, 1), remove(3, 2, 0, &[]), remove_seeing(2, 1, 0, &[], &[3])]);
        assert!(m.is_member(&n(1)) && !m.is_member(&n(3)) && !m.is_member(&n(2)));
    }

    #[test]
    fn a_removed_first_owner_removes_nobody_after_its_removal() {
        // 2 (an owner) removes 1, the first owner, which then (unaware) removes 3.
        let m = same_in_every_order(&[add(1, 1), add(2, 1), add(3, 1), remove(1, 2, 0, &[2, 3]), remove(3, 1, 0, &[])]);
        assert!(!m.is_member(&n(1)) && m.is_member(&n(2)));
        assert!(m.is_member(&n(3)), "the removed first owner's later removal does not count");
    }

    #[test]
    fn a_removed_node_admits_nobody_its_remover_had_not_seen() {
        // Seed 656: 4 is removed by 1, who had seen it admit 5; 4, unaware, then admits 6,
        // who admits 7.
        let m = same_in_every_order(&[add(1, 1), add(4, 1), add(5, 4), remove(4, 1, 3, &[5]), add(6, 4), add(7, 6)]);
        assert!(m.is_member(&n(5)), "admitted before the removal, and the remover knew");
        assert!(!m.is_member(&n(6)) && !m.is_member(&n(7)), "admitted after it: falls, and so does whom it admitted");
        assert!(!m.accepts(&v(6, 1)) && !m.accepts(&v(7, 1)));
    }

    #[test]
    fn of_two_removals_what_either_remover_had_seen_stands() {
        let m = same_in_every_order(&[add(1, 1), add(2, 1), add(4, 1), add(5, 4), remove(4, 1, 3, &[]), remove(4, 2, 9, &[5])]);
        assert!(m.is_member(&n(5)));
        assert_eq!(m.cutoff(&n(4)), Some(9));
    }

    #[test]
    fn a_node_whose_admission_fell_cannot_remove_anyone() {
        // 6 was admitted by 4 after 4's removal; its removal of 2 does not count.
        let m = same_in_every_order(&[add(1, 1), add(2, 1), add(4, 1), remove(4, 1, 0, &[]), add(6, 4), remove(2, 6, 0, &[])]);
        assert!(m.is_member(&n(2)));
        assert_eq!(m.cutoff(&n(2)), None);
    }

    #[test]
    fn a_long_chain_of_admissions_is_decided_in_linear_time() {
        // 20,000 members, each admitted by the one before.
        let id = |i: u32| {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_be_bytes());
            NodeId(b)
        };
        let bucket = Uid::mint(&id(0), [0; 8]);
        let mut entries = vec![MetaEntry::Member { node: id(0), added_by: id(0), at_ms: 0, role: Role::Owner }];
        entries.extend((1..20_000).map(|i| MetaEntry::Member { node: id(i), added_by: id(i - 1), at_ms: 0, role: Role::Owner }));
        entries.push(MetaEntry::Removed { node: id(10_000), by: id(0), at_ms: 0, seen: Seen { last_seq: 0, admitted: vec![], removed: vec![] } });
        let t = std::time::Instant::now();
        let m = Membership::from_entries(bucket, &entries);
        assert!(m.is_member(&id(9_999)) && !m.is_member(&id(10_000)) && !m.is_member(&id(10_001)) && !m.is_member(&id(19_999)));
        assert!(t.elapsed() < std::time::Duration::from_secs(2), "took {:?}", t.elapsed());
    }

    #[test]
    fn noting_entries_one_by_one_decides_as_reading_them_all() {
        let entries = [add(1, 1), add(4, 1), add(5, 4), remove(4, 1, 3, &[]), add(6, 5)];
        let mut m = Membership::new(bucket());
        assert!(entries.iter().all(|e| m.note(e)));
        assert!(!m.note(&entries[0]), "again: nothing new");
        let all = decide(&entries);
        assert_eq!(m.standing, all.standing);
        assert!(!m.is_member(&n(5)) && !m.is_member(&n(6)));
    }
}
