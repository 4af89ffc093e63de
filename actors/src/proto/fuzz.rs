//! Property tests over raw input for the decoders that read what comes from outside (a
//! peer, a ticket pasted by a user, a saved file): whatever the bytes, they return an error
//! or a value, never panic, and what they accept encodes back to what decodes the same.
//! Both random bytes and valid encodings with bytes flipped (which reach deeper than noise).
//! The number of cases is proptest's (`PROPTEST_CASES` raises it).

use proptest::prelude::*;

use super::doc::{decode_state, CheckedMessage, PeerState, ReplicaDoc};
use super::ids::{NodeId, OrderKey, Uid, VersionRef};
use super::replica::{self, BranchRecord, MetaEntry};
use super::sync::{Announcement, Frame, DOCS};
use super::ticket::{parse_duration_ms, Ticket};

/// `valid` with the bytes at `flips` (positions taken modulo its length) xor-ed with their
/// masks: an encoding a hostile or damaged peer could send.
fn mutated(valid: &[u8], flips: &[(usize, u8)]) -> Vec<u8> {
    let mut out = valid.to_vec();
    if out.is_empty() {
        return out;
    }
    for (at, mask) in flips {
        let i = at % out.len();
        out[i] ^= mask.max(&1);
    }
    out
}

fn a_ticket() -> Ticket {
    Ticket { node: NodeId([7; 32]), addrs: vec!["127.0.0.1:4919".parse().unwrap()], relay: None, bucket: Uid([3; 16]), secret: [9; 16] }
}

/// A document with a few entries, saved.
fn a_saved_doc() -> Vec<u8> {
    let mut doc = ReplicaDoc::new(b"fuzz-actor");
    for i in 0..4 {
        doc.put(&format!("{i}@{}", NodeId([1; 32]).to_hex()), format!("value {i}").as_bytes()).unwrap();
    }
    doc.save()
}

/// A sync message carrying a few signed entries, as a peer that has nothing is sent them.
fn a_signed_message(bucket: &Uid) -> Vec<u8> {
    let signer = super::signed::EntrySigner::new(&[6; 32]);
    let mut doc = ReplicaDoc::new(b"fuzz-sender");
    for i in 0..3 {
        let key = format!("{i}@{}", signer.id().to_hex());
        doc.put(&key, &signer.seal(bucket, &key, format!("value {i}").as_bytes())).unwrap();
    }
    doc.message_to_empty_peer().expect("a document's changes go within a few messages")
}

proptest! {
    #[test]
    fn tickets_never_panic_and_round_trip(text in "\\PC{0,300}", flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        if let Ok(t) = Ticket::decode(&text) {
            prop_assert_eq!(Ticket::decode(&t.encode()).unwrap(), t);
        }
        let good = a_ticket().encode();
        let bad = String::from_utf8_lossy(&mutated(good.as_bytes(), &flips)).into_owned();
        if let Ok(t) = Ticket::decode(&bad) {
            prop_assert_eq!(Ticket::decode(&t.encode()).unwrap(), t);
        }
    }

    #[test]
    fn ids_durations_and_paths_never_panic(text in "\\PC{0,120}", bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let _ = NodeId::from_hex(&text);
        let _ = super::ids::VersionId::from_bytes(&bytes);
        let _ = Uid::from_bytes(&bytes);
        let _ = Uid::from_hex(&text);
        if let Some(k) = OrderKey::from_bytes(&bytes) {
            prop_assert_eq!(OrderKey::new(k.stamp(), &k.version()), k);
        }
        let _ = VersionRef::parse(&text);
        let _ = parse_duration_ms(&text);
        let _ = replica::Origin::parse(&text);
        let _ = super::entry::ContentHash::from_hex(&text);
        if let Ok(p) = super::path::TreePath::parse(&text) {
            prop_assert_eq!(super::path::TreePath::parse(p.as_str()).unwrap(), p);
        }
    }

    #[test]
    fn sync_frames_and_announcements_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        if let Ok(f) = Frame::decode(&bytes) {
            let again = f.encode();
            prop_assert_eq!(Frame::decode(&again[4..]).unwrap(), f);
        }
        let good = Frame::Sync { bucket: Uid([1; 16]), doc: DOCS - 1, epoch: 0, msg: vec![1, 2, 3] }.encode();
        let _ = Frame::decode(&mutated(&good[4..], &flips));
        let _ = Announcement::decode(&bytes);
        let _ = Announcement::open(&crate::proto::ids::Uid([1; 16]), &bytes);
        let header: [u8; 4] = [bytes.first().copied().unwrap_or(0), bytes.get(1).copied().unwrap_or(0), bytes.get(2).copied().unwrap_or(0), bytes.get(3).copied().unwrap_or(0)];
        let _ = Frame::body_len(header);
    }

    #[test]
    fn replicated_entries_and_records_never_panic(key in "\\PC{0,100}", bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = replica::decode(&bytes);
        let _ = BranchRecord::decode(&bytes);
        let _ = MetaEntry::decode(&key, &bytes);
        let mut decoded = Vec::new();
        for known in ["member/", "removed/", "role/", "policy/", "branch/", "addr/", "deleted/"] {
            decoded.extend(MetaEntry::decode(&format!("{known}{key}"), &bytes));
        }
        // What decodes, membership reads without a panic.
        let _ = super::membership::Membership::from_entries(Uid([1; 16]), &decoded);
    }

    /// A peer's sync message is read, and each entry's signature checked, before anything of
    /// it reaches a document: a damaged one is refused, never a panic, and what passes the
    /// read applies to a document without one either.
    #[test]
    fn sync_messages_and_signed_entries_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let bucket = Uid([2; 16]);
        let check = |entries: &[(String, Vec<u8>)]| -> Result<(), String> {
            let mut sealed = Vec::new();
            for (k, v) in entries {
                sealed.push((k.as_str(), super::signed::open(v).map_err(|e| e.to_string())?));
            }
            super::signed::verify(&bucket, &sealed).map_err(|i| format!("entry {i}"))
        };
        let _ = super::signed::open(&bytes);
        let _ = CheckedMessage::read(&bytes, check);
        let good = a_signed_message(&bucket);
        if let Ok(m) = CheckedMessage::read(&mutated(&good, &flips), check) {
            let mut doc = ReplicaDoc::new(b"fuzz-receiver");
            let _ = doc.receive_checked(&mut PeerState::new(), m);
        }
    }

    /// Saved documents and sync states are read back from disk after a crash: damaged ones
    /// are refused (or start afresh), never a panic.
    #[test]
    fn saved_documents_and_sync_states_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let _ = decode_state(&bytes);
        let _ = ReplicaDoc::load(&bytes, &[], b"fuzz");
        let saved = a_saved_doc();
        let damaged = mutated(&saved, &flips);
        if let Ok(doc) = ReplicaDoc::load(&damaged, &[], b"fuzz") {
            let _ = doc.entries();
        }
        let _ = ReplicaDoc::load(&saved, &[&damaged], b"fuzz");
    }
}
