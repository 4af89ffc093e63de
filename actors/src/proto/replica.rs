//! What replicates, and the rules that make every replica agree.
//!
//! A bucket's history replicates as a set of [`Change`]s: one per version row, named by its
//! [`VersionId`], never modified. Sets merge by union, so any order and any repetition of
//! delivery gives the same set on every node. What a node *shows* is a function of that set:
//!
//! - **the head** of a path on a branch is its version with the largest [`OrderKey`]
//!   (commit stamp, then writer, then seq): a last-writer-wins register. A writer stamps its
//!   write later than every stamp it has seen (hybrid logical clock), so a write made after
//!   seeing another version wins over it whatever the machines' clocks say;
//! - **conflicts** are the versions of a path that no later version replaced knowingly: each
//!   version names the one it replaced as its writer saw the path (`pred`), so the versions
//!   nobody names ([`tips`]) are those written without seeing each other. All but the head
//!   among them are conflict losers: listed on every node, kept, restorable.
//!
//! Changes live in automerge documents, one per shard of a bucket ([`shard_of`]), each a flat
//! map from version id to the encoded change: every key is written once, by the node that
//! names it, so no two nodes ever race on a key (the seed's constraint) and there is nothing
//! for automerge to resolve; it carries the set and its sync protocol finds what a peer lacks.

use serde::{Deserialize, Serialize};

use super::clock::Stamp;
use super::entry::{ContentHash, Entry, EntryKind, Version};
use super::ids::{NodeId, OrderKey, Uid, VersionId};
use super::limits::{FILE_BYTES_MAX, LABEL_BYTES_MAX};
use super::membership::{Role, Seen};
use super::path::TreePath;

/// How many shards a bucket's history is split into. Fixed forever for a bucket (every node
/// must put a change in the same shard): 64 keeps a shard of a 1M-path bucket near 16k paths,
/// where one automerge change costs about a millisecond to sync (DESIGN.md).
pub const SHARDS: u16 = 64;

/// The largest encoded change accepted from a peer (a path of 4 KiB plus fixed fields fits
/// with room to spare).
pub const CHANGE_BYTES_MAX: usize = 8 * 1024;

/// Why bytes from a peer are not a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// Not decodable, or a field out of bounds.
    #[error("malformed change: {0}")]
    Malformed(String),
}

/// One version of one path, as it travels between nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The branch whose history holds it.
    pub branch: Uid,
    /// The path.
    pub path: TreePath,
    /// Its order key: commit stamp, writer, writer's seq (so also its id).
    pub key: OrderKey,
    /// The version it replaced, as its writer saw the path.
    pub pred: Option<VersionId>,
    /// The entry (or tombstone) and when it was written.
    pub version: Version,
    /// What wrote it (write, delete, rename, mkdir, merge, conflict-loser, restore).
    pub origin: Origin,
    /// The operation it is part of, when that wrote several versions (a rename, a merge, a
    /// write that made its parent directories): a peer applies them together or not at all.
    pub commit: Option<CommitRef>,
}

/// The operation a version is part of: its writer's seq of the operation's first version,
/// and how many versions the operation wrote in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommitRef {
    /// The seq of the operation's first version (the writer is the version's own).
    pub first_seq: i64,
    /// How many versions the operation wrote.
    pub len: u32,
}

/// The most versions one operation may say it wrote (a merge of many paths is one).
pub const COMMIT_LEN_MAX: u32 = 1 << 24;

impl Change {
    /// Its name on every node.
    pub fn id(&self) -> VersionId {
        self.key.version()
    }
}

/// What wrote a version: a fixed set, so a peer cannot fill the tree with arbitrary words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// A file or symlink written.
    Write,
    /// A path deleted.
    Delete,
    /// One side of a rename.
    Rename,
    /// A directory made.
    Mkdir,
    /// A merge took it, or made a directory a merge needed.
    Merge,
    /// The loser of a merge conflict.
    ConflictLoser,
    /// An old version made current again.
    Restore,
    /// A directory written to make the tree a tree again: a version arrived (or an
    /// acknowledged write committed) below a path that was deleted, or is a file. What it
    /// names as its predecessor, if a file or symlink, lost to it (a directory beats a file).
    Repair,
}

impl Origin {
    /// The word stored in SQLite and shown by `log`.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Write => "write",
            Origin::Delete => "delete",
            Origin::Rename => "rename",
            Origin::Mkdir => "mkdir",
            Origin::Merge => "merge",
            Origin::ConflictLoser => "conflict-loser",
            Origin::Restore => "restore",
            Origin::Repair => "repair",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "write" => Origin::Write,
            "delete" => Origin::Delete,
            "rename" => Origin::Rename,
            "mkdir" => Origin::Mkdir,
            "merge" => Origin::Merge,
            "conflict-loser" => Origin::ConflictLoser,
            "restore" => Origin::Restore,
            "repair" => Origin::Repair,
            _ => return None,
        })
    }
}

/// The encoded form (postcard): byte arrays longer than serde's 32 travel as `Vec`s and are
/// checked on the way in.
#[derive(Serialize, Deserialize)]
struct ChangeWire {
    format: u8,
    branch: [u8; 16],
    path: String,
    key: Vec<u8>,
    pred: Option<Vec<u8>>,
    written_ms: i64,
    written_lc: u32,
    entry: Option<EntryWire>,
    origin: Origin,
}

