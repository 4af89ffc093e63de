//! A FUSE filesystem that keeps names and sizes in memory and does nothing else: what an
//! untar costs through the kernel's FUSE transport alone, on this machine. The mount's own
//! figure cannot go below it, so the bench prints it beside the native one.
//!
//! It is mounted like `alkfs mount` (the same options and capabilities, direct I/O, the same
//! cache time, the same poll threads), so the kernel sends it the same requests and wakes
//! the same way: only the work behind them differs.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use alknet_fs::mount::poll::Poller;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption,
    OpenFlags, ReplyAttr, ReplyCreate, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

const TTL: Duration = Duration::from_secs(1);

struct Node {
    attr: FileAttr,
    children: HashMap<OsString, u64>,
}

/// The in-memory filesystem; every operation is a map lookup or insert under one lock.
pub struct FloorFs {
    nodes: Mutex<HashMap<u64, Node>>,
    poller: Arc<Poller>,
}

fn attr(ino: u64, kind: FileType, perm: u16) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: unsafe { libc::getuid() },
        gid: unsafe { libc::getgid() },
        rdev: 0,
        blksize: 128 * 1024,
        flags: 0,
    }
}

impl FloorFs {
    fn new(poller: Arc<Poller>) -> Self {
        let root = Node { attr: attr(1, FileType::Directory, 0o755), children: HashMap::new() };
        FloorFs { nodes: Mutex::new(HashMap::from([(1, root)])), poller }
    }

    fn make(&self, parent: INodeNo, name: &OsStr, kind: FileType, mode: u32) -> Result<FileAttr, Errno> {
        let mut nodes = self.nodes.lock().unwrap();
        let p = nodes.get(&parent.0).ok_or(Errno::ENOENT)?;
        if p.children.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = nodes.len() as u64 + 1; // nothing is ever removed
        let a = attr(ino, kind, (mode & 0o7777) as u16);
        nodes.insert(ino, Node { attr: a, children: HashMap::new() });
        nodes.get_mut(&parent.0).unwrap().children.insert(name.to_owned(), ino);
        Ok(a)
    }
}

impl Drop for FloorFs {
    fn drop(&mut self) {
        self.poller.stop()
    }
}

impl Filesystem for FloorFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        for flag in [InitFlags::FUSE_ATOMIC_O_TRUNC, InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP, InitFlags::FUSE_PARALLEL_DIROPS, InitFlags::FUSE_HANDLE_KILLPRIV_V2] {
            let _ = config.add_capabilities(flag);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.poller.request();
        let nodes = self.nodes.lock().unwrap();
        match nodes.get(&parent.0).and_then(|p| p.children.get(name)).and_then(|i| nodes.get(i)) {
            Some(n) => reply.entry(&TTL, &n.attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.poller.request();
        match self.nodes.lock().unwrap().get(&ino.0) {
            Some(n) => reply.attr(&TTL, &n.attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.poller.request();
        let mut nodes = self.nodes.lock().unwrap();
        let Some(n) = nodes.get_mut(&ino.0) else { return reply.error(Errno::ENOENT) };
        if let Some(m) = mode {
            n.attr.perm = (m & 0o7777) as u16;
        }
        if let Some(s) = size {
            n.attr.size = s;
        }
        if let Some(TimeOrNow::SpecificTime(t)) = mtime {
            n.attr.mtime = t;
        }
        reply.attr(&TTL, &n.attr)
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.poller.request();
        match self.make(parent, name, FileType::Directory, mode & !umask) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, _flags: i32, reply: ReplyCreate) {
        self.poller.request();
        match self.make(parent, name, FileType::RegularFile, mode & !umask) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(a.ino.0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.poller.request();
        reply.opened(FileHandle(ino.0), FopenFlags::FOPEN_DIRECT_IO)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.poller.request();
        if let Some(n) = self.nodes.lock().unwrap().get_mut(&ino.0) {
            n.attr.size = n.attr.size.max(offset + data.len() as u64);
        }
        reply.written(data.len() as u32)
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        self.poller.request();
        reply.ok()
    }

    fn release(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, _lock: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        self.poller.request();
        reply.ok()
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        self.poller.request();
        reply.error(Errno::ENOSYS)
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.poller.request();
        reply.opened(FileHandle(0), FopenFlags::empty())
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.poller.request();
        reply.ok()
    }
}

/// Mounts a fresh [`FloorFs`] at `dir`, served by a thread of this process, until the
/// returned session is unmounted.
pub fn mount(dir: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("floor".into()), MountOption::AutoUnmount];
    if unsafe { libc::getuid() } != 0 {
        config.mount_options.push(MountOption::DefaultPermissions); // as `alkfs mount` does
    }
    config.acl = SessionACL::RootAndOwner;
    fuser::spawn_mount(FloorFs::new(Poller::start()?), dir, &config)
}
