//! The discrete-event simulator: N [`SimNode`]s in one thread, a simulated network between
//! them, and simulated time. Nothing here reads a clock, spawns a thread or does I/O; every
//! random choice comes from the seed, so a seed replays the same run event for event.
//!
//! The network is modelled the way the node uses it: between two running nodes that can
//! reach each other in both directions there is a session (a QUIC connection: reliable and
//! ordered, so a lost packet costs a retransmission's delay, never a hole). A partition, a
//! one-way link, a reset or a crash ends the session and drops what was in flight; when the
//! link is back a new session starts with each side's saved sync state, and both sides send
//! a summary of their documents' digests, as the node's anti-entropy round does.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use alknet_actors::proto::entry::{ContentHash, Entry, EntryKind};
use alknet_actors::proto::fanout::ANTI_ENTROPY_MS;
use alknet_actors::proto::ids::Uid;
use alknet_actors::proto::path::TreePath;
use alknet_actors::proto::replica::{MetaEntry, Origin};
use alknet_actors::proto::sync::META_DOC;

use crate::node::{Broken, SimNode, MAIN};
use crate::rng::{Rng, TraceHash};

mod invariants;

/// The network's and the nodes' parameters.
#[derive(Clone, Debug)]
pub struct NetParams {
    /// One-way latency of a message, ms (each message draws in this range).
    pub latency_ms: (u64, u64),
    /// Probability a packet of a message is lost and retransmitted (one more round trip).
    pub loss: f64,
    /// Probability a summary or blob message is delivered twice.
    pub dup: f64,
    /// How often each node runs its anti-entropy round and saves its documents, ms.
    pub tick_ms: u64,
}

impl Default for NetParams {
    fn default() -> Self {
        NetParams { latency_ms: (1, 40), loss: 0.02, dup: 0.02, tick_ms: 1_000 }
    }
}

/// What travels between nodes.
#[derive(Clone, Debug)]
enum Msg {
    /// The digests of every document (anti-entropy).
    Summary(Vec<u64>),
    /// An automerge sync message for one document.
    Sync(u16, Vec<u8>),
    /// A request for blobs.
    BlobGet(Vec<ContentHash>),
    /// Blobs (their bytes are in the simulation's content table).
    BlobPut(Vec<ContentHash>),
}

impl Msg {
    fn code(&self) -> u8 {
        match self {
            Msg::Summary(_) => 1,
            Msg::Sync(..) => 2,
            Msg::BlobGet(_) => 3,
            Msg::BlobPut(_) => 4,
        }
    }
}

enum Event {
    Deliver { from: usize, to: usize, session: u64, msg: Msg },
    Tick(usize),
}

/// The session id an intruder's messages carry: no session was ever opened with it.
const STRANGER: u64 = u64::MAX;

/// How many violations a run keeps the text of (all are counted).
pub const VIOLATIONS_KEPT: usize = 20;

/// A broken invariant, with when it was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Simulated time, ms.
    pub at_ms: u64,
    /// What was wrong.
    pub what: String,
}

/// Counts of a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Events processed (deliveries, ticks, actions).
    pub events: u64,
    /// Faults injected (partitions, one-way links, resets, crashes).
    pub faults: u64,
    /// Messages sent.
    pub messages: u64,
    /// Invariant violations seen.
    pub violations: u64,
    /// Messages refused because their sender is not a member (in the receiver's view).
    pub refused: u64,
    /// Sync frames (summaries and sync messages) delivered.
    pub frames: u64,
    /// Delivered sync frames that brought something ([`alknet_actors::proto::fanout`]).
    pub useful: u64,
}

