//! One simulated node: the production proto state machines (the replicated tree and its
//! winner rule, the hybrid logical clock, the sharded automerge documents and their sync),
//! held in memory, with a "disk" that keeps only what a commit made durable.
//!
//! What a real node keeps in SQLite is here [`Disk`]: committed changes (the tree is rebuilt
//! from them), the documents as last saved, the blobs. A crash drops everything else (the
//! documents' unsaved changes, sync states, the outbox cursor); a restart rebuilds from the
//! disk as the node does, with a new automerge actor (doc.rs says why).

use std::collections::{BTreeMap, BTreeSet};

use alknet_actors::proto::clock::{Hlc, Stamp};
use alknet_actors::proto::doc::{decode_state, encode_state, PeerState, ReplicaDoc};
use alknet_actors::proto::entry::{ContentHash, Entry, EntryKind, Version};
use alknet_actors::proto::ids::{NodeId, OrderKey, Uid, VersionId};
use alknet_actors::proto::path::TreePath;
use alknet_actors::proto::membership::{Membership, Role};
use alknet_actors::proto::merge::{decide, Decision, Side};
use alknet_actors::proto::replica::{self, doc_key, mark_commit, shard_of, whole_commits, BranchRecord, Change, MetaEntry, Origin};
use alknet_actors::proto::sync::{heads_digest, DOCS, META_DOC};
use alknet_actors::proto::tree::{Chain, Conflict, ReplicaTree};

/// Where the simulated wall clocks start (ms since the epoch): 2027-01-15.
pub const EPOCH_MS: i64 = 1_800_000_000_000;

/// The bucket's root branch.
pub const MAIN: Uid = Uid([7; 16]);

/// Node `index`'s identity in the mesh of `seed`.
pub fn node_id(seed: u64, index: usize) -> NodeId {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&seed.to_be_bytes());
    id[8..16].copy_from_slice(&(index as u64).to_be_bytes());
    NodeId(id)
}

/// The bucket of the mesh of `seed`: node 0 founds it (its first owner).
pub fn bucket_of(seed: u64) -> Uid {
    Uid::mint(&node_id(seed, 0), seed.to_be_bytes())
}

/// The role every member of a simulated mesh has: any member admits and removes, as the
/// workloads expect.
pub const MEMBER_ROLE: Role = Role::Owner;

/// The root branch's record, as the founder writes it.
pub fn main_record() -> BranchRecord {
    BranchRecord { uid: MAIN, name: "main".into(), parent: None, fork: None, created_ms: EPOCH_MS }
}

/// What a branch showed, path by path, when it was last merged with another: the base of
/// their next merge (the store's merge point).
pub type MergeBase = BTreeMap<TreePath, Version>;

/// A rule broken on purpose, to prove the harness catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// A node shows the version that arrived last, not the rule's winner.
    ArrivalOrder,
    /// A node drops deletes that come from peers.
    DropTombstones,
    /// A node accepts sync messages from anyone who connects, and versions whoever wrote
    /// them (neither the membership gate nor the writer check of `proto::membership`; either
    /// alone keeps a stranger's versions out).
    OpenGate,
}

/// What survives a crash.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    /// Every committed change (written here or applied from a peer), in commit order.
    pub changes: Vec<Change>,
    /// Each document as saved: a full save then increments.
    pub docs: BTreeMap<u16, Vec<Vec<u8>>>,
    /// Blobs held.
    pub blobs: BTreeSet<ContentHash>,
    /// Membership entries this node wrote (committed with the bucket's document).
    pub meta: Vec<MetaEntry>,
    /// Versions from peers whose operation has not wholly arrived (`mesh_held`).
    pub held: Vec<Change>,
    /// Versions from peers whose writer the bucket's document does not (or no longer)
    /// accept (`mesh_deferred`), or of a branch whose record has not arrived: reconsidered
    /// whenever the bucket's document changes.
    pub deferred: Vec<Change>,
    /// The base of the next merge between two branches (committed with the merge).
    pub merge_bases: BTreeMap<(Uid, Uid), MergeBase>,
}

