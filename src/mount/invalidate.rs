//! Changes from elsewhere reach a FUSE mount's kernel caches: a thread follows the outbox
//! and tells the kernel which inodes and names went stale.
//!
//! Why: the kernel caches what a lookup or getattr answered (for the attribute TTL) and an
//! mmap's pages. A change made through the mount updates those caches itself; one made by
//! a peer (replicated), by the CLI, or by an SFTP client does not. Each committed change
//! publishes an outbox event in its own transaction, so following the outbox sees every one
//! of them, in commit order, within [`POLL_INTERVAL`].
//!
//! What it invalidates for a changed path: the path's inode (attributes, cached pages), its
//! name in its parent (so the next access looks it up again: it may be gone, replaced, or a
//! directory now), and the parent's attributes. An event without paths for the mounted
//! branch (a merge into it) invalidates every inode the kernel holds. The mount's own
//! changes are skipped ([`MountFs::was_own_change`]).

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use alknet_actors::engine::{Access, Engine};
use alknet_actors::proto::path::TreePath;
use alknet_actors::store::outbox::{self, Event};
use alknet_actors::store::read;
use anyhow::Result;
use fuser::{INodeNo, Notifier};

use super::fs::MountFs;

/// How often the outbox is checked for commits (honker's watcher): a peer's change shows in
/// the mount about this long after it is committed here.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Checked at least this often even without a wake, and the stop flag with it.
const SAFETY_POLL: Duration = Duration::from_millis(500);

/// What to tell the kernel about one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Stale {
    /// These paths changed.
    Paths(Vec<TreePath>),
    /// Anything may have changed (a merge).
    Everything,
}

/// The paths event `e` changed on branch `branch_id` of the mount's bucket, or None when it
/// concerns another bucket or branch. `changed` lists the paths of a seq range (the rows a
/// peer's replicated versions wrote, which the event does not name).
pub fn stale_of(e: &Event, bucket_id: i64, branch: &str, changed: impl FnOnce(i64, i64) -> Vec<TreePath>) -> Option<Stale> {
    if e.bucket_id != bucket_id || e.branch != branch {
        return None;
    }
    let parse = |p: &Option<String>| p.as_deref().and_then(|p| TreePath::parse(p).ok());
    match e.op.as_str() {
        "replicated" | "repair" => Some(Stale::Paths(changed(e.first_seq - 1, e.last_seq))),
        "merge" => Some(Stale::Everything),
        "rename" => Some(Stale::Paths(parse(&e.path).into_iter().chain(parse(&e.to)).collect())),
        _ => parse(&e.path).map(|p| Stale::Paths(vec![p])),
    }
}

/// Follows the outbox of the mount's data dir until `stop` is set or the kernel connection
/// ends, invalidating what changed elsewhere.
pub fn spawn(fs: Arc<MountFs>, data_dir: &std::path::Path, notifier: Notifier, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
    let engine = Engine::open(data_dir, Access::Read)?;
    let bucket_id = alknet_actors::store::bucket_id(engine.tree().conn(), &fs.scope().bucket)?;
    let branch = alknet_actors::store::branch_by_name(engine.tree().conn(), bucket_id, &fs.scope().branch)?;
    let config = honker_core::WatcherConfig::default().with_poll_interval(POLL_INTERVAL).map_err(anyhow::Error::msg)?;
    let watcher = honker_core::SharedUpdateWatcher::new_with_config(engine.tree().path().to_path_buf(), config);
    let mut cursor = outbox::head(engine.tree().conn())?;
    fs.follow();
    let thread = std::thread::Builder::new().name("alkfs-invalidate".into()).spawn(move || {
        // Whatever ends this thread, the layer stops trusting what only it kept true.
        struct Unfollow(Arc<MountFs>);
        impl Drop for Unfollow {
            fn drop(&mut self) {
                self.0.unfollow();
            }
        }
        let _unfollow = Unfollow(fs.clone());
        let (_id, wake) = watcher.subscribe();
        let conn = engine.tree().conn();
        while !stop.load(Ordering::Relaxed) {
            let batch = match outbox::read_after(conn, cursor, outbox::READ_BATCH_EVENTS_MAX) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the outbox for changes to invalidate; retrying");
                    fs.changed_elsewhere(None); // what was missed is not known
                    std::thread::sleep(SAFETY_POLL);
                    continue;
                }
            };
            if let Some(&(last, _)) = batch.last() {
                cursor = last;
                for (_, event) in &batch {
                    let changed = |after, upto| {
                        read::changed_paths(conn, branch.id, after, upto).unwrap_or_else(|e| {
                            tracing::warn!(error = %e, "reading the paths a peer changed; the kernel's caches expire with their TTL");
                            fs.changed_elsewhere(None);
                            Vec::new()
                        })
                    };
                    let Some(stale) = stale_of(event, bucket_id, &branch.name, changed) else { continue };
                    if invalidate(&fs, &notifier, stale).is_err() {
                        return; // the kernel connection is gone: the mount ended
                    }
                }
                continue; // there may be more
            }
            if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) = wake.recv_timeout(SAFETY_POLL) {
                tracing::warn!("the database file was replaced or removed: changes from elsewhere now show after the attribute TTL");
                return;
            }
        }
    })?;
    Ok(thread)
}