/// A simulated mesh. Build one with [`Sim::new`], script it, and assert on its trees.
pub struct Sim {
    nodes: Vec<SimNode>,
    net: NetParams,
    rng: Rng,
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    next_event: u64,
    /// Directed links that are cut (`from`, `to`).
    cut: BTreeSet<(usize, usize)>,
    /// The current session of each pair of nodes (`lo`, `hi`), and whether it is up.
    sessions: BTreeMap<(usize, usize), (u64, bool)>,
    /// The last delivery time on each directed session channel (sessions are ordered).
    channel_at: BTreeMap<(usize, usize), u64>,
    /// Bytes of every blob ever written, by hash.
    contents: BTreeMap<ContentHash, Vec<u8>>,
    /// Every acknowledged local write: (node, version id).
    acked: Vec<(usize, alknet_actors::proto::ids::VersionId)>,
    /// The versions of each multi-change commit (a rename), by each of its versions.
    commits: BTreeMap<alknet_actors::proto::ids::VersionId, Vec<alknet_actors::proto::ids::VersionId>>,
    violations: Vec<Violation>,
    trace: TraceHash,
    stats: Stats,
    seed: u64,
    broken: Option<Broken>,
    /// Skews and drifts given to nodes made from here on.
    skews: Vec<(i64, i64)>,
    /// When each node last sent its anti-entropy summaries.
    summarized_at: BTreeMap<usize, u64>,
}

/// A node's handle in a [`Sim`]: its index.
pub type NodeIx = usize;

impl Sim {
    /// An empty mesh whose every random choice comes from `seed`. Add nodes with
    /// [`nodes`](Self::nodes).
    pub fn new(seed: u64) -> Sim {
        Sim {
            nodes: Vec::new(),
            net: NetParams::default(),
            rng: Rng::new(seed, 1),
            now: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            cut: BTreeSet::new(),
            sessions: BTreeMap::new(),
            channel_at: BTreeMap::new(),
            contents: BTreeMap::new(),
            acked: Vec::new(),
            commits: BTreeMap::new(),
            violations: Vec::new(),
            trace: TraceHash::default(),
            stats: Stats::default(),
            seed,
            broken: None,
            skews: Vec::new(),
            summarized_at: BTreeMap::new(),
        }
    }

    /// The network's parameters (before adding nodes or after: they apply from now on).
    pub fn network(mut self, net: NetParams) -> Sim {
        self.net = net;
        self
    }

    /// Runs every node with `rule` broken (to show the harness catches it). For nodes made
    /// after this call.
    pub fn broken(mut self, rule: Broken) -> Sim {
        self.broken = Some(rule);
        self
    }

    /// Clock skews (ms) and drifts (ppm) of the nodes to be made, in order; nodes beyond the
    /// list keep true clocks.
    pub fn clocks(mut self, skews: &[(i64, i64)]) -> Sim {
        self.skews = skews.to_vec();
        self
    }

    /// Adds `n` members of the bucket, all connected. The first node made founds the bucket;
    /// the others join through it.
    pub fn nodes(mut self, n: usize) -> Sim {
        for _ in 0..n {
            let i = self.add_node();
            if i == 0 {
                let id = self.nodes[0].id;
                self.nodes[0].write_meta(MetaEntry::Member { node: id, added_by: id, at_ms: 0, role: crate::node::MEMBER_ROLE });
                self.nodes[0].write_meta(MetaEntry::Branch(crate::node::main_record()));
            } else {
                self.join(i, 0);
            }
        }
        self.relink();
        // Until every member has heard of every other (a member is refused by those that
        // have not yet heard of its admission).
        for _ in 0..1_000 {
            if self.quiet() {
                break;
            }
            self.run_for(10);
        }
        self
    }

    /// Adds `n` nodes that are not members: they may [`join`](Self::join) later, or play
    /// strangers that [`intrude`](Self::intrude).
    pub fn outsiders(mut self, n: usize) -> Sim {
        for _ in 0..n {
            self.add_node();
        }
        self
    }

    fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let (skew, drift) = self.skews.get(i).copied().unwrap_or((0, 0));
        self.nodes.push(SimNode::new(i, self.seed, skew, drift, self.broken));
        let first = self.net.tick_ms.max(1);
        let at = self.rng.between(1, first);
        self.schedule(at, Event::Tick(i));
        i
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True with no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Simulated time, ms since the start.
    pub fn now_ms(&self) -> u64 {
        self.now
    }

    /// The counts so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The hash of every event so far: equal for equal runs.
    pub fn trace_hash(&self) -> u64 {
        self.trace.0
    }