/// A simulated node.
pub struct SimNode {
    /// Its place in the mesh.
    pub index: usize,
    /// Its identity.
    pub id: NodeId,
    /// The bucket's identity (minted by node 0, its first owner).
    pub bucket: Uid,
    /// Running (false between a crash and its restart).
    pub up: bool,
    /// How far its wall clock is off (ms), and how fast it drifts (ppm).
    pub skew_ms: i64,
    pub drift_ppm: i64,
    incarnation: u32,
    hlc: Hlc,
    seq: i64,
    tree: ReplicaTree,
    docs: BTreeMap<u16, ReplicaDoc>,
    peers: BTreeMap<(usize, u16), PeerState>,
    /// Committed changes not yet put into their documents.
    outbox: Vec<Change>,
    /// For [`Broken::ArrivalOrder`]: the last version of each path to arrive.
    arrived: BTreeMap<TreePath, VersionId>,
    /// The bucket's membership, from its document as this node holds it.
    members: Membership,
    /// The bucket's branches, from the same document.
    branches: BTreeMap<Uid, BranchRecord>,
    /// Blobs that versions here name and this node lacks.
    missing: BTreeSet<ContentHash>,
    /// Set when membership changed since [`take_members_changed`](Self::take_members_changed).
    members_changed: bool,
    broken: Option<Broken>,
    /// What survives a crash.
    pub disk: Disk,
}

impl SimNode {
    /// Node `index` of a mesh, its identity derived from `seed`.
    pub fn new(index: usize, seed: u64, skew_ms: i64, drift_ppm: i64, broken: Option<Broken>) -> Self {
        SimNode {
            index,
            id: node_id(seed, index),
            bucket: bucket_of(seed),
            up: true,
            skew_ms,
            drift_ppm,
            incarnation: 0,
            hlc: Hlc::default(),
            seq: 0,
            tree: ReplicaTree::new(),
            docs: BTreeMap::new(),
            peers: BTreeMap::new(),
            outbox: Vec::new(),
            arrived: BTreeMap::new(),
            members: Membership::new(bucket_of(seed)),
            branches: BTreeMap::new(),
            members_changed: false,
            missing: BTreeSet::new(),
            broken,
            disk: Disk::default(),
        }
    }

    /// Its wall clock at simulated time `t` (ms since the run began): skewed and drifting.
    pub fn wall_ms(&self, t: u64) -> i64 {
        EPOCH_MS + t as i64 + self.skew_ms + (t as i64).saturating_mul(self.drift_ppm) / 1_000_000
    }

    /// The replicated tree it holds.
    pub fn tree(&self) -> &ReplicaTree {
        &self.tree
    }

    /// What it shows at each live path.
    pub fn listing(&self) -> BTreeMap<TreePath, Entry> {
        match self.broken {
            Some(Broken::ArrivalOrder) => self.arrived.iter().filter_map(|(p, id)| Some((p.clone(), self.tree.get(id)?.version.entry.clone()?))).collect(),
            _ => self.tree.listing(&MAIN),
        }
    }

    /// What it shows at `path` (`None`: nothing live there).
    pub fn shows(&self, path: &TreePath) -> Option<Entry> {
        let id = match self.broken {
            Some(Broken::ArrivalOrder) => *self.arrived.get(path)?,
            _ => self.tree.head(&MAIN, path)?.id(),
        };
        self.tree.get(&id)?.version.entry.clone()
    }

    /// The conflict losers it lists.
    pub fn conflicts(&self) -> Vec<Conflict> {
        self.tree.conflicts(&MAIN)
    }

    /// The branches it knows.
    pub fn branches(&self) -> &BTreeMap<Uid, BranchRecord> {
        &self.branches
    }

    /// The branch it shows under `name` (of two made at once with one name, the earlier).
    pub fn branch_named(&self, name: &str) -> Option<Uid> {
        self.branches.values().filter(|b| b.name == name).min_by_key(|b| (b.created_ms, b.uid)).map(|b| b.uid)
    }

