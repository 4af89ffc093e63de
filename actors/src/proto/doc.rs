//! One replicated document: an automerge document whose root map holds scalar byte values
//! under keys each written once, by one node (see [`super::replica`]). It carries a set; what
//! the entries mean is for the caller. Pure computation (automerge does no I/O), so the node
//! and the simulations run the same code.

use automerge::sync::{self, SyncDoc};
use automerge::{ActorId, AutoCommit, ChangeHash, PatchLog, ReadDoc, ScalarValue, Value, ROOT};
use automerge::transaction::{CommitOptions, Transactable};

use super::limits::MESSAGE_ENTRIES_MAX;
use super::sync::heads_digest;

/// Why a document or a message from a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    /// Bytes that are not an automerge document or sync message, or a change automerge
    /// refuses (bad dependencies, a duplicate sequence number).
    #[error("automerge refused the data: {0}")]
    Automerge(String),
    /// A message that breaks a rule of write-once entries, or that the caller's check
    /// refused: nothing of it was applied.
    #[error("{0}")]
    Refused(String),
}

/// A document of write-once entries.
pub struct ReplicaDoc {
    doc: AutoCommit,
    /// The heads at the last save: an incremental save is what came after them
    /// (automerge's own marker is empty after a load, which would save everything again).
    saved: Vec<ChangeHash>,
}

impl std::fmt::Debug for ReplicaDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaDoc").finish_non_exhaustive()
    }
}

/// A sync session's state with one peer for one document.
pub type PeerState = sync::State;

impl ReplicaDoc {
    /// An empty document whose new changes are made as `actor`. Every session of a node
    /// must use its own actor (e.g. the node id and a random part): after a crash a node may
    /// have lost changes its peers already hold, and reusing an actor's sequence numbers for
    /// different changes would be refused by every peer that has the old ones.
    pub fn new(actor: &[u8]) -> Self {
        ReplicaDoc { doc: AutoCommit::new().with_actor(ActorId::from(actor)), saved: Vec::new() }
    }

    /// A document from saved bytes (a full save followed by incremental ones).
    pub fn load(full: &[u8], increments: &[&[u8]], actor: &[u8]) -> Result<Self, DocError> {
        let mut doc = if full.is_empty() { AutoCommit::new() } else { AutoCommit::load(full).map_err(am)? };
        for inc in increments {
            doc.load_incremental(inc).map_err(am)?;
        }
        let saved = doc.get_heads();
        Ok(ReplicaDoc { doc: doc.with_actor(ActorId::from(actor)), saved })
    }

    /// A document holding `entries` and nothing else, made alike on every node: one change by
    /// `genesis_actor`, stamped time 0, its keys put in order. Nodes that build it from the
    /// same entries and actor make the same change (the same hash), so none needs another's
    /// copy (an epoch's documents, `super::compaction`). Later changes are made as `actor`.
    pub fn genesis(genesis_actor: &[u8], entries: &[(String, Vec<u8>)], actor: &[u8]) -> Result<Self, DocError> {
        let mut sorted: Vec<&(String, Vec<u8>)> = entries.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        sorted.dedup_by(|a, b| a.0 == b.0);
        if sorted.is_empty() {
            // Nothing kept: an empty document (an empty change would cost every node a
            // document's overhead for nothing).
            return Ok(ReplicaDoc::new(actor));
        }
        let mut doc = AutoCommit::new().with_actor(ActorId::from(genesis_actor));
        for (key, value) in sorted {
            doc.put(ROOT, key.as_str(), ScalarValue::Bytes(value.clone())).map_err(am)?;
        }
        doc.commit_with(CommitOptions::default().with_time(0));
        doc.set_actor(ActorId::from(actor));
        Ok(ReplicaDoc { doc, saved: Vec::new() })
    }

    /// Every (key, value) pair as the document stood at `heads`, in key order; `None` if it
    /// lacks one of them.
    pub fn entries_at(&mut self, heads: &[ChangeHash]) -> Option<Vec<(String, Vec<u8>)>> {
        if heads.iter().any(|h| self.doc.get_change_by_hash(h).is_none()) {
            return None;
        }
        let value = |k: &str| match self.doc.get_at(ROOT, k, heads) {
            Ok(Some((Value::Scalar(s), _))) => match s.as_ref() {
                ScalarValue::Bytes(b) => Some(b.clone()),
                _ => None,
            },
            _ => None,
        };
        Some(self.doc.keys_at(ROOT, heads).filter_map(|k| value(&k).map(|v| (k, v))).collect())
    }

