//! The path tree in SQLite: buckets → branches → paths → versions, with the outbox.
//!
//! One database file per node (`tree.db` in the data dir). Reads go through a [`View`]: the
//! chain of a branch and its ancestors, each with the last seq it may see, so a branch costs
//! nothing to create and is a snapshot of its parent at the fork. Every mutation goes through
//! a [`Tx`](tx::Tx), which writes the version rows and the outbox events in one SQLite
//! transaction: nothing is visible, to readers or to outbox consumers, before commit.
//!
//! - [`schema`]: tables and versioned migrations;
//! - [`read`]: resolving a path, listing a directory, history, through a view;
//! - [`tx`]: mutations (write, delete, rename, mkdir, restore, branches);
//! - [`merge`]: three-way merge of branches;
//! - [`replica`]: the versions this node wrote, for its peers, and theirs applied here;
//! - [`outbox`]: the honker stream of committed events and its consumers' cursors.

pub mod acked;
pub mod merge;
pub mod outbox;
pub mod read;
pub mod replica;
pub mod schema;
pub mod shape;
pub mod tx;
pub mod waiting;

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::proto::entry::{ContentHash, Entry, EntryKind, Version};
use crate::proto::ids::{NodeId, OrderKey, Uid, VersionId};
use crate::proto::path::{PathError, TreePath};

pub use read::View;
pub use tx::Tx;

/// Errors of the path tree, each worded so the user knows what to do next.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A path was refused by the path rules.
    #[error(transparent)]
    Path(#[from] PathError),
    /// No such path on the branch.
    #[error("{0}: no such file or directory")]
    NotFound(String),
    /// Something exists where a new thing was to be created.
    #[error("{0}: already exists")]
    Exists(String),
    /// A file where a directory is needed.
    #[error("{0}: not a directory")]
    NotADirectory(String),
    /// A directory where a file is needed.
    #[error("{0}: is a directory (use -r for directories)")]
    IsADirectory(String),
    /// Removing a non-empty directory without recursion.
    #[error("{0}: directory not empty (use rm -r)")]
    DirectoryNotEmpty(String),
    /// Bad request that the message explains.
    #[error("{0}")]
    Invalid(String),
    /// A write to a bucket of which this node is a read-only member.
    #[error("this node is a read-only member of bucket {0:?}: it receives every change but may not write (an owner can make it a writer: `alkfs members grant <this node's id> writer` on the owner's node)")]
    ReadOnly(String),
    /// No such bucket.
    #[error("no bucket {0:?}: create it with `alkfs bucket create {0}` or pick one from `alkfs bucket list`")]
    NoBucket(String),
    /// No such branch.
    #[error("no branch {0:?}: see `alkfs branch list`")]
    NoBranch(String),
    /// The database was written by a newer alkfs.
    #[error("the database has schema version {found}, newer than this alkfs supports ({supported}): upgrade alkfs")]
    SchemaTooNew {
        /// The version found.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// The database file is damaged or not a database.
    #[error("the path-tree database {path} is damaged ({detail}): restore the data dir from a backup or a peer")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// SQLite's words.
        detail: String,
    },
    /// The disk is full.
    #[error("the disk holding the data dir is full: free space and retry (nothing was changed)")]
    DiskFull,
    /// Any other SQLite failure.
    #[error("path-tree database error: {0}")]
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ffi::ErrorCode;
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => StoreError::DiskFull,
            Some(ErrorCode::DatabaseCorrupt) | Some(ErrorCode::NotADatabase) => {
                StoreError::Corrupt { path: PathBuf::new(), detail: e.to_string() }
            }
            _ => StoreError::Sqlite(e),
        }
    }
}

impl From<honker_core::Error> for StoreError {
    fn from(e: honker_core::Error) -> Self {
        match e {
            honker_core::Error::Sqlite(e) => e.into(),
        }
    }
}

