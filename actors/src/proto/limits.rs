//! Named limits, units last. Every queue, name, path and chain in alknet-fs is bounded by one
//! of these, so a hostile or buggy input fails with a clear error instead of growing without end.

/// Longest single path component (a file or directory name), as most Unix filesystems allow.
pub const NAME_BYTES_MAX: usize = 255;
/// Longest normalised absolute path, as Linux's `PATH_MAX`.
pub const PATH_BYTES_MAX: usize = 4096;
/// Deepest path (number of components below the root).
pub const PATH_DEPTH_MAX: usize = 128;
/// Longest chain of branches a read falls through (a branch, its parent, …, the root).
/// Reads cost one indexed query per link, so the chain is bounded; fork from a shallower
/// branch (or merge and start again) past it.
pub const BRANCH_CHAIN_DEPTH_MAX: usize = 32;
/// Longest bucket or branch name.
pub const LABEL_BYTES_MAX: usize = 64;
/// Longest symlink target.
pub const SYMLINK_TARGET_BYTES_MAX: usize = 4096;
/// Largest file one write session may stage (1 TiB): a runaway writer stops here.
pub const FILE_BYTES_MAX: u64 = 1 << 40;
/// Most entries one commit (one SQLite transaction) may carry; bigger imports commit in
/// batches of this size.
pub const COMMIT_ENTRIES_MAX: usize = 4096;

// The mesh: what a member, or a stranger, can cost this node. Each bound a peer hits is
// counted, logged and shown in `alkfs status` (`node::gate::BoundHits`).

/// Largest frame a member may send: a sync message carrying a shard's first full exchange (a
/// shard of a 1M-path bucket holds ~16k versions of ~300 bytes) fits several times over.
pub const SYNC_FRAME_BYTES_MAX: usize = 32 << 20;
/// Largest first frame of a connection (`Hello` or `Join`), read before the peer is known:
/// a `Hello` naming [`SESSION_BUCKETS_MAX`] buckets and its addresses fits.
pub const HANDSHAKE_FRAME_BYTES_MAX: usize = 24 << 10;
/// Connections in their handshake at once; one more is closed at once (a member retries
/// at its next dial). Strangers can take these slots for a handshake's timeout at most; they
/// never reach sessions already open.
pub const HANDSHAKES_MAX: usize = 64;
/// Connections open at once (sessions, handshakes, blob transfers, gossip); one more is
/// refused before its handshake. A node has a few per member, so this is far above what
/// members need and far below what a stranger reconnecting in a loop would make it hold.
pub const CONNECTIONS_MAX: usize = 256;
/// New connections a second (after a burst of [`HANDSHAKES_MAX`]); one more is refused
/// before its handshake. Members connect a few times a minute; a stranger reconnecting in a
/// loop would otherwise keep hundreds of connections' state alive.
pub const CONNECTIONS_PER_SEC_MAX: usize = 100;
/// Most buckets one session carries.
pub const SESSION_BUCKETS_MAX: usize = 1024;
/// Most entries one sync message may set: more than the changes of one document a node
/// sends at once in practice (a whole shard of a large bucket goes as a document to a peer
/// that has none), far less than a peer could make a receiver hold.
pub const MESSAGE_ENTRIES_MAX: usize = 1 << 20;
/// Gossip's message size limit, the same on every node (iroh-gossip's default).
pub const GOSSIP_MESSAGE_BYTES_MAX: usize = 4096;

// What waits for a peer (`store::waiting`): bounded and dated, so a member that never
// finishes what it starts costs a bounded amount of disk, for a bounded time.

/// Most versions of one writer held back because their operation (a rename, a merge) has not
/// wholly arrived. Past it, the writer's oldest operations are applied as they stand (their
/// later versions apply as they come). A merge of a million paths still arrives whole.
pub const HELD_VERSIONS_PER_WRITER_MAX: u64 = 1 << 20;
/// How long an operation waits for the rest of its versions before what arrived is applied
/// as it stands: a day, so a partition in the middle of a transfer still heals whole.
pub const HELD_OPERATION_SECS_MAX: i64 = 24 * 3600;
/// Most versions of one bucket waiting for their writer's admission or their branch's
/// record. Past it, the oldest are dropped from the wait (they stay in the documents, which
/// are read again when the bucket's members or branches change).
pub const DEFERRED_VERSIONS_PER_BUCKET_MAX: u64 = 1 << 18;
/// How long a version waits for its writer's admission or its branch's record before it is
/// dropped from the wait (as above: the documents keep it).
pub const DEFERRED_SECS_MAX: i64 = 7 * 24 * 3600;
/// Least time between two readings of a bucket's documents for versions dropped from the
/// wait: a member that keeps changing branches cannot make this node re-read all the time.
pub const RESCAN_SECS_MIN: i64 = 600;
