//! The one filesystem layer under every mount front-end (FUSE, SFTP): inode numbers and open
//! handles mapped to the path tree, with plain methods that return an [`Errno`].
//!
//! - **Reads** need no node: a read-only [`Engine`] on the data dir (SQLite's WAL gives each
//!   query the latest commit; blob files never change). A read handle pins the version that
//!   was current when it opened, so a reader keeps seeing those bytes whatever is written
//!   meanwhile. Sequential reads of a file blob are checked against its BLAKE3 hash on the
//!   way; the last read of a file whose bytes do not match fails with `EIO`.
//! - **Writes** are write sessions: the first open for writing of a file stages its bytes in
//!   a private file (`content/staging/mount-<pid>/`); other readers see the committed
//!   version until the last writer closes (merge on close), when the node takes the staging
//!   file over and commits it in one transaction ([`Request::PutStaged`]). A write session
//!   that never closes (the mount killed) leaves the old version intact.
//! - Everything else (mkdir, unlink, rename, chmod, symlink) is one request to the node,
//!   after checks here that give the errno rename(2), unlink(2) … promise.
//!
//! State sits behind one mutex: operations are short, and the FUSE loop and each SFTP
//! session call in from their own threads.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use alknet_actors::content::{check, ContentError};
use alknet_actors::engine::{Access, Engine, EngineError, Scope};
use alknet_actors::proto::entry::{ContentHash, Entry, EntryKind};
use alknet_actors::proto::limits::SYMLINK_TARGET_BYTES_MAX;
use alknet_actors::proto::path::{PathError, TreePath};
use alknet_actors::proto::ids::VersionId;
use alknet_actors::store::acked::Seen;
use alknet_actors::store::read::{self, View};
use alknet_actors::store::StoreError;

use super::commits::ClosedBytes;
use super::fresh::FreshDirs;
use super::staged::{Payload, Spill, Staged};
use crate::control::client::Client;
use crate::control::{Request, WireScope};

/// An error number (`libc::E*`) and, for the log, what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Errno {
    /// The number the kernel or the SFTP client is told.
    pub code: i32,
    /// For the mount's log.
    pub message: String,
}

impl Errno {
    /// An error of `code` explained by `message`.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Errno { code, message: message.into() }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (errno {})", self.message, self.code)
    }
}

impl From<PathError> for Errno {
    fn from(e: PathError) -> Self {
        let code = match e {
            PathError::NameTooLong(_) | PathError::TooLong(_) => libc::ENAMETOOLONG,
            _ => libc::EINVAL,
        };
        Errno::new(code, e.to_string())
    }
}

impl From<StoreError> for Errno {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::Path(p) => return p.clone().into(),
            StoreError::NotFound(_) | StoreError::NoBucket(_) | StoreError::NoBranch(_) => libc::ENOENT,
            StoreError::Exists(_) => libc::EEXIST,
            StoreError::NotADirectory(_) => libc::ENOTDIR,
            StoreError::IsADirectory(_) => libc::EISDIR,
            StoreError::DirectoryNotEmpty(_) => libc::ENOTEMPTY,
            StoreError::Invalid(_) => libc::EINVAL,
            StoreError::DiskFull => libc::ENOSPC,
            StoreError::ReadOnly(_) => libc::EROFS,
            _ => libc::EIO,
        };
        Errno::new(code, e.to_string())
    }
}

impl From<ContentError> for Errno {
    fn from(e: ContentError) -> Self {
        let code = match &e {
            ContentError::DiskFull(_) => libc::ENOSPC,
            ContentError::Io { source, .. } if source.kind() == std::io::ErrorKind::FileTooLarge => libc::EFBIG,
            ContentError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => libc::ENOSPC,
            _ => libc::EIO,
        };
        Errno::new(code, e.to_string())
    }
}

impl From<EngineError> for Errno {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Store(s) => s.into(),
            EngineError::Content(c) => c.into(),
            other => Errno::new(libc::EIO, other.to_string()),
        }
    }
}

/// What this layer answers.
pub type FsResult<T> = Result<T, Errno>;

fn errno(code: i32, message: impl Into<String>) -> Errno {
    Errno::new(code, message)
}

/// The root's inode number (FUSE's).
pub const ROOT_INO: u64 = 1;
/// Mode of the root directory and of directories made without one.
const DIR_MODE: u32 = 0o755;

/// What a path shows: its inode number, kind, size, permission bits and mtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number (stable while this mount knows the path).
    pub ino: u64,
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Bytes (a file's, a symlink target's); 0 for a directory.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, ms since the epoch.
    pub mtime_ms: i64,
    /// Change time, ms since the epoch: when its version was written (0: as `mtime_ms`).
    pub ctime_ms: i64,
    /// Access time set explicitly through this mount (`None`: as `mtime_ms`; reads do not
    /// move it, as with `noatime`).
    pub atime_ms: Option<i64>,
    /// Still at a path (false: unlinked while open, `nlink` 0).
    pub linked: bool,
}

impl Attr {
    /// An entry's attributes with no change or access time of their own (both show the
    /// mtime until [`MountFs`] adds what it knows).
    pub fn plain(ino: u64, kind: EntryKind, size: u64, mode: u32, mtime_ms: i64) -> Attr {
        Attr { ino, kind, size, mode, mtime_ms, ctime_ms: 0, atime_ms: None, linked: true }
    }
}

/// What this mount did to an inode that its tree entry does not say.
#[derive(Clone, Copy, Debug, Default)]
struct Times {
    /// When this mount last changed it (its data, mode, times or name).
    changed_ms: i64,
    /// An access time set explicitly (utimensat, touch -a).
    atime_ms: Option<i64>,
}

/// Which way a handle was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenMode {
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed (a write session).
    pub write: bool,
    /// Start empty (O_TRUNC).
    pub truncate: bool,
    /// Writes go to the end (O_APPEND).
    pub append: bool,
    /// The thread that opened it (FUSE's caller; 0 for SFTP). A close by a thread of the
    /// same process commits; a close by another process holding the same open file (a
    /// child after fork, closing what it inherited at exec) does not: the last release does.
    pub owner: u32,
}

/// Where a read handle's bytes are.
enum Bytes {
    /// Small content, read and checked at open.
    Inline(Arc<Vec<u8>>),
    /// A blob file, checked as it is read in order.
    File { file: Arc<File>, hash: ContentHash, size: u64, checked: Box<Mutex<Checked>> },
    /// A blob whose bytes are still on peers: each read fetches the range it needs (and
    /// some ahead) through the node, verified against the hash, until the whole blob is
    /// here (the node's own fetch landed it); then reads go to the local file.
    Remote { hash: ContentHash, size: u64, window: Box<Mutex<Window>> },
}

/// What a [`Bytes::Remote`] handle fetched last, and the local file once there is one.
#[derive(Default)]
struct Window {
    offset: u64,
    data: Vec<u8>,
    local: Option<Arc<Bytes>>,
}

/// How far a blob file has been read in order, and the hash of that prefix.
struct Checked {
    upto: u64,
    hasher: Option<blake3::Hasher>,
}

/// An open handle.
enum Handle {
    /// Reads of inode `ino`'s version current at open.
    Read { ino: u64, bytes: Arc<Bytes> },
    /// A writer of inode `ino`'s write session (it may read the staged bytes too); a close
    /// by `owner` commits.
    Write { ino: u64, append: bool, owner: u32 },
    /// A directory's listing taken at opendir, paged by readdir.
    Dir { entries: Arc<Vec<(String, Attr)>> },
}

/// A file's write session and who holds it.
struct Open {
    /// The staged bytes; `None` after a close (or fsync) committed them while a handle
    /// stays open: a later write starts a new session from the committed bytes.
    session: Option<Staged>,
    /// Open write handles.
    writers: usize,
    /// Something to commit (a write, a truncate, a new file).
    dirty: bool,
    /// The mtime the file will have: set by utimes while open, else the time of the last
    /// write.
    mtime_ms: i64,
    /// Unlinked while open: discarded at close.
    unlinked: bool,
    /// Not in the tree (created here, not yet committed): only this mount shows it.
    fresh: bool,
    /// Closed and waiting in the write-behind queue (see [`super::commits`]): what the
    /// mount shows of it until its batch commits.
    queued: Option<Queued>,
    /// A write or truncate failed (a full disk, a size past the limit): what is staged is
    /// not what the writer meant, so it is never committed. Later writes fail the same way,
    /// and the close reports it; the file keeps its old version.
    failed: Option<Errno>,
    /// Written to (bytes, size, mode or mtime) since the session began. A close commits
    /// only then: a shell's `> file` opens with O_TRUNC, then dup2s and closes the first
    /// descriptor before anything is written, and committing that close made an empty
    /// version before every real one. What only O_TRUNC or O_CREAT changed commits at the
    /// last release.
    written: bool,
    /// What the session's writer opened: the version its close replaces (a version that
    /// arrived meanwhile is concurrent with it, and one of the two a listed loser).
    seen: Seen,
}

impl Open {
    /// No session yet, nothing to commit; `mtime_ms`: when it was opened.
    fn new(writers: usize, fresh: bool, mtime_ms: i64) -> Self {
        Open { session: None, writers, dirty: false, mtime_ms, unlinked: false, fresh, queued: None, failed: None, written: false, seen: Seen::Opened(None) }
    }
}

/// A closed file in the write-behind queue, as the mount shows it meanwhile.
#[derive(Clone, Debug)]
struct Queued {
    ticket: u64,
    /// What its writer had opened.
    seen: Seen,
    /// Its bytes: small ones in memory, others in the staging file.
    bytes: ClosedBytes,
    size: u64,
    mode: u32,
    mtime_ms: i64,
}

/// Inode numbers of the paths this mount has shown.
#[derive(Default)]
struct Inodes {
    next: u64,
    by_ino: HashMap<u64, TreePath>,
    by_path: HashMap<TreePath, u64>,
    /// FUSE's lookup counts: an inode is forgotten when its count drops to zero.
    lookups: HashMap<u64, u64>,
    /// Inodes whose path was removed or replaced while the kernel still knew them: what
    /// they last showed (an open descriptor's fstat still answers).
    gone: HashMap<u64, Attr>,
}

