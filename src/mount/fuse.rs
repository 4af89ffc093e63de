//! The FUSE front-end (`alkfs mount`): a thin shell that turns kernel requests into calls of
//! the filesystem layer ([`MountFs`]) and its answers into replies.
//!
//! Every file handle is opened with `FOPEN_DIRECT_IO`: the kernel keeps no page cache of our
//! files, so a reader's handle reads exactly the version it pinned at open while a writer
//! stages new bytes (merge on close), and bytes that arrive from peers are never shadowed by
//! stale pages. `FUSE_DIRECT_IO_ALLOW_MMAP` keeps mmap working (git maps its index and
//! packs). The kernel caches attributes and names for a while ([`ATTR_TTL`] by default);
//! changes from peers, the CLI and SFTP are invalidated as they commit ([`super::invalidate`]),
//! and the TTL bounds what a missed invalidation could leave stale.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alknet_actors::proto::entry::EntryKind;
use fuser::{
    AccessFlags, Config, Errno as FuseErrno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

use super::fs::{Attr, Errno, FsResult, MountFs, OpenMode, ROOT_INO};
use super::past::{self, Past, Target, AT_DIR, AT_INO, CONTROL_DIR, CONTROL_INO};
use super::poll::Poller;
use super::workers::Workers;

/// How long the kernel may trust an attribute or a name before asking again, by default
/// (`alkfs mount --cache-secs`).
pub const ATTR_TTL: Duration = Duration::from_secs(1);
/// The same for a mount of the past (`--at`), which does not change.
const PAST_TTL: Duration = Duration::from_secs(3600);
/// Largest write request the kernel sends (bigger requests mean fewer round trips).
const MAX_WRITE_BYTES: u32 = 1 << 20;

/// The FUSE filesystem over a [`MountFs`], and the past beside it ([`Past`]).
pub struct Fuse {
    fs: Arc<MountFs>,
    /// `.alkfs/at/<point>/`: the points of the past opened in this mount.
    past: Past,
    /// How attributes are shown (owner, cache time).
    shape: Shape,
    /// Requests that may wait (see [`super::workers`]).
    workers: Workers,
    /// When the mount started: the time the virtual directories show.
    started: SystemTime,
    /// Spin through bursts of requests (see [`super::poll`]); None with `--no-poll`.
    poller: Option<Arc<Poller>>,
    /// Where the mount is (absolute), and whether links are shown as stored
    /// (`--outside-links`) instead of inside the bucket ([`super::links`]).
    links: LinkPolicy,
}

/// How a mount shows symlinks ([`super::links`]).
#[derive(Clone, Debug)]
pub struct LinkPolicy {
    /// The mount point, absolute.
    pub mountpoint: std::path::PathBuf,
    /// Show targets as stored, wherever they lead (the user trusts every member).
    pub outside: bool,
}

/// How the mount shows attributes: files as owned by the mounting user, cached this long.
#[derive(Clone, Copy, Debug)]
struct Shape {
    uid: u32,
    gid: u32,
    ttl: Duration,
}

impl Shape {
    fn ttl(&self, base: u64) -> Duration {
        if base == 0 {
            self.ttl
        } else {
            PAST_TTL
        }
    }

    fn file_attr(&self, base: u64, a: &Attr) -> FileAttr {
        let at = |ms: i64| UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
        let mtime = at(a.mtime_ms);
        let kind = match a.kind {
            EntryKind::File => FileType::RegularFile,
            EntryKind::Dir => FileType::Directory,
            EntryKind::Symlink => FileType::Symlink,
        };
        FileAttr {
            ino: INodeNo(past::global(base, a.ino)),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: a.atime_ms.map_or(mtime, at),
            mtime,
            ctime: if a.ctime_ms > 0 { at(a.ctime_ms) } else { mtime },
            crtime: mtime,
            kind,
            perm: (a.mode & 0o7777) as u16,
            // A directory's count of subdirectories is not kept: 1 says "unknown" (as btrfs
            // does), so find(1) does not skip subdirectories it counted on. An open file
            // unlinked here has none.
            nlink: u32::from(a.linked),
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 128 * 1024,
            flags: 0,
        }
    }

    fn entry(&self, reply: ReplyEntry, base: u64, r: FsResult<Attr>) {
        match r {
            Ok(a) => reply.entry(&self.ttl(base), &self.file_attr(base, &a), Generation(0)),
            Err(e) => reply.error(fail(e)),
        }
    }
}

/// A layer that answers for an inode: the present's or a point's, the inode's number
/// there, and the base that makes it the kernel's number ([`past::global`]).
struct Layer {
    fs: Arc<MountFs>,
    ino: u64,
    base: u64,
}

impl Fuse {
    /// A FUSE shell over `fs`; files show as owned by `uid`:`gid` (the mounting user).
    pub fn new(fs: Arc<MountFs>, uid: u32, gid: u32, ttl: Duration, poller: Option<Arc<Poller>>, links: LinkPolicy) -> std::io::Result<Self> {
        let past = Past::new(fs.data_dir(), fs.scope());
        Ok(Fuse { fs, past, shape: Shape { uid, gid, ttl }, workers: Workers::start()?, started: SystemTime::now(), poller, links })
    }

    /// Every request notes itself, so the poller spins through a burst.
    fn busy(&self) {
        if let Some(p) = &self.poller {
            p.request()
        }
    }

    /// The layer of kernel inode `ino`. The two virtual directories have none: what only
    /// files and the tree's directories do is refused there as on a read-only filesystem.
    fn layer(&self, ino: INodeNo) -> FsResult<Layer> {
        match self.past.route(ino.0)? {
            Target::Present(ino) => Ok(Layer { fs: self.fs.clone(), ino, base: 0 }),
            Target::Past { fs, ino, base } => Ok(Layer { fs, ino, base }),
            Target::Control | Target::At => Err(Errno::new(libc::EROFS, format!("{CONTROL_DIR} is read-only"))),
        }
    }

    /// How long the kernel may keep what a layer at `base` answered: the past does not change.
    fn ttl(&self, base: u64) -> Duration {
        self.shape.ttl(base)
    }

    fn file_attr(&self, base: u64, a: &Attr) -> FileAttr {
        self.shape.file_attr(base, a)
    }

    /// `.alkfs` or `.alkfs/at`: read-only directories.
    fn virtual_attr(&self, ino: u64) -> FileAttr {
        let mtime = self.started.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        self.file_attr(0, &Attr::plain(ino, EntryKind::Dir, 0, 0o555, mtime))
    }

    fn entry(&self, reply: ReplyEntry, base: u64, r: FsResult<Attr>) {
        self.shape.entry(reply, base, r)
    }

    fn attr(&self, reply: ReplyAttr, base: u64, r: FsResult<Attr>) {
        match r {
            Ok(a) => reply.attr(&self.ttl(base), &self.file_attr(base, &a)),
            Err(e) => reply.error(fail(e)),
        }
    }

    /// The layer of directory `parent` and the path of its child `name` there. The control
    /// directory's name in the root is taken: `taken` is the errno for using it.
    fn child(&self, parent: INodeNo, name: &OsStr, taken: i32) -> FsResult<(Layer, alknet_actors::proto::path::TreePath)> {
        if past::is_control(parent.0, name) {
            return Err(Errno::new(taken, format!("{CONTROL_DIR} in a mount's root is the way to the past (.alkfs/at/<time>/)")));
        }
        let layer = self.layer(parent)?;
        let path = MountFs::child(&layer.fs.path_of(layer.ino)?, name)?;
        Ok((layer, path))
    }

    /// The listing of a virtual directory: `(ino, name)` after `.` and `..`.
    fn virtual_entries(&self, target: &Target) -> Vec<(u64, FileType, String)> {
        match target {
            Target::Control => vec![(CONTROL_INO, FileType::Directory, ".".into()), (ROOT_INO, FileType::Directory, "..".into()), (AT_INO, FileType::Directory, AT_DIR.into())],
            _ => {
                let mut out = vec![(AT_INO, FileType::Directory, ".".into()), (CONTROL_INO, FileType::Directory, "..".into())];
                out.extend(self.past.listing().into_iter().map(|(ino, name)| (ino, FileType::Directory, name)));
                out
            }
        }
    }
}

/// The kernel's errno for `e`; failures other than the everyday ones are logged.
fn fail(e: Errno) -> FuseErrno {
    match e.code {
        libc::ENOENT | libc::EEXIST | libc::ENOTEMPTY | libc::ENOTDIR | libc::EISDIR | libc::EROFS => tracing::debug!(error = %e, "mount"),
        _ => tracing::warn!(error = %e, "mount"),
    }
    FuseErrno::from_i32(e.code)
}

fn empty(reply: ReplyEmpty, r: FsResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(fail(e)),
    }
}

