//! Names that mean the same on every node.
//!
//! A node is its iroh public key ([`NodeId`]). A version is named by the node that wrote it and
//! that node's seq for it ([`VersionId`], printed `17@3f2a9c1b02`): seqs are never reused on a
//! node (id leases), so the pair is unique in the whole mesh and stays the version's name on
//! every node it reaches. Versions of one path are ordered by an [`OrderKey`]: the hybrid
//! logical clock stamp of the commit, then the writer's node id, then its seq. That order is
//! total, the same on every node, and respects causality (a node stamps a write later than
//! every stamp it has seen), so "the newest version" of a path is one answer everywhere:
//! last-writer-wins as a register CRDT.

use std::fmt;

use super::clock::Stamp;

/// A node's identity: its iroh public key (32 bytes, printed as 64 lowercase hex digits).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; 32]);

/// How many hex digits of a node id name it for people (iroh's short form has 10 too).
pub const NODE_SHORT_HEX: usize = 10;

impl NodeId {
    /// All 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The first [`NODE_SHORT_HEX`] hex digits: what logs and version ids show.
    pub fn short(&self) -> String {
        self.to_hex()[..NODE_SHORT_HEX].to_string()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        unhex::<32>(s).map(NodeId)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

/// A version's name everywhere: the node that wrote it and that node's seq for it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct VersionId {
    /// The writer.
    pub node: NodeId,
    /// The writer's seq for this version (unique on that node, never reused).
    pub seq: i64,
}

impl VersionId {
    /// The 40 bytes stored in SQLite and sent to peers: node id, then seq big-endian.
    pub fn to_bytes(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..32].copy_from_slice(&self.node.0);
        out[32..].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    /// The inverse of [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; 40] = b.try_into().ok()?;
        let node = NodeId(b[..32].try_into().ok()?);
        Some(VersionId { node, seq: i64::from_be_bytes(b[32..].try_into().ok()?) })
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.seq, self.node.short())
    }
}

/// A version id as a user types it: `SEQ@NODE` with at least 4 hex digits of the node id, or
/// a bare `SEQ` meaning a version this node wrote.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct VersionRef {
    /// The writer's seq.
    pub seq: i64,
    /// Leading hex digits of the writer's id; `None` for "this node".
    pub node_prefix: Option<String>,
}

impl VersionRef {
    /// Parses `17`, `v17`, `17@3f2a` or `v17@3f2a9c1b02`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a version id: give one as `alkfs log` prints it (e.g. 17@3f2a9c1b02)");
        let body = s.strip_prefix('v').unwrap_or(s);
        let (seq, node) = match body.split_once('@') {
            Some((seq, node)) => (seq, Some(node)),
            None => (body, None),
        };
        let seq: i64 = seq.parse().map_err(|_| bad())?;
        if seq <= 0 {
            return Err(bad());
        }
        let node_prefix = match node {
            None => None,
            Some(n) if (4..=64).contains(&n.len()) && n.bytes().all(|c| c.is_ascii_hexdigit()) => Some(n.to_ascii_lowercase()),
            Some(_) => return Err(bad()),
        };
        Ok(VersionRef { seq, node_prefix })
    }

    /// Whether `id` is the version this names (`me` is this node, for a bare seq).
    pub fn names(&self, id: &VersionId, me: &NodeId) -> bool {
        id.seq == self.seq
            && match &self.node_prefix {
                None => id.node == *me,
                Some(p) => id.node.to_hex().starts_with(p.as_str()),
            }
    }
}

impl fmt::Display for VersionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node_prefix {
            Some(node) => write!(f, "{}@{node}", self.seq),
            None => write!(f, "{}", self.seq),
        }
    }
}

/// The order of a path's versions, as bytes that compare like the order itself (so SQLite can
/// keep rows clustered by it): stamp ms (sign bit flipped), stamp counter, node id, seq.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrderKey(pub [u8; ORDER_KEY_LEN]);

/// Bytes in an [`OrderKey`].
pub const ORDER_KEY_LEN: usize = 8 + 4 + 32 + 8;

impl OrderKey {
    /// The key of version `id` written at `stamp`.
    pub fn new(stamp: Stamp, id: &VersionId) -> Self {
        let mut out = [0u8; ORDER_KEY_LEN];
        out[..8].copy_from_slice(&((stamp.ms as u64) ^ (1 << 63)).to_be_bytes());
        out[8..12].copy_from_slice(&stamp.counter.to_be_bytes());
        out[12..44].copy_from_slice(&id.node.0);
        out[44..].copy_from_slice(&(id.seq as u64 ^ (1 << 63)).to_be_bytes());
        OrderKey(out)
    }

    /// A bound above every version stamped at or before `stamp`, whoever wrote it: what a
    /// branch forked at `stamp` sees of its parent.
    pub fn upto(stamp: Stamp) -> Self {
        let mut out = [0xffu8; ORDER_KEY_LEN];
        out[..8].copy_from_slice(&((stamp.ms as u64) ^ (1 << 63)).to_be_bytes());
        out[8..12].copy_from_slice(&stamp.counter.to_be_bytes());
        OrderKey(out)
    }

    /// Above every key: no bound.
    pub const MAX: OrderKey = OrderKey([0xff; ORDER_KEY_LEN]);