/// Format 2: format 1 and the operation the version is part of (sent only for versions of
/// operations that wrote several, so single writes stay readable by format-1 nodes).
#[derive(Serialize, Deserialize)]
struct ChangeWire2 {
    v1: ChangeWire,
    commit_first_seq: i64,
    commit_len: u32,
}

#[derive(Serialize, Deserialize)]
struct EntryWire {
    kind: u8,
    hash: [u8; 32],
    size: u64,
    mode: u32,
    mtime_ms: i64,
}

const CHANGE_FORMAT: u8 = 1;
const CHANGE_FORMAT_COMMIT: u8 = 2;

/// Encodes a change for a shard document.
pub fn encode(c: &Change) -> Vec<u8> {
    let wire = ChangeWire {
        format: CHANGE_FORMAT,
        branch: c.branch.0,
        path: c.path.as_str().to_string(),
        key: c.key.0.to_vec(),
        pred: c.pred.map(|p| p.to_bytes().to_vec()),
        written_ms: c.version.written.ms,
        written_lc: c.version.written.counter,
        entry: c.version.entry.as_ref().map(|e| EntryWire {
            kind: match e.kind {
                EntryKind::File => 0,
                EntryKind::Dir => 1,
                EntryKind::Symlink => 2,
            },
            hash: e.hash.0,
            size: e.size,
            mode: e.mode,
            mtime_ms: e.mtime_ms,
        }),
        origin: c.origin,
    };
    match c.commit {
        None => postcard::to_allocvec(&wire).expect("encoding to memory cannot fail"),
        Some(commit) => {
            let wire = ChangeWire2 { v1: ChangeWire { format: CHANGE_FORMAT_COMMIT, ..wire }, commit_first_seq: commit.first_seq, commit_len: commit.len };
            postcard::to_allocvec(&wire).expect("encoding to memory cannot fail")
        }
    }
}

/// Decodes and checks a change from a peer: every field within the bounds a local write
/// meets (the path in normal form, a size within the file limit, a real version id).
pub fn decode(bytes: &[u8]) -> Result<Change, ReplicaError> {
    let bad = |what: &str| ReplicaError::Malformed(what.to_string());
    if bytes.len() > CHANGE_BYTES_MAX {
        return Err(bad("too large"));
    }
    let (w, commit) = match bytes.first() {
        Some(&CHANGE_FORMAT) => (postcard::from_bytes::<ChangeWire>(bytes).map_err(|e| ReplicaError::Malformed(e.to_string()))?, None),
        Some(&CHANGE_FORMAT_COMMIT) => {
            let w2: ChangeWire2 = postcard::from_bytes(bytes).map_err(|e| ReplicaError::Malformed(e.to_string()))?;
            (w2.v1, Some(CommitRef { first_seq: w2.commit_first_seq, len: w2.commit_len }))
        }
        Some(other) => return Err(ReplicaError::Malformed(format!("unknown format {other}"))),
        None => return Err(bad("empty")),
    };
    let path = TreePath::parse_non_root(&w.path).map_err(|e| ReplicaError::Malformed(e.to_string()))?;
    if path.as_str() != w.path {
        return Err(bad("path not in normal form"));
    }
    let key = OrderKey::from_bytes(&w.key).ok_or_else(|| bad("order key"))?;
    if key.version().seq <= 0 {
        return Err(bad("version seq"));
    }
    if let Some(c) = commit {
        if c.len < 2 || c.len > COMMIT_LEN_MAX || c.first_seq <= 0 || c.first_seq > key.version().seq {
            return Err(bad("operation"));
        }
    }
    let pred = match w.pred {
        None => None,
        Some(p) => Some(VersionId::from_bytes(&p).ok_or_else(|| bad("pred"))?),
    };
    let entry = match w.entry {
        None => None,
        Some(e) => {
            let kind = match e.kind {
                0 => EntryKind::File,
                1 => EntryKind::Dir,
                2 => EntryKind::Symlink,
                _ => return Err(bad("entry kind")),
            };
            if e.size > FILE_BYTES_MAX || e.mode > 0o7777 {
                return Err(bad("entry size or mode"));
            }
            if kind == EntryKind::Dir && (e.size != 0 || e.hash != ContentHash::EMPTY.0) {
                return Err(bad("directory with content"));
            }
            Some(Entry { kind, hash: ContentHash(e.hash), size: e.size, mode: e.mode, mtime_ms: e.mtime_ms })
        }
    };
    Ok(Change {
        branch: Uid(w.branch),
        path,
        key,
        pred,
        version: Version { entry, written: Stamp { ms: w.written_ms, counter: w.written_lc } },
        origin: w.origin,
        commit,
    })
}

/// Marks the versions one operation wrote (in seq order), as its writer publishes them: when
/// there are several, each names the operation (its first seq, how many). An operation over
/// [`COMMIT_LEN_MAX`] versions travels unmarked (applied as it arrives) rather than in a form
/// every peer would refuse.
pub fn mark_commit(changes: &mut [Change]) {
    let Some(first) = changes.iter().map(|c| c.id().seq).min() else { return };
    let len = u32::try_from(changes.len()).unwrap_or(u32::MAX);
    for c in changes.iter_mut() {
        c.commit = (len > 1 && len <= COMMIT_LEN_MAX).then_some(CommitRef { first_seq: first, len });
    }
}

/// What [`whole_commits`] decided for changes from a peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WholeCommits {
    /// To apply now: single versions, and every operation whose versions are all here.
    pub ready: Vec<Change>,
    /// To keep until the rest of their operation arrives (held and incoming alike).
    pub hold: Vec<Change>,
    /// Operations no longer held (applied now, or found applied before): (writer, first seq).
    pub released: Vec<(NodeId, i64)>,
}

