//! The engine: one data directory and the operations on it.
//!
//! Layout of a data dir:
//!
//! ```text
//! DATA/lock        held (flock) by the one process that writes; holds its pid
//! DATA/tree.db     the path tree, history, outbox (SQLite, WAL)
//! DATA/content/    file blobs by hash (content/<hh>/<hash>) and staging/
//! DATA/blobs/      the iroh-blobs store indexing the blobs for peers
//! ```
//!
//! Writers take the lock; readers (ls, get, log, watch, …) do not need it: SQLite's WAL gives
//! them a consistent snapshot and blob files never change once written.
//!
//! - [`import`]: local files and trees into commit batches (shared with the node);
//! - [`maintenance`]: scrubbing, indexing and collecting the blobs;
//! - [`replica`]: bucket identities, and versions to and from peers;
//! - [`mesh`]: the replicated documents of shared buckets, membership, invitations.

pub mod acked;
pub mod compaction;
pub mod doc_cache;
pub mod import;
pub mod maintenance;
pub mod mesh;
pub mod replica;

pub use import::{commit_items, file_entry, import_tree, mtime_ms};
pub use maintenance::BlobReport;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::content::{ContentError, ContentStore, Imported};
use crate::proto::clock::Clock;
use crate::proto::entry::{ContentHash, Entry, EntryKind};
use crate::proto::ids::{OrderKey, VersionRef};
use crate::proto::path::TreePath;
use crate::session::WriteSession;
use crate::store::merge::{ConflictRow, MergeReport};
use crate::store::read::{self, View};
use crate::store::{Branch, Ids, StoreError, TreeStore, VersionRow, TREE_DB_FILE};

/// The default bucket `init` creates.
pub const DEFAULT_BUCKET: &str = "default";
/// Default mode of files from stdin.
pub const FILE_MODE_DEFAULT: u32 = 0o644;

/// Errors of the engine: the store's, the content store's, and the data dir's own.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// From the path tree.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// From the content store.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// No store in this data dir yet.
    #[error("no alknet-fs store at {0}: run `alkfs --data {0} init` first (or pass the right --data)")]
    NotInitialised(PathBuf),
    /// Another process holds the write lock.
    #[error("the data dir {dir} is in use by another alkfs process{pid}: wait for it to finish, or stop the node")]
    Locked {
        /// The data dir.
        dir: PathBuf,
        /// " (pid N)" when known.
        pid: String,
    },
    /// Names in a tree to import that cannot be stored; nothing was imported.
    #[error("{src}: {count} names cannot be stored, so nothing was imported: {shown}. Rename them and retry")]
    BadNames {
        /// The tree.
        src: PathBuf,
        /// How many names.
        count: usize,
        /// The first few, with why.
        shown: String,
    },
    /// A local file the user named could not be used.
    #[error("{path}: {source}")]
    Local {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl EngineError {
    pub(crate) fn local(path: &Path, source: io::Error) -> Self {
        EngineError::Local { path: path.to_path_buf(), source }
    }
}

/// Result of engine operations.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Which bucket and branch an operation acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// The bucket (tenant).
    pub bucket: String,
    /// The branch within it.
    pub branch: String,
    /// Time travel: reads see the branch as it was at this point of its history (versions
    /// ordered at or before it); `None` is now. Writes refuse a scope in the past.
    pub at: Option<crate::proto::ids::OrderKey>,
}

impl Scope {
    /// A scope.
    pub fn new(bucket: &str, branch: &str) -> Self {
        Scope { bucket: bucket.to_string(), branch: branch.to_string(), at: None }
    }

    /// This scope as it was at `key` (see [`Scope::at`]).
    pub fn at(mut self, key: Option<crate::proto::ids::OrderKey>) -> Self {
        self.at = key;
        self
    }
}

/// Whether the engine may write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Takes the data dir's lock; may write.
    Write,
    /// No lock; reads only.
    Read,
}

/// Milliseconds since the Unix epoch, now, by the system clock.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The system's wall clock: what production stamps versions with.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// The clock of an engine that was given none.
pub fn system_clock() -> std::sync::Arc<dyn Clock> {
    std::sync::Arc::new(SystemClock)
}

