//! The sync protocol between two nodes, on the ALPN [`SYNC_ALPN`]: one QUIC connection per
//! pair of nodes, one bi-directional stream, [`Frame`]s of a 4-byte length and a postcard body
//! (the same header as [`super::frame`], with its own limit).
//!
//! ```text
//! joiner                      inviter            member A                  member B
//!   Join{bucket, secret} ───►                      Hello{buckets} ────────►
//!   ◄─── Joined{name, root}  (or Refused)          ◄──────── Welcome{buckets} (or Refused)
//!   …then as a member                              Summary{bucket, digests} ◄──►
//!                                                  Sync{bucket, doc, msg}   ◄──► until quiet
//! ```
//!
//! Each bucket's history is [`DOCS`] automerge documents (the shards and the bucket's own
//! document of branches and members). A summary carries a digest of each document's heads,
//! so two nodes in step exchange one small frame per bucket and nothing else; for each
//! document whose digests differ they run automerge's sync protocol, which sends only the
//! changes the other lacks. A node announces new local changes to a connected peer by
//! sending a sync message for the document they touched.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::frame::FRAME_HEADER_BYTES;
use super::limits::{SESSION_BUCKETS_MAX, SYNC_FRAME_BYTES_MAX};
use super::ids::Uid;
use super::compaction::EpochBase;
use super::replica::SHARDS;
use super::ticket::{SECRET_BYTES, TICKET_ADDRS_MAX};

/// The protocol's name on the wire; the version is part of it. Version 2: every entry of a
/// document is signed by its writer (`proto::signed`), and version 1's unsigned entries are
/// refused, so the two never sync. Version 3: the handshake carries each side's wall clock,
/// and gossip announcements are sealed by their sender. Version 4: a bucket's shards have
/// epochs (`super::compaction`): summaries and shard messages say which, and an `Epoch`
/// frame announces one.
pub const SYNC_ALPN: &[u8] = b"/alknet-fs/sync/4";

/// Earlier versions of the protocol: a node answers them only to say the peer must upgrade
/// (never a silent split), and offers them when dialing to learn that a peer is older.
pub const OLDER_SYNC_ALPNS: &[&[u8]] = &[b"/alknet-fs/sync/3", b"/alknet-fs/sync/2", b"/alknet-fs/sync/1"];

/// What a node of an older protocol is told, and what is logged of it.
pub const OLDER_PROTOCOL: &str = "the peer runs an older protocol of alknet-fs: upgrade it (this node speaks /alknet-fs/sync/4)";

/// The document of a bucket that holds its branches and members (the shards are `0..SHARDS`).
pub const META_DOC: u16 = SHARDS;

/// Documents per bucket: the shards and the bucket's own.
pub const DOCS: u16 = SHARDS + 1;

/// One frame of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// A joiner's first frame: the ticket's bucket and secret, and where the joiner listens.
    Join {
        /// The bucket the ticket names.
        bucket: Uid,
        /// The ticket's secret.
        secret: [u8; SECRET_BYTES],
        /// The joiner's addresses, for the other members.
        addrs: Vec<SocketAddr>,
    },
    /// The inviter's answer to a good `Join`: the joiner is a member from now on; the bucket's
    /// name there and its root branch (encoded [`super::replica::BranchRecord`]).
    Joined {
        /// The bucket.
        bucket: Uid,
        /// Its name at the inviter.
        name: String,
        /// Its root branch.
        root: Vec<u8>,
    },
    /// A member's first frame: the buckets it wants to sync, and its addresses.
    Hello {
        /// Buckets.
        buckets: Vec<Uid>,
        /// Where it listens.
        addrs: Vec<SocketAddr>,
        /// Which run of the node this is (random per start): a session from a new run
        /// replaces one from an earlier run at once (the peer restarted; the old connection
        /// may not look dead for a while), where two sessions of one run were dialed at once.
        instance: u64,
        /// The sender's wall clock (ms since the epoch): each side learns how far apart the
        /// two clocks are, and says so when it is beyond the clock bound.
        clock_ms: i64,
    },
    /// The answer to `Hello`: the buckets of which the caller is a member here (the others
    /// are not mentioned: a non-member learns nothing about them).
    Welcome {
        /// Buckets accepted.
        buckets: Vec<Uid>,
        /// Which run of the node this is (see `Hello`).
        instance: u64,
        /// The sender's wall clock (see `Hello`).
        clock_ms: i64,
    },
    /// Why the session or join is refused; the connection closes after it.
    Refused {
        /// For the user.
        reason: String,
    },
    /// A digest of each document's heads in one bucket.
    Summary {
        /// The bucket.
        bucket: Uid,
        /// The epoch of its shards here.
        epoch: u32,
        /// One digest per document, index = document.
        digests: Vec<u64>,
    },
    /// An automerge sync message for one document.
    Sync {
        /// The bucket.
        bucket: Uid,
        /// The document (shard, or [`META_DOC`]).
        doc: u16,
        /// The epoch of the shards the message is of (a shard's message of another epoch
        /// than the receiver's is not applied; ignored for [`META_DOC`]).
        epoch: u32,
        /// The encoded automerge sync message.
        msg: Vec<u8>,
    },
    /// The sender's shards of `bucket` are at epoch `base.epoch`, derived from `base`: sent
    /// to a peer whose summary shows an earlier epoch.
    Epoch {
        /// The bucket.
        bucket: Uid,
        /// The epoch and what it was derived from.
        base: EpochBase,
    },
}

