//! `.alkfs/at/<point>/` in a mount: the branch as it was at a time or a version, one
//! directory away and read-only, without a second mount (Perkeep's `at/` is the model).
//!
//! - `<point>` is what `alkfs --at` takes, but absolute only: a time (RFC 3339) or a version
//!   (`17@3f2a9c1b02`). A relative point (`2h`) would name another moment at every lookup
//!   while the kernel caches the directory it named first, so it is not a name here; nor is
//!   a time still to come, which would show writes still to be made.
//! - `.alkfs` is not listed in the mount's root, as ZFS hides `.zfs`: `cp -r`, `rsync`,
//!   `find` and `du` of a mount do not walk into its whole history. It is there by name.
//! - Each point opened is a read-only [`MountFs`] of its own (a `--at` mount's layer), with
//!   its inode numbers in a range of their own: view `i` answers for `(i + 1) << 40 | ino`.
//!   Up to [`VIEWS_MAX`] points per mount; they stay open until it ends.
//! - A path `/.alkfs` in the tree (written by the CLI or a peer) is hidden in mounts by the
//!   control directory, which also refuses to be created, removed or renamed over.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use alknet_actors::engine::Scope;
use alknet_actors::proto::clock::Stamp;
use alknet_actors::proto::ids::OrderKey;

use super::fs::{Errno, FsResult, MountFs, ROOT_INO};

/// The control directory's name in a mount's root.
pub const CONTROL_DIR: &str = ".alkfs";
/// Its one entry: the past, by point.
pub const AT_DIR: &str = "at";
/// Points of the past one mount opens at most.
pub const VIEWS_MAX: usize = 64;
/// A view's inode numbers are its own shifted by this: the present's stay below `1 << 40`.
const VIEW_SHIFT: u32 = 40;
/// The range of the two virtual directories (above every view's).
const VIRTUAL: u64 = 0xffff << VIEW_SHIFT;
/// `.alkfs`.
pub const CONTROL_INO: u64 = VIRTUAL | 1;
/// `.alkfs/at`.
pub const AT_INO: u64 = VIRTUAL | 2;

/// What a kernel inode number stands for.
pub enum Target {
    /// The mounted branch (or the point a `--at` mount shows): its own number.
    Present(u64),
    /// `.alkfs`.
    Control,
    /// `.alkfs/at`.
    At,
    /// A file or directory of the past: the view, its number there, and the view's base.
    Past { fs: Arc<MountFs>, ino: u64, base: u64 },
}

/// The points of the past a mount has opened.
pub struct Past {
    dir: PathBuf,
    scope: Scope,
    /// The point's name as looked up, and its view; a view's index fixes its inode range.
    views: Mutex<Vec<(String, Arc<MountFs>)>>,
}

impl Past {
    /// No point opened yet, in the data dir `dir`, of the bucket and branch of `scope`.
    pub fn new(dir: &Path, scope: &Scope) -> Self {
        Past { dir: dir.to_path_buf(), scope: Scope::new(&scope.bucket, &scope.branch), views: Mutex::new(Vec::new()) }
    }

    /// What kernel inode `ino` stands for.
    pub fn route(&self, ino: u64) -> FsResult<Target> {
        match ino {
            CONTROL_INO => return Ok(Target::Control),
            AT_INO => return Ok(Target::At),
            _ => {}
        }
        let view = ino >> VIEW_SHIFT;
        if view == 0 {
            return Ok(Target::Present(ino));
        }
        let fs = self.views.lock().unwrap_or_else(|p| p.into_inner()).get(view as usize - 1).map(|(_, fs)| fs.clone());
        match fs {
            Some(fs) => Ok(Target::Past { fs, ino: ino & ((1 << VIEW_SHIFT) - 1), base: view << VIEW_SHIFT }),
            None => Err(Errno::new(libc::ESTALE, format!("inode {ino} is not known (no such point of the past)"))),
        }
    }

    /// The view of the point `name` (in `.alkfs/at`), opened at its first lookup: its base
    /// and its layer. `ENOENT` for a name that is no absolute point, or no version here.
    pub fn open(&self, name: &OsStr) -> FsResult<(u64, Arc<MountFs>)> {
        let name = name.to_str().ok_or_else(|| Errno::new(libc::ENOENT, "a point of the past is a time or a version, in UTF-8"))?;
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = views.iter().position(|(n, _)| n == name) {
            return Ok((((i + 1) as u64) << VIEW_SHIFT, views[i].1.clone()));
        }
        if alknet_actors::proto::ticket::parse_duration_ms(name).is_ok() {
            return Err(Errno::new(libc::ENOENT, format!(".alkfs/at/{name}: a while ago names another moment at every look; give a time (2026-11-30T10:00:00Z) or a version")));
        }
        let key = crate::commands::at_key(&self.dir, name).map_err(|e| Errno::new(libc::ENOENT, format!(".alkfs/at/{name}: {e:#}")))?;
        // A point not yet reached would show writes still to come, under a cache kept for
        // the past (an hour).
        let now = OrderKey::upto(Stamp { ms: alknet_actors::engine::now_ms(), counter: u32::MAX });
        if key > now {
            return Err(Errno::new(libc::ENOENT, format!(".alkfs/at/{name}: a point of the past is not later than now")));
        }
        if views.len() >= VIEWS_MAX {
            return Err(Errno::new(libc::EMFILE, format!("this mount has opened {VIEWS_MAX} points of the past, its most: mount again (or `alkfs mount --at {name}`)")));
        }
        let fs = MountFs::open(&self.dir, self.scope.clone().at(Some(key)), true).map_err(|e| Errno::new(libc::EIO, format!(".alkfs/at/{name}: {e:#}")))?;
        let fs = Arc::new(fs);
        views.push((name.to_string(), fs.clone()));
        tracing::info!(point = name, "opened a point of the past");
        Ok(((views.len() as u64) << VIEW_SHIFT, fs))
    }

    /// The points opened so far, in the order they were: their root's inode and name.
    pub fn listing(&self) -> Vec<(u64, String)> {
        let views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        views.iter().enumerate().map(|(i, (n, _))| (global(((i + 1) as u64) << VIEW_SHIFT, ROOT_INO), n.clone())).collect()
    }
}

/// True for the control directory's name in the root of the present.
pub fn is_control(parent: u64, name: &OsStr) -> bool {
    parent == ROOT_INO && name == CONTROL_DIR
}

/// A view's inode number `ino` as the kernel knows it; listing placeholders (top bit set,
/// never looked up by number) stay as they are.
pub fn global(base: u64, ino: u64) -> u64 {
    if ino & (1 << 63) != 0 {
        ino
    } else {
        base | ino
    }
}
