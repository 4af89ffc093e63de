//! The path tree's side of replication: the changes this node wrote, read back for its peers,
//! and changes from peers applied in one transaction with their outbox event.
//!
//! The rules are `proto::replica`'s: a version is inserted once (by its id, whatever how often
//! it arrives), the head of a path is its version with the largest order key (the clustered
//! order of the `version` table, so reads need nothing more), and the versions of a path that
//! nobody replaced knowingly are listed as conflicts, the head winning.

use std::collections::BTreeSet;

use rusqlite::{params, Connection, OptionalExtension};

use super::outbox::Event;
use super::read::{dir_name, row_from_cols, ROW_COLS};
use super::tx::Tx;
use super::{branch_by_id, Branch, StoreError, VersionRow};
use crate::proto::entry::{ContentHash, EntryKind};
use crate::proto::ids::{NodeId, OrderKey, Uid, VersionId};
use crate::proto::path::TreePath;
use crate::proto::replica::{path_outcome, BranchRecord, Change, LoserKind, Origin, PathVersion};

/// What applying a batch of changes did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Versions new to this store.
    pub inserted: usize,
    /// Versions it already had.
    pub duplicates: usize,
    /// Changes of branches this store does not know yet: kept by the caller and applied
    /// again once the branch's record arrived.
    pub deferred: Vec<Change>,
    /// Conflict losers newly listed.
    pub conflicts: usize,
    /// Blobs the new versions name that are not here yet (hash, size).
    pub missing_blobs: Vec<(ContentHash, u64)>,
    /// Directories made again because versions arrived below a deletion or a file.
    pub repaired: usize,
}

impl Applied {
    /// Adds what another application did (its deferred changes are the caller's to keep).
    pub fn add(&mut self, more: Applied) {
        self.inserted += more.inserted;
        self.duplicates += more.duplicates;
        self.conflicts += more.conflicts;
        self.repaired += more.repaired;
        self.missing_blobs.extend(more.missing_blobs);
    }
}