impl Inodes {
    fn new() -> Self {
        let mut inodes = Inodes { next: ROOT_INO + 1, ..Default::default() };
        inodes.by_ino.insert(ROOT_INO, TreePath::root());
        inodes.by_path.insert(TreePath::root(), ROOT_INO);
        inodes
    }

    fn ino_of(&mut self, path: &TreePath) -> u64 {
        if let Some(ino) = self.by_path.get(path) {
            return *ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(ino, path.clone());
        self.by_path.insert(path.clone(), ino);
        ino
    }

    fn path(&self, ino: u64) -> FsResult<TreePath> {
        self.by_ino.get(&ino).cloned().ok_or_else(|| errno(libc::ESTALE, format!("inode {ino} is not known (removed or forgotten)")))
    }

    /// Drops inode `ino`'s number (and its path's, if the path is still its own).
    fn drop_ino(&mut self, ino: u64) {
        if let Some(path) = self.by_ino.remove(&ino) {
            if self.by_path.get(&path) == Some(&ino) {
                self.by_path.remove(&path);
            }
        }
    }

    /// `path` was removed (or replaced): its inode keeps answering `getattr` with `last`
    /// until the kernel forgets it.
    fn detach(&mut self, path: &TreePath, last: Option<Attr>) {
        if let Some(ino) = self.by_path.remove(path) {
            self.by_ino.remove(&ino);
            if let Some(a) = last {
                self.gone.insert(ino, Attr { linked: false, ..a });
            }
        }
    }

    /// Moves every path at or below `from` to below `to` (inode numbers stay).
    fn rename(&mut self, from: &TreePath, to: &TreePath, replaced: Option<Attr>) {
        self.detach(to, replaced);
        let moved: Vec<(TreePath, u64)> = self.by_path.iter().filter(|(p, _)| p.is_within(from)).map(|(p, i)| (p.clone(), *i)).collect();
        for (old, _) in &moved {
            self.by_path.remove(old);
        }
        for (old, ino) in moved {
            match old.rebase(from, to) {
                Ok(new) => {
                    if let Some(displaced) = self.by_path.insert(new.clone(), ino) {
                        self.by_ino.remove(&displaced);
                    }
                    self.by_ino.insert(ino, new);
                }
                Err(_) => {
                    self.by_ino.remove(&ino);
                }
            }
        }
    }
}

struct State {
    inodes: Inodes,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Write sessions by inode.
    open: HashMap<u64, Open>,
    /// Queued closes in ticket order, to forget them once committed.
    queued: std::collections::VecDeque<(u64, u64)>,
    /// Directories' mode/mtime changes in the write-behind queue, as the mount shows them
    /// until they commit: what each becomes (None: unchanged) and the ticket that commits it.
    dir_attrs: HashMap<TreePath, QueuedDirAttr>,
    /// Directories made here whose mkdir waits in the write-behind queue: shown from here
    /// until it commits.
    queued_dirs: HashMap<TreePath, QueuedDir>,
    /// Paths this mount changed, by when, whose outbox events are still to come: the kernel
    /// saw those changes happen, so [`super::invalidate`] need not invalidate them.
    own_changes: HashMap<TreePath, std::time::Instant>,
    /// Directories made here and the names made in them ([`FreshDirs`]); None unless an
    /// outbox follower tells this layer of changes from elsewhere ([`MountFs::follow`]).
    fresh: Option<FreshDirs>,
    /// Change and access times of inodes this mount changed (forgotten with the inode).
    times: HashMap<u64, Times>,
}

/// A directory made here, waiting in the queue (see [`State::queued_dirs`]).
#[derive(Clone, Copy, Debug)]
struct QueuedDir {
    ticket: u64,
    mode: u32,
    mtime_ms: i64,
}

/// A directory's queued mode/mtime change (see [`State::dir_attrs`]).
#[derive(Clone, Copy, Debug)]
struct QueuedDirAttr {
    ticket: u64,
    mode: Option<u32>,
    mtime_ms: Option<i64>,
}

/// A mounted branch: the layer FUSE and SFTP call.
pub struct MountFs {
    dir: PathBuf,
    scope: Scope,
    read_only: bool,
    reader: Mutex<Engine>,
    /// The branch (and its ancestors) as every read sees it: now, or at `scope.at`.
    view: View,
    node: Option<Client>,
    staging_dir: PathBuf,
    /// Where sessions that outgrow memory go.
    spill: Spill,
    state: Mutex<State>,
    /// Held by every change (open for writing, write, close, rename …) from start to end,
    /// so two clients of one bucket (SFTP sessions on their threads) never interleave the
    /// steps of one: a commit in flight and a new writer copying the bytes it replaces, or
    /// two first opens of a new file. Reads do not take it.
    changes: Mutex<()>,
    /// The write-behind queue of closed files (none for a read-only mount).
    committer: Option<super::commits::Committer>,
    /// Something was sent to the node since [`sync`](Self::sync) last synced its log.
    unsynced: std::sync::atomic::AtomicBool,
    /// The lock on the staging directory, held while the mount runs: a directory whose lock
    /// nobody holds is a dead mount's, and the node adopts its journal (see
    /// [`super::journal`]).
    _staging_lock: Option<std::fs::File>,
}

impl MountFs {
    /// Opens the data dir `dir` for a mount of `scope`. A writable mount needs the running
    /// node (it holds the data dir's lock and commits); a read-only one needs none.
    pub fn open(dir: &Path, scope: Scope, read_only: bool) -> anyhow::Result<Self> {
        let reader = Engine::open(dir, Access::Read)?;
        // A clear error for a missing bucket or branch, before mounting; and the chain of
        // branches every read goes through, fixed for the branch's life.
        let view = reader.view(&scope)?;
        // The node writes all the time; a memory map of the database would be remapped at
        // every read as it grows. Plain reads through SQLite's cache are cheaper here.
        reader.tree().conn().execute_batch("PRAGMA mmap_size = 0").map_err(StoreError::from)?;
        // A read-only member of the bucket mounts it read-only: every write would be refused.
        let bucket = reader.bucket_identity(&scope.bucket)?;
        let member_read_only = alknet_actors::engine::mesh::role_of(reader.tree().conn(), bucket.id, &reader.tree().me())? == Some(alknet_actors::proto::membership::Role::ReadOnly);
        if member_read_only && !read_only {
            tracing::warn!(bucket = %scope.bucket, "this node is a read-only member of the bucket: mounted read-only (an owner can make it a writer with `alkfs members grant`)");
        }
        let read_only = read_only || scope.at.is_some() || member_read_only; // the past is read-only
        let node = if read_only {
            None
        } else {
            Some(Client::connect_with_timeout(dir, NODE_CALL_TIMEOUT).ok_or_else(|| {
                anyhow::anyhow!("no node runs on {}: start it with `alkfs --data {} node run` (or mount --read-only)", dir.display(), dir.display())
            })?)
        };
        // A writable mount journals what it acknowledges in a staging directory of its own,
        // locked while it runs; a read-only one never stages anything.
        let (staging_dir, staging_lock, committer) = match Client::connect_with_timeout(dir, COMMIT_CALL_TIMEOUT) {
            Some(c) if !read_only => {
                let (staging_dir, lock) = super::journal::make_mount_dir(&reader.content().staging_dir())
                    .map_err(|e| anyhow::anyhow!("making the mount's staging directory in {}: {e}", reader.content().staging_dir().display()))?;
                let wire = WireScope { bucket: scope.bucket.clone(), branch: scope.branch.clone() };
                let journal = super::journal::Journal::create(&staging_dir, wire.clone()).map_err(|e| anyhow::anyhow!("starting the mount's journal in {}: {e}", staging_dir.display()))?;
                let mount_id = staging_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                (staging_dir, Some(lock), Some(super::commits::Committer::start(c, wire, journal, mount_id)))
            }
            _ => (reader.content().mount_staging_dir(std::process::id()), None, None),
        };
        let spill = Spill { content: reader.content().clone(), dir: staging_dir.clone() };
        Ok(MountFs {
            dir: dir.to_path_buf(),
            scope,
            read_only,
            reader: Mutex::new(reader),
            view,
            node,
            spill,
            staging_dir,
            state: Mutex::new(State { inodes: Inodes::new(), handles: HashMap::new(), next_fh: 1, open: HashMap::new(), queued: Default::default(), dir_attrs: HashMap::new(), queued_dirs: HashMap::new(), own_changes: HashMap::new(), fresh: None, times: HashMap::new() }),
            changes: Mutex::new(()),
            committer,
            unsynced: std::sync::atomic::AtomicBool::new(false),
            _staging_lock: staging_lock,
        })
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The bucket and branch mounted.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// True for a read-only mount.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reader(&self) -> MutexGuard<'_, Engine> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changes(&self) -> MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wire(&self) -> WireScope {
        WireScope { bucket: self.scope.bucket.clone(), branch: self.scope.branch.clone() }
    }

    fn writable(&self) -> FsResult<&Client> {
        match (&self.node, self.read_only) {
            (Some(c), false) => Ok(c),
            _ => Err(errno(libc::EROFS, "the mount is read-only")),
        }
    }

    /// Sends a write to the node; its refusal becomes `EIO` with the node's words (the
    /// checks before each call give the errnos callers rely on).
    fn call(&self, req: Request) -> FsResult<crate::control::Reply> {
        let client = self.writable()?;
        self.unsynced.store(true, std::sync::atomic::Ordering::SeqCst);
        client.call(&req).map_err(|e| {
            let message = format!("{e:#}");
            let code = if message.contains("disk") && message.contains("full") { libc::ENOSPC } else { libc::EIO };
            errno(code, message)
        })
    }

    // ---- paths and attributes ----

    /// The path of inode `ino`.
    pub fn path_of(&self, ino: u64) -> FsResult<TreePath> {
        self.state().inodes.path(ino)
    }

    /// The child `name` of the directory at `parent`, checked as a name (no `/`, NUL, `.`,
    /// `..`, at most 255 bytes).
    pub fn child(parent: &TreePath, name: &std::ffi::OsStr) -> FsResult<TreePath> {
        let name = name.to_str().ok_or_else(|| errno(libc::EINVAL, "names must be UTF-8"))?;
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(errno(libc::EINVAL, format!("{name:?} cannot be a name")));
        }
        Ok(parent.join(name)?)
    }