    /// What it shows on `branch` (reading through its ancestors), if it knows the branch.
    pub fn listing_of(&self, branch: &Uid) -> Option<BTreeMap<TreePath, Entry>> {
        if *branch == MAIN {
            return Some(self.listing());
        }
        Some(self.tree.listing_in(&ReplicaTree::chain(&self.branches, branch)?))
    }

    /// The conflict losers it lists on `branch`.
    pub fn conflicts_of(&self, branch: &Uid) -> Vec<Conflict> {
        self.tree.conflicts(branch)
    }

    /// Whether the bucket's document, as this node holds it, makes `node` a member (proto's
    /// rule: [`Membership`]).
    pub fn admits(&self, node: &NodeId) -> bool {
        self.members.is_member(node)
    }

    /// Whether the bucket's document, as this node holds it, accepts version `id`.
    pub fn accepts(&self, id: &VersionId) -> bool {
        self.members.accepts(id)
    }

    /// Whether this node takes `change` from a peer: its branch is known (as the store
    /// defers changes of unknown branches), and its writer accepted (its own are its own).
    fn takes(&self, change: &Change) -> bool {
        let id = change.id();
        self.branches.contains_key(&change.branch) && (id.node == self.id || self.broken == Some(Broken::OpenGate) || self.members.accepts(&id))
    }

    /// Whether this node is a member in its own view (joined, not known to be removed).
    pub fn joined(&self) -> bool {
        self.admits(&self.id)
    }

    /// True once after membership changed here.
    pub fn take_members_changed(&mut self) -> bool {
        std::mem::take(&mut self.members_changed)
    }

    /// Takes an entry of the bucket's document into account; true if it was news.
    fn note_meta(&mut self, entry: &MetaEntry) -> bool {
        if let MetaEntry::Branch(rec) = entry {
            return self.branches.insert(rec.uid, rec.clone()).is_none();
        }
        let changed = self.members.note(entry);
        self.members_changed |= changed;
        changed
    }

    /// The removal of `node` this node writes: what it had seen of it (its last version
    /// here, whom it had admitted).
    pub fn removal_of(&self, node: NodeId, at_ms: i64) -> MetaEntry {
        let last_seq = self.tree.changes().filter(|c| c.id().node == node).map(|c| c.id().seq).max().unwrap_or(0);
        MetaEntry::Removed { node, by: self.id, at_ms, seen: self.members.seen_of(&node, last_seq) }
    }

    /// Membership changed: versions of writers no longer accepted leave the tree (they wait
    /// with the deferred, as the node moves them to `mesh_deferred`), and deferred versions
    /// now accepted are applied. A node keeps its own versions whatever it hears. Returns
    /// what was applied.
    fn reconsider(&mut self) -> Vec<Change> {
        let refused: Vec<VersionId> = self.tree.changes().filter(|c| !self.takes(c)).map(Change::id).collect();
        if !refused.is_empty() {
            let gone: BTreeSet<VersionId> = refused.iter().copied().collect();
            for id in &refused {
                if let Some(c) = self.tree.remove(id) {
                    self.disk.deferred.push(c);
                }
            }
            self.disk.changes.retain(|c| !gone.contains(&c.id()));
            self.missing = self.tree.changes().filter_map(|c| c.version.entry.as_ref()).filter(|e| e.kind == EntryKind::File && !self.disk.blobs.contains(&e.hash)).map(|e| e.hash).collect();
        }
        let deferred = std::mem::take(&mut self.disk.deferred);
        let (ready, wait): (Vec<Change>, Vec<Change>) = deferred.into_iter().partition(|c| self.takes(c));
        self.disk.deferred = wait;
        self.apply(ready)
    }

    /// Commits changes from peers (accepted, whole): the tree, the clock, the disk.
    fn apply(&mut self, ready: Vec<Change>) -> Vec<Change> {
        let mut applied = Vec::new();
        for change in ready {
            if self.tree.contains(&change.id()) {
                continue;
            }
            self.hlc.observe(change.key.stamp());
            if self.broken == Some(Broken::DropTombstones) && change.version.entry.is_none() {
                continue;
            }
            self.insert(change.clone());
            applied.push(change);
        }
        applied
    }