/// A branch as stored.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Branch {
    /// Row id, unique across buckets.
    pub id: i64,
    /// The bucket it belongs to.
    pub bucket_id: i64,
    /// Its name within the bucket.
    pub name: String,
    /// The branch it forked from; `None` for a bucket's root branch (`main`).
    pub parent_id: Option<i64>,
    /// The last local seq of the parent this branch sees (`i64::MAX` for branches forked by
    /// stamp, which see what `fork_key` bounds on every node alike).
    pub fork_seq: i64,
    /// The last order key of the parent this branch sees: its fork stamp. `None` for a root
    /// branch and for branches forked before schema 3 (bounded by `fork_seq` alone).
    pub fork_key: Option<OrderKey>,
    /// Its identity on every node.
    pub uid: Uid,
    /// Links below it in the chain (0 for the root).
    pub depth: i64,
    /// When it was created.
    pub created_ms: i64,
}

/// One stored version of one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionRow {
    /// The local seq: when it arrived in this store (unique and increasing here; for a
    /// version written here, also its seq in its [`VersionId`]).
    pub seq: i64,
    /// The branch whose history holds it.
    pub branch_id: i64,
    /// The path.
    pub path: TreePath,
    /// The entry and write time.
    pub version: Version,
    /// What wrote it: write, delete, rename, mkdir, merge, conflict-loser, restore.
    pub origin: String,
    /// Its place in the path's history: commit stamp, writer, writer's seq.
    pub key: OrderKey,
    /// The version it replaced, as its writer saw the path (`None`: the path was new to it).
    pub pred: Option<VersionId>,
}

impl VersionRow {
    /// Its name on every node.
    pub fn id(&self) -> VersionId {
        self.key.version()
    }

    /// The entry, `None` for a tombstone.
    pub fn entry(&self) -> Option<&Entry> {
        self.version.entry.as_ref()
    }
}

/// The name of the path-tree database inside the data dir.
pub const TREE_DB_FILE: &str = "tree.db";

/// The root branch every bucket starts with.
pub const ROOT_BRANCH: &str = "main";

/// How much of the database SQLite may map into memory for reads.
const MMAP_BYTES_MAX: u64 = 1 << 30;

/// How many ids a transaction may hand out: version seqs, and outbox offsets, each.
///
/// Ids leave the process (a client is told "version 7", a peer keeps a cursor), so one must
/// never be handed out twice, not even after a power loss. SQLite runs with
/// `synchronous=NORMAL`: a commit survives a killed process but the last ones may roll back
/// on power loss, counters included. So ids are *leased*: the `clock` row records how far ids
/// may go ([`ID_LEASE`] ahead), and only a transaction that commits with `synchronous=FULL`
/// (on disk before anyone sees it) moves the lease. A transaction that fits in the lease commits
/// with NORMAL; one that might not, or whose size is unknown ([`Ids::Unbounded`]: merges,
/// recursive deletes), commits with FULL and renews the lease. After a crash the writer
/// resumes past the durable lease ([`TreeStore::recover_ids`]), so ids lost with the last commits are
/// skipped, never reissued; a clean close gives the unused rest back ([`Drop`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ids {
    /// At most this many seqs and this many outbox events.
    AtMost(u64),
    /// Unknown in advance: the transaction commits durably.
    Unbounded,
}

/// How far ids run ahead of the last durable commit. After a crash at most this many ids
/// (of each kind) are skipped; while running, one FULL commit per this many ids is paid.
pub const ID_LEASE: i64 = 4096;

/// The id counters and their leases, as committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Counters {
    /// The last version seq handed out.
    pub seq: i64,
    /// The last outbox offset handed out.
    pub offset: i64,
    /// Seqs up to here may be handed out without a durable commit.
    pub seq_leased: i64,
    /// Offsets up to here likewise.
    pub offset_leased: i64,
}

impl Counters {
    pub(crate) fn read(conn: &Connection) -> Result<Counters, StoreError> {
        let (seq, seq_leased, offset_leased) = conn
            .prepare_cached("SELECT seq, seq_leased, offset_leased FROM clock WHERE id = 0")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(Counters { seq, offset: outbox::head(conn)?, seq_leased, offset_leased })
    }