    /// What inode `ino`'s write session shows, if it has one: `all` also for a file the
    /// tree holds (the writer's own view); otherwise only for a file created here and not
    /// yet closed, which has no other view.
    fn staged(&self, ino: u64, all: bool) -> Option<Attr> {
        let queued = self.queued(ino);
        let st = self.state();
        let open = st.open.get(&ino)?;
        if let Some(s) = open.session.as_ref().filter(|_| all || open.fresh) {
            return Some(Attr { linked: !open.unlinked, ..Attr::plain(ino, EntryKind::File, s.len(), s.mode(), open.mtime_ms) });
        }
        queued.filter(|_| !open.unlinked).map(|q| Attr::plain(ino, EntryKind::File, q.size, q.mode, q.mtime_ms))
    }

    /// Directory `path` as this mount shows it while its mkdir waits in the queue (and
    /// forgets it once committed).
    fn queued_dir(&self, path: &TreePath) -> Option<Attr> {
        let mut st = self.state();
        let q = st.queued_dirs.get(path).copied()?;
        if self.committer.as_ref().is_none_or(|c| c.is_done(q.ticket)) {
            st.queued_dirs.remove(path);
            drop(st);
            // Committed since the caller read the tree (which then did not have it): read
            // it again rather than answer that it is not there.
            let entry = self.entry(path).ok().flatten().filter(|e| e.kind == EntryKind::Dir)?;
            let mut attr = attr_of(self.state().inodes.ino_of(path), &entry);
            self.queued_dir_attr(path, &mut attr);
            return Some(attr);
        }
        let ino = st.inodes.ino_of(path);
        drop(st);
        let mut attr = Attr::plain(ino, EntryKind::Dir, 0, q.mode, q.mtime_ms);
        self.queued_dir_attr(path, &mut attr);
        Some(attr)
    }

    /// Applies directory `path`'s mode/mtime change to `attr` while it waits in the
    /// write-behind queue (and forgets it once committed).
    fn queued_dir_attr(&self, path: &TreePath, attr: &mut Attr) {
        let mut st = self.state();
        let Some(q) = st.dir_attrs.get(path).copied() else { return };
        if self.committer.as_ref().is_none_or(|c| c.is_done(q.ticket)) {
            st.dir_attrs.remove(path);
            return;
        }
        attr.mode = q.mode.unwrap_or(attr.mode);
        attr.mtime_ms = q.mtime_ms.unwrap_or(attr.mtime_ms);
    }

    /// Notes that this mount changes `path` (see [`State::own_changes`]).
    fn own_change(&self, path: &TreePath) {
        let mut st = self.state();
        if st.own_changes.len() >= OWN_CHANGES_MAX {
            st.own_changes.retain(|_, at| at.elapsed() < OWN_CHANGE_TTL);
        }
        st.own_changes.insert(path.clone(), std::time::Instant::now());
    }

    /// An outbox follower tells this layer of changes from elsewhere from now on
    /// ([`changed_elsewhere`](Self::changed_elsewhere)), so it may know names absent in the
    /// directories it makes ([`FreshDirs`]).
    pub fn follow(&self) {
        self.state().fresh = Some(FreshDirs::default());
    }

    /// The follower stopped: nothing is known absent any more.
    pub fn unfollow(&self) {
        self.state().fresh = None;
    }

    /// `path` changed elsewhere (None: anything may have).
    pub fn changed_elsewhere(&self, path: Option<&TreePath>) {
        if let Some(f) = self.state().fresh.as_mut() {
            match path {
                Some(p) => f.forget(p),
                None => f.clear(),
            }
        }
    }

    /// `path` is being made here (see [`FreshDirs::named`]).
    fn named(&self, path: &TreePath) {
        if let Some(f) = self.state().fresh.as_mut() {
            f.named(path);
        }
    }

    /// Whether the committed change of `path` an outbox event reports is this mount's own
    /// (and forgets it): one noted within [`OWN_CHANGE_TTL`]. A peer's change of the same
    /// path committed meanwhile may be taken for it; the next event of the path invalidates.
    pub fn was_own_change(&self, path: &TreePath) -> bool {
        self.state().own_changes.remove(path).is_some_and(|at| at.elapsed() < OWN_CHANGE_TTL)
    }

    /// The inode numbers the kernel may hold for `path` and for its parent directory.
    pub fn kernel_inodes(&self, path: &TreePath) -> (Option<u64>, Option<u64>) {
        let st = self.state();
        let parent = path.parent().and_then(|p| st.inodes.by_path.get(&p).copied());
        (st.inodes.by_path.get(path).copied(), parent)
    }

    /// Every path the kernel may hold an inode of, with its number.
    pub fn kernel_paths(&self) -> Vec<(u64, TreePath)> {
        self.state().inodes.by_path.iter().map(|(p, i)| (*i, p.clone())).collect()
    }

    /// Inode `ino`'s close waiting in the write-behind queue, if it still waits.
    fn queued(&self, ino: u64) -> Option<Queued> {
        let q = self.state().open.get(&ino).and_then(|o| o.queued.clone())?;
        let done = self.committer.as_ref().is_none_or(|c| c.is_done(q.ticket));
        (!done).then_some(q)
    }

    /// Waits until every close so far is committed: before work that builds on the tree,
    /// and for `fsync` of a directory (how a program or a test makes sure other processes
    /// see what it closed).
    /// A node that does not take them within [`SETTLE_TIMEOUT`] (it is down) gets `EIO`
    /// rather than a mount that hangs: the closes stay queued and are retried.
    pub fn settle(&self) -> FsResult<()> {
        match &self.committer {
            Some(c) => c.drain(SETTLE_TIMEOUT).map_err(|why| errno(if why.contains("disk") && why.contains("full") { libc::ENOSPC } else { libc::EIO }, why)),
            None => Ok(()),
        }
    }

    /// `fsync`: every change made here so far is committed ([`settle`](Self::settle)) and on
    /// disk. The node commits with SQLite's `synchronous=NORMAL`, which leaves a commit in the
    /// page cache until the log is synced; syncing the node's log file from here makes it
    /// durable at once (the log is replayed, up to its last whole commit, after a power loss).
    pub fn sync(&self) -> FsResult<()> {
        self.settle()?;
        if !self.unsynced.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let log = self.dir.join(format!("{}-wal", alknet_actors::store::TREE_DB_FILE));
        let synced = match File::open(&log) {
            Ok(f) => f.sync_data(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()), // checkpointed and gone
            Err(e) => Err(e),
        };
        synced.map_err(|e| {
            self.unsynced.store(true, std::sync::atomic::Ordering::SeqCst);
            errno(e.raw_os_error().unwrap_or(libc::EIO), format!("syncing the node's log {}: {e}", log.display()))
        })
    }

    /// What `path` shows to a reader: the committed entry (a file being written shows its
    /// old size and bytes until the last writer closes), or a file created here and not yet
    /// closed; else `ENOENT`.
    pub fn stat(&self, path: &TreePath) -> FsResult<Attr> {
        self.stat_of_tree(path).map(|a| self.shown(a))
    }

    /// [`stat`](Self::stat) from the tree and the sessions alone.
    fn stat_of_tree(&self, path: &TreePath) -> FsResult<Attr> {
        let known = self.state().inodes.by_path.get(path).copied();
        match self.entry_written(path)? {
            Some((entry, written_ms)) => {
                let ino = self.state().inodes.ino_of(path);
                if entry.kind == EntryKind::File {
                    if let Some(q) = self.queued(ino) {
                        return Ok(Attr::plain(ino, EntryKind::File, q.size, q.mode, q.mtime_ms));
                    }
                }
                let mut attr = Attr { ctime_ms: written_ms, ..attr_of(ino, &entry) };
                if entry.kind == EntryKind::Dir {
                    self.queued_dir_attr(path, &mut attr);
                }
                Ok(attr)
            }
            None => known
                .and_then(|ino| self.staged(ino, false).filter(|_| !self.state().open.get(&ino).is_some_and(|o| o.unlinked)))
                .or_else(|| self.queued_dir(path))
                .ok_or_else(|| errno(libc::ENOENT, format!("{path}: no such file or directory"))),
        }
    }

    /// The live entry at `path` and when its version was written (its change time).
    fn entry_written(&self, path: &TreePath) -> FsResult<Option<(Entry, i64)>> {
        if path.is_root() || self.state().fresh.as_ref().is_some_and(|f| f.absent(path)) {
            return Ok(self.entry(path)?.map(|e| (e, 0)));
        }
        let row = read::live(self.reader().tree().conn(), &self.view, path)?;
        Ok(row.and_then(|r| r.version.entry.map(|e| (e, r.version.written.ms))))
    }

    /// The live entry at `path` (the root is a directory).
    fn entry(&self, path: &TreePath) -> FsResult<Option<Entry>> {
        if path.is_root() {
            return Ok(Some(Entry::dir(DIR_MODE, 0)));
        }
        if self.state().fresh.as_ref().is_some_and(|f| f.absent(path)) {
            return Ok(None);
        }
        let row = read::live(self.reader().tree().conn(), &self.view, path)?;
        Ok(row.and_then(|r| r.version.entry))
    }

    /// The live entry at `path` and the branch's own newest version of it (its head), read
    /// in one snapshot: what a writer opens, and the version its close will replace.
    fn entry_and_head(&self, path: &TreePath) -> FsResult<(Option<Entry>, Option<VersionId>)> {
        if path.is_root() || self.state().fresh.as_ref().is_some_and(|f| f.absent(path)) {
            return Ok((self.entry(path)?, None));
        }
        let reader = self.reader();
        let conn = reader.tree().conn();
        let snapshot = conn.unchecked_transaction().map_err(StoreError::from)?;
        let head = read::own_head(&snapshot, self.view.links[0].branch, path)?;
        let row = read::live(&snapshot, &self.view, path)?;
        drop(snapshot);
        Ok((row.and_then(|r| r.version.entry), head))
    }