    /// Writes a membership entry into the bucket's document (committed: it survives a
    /// crash). False if the document already held it.
    pub fn write_meta(&mut self, entry: MetaEntry) -> bool {
        let put = self.doc(META_DOC).put(&entry.key(), &entry.value()).unwrap_or(false);
        if put {
            self.note_meta(&entry);
            self.disk.meta.push(entry);
        }
        put
    }

    /// Takes the bucket's document as `inviter` holds it (what a join's first sync brings),
    /// under this node's own actor.
    pub fn join_from(&mut self, inviter: &mut SimNode) -> Result<(), String> {
        let saved = inviter.doc(META_DOC).save();
        // A full save replaces the inviter's saves of that document (its next increment
        // starts after this one).
        inviter.disk.docs.insert(META_DOC, vec![saved.clone()]);
        let actor = self.actor();
        let doc = ReplicaDoc::load(&saved, &[], &actor).map_err(|e| e.to_string())?;
        self.docs.insert(META_DOC, doc);
        self.disk.docs.insert(META_DOC, vec![saved]);
        self.reload_members()
    }

    fn reload_members(&mut self) -> Result<(), String> {
        let entries = self.docs.get(&META_DOC).map(ReplicaDoc::entries).unwrap_or_default();
        for (key, value) in entries {
            let entry = MetaEntry::decode(&key, &value).map_err(|e| e.to_string())?;
            self.note_meta(&entry);
        }
        Ok(())
    }

    /// Commits one local transaction on `branch`: each `(path, entry or tombstone, origin)`
    /// becomes a version stamped by the node's clock after all it has seen, naming the path's
    /// head (or the version this transaction wrote there before it) as what it replaced.
    /// Durable at once (SQLite commits), queued for publishing (outbox).
    pub fn commit(&mut self, t: u64, branch: Uid, items: Vec<(TreePath, Option<Entry>, Origin)>) -> Vec<Change> {
        let stamp = self.hlc.stamp(self.wall_ms(t));
        let mut out: Vec<Change> = Vec::new();
        for (path, entry, origin) in items {
            self.seq += 1;
            let key = OrderKey::new(stamp, &VersionId { node: self.id, seq: self.seq });
            if let Some(e) = &entry {
                if e.kind == EntryKind::File {
                    self.disk.blobs.insert(e.hash);
                    self.missing.remove(&e.hash);
                }
            }
            let mut change = self.tree.local_change(branch, path, key, Version { entry, written: stamp }, origin);
            if let Some(earlier) = out.iter().rev().find(|c| c.path == change.path) {
                change.pred = Some(earlier.id());
            }
            out.push(change);
        }
        // One operation: published marked as one, as the node's outbox events are (also when
        // a restart publishes it again).
        mark_commit(&mut out);
        for change in &out {
            self.insert(change.clone());
            self.outbox.push(change.clone());
        }
        out
    }

    /// Makes branch `uid` named `name`, forked from `parent` as this node sees it now (the
    /// record goes into the bucket's document, committed). False if `parent` is unknown here.
    pub fn create_branch(&mut self, t: u64, uid: Uid, name: &str, parent: Uid) -> bool {
        if !self.branches.contains_key(&parent) {
            return false;
        }
        let stamp = self.hlc.stamp(self.wall_ms(t));
        let rec = BranchRecord { uid, name: name.into(), parent: Some(parent), fork: Some(OrderKey::upto(stamp)), created_ms: self.wall_ms(t) };
        self.write_meta(MetaEntry::Branch(rec))
    }

    /// What `chain` shows, path by path (live paths only: a tombstone and absence are alike
    /// to a merge).
    fn view(&self, chain: &Chain) -> MergeBase {
        self.tree.heads_in(chain).into_iter().map(|(p, c)| (p, c.version.clone())).collect()
    }

