//! What waits for a peer before it enters the tree: versions of an operation not wholly here
//! yet (`mesh_held`, so no reader sees half a rename), and versions whose writer is not
//! admitted yet or whose branch's record has not arrived (`mesh_deferred`).
//!
//! A member could start operations it never finishes, or send versions no admission or
//! branch will ever release; without bounds those rows would grow and stay for good. So both
//! are bounded and dated ([`WaitBounds`], from `proto::limits`):
//! - an operation held longer than its time, or one of a writer holding more than its bound
//!   (oldest first), is applied as it stands and listed in `mesh_op_released`, so the rest of
//!   it applies as it comes: nothing is lost, only the operation's wholeness;
//! - deferred versions past their time, or a bucket's oldest past its bound, leave the wait
//!   but not the documents: the bucket is marked in `mesh_rescan`, and when its members or
//!   branches change its documents are read again (at most every `RESCAN_SECS_MIN`) for
//!   versions now accepted that the tree lacks.
//!
//! Counting the rows of a table at every insert would cost a scan each time, so counts are
//! kept as upper estimates ([`Waiting`]) and checked against the table only when an estimate
//! crosses its bound.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rusqlite::{params, OptionalExtension};

use super::tx::Tx;
use super::StoreError;
use crate::proto::ids::{NodeId, VersionId};
use crate::proto::limits;
use crate::proto::replica::{self as rules, Change};

/// The bounds on what waits; `proto::limits`' by default (tests make them small).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitBounds {
    /// Most held versions per (bucket, writer).
    pub held_per_writer: u64,
    /// How long an operation is held, in ms.
    pub held_ms: i64,
    /// Most deferred versions per bucket.
    pub deferred_per_bucket: u64,
    /// How long a version stays deferred, in ms.
    pub deferred_ms: i64,
    /// Least time between two readings of a bucket's documents, in ms.
    pub rescan_every_ms: i64,
}

impl Default for WaitBounds {
    fn default() -> Self {
        WaitBounds {
            held_per_writer: limits::HELD_VERSIONS_PER_WRITER_MAX,
            held_ms: limits::HELD_OPERATION_SECS_MAX * 1000,
            deferred_per_bucket: limits::DEFERRED_VERSIONS_PER_BUCKET_MAX,
            deferred_ms: limits::DEFERRED_SECS_MAX * 1000,
            rescan_every_ms: limits::RESCAN_SECS_MIN * 1000,
        }
    }
}

/// A bound on what waits that was hit: named as in `proto::limits`, for `alkfs status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitHit {
    /// The bound's name.
    pub name: &'static str,
    /// Its value.
    pub limit: u64,
    /// What it did, for the log.
    pub what: String,
}

/// The bounds, the running estimates of what waits, and the bounds hit since last asked.
#[derive(Debug, Default)]
pub struct Waiting {
    /// The bounds in force.
    pub bounds: WaitBounds,
    /// Upper estimates of rows, by (bucket, writer) for held versions and (bucket, None) for
    /// deferred ones; a missing key is unknown (counted at its next insert).
    counts: HashMap<(i64, Option<NodeId>), u64>,
    /// Bounds hit, for the caller to report (`take_hits`).
    hits: Vec<WaitHit>,
    /// When each version taken out of `mesh_deferred` to be tried again began to wait: one
    /// deferred again keeps its time (`take_deferred`, `defer`).
    carried: HashMap<VersionId, i64>,
}

impl Waiting {
    /// Waiting within `bounds`.
    pub fn new(bounds: WaitBounds) -> Self {
        Waiting { bounds, ..Default::default() }
    }

    /// The bounds hit since the last call.
    pub fn take_hits(&mut self) -> Vec<WaitHit> {
        std::mem::take(&mut self.hits)
    }

    /// Adds `n` rows to the estimate under `key`; when it may exceed `cap`, counts the rows
    /// for real (`count`, which stops at `cap + 1`). Returns how many rows are over.
    fn over(&mut self, key: (i64, Option<NodeId>), n: u64, cap: u64, count: impl Fn(u64) -> Result<u64, StoreError>) -> Result<u64, StoreError> {
        let est = match self.counts.get(&key) {
            Some(e) => e + n,
            None => count(cap + 1)?,
        };
        let real = if est > cap { count(u64::MAX)? } else { est };
        self.counts.insert(key, real.min(cap));
        Ok(real.saturating_sub(cap))
    }
}