/// The data dir's write lock (an `flock` on `DATA/lock`), held while this value lives.
/// The node holds one for its whole life and opens its engines under it.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of `dir`, or says which process holds it.
    pub fn take(dir: &Path) -> Result<Self> {
        Ok(DirLock { _file: take_lock(dir)? })
    }
}

/// One entry of a commit: a path, its entry, and the blob the entry names.
pub type CommitItem = (TreePath, Entry, Imported);

/// An attribute change to commit along with [`CommitItem`]s: a path, its new mode and/or
/// mtime (a mount's chmod or utimes of a directory, queued with closed files).
pub type AttrItem = (TreePath, Option<u32>, Option<i64>);

/// An open data directory.
pub struct Engine {
    dir: PathBuf,
    tree: TreeStore,
    content: ContentStore,
    clock: std::sync::Arc<dyn Clock>,
    _lock: Option<std::sync::Arc<DirLock>>,
}

impl Engine {
    /// Creates a store in `dir` (and `dir` itself) with the bucket `default` and its `main`
    /// branch. Returns false when one was there already (nothing is changed then).
    pub fn init(dir: &Path) -> Result<bool> {
        // A complete store needs no lock to be recognised (so this works while a node runs);
        // one an interrupted init left without its bucket is finished below, under the lock.
        if Self::check_initialised(dir).is_ok() && !TreeStore::open(&dir.join(TREE_DB_FILE), false)?.buckets()?.is_empty() {
            return Ok(false);
        }
        fs::create_dir_all(dir).map_err(|e| EngineError::local(dir, e))?;
        let lock = take_lock(dir)?;
        let db = dir.join(TREE_DB_FILE);
        let fresh = !db.exists();
        let mut tree = TreeStore::open(&db, true)?;
        ContentStore::open(&dir.join("content"))?;
        if tree.buckets()?.is_empty() {
            tree.transact(Ids::AtMost(1), now_ms(), |tx| tx.create_bucket(DEFAULT_BUCKET).map(|_| ()))?;
        }
        drop(tree); // gives its id lease back while the lock is still held
        drop(lock);
        Ok(fresh)
    }

    /// Opens the store in `dir`. With [`Access::Write`] it takes the lock and clears staging
    /// files an interrupted writer left.
    pub fn open(dir: &Path, access: Access) -> Result<Self> {
        Self::check_initialised(dir)?;
        match access {
            Access::Write => {
                let lock = std::sync::Arc::new(DirLock::take(dir)?);
                let content = ContentStore::open(&dir.join("content"))?;
                Self::clear_staging(&content)?;
                Self::open_under(dir, lock, content)
            }
            Access::Read => {
                let tree = TreeStore::open(&dir.join(TREE_DB_FILE), false)?;
                tree.map_for_reads()?;
                let content = ContentStore::open(&dir.join("content"))?;
                Ok(Engine { dir: dir.to_path_buf(), tree, content, clock: system_clock(), _lock: None })
            }
        }
    }

    /// Opens a writing engine under a lock the caller holds, sharing `content` (and so its
    /// holds) with the caller's other users of it. Clears nothing: staging files may belong to
    /// the caller's writes in flight.
    pub fn open_under(dir: &Path, lock: std::sync::Arc<DirLock>, content: ContentStore) -> Result<Self> {
        Self::check_initialised(dir)?;
        let mut tree = TreeStore::open(&dir.join(TREE_DB_FILE), false)?;
        tree.recover_ids()?;
        Ok(Engine { dir: dir.to_path_buf(), tree, content, clock: system_clock(), _lock: Some(lock) })
    }