    /// What the parent of the two showed when the other forked from it: the base of their
    /// first merge (`None` for branches neither of which forked from the other).
    fn fork_view(&self, a: Uid, b: Uid) -> Option<MergeBase> {
        let (ra, rb) = (self.branches.get(&a)?, self.branches.get(&b)?);
        let (child, parent) = if ra.parent == Some(b) {
            (ra, b)
        } else if rb.parent == Some(a) {
            (rb, a)
        } else {
            return None;
        };
        let fork = child.fork?;
        let mut chain = ReplicaTree::chain(&self.branches, &parent)?;
        for link in &mut chain {
            link.1 = link.1.min(fork);
        }
        Some(self.view(&chain))
    }

    /// Merges branch `from` into `into` (one transaction, its versions one operation), by
    /// proto's three-way rule: the base is what `from` showed at the last merge between the
    /// two, else the parent as the child forked from it; a path both sides changed is settled
    /// by last-writer-wins, the loser written just before the winner as a `conflict-loser`.
    /// `None` if either branch is unknown here.
    pub fn merge(&mut self, t: u64, from: Uid, into: Uid) -> Option<Vec<Change>> {
        let (source_chain, target_chain) = (ReplicaTree::chain(&self.branches, &from)?, ReplicaTree::chain(&self.branches, &into)?);
        let pair = (from.min(into), from.max(into));
        // Replaced by what the source shows now, below.
        let base = match self.disk.merge_bases.remove(&pair) {
            Some(base) => base,
            None => self.fork_view(from, into).unwrap_or_default(),
        };
        let (source, target) = (self.view(&source_chain), self.view(&target_chain));
        let paths: BTreeSet<&TreePath> = base.keys().chain(source.keys()).chain(target.keys()).collect();
        let mut items = Vec::new();
        for path in paths {
            let (b, s, tv) = (base.get(path), source.get(path), target.get(path));
            let entry = |v: Option<&Version>| v.and_then(|v| v.entry.clone());
            match decide(b, s, tv) {
                Decision::Keep => {}
                Decision::Take => items.push((path.clone(), entry(s), Origin::Merge)),
                Decision::Conflict { winner } => {
                    let (win, lose) = if winner == Side::Source { (s, tv) } else { (tv, s) };
                    items.push((path.clone(), entry(lose), Origin::ConflictLoser));
                    items.push((path.clone(), entry(win), Origin::Merge));
                }
            }
        }
        self.disk.merge_bases.insert(pair, source);
        Some(if items.is_empty() { Vec::new() } else { self.commit(t, into, items) })
    }

    fn insert(&mut self, change: Change) {
        if let Some(e) = &change.version.entry {
            if e.kind == EntryKind::File && !self.disk.blobs.contains(&e.hash) {
                self.missing.insert(e.hash);
            }
        }
        self.arrived.insert(change.path.clone(), change.id());
        self.disk.changes.push(change.clone());
        self.tree.insert(change);
    }

    fn actor(&self) -> Vec<u8> {
        let mut a = self.id.0.to_vec();
        a.extend_from_slice(&self.incarnation.to_be_bytes());
        a
    }

    fn doc(&mut self, shard: u16) -> &mut ReplicaDoc {
        let actor = self.actor();
        self.docs.entry(shard).or_insert_with(|| ReplicaDoc::new(&actor))
    }

    /// Puts the outbox's changes into their documents; returns the documents that changed.
    pub fn publish(&mut self) -> Vec<u16> {
        let mut touched = BTreeSet::new();
        for change in std::mem::take(&mut self.outbox) {
            let shard = shard_of(&change.branch, &change.path);
            if self.doc(shard).put(&doc_key(&change.id()), &replica::encode(&change)).unwrap_or(false) {
                touched.insert(shard);
            }
        }
        touched.into_iter().collect()
    }

    /// The next sync message of document `doc` for peer `peer`, if there is anything to say.
    pub fn generate(&mut self, peer: usize, doc: u16) -> Option<Vec<u8>> {
        let mut state = self.peers.remove(&(peer, doc)).unwrap_or_default();
        let msg = self.doc(doc).generate(&mut state);
        self.peers.insert((peer, doc), state);
        msg
    }