/// The rule that no node shows half an operation: a version of an operation that wrote
/// several (a rename's two paths live in two shards and travel apart) is applied only with
/// all of them. Given what arrived, the versions of the same operations held from earlier,
/// and whether a version is already applied here (then its operation was applied before,
/// whole, or as it stood when its wait ran out: `store::waiting`): the rest go as they come,
/// repeats among them (applying one is a no-op).
pub fn whole_commits(incoming: Vec<Change>, held: Vec<Change>, applied: impl Fn(&Change) -> bool) -> WholeCommits {
    let mut out = WholeCommits::default();
    let mut groups: std::collections::BTreeMap<(NodeId, i64), (u32, std::collections::BTreeMap<i64, Change>)> = std::collections::BTreeMap::new();
    for change in held.into_iter().chain(incoming) {
        match change.commit {
            Some(c) if c.len > 1 => {
                let group = groups.entry((change.id().node, c.first_seq)).or_insert_with(|| (c.len, Default::default()));
                group.0 = group.0.max(c.len);
                group.1.insert(change.id().seq, change);
            }
            _ => out.ready.push(change),
        }
    }
    for (key, (len, versions)) in groups {
        if versions.len() as u64 >= u64::from(len) || versions.values().any(&applied) {
            out.released.push(key);
            out.ready.extend(versions.into_values());
        } else {
            out.hold.extend(versions.into_values());
        }
    }
    out
}

/// The shard of a bucket that holds the versions of `path` on `branch`: a fixed hash
/// (FNV-1a, 64 bits), the same in every build and on every node.
pub fn shard_of(branch: &Uid, path: &TreePath) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in branch.0.iter().chain(path.as_str().as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(SHARDS)) as u16
}

/// The key of a version in its shard document: `SEQ@NODE` with the node id in full.
pub fn doc_key(id: &VersionId) -> String {
    format!("{}@{}", id.seq, id.node.to_hex())
}

/// The versions of one path no other version of it names as its predecessor: those written
/// without knowing of each other. Given `(id, pred)` of every version of the path on one
/// branch; returns the ids, in no particular order.
pub fn tips(versions: &[(VersionId, Option<VersionId>)]) -> Vec<VersionId> {
    let named: std::collections::HashSet<VersionId> = versions.iter().filter_map(|(_, p)| *p).collect();
    versions.iter().map(|(id, _)| *id).filter(|id| !named.contains(id)).collect()
}

/// One version of a path on one branch, as the winner rule sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathVersion {
    /// Its place in the global order.
    pub key: OrderKey,
    /// The version it replaced knowingly, if any.
    pub pred: Option<VersionId>,
    /// Written by a merge as the side that lost (`Origin::ConflictLoser`).
    pub merge_loser: bool,
    /// What it holds (`None`: a deletion).
    pub kind: Option<EntryKind>,
    /// A directory written to repair the tree's shape (`Origin::Repair`).
    pub repair: bool,
}

impl PathVersion {
    /// What the winner rule sees of `change`.
    pub fn of(change: &Change) -> Self {
        PathVersion {
            key: change.key,
            pred: change.pred,
            merge_loser: change.origin == Origin::ConflictLoser,
            kind: change.version.entry.as_ref().map(|e| e.kind),
            repair: change.origin == Origin::Repair,
        }
    }

    fn is_dir(&self) -> bool {
        self.kind == Some(EntryKind::Dir)
    }
}

/// Why a version is listed as a conflict loser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoserKind {
    /// Written without knowing of the head, and ordered before it.
    Concurrent,
    /// The side a local three-way merge did not take.
    Merge,
    /// A file or symlink where a directory was needed (something below it was written
    /// meanwhile): the directory that replaced it won.
    Shape,
}

impl LoserKind {
    /// Its name in the `conflict` table and in `alkfs conflicts`.
    pub fn as_str(self) -> &'static str {
        match self {
            LoserKind::Concurrent => "concurrent",
            LoserKind::Merge => "merge",
            LoserKind::Shape => "shape",
        }
    }
}

/// What [`path_outcome`] decides for one path: indexes into the versions it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathOutcome {
    /// The version the path reads as.
    pub head: usize,
    /// Listed conflict losers: (loser, the version that beat it, why).
    pub losers: Vec<(usize, usize, LoserKind)>,
}