    /// True when `ids` more of each kind stay within the lease.
    fn covers(&self, ids: Ids) -> bool {
        match ids {
            Ids::AtMost(n) => {
                let n = i64::try_from(n).unwrap_or(i64::MAX);
                self.seq.saturating_add(n) <= self.seq_leased && self.offset.saturating_add(n) <= self.offset_leased
            }
            Ids::Unbounded => false,
        }
    }
}

/// The path tree: one SQLite connection and the file it came from.
pub struct TreeStore {
    conn: Connection,
    path: PathBuf,
    /// The node this store writes as.
    me: NodeId,
    /// The counters after this connection's last commit (it is the only writer while it
    /// writes: the data dir's lock); `None` until read or after a failed transaction.
    counters: Option<Counters>,
    /// The lease this connection last took (seq_leased, offset_leased): on drop it gives
    /// back the unused part, if no other writer renewed it since.
    leased: Option<(i64, i64)>,
    /// How far ahead of the wall clock a stamp may be (see [`crate::proto::clock::Bound`]).
    clock_bound: crate::proto::clock::Bound,
}

impl TreeStore {
    /// Opens (and with `create`, creates) the database at `path`, migrating it to the current
    /// schema. A file that is not a database, or is damaged, is reported as such.
    pub fn open(path: &Path, create: bool) -> Result<Self, StoreError> {
        if !create && !path.exists() {
            return Err(StoreError::Invalid(format!("no path-tree database at {}", path.display())));
        }
        let corrupt = |e: StoreError| match e {
            StoreError::Corrupt { detail, .. } => StoreError::Corrupt { path: path.to_path_buf(), detail },
            other => other,
        };
        let text = path.to_str().ok_or_else(|| StoreError::Invalid(format!("data dir path {path:?} is not UTF-8")))?;
        // honker_core::open_conn's flags, without SQLite's per-connection mutex: a Connection
        // is used by one thread at a time (rusqlite's `Send`, not `Sync`), and the mutex taken
        // around every column read cost an eighth of a 10,000-entry `ls`.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(text, flags).map_err(StoreError::from).map_err(corrupt)?;
        honker_core::apply_default_pragmas(&conn).map_err(StoreError::from).map_err(corrupt)?;
        honker_core::attach_honker_functions(&conn).map_err(StoreError::from)?;
        // Reading the schema is enough to catch a file that is not a database; damage deeper
        // in shows as SQLITE_CORRUPT where it is met. (A full check reads the whole file:
        // too slow for every command.)
        let data_dir = path.parent().unwrap_or(Path::new("."));
        schema::migrate(&mut conn, data_dir).map_err(corrupt)?;
        let me = self_node(&conn)?;
        Ok(TreeStore { conn, path: path.to_path_buf(), me, counters: None, leased: None, clock_bound: crate::proto::clock::Bound::default() })
    }

    /// Reads pages through a memory map from now on: a short-lived CLI process otherwise pays
    /// one pread per page of every listing. Not for a long-lived connection beside writers:
    /// SQLite drops the whole map whenever another connection commits, and faulting it back
    /// in cost the node a fifth of its CPU while it committed a burst of small files.
    pub fn map_for_reads(&self) -> Result<(), StoreError> {
        self.conn.execute_batch(&format!("PRAGMA mmap_size = {MMAP_BYTES_MAX}")).map_err(StoreError::from)
    }

    /// Stamps and accepts stamps at most `bound` ahead of the wall clock from now on.
    pub fn set_clock_bound(&mut self, bound: crate::proto::clock::Bound) {
        self.clock_bound = bound;
    }

    /// How far ahead of the wall clock a stamp may be.
    pub fn clock_bound(&self) -> crate::proto::clock::Bound {
        self.clock_bound
    }

