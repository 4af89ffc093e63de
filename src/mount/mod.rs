//! Mounts: the branch as a filesystem for the tools people already use.
//!
//! - [`fs`]: the one filesystem layer (inodes and handles ↔ the path tree, write sessions);
//! - [`staged`]: a write session, in memory while small, else in a staging file;
//! - [`commits`]: the write-behind queue that commits closed files in batches;
//! - [`journal`]: what the mount acknowledged, on disk until the node has it;
//! - [`links`]: where symlinks lead on a mount (inside the bucket);
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
pub mod past;
pub mod poll;
pub mod sftp;
pub mod staged;

use std::path::Path;

use anyhow::{bail, Context, Result};

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
