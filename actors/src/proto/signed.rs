//! Signed entries: every value of a replicated document carries the signature of the node
//! that wrote it, made with its node key (the iroh identity, so the signer *is* a node id),
//! over the bucket, the entry's key and its body. A receiver checks the signature and that
//! the signer is the node the key names before anything of a message is applied
//! (`engine::mesh`): a member cannot forge another node's versions or membership entries, and
//! an entry cannot be replayed into another bucket or under another key.
//!
//! Checking is deterministic (`verify_strict`, one entry at a time): whether an entry is
//! accepted must be the same on every node, and ed25519's batch equation (cofactorless with
//! random weights) can accept a crafted signature in one batch and refuse it in another.
//! The cost is spread instead: signing happens when the outbox is published, never in a
//! commit, and a message's entries are checked in one pass with each signer's key decoded
//! once.

use std::collections::HashMap;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use super::ids::{NodeId, Uid};

/// The first byte of a signed value (a format number: a later format is refused by this one).
pub const SIGNED_FORMAT: u8 = 0xA1;

/// Bytes a signature adds to an entry's body: the format, the signer, the signature.
pub const SIGNED_OVERHEAD: usize = 1 + 32 + 64;

/// Separates what entries sign from anything else the same key might sign.
const DOMAIN: &[u8] = b"alknet-fs entry v1\0";

/// Why a signed value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignedError {
    /// Not a signed value of this format.
    #[error("not a signed entry (format byte {0:?})")]
    Format(Option<u8>),
    /// The signature does not hold for the signer, bucket, key and body.
    #[error("a bad signature by {0}")]
    Signature(String),
}

/// A node's key, as the signer of its entries.
pub struct EntrySigner {
    key: SigningKey,
    id: NodeId,
}

impl std::fmt::Debug for EntrySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntrySigner").field("id", &self.id).finish_non_exhaustive()
    }
}

impl EntrySigner {
    /// The signer of the node whose secret key is `secret` (its node id is the public half).
    pub fn new(secret: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(secret);
        let id = NodeId(key.verifying_key().to_bytes());
        EntrySigner { key, id }
    }

    /// The node it signs as.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// `body` signed as the value of `key` in a document of `bucket`.
    pub fn seal(&self, bucket: &Uid, key: &str, body: &[u8]) -> Vec<u8> {
        let sig = self.key.sign(&message(bucket, key, body));
        let mut out = Vec::with_capacity(SIGNED_OVERHEAD + body.len());
        out.push(SIGNED_FORMAT);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&sig.to_bytes());
        out.extend_from_slice(body);
        out
    }
}

/// A signed value read apart, its signature not yet checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sealed<'a> {
    /// Who says it signed it.
    pub signer: NodeId,
    sig: [u8; 64],
    /// What was signed (the entry's own encoding).
    pub body: &'a [u8],
}

/// Reads a signed value apart (no check of the signature: see [`verify`]).
pub fn open(value: &[u8]) -> Result<Sealed<'_>, SignedError> {
    if value.first() != Some(&SIGNED_FORMAT) || value.len() < SIGNED_OVERHEAD {
        return Err(SignedError::Format(value.first().copied()));
    }
    let signer = NodeId(value[1..33].try_into().expect("32 bytes"));
    let sig = value[33..97].try_into().expect("64 bytes");
    Ok(Sealed { signer, sig, body: &value[SIGNED_OVERHEAD..] })
}

/// Checks the signatures of entries `(key, sealed)` of a document of `bucket`; on failure,
/// the index of the first that does not hold. They are checked as one batch (much cheaper:
/// the entries of one writer share most of the work) under ZIP-215's rules, with which a
/// batch accepts exactly what the entries checked one by one would: so every node decides
/// the same whatever messages the entries came in. Only when the batch fails are they
/// checked one by one, to name the first bad one. A signer whose key is weak (of small
/// order, for which anyone can make signatures) is refused.
pub fn verify(bucket: &Uid, entries: &[(&str, Sealed<'_>)]) -> Result<(), usize> {
    use ed25519_consensus::batch::{Item, Verifier};
    let mut weak: HashMap<NodeId, bool> = HashMap::new();
    let mut items = Vec::with_capacity(entries.len());
    for (i, (key, sealed)) in entries.iter().enumerate() {
        let is_weak = *weak.entry(sealed.signer).or_insert_with(|| VerifyingKey::from_bytes(&sealed.signer.0).map_or(true, |k| k.is_weak()));
        if is_weak {
            return Err(i);
        }
        let vk = ed25519_consensus::VerificationKeyBytes::from(sealed.signer.0);
        items.push(Item::from((vk, ed25519_consensus::Signature::from(sealed.sig), &message(bucket, key, sealed.body))));
    }
    let mut batch = Verifier::new();
    for item in &items {
        batch.queue(item.clone());
    }
    if batch.verify(rand_core_06::OsRng).is_ok() {
        return Ok(());
    }
    match items.into_iter().position(|item| item.verify_single().is_err()) {
        Some(i) => Err(i),
        None => Ok(()),
    }
}

fn message(bucket: &Uid, key: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 16 + 4 + key.len() + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(&bucket.0);
    m.extend_from_slice(&(key.len() as u32).to_be_bytes());
    m.extend_from_slice(key.as_bytes());
    m.extend_from_slice(body);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_only_for_its_signer_bucket_key_and_body() {
        let (a, b) = (EntrySigner::new(&[1; 32]), EntrySigner::new(&[2; 32]));
        let bucket = Uid([5; 16]);
        let value = a.seal(&bucket, "1@aa", b"body");
        let sealed = open(&value).unwrap();
        assert_eq!(sealed.signer, a.id());
        assert_eq!(sealed.body, b"body");
        assert_eq!(verify(&bucket, &[("1@aa", sealed)]), Ok(()));
        // Another bucket, another key, another body, another claimed signer: refused.
        assert_eq!(verify(&Uid([6; 16]), &[("1@aa", sealed)]), Err(0));
        assert_eq!(verify(&bucket, &[("2@aa", sealed)]), Err(0));
        assert_eq!(verify(&bucket, &[("1@aa", Sealed { body: b"other", ..sealed })]), Err(0));
        assert_eq!(verify(&bucket, &[("1@aa", sealed), ("1@aa", Sealed { signer: b.id(), ..sealed })]), Err(1));
        // A value cut short or of another format is not read at all.
        assert!(open(&value[..50]).is_err());
        assert!(open(b"\x01plain").is_err());
    }

    #[test]
    fn a_large_batch_names_its_first_bad_entry() {
        let signer = EntrySigner::new(&[3; 32]);
        let bucket = Uid([7; 16]);
        let keys: Vec<String> = (0..1500).map(|i| format!("{i}@aa")).collect();
        let values: Vec<Vec<u8>> = keys.iter().map(|k| signer.seal(&bucket, k, k.as_bytes())).collect();
        let mut entries: Vec<(&str, Sealed<'_>)> = keys.iter().zip(&values).map(|(k, v)| (k.as_str(), open(v).unwrap())).collect();
        assert_eq!(verify(&bucket, &entries), Ok(()));
        // Two bad ones: the batch fails and the first is named.
        for bad in [1400, 900] {
            entries[bad].1 = Sealed { body: b"tampered", ..entries[bad].1 };
            assert_eq!(verify(&bucket, &entries), Err(bad));
        }
    }
}
