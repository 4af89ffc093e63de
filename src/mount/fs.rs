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
use alknet_actors::session::WriteSession;
use alknet_actors::store::StoreError;

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
    /// The process (FUSE: the caller's pid) whose close commits. A close by another
    /// process holding the same open file (a child after fork, closing what it inherited at
    /// exec) does not: the last release does.
    pub owner: u32,
}

/// Where a read handle's bytes are.
enum Bytes {
    /// Small content, read and checked at open.
    Inline(Arc<Vec<u8>>),
    /// A blob file, checked as it is read in order.
    File { file: Arc<File>, hash: ContentHash, size: u64, checked: Mutex<Checked> },
}

/// How far a blob file has been read in order, and the hash of that prefix.
struct Checked {
    upto: u64,
    hasher: Option<blake3::Hasher>,
}

/// An open handle.
enum Handle {
    /// Reads of the version current at open.
    Read { bytes: Arc<Bytes> },
    /// A writer of inode `ino`'s write session (it may read the staged bytes too); a close
    /// by `owner` commits.
    Write { ino: u64, append: bool, owner: u32 },
    /// A directory's listing taken at opendir, paged by readdir.
    Dir { entries: Arc<Vec<(String, Attr)>> },
}

/// A file's write session and who holds it.
struct Open {
    /// The staged bytes; `None` after a close committed them while a handle stays open.
    session: Option<WriteSession>,
    /// Open write handles.
    writers: usize,
    /// Something to commit (a write, a truncate, a new file).
    dirty: bool,
    /// An mtime set while open (utimes before close), used at commit.
    mtime_ms: Option<i64>,
    /// Unlinked while open: discarded at close.
    unlinked: bool,
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
        self.by_ino.get(&ino).cloned().ok_or_else(|| errno(libc::ESTALE, format!("inode {ino} is not known (forgotten)")))
    }

    /// `path` was removed (or replaced): its inode keeps answering `getattr` with `last`
    /// until the kernel forgets it.
    fn detach(&mut self, path: &TreePath, last: Option<Attr>) {
        if let Some(ino) = self.by_path.remove(path) {
            self.by_ino.remove(&ino);
            if let Some(a) = last {
                self.gone.insert(ino, a);
            }
        }
    }

    /// Moves every path at or below `from` to below `to` (inode numbers stay).
    fn rename(&mut self, from: &TreePath, to: &TreePath, replaced: Option<Attr>) {
        self.detach(to, replaced);
        let moved: Vec<(TreePath, u64)> = self.by_path.iter().filter(|(p, _)| p.is_within(from)).map(|(p, i)| (p.clone(), *i)).collect();
        for (old, ino) in moved {
            self.by_path.remove(&old);
            if let Ok(new) = old.rebase(from, to) {
                self.by_ino.insert(ino, new.clone());
                self.by_path.insert(new, ino);
            } else {
                self.by_ino.remove(&ino);
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
}

/// A mounted branch: the layer FUSE and SFTP call.
pub struct MountFs {
    dir: PathBuf,
    scope: Scope,
    read_only: bool,
    reader: Mutex<Engine>,
    node: Option<Client>,
    staging_dir: PathBuf,
    state: Mutex<State>,
}

impl MountFs {
    /// Opens the data dir `dir` for a mount of `scope`. A writable mount needs the running
    /// node (it holds the data dir's lock and commits); a read-only one needs none.
    pub fn open(dir: &Path, scope: Scope, read_only: bool) -> anyhow::Result<Self> {
        let reader = Engine::open(dir, Access::Read)?;
        reader.branch(&scope)?; // a clear error for a missing bucket or branch, before mounting
        let node = if read_only {
            None
        } else {
            Some(Client::connect(dir).ok_or_else(|| {
                anyhow::anyhow!("no node runs on {}: start it with `alkfs --data {} node run` (or mount --read-only)", dir.display(), dir.display())
            })?)
        };
        let staging_dir = reader.content().mount_staging_dir(std::process::id());
        clear_dead_staging(&reader.content().staging_dir());
        Ok(MountFs {
            dir: dir.to_path_buf(),
            scope,
            read_only,
            reader: Mutex::new(reader),
            node,
            staging_dir,
            state: Mutex::new(State { inodes: Inodes::new(), handles: HashMap::new(), next_fh: 1, open: HashMap::new() }),
        })
    }

    /// The data dir.
    pub fn dir(&self) -> &Path {
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

    /// What `path` shows, or `ENOENT`. A file being written shows its staged size.
    pub fn stat(&self, path: &TreePath) -> FsResult<Attr> {
        let st = self.state();
        let ino = st.inodes.by_path.get(path).copied();
        if let Some(open) = ino.and_then(|i| st.open.get(&i)) {
            if !open.unlinked {
                if let Some(s) = &open.session {
                    let mtime_ms = open.mtime_ms.unwrap_or_else(alknet_actors::engine::now_ms);
                    let (size, mode) = (s.len(), s.mode());
                    return Ok(Attr { ino: ino.expect("open inode"), kind: EntryKind::File, size, mode, mtime_ms });
                }
            }
        }
        drop(st);
        let entry = self.entry(path)?.ok_or_else(|| errno(libc::ENOENT, format!("{path}: no such file or directory")))?;
        let ino = self.state().inodes.ino_of(path);
        Ok(attr_of(ino, &entry))
    }

    /// The live entry at `path` (the root is a directory).
    fn entry(&self, path: &TreePath) -> FsResult<Option<Entry>> {
        if path.is_root() {
            return Ok(Some(Entry::dir(DIR_MODE, 0)));
        }
        let row = self.reader().stat(&self.scope, path)?;
        Ok(row.and_then(|r| r.version.entry))
    }

    /// Looks `name` up in directory `parent` and counts the lookup (FUSE forgets it later).
    pub fn lookup(&self, parent: u64, name: &std::ffi::OsStr) -> FsResult<Attr> {
        let path = Self::child(&self.path_of(parent)?, name)?;
        let attr = self.stat(&path)?;
        *self.state().inodes.lookups.entry(attr.ino).or_default() += 1;
        Ok(attr)
    }

    /// Counts a lookup of `ino` that an entry reply other than [`lookup`](Self::lookup)
    /// gave the kernel (mkdir, symlink).
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
        let in_use = st.open.contains_key(&ino) || st.handles.values().any(|h| matches!(h, Handle::Write { ino: i, .. } if *i == ino));
        if !in_use {
            if let Some(path) = st.inodes.by_ino.remove(&ino) {
                st.inodes.by_path.remove(&path);
            }
        }
    }

    /// The attributes of inode `ino`.
    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        if let Some(a) = self.state().inodes.gone.get(&ino) {
            return Ok(a.clone());
        }
        let path = self.path_of(ino)?;
        self.stat(&path)
    }

    /// The children of directory `path`, sorted by name.
    pub fn list(&self, path: &TreePath) -> FsResult<Vec<(String, Attr)>> {
        match self.entry(path)? {
            None => return Err(errno(libc::ENOENT, format!("{path}: no such directory"))),
            Some(e) if e.kind != EntryKind::Dir => return Err(errno(libc::ENOTDIR, format!("{path}: not a directory"))),
            Some(_) => {}
        }
        let rows = self.reader().list(&self.scope, path)?;
        let mut st = self.state();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(entry) = row.version.entry else { continue };
            let ino = st.inodes.ino_of(&row.path);
            out.push((row.path.name().to_string(), attr_of(ino, &entry)));
        }
        // Files created here and not yet closed are listed too (a writer's `ls` sees them).
        let pending: Vec<(TreePath, u64)> = st
            .open
            .iter()
            .filter(|(_, o)| !o.unlinked && o.session.is_some())
            .filter_map(|(ino, _)| st.inodes.by_ino.get(ino).map(|p| (p.clone(), *ino)))
            .filter(|(p, _)| p.parent().as_ref() == Some(path))
            .collect();
        for (p, ino) in pending {
            if !out.iter().any(|(n, _)| n == p.name()) {
                let o = &st.open[&ino];
                let s = o.session.as_ref().expect("filtered");
                out.push((p.name().to_string(), Attr { ino, kind: EntryKind::File, size: s.len(), mode: s.mode(), mtime_ms: o.mtime_ms.unwrap_or(0) }));
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

    /// The entries of directory handle `fh` from index `from` on.
    pub fn dir_entries(&self, fh: u64) -> FsResult<Arc<Vec<(String, Attr)>>> {
        match self.state().handles.get(&fh) {
            Some(Handle::Dir { entries }) => Ok(entries.clone()),
            _ => Err(errno(libc::EBADF, "not a directory handle")),
        }
    }

    /// Opens the file at `path`. Writing opens (or joins) its write session; reading alone
    /// pins the current version.
    pub fn open_file(&self, path: &TreePath, how: OpenMode) -> FsResult<u64> {
        if how.write {
            self.writable()?;
            let ino = self.state().inodes.ino_of(path);
            self.join_session(ino, path, how.truncate, None)?;
            return Ok(self.add_handle(Handle::Write { ino, append: how.append, owner: how.owner }));
        }
        let entry = self.entry(path)?.ok_or_else(|| errno(libc::ENOENT, format!("{path}: no such file")))?;
        match entry.kind {
            EntryKind::Dir => return Err(errno(libc::EISDIR, format!("{path}: is a directory"))),
            EntryKind::Symlink => return Err(errno(libc::ELOOP, format!("{path}: is a symlink"))),
            EntryKind::File => {}
        }
        let bytes = self.bytes_of(path, &entry)?;
        Ok(self.add_handle(Handle::Read { bytes: Arc::new(bytes) }))
    }

    /// Creates the file `path` (its write session; it appears in the tree when closed).
    pub fn create(&self, path: &TreePath, mode: u32, exclusive: bool, owner: u32) -> FsResult<(u64, Attr)> {
        self.writable()?;
        if let Some(parent) = path.parent() {
            match self.entry(&parent)? {
                Some(e) if e.kind == EntryKind::Dir => {}
                Some(_) => return Err(errno(libc::ENOTDIR, format!("{parent}: not a directory"))),
                None => return Err(errno(libc::ENOENT, format!("{parent}: no such directory"))),
            }
        }
        if let Ok(attr) = self.stat(path) {
            if exclusive {
                return Err(errno(libc::EEXIST, format!("{path}: already exists")));
            }
            if attr.kind == EntryKind::Dir {
                return Err(errno(libc::EISDIR, format!("{path}: is a directory")));
            }
        }
        let ino = self.state().inodes.ino_of(path);
        self.join_session(ino, path, true, Some(mode & 0o7777))?;
        let fh = self.add_handle(Handle::Write { ino, append: false, owner });
        let attr = self.stat(path)?;
        *self.state().inodes.lookups.entry(attr.ino).or_default() += 1;
        Ok((fh, attr))
    }

    /// Opens inode `ino`'s write session, or joins the one open; `truncate` empties it.
    fn join_session(&self, ino: u64, path: &TreePath, truncate: bool, new_mode: Option<u32>) -> FsResult<()> {
        let mut st = self.state();
        if let Some(open) = st.open.get_mut(&ino) {
            if open.session.is_none() {
                drop(st);
                let session = self.new_session(path, truncate)?;
                st = self.state();
                let open = st.open.get_mut(&ino).expect("held while a writer is open");
                open.session = Some(session);
            } else if truncate {
                open.session.as_mut().expect("checked").truncate(0)?;
            }
            let open = st.open.get_mut(&ino).expect("present");
            open.writers += 1;
            open.dirty |= truncate;
            return Ok(());
        }
        drop(st);
        let mut session = self.new_session(path, truncate)?;
        if let Some(mode) = new_mode {
            session.set_mode(mode);
        }
        let mut st = self.state();
        st.open.insert(ino, Open { session: Some(session), writers: 1, dirty: truncate || new_mode.is_some(), mtime_ms: None, unlinked: false });
        Ok(())
    }

    fn new_session(&self, path: &TreePath, truncate: bool) -> FsResult<WriteSession> {
        let reader = self.reader();
        if !truncate {
            if let Some(e) = reader.stat(&self.scope, path)?.and_then(|r| r.version.entry) {
                if e.kind == EntryKind::File && !reader.has_bytes(&e.hash)? {
                    drop(reader);
                    self.fetch(&e)?;
                    return Ok(self.reader().open_session_in(&self.scope, path, truncate, Some(&self.staging_dir))?);
                }
            }
        }
        Ok(reader.open_session_in(&self.scope, path, truncate, Some(&self.staging_dir))?)
    }

    /// The bytes of `entry` for a read handle; a blob still on a peer is fetched first (the
    /// node does it, and answers once the bytes are here).
    fn bytes_of(&self, path: &TreePath, entry: &Entry) -> FsResult<Bytes> {
        if !self.reader().has_bytes(&entry.hash)? {
            self.fetch(entry)?;
        }
        if entry.size <= alknet_actors::content::INLINE_BYTES_MAX as u64 {
            let mut data = Vec::with_capacity(entry.size as usize);
            if self.reader().read_entry(entry, &mut data, |_| {}).is_ok() {
                return Ok(Bytes::Inline(Arc::new(data)));
            }
        }
        let file = self.reader().content().open_file(&entry.hash).map_err(|e| errno(libc::EIO, format!("{path}: {e}")))?;
        Ok(Bytes::File { file: Arc::new(file), hash: entry.hash, size: entry.size, checked: Mutex::new(Checked { upto: 0, hasher: Some(blake3::Hasher::new()) }) })
    }

    fn fetch(&self, entry: &Entry) -> FsResult<()> {
        let connected;
        let client = match &self.node {
            Some(c) => c,
            None => {
                connected = Client::connect(&self.dir).ok_or_else(|| errno(libc::EIO, "the bytes are on a peer and no node runs to fetch them: start `alkfs node run`"))?;
                &connected
            }
        };
        let req = Request::Fetch { hash: entry.hash.to_hex(), size: entry.size };
        client.call(&req).map(|_| ()).map_err(|e| errno(libc::EIO, format!("fetching the bytes from peers: {e:#}")))
    }

    /// Reads up to `len` bytes at `offset` through handle `fh`.
    pub fn read(&self, fh: u64, offset: u64, len: usize) -> FsResult<Vec<u8>> {
        let source = match self.state().handles.get(&fh) {
            Some(Handle::Read { bytes }) => Ok(bytes.clone()),
            Some(Handle::Write { ino, .. }) => Err(*ino),
            _ => return Err(errno(libc::EBADF, "not a file handle")),
        };
        match source {
            Ok(bytes) => read_bytes(&bytes, offset, len),
            Err(ino) => {
                let st = self.state();
                let session = st.open.get(&ino).and_then(|o| o.session.as_ref());
                match session {
                    Some(s) => {
                        let end = s.len().min(offset.saturating_add(len as u64));
                        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
                        let n = s.read_at(offset, &mut buf)?;
                        buf.truncate(n);
                        Ok(buf)
                    }
                    None => {
                        // Committed by an earlier close while this handle stayed open: read
                        // what was committed.
                        let path = st.inodes.path(ino)?;
                        drop(st);
                        let entry = self.entry(&path)?.ok_or_else(|| errno(libc::ENOENT, format!("{path}: gone")))?;
                        read_bytes(&self.bytes_of(&path, &entry)?, offset, len)
                    }
                }
            }
        }
    }

    /// Writes `data` at `offset` through write handle `fh`; returns bytes written.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        let (ino, append) = match self.state().handles.get(&fh) {
            Some(Handle::Write { ino, append, .. }) => (*ino, *append),
            Some(Handle::Read { .. }) => return Err(errno(libc::EBADF, "the file was opened read-only")),
            _ => return Err(errno(libc::EBADF, "not a file handle")),
        };
        self.ensure_session(ino)?;
        let mut st = self.state();
        let open = st.open.get_mut(&ino).ok_or_else(|| errno(libc::EBADF, "no write session"))?;
        let session = open.session.as_mut().expect("ensured");
        let at = if append { session.len() } else { offset };
        session.write_at(at, data)?;
        open.dirty = true;
        Ok(data.len())
    }

    /// A handle whose session an earlier close committed writes again: reopen from the
    /// committed bytes.
    fn ensure_session(&self, ino: u64) -> FsResult<()> {
        let st = self.state();
        if st.open.get(&ino).is_some_and(|o| o.session.is_some()) {
            return Ok(());
        }
        let path = st.inodes.path(ino)?;
        drop(st);
        let session = self.new_session(&path, false)?;
        let mut st = self.state();
        let open = st.open.entry(ino).or_insert(Open { session: None, writers: 1, dirty: false, mtime_ms: None, unlinked: false });
        open.session = Some(session);
        Ok(())
    }

    /// `fsync`: the staged bytes are made durable where they are; the commit waits for close.
    pub fn fsync(&self, fh: u64) -> FsResult<()> {
        let st = self.state();
        if let Some(Handle::Write { ino, .. }) = st.handles.get(&fh) {
            if let Some(s) = st.open.get(ino).and_then(|o| o.session.as_ref()) {
                s.sync()?;
            }
        }
        Ok(())
    }

    /// A close(2) of a descriptor of `fh` by process `by`: the last writer's close by the
    /// process that opened it commits.
    pub fn flush(&self, fh: u64, by: u32) -> FsResult<()> {
        let ino = match self.state().handles.get(&fh) {
            Some(Handle::Write { ino, owner, .. }) if *owner == by => *ino,
            _ => return Ok(()),
        };
        let last = self.state().open.get(&ino).is_some_and(|o| o.writers == 1);
        if last {
            self.commit(ino)?;
        }
        Ok(())
    }

    /// The handle is gone: a write handle's close commits if it was the last writer.
    pub fn release(&self, fh: u64) -> FsResult<()> {
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
        if st.open.get(&ino).is_some_and(|o| o.writers == 0) {
            if let Some(open) = st.open.remove(&ino) {
                drop(open.session); // an unlinked or failed session's staging file goes
            }
        }
        if st.inodes.lookups.get(&ino).copied().unwrap_or(0) == 0 && !st.open.contains_key(&ino) {
            if let Some(path) = st.inodes.by_ino.remove(&ino) {
                st.inodes.by_path.remove(&path);
            }
        }
        result
    }

    /// The handle's client went away without closing it (an SFTP connection dropped):
    /// what it wrote is not committed unless another writer still holds the file.
    pub fn abandon(&self, fh: u64) {
        let mut st = self.state();
        let Some(Handle::Write { ino, .. }) = st.handles.remove(&fh) else { return };
        if let Some(open) = st.open.get_mut(&ino) {
            open.writers = open.writers.saturating_sub(1);
            if open.writers == 0 {
                st.open.remove(&ino);
            }
        }
    }

    /// Commits inode `ino`'s session if it has changes: the node takes the staging file.
    fn commit(&self, ino: u64) -> FsResult<()> {
        let (session, path, mtime_ms) = {
            let mut st = self.state();
            let Some(open) = st.open.get(&ino) else { return Ok(()) };
            if !open.dirty || open.unlinked || open.session.is_none() {
                return Ok(());
            }
            let path = st.inodes.path(ino)?;
            let open = st.open.get_mut(&ino).expect("checked");
            open.dirty = false;
            let mtime = open.mtime_ms.take();
            (open.session.take().expect("checked"), path, mtime)
        };
        let mode = session.mode();
        let (staging, _, hash) = session.hand_off()?;
        let req = Request::PutStaged {
            scope: self.wire(),
            path: path.to_string(),
            staging: staging.clone(),
            hash: hash.map(|h| h.to_hex()),
            mode,
            mtime_ms: mtime_ms.unwrap_or_else(alknet_actors::engine::now_ms),
        };
        let result = self.call(req);
        if result.is_err() {
            let _ = std::fs::remove_file(&staging); // the node did not take it
        }
        result.map(|_| ())
    }

    /// Releases directory handle `fh`.
    pub fn releasedir(&self, fh: u64) {
        self.state().handles.remove(&fh);
    }

    // ---- changes ----

    /// `setattr`: mode, mtime and size (truncate). An open write session takes them; else
    /// each is one commit.
    pub fn setattr(&self, path: &TreePath, mode: Option<u32>, mtime_ms: Option<i64>, size: Option<u64>) -> FsResult<Attr> {
        if mode.is_none() && mtime_ms.is_none() && size.is_none() {
            return self.stat(path);
        }
        self.writable()?;
        let ino = self.state().inodes.ino_of(path);
        let in_session = self.state().open.get(&ino).is_some_and(|o| o.session.is_some() && !o.unlinked);
        if in_session {
            let mut st = self.state();
            let open = st.open.get_mut(&ino).expect("checked");
            let s = open.session.as_mut().expect("checked");
            if let Some(m) = mode {
                s.set_mode(m & 0o7777);
            }
            if let Some(len) = size {
                s.truncate(len)?;
            }
            if mtime_ms.is_some() {
                open.mtime_ms = mtime_ms;
            }
            open.dirty = true;
            drop(st);
            return self.stat(path);
        }
        let entry = self.entry(path)?.ok_or_else(|| errno(libc::ENOENT, format!("{path}: no such file")))?;
        if let Some(len) = size {
            if entry.kind == EntryKind::Dir {
                return Err(errno(libc::EISDIR, format!("{path}: is a directory")));
            }
            if len != entry.size || mode.is_some() || mtime_ms.is_some() {
                let mut session = self.new_session(path, len == 0)?;
                session.truncate(len)?;
                if let Some(m) = mode {
                    session.set_mode(m & 0o7777);
                }
                self.state().open.insert(ino, Open { session: Some(session), writers: 0, dirty: true, mtime_ms, unlinked: false });
                let result = self.commit(ino);
                self.state().open.remove(&ino);
                result?;
            }
            return self.stat(path);
        }
        if path.is_root() {
            return self.stat(path);
        }
        self.call(Request::SetAttr { scope: self.wire(), path: path.to_string(), mode, mtime_ms })?;
        self.stat(path)
    }

    /// `mkdir`.
    pub fn mkdir(&self, path: &TreePath, mode: u32) -> FsResult<Attr> {
        self.writable()?;
        if self.stat(path).is_ok() {
            return Err(errno(libc::EEXIST, format!("{path}: already exists")));
        }
        self.check_parent(path)?;
        self.call(Request::Mkdir { scope: self.wire(), path: path.to_string(), parents: false })?;
        if mode & 0o7777 != DIR_MODE {
            self.call(Request::SetAttr { scope: self.wire(), path: path.to_string(), mode: Some(mode & 0o7777), mtime_ms: None })?;
        }
        self.stat(path)
    }

    fn check_parent(&self, path: &TreePath) -> FsResult<()> {
        let Some(parent) = path.parent() else { return Ok(()) };
        match self.entry(&parent)? {
            Some(e) if e.kind == EntryKind::Dir => Ok(()),
            Some(_) => Err(errno(libc::ENOTDIR, format!("{parent}: not a directory"))),
            None => Err(errno(libc::ENOENT, format!("{parent}: no such directory"))),
        }
    }

    /// `symlink`: a link at `path` to `target`.
    pub fn symlink(&self, path: &TreePath, target: &str) -> FsResult<Attr> {
        self.writable()?;
        if target.is_empty() || target.len() > SYMLINK_TARGET_BYTES_MAX || target.contains('\0') {
            return Err(errno(libc::ENAMETOOLONG, format!("a link target must be 1 to {SYMLINK_TARGET_BYTES_MAX} bytes")));
        }
        if self.stat(path).is_ok() {
            return Err(errno(libc::EEXIST, format!("{path}: already exists")));
        }
        self.check_parent(path)?;
        self.call(Request::Symlink { scope: self.wire(), path: path.to_string(), target: target.to_string() })?;
        self.stat(path)
    }

    /// `unlink` (files and symlinks) or `rmdir` (empty directories).
    pub fn remove(&self, path: &TreePath, dir: bool) -> FsResult<()> {
        self.writable()?;
        let ino = self.state().inodes.by_path.get(path).copied();
        let pending = ino.is_some_and(|i| self.state().open.get(&i).is_some_and(|o| o.session.is_some() && !o.unlinked));
        let entry = self.entry(path)?;
        match (&entry, dir) {
            (None, _) if pending && !dir => {}
            (None, _) => return Err(errno(libc::ENOENT, format!("{path}: no such file or directory"))),
            (Some(e), true) if e.kind != EntryKind::Dir => return Err(errno(libc::ENOTDIR, format!("{path}: not a directory"))),
            (Some(e), false) if e.kind == EntryKind::Dir => return Err(errno(libc::EISDIR, format!("{path}: is a directory"))),
            (Some(_), true) => {
                if path.is_root() {
                    return Err(errno(libc::EBUSY, "the root cannot be removed"));
                }
                if !self.list(path)?.is_empty() {
                    return Err(errno(libc::ENOTEMPTY, format!("{path}: directory not empty")));
                }
            }
            (Some(_), false) => {}
        }
        let last = self.stat(path).ok();
        if entry.is_some() {
            self.call(Request::Remove { scope: self.wire(), path: path.to_string(), recursive: false })?;
        }
        let mut st = self.state();
        if let Some(ino) = ino {
            if let Some(open) = st.open.get_mut(&ino) {
                open.unlinked = true;
            }
        }
        st.inodes.detach(path, last);
        Ok(())
    }

    /// `rename(2)`: `from` to exactly `to`, replacing a file or an empty directory there
    /// (unless `noreplace`).
    pub fn rename(&self, from: &TreePath, to: &TreePath, noreplace: bool) -> FsResult<()> {
        self.writable()?;
        if from == to {
            return Ok(());
        }
        if to.is_within(from) {
            return Err(errno(libc::EINVAL, format!("cannot move {from} into itself ({to})")));
        }
        if from.is_root() || to.is_root() {
            return Err(errno(libc::EBUSY, "the root cannot be moved or replaced"));
        }
        let src = self.stat(from)?;
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
        let in_tree = self.entry(from)?.is_some();
        if in_tree {
            self.call(Request::MoveOver { scope: self.wire(), from: from.to_string(), to: to.to_string() })?;
        } else if self.entry(to)?.is_some() {
            // A file still being written moves over a committed one: the old one goes now,
            // the new bytes arrive at close.
            self.call(Request::Remove { scope: self.wire(), path: to.to_string(), recursive: false })?;
        }
        let mut st = self.state();
        if let Some(old) = st.inodes.by_path.get(to).copied() {
            if let Some(open) = st.open.get_mut(&old) {
                open.unlinked = true;
            }
        }
        st.inodes.rename(from, to, replaced);
        // A moved file with a session open commits to its new path; mark it so a new file
        // (not yet in the tree) still commits.
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
        // Sessions never closed are dropped (their staging files with them): the old
        // versions stay, as after a crash.
        let _ = std::fs::remove_dir_all(&self.staging_dir);
    }
}

fn attr_of(ino: u64, e: &Entry) -> Attr {
    Attr { ino, kind: e.kind, size: if e.kind == EntryKind::Dir { 0 } else { e.size }, mode: e.mode & 0o7777, mtime_ms: e.mtime_ms }
}

fn read_bytes(bytes: &Bytes, offset: u64, len: usize) -> FsResult<Vec<u8>> {
    match bytes {
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
            buf.truncate(got);
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

/// Removes the staging directories of mounts whose process is gone (killed mid-write).
fn clear_dead_staging(staging: &Path) {
    let Ok(entries) = std::fs::read_dir(staging) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(alknet_actors::content::MOUNT_STAGING_PREFIX)).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