    /// The automerge actor of the change that set `key` (the winning one, were two to
    /// race), if it is set.
    pub fn author_of(&self, key: &str) -> Option<Vec<u8>> {
        match self.doc.get(ROOT, key) {
            Ok(Some((_, automerge::ObjId::Id(_, actor, _)))) => Some(actor.to_bytes().to_vec()),
            _ => None,
        }
    }

    /// Whether `key` has a value.
    pub fn contains(&self, key: &str) -> bool {
        matches!(self.doc.get(ROOT, key), Ok(Some(_)))
    }

    /// Sets `key` (not set before) to `value`. A key already present is left alone.
    pub fn put(&mut self, key: &str, value: &[u8]) -> Result<bool, DocError> {
        if self.contains(key) {
            return Ok(false);
        }
        self.doc.put(ROOT, key, ScalarValue::Bytes(value.to_vec())).map_err(am)?;
        Ok(true)
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.doc.get(ROOT, key) {
            Ok(Some((Value::Scalar(s), _))) => match s.as_ref() {
                ScalarValue::Bytes(b) => Some(b.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Every (key, value) pair, in key order.
    pub fn entries(&self) -> Vec<(String, Vec<u8>)> {
        self.doc.keys(ROOT).filter_map(|k| self.get(&k).map(|v| (k, v))).collect()
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.doc.length(ROOT)
    }

    /// True when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A digest of its heads: equal for equal documents.
    pub fn digest(&mut self) -> u64 {
        let heads = self.doc.get_heads();
        heads_digest(heads.iter().map(|h| &h.0))
    }

    /// Whether it holds changes whose dependencies have not arrived (automerge keeps them
    /// in memory until they do; they are in no save).
    pub fn waits_for_dependencies(&mut self) -> bool {
        !self.doc.get_missing_deps(&[]).is_empty()
    }

    /// Its heads.
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The whole document, compacted.
    pub fn save(&mut self) -> Vec<u8> {
        let bytes = self.doc.save();
        self.saved = self.doc.get_heads();
        bytes
    }

    /// What changed since the last save or incremental save, or since the load (empty when
    /// nothing did).
    pub fn save_incremental(&mut self) -> Vec<u8> {
        let heads = self.doc.get_heads();
        if heads == self.saved {
            return Vec::new();
        }
        let bytes = self.doc.save_after(&self.saved);
        self.saved = heads;
        bytes
    }

    /// The next sync message for the peer whose state is `state`, if it lacks anything we
    /// have or we lack anything it announced. `None` too if automerge failed on the state a
    /// peer's message left (see [`receive`](Self::receive)).
    pub fn generate(&mut self, state: &mut PeerState) -> Option<Vec<u8>> {
        // automerge (v2 messages) sends the whole document instead of the changes a peer
        // lacks when those are over a third of the document's changes. Ours hold few, large
        // changes (a backfill, then one per publish), so that rule sent a whole shard for a
        // one-file change: 48 ms of CPU per change at a million paths. Only a peer that has
        // nothing of the document gets it whole.
        if state.their_heads.as_ref().is_some_and(|h| !h.is_empty()) {
            if let Some(caps) = state.their_capabilities.as_mut() {
                caps.retain(|c| *c != sync::Capability::MessageV2);
            }
        }
        if Self::nothing_to_say(state, &self.doc.get_heads()) {
            return None;
        }
        let doc = &mut self.doc;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.sync().generate_sync_message(state).map(|m| m.encode())))
            .unwrap_or_else(|_| {
                *state = PeerState::new();
                None
            })
    }

    /// The answer to a message just received from the peer whose state is `state`, when
    /// there is something to say ([`super::fanout::worth_answering`]); `None` when the
    /// message only told this node what it already had.
    pub fn answer(&mut self, state: &mut PeerState) -> Option<Vec<u8>> {
        if !super::fanout::worth_answering(state, &self.doc.get_heads()) {
            return None;
        }
        self.generate(state)
    }

    /// True when automerge would answer `None` for this state, known without its work: it
    /// builds a Bloom filter of the changes since the shared heads before deciding, which a
    /// node pays for every peer each time any document changes. Our heads are the ones last
    /// sent, and either an answer is awaited or the peer has our heads and asked for nothing.
    /// (automerge 0.12's own early return, taken before its work; a reset or read-only state
    /// goes the long way.)
    fn nothing_to_say(state: &PeerState, heads: &[ChangeHash]) -> bool {
        if !state.have_responded || state.needs_reset || state.read_only || state.last_sent_heads != heads {
            return false;
        }
        state.in_flight || (state.their_heads.as_deref() == Some(heads) && state.their_need.as_ref().is_none_or(|n| n.is_empty()))
    }

    /// The first sync message that carries this document's changes to a peer that has
    /// nothing (what a new peer is sent unasked; tests and fuzzing build messages with it).
    pub fn message_to_empty_peer(&mut self) -> Option<Vec<u8>> {
        let (mut empty, mut ours, mut theirs) = (ReplicaDoc::new(b"empty-peer"), PeerState::new(), PeerState::new());
        for _ in 0..4 {
            let m = self.generate(&mut ours)?;
            if !empty.receive(&mut theirs, &m, |_| Ok(())).ok()?.is_empty() {
                return Some(m);
            }
            let reply = empty.generate(&mut theirs)?;
            self.receive(&mut ours, &reply, |_| Ok(())).ok()?;
        }
        None
    }

    /// Applies a sync message from the peer whose state is `state`; returns the entries it
    /// added (key, value), in no particular order. Before anything of it reaches the
    /// document, its changes are read apart ([`incoming_entries`]): every operation must set
    /// a new key of the root map to bytes (no overwrite, no delete, no nested object), a key
    /// already here only to the value it holds, and `check` must accept every entry — or
    /// the whole message is refused and nothing of it kept. Garbage is refused, not panicked
    /// on: a message is checked for the Bloom filter parameters automerge itself sends
    /// (others would make the next `generate` divide by zero or loop), and automerge runs
    /// under `catch_unwind` all the same.
    pub fn receive(
        &mut self,
        state: &mut PeerState,
        msg: &[u8],
        check: impl FnOnce(&[(String, Vec<u8>)]) -> Result<(), String>,
    ) -> Result<Vec<(String, Vec<u8>)>, DocError> {
        let checked = CheckedMessage::read(msg, check)?;
        self.receive_checked(state, checked)
    }

    /// [`ReplicaDoc::receive`] of a message already read and checked apart (on another
    /// thread, say): what is left is the check against this document's entries.
    pub fn receive_checked(&mut self, state: &mut PeerState, checked: CheckedMessage) -> Result<Vec<(String, Vec<u8>)>, DocError> {
        let CheckedMessage { msg, entries } = checked;
        for (key, value) in &entries {
            match self.get(key) {
                Some(held) if held == *value => {}
                None if !self.contains(key) => {}
                _ => return Err(DocError::Refused(format!("an entry overwrites key {key}, written once"))),
            }
        }
        let mut log = PatchLog::active();
        let doc = &mut self.doc;
        let received = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let result = doc.sync().receive_sync_message_log_patches(state, msg, &mut log);
            result.map(|_| doc.make_patches(&mut log))
        }));
        let patches = match received {
            Ok(r) => r.map_err(am)?,
            Err(_) => {
                *state = PeerState::new();
                return Err(DocError::Automerge("automerge failed on a sync message".into()));
            }
        };
        let mut added = Vec::new();
        for patch in patches {
            if patch.obj != ROOT {
                continue;
            }
            if let automerge::PatchAction::PutMap { key, value: (Value::Scalar(s), _), .. } = patch.action {
                if let ScalarValue::Bytes(b) = s.as_ref() {
                    added.push((key, b.clone()));
                }
            }
        }
        Ok(added)
    }
}

