//! The local control API: what the CLI and a running node say over `DATA/alkfs.sock`.
//!
//! Each request is one frame of JSON ([`Request`]); a streamed put follows it with frames
//! of raw bytes and an empty frame to end; the node answers with one frame of JSON
//! ([`Reply`]). Frames are length-prefixed and bounded
//! ([`CONTROL_FRAME_BYTES_MAX`](alknet_actors::proto::frame::CONTROL_FRAME_BYTES_MAX)); a
//! malformed or oversized one closes that connection, and the node keeps serving the others.
//!
//! Writes go through the node (it holds the data dir's lock). Reads do not need it: the CLI
//! reads the store directly (SQLite's WAL gives it a snapshot; blob files never change), so
//! `ls`, `get`, `log` give the same answers with or without a node by construction.

pub mod adopt;
pub mod client;
pub mod server;

use std::io::{self, Read, Write};
use std::path::PathBuf;

use alknet_actors::gc::GcReport;
use alknet_actors::node::blobs::BlobStats;
use alknet_actors::node::supervisor::ChildHealth;
use alknet_actors::proto::frame::{self, CONTROL_FRAME_BYTES_MAX, FRAME_HEADER_BYTES};
use alknet_actors::store::merge::MergeReport;
use alknet_actors::store::Branch;
use serde::{Deserialize, Serialize};

/// The socket's file name inside the data dir.
pub const SOCKET_FILE: &str = "alkfs.sock";
/// Bytes per data frame of a streamed put.
pub const STREAM_CHUNK_BYTES: usize = 1 << 20;

/// Which bucket and branch a request acts on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireScope {
    /// Bucket.
    pub bucket: String,
    /// Branch.
    pub branch: String,
}

/// A request to the node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Store a local file (the node reads it: same machine, same user).
    PutFile { scope: WireScope, path: String, src: PathBuf },
    /// Store a local directory tree.
    PutTree { scope: WireScope, path: String, src: PathBuf },
    /// Store the bytes that follow in data frames, up to an empty frame.
    PutStream { scope: WireScope, path: String },
    /// Commit changes a mount acknowledged (closed files, mkdirs, directories' chmod/utimes),
    /// in one transaction when they all can: `dirs` first, then `items`, then `attrs`. The
    /// node takes each staging file (inside `content/staging/mount-*`), hashes it unless its
    /// hash is given (every write was an append and the mount hashed them), links it into the
    /// content store, and removes it once the commit that records it is done. The answer,
    /// [`Reply::Staged`], names the changes that did not commit (kept by the mount and sent
    /// again); a change already committed (by its id) is not applied twice.
    PutStaged {
        scope: WireScope,
        items: Vec<StagedFile>,
        #[serde(default)]
        attrs: Vec<StagedAttr>,
        #[serde(default)]
        dirs: Vec<StagedDir>,
    },
    /// Make a symbolic link at `path` pointing to `target`.
    Symlink { scope: WireScope, path: String, target: String },
    /// Set the mode and/or mtime of a path, keeping its bytes.
    SetAttr { scope: WireScope, path: String, mode: Option<u32>, mtime_ms: Option<i64> },
    /// Move to exactly `to` (rename(2)): a file or an empty directory there is replaced,
    /// unless `noreplace` (RENAME_NOREPLACE: refused when `to` exists when it commits).
    MoveOver {
        scope: WireScope,
        from: String,
        to: String,
        #[serde(default)]
        noreplace: bool,
    },
    /// Remove.
    Remove { scope: WireScope, path: String, recursive: bool },
    /// Rename.
    Rename { scope: WireScope, from: String, to: String },
    /// Make a directory, with permission bits `mode` (else the default, 0755).
    Mkdir {
        scope: WireScope,
        path: String,
        parents: bool,
        #[serde(default)]
        mode: Option<u32>,
    },
    /// Restore a version.
    Restore { scope: WireScope, path: String, version: String },
    /// Create a branch.
    BranchCreate { scope: WireScope, name: String, from: Option<String> },
    /// Delete a branch.
    BranchDelete { scope: WireScope, name: String },
    /// Create a bucket.
    BucketCreate { name: String },
    /// Merge.
    Merge { scope: WireScope, from: String, into: Option<String> },
    /// Collect garbage.
    Gc { keep_versions: Option<u32>, keep_days: Option<u32> },
    /// Take a listed conflict (or all, without a path) off the branch's list.
    ConflictsDismiss { scope: WireScope, path: Option<String> },
    /// The node's status.
    Status,
    /// Make a ticket for a bucket.
    Invite {
        bucket: String,
        expires_ms: i64,
        uses: u32,
        /// Admit read-only members.
        #[serde(default)]
        read_only: bool,
    },
    /// Join with a ticket (under `name` locally, or the inviter's name).
    Join { ticket: String, name: Option<String> },
    /// Remove a member of a bucket everywhere.
    MembersRemove { bucket: String, node: String },
    /// Give a member of a bucket a role (`read-only`, `writer`, `owner`).
    MembersGrant { bucket: String, node: String, role: String },
    /// Say who may invite to a bucket: writers too (`members_invite`), or owners only.
    MembersInvite { bucket: String, members_invite: bool },
    /// Fetch a blob whose bytes are still on peers, and answer once it is here.
    Fetch { hash: String, size: u64 },
    /// Bytes `offset..offset + len` of a blob whose bytes are still on peers: fetched by
    /// range (only the chunks that cover them), answered as [`Reply::Data`].
    ReadRange { hash: String, size: u64, offset: u64, len: u64 },
    /// Tests only, when the node was started with fault injection on: panic an actor.
    InjectPanic { actor: String },
}

