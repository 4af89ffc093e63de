//! Who is sent what, and when: how a change spreads through a mesh. The node
//! (`node::mesh`) and the simulations follow these rules, so what the simulator counts holds
//! for real nodes.
//!
//! The cost to keep down is frames: before these rules every receiver of a change forwarded
//! it to every other peer and every frame was answered, up to 2(N−1)² frames per write in an
//! N-node mesh, most of them bringing nothing. Now a write costs about N−1 frames:
//!
//! - **A writer pushes its own changes** at once to every peer it has a session with (one
//!   frame per peer and document; changes published together travel together).
//! - **A receiver does not forward.** Every member dials every member, so the writer reaches
//!   each peer itself. A member the writer cannot reach (a partition, a one-way link, a NAT)
//!   hears of the change on the bucket's gossip topic (which relays) and asks one of its
//!   peers with a summary; anything lost beyond that is found by anti-entropy.
//! - **A receiver answers only when there is something to say** ([`worth_answering`]): it
//!   lacks something the sender has, has something the sender lacks, or was asked. A plain
//!   "got it" is sent only once the sender's view of what the two share has fallen
//!   [`ACK_AFTER_CHANGES`] changes behind, which keeps the sender's messages (they carry a
//!   Bloom filter of the changes since that view) and its work small.
//! - **Anti-entropy**: the node that dialed a session sends its summaries (a digest per
//!   document) every [`ANTI_ENTROPY_MS`]; the other side answers only the documents that
//!   differ. A session starts with summaries from both sides.
//!
//! A frame "brings something" ([`FrameCounts::useful`]) when it adds entries to a document
//! here, or makes this node send something the peer lacks or asked for; one that does
//! neither brought nothing.

use automerge::sync::{BloomFilter, Have};
use automerge::ChangeHash;

use super::doc::PeerState;

/// How often the node that dialed a session sends its summaries again, covering what was
/// lost (ms).
pub const ANTI_ENTROPY_MS: u64 = 10_000;

/// How far the sender's view of what two nodes share may fall behind (in changes) before a
/// receiver that has nothing else to say answers anyway.
pub const ACK_AFTER_CHANGES: u64 = 32;

/// Whether a node that has just applied a peer's sync message (`state` is its sync state
/// with that peer after the message, `our_heads` its document's heads) has something to
/// answer: the two documents differ (one lacks what the other has), the peer asked for
/// changes or a reset is due, or the peer's view of what the two share is
/// [`ACK_AFTER_CHANGES`] behind. `false` when the message only told it what it already had.
pub fn worth_answering(state: &PeerState, our_heads: &[ChangeHash]) -> bool {
    let Some(their_heads) = state.their_heads.as_deref() else { return true };
    if their_heads != our_heads || state.needs_reset {
        return true;
    }
    if state.their_need.as_ref().is_some_and(|n| !n.is_empty()) {
        return true;
    }
    let behind: u64 = state.their_have.iter().flatten().map(|h| bloom_entries(&h.bloom)).sum();
    behind >= ACK_AFTER_CHANGES
}

/// Sets `state` to what a summary just showed: the peer holds exactly `heads` of the
/// document, as this node does. Its next message then carries a new change at once (a state
/// that knows nothing of the peer opens with an exchange of heads and Bloom filters first:
/// three frames for a push instead of one).
pub fn in_step(state: &mut PeerState, heads: &[ChangeHash]) {
    state.shared_heads = heads.to_vec();
    state.last_sent_heads = heads.to_vec();
    state.their_heads = Some(heads.to_vec());
    state.their_need = Some(Vec::new());
    state.their_have = Some(vec![Have { last_sync: heads.to_vec(), bloom: BloomFilter::default() }]);
    state.sent_hashes.clear();
    state.in_flight = false;
    state.have_responded = true;
}

/// Makes the next message to the peer speak even if this node's heads did not change since
/// its last one: a summary showed the two documents differ. (automerge says nothing while
/// its last message awaits an answer; an answer that would say nothing is not sent, so
/// without this a node that received a change the peer lacks from a third node would wait
/// for the peer, and the peer for it.)
pub fn speak_again(state: &mut PeerState) {
    state.last_sent_heads.clear();
    state.in_flight = false;
}

/// Heads as stored beside a document's digest (32 bytes each).
pub fn encode_heads(heads: &[ChangeHash]) -> Vec<u8> {
    heads.iter().flat_map(|h| h.0).collect()
}

/// The inverse of [`encode_heads`]; `None` for bytes that are not whole hashes.
pub fn decode_heads(bytes: &[u8]) -> Option<Vec<ChangeHash>> {
    if !bytes.len().is_multiple_of(32) {
        return None;
    }
    Some(bytes.chunks_exact(32).map(|c| ChangeHash(c.try_into().expect("32 bytes"))).collect())
}

/// How many changes a Bloom filter holds (its encoding starts with that count; an empty
/// filter encodes as nothing).
fn bloom_entries(bloom: &BloomFilter) -> u64 {
    let bytes = bloom.to_bytes();
    let (mut n, mut shift) = (0u64, 0u32);
    for b in bytes.iter().take(10) {
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return n;
        }
        shift += 7;
    }
    n
}

/// Frames of sync sessions, counted since the node started (`alkfs status --json`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrameCounts {
    /// Frames sent to peers (summaries and sync messages).
    pub sent: u64,
    /// Frames received from peers.
    pub received: u64,
    /// Received frames that brought something (see the module's doc).
    pub useful: u64,
}