    /// The node this store writes as: the node id of `DATA/node.key`.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection, for reads.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Runs `f` in one write transaction and commits it with its outbox events; on error
    /// nothing of it is kept. `now_ms` stamps every version written; `ids` bounds the ids `f`
    /// may hand out (see [`Ids`]): within the lease the commit is cheap, past it durable.
    pub fn transact<T, E>(&mut self, ids: Ids, now_ms: i64, f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let counters = match self.counters {
            Some(c) => c,
            None => Counters::read(&self.conn)?,
        };
        let durable = !counters.covers(ids);
        if durable {
            // SQLite refuses to change this inside a transaction, so it is decided up front.
            self.conn.execute_batch("PRAGMA synchronous = FULL").map_err(StoreError::from)?;
        }
        let result = Self::run(&mut self.conn, (self.me, self.clock_bound), durable, now_ms, f);
        if durable {
            // The transaction's outcome stands whatever this says: a connection left on FULL
            // is slower, never less safe.
            if let Err(e) = self.conn.execute_batch("PRAGMA synchronous = NORMAL") {
                tracing::warn!(error = %e, "could not set synchronous back to NORMAL; commits stay durable (and slower)");
            }
        }
        match result {
            Ok((out, after)) => {
                self.counters = Some(after);
                if durable {
                    self.leased = Some((after.seq_leased, after.offset_leased));
                }
                Ok(out)
            }
            Err(e) => {
                self.counters = None;
                Err(e)
            }
        }
    }

    fn run<T, E>(conn: &mut Connection, (me, bound): (NodeId, crate::proto::clock::Bound), durable: bool, now_ms: i64, f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>) -> Result<(T, Counters), E>
    where
        E: From<StoreError>,
    {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(StoreError::from)?;
        let mut tx = Tx::new(tx, me, now_ms, bound, durable).map_err(E::from)?;
        let out = f(&mut tx)?;
        let after = tx.commit()?;
        Ok((out, after))
    }

    /// Moves the id counters past the durable lease, for a writer opening the store: ids the
    /// last writer may have handed out in commits a power loss then took back are skipped.
    /// After a clean close the lease was given back and nothing is skipped.
    pub fn recover_ids(&mut self) -> Result<(), StoreError> {
        let c = Counters::read(&self.conn)?;
        if c.seq >= c.seq_leased && c.offset >= c.offset_leased {
            return Ok(());
        }
        tracing::info!(seq = c.seq, seq_leased = c.seq_leased, offset = c.offset, offset_leased = c.offset_leased, "the last writer did not close cleanly: skipping the ids it had leased");
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute("UPDATE clock SET seq = max(seq, seq_leased) WHERE id = 0", [])?;
        outbox::set_head_at_least(&tx, c.offset_leased)?;
        tx.commit()?;
        self.counters = None;
        Ok(())
    }

