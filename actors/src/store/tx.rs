//! Mutations of the path tree. A [`Tx`] wraps one SQLite write transaction: it hands out seqs
//! from the clock, writes version rows, and gathers outbox events, which it publishes in the
//! same transaction at [`commit`](Tx::commit). Dropping a `Tx` without committing rolls it all
//! back, events included.

use std::collections::HashSet;

use rusqlite::{params, OptionalExtension, Transaction};

use super::acked::Seen;
use super::outbox::{self, Event};
use super::read::{self, dir_name, View};
use super::{branch_by_name, bucket_id, Branch, Counters, StoreError, VersionRow, ID_LEASE, ROOT_BRANCH};
use crate::proto::clock::{Bound, Stamp};
use crate::proto::entry::{Entry, EntryKind, Version};
use crate::proto::ids::{NodeId, OrderKey, Uid, VersionId, VersionRef};
use crate::proto::limits::BRANCH_CHAIN_DEPTH_MAX;
use crate::proto::path::{check_label, TreePath};

/// Default permission bits of a directory the tree creates on its own.
pub const DIR_MODE_DEFAULT: u32 = 0o755;

/// One write transaction on the path tree.
pub struct Tx<'c> {
    tx: Transaction<'c>,
    /// The node this store writes as: every version this transaction writes is named by it.
    me: NodeId,
    clock: i64,
    clock_start: i64,
    /// The counters and leases as this transaction found them.
    before: Counters,
    /// Commits with `synchronous=FULL`: may, and does, renew the id lease.
    durable: bool,
    /// What this transaction's versions are stamped with: later than any stamp before it.
    stamp: Stamp,
    /// The last stamp handed out before this transaction.
    stamp_before: Stamp,
    /// This transaction's stamp orders something (a fork) though no version was written.
    stamp_used: bool,
    /// The latest stamp received from peers in this transaction: the clock moves past it
    /// (the hybrid clock's receive rule), so what this node writes next is later than
    /// everything it has seen.
    observed: Stamp,
    /// Versions stored here may be stamped at or after `stamp` (this node's clock was beyond
    /// the bound and has recovered, see [`crate::proto::clock::Bound`]): each write then
    /// orders after its path's head itself.
    check_heads: bool,
    /// The latest stamp of a version stored here (`clock.high_ms`), and of one written by
    /// this transaction after such a head.
    high_ms: i64,
    bumped: Stamp,
    /// Branches written in this transaction, and whether this node is a read-only member of
    /// their bucket.
    read_only: std::collections::HashMap<i64, bool>,
    events: Vec<Event>,
    /// Directories known to exist in this transaction, by (branch, path): saves re-resolving
    /// the parents of every file in a bulk import.
    known_dirs: HashSet<(i64, TreePath)>,
}