    /// What a write session of inode `ino` at `path` starting now replaces: the version
    /// this mount's queued close of it will write, or else the branch's head of the path.
    fn seen_now(&self, ino: u64, path: &TreePath) -> FsResult<Seen> {
        if let (Some(q), Some(c)) = (self.queued(ino), &self.committer) {
            let or = match q.seen {
                Seen::Opened(v) => v,
                Seen::After { or, .. } => or,
                Seen::AtCommit => None,
            };
            return Ok(Seen::After { change: c.change_id(q.ticket), or });
        }
        Ok(Seen::Opened(self.entry_and_head(path)?.1))
    }

    /// Looks `name` up in directory `parent` and counts the lookup (FUSE forgets it later).
    pub fn lookup(&self, parent: u64, name: &std::ffi::OsStr) -> FsResult<Attr> {
        let path = Self::child(&self.path_of(parent)?, name)?;
        let attr = self.stat(&path)?;
        self.count_lookup(attr.ino);
        Ok(attr)
    }

    /// Counts a lookup of `ino` that an entry reply other than [`lookup`](Self::lookup)
    /// gave the kernel (create, mkdir, symlink).
    pub fn count_lookup(&self, ino: u64) {
        *self.state().inodes.lookups.entry(ino).or_default() += 1;
    }