impl FrameCounts {
    /// The share of received frames that brought nothing (0 when none arrived).
    pub fn useless_share(&self) -> f64 {
        if self.received == 0 {
            0.0
        } else {
            (self.received - self.useful.min(self.received)) as f64 / self.received as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::doc::ReplicaDoc;

    /// Two documents in step, with their states (a's of b, b's of a).
    fn in_step() -> (ReplicaDoc, ReplicaDoc, PeerState, PeerState) {
        let (mut a, mut b) = (ReplicaDoc::new(b"node-a"), ReplicaDoc::new(b"node-b"));
        let (mut sa, mut sb) = (PeerState::new(), PeerState::new());
        a.put("0@a", b"x").unwrap();
        for _ in 0..10 {
            let m1 = a.generate(&mut sa);
            if let Some(m) = &m1 {
                b.receive(&mut sb, m, |_| Ok(())).unwrap();
            }
            let m2 = b.generate(&mut sb);
            if let Some(m) = &m2 {
                a.receive(&mut sa, m, |_| Ok(())).unwrap();
            }
            if m1.is_none() && m2.is_none() {
                break;
            }
        }
        assert_eq!(a.digest(), b.digest());
        (a, b, sa, sb)
    }

    #[test]
    fn a_push_of_what_the_receiver_lacked_is_not_answered() {
        let (mut a, mut b, mut sa, mut sb) = in_step();
        a.put("1@a", b"y").unwrap();
        let push = a.generate(&mut sa).expect("a pushes its change");
        assert_eq!(b.receive(&mut sb, &push, |_| Ok(())).unwrap().len(), 1);
        assert!(b.answer(&mut sb).is_none(), "b had nothing to say: it only got what it lacked");
        // And a's next change still goes, alone.
        a.put("2@a", b"z").unwrap();
        let next = a.generate(&mut sa).expect("a's next change is pushed");
        let got = b.receive(&mut sb, &next, |_| Ok(())).unwrap();
        assert_eq!(got.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["2@a"]);
    }

    #[test]
    fn crossing_pushes_are_answered_until_both_are_in_step() {
        let (mut a, mut b, mut sa, mut sb) = in_step();
        a.put("1@a", b"y").unwrap();
        b.put("1@b", b"w").unwrap();
        let (pa, pb) = (a.generate(&mut sa).unwrap(), b.generate(&mut sb).unwrap());
        b.receive(&mut sb, &pa, |_| Ok(())).unwrap();
        a.receive(&mut sa, &pb, |_| Ok(())).unwrap();
        // Each now holds both changes, and knows the other held only its own: they say so.
        let (ra, rb) = (a.answer(&mut sa).expect("a answers"), b.answer(&mut sb).expect("b answers"));
        b.receive(&mut sb, &ra, |_| Ok(())).unwrap();
        a.receive(&mut sa, &rb, |_| Ok(())).unwrap();
        assert!(a.answer(&mut sa).is_none() && b.answer(&mut sb).is_none(), "in step: nothing more to say");
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn a_receiver_that_lacks_what_the_sender_has_asks_for_it() {
        use crate::proto::doc::{decode_state, encode_state};
        let (mut a, mut b, mut sa, sb) = in_step();
        // a's push is lost with its session; a new session starts from the saved states.
        a.put("1@a", b"y").unwrap();
        drop(a.generate(&mut sa).unwrap());
        let (mut sa, mut sb) = (decode_state(&encode_state(&sa)), decode_state(&encode_state(&sb)));
        a.put("2@a", b"z").unwrap();
        let mut msg = a.generate(&mut sa);
        let mut rounds = 0;
        // Each side answers only while it has something to say; they end in step.
        while let Some(m) = msg.take() {
            rounds += 1;
            assert!(rounds < 8, "no end to the exchange");
            let (to, state) = if rounds % 2 == 1 { (&mut b, &mut sb) } else { (&mut a, &mut sa) };
            to.receive(state, &m, |_| Ok(())).unwrap();
            msg = to.answer(state);
        }
        assert!(rounds >= 3, "b asked for what it lacked and got it ({rounds} messages)");
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn a_one_way_stream_is_acknowledged_every_ack_after_changes() {
        let (mut a, mut b, mut sa, mut sb) = in_step();
        let (mut acks, mut largest) = (0, 0);
        let n = 10 * ACK_AFTER_CHANGES;
        for i in 0..n {
            a.put(&format!("{}@a", i + 1), b"v").unwrap();
            let push = a.generate(&mut sa).unwrap();
            largest = largest.max(push.len());
            b.receive(&mut sb, &push, |_| Ok(())).unwrap();
            if let Some(ack) = b.answer(&mut sb) {
                acks += 1;
                a.receive(&mut sa, &ack, |_| Ok(())).unwrap();
                assert!(a.answer(&mut sa).is_none(), "an acknowledgement is not answered");
            }
        }
        assert!(acks >= n / ACK_AFTER_CHANGES - 1 && acks <= n / ACK_AFTER_CHANGES + 1, "{acks} acknowledgements for {n} changes");
        // What a push carries stays small: its Bloom filter covers at most ACK_AFTER_CHANGES.
        assert!(largest < 1024, "a push of one entry grew to {largest} bytes");
    }
}