impl<'c> Tx<'c> {
    pub(super) fn new(tx: Transaction<'c>, me: NodeId, now_ms: i64, bound: Bound, durable: bool) -> Result<Self, StoreError> {
        let before = Counters::read(&tx)?;
        let clock = before.seq;
        let (stamp_before, high_ms) = tx
            .prepare_cached("SELECT last_ms, last_lc, high_ms FROM clock WHERE id = 0")?
            .query_row([], |r| Ok((Stamp { ms: r.get(0)?, counter: r.get(1)? }, r.get::<_, i64>(2)?)))?;
        let stamp = bound.tick(stamp_before, now_ms);
        // Said once per process: every transaction until the first write would say it again.
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if stamp < stamp_before && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                stamped_ms = stamp_before.ms,
                now_ms,
                "this node's clock had stamped versions {} s ahead of its wall clock, beyond the bound of {} s: it stamps from the wall clock again (versions it wrote that far ahead wait on every peer until then)",
                (stamp_before.ms - now_ms) / 1000,
                bound.ms / 1000
            );
        }
        // Normally every stored version is at or before `stamp_before`, and `stamp` after it.
        let check_heads = stamp.ms <= high_ms && !(stamp > stamp_before && stamp_before.ms >= high_ms);
        Ok(Tx {
            tx,
            me,
            clock,
            clock_start: clock,
            before,
            durable,
            stamp,
            stamp_before,
            stamp_used: false,
            observed: Stamp::default(),
            check_heads,
            high_ms,
            bumped: Stamp::default(),
            read_only: std::collections::HashMap::new(),
            events: Vec::new(),
            known_dirs: HashSet::new(),
        })
    }

    /// The connection inside the transaction, for reads that must see this transaction's
    /// own writes.
    pub fn conn(&self) -> &rusqlite::Connection {
        &self.tx
    }

    /// The wall-clock part of the stamp this transaction writes (mtimes of directories it
    /// creates, the time of a conflict).
    pub fn now_ms(&self) -> i64 {
        self.stamp.ms
    }

    /// The stamp every version this transaction writes carries.
    pub fn stamp(&self) -> Stamp {
        self.stamp
    }

    /// The node this transaction writes as.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// The last seq handed out (by this transaction or before it).
    pub fn clock(&self) -> i64 {
        self.clock
    }

    pub(crate) fn next_seq(&mut self) -> i64 {
        self.clock += 1;
        self.clock
    }

    /// Records a stamp received from a peer: the clock moves past it at commit (the hybrid
    /// clock's receive rule), so this node's next write is later than what it has seen.
    pub(crate) fn observe(&mut self, stamp: Stamp) {
        self.observed = self.observed.max(stamp);
    }

    /// Queues an outbox event, published at commit.
    pub(crate) fn emit(&mut self, event: Event) {
        self.events.push(event);
    }

    /// Writes the clock and the events, renews the id lease when this transaction is
    /// durable, then commits. A transaction that is not durable and went past the lease is
    /// refused whole: its ids could come back after a power loss (see [`super::Ids`]).
    pub(super) fn commit(self) -> Result<Counters, StoreError> {
        let Tx { tx, clock, clock_start, before, durable, stamp, stamp_before, stamp_used, observed, high_ms, bumped, events, .. } = self;
        let used = if clock != clock_start || stamp_used { stamp } else { stamp_before };
        // A clock that recovered (see `Bound::tick`) goes back here: `last` may be earlier
        // than `stamp_before`. `high_ms` only grows.
        let last = used.max(observed);
        let high = high_ms.max(last.ms).max(bumped.ms);
        if clock != clock_start || last != stamp_before || high != high_ms {
            tx.prepare_cached("UPDATE clock SET seq = ?1, last_ms = ?2, last_lc = ?3, high_ms = ?4 WHERE id = 0")?
                .execute(params![clock, last.ms, last.counter, high])?;
        }
        outbox::publish(&tx, &events)?;
        let offset = if events.is_empty() { before.offset } else { outbox::head(&tx)? };
        let mut after = Counters { seq: clock, offset, ..before };
        if durable {
            after.seq_leased = clock + ID_LEASE;
            after.offset_leased = offset + ID_LEASE;
            tx.prepare_cached("UPDATE clock SET seq_leased = ?1, offset_leased = ?2 WHERE id = 0")?
                .execute([after.seq_leased, after.offset_leased])?;
        } else if clock > before.seq_leased || offset > before.offset_leased {
            return Err(StoreError::Invalid(format!(
                "a transaction handed out more ids than it declared ({} seqs, {} events); nothing was written. This is a bug: please report it",
                clock - before.seq,
                offset - before.offset
            )));
        }
        tx.commit()?;
        Ok(after)
    }

    /// Appends one version row for `path` on `branch`, written here, and returns its seq. It
    /// is ordered by this transaction's stamp, so it becomes the path's head on the branch, and
    /// it names the head it replaces there as its predecessor.
    pub(crate) fn insert_row(&mut self, branch: i64, path: &TreePath, version: &Version, origin: &str) -> Result<i64, StoreError> {
        let pred = self.own_head(branch, path)?;
        self.insert_row_with_pred(branch, path, version, origin, pred)
    }

    /// [`insert_row`](Self::insert_row) naming `pred` as the version it replaces (the one
    /// its writer saw, which may not be the head any more).
    pub(crate) fn insert_row_with_pred(&mut self, branch: i64, path: &TreePath, version: &Version, origin: &str, pred: Option<VersionId>) -> Result<i64, StoreError> {
        // A repair (a directory made again so that what arrived stays listed) is the tree's
        // own consequence of peers' versions, which a read-only member applies like anyone.
        if origin != crate::proto::replica::Origin::Repair.as_str() {
            self.check_writable(branch)?;
        }
        let seq = self.next_seq();
        let id = VersionId { node: self.me, seq };
        let mut stamp = self.stamp;
        if self.check_heads {
            // The path's head may be stamped after this transaction (see `check_heads`):
            // order after it, so the write shows.
            if let Some(head) = read::own_head_key(&self.tx, branch, path)?.map(|k| k.stamp()).filter(|h| *h >= stamp) {
                stamp = Stamp { ms: head.ms, counter: head.counter.saturating_add(1) };
                self.bumped = self.bumped.max(stamp);
            }
        }
        let key = OrderKey::new(stamp, &id);
        if stamp != self.stamp && version.written == self.stamp {
            let version = Version { written: stamp, ..version.clone() };
            self.write_row(branch, path, seq, &key, pred, &version, origin)?;
        } else {
            self.write_row(branch, path, seq, &key, pred, version, origin)?;
        }
        Ok(seq)
    }

    /// What a branch forked now sees its parent up to: this transaction's stamp, or, while
    /// versions stored here are stamped later (the clock ran ahead and recovered), the latest
    /// of those, so the new branch shows what its parent shows.
    fn fork_stamp(&self) -> Stamp {
        if self.check_heads {
            self.stamp.max(Stamp { ms: self.high_ms.max(self.bumped.ms), counter: u32::MAX })
        } else {
            self.stamp
        }
    }

    /// Refuses a write on `branch` when this node is a read-only member of its bucket (every
    /// other member would refuse the version; it is not written at all). Once per branch per
    /// transaction.
    fn check_writable(&mut self, branch: i64) -> Result<(), StoreError> {
        let read_only = match self.read_only.get(&branch) {
            Some(r) => *r,
            None => {
                let role: Option<Option<String>> = self
                    .tx
                    .prepare_cached("SELECT m.role FROM branch b JOIN mesh_member m ON m.bucket_id = b.bucket_id WHERE b.id = ?1 AND m.node = ?2 AND m.removed_ms IS NULL")?
                    .query_row(params![branch, self.me.0], |r| r.get(0))
                    .optional()?;
                let r = matches!(role, Some(Some(r)) if r == crate::proto::membership::Role::ReadOnly.as_str());
                self.read_only.insert(branch, r);
                r
            }
        };
        if read_only {
            return Err(StoreError::ReadOnly(self.bucket_name_of(branch)?));
        }
        Ok(())
    }

    fn bucket_name_of(&self, branch: i64) -> Result<String, StoreError> {
        Ok(self.tx.query_row("SELECT k.name FROM branch b JOIN bucket k ON k.id = b.bucket_id WHERE b.id = ?1", [branch], |r| r.get(0))?)
    }

    /// The id of the newest row of `path` among `branch`'s own rows (not its ancestors').
    pub(crate) fn own_head(&self, branch: i64, path: &TreePath) -> Result<Option<VersionId>, StoreError> {
        read::own_head(&self.tx, branch, path)
    }

    /// Writes one version row as given.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_row(
        &mut self,
        branch: i64,
        path: &TreePath,
        seq: i64,
        key: &OrderKey,
        pred: Option<VersionId>,
        version: &Version,
        origin: &str,
    ) -> Result<(), StoreError> {
        let (dir, name) = dir_name(path);
        let e = version.entry.as_ref();
        self.tx
            .prepare_cached(
                "INSERT INTO version(branch_id, dir, name, seq, kind, hash, size, mode, mtime_ms, written_ms, origin, written_lc, vkey, vseq, pred)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?
            .execute(params![
                branch,
                dir,
                name,
                seq,
                e.map(|e| e.kind.code()),
                e.map(|e| e.hash.0.to_vec()),
                e.map(|e| e.size as i64).unwrap_or(0),
                e.map(|e| e.mode as i64).unwrap_or(0),
                e.map(|e| e.mtime_ms).unwrap_or(0),
                version.written.ms,
                origin,
                version.written.counter,
                key.0.to_vec(),
                key.version().seq,
                pred.map(|p| p.to_bytes().to_vec()),
            ])?;
        if e.is_some_and(|e| e.kind == EntryKind::Dir) {
            self.known_dirs.insert((branch, path.clone()));
        } else {
            self.known_dirs.remove(&(branch, path.clone()));
        }
        Ok(())
    }

    /// Whether `path` is known, in this transaction, to be a live directory of `branch`.
    pub(super) fn is_known_dir(&self, branch: i64, path: &TreePath) -> bool {
        self.known_dirs.contains(&(branch, path.clone()))
    }

    /// Forgets what this transaction knew of directories (rows were deleted under it).
    pub(super) fn forget_known_dirs(&mut self) {
        self.known_dirs.clear();
    }

    /// Notes that `path` is a live directory of `branch` (found so by a read).
    pub(super) fn note_dir(&mut self, branch: i64, path: &TreePath) {
        self.known_dirs.insert((branch, path.clone()));
    }

    fn version(&self, entry: Option<Entry>) -> Version {
        Version { entry, written: self.stamp }
    }

    /// Makes every ancestor of `path` a live directory on `branch`, creating missing ones;
    /// fails if one of them is a file or symlink.
    pub(crate) fn ensure_parents(&mut self, branch: &Branch, view: &View, path: &TreePath) -> Result<(), StoreError> {
        for dir in path.ancestors() {
            if self.known_dirs.contains(&(branch.id, dir.clone())) {
                continue;
            }
            match read::live(&self.tx, view, &dir)? {
                Some(row) if row.entry().is_some_and(|e| e.kind == EntryKind::Dir) => {
                    self.known_dirs.insert((branch.id, dir));
                }
                Some(_) => return Err(StoreError::NotADirectory(dir.to_string())),
                None => {
                    let v = self.version(Some(Entry::dir(DIR_MODE_DEFAULT, self.stamp.ms)));
                    self.insert_row(branch.id, &dir, &v, "mkdir")?;
                }
            }
        }
        Ok(())
    }

    /// Writes `entry` at `path` (a file or symlink, or a directory's attributes), creating
    /// missing parent directories. Refuses to replace a directory with a non-directory.
    pub fn put(&mut self, branch: &Branch, path: &TreePath, entry: Entry) -> Result<i64, StoreError> {
        self.put_seen(branch, path, entry, &Seen::AtCommit)
    }

    /// [`put`](Self::put) replacing what its writer saw (`seen`), not whatever the branch
    /// holds now: a version that arrived meanwhile is concurrent, and the loser is listed.
    pub fn put_seen(&mut self, branch: &Branch, path: &TreePath, entry: Entry, seen: &Seen) -> Result<i64, StoreError> {
        if path.is_root() {
            return Err(StoreError::IsADirectory("/".into()));
        }
        let view = View::head(&self.tx, branch)?;
        let first = self.clock + 1;
        self.ensure_parents(branch, &view, path)?;
        let super::acked::PathNow { shown: cur, own, pred } = self.path_now(branch, &view, path, seen)?;
        if cur.as_ref().and_then(|r| r.entry()).is_some_and(|e| e.kind == EntryKind::Dir) && entry.kind != EntryKind::Dir {
            return Err(StoreError::IsADirectory(path.to_string()));
        }
        let (kind, hash, size) = (entry.kind, entry.hash, entry.size);
        let v = self.version(Some(entry));
        let seq = self.insert_row_with_pred(branch.id, path, &v, "write", pred)?;
        if pred != own {
            self.relist_conflicts(branch.id, path)?;
        }
        self.emit(Event::write(branch, first, seq, path, kind, hash, size));
        Ok(seq)
    }

    /// Creates directory `path`; with `parents`, missing parents too and no error if it exists.
    pub fn mkdir(&mut self, branch: &Branch, path: &TreePath, parents: bool, mode: u32) -> Result<Option<i64>, StoreError> {
        let view = View::head(&self.tx, branch)?;
        match read::live(&self.tx, &view, path)? {
            Some(row) if row.entry().is_some_and(|e| e.kind == EntryKind::Dir) => {
                return if parents || path.is_root() { Ok(None) } else { Err(StoreError::Exists(path.to_string())) };
            }
            Some(_) => return Err(StoreError::Exists(path.to_string())),
            None if path.is_root() => return Ok(None),
            None => {}
        }
        if !parents {
            let parent = path.parent().expect("not root");
            if !parent.is_root() {
                match read::live(&self.tx, &view, &parent)? {
                    Some(r) if r.entry().is_some_and(|e| e.kind == EntryKind::Dir) => {}
                    Some(_) => return Err(StoreError::NotADirectory(parent.to_string())),
                    None => return Err(StoreError::NotFound(format!("{parent} (use mkdir -p)"))),
                }
            }
        }
        let first = self.clock + 1;
        self.ensure_parents(branch, &view, path)?;
        let v = self.version(Some(Entry::dir(mode, self.stamp.ms)));
        let seq = self.insert_row(branch.id, path, &v, "mkdir")?;
        self.emit(Event::path_op("mkdir", branch, first, seq, path));
        Ok(Some(seq))
    }

    /// Deletes `path` (with `recursive`, a directory and everything below it) by writing
    /// tombstones. Returns how many paths were removed.
    pub fn remove(&mut self, branch: &Branch, path: &TreePath, recursive: bool) -> Result<usize, StoreError> {
        if path.is_root() {
            return Err(StoreError::Invalid("refusing to remove the root '/'".into()));
        }
        let view = View::head(&self.tx, branch)?;
        let cur = read::live(&self.tx, &view, path)?.ok_or_else(|| StoreError::NotFound(path.to_string()))?;
        let mut doomed = vec![path.clone()];
        if cur.entry().is_some_and(|e| e.kind == EntryKind::Dir) {
            let below = read::subtree(&self.tx, &view, path)?;
            if !below.is_empty() && !recursive {
                return Err(StoreError::DirectoryNotEmpty(path.to_string()));
            }
            doomed.extend(below.into_keys());
        }
        let first = self.clock + 1;
        let tomb = self.version(None);
        for p in &doomed {
            self.insert_row(branch.id, p, &tomb, "delete")?;
        }
        self.emit(Event::path_op("delete", branch, first, self.clock, path));
        Ok(doomed.len())
    }

    /// Moves `from` (and, for a directory, everything below it) to `to`. An existing file at
    /// `to` is replaced, as rename(2) does; an existing directory or anything below `from`
    /// is refused.
    pub fn rename(&mut self, branch: &Branch, from: &TreePath, to: &TreePath) -> Result<usize, StoreError> {
        if from.is_root() || to.is_root() {
            return Err(StoreError::Invalid("cannot move the root '/' or onto it".into()));
        }
        if to.is_within(from) {
            return Err(StoreError::Invalid(format!("cannot move {from} into itself ({to})")));
        }
        let view = View::head(&self.tx, branch)?;
        let src = read::live(&self.tx, &view, from)?.ok_or_else(|| StoreError::NotFound(from.to_string()))?;
        let src_is_dir = src.entry().is_some_and(|e| e.kind == EntryKind::Dir);
        if let Some(dst) = read::live(&self.tx, &view, to)? {
            if dst.entry().is_some_and(|e| e.kind == EntryKind::Dir) || src_is_dir {
                return Err(StoreError::Exists(to.to_string()));
            }
        }
        let mut moves = vec![(from.clone(), src)];
        if src_is_dir {
            moves.extend(read::subtree(&self.tx, &view, from)?);
        }
        let first = self.clock + 1;
        self.ensure_parents(branch, &view, to)?;
        let tomb = self.version(None);
        for (old, row) in &moves {
            let new = old.rebase(from, to)?;
            let moved = self.version(row.version.entry.clone());
            self.insert_row(branch.id, &new, &moved, "rename")?;
            self.insert_row(branch.id, old, &tomb, "rename")?;
        }
        self.emit(Event::rename(branch, first, self.clock, from, to));
        Ok(moves.len())
    }

    /// Moves `from` to exactly `to`, as rename(2) does: an existing file at `to` is
    /// replaced by a file, an empty directory by a directory, both in this one transaction.
    /// A non-empty directory, or a file and a directory meeting, is refused; with
    /// `noreplace`, anything at `to` (RENAME_NOREPLACE: checked here, where it commits, so a
    /// name a peer made meanwhile is not replaced).
    pub fn move_over(&mut self, branch: &Branch, from: &TreePath, to: &TreePath, noreplace: bool) -> Result<usize, StoreError> {
        let view = View::head(&self.tx, branch)?;
        let is_dir = |row: &VersionRow| row.entry().is_some_and(|e| e.kind == EntryKind::Dir);
        let src = read::live(&self.tx, &view, from)?.ok_or_else(|| StoreError::NotFound(from.to_string()))?;
        if let Some(dst) = read::live(&self.tx, &view, to)? {
            if noreplace && from != to {
                return Err(StoreError::Exists(to.to_string()));
            }
            match (is_dir(&src), is_dir(&dst)) {
                (true, true) => {
                    if from == to {
                        return Ok(0);
                    }
                    if !read::list(&self.tx, &view, to)?.is_empty() {
                        return Err(StoreError::DirectoryNotEmpty(to.to_string()));
                    }
                    self.remove(branch, to, false)?;
                }
                (true, false) => return Err(StoreError::NotADirectory(to.to_string())),
                (false, true) => return Err(StoreError::IsADirectory(to.to_string())),
                (false, false) if from == to => return Ok(0),
                (false, false) => {}
            }
        }
        self.rename(branch, from, to)
    }

    /// Changes the mode and/or mtime of the live entry at `path` (chmod, utimes), keeping its
    /// bytes: one new version.
    pub fn set_attr(&mut self, branch: &Branch, path: &TreePath, mode: Option<u32>, mtime_ms: Option<i64>) -> Result<i64, StoreError> {
        let view = View::head(&self.tx, branch)?;
        let cur = read::live(&self.tx, &view, path)?.ok_or_else(|| StoreError::NotFound(path.to_string()))?;
        let mut entry = cur.version.entry.ok_or_else(|| StoreError::NotFound(path.to_string()))?;
        if let Some(mode) = mode {
            entry.mode = mode & 0o7777;
        }
        if let Some(ms) = mtime_ms {
            entry.mtime_ms = ms;
        }
        if path.is_root() {
            return Ok(0); // the root's attributes are fixed
        }
        self.put(branch, path, entry)
    }

    /// Makes `version` of `path` the head again. The version must be in the branch's view of
    /// that path's history, so no version crosses a bucket or an unrelated branch.
    pub fn restore(&mut self, branch: &Branch, path: &TreePath, version: &VersionRef) -> Result<i64, StoreError> {
        let view = View::head(&self.tx, branch)?;
        let mut found: Vec<VersionRow> = read::history(&self.tx, &view, path)?.into_iter().filter(|r| version.names(&r.id(), &self.me)).collect();
        if found.len() > 1 {
            return Err(StoreError::Invalid(format!("{path}: several versions match that id; give more digits of the node id (see `alkfs log {path}`)")));
        }
        let old = found.pop().ok_or_else(|| StoreError::NotFound(format!("{path} has no version {version} on branch {} (see `alkfs log {path}`)", branch.name)))?;
        let first = self.clock + 1;
        if let Some(e) = old.entry() {
            if e.kind != EntryKind::Dir {
                if let Some(cur) = read::live(&self.tx, &view, path)? {
                    if cur.entry().is_some_and(|c| c.kind == EntryKind::Dir) {
                        return Err(StoreError::IsADirectory(path.to_string()));
                    }
                }
            }
            self.ensure_parents(branch, &view, path)?;
        }
        let v = self.version(old.version.entry.clone());
        let new_seq = self.insert_row(branch.id, path, &v, "restore")?;
        self.emit(Event::path_op("restore", branch, first, new_seq, path));
        Ok(new_seq)
    }

    /// A new bucket or branch identity minted by this node (see [`Uid::mint`]).
    fn mint_uid(&self) -> Result<Uid, StoreError> {
        let random: Vec<u8> = self.tx.query_row("SELECT randomblob(8)", [], |r| r.get(0))?;
        Ok(Uid::mint(&self.me, random.try_into().map_err(|_| StoreError::Invalid("randomblob(8) gave other than 8 bytes".into()))?))
    }

    /// Creates bucket `name` with its root branch `main`.
    pub fn create_bucket(&mut self, name: &str) -> Result<Branch, StoreError> {
        check_label("bucket", name).map_err(StoreError::Invalid)?;
        if bucket_id(&self.tx, name).is_ok() {
            return Err(StoreError::Exists(format!("bucket {name}")));
        }
        let (bucket_uid, branch_uid) = (self.mint_uid()?, self.mint_uid()?);
        self.tx.execute("INSERT INTO bucket(name, created_ms, uid) VALUES (?1, ?2, ?3)", params![name, self.stamp.ms, bucket_uid.0])?;
        let id = self.tx.last_insert_rowid();
        self.tx.execute(
            "INSERT INTO branch(bucket_id, name, parent_id, fork_seq, depth, created_ms, uid) VALUES (?1, ?2, NULL, 0, 0, ?3, ?4)",
            params![id, ROOT_BRANCH, self.stamp.ms, branch_uid.0],
        )?;
        let branch = branch_by_name(&self.tx, id, ROOT_BRANCH)?;
        self.emit(Event::branch_op("bucket-create", &branch, self.clock));
        Ok(branch)
    }

    /// Creates branch `name` forked from `from` at this moment. Copies nothing. The fork is
    /// this transaction's stamp: the branch sees the parent's versions ordered up to it, which
    /// means the same on every node (a version of the parent that was written before the fork
    /// elsewhere and arrives later shows through, here as there).
    pub fn create_branch(&mut self, bucket: &str, from: &Branch, name: &str) -> Result<Branch, StoreError> {
        check_label("branch", name).map_err(StoreError::Invalid)?;
        let bucket_id = bucket_id(&self.tx, bucket)?;
        if from.bucket_id != bucket_id {
            return Err(StoreError::Invalid("a branch can only fork from a branch of its own bucket".into()));
        }
        self.check_writable(from.id)?;
        if branch_by_name(&self.tx, bucket_id, name).is_ok() {
            return Err(StoreError::Exists(format!("branch {name}")));
        }
        if from.depth as usize + 1 >= BRANCH_CHAIN_DEPTH_MAX {
            return Err(StoreError::Invalid(format!(
                "branch {} is {} forks deep; the limit is {BRANCH_CHAIN_DEPTH_MAX}: fork from a shallower branch",
                from.name, from.depth
            )));
        }
        self.tx.execute(
            "INSERT INTO branch(bucket_id, name, parent_id, fork_seq, depth, created_ms, fork_key, uid)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![bucket_id, name, from.id, i64::MAX, from.depth + 1, self.stamp.ms, OrderKey::upto(self.fork_stamp()).0, self.mint_uid()?.0],
        )?;
        // Stamps after this one sort after the fork, though no version was written.
        self.stamp_used = true;
        let branch = branch_by_name(&self.tx, bucket_id, name)?;
        self.emit(Event::branch_op("branch-create", &branch, self.clock));
        Ok(branch)
    }

    /// Deletes branch `name`. Its rows stay while branches forked from it read through them;
    /// the root branch cannot be deleted.
    pub fn delete_branch(&mut self, bucket: &str, name: &str) -> Result<(), StoreError> {
        let bucket_id = bucket_id(&self.tx, bucket)?;
        let branch = branch_by_name(&self.tx, bucket_id, name)?;
        if branch.parent_id.is_none() {
            return Err(StoreError::Invalid(format!("{name} is the bucket's root branch and cannot be deleted")));
        }
        self.check_writable(branch.id)?;
        let seq = self.next_seq();
        self.tx.execute("UPDATE branch SET deleted_seq = ?1 WHERE id = ?2", params![seq, branch.id])?;
        self.emit(Event::branch_op("branch-delete", &branch, seq));
        Ok(())
    }

    /// Records a blob the entries of this transaction name (its bytes too, when inline).
    pub fn record_blob(&mut self, blob: &crate::content::Imported) -> Result<(), StoreError> {
        self.tx
            .prepare_cached("INSERT OR IGNORE INTO blob(hash, size, data) VALUES (?1, ?2, ?3)")?
            .execute(params![blob.hash.0.to_vec(), blob.size as i64, blob.inline])?;
        Ok(())
    }
}