/// A peer's sync message read apart from any document: decoded, its Bloom filters sane, and
/// every entry its changes set (each key once) accepted by the caller's check. Reading and
/// checking cost the most (signatures), need no document, and so run off the store thread;
/// [`ReplicaDoc::receive_checked`] then does only what needs the document.
pub struct CheckedMessage {
    msg: sync::Message,
    entries: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for CheckedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckedMessage").field("entries", &self.entries.len()).finish_non_exhaustive()
    }
}

impl CheckedMessage {
    /// Reads `msg` and hands its entries to `check`. Every failure is
    /// [`DocError::Refused`]: garbage, a Bloom filter automerge would not send (it would make
    /// the next `generate` divide by zero or loop), an operation other than setting a new
    /// key of the root map to bytes, one key set to two values, or `check`'s refusal.
    pub fn read(msg: &[u8], check: impl FnOnce(&[(String, Vec<u8>)]) -> Result<(), String>) -> Result<Self, DocError> {
        let msg = sync::Message::decode(msg).map_err(|e| DocError::Refused(format!("not an automerge sync message: {e}")))?;
        if !msg.have.iter().all(|h| sane_bloom(&h.bloom.to_bytes())) {
            return Err(DocError::Refused("a sync message with a Bloom filter automerge would not send".into()));
        }
        let incoming = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| incoming_entries(&msg)))
            .map_err(|_| DocError::Refused("automerge failed reading the message's changes".into()))??;
        let mut seen: std::collections::HashMap<String, Vec<u8>> = std::collections::HashMap::with_capacity(incoming.len());
        let mut entries = Vec::with_capacity(incoming.len());
        for (key, value) in incoming {
            match seen.get(&key) {
                Some(held) if *held == value => {}
                Some(_) => return Err(DocError::Refused(format!("an entry overwrites key {key}, written once"))),
                None => {
                    seen.insert(key.clone(), value.clone());
                    entries.push((key, value));
                }
            }
        }
        check(&entries).map_err(DocError::Refused)?;
        Ok(CheckedMessage { msg, entries })
    }

    /// How many entries the message sets.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it sets none (a message of heads and wants only).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Every (key, value) the changes of a sync message set, read from the message alone (the