fn time_ms(t: TimeOrNow) -> i64 {
    let t = match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    };
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

fn open_mode(flags: i32, owner: u32) -> OpenMode {
    let acc = flags & libc::O_ACCMODE;
    OpenMode {
        read: acc == libc::O_RDONLY || acc == libc::O_RDWR,
        write: acc == libc::O_WRONLY || acc == libc::O_RDWR,
        truncate: flags & libc::O_TRUNC != 0,
        append: flags & libc::O_APPEND != 0,
        owner,
    }
}

/// The mode of file `ino` of `fs` with its set-user-id bit cleared, and set-group-id when
/// group execute is set (what chown(2) and write(2) do), or None when nothing is to clear.
fn without_setid(fs: &MountFs, ino: u64, fh: Option<u64>) -> Option<u32> {
    // Through the handle, the writer's own view (a mode it set since opening).
    let attr = fs.getattr(ino, fh).ok()?;
    if attr.kind != EntryKind::File {
        return None;
    }
    let m = attr.mode;
    let sgid = m & libc::S_ISGID != 0 && m & libc::S_IXGRP != 0;
    let cleared = m & !libc::S_ISUID & !(if sgid { libc::S_ISGID } else { 0 });
    (cleared != m).then_some(cleared)
}

impl Filesystem for Fuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE_BYTES);
        let _ = config.set_max_background(64);
        // ATOMIC_O_TRUNC: open(O_TRUNC) arrives as one request, so overwriting a file does
        // not first copy (or fetch from peers) the bytes it is about to drop.
        // HANDLE_KILLPRIV_V2: this filesystem clears set-user/group-id bits itself (see
        // `setattr` and `write`), which spares the kernel a GETATTR before every chown: tar
        // run as root chowns every file it writes.
        for flag in [InitFlags::FUSE_ATOMIC_O_TRUNC, InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP, InitFlags::FUSE_PARALLEL_DIROPS, InitFlags::FUSE_HANDLE_KILLPRIV_V2] {
            if let Err(missing) = config.add_capabilities(flag) {
                tracing::debug!(?missing, "the kernel does not offer a FUSE capability");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.busy();
        match self.past.route(parent.0) {
            Ok(Target::Present(p)) if past::is_control(p, name) => reply.entry(&self.shape.ttl, &self.virtual_attr(CONTROL_INO), Generation(0)),
            Ok(Target::Present(p)) => self.entry(reply, 0, self.fs.lookup(p, name)),
            Ok(Target::Control) if name == AT_DIR => reply.entry(&self.shape.ttl, &self.virtual_attr(AT_INO), Generation(0)),
            Ok(Target::Control) => reply.error(FuseErrno::ENOENT),
            Ok(Target::At) => {
                let r = self.past.open(name).and_then(|(base, fs)| Ok((base, fs.stat(&alknet_actors::proto::path::TreePath::root())?)));
                match r {
                    Ok((base, a)) => self.entry(reply, base, Ok(a)),
                    Err(e) => reply.error(fail(e)),
                }
            }
            Ok(Target::Past { fs, ino, base }) => self.entry(reply, base, fs.lookup(ino, name)),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.busy();
        match self.past.route(ino.0) {
            Ok(Target::Present(i)) => self.fs.forget(i, nlookup),
            Ok(Target::Past { fs, ino, .. }) => fs.forget(ino, nlookup),
            _ => {}
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.busy();
        let fh = fh.map(|f| f.0);
        match self.past.route(ino.0) {
            Ok(Target::Control | Target::At) => reply.attr(&self.shape.ttl, &self.virtual_attr(ino.0)),
            Ok(Target::Present(i)) => self.attr(reply, 0, self.fs.getattr(i, fh)),
            Ok(Target::Past { fs, ino, base }) => self.attr(reply, base, fs.getattr(ino, fh)),
            Err(e) => reply.error(fail(e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.busy();
        let l = match self.layer(ino) {
            Ok(l) => l,
            Err(e) => return reply.error(fail(e)),
        };
        // Owners are not stored: every file is the mounting user's. A chown to that owner
        // (what `cp -a`, `rsync -a` and `tar` do with their own files) succeeds and, as
        // chown(2) does, clears the set-user-id bit (and set-group-id with group exec);
        // one to another owner cannot be kept: EPERM, as chown(2) says.
        if uid.is_some_and(|u| u != self.shape.uid) || gid.is_some_and(|g| g != self.shape.gid) {
            return reply.error(FuseErrno::EPERM);
        }
        let mode = match mode {
            None if uid.is_some() || gid.is_some() => without_setid(&l.fs, l.ino, fh.map(|h| h.0)),
            m => m,
        };
        if let Some(at) = atime {
            if let Err(e) = l.fs.set_atime(l.ino, time_ms(at)) {
                return reply.error(fail(e));
            }
        }
        let r = l.fs.setattr_ino(l.ino, mode, mtime.map(time_ms), size);
        self.attr(reply, l.base, r)
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.busy();
        let shown = self.layer(ino).and_then(|l| {
            let path = l.fs.path_of(l.ino)?;
            let target = l.fs.readlink(&path)?;
            Ok(if self.links.outside { target } else { super::links::shown(&path, &target, &self.links.mountpoint) })
        });
        match shown {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.busy();
        match self.child(parent, name, libc::EEXIST) {
            Ok((l, p)) => {
                let r = l.fs.mkdir(&p, mode & !umask).inspect(|a| l.fs.count_lookup(a.ino));
                self.entry(reply, l.base, r)
            }
            Err(e) => reply.error(fail(e)),
        }
    }

    // unlink, rmdir, symlink and rename wait for the write-behind queue and the node: on a
    // worker (see `workers`).
    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.busy();
        match self.child(parent, name, libc::EISDIR) {
            Ok((l, p)) => self.workers.run(move || empty(reply, l.fs.remove(&p, false))),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.busy();
        match self.child(parent, name, libc::EBUSY) {
            Ok((l, p)) => self.workers.run(move || empty(reply, l.fs.remove(&p, true))),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.busy();
        let r = self.child(parent, link_name, libc::EEXIST).and_then(|(l, p)| {
            let target = target.to_str().ok_or_else(|| Errno::new(libc::EINVAL, "link targets must be UTF-8"))?;
            Ok((l, p, super::links::stored(target, &self.links.mountpoint)))
        });
        match r {
            Ok((l, p, target)) => {
                let shape = self.shape;
                self.workers.run(move || {
                    let made = l.fs.symlink(&p, &target).inspect(|a| l.fs.count_lookup(a.ino));
                    shape.entry(reply, l.base, made)
                })
            }
            Err(e) => reply.error(fail(e)),
        }
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        self.busy();
        if flags.contains(RenameFlags::RENAME_EXCHANGE) || flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(FuseErrno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let r = self.child(parent, name, libc::EBUSY).and_then(|(l, from)| {
            let (to_layer, to) = self.child(newparent, newname, libc::EBUSY)?;
            if to_layer.base != l.base {
                return Err(Errno::new(libc::EXDEV, "a rename between the present and the past"));
            }
            Ok((l, from, to))
        });
        match r {
            Ok((l, from, to)) => self.workers.run(move || empty(reply, l.fs.rename(&from, &to, noreplace))),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        self.busy();
        // Hard links have no place in a tree of paths; tools (git) fall back to rename.
        reply.error(FuseErrno::EPERM)
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        self.busy();
        // Extended attributes are not kept. ENOSYS (rather than "no such attribute") tells
        // the kernel once for all, so it stops asking for `security.capability` at every
        // chown; programs then get EOPNOTSUPP, the usual answer of a filesystem without them.
        reply.error(FuseErrno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        self.busy();
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.busy();
        // Asked only when the kernel does not check permissions itself (a mount by root).
        // Root may do anything but run a file no one may run; the owner has the owner's
        // bits; nothing is written in the past or in a read-only mount.
        let l = match self.past.route(ino.0) {
            Ok(Target::Control | Target::At) if mask.contains(AccessFlags::W_OK) => return reply.error(FuseErrno::EROFS),
            Ok(Target::Control | Target::At) => return reply.ok(),
            Ok(_) => match self.layer(ino) {
                Ok(l) => l,
                Err(e) => return reply.error(fail(e)),
            },
            Err(e) => return reply.error(fail(e)),
        };
        if mask.contains(AccessFlags::W_OK) && l.fs.is_read_only() {
            return reply.error(FuseErrno::EROFS);
        }
        if req.uid() == 0 && !mask.contains(AccessFlags::X_OK) {
            return reply.ok(); // nothing to look up
        }
        let a = match l.fs.getattr(l.ino, None) {
            Ok(a) => a,
            Err(e) => return reply.error(fail(e)),
        };
        let allowed = if req.uid() == 0 {
            !(a.kind == EntryKind::File && a.mode & 0o111 == 0)
        } else {
            let want = (mask.bits() as u32 & 0o7) << 6;
            a.mode & want == want
        };
        if allowed {
            reply.ok()
        } else {
            reply.error(FuseErrno::EACCES)
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.busy();
        let how = open_mode(flags.0, req.pid());
        let open = move |l: &Layer, p: &alknet_actors::proto::path::TreePath, reply: ReplyOpen| match l.fs.open_file(p, how) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(fail(e)),
        };
        match self.layer(ino).and_then(|l| Ok((l.fs.path_of(l.ino)?, l))) {
            // Its bytes are on a peer (fetched first, for writing or a small file): on a worker.
            Ok((p, l)) if l.fs.bytes_elsewhere(&p) => self.workers.run(move || open(&l, &p, reply)),
            Ok((p, l)) => open(&l, &p, reply),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        self.busy();
        let how = open_mode(flags, req.pid());
        let r = self.child(parent, name, libc::EEXIST).and_then(|(l, p)| {
            let (fh, a) = l.fs.create(&p, mode & !umask, how, flags & libc::O_EXCL != 0)?;
            l.fs.count_lookup(a.ino);
            Ok((fh, a, l.base))
        });
        match r {
            Ok((fh, a, base)) => reply.created(&self.ttl(base), &self.file_attr(base, &a), Generation(0), FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(fail(e)),
        }
    }

    /// A regular file is made as `create` would (and closed); fifos, sockets and device
    /// files are not kept (the tree holds files, directories and symlinks): EPERM, the errno
    /// mknod(2) names for a type the file system does not support (EEXIST first if the
    /// name is taken).
    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, _rdev: u32, reply: ReplyEntry) {
        self.busy();
        let r = self.child(parent, name, libc::EEXIST).and_then(|(l, p)| {
            if mode & libc::S_IFMT != libc::S_IFREG {
                if l.fs.stat(&p).is_ok() {
                    return Err(Errno::new(libc::EEXIST, format!("{p} exists")));
                }
                return Err(Errno::new(libc::EPERM, format!("{p}: fifos, sockets and device files are not kept on alkfs mounts")));
            }
            let (fh, a) = l.fs.create(&p, mode & 0o7777 & !umask, open_mode(libc::O_WRONLY, req.pid()), true)?;
            l.fs.release(fh)?;
            l.fs.count_lookup(a.ino);
            Ok((a, l.base))
        });
        match r {
            Ok((a, base)) => self.entry(reply, base, Ok(a)),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn read(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyData) {
        self.busy();
        let read = move |l: &Layer, reply: ReplyData| match l.fs.read(fh.0, offset, size as usize) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(fail(e)),
        };
        match self.layer(ino) {
            // Bytes still on a peer, fetched by range: on a worker.
            Ok(l) if l.fs.reads_from_peers(fh.0) => self.workers.run(move || read(&l, reply)),
            Ok(l) => read(&l, reply),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.busy();
        let l = match self.layer(ino) {
            Ok(l) => l,
            Err(e) => return reply.error(fail(e)),
        };
        // The kernel asks (HANDLE_KILLPRIV_V2) when an unprivileged write must drop the
        // set-user/group-id bits.
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            if let Some(m) = without_setid(&l.fs, l.ino, Some(fh.0)) {
                if let Err(e) = l.fs.setattr_ino(l.ino, Some(m), None, None) {
                    return reply.error(fail(e));
                }
            }
        }
        match l.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn flush(&self, req: &Request, ino: INodeNo, fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        self.busy();
        empty(reply, self.layer(ino).and_then(|l| l.fs.flush(fh.0, req.pid())))
    }

    fn release(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, _lock: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        self.busy();
        empty(reply, self.layer(ino).and_then(|l| l.fs.release(fh.0)))
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.busy();
        // It waits for the node: on a worker.
        match self.layer(ino) {
            Ok(l) => self.workers.run(move || empty(reply, l.fs.fsync(fh.0))),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.busy();
        if matches!(self.past.route(ino.0), Ok(Target::Control | Target::At)) {
            // Listed afresh at every readdir: no state to keep.
            return reply.opened(FileHandle(0), FopenFlags::empty());
        }
        match self.layer(ino).and_then(|l| l.fs.path_of(l.ino).and_then(|p| l.fs.opendir(&p))) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.busy();
        let target = match self.past.route(ino.0) {
            Ok(t) => t,
            Err(e) => return reply.error(fail(e)),
        };
        if matches!(target, Target::Control | Target::At) {
            for (i, (d_ino, kind, name)) in self.virtual_entries(&target).iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(*d_ino), i as u64 + 1, *kind, name) {
                    break;
                }
            }
            return reply.ok();
        }
        let l = match self.layer(ino) {
            Ok(l) => l,
            Err(e) => return reply.error(fail(e)),
        };
        let entries = match l.fs.dir_entries(fh.0) {
            Ok(e) => e,
            Err(e) => return reply.error(fail(e)),
        };
        // Offsets: 1 and 2 for "." and "..", then 3 + the index of each entry.
        let dots = [(ino.0, "."), (ino.0, "..")];
        for (i, (d_ino, name)) in dots.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*d_ino), i as u64 + 1, FileType::Directory, name) {
                return reply.ok();
            }
        }
        let start = (offset as usize).saturating_sub(2);
        for (i, (name, a)) in entries.iter().enumerate().skip(start) {
            // The control directory is not listed (nor a tree path it hides).
            if past::is_control(ino.0, OsStr::new(name)) {
                continue;
            }
            let kind = self.file_attr(l.base, a).kind;
            if reply.add(INodeNo(past::global(l.base, a.ino)), i as u64 + 3, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _offset: u64, reply: ReplyDirectoryPlus) {
        self.busy();
        reply.error(FuseErrno::ENOSYS)
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.busy();
        // Every change so far is committed and on disk once this returns.
        match self.past.route(ino.0) {
            Ok(Target::Present(_)) => {
                let fs = self.fs.clone();
                self.workers.run(move || empty(reply, fs.sync()))
            }
            Ok(_) => reply.ok(),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn releasedir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.busy();
        if let Ok(l) = self.layer(ino) {
            l.fs.releasedir(fh.0);
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.busy();
        const BLOCK: u64 = 4096;
        let (total, free) = self.fs.disk_space();
        reply.statfs(total / BLOCK, free / BLOCK, free / BLOCK, 0, 0, BLOCK as u32, 255, BLOCK as u32)
    }
}

/// How `alkfs mount` mounts.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// How long the kernel caches names and attributes (a mount of the past: an hour).
    pub ttl: Duration,
    /// Keep a CPU awake through bursts of requests ([`super::poll`]).
    pub poll: bool,
    /// Show symlinks' targets as stored ([`super::links`]).
    pub outside_links: bool,
    /// Let other users of the machine reach the mount (`allow_other`).
    pub allow_other: bool,
}

/// What a failed mount says: what went wrong and what to do about it.
fn mount_error(mountpoint: &Path, e: &std::io::Error, allow_other: bool) -> anyhow::Error {
    let text = e.to_string();
    let hint = if text.contains("/dev/fuse") && (text.contains("ermission denied") || e.kind() == std::io::ErrorKind::PermissionDenied) {
        "this user may not open /dev/fuse: an administrator can allow it (`chmod 0666 /dev/fuse`, as Debian ships it, or a `fuse` group)".to_string()
    } else if text.contains("user_allow_other") || (allow_other && e.kind() == std::io::ErrorKind::PermissionDenied) {
        "--allow-other needs `user_allow_other` in /etc/fuse.conf for a user other than root (or mount without it)".to_string()
    } else {
        "is it an empty directory you own, and is fusermount3 installed (apt-get install fuse3)?".to_string()
    };
    anyhow::anyhow!("mounting at {}: {} ({hint})", mountpoint.display(), text.trim())
}

/// Starts `alkfs unmount-when-gone` with a pipe for its standard input whose other end this
/// process holds: when this process ends, however (a SIGKILL included), the pipe closes and
/// the watcher unmounts the mount point. Returns the end to keep.
fn spawn_unmount_watcher(mountpoint: &Path) -> anyhow::Result<std::process::ChildStdin> {
    let exe = std::env::current_exe()?;
    let child = std::process::Command::new(exe)
        .arg("unmount-when-gone")
        .arg(mountpoint)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting the watcher that unmounts the mount if this process dies: {e}"))?;
    child.stdin.ok_or_else(|| anyhow::anyhow!("the unmount watcher has no standard input"))
}

/// Mounts `fs` at `mountpoint` and serves it until it is unmounted (`alkfs umount`,
/// `fusermount3 -u`) or this process is told to stop. The mount goes with the process
/// whatever ends it (`auto_unmount`: fusermount3 watches it), so a killed mount process
/// leaves no dead mount point behind.
/// The kernel caches names and attributes for `ttl` (a mount of the past: an hour). With
/// `poll`, a CPU is kept awake through bursts of requests ([`super::poll`]).
pub fn serve(fs: MountFs, mountpoint: &Path, options: MountOptions, mounted: impl FnOnce()) -> anyhow::Result<()> {
    let MountOptions { ttl, poll, outside_links, allow_other } = options;
    let found = std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("fusermount3").is_file()));
    if !found && std::env::var_os("FUSERMOUNT_PATH").is_none() {
        anyhow::bail!("fusermount3 is not installed: install the fuse3 package (apt-get install fuse3) and mount again");
    }
    let read_only = fs.is_read_only();
    let fsname = format!("alkfs:{}:{}", fs.scope().bucket, fs.scope().branch);
    let uid = unsafe { libc::getuid() };
    let gid = unsafe { libc::getgid() };
    // A mount whose process died (killed before anything unmounted it) is in the way.
    if super::is_dead_mount(mountpoint) {
        tracing::info!(mountpoint = %mountpoint.display(), "unmounting what a dead mount left at the mount point");
        let _ = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(mountpoint).status();
    }
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName(fsname), MountOption::Subtype("alkfs".into())];
    if uid != 0 {
        // The kernel checks permissions against the modes we show. A mount by root is
        // reached by root only (below), whom those checks never stop, and without them the
        // kernel does not ask again for a directory's attributes after each file made in it
        // (one request in ten of an untar). `access` answers the one rule left for root.
        config.mount_options.push(MountOption::DefaultPermissions);
    }
    if read_only {
        config.mount_options.push(MountOption::RO);
    }
    // Who reaches the mount. fusermount3's auto_unmount (it unmounts when this process ends,
    // however) needs allow_other or allow_root, which a stock /etc/fuse.conf refuses to
    // users other than root: root's mount uses it (owner-and-root keeps other users out),
    // a user's is owner-only and leaves a watcher to unmount it (`unmount_when_gone`).
    config.acl = match (allow_other, uid == 0) {
        (true, _) => SessionACL::All,
        (false, true) => SessionACL::RootAndOwner,
        (false, false) => SessionACL::Owner,
    };
    if config.acl != SessionACL::Owner {
        config.mount_options.push(MountOption::AutoUnmount);
    }
    // One thread reads the device; requests that may wait go to workers (`workers`).
    let fs = Arc::new(fs);
    let ttl = if fs.scope().at.is_some() { PAST_TTL } else { ttl };
    let poller = if poll { Some(Poller::start()?) } else { None };
    let links = LinkPolicy { mountpoint: std::path::absolute(mountpoint)?, outside: outside_links };
    let mut session = fuser::Session::new(Fuse::new(fs.clone(), uid, gid, ttl, poller.clone(), links)?, mountpoint, &config).map_err(|e| mount_error(mountpoint, &e, allow_other))?;
    // The kernel has the mount now.
    let _watcher = match config.acl {
        SessionACL::Owner => Some(spawn_unmount_watcher(mountpoint)?),
        _ => None,
    };
    mounted();
    let mut unmounter = session.unmount_callable();
    // The past does not change; the present does, from peers, the CLI and SFTP.
    let stop_invalidating = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let invalidator = match fs.scope().at {
        Some(_) => None,
        None => Some(super::invalidate::spawn(fs.clone(), fs.data_dir(), session.notifier(), stop_invalidating.clone())?),
    };
    drop(fs); // the session and the invalidator hold it; it goes (and commits what is queued) when both end
    let session = session.spawn()?;
    // SIGINT/SIGTERM unmount, which ends the session's loop.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let mountpoint = mountpoint.to_path_buf();
        std::thread::spawn(move || {
            rt.block_on(async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                    _ = async { while !done.load(std::sync::atomic::Ordering::Relaxed) { tokio::time::sleep(Duration::from_millis(200)).await } } => { return }
                }
                tracing::info!("unmounting");
                if let Err(e) = unmounter.unmount() {
                    tracing::debug!(error = %e, "unmount from the session failed; asking fusermount3");
                }
                // A lazy unmount ends the kernel's connection whatever still holds the mount,
                // which ends the session's loop.
                let _ = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(&mountpoint).status();
            })
        })
    };
    let result = session.join();
    if let Some(p) = poller {
        p.stop();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watcher.join();
    stop_invalidating.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = invalidator {
        let _ = t.join();
    }
    result.map_err(|e| anyhow::anyhow!("the FUSE session ended with an error: {e}"))
}
