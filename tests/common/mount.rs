//! A real FUSE mount for the tests: `alkfs mount` as a child process, waited for, and
//! unmounted when dropped.
#![allow(dead_code)]

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{await_cond, precondition, Node, Store};

/// How long a mount may take to appear or to go.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this machine can mount FUSE filesystems (CI installs fuse3; `/dev/fuse` is there).
pub fn can_mount() -> bool {
    precondition(Path::new("/dev/fuse").exists(), "/dev/fuse (FUSE) is not available here")
        && precondition(super::have_tool("fusermount3") || Command::new("fusermount3").arg("-V").status().is_ok(), "fusermount3 (apt-get install fuse3)")
}

pub fn is_mounted(dir: &Path) -> bool {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
}

/// Unmounts the alkfs mounts whose process is gone (a test killed before its guard
/// dropped leaves one; reading it fails with ENOTCONN). Live mounts of tests running
/// alongside answer and are left alone.
fn unmount_dead() {
    for line in fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines() {
        let (fields, fstype) = match line.split_once(" - ") {
            Some((f, rest)) => (f, rest.split(' ').next().unwrap_or_default()),
            None => continue,
        };
        let Some(point) = fields.split(' ').nth(4) else { continue };
        if fstype == "fuse.alkfs" && fs::metadata(point).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN) {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(point).status();
        }
    }
}

/// A running `alkfs mount`, unmounted and reaped when dropped.
pub struct Mount {
    /// The `alkfs mount` process.
    pub child: std::process::Child,
    /// The mount point.
    pub dir: PathBuf,
    log: PathBuf,
}

impl Mount {
    pub fn start(s: &Store, extra: &[&str]) -> Mount {
        unmount_dead();
        let dir = s.scratch().join(format!("mnt-{}", extra.join("-").replace(['/', ' '], "_")));
        fs::create_dir_all(&dir).unwrap();
        let log = s.scratch().join("mount.log");
        let mut args = vec!["mount", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = File::create(&log).unwrap();
        let child = s.cmd(&args).stdout(out.try_clone().unwrap()).stderr(out).spawn().expect("spawn alkfs mount");
        let mut m = Mount { child, dir, log };
        await_cond(MOUNT_TIMEOUT, "the mount to appear", || {
            if let Ok(Some(st)) = m.child.try_wait() {
                panic!("alkfs mount exited with {st}: {}", fs::read_to_string(&m.log).unwrap_or_default());
            }
            is_mounted(&m.dir)
        });
        m
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p.trim_start_matches('/'))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if is_mounted(&self.dir) {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&self.dir).status();
        }
    }
}

/// A store, its running node and a mount of it, dropped in that order reversed (the mount
/// first). `None` where this machine cannot mount (a local run without FUSE).
pub struct Rig {
    /// The mount.
    pub m: Mount,
    /// The node.
    pub node: Node,
    /// The store.
    pub s: Store,
}

pub fn rig() -> Option<Rig> {
    if !can_mount() {
        return None;
    }
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    let m = Mount::start(&s, &[]);
    Some(Rig { m, node, s })
}

pub fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().expect("sh");
    assert!(out.status.success(), "`{script}` failed in {}: {}{}", dir.display(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until every file closed on the mount is committed (an fsync of its root
/// directory drains the write-behind queue), so other processes (the CLI) see them.
pub fn settle(m: &Mount) {
    File::open(&m.dir).unwrap().sync_all().unwrap();
}

pub fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