/// Why bytes from a peer are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// Over [`SYNC_FRAME_BYTES_MAX`].
    #[error("frame of {0} bytes is over the limit of {SYNC_FRAME_BYTES_MAX}")]
    TooLarge(usize),
    /// Not a frame of this protocol, or a field out of bounds.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl Frame {
    /// The frame with its length header.
    pub fn encode(&self) -> Vec<u8> {
        let body = postcard::to_allocvec(self).expect("encoding to memory cannot fail");
        let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// The body length a header announces, refused past the limit before anything is read.
    pub fn body_len(header: [u8; FRAME_HEADER_BYTES]) -> Result<usize, SyncError> {
        let len = u32::from_be_bytes(header) as usize;
        if len > SYNC_FRAME_BYTES_MAX {
            return Err(SyncError::TooLarge(len));
        }
        Ok(len)
    }

    /// Decodes and checks a body.
    pub fn decode(body: &[u8]) -> Result<Frame, SyncError> {
        if body.len() > SYNC_FRAME_BYTES_MAX {
            return Err(SyncError::TooLarge(body.len()));
        }
        let frame: Frame = postcard::from_bytes(body).map_err(|e| SyncError::Malformed(e.to_string()))?;
        let ok = match &frame {
            Frame::Join { addrs, .. } | Frame::Hello { addrs, .. } if addrs.len() > TICKET_ADDRS_MAX => false,
            Frame::Hello { buckets, .. } | Frame::Welcome { buckets, .. } => buckets.len() <= SESSION_BUCKETS_MAX,
            Frame::Summary { digests, .. } => digests.len() == DOCS as usize,
            Frame::Epoch { base, .. } => base.within_bounds(),
            Frame::Sync { doc, .. } => *doc < DOCS,
            Frame::Refused { reason } => reason.len() <= 4096,
            Frame::Joined { name, root, .. } => name.len() <= 256 && root.len() <= 4096,
            _ => true,
        };
        if !ok {
            return Err(SyncError::Malformed("a field is out of bounds".into()));
        }
        Ok(frame)
    }
}

/// What a node announces on its bucket's gossip topic when documents changed: who, which
/// documents, their new digests. Small (well under gossip's 4 KiB cap: at most [`DOCS`]
/// pairs), and best-effort: a peer that misses it catches up at the next summary exchange.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// Makes each announcement distinct (gossip drops repeated bytes for 90 s).
    pub nonce: u64,
    /// The node whose documents changed.
    pub node: super::ids::NodeId,
    /// (document, digest of its new heads).
    pub docs: Vec<(u16, u64)>,
}

/// The key announcements are signed under: no document entry has it (every document key
/// names its writer), so neither can pass for the other.
pub const ANNOUNCE_KEY: &str = "announce";

impl Announcement {
    /// Sealed by its sender for gossip on `bucket`'s topic (see [`super::signed`]).
    pub fn seal(&self, bucket: &Uid, signer: &super::signed::EntrySigner) -> Vec<u8> {
        signer.seal(bucket, ANNOUNCE_KEY, &self.encode())
    }

    /// An announcement from gossip on `bucket`'s topic: signed, for this bucket, by the node
    /// it names. (Whether that node is a member is the receiver's to check.)
    pub fn open(bucket: &Uid, bytes: &[u8]) -> Result<Self, SyncError> {
        let sealed = super::signed::open(bytes).map_err(|e| SyncError::Malformed(e.to_string()))?;
        super::signed::verify(bucket, &[(ANNOUNCE_KEY, sealed)]).map_err(|_| SyncError::Malformed("an announcement whose signature does not hold".into()))?;
        let a = Self::decode(sealed.body)?;
        if a.node != sealed.signer {
            return Err(SyncError::Malformed("an announcement signed by another node than the one it names".into()));
        }
        Ok(a)
    }

    /// Encodes for gossip.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encoding to memory cannot fail")
    }

    /// Decodes and checks an announcement from the topic.
    pub fn decode(bytes: &[u8]) -> Result<Self, SyncError> {
        let a: Announcement = postcard::from_bytes(bytes).map_err(|e| SyncError::Malformed(e.to_string()))?;
        if a.docs.len() > DOCS as usize || a.docs.iter().any(|(d, _)| *d >= DOCS) {
            return Err(SyncError::Malformed("announcement out of bounds".into()));
        }
        Ok(a)
    }
}

/// The gossip topic of a bucket: a hash of a fixed label and the bucket's id (FNV-1a, four
/// lanes), the same on every node. Knowing it admits no one: the topic's connections are
/// accepted from members only.
pub fn topic_of(bucket: &Uid) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (lane, chunk) in out.chunks_mut(8).enumerate() {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ lane as u64;
        for b in b"alknet-fs/bucket/1/".iter().chain(bucket.0.iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        chunk.copy_from_slice(&h.to_be_bytes());
    }
    out
}