    /// Gives back the unused part of the lease, durably: the next writer starts right after
    /// the last id handed out. Only the lease this connection took: if another writer has
    /// renewed it since (a restarted store), it is left alone.
    fn release_ids(&mut self) -> Result<(), StoreError> {
        let Some((seq_leased, offset_leased)) = self.leased else { return Ok(()) };
        self.conn.execute_batch("PRAGMA synchronous = FULL")?;
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let head = outbox::head(&tx)?;
        tx.execute(
            "UPDATE clock SET seq_leased = seq, offset_leased = ?1 WHERE id = 0 AND seq_leased = ?2 AND offset_leased = ?3",
            [head, seq_leased, offset_leased],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The id of bucket `name`.
    pub fn bucket_id(&self, name: &str) -> Result<i64, StoreError> {
        bucket_id(&self.conn, name)
    }

    /// Every bucket's name, sorted.
    pub fn buckets(&self) -> Result<Vec<String>, StoreError> {
        let mut st = self.conn.prepare_cached("SELECT name FROM bucket ORDER BY name")?;
        let names = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(names)
    }

    /// The live branch `name` of `bucket`.
    pub fn branch(&self, bucket: &str, name: &str) -> Result<Branch, StoreError> {
        let bucket_id = self.bucket_id(bucket)?;
        branch_by_name(&self.conn, bucket_id, name)
    }

    /// Every live branch of `bucket`, sorted by name.
    pub fn branches(&self, bucket: &str) -> Result<Vec<Branch>, StoreError> {
        let bucket_id = self.bucket_id(bucket)?;
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {BRANCH_COLS} FROM branch WHERE bucket_id = ?1 AND deleted_seq IS NULL ORDER BY name"
        ))?;
        let rows = st.query_map([bucket_id], branch_from_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// A branch by id, live or deleted.
    pub fn branch_by_id(&self, id: i64) -> Result<Branch, StoreError> {
        branch_by_id(&self.conn, id)
    }
}

impl Drop for TreeStore {
    fn drop(&mut self) {
        if self.leased.is_some() {
            if let Err(e) = self.release_ids() {
                tracing::warn!(error = %e, "could not give back the id lease; the next writer skips it");
            }
        }
    }
}

pub(crate) const BRANCH_COLS: &str = "id, bucket_id, name, parent_id, fork_seq, depth, created_ms, fork_key, uid";

pub(crate) fn branch_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Branch> {
    Ok(Branch {
        id: r.get(0)?,
        bucket_id: r.get(1)?,
        name: r.get(2)?,
        parent_id: r.get(3)?,
        fork_seq: r.get(4)?,
        depth: r.get(5)?,
        created_ms: r.get(6)?,
        fork_key: match r.get_ref(7)?.as_blob_or_null()? {
            None => None,
            Some(b) => Some(OrderKey::from_bytes(b).ok_or_else(|| bad_blob(7, "fork_key"))?),
        },
        uid: Uid::from_bytes(r.get_ref(8)?.as_blob()?).ok_or_else(|| bad_blob(8, "uid"))?,
    })
}

fn bad_blob(i: usize, name: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(i, name.into(), rusqlite::types::Type::Blob)
}

/// The node id the store at `conn` writes as (recorded by the upgrade to schema 3).
fn self_node(conn: &Connection) -> Result<NodeId, StoreError> {
    let bytes: Option<Vec<u8>> = conn.query_row("SELECT self_node FROM clock WHERE id = 0", [], |r| r.get(0))?;
    bytes
        .and_then(|b| b.try_into().ok())
        .map(NodeId)
        .ok_or_else(|| StoreError::Invalid("the path-tree database names no node id (clock.self_node): the database is inconsistent".into()))
}

/// The id of bucket `name`.
pub fn bucket_id(conn: &Connection, name: &str) -> Result<i64, StoreError> {
    conn.prepare_cached("SELECT id FROM bucket WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::NoBucket(name.to_string()))
}

/// The live branch `name` of a bucket.
pub fn branch_by_name(conn: &Connection, bucket_id: i64, name: &str) -> Result<Branch, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {BRANCH_COLS} FROM branch WHERE bucket_id = ?1 AND name = ?2 AND deleted_seq IS NULL"
    ))?
    .query_row(rusqlite::params![bucket_id, name], branch_from_row)
    .optional()?
    .ok_or_else(|| StoreError::NoBranch(name.to_string()))
}

/// A branch by id, live or deleted.
pub fn branch_by_id(conn: &Connection, id: i64) -> Result<Branch, StoreError> {
    conn.prepare_cached(&format!("SELECT {BRANCH_COLS} FROM branch WHERE id = ?1"))?
        .query_row([id], branch_from_row)
        .optional()?
        .ok_or_else(|| StoreError::Invalid(format!("branch id {id} is missing: the database is inconsistent")))
}

/// Decodes the entry columns (kind, hash, size, mode, mtime_ms) of a version row.
pub(crate) fn entry_from_cols(
    kind: Option<&str>,
    hash: Option<&[u8]>,
    size: i64,
    mode: i64,
    mtime_ms: i64,
) -> rusqlite::Result<Option<Entry>> {
    let Some(kind) = kind else { return Ok(None) };
    let bad = |what: &str| rusqlite::Error::InvalidColumnType(0, what.to_string(), rusqlite::types::Type::Blob);
    let kind = EntryKind::from_code(kind).ok_or_else(|| bad("kind"))?;
    let hash: [u8; 32] = hash.ok_or_else(|| bad("hash"))?.try_into().map_err(|_| bad("hash"))?;
    Ok(Some(Entry { kind, hash: ContentHash(hash), size: size as u64, mode: mode as u32, mtime_ms }))
}