/// document is not touched): each operation must put bytes under a key of the root map
/// without replacing anything (an operation that names a predecessor overwrites), or the
/// message is refused (every error is [`DocError::Refused`]). Change chunks are decoded one by one; a whole document (what a peer
/// that has nothing is sent) is loaded apart and its changes read the same way.
pub fn incoming_entries(msg: &sync::Message) -> Result<Vec<(String, Vec<u8>)>, DocError> {
    let refused = |what: &str| DocError::Refused(what.to_string());
    let mut out = Vec::new();
    let mut ops = 0usize;
    let mut read_change = |change: &automerge::Change, out: &mut Vec<(String, Vec<u8>)>| -> Result<(), DocError> {
        let expanded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change.decode())).map_err(|_| refused("a change automerge cannot expand"))?;
        for op in expanded.operations {
            ops += 1;
            if ops > MESSAGE_ENTRIES_MAX {
                return Err(refused("a sync message setting more entries than a node sends at once"));
            }
            let (automerge::legacy::ObjectId::Root, automerge::legacy::Key::Map(key), automerge::legacy::OpType::Put(ScalarValue::Bytes(value))) = (&op.obj, &op.key, &op.action) else {
                return Err(refused("an operation other than setting an entry of the root map"));
            };
            if op.insert || !op.pred.is_empty() {
                return Err(refused("an operation that replaces an entry written once"));
            }
            out.push((key.to_string(), value.clone()));
        }
        Ok(())
    };
    for element in msg.changes.iter() {
        for (kind, chunk) in split_chunks(element).ok_or_else(|| refused("changes that are not automerge chunks"))? {
            match kind {
                CHUNK_DOCUMENT => {
                    let doc = automerge::Automerge::load(chunk).map_err(|e| DocError::Refused(format!("a document automerge refuses: {e}")))?;
                    for change in doc.get_changes(&[]) {
                        read_change(&change, &mut out)?;
                    }
                }
                CHUNK_CHANGE | CHUNK_COMPRESSED => {
                    let change = automerge::Change::try_from(chunk).map_err(|e| DocError::Refused(format!("a change automerge refuses: {e}")))?;
                    read_change(&change, &mut out)?;
                }
                _ => return Err(refused("a kind of chunk a sync message does not carry")),
            }
        }
    }
    Ok(out)
}

const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED: u8 = 2;

/// Splits bytes into automerge storage chunks (magic, checksum, type, LEB128 length, data):
/// (type, whole chunk). `None` if they are not a sequence of chunks.
fn split_chunks(mut bytes: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 9 || bytes[..4] != CHUNK_MAGIC {
            return None;
        }
        let kind = bytes[8];
        let (mut len, mut shift, mut at) = (0u64, 0u32, 9usize);
        loop {
            let b = *bytes.get(at)?;
            at += 1;
            len |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return None;
            }
        }
        let end = at.checked_add(usize::try_from(len).ok()?)?;
        if end > bytes.len() {
            return None;
        }
        out.push((kind, &bytes[..end]));
        bytes = &bytes[end..];
    }
    Some(out)
}