    /// FUSE forgot `n` lookups of `ino`: at zero, and with nothing open, the number goes.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut st = self.state();
        let left = st.inodes.lookups.get(&ino).copied().unwrap_or(0).saturating_sub(n);
        if left > 0 || ino == ROOT_INO {
            st.inodes.lookups.insert(ino, left);
            return;
        }
        st.inodes.lookups.remove(&ino);
        st.inodes.gone.remove(&ino);
        // An access time set explicitly is kept while the mount runs (the tree keeps none):
        // its inode stays, so the next lookup finds it under the same number. (The kernel
        // may forget an inode between a `utimensat` and the next `stat`, e.g. once a commit
        // invalidated its entry; the access time then read back as the mtime.)
        let atime_set = st.times.get(&ino).is_some_and(|t| t.atime_ms.is_some());
        if !st.open.contains_key(&ino) && !atime_set {
            st.inodes.drop_ino(ino);
            st.times.remove(&ino);
        }
    }

    /// `attr` with what this mount knows beyond the tree: when it last changed the inode
    /// (the change time of a change still in the write-behind queue) and an access time set
    /// explicitly (kept while the mount runs: the tree keeps no access times).
    fn shown(&self, mut attr: Attr) -> Attr {
        if let Some(t) = self.state().times.get(&attr.ino) {
            attr.ctime_ms = attr.ctime_ms.max(t.changed_ms);
            attr.atime_ms = t.atime_ms.or(attr.atime_ms);
        }
        attr
    }

    /// Inode `ino` changed through this mount now (its change time moves).
    fn touched(&self, ino: u64) {
        self.state().times.entry(ino).or_default().changed_ms = alknet_actors::engine::now_ms();
    }

    /// Sets inode `ino`'s access time (utimensat, `touch -a`): kept while the mount runs.
    pub fn set_atime(&self, ino: u64, atime_ms: i64) -> FsResult<()> {
        self.writable()?;
        let mut st = self.state();
        let t = st.times.entry(ino).or_default();
        t.atime_ms = Some(atime_ms);
        t.changed_ms = alknet_actors::engine::now_ms();
        Ok(())
    }

    /// The attributes of inode `ino`; through a write handle `fh` (fstat by the writer),
    /// what its session holds.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        self.getattr_of_tree(ino, fh).map(|a| self.shown(a))
    }

    /// [`getattr`](Self::getattr) from the tree and the sessions alone.
    fn getattr_of_tree(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        let writer = fh.is_some_and(|fh| matches!(self.state().handles.get(&fh), Some(Handle::Write { ino: i, .. }) if *i == ino));
        if let Some(a) = self.staged(ino, writer) {
            return Ok(a);
        }
        if let Some(a) = self.state().inodes.gone.get(&ino) {
            return Ok(a.clone());
        }
        let path = self.path_of(ino)?;
        self.stat_of_tree(&path)
    }

    /// The children of directory `path`, sorted by name. Inode numbers are those this mount
    /// already gave, else a placeholder derived from the path ([`listed_ino`]: a listing
    /// only names; the kernel looks a name up before using it), so listing a large tree does
    /// not grow the inode table.
    pub fn list(&self, path: &TreePath) -> FsResult<Vec<(String, Attr)>> {
        match self.entry(path)? {
            // Made here and maybe not committed yet (then the tree lists nothing in it).
            None if self.queued_dir(path).is_some() => {}
            None => return Err(errno(libc::ENOENT, format!("{path}: no such directory"))),
            Some(e) if e.kind != EntryKind::Dir => return Err(errno(libc::ENOTDIR, format!("{path}: not a directory"))),
            Some(_) => {}
        }
        let rows = read::list(self.reader().tree().conn(), &self.view, path)?;
        let st = self.state();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(entry) = row.version.entry else { continue };
            let ino = st.inodes.by_path.get(&row.path).copied().unwrap_or_else(|| listed_ino(&row.path));
            out.push((row.path.name().to_string(), attr_of(ino, &entry)));
        }
        // Files created here and not yet committed are listed too (a writer's `ls` sees
        // them, and closes in the write-behind queue show as closed).
        let fresh: Vec<(u64, TreePath)> = st
            .open
            .iter()
            .filter(|(_, o)| o.fresh && !o.unlinked)
            .filter_map(|(ino, _)| st.inodes.by_ino.get(ino).filter(|p| p.parent().as_ref() == Some(path)).map(|p| (*ino, p.clone())))
            .collect();
        let has_queued = st.open.values().any(|o| o.queued.is_some());
        drop(st);
        for (ino, p) in fresh {
            if let Some(a) = self.staged(ino, true) {
                if !out.iter().any(|(n, _)| n == p.name()) {
                    out.push((p.name().to_string(), a));
                }
            }
        }
        if has_queued {
            for (_, a) in out.iter_mut().filter(|(_, a)| a.ino & (1 << 63) == 0 && a.kind == EntryKind::File) {
                if let Some(q) = self.queued(a.ino) {
                    (a.size, a.mode, a.mtime_ms) = (q.size, q.mode, q.mtime_ms);
                }
            }
        }
        let made_here: Vec<TreePath> = self.state().queued_dirs.keys().filter(|p| p.parent().as_ref() == Some(path)).cloned().collect();
        for p in made_here {
            if !out.iter().any(|(n, _)| n == p.name()) {
                if let Some(a) = self.queued_dir(&p) {
                    out.push((p.name().to_string(), a));
                }
            }
        }
        if !self.state().dir_attrs.is_empty() {
            for (name, a) in out.iter_mut().filter(|(_, a)| a.kind == EntryKind::Dir) {
                if let Ok(child) = path.join(name) {
                    self.queued_dir_attr(&child, a);
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The target of the symlink at `path`.
    pub fn readlink(&self, path: &TreePath) -> FsResult<String> {
        let entry = self.entry(path)?.ok_or_else(|| errno(libc::ENOENT, format!("{path}: no such file")))?;
        if entry.kind != EntryKind::Symlink {
            return Err(errno(libc::EINVAL, format!("{path}: not a symlink")));
        }
        let mut out = Vec::new();
        self.reader().read_entry(&entry, &mut out, |_| {})?;
        String::from_utf8(out).map_err(|_| errno(libc::EIO, format!("{path}: the link target is not UTF-8")))
    }

    // ---- handles ----

    fn add_handle(&self, h: Handle) -> u64 {
        let mut st = self.state();
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(fh, h);
        fh
    }

    /// Opens the directory `path` for listing: its entries are taken now and paged later.
    pub fn opendir(&self, path: &TreePath) -> FsResult<u64> {
        let entries = Arc::new(self.list(path)?);
        Ok(self.add_handle(Handle::Dir { entries }))
    }

    /// The entries of directory handle `fh`.
    pub fn dir_entries(&self, fh: u64) -> FsResult<Arc<Vec<(String, Attr)>>> {
        match self.state().handles.get(&fh) {
            Some(Handle::Dir { entries }) => Ok(entries.clone()),
            _ => Err(errno(libc::EBADF, "not a directory handle")),
        }
    }

    /// The inode a file handle is open on.
    pub fn handle_ino(&self, fh: u64) -> FsResult<u64> {
        match self.state().handles.get(&fh) {
            Some(Handle::Write { ino, .. }) | Some(Handle::Read { ino, .. }) => Ok(*ino),
            _ => Err(errno(libc::EBADF, "not a file handle")),
        }
    }

    /// Whether the file at `path` has its bytes on a peer only (opening it may fetch them).
    pub fn bytes_elsewhere(&self, path: &TreePath) -> bool {
        match self.entry(path) {
            Ok(Some(e)) if e.kind == EntryKind::File => !self.reader().has_bytes(&e.hash).unwrap_or(true),
            _ => false,
        }
    }

    /// Whether reads through handle `fh` fetch bytes from peers (they may wait on the network).
    pub fn reads_from_peers(&self, fh: u64) -> bool {
        matches!(self.state().handles.get(&fh), Some(Handle::Read { bytes, .. }) if matches!(**bytes, Bytes::Remote { .. }))
    }

    /// Opens the existing file at `path`. Writing opens (or joins) its write session;
    /// reading alone pins the current version.
    pub fn open_file(&self, path: &TreePath, how: OpenMode) -> FsResult<u64> {
        let attr = self.stat(path)?;
        match attr.kind {
            EntryKind::Dir => return Err(errno(libc::EISDIR, format!("{path}: is a directory"))),
            EntryKind::Symlink => return Err(errno(libc::ELOOP, format!("{path}: is a symlink"))),
            EntryKind::File => {}
        }
        if how.write {
            self.writable()?;
            // Bytes still on a peer are fetched before the change lock is taken: a slow or
            // unreachable peer holds up this open only, not every change on the mount.
            if !how.truncate {
                if let Some(e) = self.entry(path)?.filter(|e| e.kind == EntryKind::File) {
                    if !self.reader().has_bytes(&e.hash)? {
                        self.fetch(&e)?;
                    }
                }
            }
            let _changes = self.changes();
            let ino = self.state().inodes.ino_of(path);
            self.join_session(ino, path, how.truncate, None)?;
            return Ok(self.add_handle(Handle::Write { ino, append: how.append, owner: how.owner }));
        }
        let ino = attr.ino;
        if let Some(bytes) = self.queued_bytes(ino) {
            return Ok(self.add_handle(Handle::Read { ino, bytes: Arc::new(bytes) }));
        }
        let bytes = match self.entry(path)? {
            Some(entry) => self.bytes_of(path, &entry)?,
            // Created here and not yet closed: its committed state is "nothing yet".
            None => Bytes::Inline(Arc::new(Vec::new())),
        };
        Ok(self.add_handle(Handle::Read { ino, bytes: Arc::new(bytes) }))
    }

    /// The bytes of inode `ino`'s close waiting in the queue, read from its staging file
    /// (immutable once closed). `None` when nothing waits, or the node took the file
    /// meanwhile (then its commit is done or moments away: wait for it and read the tree).
    fn queued_bytes(&self, ino: u64) -> Option<Bytes> {
        let q = self.queued(ino)?;
        let staging = match &q.bytes {
            ClosedBytes::Memory(data) => return Some(Bytes::Inline(data.clone())),
            ClosedBytes::File(staging) => staging,
        };
        match File::open(staging) {
            Ok(file) => Some(Bytes::File { file: Arc::new(file), hash: ContentHash::EMPTY, size: q.size, checked: Box::new(Mutex::new(Checked { upto: 0, hasher: None })) }),
            Err(_) => {
                let _ = self.settle(); // the node took it: read the tree once committed
                None
            }
        }
    }

    /// Creates the file `path` (its write session; it appears in the tree when closed).
    pub fn create(&self, path: &TreePath, mode: u32, how: OpenMode, exclusive: bool) -> FsResult<(u64, Attr)> {
        self.writable()?;
        let _changes = self.changes();
        self.check_parent(path)?;
        let existing = self.stat(path).ok();
        if let Some(attr) = &existing {
            if exclusive {
                return Err(errno(libc::EEXIST, format!("{path}: already exists")));
            }
            if attr.kind == EntryKind::Dir {
                return Err(errno(libc::EISDIR, format!("{path}: is a directory")));
            }
        }
        self.named(path);
        let ino = self.state().inodes.ino_of(path);
        let joined = self.state().open.get(&ino).is_some_and(|o| o.session.is_some() || o.writers > 0);
        if joined {
            self.join_session(ino, path, true, Some(mode & 0o7777))?;
        } else {
            // A new (or emptied) file: an empty session, nothing to read from the tree. What
            // it replaces: nothing, if the path was seen absent (the store takes a deletion
            // at its head for that); else what is there now.
            let seen = match existing {
                None => Seen::Opened(None),
                Some(_) => self.seen_now(ino, path)?,
            };
            let session = Staged::empty(path.clone(), mode & 0o7777);
            let fresh = existing.is_none();
            let now = alknet_actors::engine::now_ms();
            let mut st = self.state();
            let open = st.open.entry(ino).or_insert(Open::new(0, fresh, now));
            open.session = Some(session);
            open.writers += 1;
            open.dirty = true;
            open.fresh |= fresh; // a close of it still queued is not in the tree either
            open.mtime_ms = now;
            open.seen = seen;
        }
        let fh = self.add_handle(Handle::Write { ino, append: how.append, owner: how.owner });
        let attr = self.staged(ino, true).ok_or_else(|| errno(libc::EIO, "the new file's session vanished"))?;
        Ok((fh, attr))
    }

    /// Opens inode `ino`'s write session, or joins the one open; `truncate` empties it.
    /// Runs under [`changes`](Self::changes).
    fn join_session(&self, ino: u64, path: &TreePath, truncate: bool, new_mode: Option<u32>) -> FsResult<()> {
        let has_session = self.state().open.get(&ino).is_some_and(|o| o.session.is_some());
        if !has_session && !truncate && self.queued(ino).is_some() {
            self.settle()?; // a new session starts from the committed bytes
        }
        if !has_session {
            let (mut session, seen, fresh) = self.new_session(ino, path, truncate)?;
            if let Some(mode) = new_mode {
                session.set_mode(mode);
            }
            let mut st = self.state();
            let now = alknet_actors::engine::now_ms();
            let open = st.open.entry(ino).or_insert(Open::new(0, fresh, now));
            open.session = Some(session);
            open.fresh = fresh;
            open.dirty |= truncate || fresh;
            open.seen = seen;
        } else if truncate {
            let mut st = self.state();
            if let Some(s) = st.open.get_mut(&ino).and_then(|o| o.session.as_mut()) {
                s.truncate(0, &self.spill)?;
            }
        }
        let mut st = self.state();
        let open = st.open.get_mut(&ino).ok_or_else(|| errno(libc::EIO, "write session vanished"))?;
        open.writers += 1;
        open.dirty |= truncate;
        Ok(())
    }

    /// A new session of inode `ino` at `path`: empty with `truncate`, else holding the
    /// committed bytes (fetched from peers first if they are not here yet); in memory while
    /// small. With it, the version it replaces (read in the same snapshot as the bytes), and
    /// whether the path is absent from the tree.
    fn new_session(&self, ino: u64, path: &TreePath, truncate: bool) -> FsResult<(Staged, Seen, bool)> {
        let (entry, head) = self.entry_and_head(path)?;
        if let Some(e) = &entry {
            if e.kind == EntryKind::Dir {
                return Err(errno(libc::EISDIR, format!("{path}: is a directory")));
            }
        }
        // A close of it still queued (a truncating open does not wait for it): the version
        // that close writes is what this session replaces.
        let seen = match self.queued(ino) {
            Some(_) => self.seen_now(ino, path)?,
            None => Seen::Opened(head),
        };
        let absent = entry.is_none();
        let mode = entry.as_ref().map(|e| e.mode).unwrap_or(alknet_actors::engine::FILE_MODE_DEFAULT);
        let Some(e) = entry.filter(|_| !truncate) else { return Ok((Staged::empty(path.clone(), mode), seen, absent)) };
        if e.kind == EntryKind::File && !self.reader().has_bytes(&e.hash)? {
            self.fetch(&e)?;
        }
        if e.size <= alknet_actors::content::INLINE_BYTES_MAX as u64 {
            let mut data = Vec::with_capacity(e.size as usize);
            self.reader().read_entry(&e, &mut data, |_| {})?;
            return Ok((Staged::Memory { path: path.clone(), mode, data }, seen, absent));
        }
        let session = self.reader().session_of(path, Some(&e), mode, Some(&self.staging_dir))?;
        Ok((Staged::File(Box::new(session)), seen, absent))
    }

    /// The bytes of `entry` for a read handle. A small blob still on a peer is fetched first
    /// (the node does it, and answers once the bytes are here); a larger one is read by
    /// range as it is read ([`Bytes::Remote`]).
    fn bytes_of(&self, path: &TreePath, entry: &Entry) -> FsResult<Bytes> {
        if !self.reader().has_bytes(&entry.hash)? {
            if entry.size > alknet_actors::content::INLINE_BYTES_MAX as u64 {
                return Ok(Bytes::Remote { hash: entry.hash, size: entry.size, window: Box::default() });
            }
            self.fetch(entry)?; // small: one round trip either way
        }
        if entry.size <= alknet_actors::content::INLINE_BYTES_MAX as u64 {
            let mut data = Vec::with_capacity(entry.size as usize);
            if self.reader().read_entry(entry, &mut data, |_| {}).is_ok() {
                return Ok(Bytes::Inline(Arc::new(data)));
            }
        }
        let file = self.reader().content().open_file(&entry.hash).map_err(|e| errno(libc::EIO, format!("{path}: {e}")))?;
        Ok(Bytes::File { file: Arc::new(file), hash: entry.hash, size: entry.size, checked: Box::new(Mutex::new(Checked { upto: 0, hasher: Some(blake3::Hasher::new()) })) })
    }

    fn fetch(&self, entry: &Entry) -> FsResult<()> {
        let req = Request::Fetch { hash: entry.hash.to_hex(), size: entry.size };
        self.call_node(&req).map(|_| ()).map_err(|e| errno(libc::EIO, format!("fetching the bytes from peers: {e:#}")))
    }

    /// `req` (a fetch from peers) to the node on a connection of its own: it may take as
    /// long as a fetch (other requests go on meanwhile).
    fn call_node(&self, req: &Request) -> anyhow::Result<crate::control::Reply> {
        Client::connect_with_timeout(&self.dir, FETCH_CALL_TIMEOUT)
            .ok_or_else(|| anyhow::anyhow!("the bytes are on a peer and no node runs to fetch them: start `alkfs node run`"))?
            .call(req)
    }

    /// Reads `len` bytes at `offset` of `bytes`, fetching from peers what a remote blob needs.
    fn read_from(&self, bytes: &Bytes, offset: u64, len: usize) -> FsResult<Vec<u8>> {
        let Bytes::Remote { hash, size, window } = bytes else { return read_bytes(bytes, offset, len) };
        // At most one window per read (a short read; the node answers at most that much).
        let end = (*size).min(offset.saturating_add((len as u64).min(READ_AHEAD_BYTES)));
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(local) = &w.local {
            return read_bytes(local, offset, len);
        }
        let in_window = offset >= w.offset && end <= w.offset + w.data.len() as u64;
        if !in_window {
            if self.reader().has_bytes(hash)? {
                // The node's fetch of the whole blob landed meanwhile (it checked the hash).
                let file = self.reader().content().open_file(hash).map_err(|e| errno(libc::EIO, format!("blob {hash}: {e}")))?;
                let local = Arc::new(Bytes::File { file: Arc::new(file), hash: *hash, size: *size, checked: Box::new(Mutex::new(Checked { upto: 0, hasher: None })) });
                w.local = Some(local.clone());
                return read_bytes(&local, offset, len);
            }
            let want = (end - offset).max(READ_AHEAD_BYTES);
            let req = Request::ReadRange { hash: hash.to_hex(), size: *size, offset, len: want };
            let data = match self.call_node(&req).map_err(|e| errno(libc::EIO, format!("reading bytes {offset}.. of blob {hash} from peers: {e:#}")))? {
                crate::control::Reply::Data { data } => data_encoding::BASE64.decode(data.as_bytes()).map_err(|e| errno(libc::EIO, format!("the node's bytes: {e}")))?,
                other => return Err(errno(libc::EIO, format!("the node answered {other:?} to a range read"))),
            };
            if (data.len() as u64) < end - offset {
                return Err(errno(libc::EIO, format!("the node gave {} bytes at {offset} of blob {hash}; {} were asked", data.len(), end - offset)));
            }
            (w.offset, w.data) = (offset, data);
        }
        let start = (offset - w.offset) as usize;
        Ok(w.data[start..start + (end - offset) as usize].to_vec())
    }

    /// Reads up to `len` bytes at `offset` through handle `fh`.
    pub fn read(&self, fh: u64, offset: u64, len: usize) -> FsResult<Vec<u8>> {
        let source = match self.state().handles.get(&fh) {
            Some(Handle::Read { bytes, .. }) => Ok(bytes.clone()),
            Some(Handle::Write { ino, .. }) => Err(*ino),
            _ => return Err(errno(libc::EBADF, "not a file handle")),
        };
        match source {
            Ok(bytes) => self.read_from(&bytes, offset, len),
            Err(ino) => {
                let st = self.state();
                if let Some(s) = st.open.get(&ino).and_then(|o| o.session.as_ref()) {
                    let end = s.len().min(offset.saturating_add(len as u64));
                    let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
                    let n = s.read_at(offset, &mut buf)?;
                    buf.truncate(n);
                    return Ok(buf);
                }
                // Committed by an earlier close while this handle stayed open: read what
                // was committed.
                let path = st.inodes.path(ino)?;
                drop(st);
                if let Some(bytes) = self.queued_bytes(ino) {
                    return read_bytes(&bytes, offset, len);
                }
                let entry = self.entry(&path)?.ok_or_else(|| errno(libc::ENOENT, format!("{path}: gone")))?;
                self.read_from(&self.bytes_of(&path, &entry)?, offset, len)
            }
        }
    }

    /// Writes `data` at `offset` through write handle `fh`; returns bytes written.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        let _changes = self.changes();
        let (ino, append) = match self.state().handles.get(&fh) {
            Some(Handle::Write { ino, append, .. }) => (*ino, *append),
            Some(Handle::Read { .. }) => return Err(errno(libc::EBADF, "the file was opened read-only")),
            _ => return Err(errno(libc::EBADF, "not a file handle")),
        };
        self.ensure_session(ino)?;
        let mut st = self.state();
        let open = st.open.get_mut(&ino).ok_or_else(|| errno(libc::EBADF, "no write session"))?;
        if let Some(e) = &open.failed {
            return Err(e.clone());
        }
        let session = open.session.as_mut().ok_or_else(|| errno(libc::EBADF, "no write session"))?;
        let at = if append { session.len() } else { offset };
        if let Err(e) = session.write_at(at, data, &self.spill).map_err(Errno::from) {
            open.failed = Some(Errno::new(e.code, format!("an earlier write failed: {}", e.message)));
            return Err(e);
        }
        open.dirty = true;
        open.written = true;
        open.mtime_ms = alknet_actors::engine::now_ms();
        Ok(data.len())
    }

    /// A handle whose session an earlier commit took writes again: reopen from the
    /// committed bytes. Runs under [`changes`](Self::changes).
    fn ensure_session(&self, ino: u64) -> FsResult<()> {
        let st = self.state();
        if st.open.get(&ino).is_some_and(|o| o.session.is_some()) {
            return Ok(());
        }
        let path = st.inodes.path(ino)?;
        drop(st);
        if self.queued(ino).is_some() {
            self.settle()?;
        }
        let (session, seen, _) = self.new_session(ino, &path, false)?;
        let mut st = self.state();
        let now = alknet_actors::engine::now_ms();
        let open = st.open.entry(ino).or_insert(Open::new(1, false, now));
        open.session = Some(session);
        open.seen = seen;
        Ok(())
    }

    /// `fsync` of a file: returns once what it promises is committed and on disk (sqlite3,
    /// git and editors treat a successful fsync as durable). Through a write handle it
    /// commits the file as written so far, by every writer (POSIX: fsync is of the file,
    /// not of a descriptor); readers see that version from then on. Through a read-only one
    /// (`sync FILE` after `cp`) it waits for the closes queued so far, the file's latest
    /// among them. Either way it returns once those are committed and the node's log synced.
    pub fn fsync(&self, fh: u64) -> FsResult<()> {
        let _changes = self.changes();
        let ino = match self.state().handles.get(&fh) {
            Some(Handle::Write { ino, .. }) => Some(*ino),
            Some(Handle::Read { .. }) => None,
            _ => return Ok(()),
        };
        if self.read_only {
            return Ok(());
        }
        if let Some(ino) = ino {
            self.commit(ino)?;
        }
        self.sync()
    }

    /// A close(2) of a descriptor of `fh` by process `by` (its thread group): the last
    /// writer's close by the process that opened it commits, once something was written
    /// (see [`Open::written`]); a failed session reports its error.
    pub fn flush(&self, fh: u64, by: u32) -> FsResult<()> {
        let _changes = self.changes();
        let ino = match self.state().handles.get(&fh) {
            Some(Handle::Write { ino, owner, .. }) if same_process(*owner, by) => *ino,
            _ => return Ok(()),
        };
        let last = self.state().open.get(&ino).is_some_and(|o| o.writers == 1 && (o.written || o.failed.is_some()));
        if last {
            self.commit(ino)?;
        }
        Ok(())
    }

    /// The handle is gone: a write handle's close commits if it was the last writer.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let _changes = self.changes();
        let handle = self.state().handles.remove(&fh);
        let Some(Handle::Write { ino, .. }) = handle else { return Ok(()) };
        let last = {
            let mut st = self.state();
            match st.open.get_mut(&ino) {
                Some(o) => {
                    o.writers = o.writers.saturating_sub(1);
                    o.writers == 0
                }
                None => false,
            }
        };
        if !last {
            return Ok(());
        }
        let result = self.commit(ino);
        let mut st = self.state();
        if let Some(o) = st.open.get_mut(&ino).filter(|o| o.writers == 0) {
            // The next writer starts afresh (a failure was reported to this one).
            o.failed = None;
            o.written = false;
        }
        if st.open.get(&ino).is_some_and(|o| o.writers == 0 && o.queued.is_none()) {
            // An unlinked or failed session's staging file goes with it.
            st.open.remove(&ino);
        }
        if st.inodes.lookups.get(&ino).copied().unwrap_or(0) == 0 && !st.open.contains_key(&ino) {
            st.inodes.drop_ino(ino);
        }
        result
    }

    /// The handle's client went away without closing it (an SFTP connection dropped):
    /// what it wrote is not committed unless another writer still holds the file.
    pub fn abandon(&self, fh: u64) {
        let _changes = self.changes();
        let mut st = self.state();
        let Some(Handle::Write { ino, .. }) = st.handles.remove(&fh) else { return };
        if let Some(open) = st.open.get_mut(&ino) {
            open.writers = open.writers.saturating_sub(1);
            if open.writers == 0 {
                open.session = None;
                open.dirty = false;
                open.failed = None;
                open.written = false;
                if open.queued.is_none() {
                    st.open.remove(&ino);
                }
            }
        }
    }

    /// Commits inode `ino`'s session if it has changes: hands its staging file to the
    /// write-behind queue (the node takes it in the next batch). Runs under
    /// [`changes`](Self::changes).
    fn commit(&self, ino: u64) -> FsResult<()> {
        let Some(committer) = &self.committer else { return Err(errno(libc::EROFS, "the mount is read-only")) };
        let (session, path, mtime_ms, seen) = {
            let mut st = self.state();
            let Some(open) = st.open.get_mut(&ino) else { return Ok(()) };
            if let Some(e) = open.failed.clone() {
                // Nothing half-written: the session goes (its staging file with it), the old
                // version stays, and the close says why.
                open.session = None;
                open.dirty = false;
                tracing::warn!(error = %e, "a write session failed; the file keeps its old version");
                return Err(e);
            }
            if !open.dirty || open.unlinked || open.session.is_none() {
                return Ok(());
            }
            let path = st.inodes.path(ino)?;
            let open = st.open.get_mut(&ino).ok_or_else(|| errno(libc::EIO, "write session vanished"))?;
            open.dirty = false;
            open.written = false;
            let session = open.session.take().ok_or_else(|| errno(libc::EIO, "write session vanished"))?;
            (session, path, open.mtime_ms, open.seen.clone())
        };
        let mode = session.mode();
        let (bytes, size, hash) = match session.close()? {
            Payload::Bytes(data) => {
                let size = data.len() as u64;
                (ClosedBytes::Memory(Arc::new(data)), size, None)
            }
            Payload::File { staging, size, hash } => (ClosedBytes::File(staging), size, hash),
        };
        self.own_change(&path);
        self.unsynced.store(true, std::sync::atomic::Ordering::SeqCst);
        let closed = super::commits::Closed { ino, path, bytes: bytes.clone(), size, hash, mode, mtime_ms, seen: seen.clone() };
        // Journaled before it is acknowledged; a journal that cannot be written (a full
        // disk) fails the close, and the file keeps its old version.
        let ticket = committer.push(closed).map_err(|e| errno(e.0.raw_os_error().unwrap_or(libc::EIO), format!("the close could not be journaled: {}", e.0)))?;
        let mut st = self.state();
        if let Some(open) = st.open.get_mut(&ino) {
            open.queued = Some(Queued { ticket, seen, bytes, size, mode, mtime_ms });
        }
        st.queued.push_back((ticket, ino));
        // Forget the closes committed meanwhile (their files are in the tree now).
        while let Some(&(t, i)) = st.queued.front() {
            if !committer.is_done(t) {
                break;
            }
            st.queued.pop_front();
            let idle = st.open.get(&i).is_some_and(|o| o.writers == 0 && o.session.is_none() && o.queued.as_ref().is_some_and(|q| q.ticket == t));
            if idle {
                st.open.remove(&i);
                let handled = st.handles.values().any(|h| matches!(h, Handle::Write { ino, .. } | Handle::Read { ino, .. } if *ino == i));
                if st.inodes.lookups.get(&i).copied().unwrap_or(0) == 0 && !handled {
                    st.inodes.drop_ino(i);
                }
            } else if let Some(o) = st.open.get_mut(&i) {
                if o.queued.as_ref().is_some_and(|q| q.ticket == t) {
                    o.queued = None;
                    o.fresh = false;
                }
            }
        }
        Ok(())
    }

    /// Releases directory handle `fh`.
    pub fn releasedir(&self, fh: u64) {
        self.state().handles.remove(&fh);
    }

    // ---- changes ----

    /// `setattr` of the file at `path` (mode, mtime, size).
    /// By path (SFTP), the path is what counts: its inode number only finds an open or
    /// queued session, and may be forgotten meanwhile by another session's commit.
    pub fn setattr(&self, path: &TreePath, mode: Option<u32>, mtime_ms: Option<i64>, size: Option<u64>) -> FsResult<Attr> {
        let ino = self.state().inodes.ino_of(path);
        let r = self.setattr_at(ino, Some(path), mode, mtime_ms, size);
        self.after_setattr(ino, r, mode.is_some() || mtime_ms.is_some() || size.is_some())
    }

    /// `setattr` of inode `ino` (FUSE; SFTP's fsetstat): mode, mtime and size (truncate).
    /// A file with a write session open (even unlinked) takes them into the session;
    /// otherwise each is one commit.
    pub fn setattr_ino(&self, ino: u64, mode: Option<u32>, mtime_ms: Option<i64>, size: Option<u64>) -> FsResult<Attr> {
        let r = self.setattr_at(ino, None, mode, mtime_ms, size);
        self.after_setattr(ino, r, mode.is_some() || mtime_ms.is_some() || size.is_some())
    }

    /// A setattr's answer: a change that succeeded moves the change time (a refused one
    /// does not), and the attributes show what this mount knows.
    fn after_setattr(&self, ino: u64, r: FsResult<Attr>, changed: bool) -> FsResult<Attr> {
        let attr = r?;
        if changed {
            self.touched(ino);
        }
        Ok(self.shown(attr))
    }

    /// [`setattr_ino`](Self::setattr_ino) with the path known (`Some`) or found from the
    /// inode (`None`).
    fn setattr_at(&self, ino: u64, path: Option<&TreePath>, mode: Option<u32>, mtime_ms: Option<i64>, size: Option<u64>) -> FsResult<Attr> {
        let attr_now = |fs: &Self| match path {
            Some(p) => fs.stat(p),
            None => fs.getattr(ino, None),
        };
        if mode.is_none() && mtime_ms.is_none() && size.is_none() {
            return attr_now(self);
        }
        self.writable()?;
        let changes = self.changes();
        let in_session = self.state().open.get(&ino).is_some_and(|o| o.writers > 0 || o.session.is_some());
        if in_session {
            self.ensure_session(ino)?;
            let mut st = self.state();
            let open = st.open.get_mut(&ino).ok_or_else(|| errno(libc::EIO, "write session vanished"))?;
            if let Some(e) = &open.failed {
                return Err(e.clone());
            }
            let s = open.session.as_mut().ok_or_else(|| errno(libc::EIO, "write session vanished"))?;
            if let Some(m) = mode {
                s.set_mode(m & 0o7777);
            }
            if let Some(len) = size {
                if let Err(e) = s.truncate(len, &self.spill).map_err(Errno::from) {
                    open.failed = Some(Errno::new(e.code, format!("an earlier truncate failed: {}", e.message)));
                    return Err(e);
                }
            }
            if let Some(ms) = mtime_ms {
                open.mtime_ms = ms;
            }
            open.dirty = true;
            open.written = true;
            let (len, mode, ms) = (s.len(), s.mode(), open.mtime_ms);
            return Ok(Attr::plain(ino, EntryKind::File, len, mode, ms));
        }
        if let Some(q) = self.queued(ino) {
            // chmod or utimes right after close (tar, cp -p): folded into the queued commit.
            if size.is_none() && self.committer.as_ref().is_some_and(|c| c.amend(ino, mode.map(|m| m & 0o7777), mtime_ms)) {
                let mut st = self.state();
                let q2 = st.open.get_mut(&ino).and_then(|o| o.queued.as_mut()).ok_or_else(|| errno(libc::EIO, "queued close vanished"))?;
                if let Some(m) = mode {
                    q2.mode = m & 0o7777;
                }
                if let Some(ms) = mtime_ms {
                    q2.mtime_ms = ms;
                }
                return Ok(Attr::plain(ino, EntryKind::File, q.size, q2.mode, q2.mtime_ms));
            }
            self.settle()?;
        }
        let path = match path {
            Some(p) => p.clone(),
            None => self.path_of(ino)?,
        };
        let entry = match self.entry(&path)? {
            Some(e) => e,
            None if self.queued_dir(&path).is_some() => Entry::dir(DIR_MODE, 0), // its changes queue after its mkdir
            None => return Err(errno(libc::ENOENT, format!("{path}: no such file"))),
        };
        if entry.kind == EntryKind::Dir && size.is_none() && !path.is_root() {
            if let Some(committer) = &self.committer {
                // Queued like a close (tar sets a directory's mode and mtime after filling it).
                let (mode, mtime_ms) = (mode.map(|m| m & 0o7777), mtime_ms);
                self.own_change(&path);
                self.unsynced.store(true, std::sync::atomic::Ordering::SeqCst);
                let ticket = committer.push_dir_attr(super::commits::DirAttr { path: path.clone(), mode, mtime_ms }).map_err(|e| errno(libc::EIO, format!("the change could not be journaled: {}", e.0)))?;
                let done = committer.done_upto();
                let mut st = self.state();
                if st.dir_attrs.len() >= OVERLAYS_SWEEP_AT {
                    st.dir_attrs.retain(|_, q| q.ticket > done);
                }
                // Tickets commit in order: the newest covers an older change still in flight.
                let q = st.dir_attrs.entry(path.clone()).or_insert(QueuedDirAttr { ticket, mode: None, mtime_ms: None });
                q.ticket = ticket;
                q.mode = mode.or(q.mode);
                q.mtime_ms = mtime_ms.or(q.mtime_ms);
                drop(st);
                drop(changes);
                return attr_now(self);
            }
        }
        if let Some(len) = size {
            match entry.kind {
                EntryKind::Dir => return Err(errno(libc::EISDIR, format!("{path}: is a directory"))),
                // The callers follow links first; one that did not must not turn a link into
                // a file holding its target's name.
                EntryKind::Symlink => return Err(errno(libc::EINVAL, format!("{path}: is a symlink: truncate its target"))),
                EntryKind::File => {}
            }
            if len != entry.size || mode.is_some() || mtime_ms.is_some() {
                let (mut session, seen, _) = self.new_session(ino, &path, len == 0)?;
                session.truncate(len, &self.spill)?;
                if let Some(m) = mode {
                    session.set_mode(m & 0o7777);
                }
                let ms = mtime_ms.unwrap_or_else(alknet_actors::engine::now_ms);
                self.state().open.insert(ino, Open { session: Some(session), dirty: true, seen, ..Open::new(0, false, ms) });
                self.commit(ino)?;
            }
            drop(changes);
            return attr_now(self);
        }
        if !path.is_root() {
            self.own_change(&path);
            self.call(Request::SetAttr { scope: self.wire(), path: path.to_string(), mode, mtime_ms })?;
        }
        drop(changes);
        attr_now(self)
    }

    /// `mkdir`.
    pub fn mkdir(&self, path: &TreePath, mode: u32) -> FsResult<Attr> {
        self.writable()?;
        let _changes = self.changes();
        if self.stat(path).is_ok() {
            return Err(errno(libc::EEXIST, format!("{path}: already exists")));
        }
        self.check_parent(path)?;
        let Some(committer) = &self.committer else { return Err(errno(libc::EROFS, "the mount is read-only")) };
        self.own_change(path);
        self.named(path);
        // Queued like a close (see `commits`): the mount shows it at once.
        let (mode, mtime_ms) = (mode & 0o7777, alknet_actors::engine::now_ms());
        self.unsynced.store(true, std::sync::atomic::Ordering::SeqCst);
        let ticket = committer.push_mkdir(super::commits::DirMade { path: path.clone(), mode, mtime_ms }).map_err(|e| errno(libc::EIO, format!("the mkdir could not be journaled: {}", e.0)))?;
        let done = committer.done_upto();
        let mut st = self.state();
        if st.queued_dirs.len() >= OVERLAYS_SWEEP_AT {
            st.queued_dirs.retain(|_, q| q.ticket > done);
        }
        st.queued_dirs.insert(path.clone(), QueuedDir { ticket, mode, mtime_ms });
        let ino = st.inodes.ino_of(path);
        let epoch = st.fresh.as_ref().map(|f| f.epoch());
        drop(st);
        // Nothing is in it, unless the tree kept children of a directory of this name
        // removed (a peer's concurrent removal and write), which it would show again.
        if let Some(epoch) = epoch {
            if read::list(self.reader().tree().conn(), &self.view, path)?.is_empty() {
                if let Some(f) = self.state().fresh.as_mut() {
                    f.made(path, epoch);
                }
            }
        }
        Ok(Attr::plain(ino, EntryKind::Dir, 0, mode, mtime_ms))
    }

    fn check_parent(&self, path: &TreePath) -> FsResult<()> {
        let Some(parent) = path.parent() else { return Ok(()) };
        if self.state().fresh.as_ref().is_some_and(|f| f.is_fresh(&parent)) {
            return Ok(());
        }
        match self.entry(&parent)? {
            Some(e) if e.kind == EntryKind::Dir => Ok(()),
            Some(_) => Err(errno(libc::ENOTDIR, format!("{parent}: not a directory"))),
            None if self.queued_dir(&parent).is_some() => Ok(()),
            None => Err(errno(libc::ENOENT, format!("{parent}: no such directory"))),
        }
    }

    /// `symlink`: a link at `path` to `target`.
    pub fn symlink(&self, path: &TreePath, target: &str) -> FsResult<Attr> {
        self.writable()?;
        // The node makes it, in a directory that may still be queued: the queue drains
        // first without the change lock (a slow drain holds up this call, not every
        // change), then once more under it for what came meanwhile.
        self.settle()?;
        let _changes = self.changes();
        self.settle()?;
        if target.is_empty() {
            return Err(errno(libc::ENOENT, "a link target cannot be empty"));
        }
        if target.len() > SYMLINK_TARGET_BYTES_MAX || target.contains('\0') {
            return Err(errno(libc::ENAMETOOLONG, format!("a link target must be at most {SYMLINK_TARGET_BYTES_MAX} bytes, without NUL")));
        }
        if self.stat(path).is_ok() {
            return Err(errno(libc::EEXIST, format!("{path}: already exists")));
        }
        self.check_parent(path)?;
        self.own_change(path);
        self.named(path);
        self.call(Request::Symlink { scope: self.wire(), path: path.to_string(), target: target.to_string() })?;
        self.stat(path)
    }

    /// `unlink` (files and symlinks) or `rmdir` (empty directories).
    pub fn remove(&self, path: &TreePath, dir: bool) -> FsResult<()> {
        self.writable()?;
        self.settle()?; // first without the change lock (see `symlink`)
        let _changes = self.changes();
        self.settle()?;
        let last = self.stat(path)?;
        match (last.kind == EntryKind::Dir, dir) {
            (false, true) => return Err(errno(libc::ENOTDIR, format!("{path}: not a directory"))),
            (true, false) => return Err(errno(libc::EISDIR, format!("{path}: is a directory"))),
            (true, true) if path.is_root() => return Err(errno(libc::EBUSY, "the root cannot be removed")),
            (true, true) if !self.list(path)?.is_empty() => return Err(errno(libc::ENOTEMPTY, format!("{path}: directory not empty"))),
            _ => {}
        }
        if self.entry(path)?.is_some() {
            self.call(Request::Remove { scope: self.wire(), path: path.to_string(), recursive: false })?;
        }
        let mut st = self.state();
        if let Some(f) = st.fresh.as_mut().filter(|_| dir) {
            f.forget_below(path);
        }
        if let Some(ino) = st.inodes.by_path.get(path).copied() {
            if let Some(open) = st.open.get_mut(&ino) {
                open.unlinked = true;
            }
        }
        st.inodes.detach(path, Some(last));
        Ok(())
    }

    /// `rename(2)`: `from` to exactly `to`, replacing a file or an empty directory there
    /// (unless `noreplace`).
    pub fn rename(&self, from: &TreePath, to: &TreePath, noreplace: bool) -> FsResult<()> {
        self.writable()?;
        self.settle()?; // first without the change lock (see `symlink`)
        let _changes = self.changes();
        self.settle()?;
        if from.is_root() || to.is_root() {
            return Err(errno(libc::EBUSY, "the root cannot be moved or replaced"));
        }
        if to.is_within(from) && from != to {
            return Err(errno(libc::EINVAL, format!("cannot move {from} into itself ({to})")));
        }
        let src = self.stat(from)?;
        if from == to {
            return Ok(());
        }
        let replaced = self.stat(to).ok();
        if let Some(dst) = replaced.clone() {
            if noreplace {
                return Err(errno(libc::EEXIST, format!("{to}: already exists")));
            }
            match (src.kind == EntryKind::Dir, dst.kind == EntryKind::Dir) {
                (true, true) if !self.list(to)?.is_empty() => return Err(errno(libc::ENOTEMPTY, format!("{to}: directory not empty"))),
                (true, false) => return Err(errno(libc::ENOTDIR, format!("{to}: not a directory"))),
                (false, true) => return Err(errno(libc::EISDIR, format!("{to}: is a directory"))),
                _ => {}
            }
        }
        self.check_parent(to)?;
        self.named(to);
        if self.entry(from)?.is_some() {
            self.call(Request::MoveOver { scope: self.wire(), from: from.to_string(), to: to.to_string(), noreplace })?;
        }
        // A file still being written (not in the tree yet) just takes the new name: its
        // close commits there, replacing what `to` holds in that one transaction.
        let mut st = self.state();
        if let Some(old) = st.inodes.by_path.get(to).copied() {
            if let Some(open) = st.open.get_mut(&old) {
                open.unlinked = true;
            }
        }
        let dirs = src.kind == EntryKind::Dir;
        st.inodes.rename(from, to, replaced);
        if let Some(f) = st.fresh.as_mut().filter(|_| dirs) {
            f.forget_below(from);
            f.forget_below(to);
        }
        Ok(())
    }

    /// Sizes for `statfs`: (total bytes, free bytes) of the disk holding the data dir.
    pub fn disk_space(&self) -> (u64, u64) {
        let Ok(c) = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()) else { return (0, 0) };
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: c is a valid NUL-terminated path and s a valid out-parameter.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return (0, 0);
        }
        (s.f_blocks as u64 * s.f_frsize as u64, s.f_bavail as u64 * s.f_frsize as u64)
    }
}