impl Tx<'_> {
    pub(super) fn is_applied(&self, bucket_id: i64, c: &Change) -> Result<bool, StoreError> {
        match branch_by_uid(self.conn(), bucket_id, &c.branch)? {
            Some(branch) => self.has_version(branch.id, &c.path, &c.key),
            None => Ok(false),
        }
    }

    /// Applies changes from peers to bucket `bucket_id`: each new version is inserted with its
    /// own id and order (and a local seq for when it arrived), the clock moves past every
    /// stamp seen, conflicts are listed where versions were written without seeing each
    /// other, and one outbox event per branch tells watchers what arrived.
    pub fn apply_changes(&mut self, bucket_id: i64, changes: Vec<Change>) -> Result<Applied, StoreError> {
        let mut applied = Applied::default();
        let mut touched: BTreeSet<(i64, TreePath)> = BTreeSet::new();
        let mut branches: Vec<(Branch, i64, i64)> = Vec::new();
        for change in changes {
            let Some(branch) = branch_by_uid(self.conn(), bucket_id, &change.branch)? else {
                applied.deferred.push(change);
                continue;
            };
            if self.has_version(branch.id, &change.path, &change.key)? {
                applied.duplicates += 1;
                continue;
            }
            let seq = self.next_seq();
            self.write_row(branch.id, &change.path, seq, &change.key, change.pred, &change.version, change.origin.as_str())?;
            self.observe(change.key.stamp());
            if let Some(e) = change.version.entry.as_ref().filter(|e| e.kind != EntryKind::Dir && e.hash != ContentHash::EMPTY) {
                let new = self
                    .conn()
                    .prepare_cached("INSERT OR IGNORE INTO blob(hash, size, data, indexed, present) VALUES (?1, ?2, NULL, 0, 0)")?
                    .execute(params![e.hash.0.to_vec(), e.size as i64])?;
                if new > 0 {
                    applied.missing_blobs.push((e.hash, e.size));
                }
            }
            touched.insert((branch.id, change.path.clone()));
            match branches.iter_mut().find(|(b, _, _)| b.id == branch.id) {
                Some((_, first, last)) => {
                    *first = (*first).min(seq);
                    *last = (*last).max(seq);
                }
                None => branches.push((branch, seq, seq)),
            }
            applied.inserted += 1;
        }
        for (branch, path) in &touched {
            applied.conflicts += self.relist_conflicts(*branch, path)?;
        }
        for (branch, first, last) in &branches {
            self.emit(Event::replicated(branch, *first, *last));
        }
        // What arrived may have left live paths below a deletion or a file: made a tree again.
        for (branch, _, _) in &branches {
            let paths: BTreeSet<TreePath> = touched.iter().filter(|(b, _)| *b == branch.id).map(|(_, p)| p.clone()).collect();
            applied.repaired += self.repair_arrivals(branch, &paths)?;
        }
        Ok(applied)
    }

    /// Takes out of bucket `bucket_id` the versions `node` wrote with a writer's seq above
    /// `above` (its writes the bucket's membership no longer accepts: see
    /// `proto::membership`), and returns them, for the caller to keep (they come back if a
    /// later entry accepts them again). The paths they were on show what they would have
    /// shown without them; conflicts naming them go; one `retracted` event per path tells
    /// watchers.
    pub fn retract_versions(&mut self, bucket_id: i64, node: &NodeId, above: i64) -> Result<Vec<Change>, StoreError> {
        let rows: Vec<(i64, i64, Change)> = {
            let mut st = self.conn().prepare_cached(&format!(
                "SELECT {ROW_COLS}, (SELECT uid FROM branch WHERE branch.id = version.branch_id) FROM version
                 WHERE vseq > ?1 AND substr(vkey, 13, 32) = ?2 AND branch_id IN (SELECT id FROM branch WHERE bucket_id = ?3)"
            ))?;
            let mut rows = st.query(params![above, node.0.to_vec(), bucket_id])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let (seq, branch_id): (i64, i64) = (r.get(0)?, r.get(1)?);
                out.push((seq, branch_id, change_of(r)?));
            }
            out
        };
        let mut touched: BTreeSet<(i64, TreePath)> = BTreeSet::new();
        self.forget_known_dirs();
        for (seq, branch_id, change) in &rows {
            let (dir, name) = dir_name(&change.path);
            self.conn().prepare_cached("DELETE FROM version WHERE branch_id = ?1 AND dir = ?2 AND name = ?3 AND vkey = ?4")?.execute(params![branch_id, dir, name, change.key.0])?;
            self.conn().prepare_cached("DELETE FROM conflict WHERE branch_id = ?1 AND (loser_seq = ?2 OR winner_seq = ?2)")?.execute(params![branch_id, seq])?;
            touched.insert((*branch_id, change.path.clone()));
        }
        for (branch_id, path) in &touched {
            self.relist_conflicts(*branch_id, path)?;
            let branch = branch_by_id(self.conn(), *branch_id)?;
            let seq = rows.iter().filter(|(_, b, c)| b == branch_id && c.path == *path).map(|(s, _, _)| *s).max().unwrap_or(0);
            self.emit(Event::path_op("retracted", &branch, seq, seq, path));
        }
        // A directory taken back may leave others' versions below it without one.
        let branches: BTreeSet<i64> = touched.iter().map(|(b, _)| *b).collect();
        for branch_id in branches {
            let branch = branch_by_id(self.conn(), branch_id)?;
            let paths: BTreeSet<TreePath> = touched.iter().filter(|(b, _)| *b == branch_id).map(|(_, p)| p.clone()).collect();
            self.repair_arrivals(&branch, &paths)?;
        }
        Ok(rows.into_iter().map(|(_, _, c)| c).collect())
    }

    fn has_version(&self, branch: i64, path: &TreePath, key: &OrderKey) -> Result<bool, StoreError> {
        has_version(self.conn(), branch, path, key)
    }


    /// Lists the losers of `path` on `branch`, as every node that holds the same versions
    /// lists them: the versions written without seeing each other (all but the head among
    /// them), and the losers merges wrote (`conflict-loser`, each beaten by the version that
    /// names it). A concurrent loser since replaced knowingly comes off the list; one the user
    /// dismissed here is not listed again. Returns how many losers were newly listed.
    pub(crate) fn relist_conflicts(&mut self, branch: i64, path: &TreePath) -> Result<usize, StoreError> {
        let (dir, name) = dir_name(path);
        let (seqs, versions): (Vec<i64>, Vec<PathVersion>) = {
            let mut st = self.conn().prepare_cached("SELECT seq, vkey, pred, origin, kind FROM version WHERE branch_id = ?1 AND dir = ?2 AND name = ?3")?;
            let rows = st.query_map(params![branch, dir, name], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, Option<Vec<u8>>>(2)?, r.get::<_, String>(3)?, r.get::<_, Option<String>>(4)?))
            })?;
            let mut out = (Vec::new(), Vec::new());
            for row in rows {
                let (seq, key, pred, origin, kind) = row?;
                let key = OrderKey::from_bytes(&key).ok_or_else(|| StoreError::Invalid("a stored order key is damaged".into()))?;
                let kind = kind.as_deref().and_then(EntryKind::from_code);
                out.0.push(seq);
                out.1.push(PathVersion {
                    key,
                    pred: pred.and_then(|p| VersionId::from_bytes(&p)),
                    merge_loser: origin == Origin::ConflictLoser.as_str(),
                    kind,
                    repair: origin == Origin::Repair.as_str(),
                });
            }
            out
        };
        let Some(outcome) = path_outcome(&versions) else { return Ok(0) };
        let conn = self.conn();
        // Concurrent losers listed before and no longer losers (replaced knowingly since).
        let concurrent: std::collections::HashSet<i64> = outcome.losers.iter().filter(|l| l.2 == LoserKind::Concurrent).map(|l| seqs[l.0]).collect();
        let listed: Vec<i64> = {
            let mut st = conn.prepare_cached("SELECT loser_seq FROM conflict WHERE branch_id = ?1 AND path = ?2 AND kind = 'concurrent'")?;
            let rows = st.query_map(params![branch, path.as_str()], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for seq in listed.iter().filter(|s| !concurrent.contains(s)) {
            conn.prepare_cached("DELETE FROM conflict WHERE branch_id = ?1 AND loser_seq = ?2")?.execute(params![branch, seq])?;
        }
        let mut added = 0;
        for &(l, w, kind) in &outcome.losers {
            let (loser, winner, key) = (seqs[l], seqs[w], &versions[l].key);
            let dismissed = conn
                .prepare_cached("SELECT 1 FROM conflict_dismissed WHERE loser_key = ?1")?
                .query_row([key.0], |_| Ok(()))
                .optional()?
                .is_some();
            if dismissed {
                continue;
            }
            let known = conn
                .prepare_cached("SELECT 1 FROM conflict WHERE branch_id = ?1 AND loser_seq = ?2")?
                .query_row(params![branch, loser], |_| Ok(()))
                .optional()?
                .is_some();
            let writer = format!("@{}", key.version().node.short());
            conn.prepare_cached(
                "INSERT INTO conflict(branch_id, path, from_branch, winner_seq, loser_seq, at_ms, kind)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(branch_id, loser_seq) DO UPDATE SET winner_seq = excluded.winner_seq",
            )?
            .execute(params![branch, path.as_str(), writer, winner, loser, key.stamp().ms, kind.as_str()])?;
            added += usize::from(!known);
        }
        Ok(added)
    }

    /// Adds branch `rec` of bucket `bucket_id` as a peer made it. Returns `Ok(false)` when its
    /// parent is not known here yet (the caller tries again later). A second branch of the
    /// same name is shown under the name with `~` and the first 8 digits of its uid: the one
    /// made later (by stamp, then uid) gives way, the same choice on every node.
    pub fn apply_branch(&mut self, bucket_id: i64, rec: &BranchRecord) -> Result<bool, StoreError> {
        if branch_by_uid(self.conn(), bucket_id, &rec.uid)?.is_some() {
            return Ok(true);
        }
        let (parent_id, depth) = match &rec.parent {
            None => (None, 0),
            Some(uid) => match branch_by_uid(self.conn(), bucket_id, uid)? {
                Some(p) => (Some(p.id), p.depth + 1),
                None => return Ok(false),
            },
        };
        let mut name = rec.name.clone();
        if let Ok(other) = super::branch_by_name(self.conn(), bucket_id, &rec.name) {
            let theirs = (rec.fork.map(|k| k.stamp()).unwrap_or_default(), rec.uid);
            let ours = (other.fork_key.map(|k| k.stamp()).unwrap_or_default(), other.uid);
            if theirs > ours {
                name = suffixed(&rec.name, &rec.uid);
            } else {
                let moved = suffixed(&other.name, &other.uid);
                self.conn().execute("UPDATE branch SET name = ?1 WHERE id = ?2", params![moved, other.id])?;
                tracing::info!(branch = %other.name, renamed = %moved, "a branch of the same name came from a peer; ours, made later, is shown under a new name");
            }
        }
        self.conn().execute(
            "INSERT INTO branch(bucket_id, name, parent_id, fork_seq, depth, created_ms, fork_key, uid) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                bucket_id,
                name,
                parent_id,
                if parent_id.is_some() { i64::MAX } else { 0 },
                depth,
                rec.created_ms,
                rec.fork.map(|k| k.0.to_vec()),
                rec.uid.0.to_vec()
            ],
        )?;
        let branch = branch_by_uid(self.conn(), bucket_id, &rec.uid)?.expect("just inserted");
        let seq = self.clock();
        self.emit(Event::branch_op("branch-create", &branch, seq));
        Ok(true)
    }
}

