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
    Config, Errno as FuseErrno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

use super::fs::{Attr, Errno, FsResult, MountFs, OpenMode};
use super::poll::Poller;

/// How long the kernel may trust an attribute or a name before asking again, by default
/// (`alkfs mount --cache-secs`).
pub const ATTR_TTL: Duration = Duration::from_secs(1);
/// The same for a mount of the past (`--at`), which does not change.
const PAST_TTL: Duration = Duration::from_secs(3600);
/// Largest write request the kernel sends (bigger requests mean fewer round trips).
const MAX_WRITE_BYTES: u32 = 1 << 20;

/// The FUSE filesystem over a [`MountFs`].
pub struct Fuse {
    fs: Arc<MountFs>,
    uid: u32,
    gid: u32,
    ttl: Duration,
    /// Spin through bursts of requests (see [`super::poll`]); None with `--no-poll`.
    poller: Option<Arc<Poller>>,
}

impl Fuse {
    /// A FUSE shell over `fs`; files show as owned by `uid`:`gid` (the mounting user).
    pub fn new(fs: Arc<MountFs>, uid: u32, gid: u32, ttl: Duration, poller: Option<Arc<Poller>>) -> Self {
        Fuse { fs, uid, gid, ttl, poller }
    }

    /// Every request notes itself, so the poller spins through a burst.
    fn busy(&self) {
        if let Some(p) = &self.poller {
            p.request()
        }
    }