/// The per-path rule every node applies alike, in any order of arrival: of `versions` (all
/// of one path on one branch), the head is the greatest order key among the tips (versions no
/// other names as its predecessor); every other tip is a concurrent loser beaten by the head,
/// but for a directory (nothing of it is lost: what it held are paths of their own, kept by
/// the tree's shape repair; and so a local write, which names the head, never changes what
/// is listed); a merge's losing side is beaten by the first version that names it (or the
/// head); a file or symlink that only shape repairs name lost to the first of them. `None`
/// for no versions.
pub fn path_outcome(versions: &[PathVersion]) -> Option<PathOutcome> {
    // Sets and maps, not scans: a peer may send a path many versions at once.
    let tips: std::collections::HashSet<VersionId> = tips(&versions.iter().map(|v| (v.key.version(), v.pred)).collect::<Vec<_>>()).into_iter().collect();
    // A merge's loser is beaten by the first version (by order key) that replaced it: two
    // versions may name one predecessor, and the choice must not depend on arrival.
    let mut by_pred: std::collections::HashMap<VersionId, usize> = std::collections::HashMap::new();
    for (i, v) in versions.iter().enumerate() {
        if let Some(p) = v.pred {
            let first = by_pred.entry(p).or_insert(i);
            if versions[i].key < versions[*first].key {
                *first = i;
            }
        }
    }
    // Of the versions that name each one, the first repair, and whether anything else does.
    let mut by_repair: std::collections::HashMap<VersionId, usize> = std::collections::HashMap::new();
    let mut knowingly: std::collections::HashSet<VersionId> = std::collections::HashSet::new();
    for (i, v) in versions.iter().enumerate() {
        let Some(p) = v.pred else { continue };
        if v.repair {
            let first = by_repair.entry(p).or_insert(i);
            if versions[i].key < versions[*first].key {
                *first = i;
            }
        } else {
            knowingly.insert(p);
        }
    }
    let head = (0..versions.len()).filter(|&i| tips.contains(&versions[i].key.version())).max_by_key(|&i| versions[i].key)?;
    let mut losers = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        let id = v.key.version();
        if v.merge_loser {
            losers.push((i, by_pred.get(&id).copied().unwrap_or(head), LoserKind::Merge));
        } else if i != head && tips.contains(&id) && !v.is_dir() {
            losers.push((i, head, LoserKind::Concurrent));
        } else if v.kind.is_some_and(|k| k != EntryKind::Dir) && !knowingly.contains(&id) {
            if let Some(&r) = by_repair.get(&id) {
                losers.push((i, r, LoserKind::Shape));
            }
        }
    }
    Some(PathOutcome { head, losers })
}

/// A branch as it travels between nodes: its name is bound to its uid, its fork to its
/// parent's uid and a stamp.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRecord {
    /// Its identity.
    pub uid: Uid,
    /// Its name (two branches may bear one name: each node shows the later one under a
    /// suffixed name, the same on every node).
    pub name: String,
    /// The branch it forked from (`None` for the bucket's root branch).
    pub parent: Option<Uid>,
    /// What it sees of its parent: versions ordered up to this key.
    pub fork: Option<OrderKey>,
    /// When it was made (ms since the epoch).
    pub created_ms: i64,
}

impl BranchRecord {
    /// Encodes for the bucket's document.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encoding to memory cannot fail")
    }

    /// Decodes and checks a record from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, ReplicaError> {
        if bytes.len() > CHANGE_BYTES_MAX {
            return Err(ReplicaError::Malformed("branch record too large".into()));
        }
        let r: BranchRecord = postcard::from_bytes(bytes).map_err(|e| ReplicaError::Malformed(e.to_string()))?;
        super::path::check_label("branch", &r.name).map_err(ReplicaError::Malformed)?;
        if r.name.len() > LABEL_BYTES_MAX || (r.parent.is_none() != r.fork.is_none()) {
            return Err(ReplicaError::Malformed("branch record fields".into()));
        }
        Ok(r)
    }

    /// The key of a branch in its bucket's document.
    pub fn doc_key(uid: &Uid) -> String {
        format!("branch/{}", uid.to_hex())
    }
}

/// What a bucket's own document holds besides branches: who is a member (added by whom,
/// with what role), roles granted later, who was removed, and where each node listens. Every
/// key names the node that writes it (the adder, the granter, the remover, the deleter, the
/// node itself; a branch's identity names its creator: [`Uid::is_minted_by`]), so no key is
/// ever written by two nodes, and no node can take a key another will need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaEntry {
    /// A branch.
    Branch(BranchRecord),
    /// A member, with who added it, when and as what.
    Member {
        /// The member.
        node: NodeId,
        /// Who added it (itself, for the bucket's first owner).
        added_by: NodeId,
        /// When (ms since the epoch).
        at_ms: i64,
        /// What it may do.
        role: Role,
    },
    /// A role given to a member by an owner (the latest counts; an owner stays one).
    Grant {
        /// The member.
        node: NodeId,
        /// The owner who granted it.
        by: NodeId,
        /// When (ms since the epoch; orders the grants).
        at_ms: i64,
        /// The role.
        role: Role,
        /// The largest seq of the member's versions the granter held: what stands if the
        /// role is read-only.
        last_seq: i64,
        /// The nodes the member had invited, as far as the granter knew: those stand if the
        /// role is read-only.
        admitted: Vec<NodeId>,
    },
    /// Whether plain members (writers) may invite, set by an owner (the latest counts).
    Policy {
        /// The owner who set it.
        by: NodeId,
        /// When (ms since the epoch; orders the policies).
        at_ms: i64,
        /// Whether writers may invite.
        members_invite: bool,
        /// The nodes plain members had admitted, as far as the owner knew: those stand when
        /// inviting is turned off.
        admitted: Vec<NodeId>,
    },
    /// A member removed: refused on every protocol from then on. One entry per remover
    /// (two owners may remove a node at once), saying what the remover had seen of it
    /// (see [`super::membership`]).
    Removed {
        /// The member.
        node: NodeId,
        /// Who removed it.
        by: NodeId,
        /// When.
        at_ms: i64,
        /// What the remover had seen of it.
        seen: Seen,
    },
    /// A branch deleted (its history stays while branches forked from it read through it).
    BranchDeleted {
        /// The branch.
        uid: Uid,
        /// Who deleted it.
        by: NodeId,
        /// When.
        at_ms: i64,
    },
    /// Where a node listens, as of `at_ms` (the latest counts).
    Addrs {
        /// The node.
        node: NodeId,
        /// When it said so.
        at_ms: i64,
        /// Its addresses.
        addrs: Vec<std::net::SocketAddr>,
    },
}