fn suffixed(name: &str, uid: &Uid) -> String {
    format!("{name}~{}", &uid.to_hex()[..8])
}

/// Whether branch `branch` holds the version of `path` ordered by `key`.
pub fn has_version(conn: &Connection, branch: i64, path: &TreePath, key: &OrderKey) -> Result<bool, StoreError> {
    let (dir, name) = dir_name(path);
    Ok(conn
        .prepare_cached("SELECT 1 FROM version WHERE branch_id = ?1 AND dir = ?2 AND name = ?3 AND vkey = ?4")?
        .query_row(params![branch, dir, name, key.0], |_| Ok(()))
        .optional()?
        .is_some())
}

/// The branch of `bucket_id` with identity `uid`, live or not.
pub fn branch_by_uid(conn: &Connection, bucket_id: i64, uid: &Uid) -> Result<Option<Branch>, StoreError> {
    let id: Option<i64> = conn
        .prepare_cached("SELECT id FROM branch WHERE bucket_id = ?1 AND uid = ?2")?
        .query_row(params![bucket_id, uid.0], |r| r.get(0))
        .optional()?;
    id.map(|id| branch_by_id(conn, id)).transpose()
}

/// The versions this node wrote with local seqs in `first..=last`, as changes for its peers
/// (with the uid of the branch each belongs to).
pub fn own_changes(conn: &Connection, me: &NodeId, first: i64, last: i64) -> Result<Vec<Change>, StoreError> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {ROW_COLS}, (SELECT uid FROM branch WHERE branch.id = version.branch_id) FROM version
         WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq"
    ))?;
    let mut rows = st.query(params![first, last])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let change = change_of(r)?;
        if change.id().node == *me {
            out.push(change);
        }
    }
    Ok(out)
}