/// Whether encoded Bloom filter bytes are empty or carry automerge's own parameters: a LEB128
/// entry count, then 10 bits per entry and 7 probes.
fn sane_bloom(bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return true;
    }
    let Some(end) = bytes.iter().position(|b| b & 0x80 == 0) else { return false };
    end < 9 && bytes.get(end + 1) == Some(&10) && bytes.get(end + 2) == Some(&7)
}

fn am(e: automerge::AutomergeError) -> DocError {
    DocError::Automerge(e.to_string())
}

/// A peer's sync state as saved between sessions (only what stays true across them).
pub fn encode_state(state: &PeerState) -> Vec<u8> {
    state.encode()
}

/// The inverse of [`encode_state`]; a damaged saved state starts afresh.
pub fn decode_state(bytes: &[u8]) -> PeerState {
    sync::State::decode(bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the sync protocol between two documents until neither has anything to say;
    /// returns what each received.
    type Entries = Vec<(String, Vec<u8>)>;

    fn sync_pair(a: &mut ReplicaDoc, b: &mut ReplicaDoc) -> (Entries, Entries, usize) {
        let (mut sa, mut sb) = (PeerState::new(), PeerState::new());
        let (mut got_a, mut got_b, mut rounds) = (Vec::new(), Vec::new(), 0);
        loop {
            let mut quiet = true;
            if let Some(m) = a.generate(&mut sa) {
                got_b.extend(b.receive(&mut sb, &m, |_| Ok(())).unwrap());
                quiet = false;
            }
            if let Some(m) = b.generate(&mut sb) {
                got_a.extend(a.receive(&mut sa, &m, |_| Ok(())).unwrap());
                quiet = false;
            }
            rounds += 1;
            if quiet || rounds > 20 {
                return (got_a, got_b, rounds);
            }
        }
    }

    /// Two nodes that agreed on a document's heads, one of which has written more since,
    /// build the same genesis from those heads: the same change, the same bytes, and a sync
    /// between the two genesis documents has nothing to send but the later entry.
    #[test]
    fn a_genesis_from_agreed_heads_is_the_same_on_every_node() {
        let (mut a, mut b) = (ReplicaDoc::new(b"a"), ReplicaDoc::new(b"b"));
        for i in 0..50 {
            a.put(&format!("{i}@a"), &[i as u8; 40]).unwrap();
            b.put(&format!("{i}@b"), &[i as u8; 40]).unwrap();
        }
        sync_pair(&mut a, &mut b);
        let agreed = a.heads();
        assert_eq!(agreed, b.heads());
        b.put("later@b", b"late").unwrap();
        let (from_a, from_b) = (a.entries_at(&agreed).unwrap(), b.entries_at(&agreed).unwrap());
        assert_eq!(from_a.len(), 100);
        assert_eq!(from_a, from_b, "entries at the agreed heads");
        let mut ga = ReplicaDoc::genesis(b"epoch-1", &from_a, b"a2").unwrap();
        let mut gb = ReplicaDoc::genesis(b"epoch-1", &from_b, b"b2").unwrap();
        assert_eq!(ga.heads(), gb.heads());
        assert_eq!(ga.save(), gb.save());
        assert_eq!(ga.entries(), from_a);
        // What b wrote after the agreed heads goes into the new epoch as its own change.
        gb.put("later@b", b"late").unwrap();
        let (to_a, to_b, _) = sync_pair(&mut ga, &mut gb);
        assert_eq!(to_a, vec![("later@b".to_string(), b"late".to_vec())]);
        assert!(to_b.is_empty());
        // Heads the document does not hold read as nothing, not as an empty document.
        let mut empty = ReplicaDoc::new(b"c");
        assert!(empty.entries_at(&agreed).is_none());
    }

    /// The shortcut in `generate` answers "nothing" only where automerge itself would: three
    /// documents written and synced pairwise in a seeded order, one message in ten lost.
    #[test]
    fn the_shortcut_says_nothing_only_when_automerge_would_say_nothing() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut docs = [ReplicaDoc::new(b"a"), ReplicaDoc::new(b"b"), ReplicaDoc::new(b"c")];
        let mut states: Vec<Vec<PeerState>> = (0..3).map(|_| (0..3).map(|_| PeerState::new()).collect()).collect();
        let (mut shortcuts, mut sent) = (0, 0);
        for step in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (i, j) = ((x % 3) as usize, ((x >> 8) % 3) as usize);
            if i == j {
                if (x >> 20).is_multiple_of(4) {
                    docs[i].put(&format!("{step}@{i}"), &[1]).unwrap();
                }
                continue;
            }
            let heads = docs[i].doc.get_heads();
            if ReplicaDoc::nothing_to_say(&states[i][j], &heads) {
                shortcuts += 1;
                let mut probe = states[i][j].clone();
                assert!(docs[i].doc.sync().generate_sync_message(&mut probe).is_none(), "step {step}: automerge had something to say");
            }
            if let Some(m) = docs[i].generate(&mut states[i][j]) {
                sent += 1;
                if !(x >> 16).is_multiple_of(10) {
                    docs[j].receive(&mut states[j][i], &m, |_| Ok(())).unwrap();
                }
            }
        }
        assert!(shortcuts > 200 && sent > 200, "the schedule exercised both ways: {shortcuts} shortcuts, {sent} messages");
    }

    #[test]
    fn a_one_entry_change_sends_that_change_not_the_whole_document() {
        let (mut a, mut b) = (ReplicaDoc::new(b"node-a"), ReplicaDoc::new(b"node-b"));
        for i in 0..5000 {
            a.put(&format!("1@{i:010}"), &[7u8; 60]).unwrap();
        }
        let (mut sa, mut sb) = (PeerState::new(), PeerState::new());
        let mut exchange = |a: &mut ReplicaDoc, b: &mut ReplicaDoc| -> (usize, usize) {
            let (mut bytes, mut got) = (0, 0);
            for _ in 0..20 {
                let mut quiet = true;
                if let Some(m) = a.generate(&mut sa) {
                    bytes += m.len();
                    got += b.receive(&mut sb, &m, |_| Ok(())).unwrap().len();
                    quiet = false;
                }
                if let Some(m) = b.generate(&mut sb) {
                    bytes += m.len();
                    a.receive(&mut sa, &m, |_| Ok(())).unwrap();
                    quiet = false;
                }
                if quiet {
                    break;
                }
            }
            (bytes, got)
        };
        // The first sync carries everything (to a peer that has nothing, the whole document).
        let (first, got) = exchange(&mut a, &mut b);
        assert_eq!(got, 5000);
        // One more entry: its change, not the document again.
        a.put("2@0000000001", &[8u8; 60]).unwrap();
        let (second, got) = exchange(&mut a, &mut b);
        assert_eq!(got, 1);
        assert!(second < 2_000 && second * 20 < first, "one entry cost {second} bytes of sync (the first sync {first})");
    }

    #[test]
    fn two_documents_exchange_exactly_what_the_other_lacks() {
        let (mut a, mut b) = (ReplicaDoc::new(b"node-a"), ReplicaDoc::new(b"node-b"));
        a.put("1@a", b"one").unwrap();
        a.put("2@a", b"two").unwrap();
        b.put("1@b", b"uno").unwrap();
        assert!(!a.put("1@a", b"changed").unwrap(), "a key is written once");
        let (got_a, got_b, rounds) = sync_pair(&mut a, &mut b);
        assert!(rounds < 10, "converged in {rounds} rounds");
        assert_eq!(got_a, [("1@b".to_string(), b"uno".to_vec())]);
        let mut got_b = got_b;
        got_b.sort();
        assert_eq!(got_b, [("1@a".to_string(), b"one".to_vec()), ("2@a".to_string(), b"two".to_vec())]);
        assert_eq!(a.entries(), b.entries());
        assert_eq!(a.digest(), b.digest());
        // In step: nothing more to say, nothing received.
        let (got_a, got_b, _) = sync_pair(&mut a, &mut b);
        assert!(got_a.is_empty() && got_b.is_empty());
    }

    #[test]
    fn a_document_survives_save_and_incremental_saves() {
        let mut a = ReplicaDoc::new(b"node-a");
        a.put("k1", b"v1").unwrap();
        let full = a.save();
        a.put("k2", b"v2").unwrap();
        let inc = a.save_incremental();
        let mut back = ReplicaDoc::load(&full, &[&inc], b"node-a-2").unwrap();
        assert_eq!(back.entries(), a.entries());
        assert_eq!(back.digest(), a.digest());
        assert!(back.save_incremental().is_empty(), "nothing new since the load");
        back.put("k3", b"v3").unwrap();
        let small = back.save_incremental();
        assert!(!small.is_empty() && small.len() < full.len() + inc.len(), "an increment after a load holds only what is new");
        let again = ReplicaDoc::load(&full, &[&inc, &small], b"node-a-3").unwrap();
        assert_eq!(again.get("k3").unwrap(), b"v3");
        assert!(ReplicaDoc::load(b"not a document", &[], b"x").is_err());
    }

    /// A message that replaces or deletes an entry, or that the caller's check refuses, is
    /// refused whole: nothing of it reaches the document.
    #[test]
    fn a_message_breaking_write_once_is_refused_whole() {
        let (mut a, mut b) = (ReplicaDoc::new(b"node-a"), ReplicaDoc::new(b"node-b"));
        a.put("k", b"v1").unwrap();
        sync_pair(&mut a, &mut b);
        assert_eq!(b.get("k").unwrap(), b"v1");
        type Attack = fn(&mut AutoCommit);
        let attempts: [(&str, Attack); 3] = [
            ("overwrite", |d| d.put(ROOT, "k", ScalarValue::Bytes(b"v2".to_vec())).unwrap()),
            ("delete", |d| d.delete(ROOT, "k").unwrap()),
            ("nested object", |d| {
                d.put_object(ROOT, "obj", automerge::ObjType::Map).unwrap();
            }),
        ];
        for (what, attack) in attempts {
            let mut evil = ReplicaDoc::load(&a.save(), &[], b"evil").unwrap();
            evil.put("new", b"also sent").unwrap();
            attack(&mut evil.doc);
            let (mut se, mut sb) = (PeerState::new(), PeerState::new());
            let mut refused = false;
            for _ in 0..6 {
                let Some(m) = evil.generate(&mut se) else { break };
                match b.receive(&mut sb, &m, |_| Ok(())) {
                    Err(DocError::Refused(_)) => {
                        refused = true;
                        break;
                    }
                    Err(e) => panic!("{what}: {e}"),
                    Ok(_) => {}
                }
                if let Some(reply) = b.generate(&mut sb) {
                    evil.receive(&mut se, &reply, |_| Ok(())).unwrap();
                }
            }
            assert!(refused, "{what}: refused");
            assert_eq!(b.get("k").unwrap(), b"v1", "{what}: the entry is as written");
            assert!(!b.contains("new") && !b.contains("obj"), "{what}: nothing else of the message was applied");
        }
        // The caller's check refuses: nothing applied; it accepts: applied.
        a.put("k2", b"v").unwrap();
        let (mut sa, mut sb) = (PeerState::new(), PeerState::new());
        let mut seen_by_check = Vec::new();
        for _ in 0..6 {
            let Some(m) = a.generate(&mut sa) else { break };
            let r = b.receive(&mut sb, &m, |fresh| {
                seen_by_check.extend(fresh.iter().map(|(k, _)| k.clone()));
                if fresh.is_empty() { Ok(()) } else { Err("not today".into()) }
            });
            if r.is_err() {
                break;
            }
            if let Some(reply) = b.generate(&mut sb) {
                a.receive(&mut sa, &reply, |_| Ok(())).unwrap();
            }
        }
        assert_eq!(seen_by_check, ["k2"], "the check saw only what is new");
        assert!(!b.contains("k2"));
        let (_, got_b, _) = sync_pair(&mut a, &mut b);
        assert_eq!(got_b, [("k2".to_string(), b"v".to_vec())]);
    }

    #[test]
    fn garbage_messages_are_refused() {
        let mut a = ReplicaDoc::new(b"node-a");
        let mut s = PeerState::new();
        for bytes in [&b""[..], b"\x42garbage", &[0u8; 64]] {
            assert!(a.receive(&mut s, bytes, |_| Ok(())).is_err());
        }
        assert!(a.is_empty());
        assert_eq!(decode_state(b"damaged").shared_heads, PeerState::new().shared_heads);
    }
}