#[derive(Serialize, Deserialize)]
struct MemberRecord {
    by: [u8; 32],
    at_ms: i64,
    role: Role,
}

#[derive(Serialize, Deserialize)]
struct GrantRecord {
    by: [u8; 32],
    at_ms: i64,
    role: Role,
    last_seq: i64,
    admitted: Vec<[u8; 32]>,
}

#[derive(Serialize, Deserialize)]
struct PolicyRecord {
    at_ms: i64,
    members_invite: bool,
    admitted: Vec<[u8; 32]>,
}

#[derive(Serialize, Deserialize)]
struct ByWhom {
    by: [u8; 32],
    at_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct RemovedRecord {
    by: [u8; 32],
    at_ms: i64,
    last_seq: i64,
    admitted: Vec<[u8; 32]>,
    removed: Vec<[u8; 32]>,
}

#[derive(Serialize, Deserialize)]
struct AddrsRecord {
    at_ms: i64,
    addrs: Vec<std::net::SocketAddr>,
}

/// A time in a key: 16 hex digits, so keys of one node sort by time.
fn time_key(ms: i64) -> String {
    format!("{:016x}", ms.max(0))
}

impl MetaEntry {
    /// The entry's key in the bucket's document.
    pub fn key(&self) -> String {
        match self {
            MetaEntry::Branch(b) => BranchRecord::doc_key(&b.uid),
            MetaEntry::Member { node, added_by, .. } => format!("member/{}/{}", node.to_hex(), added_by.to_hex()),
            MetaEntry::Grant { node, by, at_ms, .. } => format!("role/{}/{}/{}", node.to_hex(), by.to_hex(), time_key(*at_ms)),
            MetaEntry::Policy { by, at_ms, .. } => format!("policy/{}/{}", by.to_hex(), time_key(*at_ms)),
            MetaEntry::Removed { node, by, .. } => format!("removed/{}/{}", node.to_hex(), by.to_hex()),
            MetaEntry::Addrs { node, at_ms, .. } => format!("addr/{}/{}", node.to_hex(), time_key(*at_ms)),
            MetaEntry::BranchDeleted { uid, by, .. } => format!("deleted/{}/{}", uid.to_hex(), by.to_hex()),
        }
    }

    /// The entry's value.
    pub fn value(&self) -> Vec<u8> {
        match self {
            MetaEntry::Branch(b) => b.encode(),
            MetaEntry::Member { added_by, at_ms, role, .. } => enc(&MemberRecord { by: added_by.0, at_ms: *at_ms, role: *role }),
            MetaEntry::Grant { by, at_ms, role, last_seq, admitted, .. } => {
                enc(&GrantRecord { by: by.0, at_ms: *at_ms, role: *role, last_seq: *last_seq, admitted: admitted.iter().map(|n| n.0).collect() })
            }
            MetaEntry::Policy { at_ms, members_invite, admitted, .. } => {
                enc(&PolicyRecord { at_ms: *at_ms, members_invite: *members_invite, admitted: admitted.iter().map(|n| n.0).collect() })
            }
            MetaEntry::Removed { by, at_ms, seen, .. } => {
                enc(&RemovedRecord {
                by: by.0,
                at_ms: *at_ms,
                last_seq: seen.last_seq,
                admitted: seen.admitted.iter().map(|n| n.0).collect(),
                removed: seen.removed.iter().map(|n| n.0).collect(),
            })
            }
            MetaEntry::Addrs { at_ms, addrs, .. } => enc(&AddrsRecord { at_ms: *at_ms, addrs: addrs.clone() }),
            MetaEntry::BranchDeleted { by, at_ms, .. } => enc(&ByWhom { by: by.0, at_ms: *at_ms }),
        }
    }

    /// Whether `signer` is the node that writes this entry: the adder, granter, remover or
    /// deleter it names, the node itself for its addresses, a branch's creator.
    pub fn written_by(&self, signer: &NodeId) -> bool {
        match self {
            MetaEntry::Branch(b) => b.uid.is_minted_by(signer),
            MetaEntry::Member { added_by: by, .. }
            | MetaEntry::Grant { by, .. }
            | MetaEntry::Policy { by, .. }
            | MetaEntry::Removed { by, .. }
            | MetaEntry::BranchDeleted { by, .. } => by == signer,
            MetaEntry::Addrs { node, .. } => node == signer,
        }
    }