/// Every version of bucket `bucket_id`, whoever wrote it, as changes.
pub fn bucket_changes(conn: &Connection, bucket_id: i64) -> Result<Vec<Change>, StoreError> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {ROW_COLS}, (SELECT uid FROM branch WHERE branch.id = version.branch_id) FROM version
         WHERE branch_id IN (SELECT id FROM branch WHERE bucket_id = ?1) ORDER BY seq"
    ))?;
    let mut rows = st.query([bucket_id])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(change_of(r)?);
    }
    Ok(out)
}

fn change_of(r: &rusqlite::Row<'_>) -> Result<Change, StoreError> {
    let row: VersionRow = row_from_cols(r)?;
    let uid: Vec<u8> = r.get(14)?;
    let uid = Uid::from_bytes(&uid).ok_or_else(|| StoreError::Invalid("a stored branch uid is damaged".into()))?;
    let origin = Origin::parse(&row.origin).unwrap_or(Origin::Write);
    Ok(Change { branch: uid, path: row.path, key: row.key, pred: row.pred, version: row.version, origin, commit: None })
}

/// The record of `branch` for its peers. A fork an older alkfs made by local seq is described
/// by the newest stamp its parent had then (what the parent showed may differ on a peer where
/// versions arrived in another order).
pub fn branch_record(conn: &Connection, branch: &Branch) -> Result<BranchRecord, StoreError> {
    let (parent, fork) = match branch.parent_id {
        None => (None, None),
        Some(pid) => {
            let parent = branch_by_id(conn, pid)?;
            let fork = match branch.fork_key {
                Some(k) => k,
                None => {
                    let newest: Option<Vec<u8>> = conn
                        .prepare_cached("SELECT max(vkey) FROM version WHERE branch_id = ?1 AND seq <= ?2")?
                        .query_row(params![pid, branch.fork_seq], |r| r.get(0))?;
                    let stamp = newest.and_then(|k| OrderKey::from_bytes(&k)).map(|k| k.stamp()).unwrap_or_default();
                    OrderKey::upto(stamp)
                }
            };
            (Some(parent.uid), Some(fork))
        }
    };
    Ok(BranchRecord { uid: branch.uid, name: branch.name.clone(), parent, fork, created_ms: branch.created_ms })
}