/// The documents whose digests differ between two summaries of one bucket: the ones to sync,
/// the bucket's own document first: it says who may write and which branches exist, and a
/// version whose writer or branch a node does not know yet waits (a joiner that got a
/// million versions before its inviter's admission would hold them all back, then apply
/// them twice).
pub fn differing(ours: &[u64], theirs: &[u64]) -> Vec<u16> {
    std::iter::once(META_DOC).chain(0..META_DOC).filter(|d| ours.get(*d as usize) != theirs.get(*d as usize)).collect()
}

/// A digest of a document's heads (sorted hashes of its latest changes): equal digests mean
/// equal documents. FNV-1a over the concatenated heads; empty for a document with no changes.
pub fn heads_digest<'a>(heads: impl IntoIterator<Item = &'a [u8; 32]>) -> u64 {
    let mut sorted: Vec<&[u8; 32]> = heads.into_iter().collect();
    sorted.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for head in sorted {
        for b in head {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// When to try a peer again after a failed or lost session: 1 s doubling to 60 s, so a peer
/// that is down costs a dial a minute, and one back up is found within a minute.
pub fn redial_after_ms(failures: u32) -> u64 {
    1_000u64.saturating_mul(1 << failures.min(6)).min(60_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::limits::GOSSIP_MESSAGE_BYTES_MAX;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_and_bounds_hold() {
        let frames = [
            Frame::Hello { buckets: vec![Uid([1; 16])], addrs: vec!["127.0.0.1:9".parse().unwrap()], instance: 7, clock_ms: 1_700_000_000_000 },
            Frame::Summary { bucket: Uid([1; 16]), epoch: 0, digests: vec![7; DOCS as usize] },
            Frame::Sync { bucket: Uid([1; 16]), doc: META_DOC, epoch: 0, msg: vec![1, 2, 3] },
            Frame::Refused { reason: "no".into() },
        ];
        for f in frames {
            let bytes = f.encode();
            let len = Frame::body_len(bytes[..4].try_into().unwrap()).unwrap();
            assert_eq!(Frame::decode(&bytes[4..4 + len]).unwrap(), f);
        }
        assert!(Frame::body_len(((SYNC_FRAME_BYTES_MAX + 1) as u32).to_be_bytes()).is_err());
        let bad_doc = Frame::Sync { bucket: Uid([1; 16]), doc: DOCS, epoch: 0, msg: vec![] }.encode();
        assert!(Frame::decode(&bad_doc[4..]).is_err());
        let short = Frame::Summary { bucket: Uid([1; 16]), epoch: 0, digests: vec![7; 3] }.encode();
        assert!(Frame::decode(&short[4..]).is_err());
    }

    proptest! {
        #[test]
        fn garbage_is_refused_not_panicked_on(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(&bytes);
        }
    }

    #[test]
    fn announcements_fit_gossip_and_garbage_is_refused() {
        let a = Announcement { nonce: 1, node: super::super::ids::NodeId([3; 32]), docs: (0..DOCS).map(|d| (d, u64::MAX)).collect() };
        let bytes = a.encode();
        assert_eq!(Announcement::decode(&bytes).unwrap(), a);
        // Sealed: it fits gossip's limit, opens on its bucket only, and only for its signer.
        let signer = crate::proto::signed::EntrySigner::new(&[4; 32]);
        let a = Announcement { node: signer.id(), ..a };
        let sealed = a.seal(&Uid([1; 16]), &signer);
        assert!(sealed.len() + 128 < GOSSIP_MESSAGE_BYTES_MAX, "a full announcement is {} bytes", sealed.len());
        assert_eq!(Announcement::open(&Uid([1; 16]), &sealed).unwrap(), a);
        assert!(Announcement::open(&Uid([2; 16]), &sealed).is_err(), "another bucket's");
        let other = crate::proto::signed::EntrySigner::new(&[5; 32]);
        assert!(Announcement::open(&Uid([1; 16]), &a.seal(&Uid([1; 16]), &other)).is_err(), "signed by another node than it names");
        assert!(Announcement::open(&Uid([1; 16]), &a.encode()).is_err(), "unsigned");
        let a = Announcement { node: super::super::ids::NodeId([3; 32]), ..a };
        let bad = Announcement { docs: vec![(DOCS, 0)], ..a };
        assert!(Announcement::decode(&bad.encode()).is_err());
        assert_ne!(topic_of(&Uid([1; 16])), topic_of(&Uid([2; 16])));
    }

    #[test]
    fn digests_and_differences() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(heads_digest([&a, &b]), heads_digest([&b, &a]), "order of heads does not matter");
        assert_ne!(heads_digest([&a]), heads_digest([&b]));
        let ours = vec![1; DOCS as usize];
        let mut theirs = ours.clone();
        theirs[3] = 9;
        theirs[META_DOC as usize] = 9;
        assert_eq!(differing(&ours, &theirs), [META_DOC, 3]);
        assert_eq!(redial_after_ms(0), 1_000);
        assert_eq!(redial_after_ms(30), 60_000);
    }
}