    /// Reads an entry of a bucket's document from a peer; keys and values are checked
    /// (the key is the one the value's fields make).
    pub fn decode(key: &str, value: &[u8]) -> Result<MetaEntry, ReplicaError> {
        let bad = |what: &str| ReplicaError::Malformed(format!("{what} in the bucket's document: {key}"));
        if value.len() > CHANGE_BYTES_MAX {
            return Err(bad("an oversized entry"));
        }
        let (kind, rest) = key.split_once('/').ok_or_else(|| bad("an unknown key"))?;
        let node_of = |text: &str| NodeId::from_hex(text).ok_or_else(|| bad("a bad node id"));
        let undecodable = |_| bad("an undecodable record");
        let entry = match kind {
            "branch" => MetaEntry::Branch(BranchRecord::decode(value)?),
            "member" => {
                let (node, _) = rest.split_once('/').ok_or_else(|| bad("a member key without its adder"))?;
                let r: MemberRecord = postcard::from_bytes(value).map_err(undecodable)?;
                MetaEntry::Member { node: node_of(node)?, added_by: NodeId(r.by), at_ms: r.at_ms, role: r.role }
            }
            "role" => {
                let (node, _) = rest.split_once('/').ok_or_else(|| bad("a role key without its granter"))?;
                let r: GrantRecord = postcard::from_bytes(value).map_err(undecodable)?;
                let admitted = r.admitted.into_iter().map(NodeId).collect();
                MetaEntry::Grant { node: node_of(node)?, by: NodeId(r.by), at_ms: r.at_ms, role: r.role, last_seq: r.last_seq, admitted }
            }
            "policy" => {
                let (by, _) = rest.split_once('/').ok_or_else(|| bad("a policy key without its time"))?;
                let r: PolicyRecord = postcard::from_bytes(value).map_err(undecodable)?;
                MetaEntry::Policy { by: node_of(by)?, at_ms: r.at_ms, members_invite: r.members_invite, admitted: r.admitted.into_iter().map(NodeId).collect() }
            }
            "removed" => {
                let (node, _) = rest.split_once('/').ok_or_else(|| bad("a removal key without its remover"))?;
                let r: RemovedRecord = postcard::from_bytes(value).map_err(undecodable)?;
                let seen = Seen { last_seq: r.last_seq, admitted: r.admitted.into_iter().map(NodeId).collect(), removed: r.removed.into_iter().map(NodeId).collect() };
                MetaEntry::Removed { node: node_of(node)?, by: NodeId(r.by), at_ms: r.at_ms, seen }
            }
            "deleted" => {
                let (uid, _) = rest.split_once('/').ok_or_else(|| bad("a deletion key without its deleter"))?;
                let uid = Uid::from_hex(uid).ok_or_else(|| bad("a bad branch id"))?;
                let w: ByWhom = postcard::from_bytes(value).map_err(undecodable)?;
                MetaEntry::BranchDeleted { uid, by: NodeId(w.by), at_ms: w.at_ms }
            }
            "addr" => {
                let (node, _) = rest.split_once('/').ok_or_else(|| bad("an address key without its time"))?;
                let r: AddrsRecord = postcard::from_bytes(value).map_err(|_| bad("undecodable addresses"))?;
                if r.addrs.len() > super::ticket::TICKET_ADDRS_MAX {
                    return Err(bad("too many addresses"));
                }
                MetaEntry::Addrs { node: node_of(node)?, at_ms: r.at_ms, addrs: r.addrs }
            }
            _ => return Err(bad("an unknown key")),
        };
        if entry.key() != key {
            return Err(bad("an entry under another's key"));
        }
        Ok(entry)
    }
}

fn enc<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("encoding to memory cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn change(path: &str, entry: Option<Entry>) -> Change {
        let id = VersionId { node: NodeId([7; 32]), seq: 42 };
        Change {
            branch: Uid([1; 16]),
            path: TreePath::parse(path).unwrap(),
            key: OrderKey::new(Stamp { ms: 1_700_000_000_000, counter: 3 }, &id),
            pred: Some(VersionId { node: NodeId([9; 32]), seq: 41 }),
            version: Version { entry, written: Stamp { ms: 1_600_000_000_000, counter: 0 } },
            origin: Origin::Merge,
            commit: None,
        }
    }

    #[test]
    fn an_operation_is_released_only_whole_in_any_order_of_arrival() {
        let part = |seq: i64, path: &str| {
            let id = VersionId { node: NodeId([5; 32]), seq };
            Change {
                key: OrderKey::new(Stamp::at(10), &id),
                pred: None,
                commit: Some(CommitRef { first_seq: 7, len: 3 }),
                ..change(path, None)
            }
        };
        let (a, b, c) = (part(7, "/a"), part(8, "/b"), part(9, "/c"));
        let single = change("/single", None);
        // Two of three, with a single version: the single goes, the two wait.
        let first = whole_commits(vec![b.clone(), single.clone(), a.clone()], vec![], |_| false);
        assert_eq!(first.ready, vec![single]);
        assert_eq!(first.hold.len(), 2);
        assert!(first.released.is_empty());
        // The third arrives (again with a repeat of one held): all three go, once each.
        let second = whole_commits(vec![c.clone(), a.clone()], first.hold, |_| false);
        assert_eq!(second.ready, vec![a.clone(), b.clone(), c.clone()]);
        assert!(second.hold.is_empty());
        assert_eq!(second.released, vec![(NodeId([5; 32]), 7)]);
        // After the operation was applied (whole, or as it stood): the rest goes as it comes,
        // repeats and all, and nothing is held.
        let again = whole_commits(vec![b.clone(), c.clone()], vec![], |x| x.key == b.key);
        assert_eq!(again.ready, vec![b.clone(), c.clone()]);
        assert!(again.hold.is_empty());
        // Through the wire, both formats.
        assert_eq!(decode(&encode(&c)).unwrap(), c);
        assert_eq!(encode(&change("/x", None))[0], CHANGE_FORMAT, "a single version stays format 1");
        let mut bad = c.clone();
        bad.commit = Some(CommitRef { first_seq: 10, len: 3 });
        assert!(decode(&encode(&bad)).is_err(), "an operation starting after its own version");
    }