/// One closed file of a mount, for [`Request::PutStaged`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StagedFile {
    /// The change's id (unique: the mount's id and its ticket).
    pub id: String,
    /// The version its writer opened (its predecessor).
    pub seen: alknet_actors::store::acked::Seen,
    /// Where it goes.
    pub path: String,
    /// Its staging file (a file of more than the inline limit).
    pub staging: Option<PathBuf>,
    /// Its bytes, base64 (small content: at most the inline limit).
    pub data: Option<String>,
    /// Its BLAKE3 hash, when the mount hashed it as it was written.
    pub hash: Option<String>,
    /// The length the session wrote; a file of another length is refused (a write that
    /// failed part-way), so a hash given never names other bytes.
    pub size: Option<u64>,
    /// Permission bits.
    pub mode: u32,
    /// Modification time.
    pub mtime_ms: i64,
}

/// A change of a [`Request::PutStaged`] that did not commit, and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailedChange {
    /// Its id.
    pub id: String,
    /// Why, for the user.
    pub error: String,
}

/// A queued mkdir of a mount, for [`Request::PutStaged`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StagedDir {
    /// The change's id.
    pub id: String,
    /// Where.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Modification time.
    pub mtime_ms: i64,
}

/// A queued attribute change of a mount, for [`Request::PutStaged`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StagedAttr {
    /// The change's id.
    pub id: String,
    /// Whose (gone meanwhile: nothing to do).
    pub path: String,
    /// New permission bits.
    pub mode: Option<u32>,
    /// New modification time.
    pub mtime_ms: Option<i64>,
}

/// The node's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Done, nothing to report.
    Done,
    /// The version written.
    Seq { seq: i64 },
    /// How many paths.
    Count { count: u64 },
    /// Where a rename put the path.
    Path { path: String },
    /// A branch created.
    Branch { branch: Branch },
    /// A merge's report.
    Merge { report: MergeReport },
    /// A collection's report.
    Gc { report: GcReport },
    /// The node's status.
    Status { status: Box<Status> },
    /// A ticket.
    Ticket { ticket: String },
    /// A join went through.
    Joined { bucket: String, inviter: String },
    /// Bytes, base64.
    Data { data: String },
    /// Changes of a [`Request::PutStaged`] that did not commit (the others did).
    Staged { failed: Vec<FailedChange> },
    /// The request failed; the message is for the user.
    Error { message: String },
}

/// What `alkfs status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// The node's id (its iroh public key).
    pub node_id: String,
    /// The daemon's pid.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// The data dir.
    pub data_dir: PathBuf,
    /// Each actor's health and restarts.
    pub actors: Vec<ChildHealth>,
    /// Bytes the data dir takes on disk.
    pub store_bytes: u64,
    /// Blobs the tree names.
    pub blob_count: u64,
    /// Of those, blobs whose bytes are still on peers (being fetched).
    #[serde(default)]
    pub blobs_missing: u64,
    /// The blob actor's queue and record.
    pub blobs: BlobStats,
    /// The outbox: the node's cursor and the newest event.
    pub outbox_cursor: i64,
    /// The newest event's offset.
    pub outbox_head: i64,
    /// When the last collection ran (ms since the epoch) and what it did.
    pub last_gc: Option<(i64, GcReport)>,
    /// The outbox's consumers: cursor, last seen, expired or not.
    pub consumers: Vec<alknet_actors::store::outbox::Consumer>,
    /// The mesh: where the node listens, its peers, fetches.
    #[serde(default)]
    pub mesh: Option<alknet_actors::node::mesh::MeshStatus>,
    /// Each shared bucket's members.
    #[serde(default)]
    pub members: Vec<BucketMembers>,
    /// Changes mounts acknowledged that failed to commit since the node started (each is
    /// kept by its mount and sent again: a full disk, say).
    #[serde(default)]
    pub acked_failures: u64,
    /// The last of those: when (ms since the epoch) and why.
    #[serde(default)]
    pub acked_last_failure: Option<(i64, String)>,
}

/// The members of one bucket, for `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BucketMembers {
    /// The bucket's name here.
    pub bucket: String,
    /// Its members.
    pub members: Vec<alknet_actors::engine::mesh::Member>,
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(payload.len() + FRAME_HEADER_BYTES);
    frame::encode(payload, &mut buf);
    w.write_all(&buf)
}

/// Reads one frame (blocking).
pub fn read_frame(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    r.read_exact(&mut header)?;
    let len = frame::check_header(header, CONTROL_FRAME_BYTES_MAX).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(payload)
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// Every request the node has to read (some in a valid encoding) with bytes flipped.
    fn requests() -> Vec<Vec<u8>> {
        let scope = WireScope { bucket: "default".into(), branch: "main".into() };
        [
            Request::Status,
            Request::Invite { bucket: "default".into(), expires_ms: 60_000, uses: 1, read_only: true },
            Request::MembersGrant { bucket: "default".into(), node: "00".repeat(32), role: "writer".into() },
            Request::MembersInvite { bucket: "default".into(), members_invite: true },
            Request::Remove { scope, path: "/a/../b".into(), recursive: true },
        ]
        .iter()
        .map(|r| serde_json::to_vec(r).unwrap())
        .collect()
    }

    proptest! {
        /// A control request is read from a local client, which may be anything that opened
        /// the socket: whatever the bytes, a request or an error, never a panic.
        #[test]
        fn control_requests_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), which in 0usize..4, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..5)) {
            let _ = serde_json::from_slice::<Request>(&bytes);
            let mut valid = requests().swap_remove(which);
            for (at, mask) in flips {
                let i = at % valid.len();
                valid[i] ^= mask.max(1);
            }
            let _ = serde_json::from_slice::<Request>(&valid);
        }
    }
}
