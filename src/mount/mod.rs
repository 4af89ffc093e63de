//! Mounts: the branch as a filesystem for the tools people already use.
//!
//! - [`fs`]: the one filesystem layer (inodes and handles ↔ the path tree, write sessions);
//! - [`staged`]: a write session, in memory while small, else in a staging file;
//! - [`commits`]: the write-behind queue that commits closed files in batches;
//! - [`journal`]: what the mount acknowledged, on disk until the node has it;
//! - [`links`]: where symlinks lead on a mount (inside the bucket);
//! - [`workers`]: threads for requests that may wait (a peer, the node);
//! - [`fresh`]: directories a mount made, where names it did not make are known absent;
//! - [`fuse`]: `alkfs mount`, the kernel's view of it;
//! - [`poll`]: keeps the FUSE device polled through a burst of requests;
//! - [`invalidate`]: tells the kernel what changed elsewhere (peers, the CLI, SFTP);
//! - [`past`]: `.alkfs/at/<point>/`, the branch's past inside a mount;
//! - [`sftp`]: `alkfs serve sftp`, an SSH server of the `sftp` subsystem only.

pub mod commits;
pub mod fresh;
pub mod fs;
pub mod fuse;
pub mod invalidate;
pub mod journal;
pub mod links;
pub mod workers;
pub mod past;
pub mod poll;
pub mod sftp;
pub mod staged;

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Waits until standard input ends (the mount process that holds its other end died, or
/// ended), then unmounts `mountpoint` lazily if something is still mounted there. A mount
/// by a user other than root cannot have fusermount3 watch it (`auto_unmount` needs
/// `allow_other`, which a stock `/etc/fuse.conf` refuses to users), so it starts this.
pub fn unmount_when_gone(mountpoint: &Path) {
    use std::io::Read;
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin();
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    if is_dead_or_mounted(mountpoint) {
        let _ = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(mountpoint).stderr(std::process::Stdio::null()).status();
    }
}

/// Whether `dir` is a FUSE mount whose process is gone (the kernel answers ENOTCONN).
pub fn is_dead_mount(dir: &Path) -> bool {
    std::fs::metadata(dir).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Whether `dir` is a mount point (a FUSE mount's, alive or with its process gone).
pub fn is_dead_or_mounted(dir: &Path) -> bool {
    if is_dead_mount(dir) {
        return true;
    }
    let Ok(canonical) = std::fs::canonicalize(dir) else { return false };
    std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().any(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(m) == canonical))
}

/// Unmounts `mountpoint` (`fusermount3 -u`; root may also use umount(2)).
pub fn unmount(mountpoint: &Path) -> Result<()> {
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status()
        .context("running fusermount3 (install the fuse3 package)")?;
    if !status.success() {
        bail!("fusermount3 -u {} failed: is it an alkfs mount, and is a file on it still open?", mountpoint.display());
    }
    Ok(())
}