    #[test]
    fn a_change_survives_the_round_trip_and_garbage_is_refused_not_panicked_on() {
        let file = Entry { kind: EntryKind::File, hash: ContentHash([5; 32]), size: 9, mode: 0o644, mtime_ms: 12 };
        for c in [change("/a/b.txt", Some(file)), change("/d", Some(Entry::dir(0o755, 1))), change("/gone", None)] {
            assert_eq!(decode(&encode(&c)).unwrap(), c);
        }
        let good = encode(&change("/x", None));
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "a truncated change at {cut}");
        }
        let mut other_format = good.clone();
        other_format[0] = 9;
        assert!(decode(&other_format).is_err());
    }

    #[test]
    fn a_peer_cannot_send_what_a_local_write_could_not_store() {
        let mut bad_path = change("/x", None);
        bad_path.path = TreePath::stored("/", "..");
        assert!(decode(&encode(&bad_path)).is_err(), "a `..` component");
        let mut nfd = change("/x", None);
        nfd.path = TreePath::stored("/", "cafe\u{301}");
        assert!(decode(&encode(&nfd)).is_err(), "a name not in NFC");
        let huge = Entry { kind: EntryKind::File, hash: ContentHash([5; 32]), size: FILE_BYTES_MAX + 1, mode: 0o644, mtime_ms: 0 };
        assert!(decode(&encode(&change("/x", Some(huge)))).is_err(), "a size past the file limit");
        let fat_dir = Entry { kind: EntryKind::Dir, hash: ContentHash([5; 32]), size: 3, mode: 0o755, mtime_ms: 0 };
        assert!(decode(&encode(&change("/x", Some(fat_dir)))).is_err(), "a directory with bytes");
        assert!(decode(&vec![0u8; CHANGE_BYTES_MAX + 1]).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
            let _ = BranchRecord::decode(&bytes);
        }

        #[test]
        fn shards_spread_paths_and_never_move_them(n in 0u32..10_000) {
            let p = TreePath::parse(&format!("/dir/file-{n}")).unwrap();
            let s = shard_of(&Uid([3; 16]), &p);
            prop_assert!(s < SHARDS);
            prop_assert_eq!(s, shard_of(&Uid([3; 16]), &p));
        }
    }

    #[test]
    fn the_shard_function_is_pinned() {
        // Every node must put a version in the same shard, in every build: changing this
        // function is a format change.
        let p = TreePath::parse("/docs/report.txt").unwrap();
        assert_eq!(shard_of(&Uid([0; 16]), &p), shard_of(&Uid([0; 16]), &p));
        let spread: std::collections::HashSet<u16> =
            (0..1000).map(|i| shard_of(&Uid([0; 16]), &TreePath::parse(&format!("/f{i}")).unwrap())).collect();
        assert!(spread.len() > 60, "1000 paths fall in {} of {SHARDS} shards", spread.len());
        assert_eq!(shard_of(&Uid([0; 16]), &p), 46, "FNV-1a 64 of the uid and path, computed independently");
    }

    #[test]
    fn bucket_entries_round_trip_and_keys_must_match() {
        let n = NodeId([3; 32]);
        let by = NodeId([4; 32]);
        let entries = [
            MetaEntry::Member { node: n, added_by: by, at_ms: 5, role: Role::Writer },
            MetaEntry::Grant { node: n, by, at_ms: 7, role: Role::ReadOnly, last_seq: 3, admitted: vec![by] },
            MetaEntry::Policy { by, at_ms: 8, members_invite: true, admitted: vec![n] },
            MetaEntry::Removed { node: n, by, at_ms: 6, seen: Seen { last_seq: 9, admitted: vec![NodeId([5; 32])], removed: vec![NodeId([6; 32])] } },
            MetaEntry::Addrs { node: n, at_ms: 8, addrs: vec!["127.0.0.1:7".parse().unwrap()] },
            MetaEntry::BranchDeleted { uid: Uid([5; 16]), by: n, at_ms: 8 },
            MetaEntry::Branch(BranchRecord { uid: Uid::mint(&n, [1; 8]), name: "main".into(), parent: None, fork: None, created_ms: 1 }),
        ];
        for e in &entries {
            assert_eq!(&MetaEntry::decode(&e.key(), &e.value()).unwrap(), e);
        }
        // Each is written by the node it names, and by no other.
        let writers = [by, by, by, by, n, n, n];
        for (e, w) in entries.iter().zip(writers) {
            assert!(e.written_by(&w) && !e.written_by(&NodeId([6; 32])), "{e:?}");
        }
        let branch = MetaEntry::Branch(BranchRecord { uid: Uid([9; 16]), name: "main".into(), parent: None, fork: None, created_ms: 1 });
        assert!(MetaEntry::decode(&format!("branch/{}", Uid([8; 16]).to_hex()), &branch.value()).is_err());
        // An entry under a key naming another writer than its record.
        let member = &entries[0];
        assert!(MetaEntry::decode(&format!("member/{}/{}", n.to_hex(), NodeId([6; 32]).to_hex()), &member.value()).is_err());
        assert!(MetaEntry::decode(&format!("member/{}", n.to_hex()), &member.value()).is_err());
        assert!(MetaEntry::decode("member/zz", &[]).is_err());
        assert!(MetaEntry::decode("other/x", &[]).is_err());
    }

    #[test]
    fn tips_are_the_versions_nobody_replaced_knowingly() {
        let v = |n: u8, s: i64| VersionId { node: NodeId([n; 32]), seq: s };
        // a1 ← a2 (A overwrote its own), b1 written without seeing either.
        let mut t = tips(&[(v(1, 1), None), (v(1, 2), Some(v(1, 1))), (v(2, 1), None)]);
        t.sort();
        assert_eq!(t, [v(1, 2), v(2, 1)]);
        // B then wrote having seen a2, but nobody replaced b1 knowingly: it stays a tip.
        assert_eq!(tips(&[(v(1, 1), None), (v(1, 2), Some(v(1, 1))), (v(2, 1), None), (v(2, 2), Some(v(1, 2)))]).len(), 2);
        assert_eq!(tips(&[(v(1, 1), None), (v(2, 2), Some(v(1, 1)))]), [v(2, 2)]);
    }

    #[test]
    fn directories_never_lose_and_a_file_a_repair_replaced_is_listed_once() {
        let dir = |node, seq, ms, pred| PathVersion { kind: Some(EntryKind::Dir), ..pv(node, seq, ms, pred, false) };
        let tomb = |node, seq, ms, pred| PathVersion { kind: None, ..pv(node, seq, ms, pred, false) };
        let repair = |node, seq, ms, pred| PathVersion { repair: true, ..dir(node, seq, ms, pred) };
        // mkdir on two nodes at once, and a rm -r concurrent with a directory: no directory
        // is listed, whichever wins.
        let o = path_outcome(&[dir(1, 1, 10, None), dir(2, 1, 20, None)]).unwrap();
        assert_eq!((o.head, o.losers.len()), (1, 0));
        let o = path_outcome(&[dir(1, 1, 10, None), tomb(2, 2, 30, None), dir(3, 1, 20, None)]).unwrap();
        assert_eq!((o.head, o.losers.len()), (1, 0));
        // A file in a directory's way, replaced by repairs on two nodes: listed once, beaten
        // by the first repair (by key); the two repairs list nothing.
        let file = pv(1, 5, 10, None, false);
        let vs = [file, repair(2, 1, 30, Some((1, 5))), repair(3, 1, 20, Some((1, 5)))];
        let o = path_outcome(&vs).unwrap();
        assert_eq!(o.losers, vec![(0, 2, LoserKind::Shape)]);
        // One a writer replaced knowingly is not lost, repairs or not.
        let vs = [file, repair(2, 1, 30, Some((1, 5))), pv(3, 1, 20, Some((1, 5)), false)];
        assert!(path_outcome(&vs).unwrap().losers.iter().all(|l| l.2 != LoserKind::Shape));
        // A repair over a deletion lists nothing.
        let vs = [tomb(1, 5, 10, None), repair(2, 1, 30, Some((1, 5)))];
        assert!(path_outcome(&vs).unwrap().losers.is_empty());
    }

    fn pv(node: u8, seq: i64, ms: i64, pred: Option<(u8, i64)>, merge_loser: bool) -> PathVersion {
        let id = VersionId { node: NodeId([node; 32]), seq };
        PathVersion { key: OrderKey::new(Stamp { ms, counter: 0 }, &id), pred: pred.map(|(n, s)| VersionId { node: NodeId([n; 32]), seq: s }), merge_loser, kind: Some(EntryKind::File), repair: false }
    }

    #[test]
    fn the_path_rule_picks_the_latest_tip_and_lists_the_other_tips_and_merge_losers() {
        assert_eq!(path_outcome(&[]), None);
        // A knowing overwrite, even one stamped earlier (a clock behind): no conflict.
        let chain = [pv(1, 1, 2_000, None, false), pv(2, 1, 1_000, Some((1, 1)), false)];
        assert_eq!(path_outcome(&chain), Some(PathOutcome { head: 1, losers: vec![] }));
        // Two writes that did not see each other: the later key wins, the other is listed.
        let race = [pv(1, 1, 1_000, None, false), pv(2, 1, 1_500, None, false)];
        assert_eq!(path_outcome(&race), Some(PathOutcome { head: 1, losers: vec![(0, 1, LoserKind::Concurrent)] }));
        // A merge's losing side is beaten by the version that names it, not by the head.
        let merged = [pv(1, 1, 1_000, None, true), pv(1, 2, 1_100, Some((1, 1)), false), pv(1, 3, 1_200, Some((1, 2)), false)];
        assert_eq!(path_outcome(&merged), Some(PathOutcome { head: 2, losers: vec![(0, 1, LoserKind::Merge)] }));
    }

    proptest! {
        /// Every node holds the same versions in its own order: the outcome is the same.
        #[test]
        fn the_path_rule_does_not_depend_on_the_order_of_arrival(
            raw in proptest::collection::vec((0u8..4, 1i64..6, 0i64..50, proptest::option::of((0u8..4, 1i64..6)), proptest::bool::weighted(0.1)), 1..12),
            seed in any::<u64>(),
        ) {
            let mut versions: Vec<PathVersion> = raw.iter().map(|&(n, s, ms, p, m)| pv(n, s, ms, p, m)).collect();
            versions.sort_by_key(|v| v.key);
            versions.dedup_by_key(|v| v.key.version());
            let named = |vs: &[PathVersion]| {
                path_outcome(vs).map(|o| {
                    let mut ls: Vec<_> = o.losers.iter().map(|&(l, w, k)| (vs[l].key, vs[w].key, k)).collect();
                    ls.sort_by_key(|x| (x.0, x.1));
                    (vs[o.head].key, ls)
                })
            };
            let want = named(&versions);
            let mut shuffled = versions.clone();
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(named(&shuffled), want);
        }
    }
}