impl Drop for MountFs {
    fn drop(&mut self) {
        if self.read_only {
            // Nothing staged; and a point of the past opened in a writable mount shares
            // its process, so the staging dir is the present's.
            return;
        }
        // Closed files still queued get a last chance to commit.
        let left = self.committer.take().map(|c| c.finish(UNMOUNT_COMMIT_WAIT)).unwrap_or_default();
        if left > 0 {
            tracing::warn!(
                changes = left,
                dir = %self.staging_dir.display(),
                "changes the mount acknowledged are not committed yet (is the node running?): they stay in its journal, and the node commits them when it runs"
            );
            return; // the lock goes with this value: the node adopts the directory
        }
        // Sessions never closed are dropped (their staging files with them): the old
        // versions stay, as after a crash.
        let _ = std::fs::remove_dir_all(&self.staging_dir);
    }
}

/// How long an operation waits for queued closes to commit before it gives up with `EIO`:
/// the time a batch of closes may take the node, and a retry. A node that is down fails the
/// wait sooner (as soon as an attempt made during the wait fails); a node that is busy
/// hashing a large close (pjdfstest's 2 GiB sparse file on a loaded machine took more than
/// 10 s) is waited for, so an `unlink` after it does not fail.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(COMMIT_CALL_TIMEOUT.as_secs() + 10);
/// How long a change sent to the node (rename, unlink, chmod …) may take before it fails
/// with `EIO`: a node stopped or stuck must not hang the programs using the mount.
const NODE_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long one batch of closes may take the node (it may hash large files the mount could
/// not): then it is sent again.
const COMMIT_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a fetch of bytes from peers may take (the node's own fetch gives up after
/// `node::mesh::FETCH_TIMEOUT`, 120 s).
const FETCH_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(150);
/// Queued directories (or their attribute changes) the mount shows before it sweeps out
/// those committed meanwhile (each is also dropped when next looked at).
const OVERLAYS_SWEEP_AT: usize = 64;
/// Bytes a read of a file still on peers fetches at least: the rest is kept for the reads
/// that follow (sequential readers), so a peer round trip serves many of them.
const READ_AHEAD_BYTES: u64 = 4 << 20;
/// How long an own change waits for its outbox event (see [`MountFs::was_own_change`]):
/// past it (the commit failed, or was folded into another), the event invalidates.
const OWN_CHANGE_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// Own changes remembered before the stale ones are swept out.
const OWN_CHANGES_MAX: usize = 100_000;

/// How long an ending mount waits for its queued closes to commit.
const UNMOUNT_COMMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The inode number a listing shows for a path this mount has not numbered: nonzero (0
/// marks a deleted entry to readdir's callers) and apart from the numbers it hands out.
fn listed_ino(path: &TreePath) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_str().bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h | (1 << 63)
}

fn attr_of(ino: u64, e: &Entry) -> Attr {
    Attr::plain(ino, e.kind, if e.kind == EntryKind::Dir { 0 } else { e.size }, e.mode & 0o7777, e.mtime_ms)
}

/// Reads local `bytes` (a remote blob goes through [`MountFs::read_from`]).
fn read_bytes(bytes: &Bytes, offset: u64, len: usize) -> FsResult<Vec<u8>> {
    match bytes {
        Bytes::Remote { hash, .. } => Err(errno(libc::EIO, format!("internal: blob {hash} is not local"))),
        Bytes::Inline(data) => {
            let start = (offset as usize).min(data.len());
            let end = start.saturating_add(len).min(data.len());
            Ok(data[start..end].to_vec())
        }
        Bytes::File { file, hash, size, checked } => {
            let end = (*size).min(offset.saturating_add(len as u64));
            let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
            let mut got = 0;
            while got < buf.len() {
                match file.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno(libc::EIO, format!("reading blob {hash}: {e}"))),
                }
            }
            if got < buf.len() {
                // The entry says the blob has these bytes: a file that ends early is damaged,
                // and a short read would pass for a shorter file.
                return Err(errno(libc::EIO, format!("blob {hash} ends at {} bytes; its entry says {size}: the content store is damaged (`alkfs blobs check`)", offset + got as u64)));
            }
            let mut c = checked.lock().unwrap_or_else(|p| p.into_inner());
            if c.upto == offset {
                if let Some(h) = c.hasher.as_mut() {
                    h.update(&buf);
                    c.upto += got as u64;
                    if c.upto == *size {
                        let h = c.hasher.take().expect("present");
                        check(hash, h.finalize()).map_err(|e| errno(libc::EIO, e.to_string()))?;
                    }
                }
            }
            Ok(buf)
        }
    }
}

/// Whether threads `a` and `b` belong to one process (thread group): the same thread, or
/// the same `Tgid` in /proc (read only when the threads differ).
fn same_process(a: u32, b: u32) -> bool {
    let tgid = |tid: u32| {
        std::fs::read_to_string(format!("/proc/{tid}/status"))
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Tgid:").and_then(|v| v.trim().parse::<u32>().ok())))
    };
    a == b || tgid(a).is_some_and(|t| Some(t) == tgid(b))
}