    fn file_attr(&self, a: &Attr) -> FileAttr {
        let mtime = UNIX_EPOCH + Duration::from_millis(a.mtime_ms.max(0) as u64);
        let kind = match a.kind {
            EntryKind::File => FileType::RegularFile,
            EntryKind::Dir => FileType::Directory,
            EntryKind::Symlink => FileType::Symlink,
        };
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (a.mode & 0o7777) as u16,
            nlink: if a.kind == EntryKind::Dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 128 * 1024,
            flags: 0,
        }
    }

    fn entry(&self, reply: ReplyEntry, r: FsResult<Attr>) {
        match r {
            Ok(a) => reply.entry(&self.ttl, &self.file_attr(&a), Generation(0)),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn attr(&self, reply: ReplyAttr, r: FsResult<Attr>) {
        match r {
            Ok(a) => reply.attr(&self.ttl, &self.file_attr(&a)),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> FsResult<alknet_actors::proto::path::TreePath> {
        MountFs::child(&self.fs.path_of(parent.0)?, name)
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

impl Fuse {
    /// The mode of file `ino` with its set-user-id bit cleared, and set-group-id when group
    /// execute is set (what chown(2) and write(2) do), or None when nothing is to clear.
    fn without_setid(&self, ino: u64, fh: Option<u64>) -> Option<u32> {
        // Through the handle, the writer's own view (a mode it set since opening).
        let attr = self.fs.getattr(ino, fh).ok()?;
        if attr.kind != EntryKind::File {
            return None;
        }
        let m = attr.mode;
        let sgid = m & libc::S_ISGID != 0 && m & libc::S_IXGRP != 0;
        let cleared = m & !libc::S_ISUID & !(if sgid { libc::S_ISGID } else { 0 });
        (cleared != m).then_some(cleared)
    }
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
        self.entry(reply, self.fs.lookup(parent.0, name))
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.busy();
        self.fs.forget(ino.0, nlookup)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.busy();
        self.attr(reply, self.fs.getattr(ino.0, fh.map(|f| f.0)))
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
        _atime: Option<TimeOrNow>,
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
        // Owners are not stored: every file is the mounting user's, and chown is accepted
        // as a no-op so that `cp -a`, `rsync -a` and `tar` run as root do not fail. As
        // chown(2) does, it clears the set-user-id bit (and set-group-id with group exec).
        let mode = match mode {
            None if uid.is_some() || gid.is_some() => self.without_setid(ino.0, fh.map(|h| h.0)),
            m => m,
        };
        let r = self.fs.setattr_ino(ino.0, mode, mtime.map(time_ms), size);
        self.attr(reply, r)
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.busy();
        match self.fs.path_of(ino.0).and_then(|p| self.fs.readlink(&p)) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.busy();
        let r = self.child(parent, name).and_then(|p| self.fs.mkdir(&p, mode & !umask)).inspect(|a| self.fs.count_lookup(a.ino));
        self.entry(reply, r)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.busy();
        empty(reply, self.child(parent, name).and_then(|p| self.fs.remove(&p, false)))
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.busy();
        empty(reply, self.child(parent, name).and_then(|p| self.fs.remove(&p, true)))
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.busy();
        let r = self.child(parent, link_name).and_then(|p| {
            let target = target.to_str().ok_or_else(|| Errno::new(libc::EINVAL, "link targets must be UTF-8"))?;
            self.fs.symlink(&p, target)
        });
        let r = r.inspect(|a| self.fs.count_lookup(a.ino));
        self.entry(reply, r)
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        self.busy();
        if flags.contains(RenameFlags::RENAME_EXCHANGE) || flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(FuseErrno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let r = self.child(parent, name).and_then(|from| {
            let to = self.child(newparent, newname)?;
            self.fs.rename(&from, &to, noreplace)
        });
        empty(reply, r)
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

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.busy();
        match self.fs.path_of(ino.0).and_then(|p| self.fs.open_file(&p, open_mode(flags.0, req.pid()))) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        self.busy();
        let how = open_mode(flags, req.pid());
        let r = self.child(parent, name).and_then(|p| self.fs.create(&p, mode & !umask, how, flags & libc::O_EXCL != 0));
        let r = r.inspect(|(_, a)| self.fs.count_lookup(a.ino));
        match r {
            Ok((fh, a)) => reply.created(&self.ttl, &self.file_attr(&a), Generation(0), FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn read(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyData) {
        self.busy();
        match self.fs.read(fh.0, offset, size as usize) {
            Ok(data) => reply.data(&data),
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
        // The kernel asks (HANDLE_KILLPRIV_V2) when an unprivileged write must drop the
        // set-user/group-id bits.
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            if let Some(m) = self.without_setid(ino.0, Some(fh.0)) {
                if let Err(e) = self.fs.setattr_ino(ino.0, Some(m), None, None) {
                    return reply.error(fail(e));
                }
            }
        }
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn flush(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        self.busy();
        empty(reply, self.fs.flush(fh.0, req.pid()))
    }

    fn release(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, _lock: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        self.busy();
        empty(reply, self.fs.release(fh.0))
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.busy();
        empty(reply, self.fs.fsync(fh.0))
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.busy();
        match self.fs.path_of(ino.0).and_then(|p| self.fs.opendir(&p)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.busy();
        let entries = match self.fs.dir_entries(fh.0) {
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
            let kind = self.file_attr(a).kind;
            if reply.add(INodeNo(a.ino), i as u64 + 3, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _offset: u64, reply: ReplyDirectoryPlus) {
        self.busy();
        reply.error(FuseErrno::ENOSYS)
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.busy();
        // Every close so far is committed once this returns (the write-behind queue drained).
        empty(reply, self.fs.settle())
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.busy();
        self.fs.releasedir(fh.0);
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.busy();
        const BLOCK: u64 = 4096;
        let (total, free) = self.fs.disk_space();
        reply.statfs(total / BLOCK, free / BLOCK, free / BLOCK, 0, 0, BLOCK as u32, 255, BLOCK as u32)
    }
}

/// Mounts `fs` at `mountpoint` and serves it until it is unmounted (`alkfs umount`,
/// `fusermount3 -u`) or this process is told to stop. The mount goes with the process
/// whatever ends it (`auto_unmount`: fusermount3 watches it), so a killed mount process
/// leaves no dead mount point behind.
/// The kernel caches names and attributes for `ttl` (a mount of the past: an hour). With
/// `poll`, a CPU is kept awake through bursts of requests ([`super::poll`]).
pub fn serve(fs: MountFs, mountpoint: &Path, ttl: Duration, poll: bool) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("fusermount3").is_file()));
    if !found && std::env::var_os("FUSERMOUNT_PATH").is_none() {
        anyhow::bail!("fusermount3 is not installed: install the fuse3 package (apt-get install fuse3) and mount again");
    }
    let read_only = fs.is_read_only();
    let fsname = format!("alkfs:{}:{}", fs.scope().bucket, fs.scope().branch);
    let uid = unsafe { libc::getuid() };
    let gid = unsafe { libc::getgid() };
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName(fsname), MountOption::Subtype("alkfs".into()), MountOption::AutoUnmount, MountOption::DefaultPermissions];
    if read_only {
        config.mount_options.push(MountOption::RO);
    }
    // auto_unmount needs allow_other or allow_root; owner-and-root keeps other users out.
    config.acl = SessionACL::RootAndOwner;
    let fs = Arc::new(fs);
    let ttl = if fs.scope().at.is_some() { PAST_TTL } else { ttl };
    let poller = if poll { Some(Poller::start()?) } else { None };
    let mut session = fuser::Session::new(Fuse::new(fs.clone(), uid, gid, ttl, poller.clone()), mountpoint, &config)
        .map_err(|e| anyhow::anyhow!("mounting at {}: {e} (is it an empty directory you own, and is fusermount3 installed?)", mountpoint.display()))?;
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