    /// The answer to a sync message of document `doc` just received from `peer`, when there
    /// is something to say (`proto::fanout`).
    pub fn answer(&mut self, peer: usize, doc: u16) -> Option<Vec<u8>> {
        let mut state = self.peers.remove(&(peer, doc)).unwrap_or_default();
        let msg = self.doc(doc).answer(&mut state);
        self.peers.insert((peer, doc), state);
        msg
    }

    /// The documents that differ from `theirs`, a summary from `peer`; on the others the
    /// peer is in step, and its sync states say so (as the node's `Mesh::compare`).
    pub fn compare(&mut self, peer: usize, theirs: &[u64]) -> Vec<u16> {
        let ours = self.summary();
        let differ = alknet_actors::proto::sync::differing(&ours, theirs);
        for doc in &differ {
            if let Some(state) = self.peers.get_mut(&(peer, *doc)) {
                alknet_actors::proto::fanout::speak_again(state);
            }
        }
        let same: Vec<u16> = (0..DOCS).filter(|d| !differ.contains(d) && self.docs.contains_key(d)).collect();
        for doc in same {
            let heads = self.doc(doc).heads();
            alknet_actors::proto::fanout::in_step(self.peers.entry((peer, doc)).or_default(), &heads);
        }
        differ
    }

    /// The digest of document `doc`'s heads.
    pub fn digest(&mut self, doc: u16) -> u64 {
        self.doc(doc).digest()
    }

    /// A sync message of document `doc` that carries its changes to a peer that has none,
    /// sent unasked (what a hostile peer pushes): found by running the protocol against an
    /// empty document until a message brings changes.
    pub fn unasked_message(&mut self, doc: u16) -> Option<Vec<u8>> {
        let mut empty = ReplicaDoc::new(b"probe");
        let (mut ours, mut theirs) = (PeerState::new(), PeerState::new());
        for _ in 0..4 {
            let msg = self.doc(doc).generate(&mut ours)?;
            if !empty.receive(&mut theirs, &msg, |_| Ok(())).ok()?.is_empty() {
                return Some(msg);
            }
            let reply = empty.generate(&mut theirs)?;
            self.doc(doc).receive(&mut ours, &reply, |_| Ok(())).ok()?;
        }
        None
    }

    /// Applies a sync message from `peer`: the changes it brought are committed in one
    /// transaction (the tree, the clock, the disk). Returns the changes that were new.
    pub fn receive(&mut self, peer: usize, doc: u16, msg: &[u8]) -> Result<Vec<Change>, String> {
        if doc > META_DOC {
            return Err(format!("document {doc} is not one of a bucket's"));
        }
        let mut state = self.peers.remove(&(peer, doc)).unwrap_or_default();
        let added = self.doc(doc).receive(&mut state, msg, |_| Ok(()));
        self.peers.insert((peer, doc), state);
        let added = added.map_err(|e| e.to_string())?;
        if doc == META_DOC {
            let mut changed = false;
            for (key, value) in added {
                let entry = MetaEntry::decode(&key, &value).map_err(|e| e.to_string())?;
                changed |= self.note_meta(&entry);
            }
            return Ok(if changed { self.reconsider() } else { Vec::new() });
        }
        let mut incoming = Vec::new();
        for (key, value) in added {
            let change = replica::decode(&value).map_err(|e| e.to_string())?;
            if doc_key(&change.id()) != key || shard_of(&change.branch, &change.path) != doc {
                return Err(format!("a change filed under the wrong key or shard: {key}"));
            }
            incoming.push(change);
        }
        // As the node does: versions of an operation not wholly here wait, out of the tree.
        let ops: BTreeSet<_> = incoming.iter().filter_map(|c| c.commit.map(|k| (c.id().node, k.first_seq))).collect();
        let (held, kept): (Vec<Change>, Vec<Change>) = std::mem::take(&mut self.disk.held).into_iter().partition(|c| c.commit.is_some_and(|k| ops.contains(&(c.id().node, k.first_seq))));
        let tree = &self.tree;
        let decided = whole_commits(incoming, held, |c| tree.contains(&c.id()));
        self.disk.held = kept;
        self.disk.held.extend(decided.hold);
        // As the node does: versions of writers the bucket's document does not accept wait.
        let (ready, wait): (Vec<Change>, Vec<Change>) = decided.ready.into_iter().partition(|c| self.takes(c));
        self.disk.deferred.extend(wait);
        Ok(self.apply(ready))
    }