    /// Violations seen so far.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Node `n` (to inspect its tree, conflicts, disk).
    pub fn node(&self, n: NodeIx) -> &SimNode {
        &self.nodes[n]
    }

    fn schedule(&mut self, at: u64, event: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.queue.push(Reverse((at, id)));
        self.events.insert(id, event);
    }

    /// A session's key: the pair, smaller first.
    fn pair(a: usize, b: usize) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        a != b
            && self.nodes[a].up
            && self.nodes[b].up
            && !self.cut.contains(&(a, b))
            && !self.cut.contains(&(b, a))
            && self.nodes[a].admits(&self.nodes[b].id)
            && self.nodes[b].admits(&self.nodes[a].id)
    }

    /// Brings every pair's session in line with the links: one that can no longer run ends
    /// (in flight is lost); one that can starts afresh and both sides send a summary.
    fn relink(&mut self) {
        let n = self.nodes.len();
        for a in 0..n {
            for b in a + 1..n {
                let want = self.reachable(a, b);
                let (epoch, up) = self.sessions.get(&(a, b)).copied().unwrap_or((0, false));
                if want == up {
                    continue;
                }
                self.sessions.insert((a, b), (epoch + 1, want));
                self.channel_at.remove(&(a, b));
                self.channel_at.remove(&(b, a));
                if self.nodes[a].up {
                    self.nodes[a].session_ended(b);
                }
                if self.nodes[b].up {
                    self.nodes[b].session_ended(a);
                }
                if want {
                    self.send_summary(a, b);
                    self.send_summary(b, a);
                }
            }
        }
    }

    fn linked(&self, a: usize) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&b| b != a && self.sessions.get(&Self::pair(a, b)).is_some_and(|s| s.1)).collect()
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        let Some(&(session, true)) = self.sessions.get(&Self::pair(from, to)) else { return };
        self.stats.messages += 1;
        let (lo, hi) = self.net.latency_ms;
        let mut at = self.now + self.rng.between(lo, hi);
        if self.rng.chance(self.net.loss) {
            // A lost packet: QUIC sends it again after about a round trip.
            at += 2 * hi.max(1);
        }
        let ordered = matches!(msg, Msg::Sync(..));
        if ordered {
            let last = self.channel_at.get(&(from, to)).copied().unwrap_or(0);
            at = at.max(last);
            self.channel_at.insert((from, to), at);
        } else if self.rng.chance(self.net.dup) {
            let again = at + self.rng.between(lo, hi);
            self.schedule(again, Event::Deliver { from, to, session, msg: msg.clone() });
        }
        self.schedule(at, Event::Deliver { from, to, session, msg });
    }

    fn send_summary(&mut self, from: usize, to: usize) {
        let digests = self.nodes[from].summary();
        self.send(from, to, Msg::Summary(digests));
    }

    /// Pushes to every linked peer what it lacks of documents `docs` (changes made here).
    fn offer(&mut self, from: usize, docs: &[u16]) {
        for peer in self.linked(from) {
            for &d in docs {
                if let Some(m) = self.nodes[from].generate(peer, d) {
                    self.send(from, peer, Msg::Sync(d, m));
                }
            }
        }
    }

    /// Runs events until simulated time `t`.
    pub fn run_until(&mut self, t: u64) {
        while let Some(&Reverse((at, id))) = self.queue.peek() {
            if at > t {
                break;
            }
            self.queue.pop();
            self.now = at;
            let Some(event) = self.events.remove(&id) else { continue };
            self.step(event);
        }
        self.now = self.now.max(t);
    }

    /// Runs for `ms` of simulated time.
    pub fn run_for(&mut self, ms: u64) {
        let t = self.now + ms;
        self.run_until(t);
    }

    fn step(&mut self, event: Event) {
        self.stats.events += 1;
        self.trace.add_u64(self.now);
        match event {
            Event::Tick(n) => {
                self.trace.add(&[0, n as u8]);
                let next = self.now + self.net.tick_ms;
                self.schedule(next, Event::Tick(n));
                if !self.nodes[n].up {
                    return;
                }
                self.nodes[n].persist();
                // As the node does (`proto::fanout`): its own changes pushed at once, and the
                // dialer's summaries (here the smaller index) every ANTI_ENTROPY_MS.
                let docs = self.nodes[n].publish();
                self.offer(n, &docs);
                let peers = self.linked(n);
                let last = self.summarized_at.get(&n).copied();
                if last.is_none_or(|t| self.now >= t + ANTI_ENTROPY_MS) {
                    self.summarized_at.insert(n, self.now);
                    for &p in peers.iter().filter(|&&p| p > n) {
                        self.send_summary(n, p);
                    }
                }
                let missing = self.nodes[n].missing_blobs();
                if !missing.is_empty() && !peers.is_empty() {
                    let p = *self.rng.pick(&peers);
                    self.send(n, p, Msg::BlobGet(missing));
                }
            }
            Event::Deliver { from, to, session, msg } => {
                self.trace.add(&[1, from as u8, to as u8, msg.code()]);
                // The gate every protocol passes: a sender the receiver does not hold to be a
                // member is refused before anything it sent is looked at.
                let sender = self.nodes[from].id;
                let open_gate = self.broken == Some(Broken::OpenGate) && session == STRANGER;
                if !self.nodes[to].admits(&sender) && !open_gate {
                    self.stats.refused += 1;
                    return;
                }
                if self.sessions.get(&Self::pair(from, to)) != Some(&(session, true)) && !open_gate {
                    return;
                }
                match msg {
                    Msg::Summary(theirs) => {
                        self.stats.frames += 1;
                        let mut useful = false;
                        for d in self.nodes[to].compare(from, &theirs) {
                            if let Some(m) = self.nodes[to].generate(from, d) {
                                useful = true;
                                self.send(to, from, Msg::Sync(d, m));
                            }
                        }
                        self.stats.useful += u64::from(useful);
                    }
                    Msg::Sync(doc, bytes) => {
                        self.stats.frames += 1;
                        self.trace.add_u64(bytes.len() as u64);
                        let before = self.nodes[to].digest(doc);
                        match self.nodes[to].receive(from, doc, &bytes) {
                            Ok(applied) => {
                                if doc == META_DOC && self.nodes[to].take_members_changed() {
                                    self.relink();
                                }
                                // Answered only when there is something to say; not forwarded.
                                let answer = self.nodes[to].answer(from, doc);
                                self.stats.useful += u64::from(answer.is_some() || self.nodes[to].digest(doc) != before);
                                if let Some(m) = answer {
                                    self.send(to, from, Msg::Sync(doc, m));
                                }
                                if !applied.is_empty() {
                                    self.trace.add_u64(applied.len() as u64);
                                    // As the node does: the bytes of what arrived, from the peer that sent it.
                                    let want: Vec<ContentHash> = applied
                                        .iter()
                                        .filter_map(|c| c.version.entry.as_ref())
                                        .filter(|e| e.kind == EntryKind::File && !self.nodes[to].disk.blobs.contains(&e.hash))
                                        .map(|e| e.hash)
                                        .collect();
                                    if !want.is_empty() {
                                        self.send(to, from, Msg::BlobGet(want));
                                    }
                                    self.check_paths(to, applied.iter().map(|c| (c.branch, c.path.clone())).collect());
                                    self.check_whole(to, &applied);
                                }
                            }
                            Err(e) => self.violation(format!("node {to} refused a sync message from node {from}: {e}")),
                        }
                    }
                    Msg::BlobGet(hashes) => {
                        let have: Vec<ContentHash> = hashes.into_iter().filter(|h| self.nodes[to].disk.blobs.contains(h)).collect();
                        if !have.is_empty() {
                            self.send(to, from, Msg::BlobPut(have));
                        }
                    }
                    Msg::BlobPut(hashes) => self.nodes[to].blobs_arrived(hashes),
                }
            }
        }
    }

    // --- The scripting API -------------------------------------------------------------

    fn content(&mut self, bytes: &[u8]) -> Entry {
        let hash = ContentHash(*blake3::hash(bytes).as_bytes());
        self.contents.insert(hash, bytes.to_vec());
        Entry { kind: EntryKind::File, hash, size: bytes.len() as u64, mode: 0o644, mtime_ms: 0 }
    }

    fn local(&mut self, n: NodeIx, items: Vec<(TreePath, Option<Entry>, Origin)>) -> bool {
        self.local_on(n, MAIN, items)
    }

    fn local_on(&mut self, n: NodeIx, branch: Uid, items: Vec<(TreePath, Option<Entry>, Origin)>) -> bool {
        if !self.nodes[n].up || !self.nodes[n].joined() {
            return false;
        }
        self.stats.events += 1;
        self.trace.add(&[2, n as u8, items.len() as u8]);
        let now = self.now;
        let changes = self.nodes[n].commit(now, branch, items);
        self.committed(n, changes);
        true
    }

    /// Records what node `n` committed (acknowledged; its operation, for the wholeness check)
    /// and publishes it.
    fn committed(&mut self, n: NodeIx, changes: Vec<alknet_actors::proto::replica::Change>) {
        for c in &changes {
            self.acked.push((n, c.id()));
        }
        if changes.len() > 1 {
            let ids: Vec<_> = changes.iter().map(|c| c.id()).collect();
            for id in &ids {
                self.commits.insert(*id, ids.clone());
            }
        }
        let docs = self.nodes[n].publish();
        self.offer(n, &docs);
    }

    fn path(p: &str) -> TreePath {
        TreePath::parse_non_root(p).expect("a valid simulated path")
    }

    /// Node `n` writes `bytes` at `path` (acknowledged at once, as a local write is). False
    /// when `n` is down.
    pub fn write(&mut self, n: NodeIx, path: &str, bytes: &[u8]) -> bool {
        let entry = self.content(bytes);
        self.local(n, vec![(Self::path(path), Some(entry), Origin::Write)])
    }

    /// Node `n` writes `bytes` at `path` on branch `branch` (by name, as `n` knows it).
    /// False when `n` is down or does not know the branch.
    pub fn write_on(&mut self, n: NodeIx, branch: &str, path: &str, bytes: &[u8]) -> bool {
        let Some(uid) = self.nodes[n].branch_named(branch) else { return false };
        let entry = self.content(bytes);
        self.local_on(n, uid, vec![(Self::path(path), Some(entry), Origin::Write)])
    }

    /// Node `n` makes branch `name`, forked from branch `from` as `n` sees it now. False when
    /// `n` is down, not a member, or does not know `from`.
    pub fn branch(&mut self, n: NodeIx, name: &str, from: &str) -> bool {
        if !self.nodes[n].up || !self.nodes[n].joined() {
            return false;
        }
        let Some(parent) = self.nodes[n].branch_named(from) else { return false };
        let mut uid = [0u8; 16];
        uid[..8].copy_from_slice(&self.rng.next_u64().to_be_bytes());
        uid[8..].copy_from_slice(&self.rng.next_u64().to_be_bytes());
        self.trace.add(&[8, n as u8]);
        let now = self.now;
        if !self.nodes[n].create_branch(now, Uid(uid), name, parent) {
            return false;
        }
        self.offer(n, &[META_DOC]);
        true
    }

    /// Node `n` merges branch `from` into branch `into` (by name, as `n` knows them): one
    /// transaction, by proto's three-way rule. False when `n` is down, not a member, or does
    /// not know both branches.
    pub fn merge(&mut self, n: NodeIx, from: &str, into: &str) -> bool {
        if !self.nodes[n].up || !self.nodes[n].joined() {
            return false;
        }
        let (Some(f), Some(i)) = (self.nodes[n].branch_named(from), self.nodes[n].branch_named(into)) else { return false };
        if f == i {
            return false;
        }
        self.stats.events += 1;
        self.trace.add(&[9, n as u8]);
        let now = self.now;
        let Some(changes) = self.nodes[n].merge(now, f, i) else { return false };
        self.committed(n, changes);
        true
    }

    /// Node `n` deletes `path` (if it shows it).
    pub fn delete(&mut self, n: NodeIx, path: &str) -> bool {
        let p = Self::path(path);
        if !self.nodes[n].up || self.nodes[n].shows(&p).is_none() {
            return false;
        }
        self.local(n, vec![(p, None, Origin::Delete)])
    }

    /// Node `n` renames `from` to `to` in one commit (if it shows `from`).
    pub fn rename(&mut self, n: NodeIx, from: &str, to: &str) -> bool {
        let (f, t) = (Self::path(from), Self::path(to));
        if f == t || !self.nodes[n].up {
            return false;
        }
        let Some(entry) = self.nodes[n].shows(&f) else { return false };
        if entry.kind != EntryKind::File {
            return false;
        }
        self.local(n, vec![(f, None, Origin::Rename), (t, Some(entry), Origin::Rename)])
    }

    /// Node `n` makes directory `path`.
    pub fn mkdir(&mut self, n: NodeIx, path: &str) -> bool {
        self.local(n, vec![(Self::path(path), Some(Entry::dir(0o755, 0)), Origin::Mkdir)])
    }

    /// Splits the mesh: nodes in different groups cannot reach each other (groups need not
    /// cover every node; those left out keep their links to everyone).
    pub fn partition(&mut self, a: &[NodeIx], b: &[NodeIx]) {
        self.stats.faults += 1;
        self.trace.add(b"partition");
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
        self.relink();
    }

    /// Cuts the link from `from` to `to` only (a one-way link: no session can run on it).
    pub fn cut_one_way(&mut self, from: NodeIx, to: NodeIx) {
        self.stats.faults += 1;
        self.trace.add(b"oneway");
        self.cut.insert((from, to));
        self.relink();
    }

    /// Resets the session between `a` and `b` (what was in flight is lost; it starts again).
    pub fn reset(&mut self, a: NodeIx, b: NodeIx) {
        self.stats.faults += 1;
        self.trace.add(b"reset");
        if let Some(s) = self.sessions.get_mut(&Self::pair(a, b)) {
            s.1 = false;
        }
        self.relink();
    }

    /// Every link works again.
    pub fn heal(&mut self) {
        self.trace.add(b"heal");
        self.cut.clear();
        self.relink();
    }

    /// Kills node `n`: what was not committed is lost.
    pub fn crash(&mut self, n: NodeIx) {
        if !self.nodes[n].up {
            return;
        }
        self.stats.faults += 1;
        self.trace.add(&[3, n as u8]);
        self.nodes[n].crash();
        self.relink();
    }

    /// Starts node `n` again from what it committed.
    pub fn restart(&mut self, n: NodeIx) {
        if self.nodes[n].up {
            return;
        }
        self.trace.add(&[4, n as u8]);
        if let Err(e) = self.nodes[n].restart() {
            self.violation(e);
        }
        self.relink();
    }

    /// Node `node` joins the bucket through member `via` (its ticket was good): `via` adds it
    /// to the bucket's document, and the joiner starts from `via`'s copy of that document.
    /// False if either is down, `via` is not a member or `node` already is.
    pub fn join(&mut self, node: NodeIx, via: NodeIx) -> bool {
        if node == via || !self.nodes[node].up || !self.nodes[via].up || !self.nodes[via].joined() || self.nodes[node].joined() {
            return false;
        }
        self.trace.add(&[5, node as u8, via as u8]);
        let (id, by) = (self.nodes[node].id, self.nodes[via].id);
        let now = self.now as i64;
        self.nodes[via].write_meta(MetaEntry::Member { node: id, added_by: by, at_ms: now, role: crate::node::MEMBER_ROLE });
        self.nodes[via].take_members_changed();
        let (lo, hi) = (node.min(via), node.max(via));
        let (left, right) = self.nodes.split_at_mut(hi);
        let (joiner, inviter) = if node == lo { (&mut left[lo], &mut right[0]) } else { (&mut right[0], &mut left[lo]) };
        if let Err(e) = joiner.join_from(inviter) {
            self.violation(format!("node {node} could not join through node {via}: {e}"));
            return false;
        }
        self.nodes[node].take_members_changed();
        self.offer(via, &[META_DOC]);
        self.relink();
        true
    }

    /// Member `by` removes `node` from the bucket, everywhere the removal reaches.
    pub fn remove(&mut self, by: NodeIx, node: NodeIx) -> bool {
        if by == node || !self.nodes[by].up || !self.nodes[by].joined() || !self.nodes[by].admits(&self.nodes[node].id) {
            return false;
        }
        self.stats.faults += 1;
        self.trace.add(&[6, by as u8, node as u8]);
        let id = self.nodes[node].id;
        let now = self.now as i64;
        let removal = self.nodes[by].removal_of(id, now);
        self.nodes[by].write_meta(removal);
        self.nodes[by].take_members_changed();
        self.offer(by, &[META_DOC]);
        self.relink();
        true
    }

    /// Node `node` (a stranger, or a removed member) writes a file and pushes sync messages
    /// at `target` without a session, as a hostile peer that knows the address would.
    pub fn intrude(&mut self, node: NodeIx, target: NodeIx) {
        if node == target || !self.nodes[node].up {
            return;
        }
        self.stats.faults += 1;
        self.trace.add(&[7, node as u8, target as u8]);
        let entry = self.content(format!("intruder {node} at {}", self.now).as_bytes());
        let now = self.now;
        self.nodes[node].commit(now, MAIN, vec![(Self::path("/intruder.txt"), Some(entry), Origin::Write)]);
        let docs = self.nodes[node].publish();
        for d in docs {
            if let Some(m) = self.nodes[node].unasked_message(d) {
                let at = now + self.net.latency_ms.1;
                self.schedule(at, Event::Deliver { from: node, to: target, session: STRANGER, msg: Msg::Sync(d, m) });
            }
        }
    }

    /// What node `n` shows: each live file's path and bytes (directories end in `/`).
    pub fn tree(&self, n: NodeIx) -> BTreeMap<String, Vec<u8>> {
        self.render(self.nodes[n].listing())
    }

    /// What node `n` shows on branch `branch` (by name), as [`tree`](Self::tree) does for
    /// the root branch; `None` if it does not know the branch.
    pub fn tree_on(&self, n: NodeIx, branch: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let uid = self.nodes[n].branch_named(branch)?;
        Some(self.render(self.nodes[n].listing_of(&uid)?))
    }

    fn render(&self, listing: BTreeMap<TreePath, Entry>) -> BTreeMap<String, Vec<u8>> {
        listing
            .into_iter()
            .map(|(p, e)| match e.kind {
                EntryKind::Dir => (format!("{}/", p.as_str()), Vec::new()),
                _ => (p.as_str().to_string(), self.contents.get(&e.hash).cloned().unwrap_or_default()),
            })
            .collect()
    }

    /// The conflict losers node `n` lists: (path, the losing bytes).
    pub fn conflicts(&self, n: NodeIx) -> Vec<(String, Vec<u8>)> {
        let node = &self.nodes[n];
        node.conflicts()
            .into_iter()
            .map(|c| {
                let bytes = node.tree().get(&c.loser).and_then(|v| v.version.entry.as_ref()).and_then(|e| self.contents.get(&e.hash)).cloned().unwrap_or_default();
                (c.path.as_str().to_string(), bytes)
            })
            .collect()
    }

    /// Whether every running node holds the same documents, trees and blobs, with nothing
    /// left to publish.
    fn quiet(&mut self) -> bool {
        let up = self.active();
        let Some(&first) = up.first() else { return true };
        let digest = self.nodes[first].summary();
        up.iter().all(|&n| self.nodes[n].published() && self.reachable_missing(n, &up).is_empty())
            && up.iter().all(|&n| self.nodes[n].summary() == digest)
    }

    /// Runs until the mesh is quiet (or `limit_ms` of simulated time passed: a violation).
    /// Then checks what must hold at quiescence.
    pub fn run_until_quiet(&mut self) -> Result<(), Vec<Violation>> {
        let limit = self.now + 600_000;
        let step = self.net.tick_ms.max(1);
        loop {
            self.run_for(step);
            if self.quiet() {
                break;
            }
            if self.now >= limit {
                self.violation("the mesh did not become quiet within 10 simulated minutes".into());
                break;
            }
        }
        self.check_quiet();
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(self.violations.clone())
        }
    }

}