    /// Parses the stored bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(OrderKey(b.try_into().ok()?))
    }

    /// The stamp part.
    pub fn stamp(&self) -> Stamp {
        let ms = u64::from_be_bytes(self.0[..8].try_into().expect("8 bytes")) ^ (1 << 63);
        Stamp { ms: ms as i64, counter: u32::from_be_bytes(self.0[8..12].try_into().expect("4 bytes")) }
    }

    /// The version id part.
    pub fn version(&self) -> VersionId {
        let node = NodeId(self.0[12..44].try_into().expect("32 bytes"));
        let seq = u64::from_be_bytes(self.0[44..].try_into().expect("8 bytes")) ^ (1 << 63);
        VersionId { node, seq: seq as i64 }
    }
}

impl fmt::Debug for OrderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OrderKey({:?}, {})", self.stamp(), self.version())
    }
}

/// A bucket's or branch's identity: 16 random bytes chosen where it was created, with its name
/// bound to it (names are for people and may differ or collide; ids never do).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uid(pub [u8; 16]);

impl Uid {
    /// 32 hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        unhex::<16>(s).map(Uid)
    }

    /// Parses the stored bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(Uid(b.try_into().ok()?))
    }

    /// A new identity made by node `creator`: 8 random bytes, then 8 bytes of a hash of the
    /// creator and those. The identity names its creator for good, so a record of a bucket or
    /// branch can be checked against the key that signed it: nobody else can write a record
    /// under an identity another node made (finding a key whose hash matches is 2^64 work),
    /// and a bucket's first owner is the node that minted its identity.
    pub fn mint(creator: &NodeId, random: [u8; 8]) -> Uid {
        let mut uid = [0u8; 16];
        uid[..8].copy_from_slice(&random);
        uid[8..].copy_from_slice(&Self::binding(creator, &random));
        Uid(uid)
    }

    /// Whether node `creator` minted this identity (see [`Uid::mint`]).
    pub fn is_minted_by(&self, creator: &NodeId) -> bool {
        let random: [u8; 8] = self.0[..8].try_into().expect("16 bytes");
        self.0[8..] == Self::binding(creator, &random)
    }

    fn binding(creator: &NodeId, random: &[u8; 8]) -> [u8; 8] {
        let mut h = blake3::Hasher::new_derive_key("alknet-fs 2026 uid minted by");
        h.update(&creator.0);
        h.update(random);
        h.finalize().as_bytes()[..8].try_into().expect("32 bytes")
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uid({})", &self.to_hex()[..8])
    }
}

/// Serialises an id as its hex text (JSON stays readable; the control socket carries it so).
macro_rules! serde_as_hex {
    ($t:ty, $n:expr, $what:expr) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&hex(&self.0))
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                unhex::<{ $n }>(&text).map(Self).ok_or_else(|| serde::de::Error::custom(concat!("not a ", $what)))
            }
        }
    };
}
serde_as_hex!(NodeId, 32, "node id");
serde_as_hex!(Uid, 16, "uid");
serde_as_hex!(OrderKey, ORDER_KEY_LEN, "order key");

impl serde::Serialize for VersionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}@{}", self.seq, self.node.to_hex()))
    }
}

impl<'de> serde::Deserialize<'de> for VersionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bad = || serde::de::Error::custom("not a version id (SEQ@NODE, the node id in full)");
        let (seq, node) = text.split_once('@').ok_or_else(bad)?;
        Ok(VersionId { seq: seq.parse().map_err(|_| bad())?, node: NodeId::from_hex(node).ok_or_else(bad)? })
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses exactly `2 * N` hex digits.
pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vid(node: u8, seq: i64) -> VersionId {
        VersionId { node: NodeId([node; 32]), seq }
    }

    proptest! {
        #[test]
        fn order_keys_compare_like_stamp_then_node_then_seq(
            ms in (-10_000i64..10_000).prop_union(i64::MIN / 2..i64::MAX / 2), c in any::<u32>(), n in any::<u8>(), s in 1i64..i64::MAX,
            ms2 in (-10_000i64..10_000).prop_union(i64::MIN / 2..i64::MAX / 2), c2 in any::<u32>(), n2 in any::<u8>(), s2 in 1i64..i64::MAX,
        ) {
            let (a, b) = ((Stamp { ms, counter: c }, vid(n, s)), (Stamp { ms: ms2, counter: c2 }, vid(n2, s2)));
            let (ka, kb) = (OrderKey::new(a.0, &a.1), OrderKey::new(b.0, &b.1));
            prop_assert_eq!(ka.cmp(&kb), (a.0, a.1.node, a.1.seq).cmp(&(b.0, b.1.node, b.1.seq)));
            prop_assert_eq!(ka.stamp(), a.0);
            prop_assert_eq!(ka.version(), a.1);
            prop_assert!(ka <= OrderKey::upto(a.0));
            prop_assert_eq!(ka <= OrderKey::upto(b.0), a.0 <= b.0);
        }
    }

    #[test]
    fn version_ids_print_and_parse() {
        let me = NodeId([0x3f; 32]);
        let id = vid(0x3f, 17);
        assert_eq!(id.to_string(), "17@3f3f3f3f3f");
        assert_eq!(VersionId::from_bytes(&id.to_bytes()), Some(id));
        for text in ["17@3f3f3f3f3f", "v17@3f3f", "17", "v17"] {
            let r = VersionRef::parse(text).unwrap();
            assert!(r.names(&id, &me), "{text}");
            assert!(!r.names(&vid(0x3f, 18), &me), "{text}");
        }
        assert!(!VersionRef::parse("17").unwrap().names(&vid(0x40, 17), &me), "a bare seq is this node's");
        for bad in ["", "x", "0", "-3", "17@", "17@3f", "17@zzzz", "17@3f3f@1"] {
            assert!(VersionRef::parse(bad).is_err(), "{bad}");
        }
    }
}