/// Tells the kernel what `stale` names. Errors only when the connection is gone; an inode or
/// name the kernel no longer holds is not one.
fn invalidate(fs: &MountFs, notifier: &Notifier, stale: Stale) -> std::io::Result<()> {
    let paths: Vec<(Option<u64>, Option<u64>, TreePath)> = match stale {
        Stale::Paths(paths) => paths
            .into_iter()
            .filter(|p| !fs.was_own_change(p))
            .inspect(|p| fs.changed_elsewhere(Some(p)))
            .map(|p| {
                let (ino, parent) = fs.kernel_inodes(&p);
                (ino, parent, p)
            })
            .collect(),
        Stale::Everything => {
            fs.changed_elsewhere(None);
            let known = fs.kernel_paths();
            known.iter().map(|(ino, p)| (Some(*ino), p.parent().and_then(|pp| fs.kernel_inodes(&pp).0), p.clone())).collect()
        }
    };
    for (ino, parent, path) in paths {
        if let Some(ino) = ino {
            gone_is_fine(notifier.inval_inode(INodeNo(ino), 0, 0))?;
        }
        if let Some(parent) = parent {
            gone_is_fine(notifier.inval_entry(INodeNo(parent), OsStr::new(path.name())))?;
            gone_is_fine(notifier.inval_inode(INodeNo(parent), 0, 0))?;
        }
        tracing::trace!(%path, "invalidated");
    }
    Ok(())
}

/// An error of a notification that ends the invalidator: the kernel connection is gone (the
/// mount ended). Others (ENOENT: the kernel had already forgotten that inode or name) are
/// about one entry, and the next go on.
fn gone_is_fine(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::EBADF | libc::ENOTCONN)) => Err(e),
        Err(e) => {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::debug!(error = %e, "a kernel cache invalidation failed; the attribute TTL covers it");
            }
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(op: &str, bucket_id: i64, branch: &str, path: Option<&str>, to: Option<&str>) -> Event {
        let mut e: Event = serde_json::from_value(serde_json::json!({"op": op, "bucket_id": bucket_id, "branch": branch, "first_seq": 5, "last_seq": 7})).unwrap();
        e.path = path.map(String::from);
        e.to = to.map(String::from);
        e
    }

    fn p(s: &str) -> TreePath {
        TreePath::parse(s).unwrap()
    }

    #[test]
    fn events_name_what_went_stale_on_the_mounted_branch_only() {
        let none = |_, _| -> Vec<TreePath> { panic!("no seq range to read") };
        assert_eq!(stale_of(&event("write", 1, "main", Some("/a/b"), None), 1, "main", none), Some(Stale::Paths(vec![p("/a/b")])));
        assert_eq!(stale_of(&event("write", 2, "main", Some("/a/b"), None), 1, "main", none), None, "another bucket");
        assert_eq!(stale_of(&event("write", 1, "dev", Some("/a/b"), None), 1, "main", none), None, "another branch");
        assert_eq!(stale_of(&event("rename", 1, "main", Some("/x"), Some("/y/z")), 1, "main", none), Some(Stale::Paths(vec![p("/x"), p("/y/z")])));
        assert_eq!(stale_of(&event("merge", 1, "main", None, Some("dev")), 1, "main", none), Some(Stale::Everything));
        assert_eq!(stale_of(&event("branch-create", 1, "main", None, None), 1, "main", none), None, "nothing of the tree");
        let replicated = stale_of(&event("replicated", 1, "main", None, None), 1, "main", |after, upto| {
            assert_eq!((after, upto), (4, 7), "the rows of seqs 5..=7");
            vec![p("/from/peer")]
        });
        assert_eq!(replicated, Some(Stale::Paths(vec![p("/from/peer")])));
    }
}