/// Rows of `sql` (a `SELECT 1 … WHERE` with the given params), stopping at `limit`.
fn count_upto(tx: &Tx<'_>, sql: &str, p: impl rusqlite::Params, limit: u64) -> Result<u64, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let n: i64 = tx.conn().prepare_cached(&format!("SELECT count(*) FROM ({sql} LIMIT {limit})"))?.query_row(p, |r| r.get(0))?;
    Ok(n.max(0) as u64)
}

impl Tx<'_> {
    /// Holds back versions of operations that are not wholly here yet, so no reader sees half
    /// a rename or half a merge (the rule is `proto::replica::whole_commits`): they wait in
    /// `mesh_held`, committed with the rest of this transaction, until the last of their
    /// operation arrives, its time runs out or its writer holds too many. Returns what to
    /// apply now.
    pub fn whole_commits(&mut self, bucket_id: i64, incoming: Vec<Change>, now: i64, w: &mut Waiting) -> Result<Vec<Change>, StoreError> {
        let ops: BTreeSet<(NodeId, i64)> = incoming.iter().filter_map(|c| c.commit.filter(|k| k.len > 1).map(|k| (c.id().node, k.first_seq))).collect();
        if ops.is_empty() {
            return Ok(incoming);
        }
        let mut held = Vec::new();
        let mut released_before = BTreeSet::new();
        for (node, first) in &ops {
            held.extend(self.held_op(bucket_id, node, *first)?);
            let released = self
                .conn()
                .prepare_cached("SELECT 1 FROM mesh_op_released WHERE bucket_id = ?1 AND node = ?2 AND first_seq = ?3")?
                .query_row(params![bucket_id, node.0.to_vec(), first], |_| Ok(()))
                .optional()?;
            if released.is_some() {
                released_before.insert((*node, *first));
            }
        }
        let decided = rules::whole_commits(incoming, held, |c| {
            // An operation applied as it stood (its time ran out) takes the rest as it comes.
            c.commit.is_some_and(|k| released_before.contains(&(c.id().node, k.first_seq))) || self.is_applied(bucket_id, c).unwrap_or(false)
        });
        for (node, first) in &decided.released {
            self.conn().prepare_cached("DELETE FROM mesh_held WHERE bucket_id = ?1 AND node = ?2 AND first_seq = ?3")?.execute(params![bucket_id, node.0.to_vec(), first])?;
        }
        let mut new_by_writer: BTreeMap<NodeId, u64> = BTreeMap::new();
        for c in &decided.hold {
            let first = c.commit.map_or(0, |k| k.first_seq);
            let n = self
                .conn()
                .prepare_cached("INSERT OR IGNORE INTO mesh_held(bucket_id, node, first_seq, seq, data, since_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?
                .execute(params![bucket_id, c.id().node.0.to_vec(), first, c.id().seq, rules::encode(c), now])?;
            *new_by_writer.entry(c.id().node).or_default() += n as u64;
        }
        let mut ready = decided.ready;
        let cap = w.bounds.held_per_writer;
        for (node, n) in new_by_writer {
            let over = w.over((bucket_id, Some(node)), n, cap, |limit| count_upto(self, "SELECT 1 FROM mesh_held WHERE bucket_id = ?1 AND node = ?2", params![bucket_id, node.0.to_vec()], limit))?;
            if over == 0 {
                continue;
            }
            // The writer's oldest operations go as they stand until it is within its bound.
            let oldest: Vec<i64> = {
                let mut st = self.conn().prepare_cached("SELECT first_seq, count(*) FROM mesh_held WHERE bucket_id = ?1 AND node = ?2 GROUP BY first_seq ORDER BY min(since_ms), first_seq")?;
                let rows = st.query_map(params![bucket_id, node.0.to_vec()], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
                let mut freed = 0u64;
                let mut out = Vec::new();
                for row in rows {
                    let (first, n) = row?;
                    if freed >= over {
                        break;
                    }
                    freed += n.max(0) as u64;
                    out.push(first);
                }
                out
            };
            let mut versions = 0;
            for first in oldest {
                let op = self.release_op(bucket_id, &node, first)?;
                versions += op.len();
                ready.extend(op);
            }
            w.hits.push(WaitHit {
                name: "HELD_VERSIONS_PER_WRITER_MAX",
                limit: cap,
                what: format!("{} holds more unfinished operations than the bound: {versions} of its held versions were applied as they stand", node.short()),
            });
        }
        Ok(ready)
    }

    /// The held versions of operation (`node`, `first`).
    fn held_op(&self, bucket_id: i64, node: &NodeId, first: i64) -> Result<Vec<Change>, StoreError> {
        let mut st = self.conn().prepare_cached("SELECT data FROM mesh_held WHERE bucket_id = ?1 AND node = ?2 AND first_seq = ?3")?;
        let rows = st.query_map(params![bucket_id, node.0.to_vec(), first], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for data in rows {
            // Written by this store from a change it decoded: a row that no longer decodes
            // (a format from a later build, rolled back) is dropped with its operation.
            if let Ok(c) = rules::decode(&data?) {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Takes operation (`node`, `first`) out of the wait as it stands, and records that its
    /// later versions apply as they come. Returns its held versions.
    fn release_op(&mut self, bucket_id: i64, node: &NodeId, first: i64) -> Result<Vec<Change>, StoreError> {
        let op = self.held_op(bucket_id, node, first)?;
        self.conn().prepare_cached("DELETE FROM mesh_held WHERE bucket_id = ?1 AND node = ?2 AND first_seq = ?3")?.execute(params![bucket_id, node.0.to_vec(), first])?;
        self.conn().prepare_cached("INSERT OR IGNORE INTO mesh_op_released(bucket_id, node, first_seq) VALUES (?1, ?2, ?3)")?.execute(params![bucket_id, node.0.to_vec(), first])?;
        Ok(op)
    }

    /// The operations of bucket `bucket_id` held since before `now` less their time, taken
    /// out of the wait as they stand (at most `max` operations). Returns their versions.
    pub fn expired_held(&mut self, bucket_id: i64, now: i64, max: usize, w: &mut Waiting) -> Result<Vec<Change>, StoreError> {
        let ops: Vec<(Vec<u8>, i64)> = {
            let mut st = self.conn().prepare_cached("SELECT DISTINCT node, first_seq FROM mesh_held WHERE bucket_id = ?1 AND since_ms <= ?2 LIMIT ?3")?;
            let rows = st.query_map(params![bucket_id, now - w.bounds.held_ms, max as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for (node, first) in ops {
            let Ok(node) = <[u8; 32]>::try_from(node.as_slice()).map(NodeId) else { continue };
            let op = self.release_op(bucket_id, &node, first)?;
            w.hits.push(WaitHit {
                name: "HELD_OPERATION_SECS_MAX",
                limit: (w.bounds.held_ms / 1000) as u64,
                what: format!("an operation of {} did not wholly arrive in time: its {} versions here were applied as they stand", node.short(), op.len()),
            });
            out.extend(op);
        }
        Ok(out)
    }

    /// Keeps changes in `mesh_deferred` until a branch record or an admission releases them;
    /// a bucket holding more than its bound drops its oldest from the wait.
    pub fn defer(&mut self, bucket_id: i64, changes: &[Change], now: i64, w: &mut Waiting) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        for c in changes {
            self.conn()
                .prepare_cached("INSERT INTO mesh_deferred(bucket_id, writer, since_ms, data) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![bucket_id, c.id().node.0.to_vec(), w.carried.get(&c.id()).copied().unwrap_or(now), rules::encode(c)])?;
        }
        let cap = w.bounds.deferred_per_bucket;
        let over = w.over((bucket_id, None), changes.len() as u64, cap, |limit| count_upto(self, "SELECT 1 FROM mesh_deferred WHERE bucket_id = ?1", [bucket_id], limit))?;
        if over > 0 {
            self.conn().execute(
                "DELETE FROM mesh_deferred WHERE id IN (SELECT id FROM mesh_deferred WHERE bucket_id = ?1 ORDER BY id LIMIT ?2)",
                params![bucket_id, i64::try_from(over).unwrap_or(i64::MAX)],
            )?;
            self.mark_rescan(bucket_id)?;
            w.hits.push(WaitHit {
                name: "DEFERRED_VERSIONS_PER_BUCKET_MAX",
                limit: cap,
                what: format!("{over} versions waiting for their writer's admission or their branch left the wait (the documents keep them; they are read again when members or branches change)"),
            });
        }
        Ok(())
    }

    /// Takes every deferred version of bucket `bucket_id` out of the wait, to be tried again
    /// (one deferred again keeps the time it began to wait).
    pub fn take_deferred(&mut self, bucket_id: i64, w: &mut Waiting) -> Result<Vec<Change>, StoreError> {
        let waiting: Vec<(i64, Vec<u8>)> = {
            let mut st = self.conn().prepare_cached("SELECT since_ms, data FROM mesh_deferred WHERE bucket_id = ?1")?;
            let rows = st.query_map([bucket_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        if !waiting.is_empty() {
            self.conn().execute("DELETE FROM mesh_deferred WHERE bucket_id = ?1", [bucket_id])?;
        }
        w.counts.insert((bucket_id, None), 0);
        w.carried.clear();
        let mut out = Vec::with_capacity(waiting.len());
        for (since, data) in waiting {
            if let Ok(c) = rules::decode(&data) {
                w.carried.insert(c.id(), since);
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Drops from the wait the deferred versions of bucket `bucket_id` older than their time
    /// (the documents keep them). Returns how many.
    pub fn expire_deferred(&mut self, bucket_id: i64, now: i64, w: &mut Waiting) -> Result<usize, StoreError> {
        let n = self.conn().execute("DELETE FROM mesh_deferred WHERE bucket_id = ?1 AND since_ms <= ?2", params![bucket_id, now - w.bounds.deferred_ms])?;
        if n > 0 {
            self.mark_rescan(bucket_id)?;
            w.hits.push(WaitHit {
                name: "DEFERRED_SECS_MAX",
                limit: (w.bounds.deferred_ms / 1000) as u64,
                what: format!("{n} versions waited too long for their writer's admission or their branch and left the wait (the documents keep them)"),
            });
        }
        Ok(n)
    }

    /// Marks bucket `bucket_id` as having versions in its documents that left the wait.
    fn mark_rescan(&mut self, bucket_id: i64) -> Result<(), StoreError> {
        self.conn().prepare_cached("INSERT OR IGNORE INTO mesh_rescan(bucket_id, dirty, last_ms) VALUES (?1, 0, 0)")?.execute([bucket_id])?;
        Ok(())
    }

    /// Notes that bucket `bucket_id`'s members or branches changed: if versions left its
    /// wait, its documents are due to be read again.
    pub fn rescan_may_help(&mut self, bucket_id: i64) -> Result<(), StoreError> {
        self.conn().prepare_cached("UPDATE mesh_rescan SET dirty = 1 WHERE bucket_id = ?1")?.execute([bucket_id])?;
        Ok(())
    }

    /// Records that bucket `bucket_id`'s documents were read again at `now`: the mark goes if
    /// nothing read still waits (`settled`).
    pub fn rescanned(&mut self, bucket_id: i64, now: i64, settled: bool) -> Result<(), StoreError> {
        if settled {
            self.conn().prepare_cached("DELETE FROM mesh_rescan WHERE bucket_id = ?1")?.execute([bucket_id])?;
        } else {
            self.conn().prepare_cached("UPDATE mesh_rescan SET dirty = 0, last_ms = ?2 WHERE bucket_id = ?1")?.execute(params![bucket_id, now])?;
        }
        Ok(())
    }
}

/// The buckets with something due: operations held past their time, deferred versions past
/// theirs, documents due to be read again. Cheap while nothing waits (indexed, one row each).
pub fn buckets_due(conn: &rusqlite::Connection, now: i64, bounds: &WaitBounds) -> Result<BTreeSet<i64>, StoreError> {
    let mut out = BTreeSet::new();
    for (sql, at) in [
        ("SELECT DISTINCT bucket_id FROM mesh_held WHERE since_ms <= ?1", now - bounds.held_ms),
        ("SELECT DISTINCT bucket_id FROM mesh_deferred WHERE since_ms <= ?1", now - bounds.deferred_ms),
        ("SELECT bucket_id FROM mesh_rescan WHERE dirty = 1 AND last_ms <= ?1", now - bounds.rescan_every_ms),
    ] {
        let mut st = conn.prepare_cached(sql)?;
        let rows = st.query_map([at], |r| r.get::<_, i64>(0))?;
        for r in rows {
            out.insert(r?);
        }
    }
    Ok(out)
}

/// Whether bucket `bucket_id`'s documents are due to be read again.
pub fn rescan_due(conn: &rusqlite::Connection, bucket_id: i64, now: i64, bounds: &WaitBounds) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM mesh_rescan WHERE bucket_id = ?1 AND dirty = 1 AND last_ms <= ?2")?
        .query_row(params![bucket_id, now - bounds.rescan_every_ms], |_| Ok(()))
        .optional()?
        .is_some())
}