    /// This engine with its time taken from `clock` (tests set it; the system clock by default).
    pub fn with_clock(mut self, clock: std::sync::Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// This engine stamping, and accepting peers' stamps, at most `bound` ahead of its clock.
    pub fn with_clock_bound(mut self, bound: crate::proto::clock::Bound) -> Self {
        self.tree.set_clock_bound(bound);
        self
    }

    /// Now, by this engine's clock: what new versions are stamped with.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Fails with [`EngineError::NotInitialised`] unless `dir` holds a store.
    pub fn check_initialised(dir: &Path) -> Result<()> {
        if !dir.join(TREE_DB_FILE).exists() {
            return Err(EngineError::NotInitialised(dir.to_path_buf()));
        }
        Ok(())
    }

    /// Removes staging files left by an interrupted writer; call only under the lock, before
    /// any write of this process starts.
    pub fn clear_staging(content: &ContentStore) -> Result<()> {
        let n = content.clear_staging()?;
        if n > 0 {
            tracing::info!(files = n, "removed staging files left by an interrupted write");
        }
        Ok(())
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path tree.
    pub fn tree(&self) -> &TreeStore {
        &self.tree
    }

    /// The path tree, for writes.
    pub fn tree_mut(&mut self) -> &mut TreeStore {
        &mut self.tree
    }

    /// The content store.
    pub fn content(&self) -> &ContentStore {
        &self.content
    }

    /// The branch a scope names.
    pub fn branch(&self, scope: &Scope) -> Result<Branch> {
        Ok(self.tree.branch(&scope.bucket, &scope.branch)?)
    }

    fn head(&self, scope: &Scope) -> Result<(Branch, View)> {
        let branch = self.branch(scope)?;
        let view = View::within(self.tree.conn(), &branch, i64::MAX, scope.at.unwrap_or(OrderKey::MAX))?;
        Ok((branch, view))
    }

    /// What reads of `scope` see: its branch now, or as it was at `scope.at`. The view of a
    /// branch does not change while the branch lives, so a long-lived reader (a mount)
    /// keeps it and reads through [`crate::store::read`] directly.
    pub fn view(&self, scope: &Scope) -> Result<View> {
        Ok(self.head(scope)?.1)
    }

    /// Where `version` of the bucket of `scope` falls in the order of versions: the point a
    /// time-travelling read of "just after that version was written" is bounded by.
    pub fn key_of_version(&self, version: &VersionRef) -> Result<OrderKey> {
        let rows = read::by_version(self.tree.conn(), version, &self.tree.me())?;
        match rows.as_slice() {
            [row] => Ok(row.key),
            [] => Err(StoreError::NotFound(format!("no version {version} here (see `alkfs log PATH`)")).into()),
            _ => Err(StoreError::Invalid(format!("several versions match {version}: give more digits of the node id (see `alkfs log PATH`)")).into()),
        }
    }

    // ---- writes ----

    /// Opens a write session on `path`. With `truncate` it starts empty; otherwise it starts
    /// with the current bytes of the file (if any).
    pub fn open_session(&self, scope: &Scope, path: &TreePath, truncate: bool) -> Result<WriteSession> {
        self.open_session_in(scope, path, truncate, None)
    }

    /// [`open_session`](Self::open_session) with the staging file in `staging_dir` (a
    /// mount's, which hands the file to the node at close) instead of the store's own.
    pub fn open_session_in(&self, scope: &Scope, path: &TreePath, truncate: bool, staging_dir: Option<&Path>) -> Result<WriteSession> {
        let (_, view) = self.head(scope)?;
        let current = read::live(self.tree.conn(), &view, path)?.and_then(|r| r.version.entry);
        if current.as_ref().is_some_and(|e| e.kind == EntryKind::Dir) {
            return Err(StoreError::IsADirectory(path.to_string()).into());
        }
        self.session_of(path, current.as_ref().filter(|_| !truncate), current.as_ref().map(|e| e.mode).unwrap_or(FILE_MODE_DEFAULT), staging_dir)
    }

    /// A write session of `path` holding the bytes of `entry` (empty without one), with
    /// permission bits `mode`, staged in `staging_dir` (else the store's own).
    pub fn session_of(&self, path: &TreePath, entry: Option<&Entry>, mode: u32, staging_dir: Option<&Path>) -> Result<WriteSession> {
        let staging = match staging_dir {
            Some(dir) => self.content.stage_in(dir)?,
            None => self.content.stage()?,
        };
        let mut initial = 0;
        if let Some(e) = entry {
            let mut out = staging.file().try_clone().map_err(|e| ContentError::io("staging", e, self.content.staging_dir().as_path()))?;
            self.read_entry(e, &mut out, |_| {})?;
            initial = e.size;
        }
        Ok(WriteSession::new(path.clone(), mode, staging, initial))
    }

    /// Closes `sessions` and commits them together: every file changes, or none does.
    pub fn commit(&mut self, scope: &Scope, sessions: Vec<WriteSession>) -> Result<Vec<i64>> {
        let mut sealed = Vec::with_capacity(sessions.len());
        for s in sessions {
            sealed.push(s.seal(&self.content)?);
        }
        let now = self.now_ms();
        let items: Vec<(TreePath, Entry, Imported)> = sealed
            .into_iter()
            .map(|(path, mode, blob)| {
                let entry = Entry { kind: EntryKind::File, hash: blob.hash, size: blob.size, mode, mtime_ms: now };
                (path, entry, blob)
            })
            .collect();
        self.commit_entries(scope, &items)
    }

    /// Commits already imported blobs as entries, all in one transaction. A directory entry
    /// is created if missing (as `mkdir -p`) and its seq is 0 when it already existed.
    pub fn commit_entries(&mut self, scope: &Scope, items: &[CommitItem]) -> Result<Vec<i64>> {
        self.commit_changes(scope, items, &[])
    }

    /// Commits one imported file at its path, replacing what its writer saw when it began
    /// (`seen`): a CLI `put` that took a while replaces what the node held when it began, and
    /// a version that arrived meanwhile is kept as a concurrent one (the loser listed).
    pub fn put_seen(&mut self, scope: &Scope, item: &CommitItem, seen: &crate::store::acked::Seen) -> Result<i64> {
        let branch = self.branch(scope)?;
        let now = self.now_ms();
        Ok(self.tree.transact(Ids::AtMost(import::ids_of_path(&item.0)), now, |tx| import::put_item_seen(tx, &branch, item, seen))?)
    }

    /// [`commit_entries`](Self::commit_entries), then attribute changes `attrs`, in one
    /// transaction; the seqs of both, in that order.
    pub fn commit_changes(&mut self, scope: &Scope, items: &[CommitItem], attrs: &[AttrItem]) -> Result<Vec<i64>> {
        let branch = self.branch(scope)?;
        let now = self.now_ms();
        let ids = import::ids_of(items) + import::ids_of_attrs(attrs);
        let seqs = self.tree.transact(Ids::AtMost(ids), now, |tx| import::commit_changes(tx, &branch, items, attrs))?;
        Ok(seqs)
    }

    /// Imports the local file `src` to `dest`, keeping its mode and mtime.
    pub fn put_file(&mut self, scope: &Scope, src: &Path, dest: &TreePath, progress: impl FnMut(u64)) -> Result<i64> {
        self.branch(scope)?; // fail on a bad scope before copying anything
        let meta = fs::metadata(src).map_err(|e| EngineError::local(src, e))?;
        if !meta.is_file() {
            return Err(EngineError::local(src, io::Error::other("not a regular file (use -r for a directory)")));
        }
        let blob = self.content.import_file(src, progress)?;
        let entry = file_entry(&blob, meta.mode() & 0o7777, mtime_ms(&meta));
        Ok(self.commit_entries(scope, &[(dest.clone(), entry, blob)])?[0])
    }

    /// Imports everything `reader` yields to `dest`.
    pub fn put_reader(&mut self, scope: &Scope, reader: impl Read, dest: &TreePath, progress: impl FnMut(u64)) -> Result<i64> {
        self.branch(scope)?;
        let blob = self.content.import_reader(reader, progress)?;
        let entry = file_entry(&blob, FILE_MODE_DEFAULT, self.now_ms());
        Ok(self.commit_entries(scope, &[(dest.clone(), entry, blob)])?[0])
    }

    /// Imports the local directory tree `src` to `dest`: files, directories and symlinks;
    /// commits in batches of [`COMMIT_ENTRIES_MAX`](crate::proto::limits::COMMIT_ENTRIES_MAX). Returns how many entries it wrote.
    pub fn put_tree(&mut self, scope: &Scope, src: &Path, dest: &TreePath, mut progress: impl FnMut(u64)) -> Result<u64> {
        self.branch(scope)?;
        let content = self.content.clone();
        let mut done = 0u64;
        import_tree(&content, src, dest, |batch| {
            self.commit_entries(scope, &batch)?;
            done += batch.len() as u64;
            progress(done);
            Ok(())
        })
    }

    /// Creates a directory.
    pub fn mkdir(&mut self, scope: &Scope, path: &TreePath, parents: bool) -> Result<()> {
        self.mkdir_mode(scope, path, parents, crate::store::tx::DIR_MODE_DEFAULT)
    }

    /// [`mkdir`](Self::mkdir) with permission bits `mode` (a mount's mkdir(2)), in the same
    /// transaction.
    pub fn mkdir_mode(&mut self, scope: &Scope, path: &TreePath, parents: bool, mode: u32) -> Result<()> {
        let branch = self.branch(scope)?;
        let (ids, now) = (Ids::AtMost(import::ids_of_path(path)), self.now_ms());
        self.tree.transact(ids, now, |tx| tx.mkdir(&branch, path, parents, mode & 0o7777))?;
        Ok(())
    }

    /// Removes a path (recursively for directories when asked). Returns how many paths.
    pub fn remove(&mut self, scope: &Scope, path: &TreePath, recursive: bool) -> Result<usize> {
        let branch = self.branch(scope)?;
        let now = self.now_ms();
        Ok(self.tree.transact(Ids::Unbounded, now, |tx| tx.remove(&branch, path, recursive))?)
    }

    /// Renames `from` to `to`; when `to` is an existing directory (the root included), moves
    /// `from` into it, as `mv` does.
    pub fn rename(&mut self, scope: &Scope, from: &TreePath, to: &TreePath) -> Result<TreePath> {
        let (branch, view) = self.head(scope)?;
        let mut target = to.clone();
        let into_dir = to.is_root() || read::live(self.tree.conn(), &view, to)?.is_some_and(|row| row.entry().is_some_and(|e| e.kind == EntryKind::Dir));
        if into_dir && !from.is_root() {
            target = to.join(from.name()).map_err(StoreError::from)?;
        }
        let now = self.now_ms();
        self.tree.transact(Ids::Unbounded, now, |tx| tx.rename(&branch, from, &target))?;
        Ok(target)
    }

    /// Moves `from` to exactly `to`, replacing a file or an empty directory there (rename(2);
    /// [`rename`](Self::rename) is `mv`'s "into a directory"); with `noreplace`
    /// (RENAME_NOREPLACE), refused when anything is at `to`.
    pub fn move_over(&mut self, scope: &Scope, from: &TreePath, to: &TreePath, noreplace: bool) -> Result<()> {
        let branch = self.branch(scope)?;
        let now = self.now_ms();
        self.tree.transact(Ids::Unbounded, now, |tx| tx.move_over(&branch, from, to, noreplace))?;
        Ok(())
    }

    /// Sets the mode and/or mtime of `path`, keeping its bytes.
    pub fn set_attr(&mut self, scope: &Scope, path: &TreePath, mode: Option<u32>, mtime_ms: Option<i64>) -> Result<i64> {
        let branch = self.branch(scope)?;
        let (ids, now) = (Ids::AtMost(import::ids_of_path(path)), self.now_ms());
        Ok(self.tree.transact(ids, now, |tx| tx.set_attr(&branch, path, mode, mtime_ms))?)
    }

    /// Makes `version` of `path` its head again.
    pub fn restore(&mut self, scope: &Scope, path: &TreePath, version: &VersionRef) -> Result<i64> {
        let branch = self.branch(scope)?;
        let (ids, now) = (Ids::AtMost(import::ids_of_path(path)), self.now_ms());
        Ok(self.tree.transact(ids, now, |tx| tx.restore(&branch, path, version))?)
    }

    /// Creates bucket `name`.
    pub fn create_bucket(&mut self, name: &str) -> Result<()> {
        let now = self.now_ms();
        self.tree.transact(Ids::AtMost(1), now, |tx| tx.create_bucket(name).map(|_| ()))?;
        Ok(())
    }

    /// Creates branch `name` in `scope`'s bucket, forked from `from` (default: scope's branch).
    pub fn create_branch(&mut self, scope: &Scope, name: &str, from: Option<&str>) -> Result<Branch> {
        let from = self.tree.branch(&scope.bucket, from.unwrap_or(&scope.branch))?;
        let now = self.now_ms();
        Ok(self.tree.transact(Ids::AtMost(1), now, |tx| tx.create_branch(&scope.bucket, &from, name))?)
    }

    /// Deletes branch `name` of `scope`'s bucket.
    pub fn delete_branch(&mut self, scope: &Scope, name: &str) -> Result<()> {
        let now = self.now_ms();
        Ok(self.tree.transact(Ids::AtMost(1), now, |tx| tx.delete_branch(&scope.bucket, name))?)
    }

    /// Merges branch `from` into `into` (default: scope's branch).
    pub fn merge(&mut self, scope: &Scope, from: &str, into: Option<&str>) -> Result<MergeReport> {
        let from = self.tree.branch(&scope.bucket, from)?;
        let into = self.tree.branch(&scope.bucket, into.unwrap_or(&scope.branch))?;
        let now = self.now_ms();
        Ok(self.tree.transact(Ids::Unbounded, now, |tx| tx.merge(&from, &into))?)
    }

    /// Takes the conflict at `path` (all of them when `None`) off the branch's list; their
    /// versions then fall under ordinary retention. Returns how many were dismissed.
    pub fn dismiss_conflicts(&mut self, scope: &Scope, path: Option<&TreePath>) -> Result<usize> {
        let branch = self.branch(scope)?;
        let now = self.now_ms();
        let n = self.tree.transact(Ids::AtMost(0), now, |tx| crate::store::merge::dismiss_conflicts(tx.conn(), &branch, path))?;
        if n == 0 {
            if let Some(p) = path {
                return Err(StoreError::NotFound(format!("{p}: no conflict listed on branch {} (see `alkfs conflicts`)", branch.name)).into());
            }
        }
        Ok(n)
    }

    // ---- reads ----

    /// The live entry at `path` (the root is a directory).
    pub fn stat(&self, scope: &Scope, path: &TreePath) -> Result<Option<VersionRow>> {
        let (_, view) = self.head(scope)?;
        Ok(read::live(self.tree.conn(), &view, path)?)
    }

    /// Lists `path`: a directory's children, or the entry itself for a file.
    pub fn list(&self, scope: &Scope, path: &TreePath) -> Result<Vec<VersionRow>> {
        let (_, view) = self.head(scope)?;
        if !path.is_root() {
            let row = read::live(self.tree.conn(), &view, path)?.ok_or_else(|| StoreError::NotFound(path.to_string()))?;
            if row.entry().is_some_and(|e| e.kind != EntryKind::Dir) {
                return Ok(vec![row]);
            }
        }
        Ok(read::list(self.tree.conn(), &view, path)?)
    }

    /// What [`Engine::list`] lists, as names and kinds only: what a plain `ls` prints.
    pub fn list_names(&self, scope: &Scope, path: &TreePath) -> Result<Vec<(String, EntryKind)>> {
        let (_, view) = self.head(scope)?;
        if !path.is_root() {
            let row = read::live(self.tree.conn(), &view, path)?.ok_or_else(|| StoreError::NotFound(path.to_string()))?;
            if let Some(e) = row.entry().filter(|e| e.kind != EntryKind::Dir) {
                return Ok(vec![(path.name().to_string(), e.kind)]);
            }
        }
        Ok(read::list_names(self.tree.conn(), &view, path)?)
    }

    /// Everything below `path` (and `path` itself unless it is the root), parents before
    /// children: what `ls -R` shows. A file lists as itself.
    pub fn walk(&self, scope: &Scope, path: &TreePath) -> Result<Vec<VersionRow>> {
        let (_, view) = self.head(scope)?;
        let mut out = Vec::new();
        if !path.is_root() {
            let row = read::live(self.tree.conn(), &view, path)?.ok_or_else(|| StoreError::NotFound(path.to_string()))?;
            let is_dir = row.entry().is_some_and(|e| e.kind == EntryKind::Dir);
            out.push(row);
            if !is_dir {
                return Ok(out);
            }
        }
        out.extend(read::subtree(self.tree.conn(), &view, path)?.into_values());
        Ok(out)
    }

    /// Every version of `path` visible from the branch, newest first.
    pub fn log(&self, scope: &Scope, path: &TreePath) -> Result<Vec<VersionRow>> {
        let (_, view) = self.head(scope)?;
        let rows = read::history(self.tree.conn(), &view, path)?;
        if rows.is_empty() {
            return Err(StoreError::NotFound(path.to_string()).into());
        }
        Ok(rows)
    }

    /// Conflicts recorded on the branch.
    pub fn conflicts(&self, scope: &Scope) -> Result<Vec<ConflictRow>> {
        let branch = self.branch(scope)?;
        Ok(crate::store::merge::conflicts(self.tree.conn(), &branch)?)
    }

    /// The file entry at `path`, or a clear error for a missing path or a directory.
    pub fn file_entry(&self, scope: &Scope, path: &TreePath) -> Result<Entry> {
        let row = self.stat(scope, path)?.ok_or_else(|| StoreError::NotFound(path.to_string()))?;
        let entry = row.version.entry.expect("live rows have entries");
        if entry.kind == EntryKind::Dir {
            return Err(StoreError::IsADirectory(path.to_string()).into());
        }
        Ok(entry)
    }

    /// Writes the bytes of `entry` to `out`, verifying them against its hash.
    pub fn read_entry(&self, entry: &Entry, out: &mut impl Write, progress: impl FnMut(u64)) -> Result<u64> {
        if let Some(data) = self.inline_bytes(&entry.hash)? {
            out.write_all(&data).map_err(|e| ContentError::Io { context: "write output".into(), source: e })?;
            return Ok(data.len() as u64);
        }
        Ok(self.content.read_to(&entry.hash, out, progress)?)
    }

    /// Whether the bytes of `hash` are here; `false` for a blob a replicated version names
    /// whose bytes are still on a peer (pending: the node fetches them).
    pub fn has_bytes(&self, hash: &ContentHash) -> Result<bool> {
        if *hash == ContentHash::EMPTY {
            return Ok(true);
        }
        let present: Option<i64> = rusqlite::OptionalExtension::optional(self.tree.conn().query_row(
            "SELECT present FROM blob WHERE hash = ?1",
            [hash.0.to_vec()],
            |r| r.get(0),
        ))
        .map_err(StoreError::from)?;
        Ok(present != Some(0))
    }

    /// The bytes of an inline blob, verified; `None` for a file blob.
    fn inline_bytes(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>> {
        if *hash == ContentHash::EMPTY {
            return Ok(Some(Vec::new()));
        }
        let Some(data) = read::inline_blob(self.tree.conn(), hash)? else { return Ok(None) };
        crate::content::check(hash, blake3::hash(&data))?;
        Ok(Some(data))
    }

    /// Copies the file at `path` to the local file `dest`: written to a temporary file beside
    /// it and renamed only once its hash checked out, so `dest` is never half-written.
    pub fn export(&self, scope: &Scope, path: &TreePath, dest: &Path, progress: impl FnMut(u64)) -> Result<u64> {
        let entry = self.file_entry(scope, path)?;
        let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new().prefix(".alkfs-get-").tempfile_in(dir).map_err(|e| EngineError::local(dest, e))?;
        let n = match self.inline_bytes(&entry.hash)? {
            Some(data) => {
                tmp.as_file().write_all(&data).map_err(|e| EngineError::local(dest, e))?;
                data.len() as u64
            }
            None => self.content.export_file(&entry.hash, tmp.as_file(), progress)?,
        };
        let perms = fs::Permissions::from_mode(entry.mode & 0o7777);
        tmp.as_file().set_permissions(perms).map_err(|e| EngineError::local(dest, e))?;
        tmp.persist(dest).map_err(|e| EngineError::local(dest, e.error))?;
        Ok(n)
    }
}

/// Takes the data dir's write lock, or says who holds it.
fn take_lock(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| EngineError::local(&path, e))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0).and_then(|_| file.write_all(std::process::id().to_string().as_bytes())).map_err(|e| EngineError::local(&path, e))?;
            Ok(file)
        }
        Err(fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            Err(EngineError::Locked { dir: dir.to_path_buf(), pid: if pid.is_empty() { String::new() } else { format!(" (pid {pid})") } })
        }
        Err(fs::TryLockError::Error(e)) => Err(EngineError::local(&path, e)),
    }
}