    /// The digest of each document, as a session's summary carries them.
    pub fn summary(&mut self) -> Vec<u64> {
        let empty = heads_digest(std::iter::empty());
        (0..DOCS).map(|d| self.docs.get_mut(&d).map_or(empty, |doc| doc.digest())).collect()
    }

    /// Saves what changed in each document since its last save.
    pub fn persist(&mut self) {
        for (shard, doc) in &mut self.docs {
            let bytes = doc.save_incremental();
            if !bytes.is_empty() {
                self.disk.docs.entry(*shard).or_default().push(bytes);
            }
        }
    }

    /// A session with `peer` ended: what survives of its sync states is their saved form.
    pub fn session_ended(&mut self, peer: usize) {
        let keys: Vec<_> = self.peers.keys().filter(|(p, _)| *p == peer).copied().collect();
        for k in keys {
            let saved = encode_state(&self.peers[&k]);
            self.peers.insert(k, decode_state(&saved));
        }
    }

    /// Blobs that versions here name and this node lacks.
    pub fn missing_blobs(&self) -> Vec<ContentHash> {
        self.missing.iter().copied().collect()
    }

    /// Blobs that arrived from a peer.
    pub fn blobs_arrived(&mut self, hashes: Vec<ContentHash>) {
        for h in hashes {
            self.missing.remove(&h);
            self.disk.blobs.insert(h);
        }
    }

    /// Whether its outbox is empty (everything committed is in a document).
    pub fn published(&self) -> bool {
        self.outbox.is_empty()
    }

    /// Killed: everything not on disk is gone.
    pub fn crash(&mut self) {
        self.up = false;
        self.tree = ReplicaTree::new();
        self.docs.clear();
        self.peers.clear();
        self.outbox.clear();
        self.arrived.clear();
        self.members = Membership::new(self.bucket);
        self.branches.clear();
        self.missing.clear();
        self.hlc = Hlc::default();
    }

    /// Started again from its disk: the tree from the committed changes, the clock past every
    /// stamp they carry, the documents from their saves, and every committed change a save
    /// missed published again (under a new actor).
    pub fn restart(&mut self) -> Result<(), String> {
        self.incarnation += 1;
        self.up = true;
        let changes = self.disk.changes.clone();
        let mut last = Stamp::default();
        for c in &changes {
            last = last.max(c.key.stamp());
            if c.key.version().node == self.id {
                self.seq = self.seq.max(c.key.version().seq);
            }
            self.arrived.insert(c.path.clone(), c.id());
            if let Some(e) = c.version.entry.as_ref().filter(|e| e.kind == EntryKind::File && !self.disk.blobs.contains(&e.hash)) {
                self.missing.insert(e.hash);
            }
            self.tree.insert(c.clone());
        }
        self.hlc = Hlc::new(last);
        let actor = self.actor();
        for (shard, saves) in &self.disk.docs {
            let (full, rest) = saves.split_first().map(|(f, r)| (f.as_slice(), r.iter().map(Vec::as_slice).collect::<Vec<_>>())).unwrap_or((&[], Vec::new()));
            let doc = ReplicaDoc::load(full, &rest, &actor).map_err(|e| format!("node {} cannot load document {shard}: {e}", self.index))?;
            self.docs.insert(*shard, doc);
        }
        for c in changes {
            let shard = shard_of(&c.branch, &c.path);
            if !self.docs.get(&shard).is_some_and(|d| d.contains(&doc_key(&c.id()))) {
                self.outbox.push(c);
            }
        }
        for entry in self.disk.meta.clone() {
            // A save that missed it: written again (the key is this node's alone).
            self.doc(META_DOC).put(&entry.key(), &entry.value()).map_err(|e| e.to_string())?;
        }
        self.reload_members()?;
        self.members_changed = false;
        // Deferred versions the saved document accepts, and versions it no longer does.
        self.reconsider();
        Ok(())
    }
}
