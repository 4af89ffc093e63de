//! One replicated document: an automerge document whose root map holds scalar byte values
//! under keys each written once, by one node (see [`super::replica`]). It carries a set; what
//! the entries mean is for the caller. Pure computation (automerge does no I/O), so the node
//! and the simulations run the same code.

use automerge::sync::{self, SyncDoc};
use automerge::{ActorId, AutoCommit, ChangeHash, PatchLog, ReadDoc, ScalarValue, Value, ROOT};
use automerge::transaction::Transactable;

use super::sync::heads_digest;

/// Why a document or a message from a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    /// Bytes that are not an automerge document or sync message, or a change automerge
    /// refuses (bad dependencies, a duplicate sequence number).
    #[error("automerge refused the data: {0}")]
    Automerge(String),
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

    /// Sets `key` to `value`, replacing what it held: for entries one node owns and updates
    /// (its addresses), so no two nodes ever write the key concurrently.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<bool, DocError> {
        if self.get(key).as_deref() == Some(value) {
            return Ok(false);
        }
        self.doc.put(ROOT, key, ScalarValue::Bytes(value.to_vec())).map_err(am)?;
        Ok(true)
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

    /// Applies a sync message from the peer whose state is `state`; returns the entries it
    /// added (key, value), in no particular order. Garbage is refused, not panicked on: a
    /// message is checked for the Bloom filter parameters automerge itself sends (others
    /// would make the next `generate` divide by zero or loop), and automerge runs under
    /// `catch_unwind` all the same.
    pub fn receive(&mut self, state: &mut PeerState, msg: &[u8]) -> Result<Vec<(String, Vec<u8>)>, DocError> {
        let msg = sync::Message::decode(msg).map_err(|e| DocError::Automerge(e.to_string()))?;
        if !msg.have.iter().all(|h| sane_bloom(&h.bloom.to_bytes())) {
            return Err(DocError::Automerge("a sync message with a Bloom filter automerge would not send".into()));
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
                got_b.extend(b.receive(&mut sb, &m).unwrap());
                quiet = false;
            }
            if let Some(m) = b.generate(&mut sb) {
                got_a.extend(a.receive(&mut sa, &m).unwrap());
                quiet = false;
            }
            rounds += 1;
            if quiet || rounds > 20 {
                return (got_a, got_b, rounds);
            }
        }
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
                    docs[j].receive(&mut states[j][i], &m).unwrap();
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
                    got += b.receive(&mut sb, &m).unwrap().len();
                    quiet = false;
                }
                if let Some(m) = b.generate(&mut sb) {
                    bytes += m.len();
                    a.receive(&mut sa, &m).unwrap();
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

    #[test]
    fn garbage_messages_are_refused() {
        let mut a = ReplicaDoc::new(b"node-a");
        let mut s = PeerState::new();
        for bytes in [&b""[..], b"\x42garbage", &[0u8; 64]] {
            assert!(a.receive(&mut s, bytes).is_err());
        }
        assert!(a.is_empty());
        assert_eq!(decode_state(b"damaged").shared_heads, PeerState::new().shared_heads);
    }
}
