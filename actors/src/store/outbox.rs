//! The transactional outbox: every mutation's [`Event`] is published to the honker stream
//! `tree` inside the transaction that made the change, so a consumer sees an event if and only
//! if its change committed. Consumers keep a cursor (honker's per-consumer offset) and read
//! after it: at-least-once, in commit order, nothing skipped.

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use super::{Branch, StoreError};
use crate::proto::entry::{ContentHash, EntryKind};
use crate::proto::path::TreePath;

/// The honker stream topic of path-tree events.
pub const TOPIC: &str = "tree";

/// Most events one [`read_after`] returns.
pub const READ_BATCH_EVENTS_MAX: i64 = 1024;

/// One committed change, as consumers (watch, GC, sync) see it. `first_seq..=last_seq` are the
/// version rows it wrote, so a consumer can read exactly those rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// write, mkdir, delete, rename, restore, merge, branch-create, branch-delete, bucket-create,
    /// replicated (versions from peers), retracted (a peer's version taken back out: the
    /// bucket's membership no longer accepts its writer).
    pub op: String,
    /// The bucket's id.
    pub bucket_id: i64,
    /// The branch's name.
    pub branch: String,
    /// The first seq this change wrote.
    pub first_seq: i64,
    /// The last seq this change wrote.
    pub last_seq: i64,
    /// The path it concerns, if one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<String>,
    /// The destination of a rename, or the source branch of a merge.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub to: Option<String>,
    /// For a write: the content hash, hex.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hash: Option<String>,
    /// For a write: the size in bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub size: Option<u64>,
    /// For a write: f, d or l.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kind: Option<String>,
}

impl Event {
    fn base(op: &str, branch: &Branch, first_seq: i64, last_seq: i64) -> Self {
        Event {
            op: op.to_string(),
            bucket_id: branch.bucket_id,
            branch: branch.name.clone(),
            first_seq,
            last_seq,
            path: None,
            to: None,
            hash: None,
            size: None,
            kind: None,
        }
    }

    /// A file, symlink or directory written, with the parent directories it created.
    pub fn write(branch: &Branch, first: i64, seq: i64, path: &TreePath, kind: EntryKind, hash: ContentHash, size: u64) -> Self {
        Event {
            path: Some(path.to_string()),
            hash: Some(hash.to_hex()),
            size: Some(size),
            kind: Some(kind.code().to_string()),
            ..Self::base("write", branch, first, seq)
        }
    }

    /// An operation on one path (mkdir, delete, restore) spanning `first..=last`.
    pub fn path_op(op: &str, branch: &Branch, first: i64, last: i64, path: &TreePath) -> Self {
        Event { path: Some(path.to_string()), ..Self::base(op, branch, first, last) }
    }

    /// A rename of `from` to `to`.
    pub fn rename(branch: &Branch, first: i64, last: i64, from: &TreePath, to: &TreePath) -> Self {
        Event { path: Some(from.to_string()), to: Some(to.to_string()), ..Self::base("rename", branch, first, last) }
    }

    /// A branch or bucket created or deleted.
    pub fn branch_op(op: &str, branch: &Branch, seq: i64) -> Self {
        Self::base(op, branch, seq, seq)
    }

    /// Versions from peers, with local seqs `first..=last`, applied to `branch`.
    pub fn replicated(branch: &Branch, first: i64, last: i64) -> Self {
        Self::base("replicated", branch, first, last)
    }

    /// A merge of `from` into `branch`.
    pub fn merge(branch: &Branch, first: i64, last: i64, from: &str) -> Self {
        Event { to: Some(from.to_string()), ..Self::base("merge", branch, first, last) }
    }
}

/// Publishes `events` on the connection's open transaction.
pub(crate) fn publish(conn: &Connection, events: &[Event]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    // honker's `honker_stream_publish(topic, key, payload)` is this insert into its stream
    // table, prepared anew at every call: a third of the cost of committing a small file.
    // The same insert through a cached statement.
    let mut st = conn.prepare_cached("INSERT INTO _honker_stream (topic, key, payload) VALUES (?1, NULL, ?2)")?;
    for e in events {
        let payload = serde_json::to_string(e).expect("events serialise");
        st.execute(params![TOPIC, payload])?;
    }
    Ok(())
}

/// Up to `limit` events after `offset`, with their offsets, in commit order.
pub fn read_after(conn: &Connection, offset: i64, limit: i64) -> Result<Vec<(i64, Event)>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT offset, payload FROM _honker_stream WHERE topic = ?1 AND offset > ?2 ORDER BY offset LIMIT ?3",
    )?;
    let rows = st.query_map(params![TOPIC, offset, limit.min(READ_BATCH_EVENTS_MAX)], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (off, payload) = row?;
        let event = serde_json::from_str(&payload)
            .map_err(|e| StoreError::Invalid(format!("outbox event {off} is not readable ({e}): the database is damaged")))?;
        out.push((off, event));
    }
    Ok(out)
}

/// The saved cursor of `consumer` (0 when it has none).
pub fn cursor(conn: &Connection, consumer: &str) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT honker_stream_get_offset(?1, ?2)", params![consumer, TOPIC], |r| r.get(0))?)
}

/// Moves `consumer`'s cursor forward to `offset` (never back), and records that it was
/// active at `now_ms`.
pub fn save_cursor(conn: &Connection, consumer: &str, offset: i64, now_ms: i64) -> Result<(), StoreError> {
    conn.query_row("SELECT honker_stream_save_offset(?1, ?2, ?3)", params![consumer, TOPIC, offset], |r| r.get::<_, i64>(0))?;
    touch(conn, consumer, now_ms)
}

/// Records that `consumer` is active at `now_ms` without moving its cursor: a follower with
/// nothing to read says so now and then, so it does not expire while it waits.
pub fn touch(conn: &Connection, consumer: &str, now_ms: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO outbox_consumer(name, seen_ms) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET seen_ms = max(seen_ms, excluded.seen_ms)",
    )?
    .execute(params![consumer, now_ms])?;
    Ok(())
}

/// A consumer of the outbox, for `alkfs status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumer {
    /// Its name (`node`, `watch`, or what `watch --consumer` named).
    pub name: String,
    /// The last event it has passed.
    pub cursor: i64,
    /// When it last read or said it was waiting (ms since the epoch).
    pub seen_ms: i64,
    /// Idle past the outbox retention: it no longer holds events back from pruning, and
    /// when it comes back it is told what it missed.
    pub expired: bool,
}

/// Every consumer with a cursor; those not seen since `active_since_ms` are expired.
pub fn consumers(conn: &Connection, active_since_ms: i64) -> Result<Vec<Consumer>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT c.name, c.offset, COALESCE(s.seen_ms, 0) FROM _honker_stream_consumers c
         LEFT JOIN outbox_consumer s ON s.name = c.name WHERE c.topic = ?1 ORDER BY c.name",
    )?;
    let rows = st.query_map([TOPIC], |r| {
        let seen_ms: i64 = r.get(2)?;
        let name: String = r.get(0)?;
        let expired = seen_ms < active_since_ms && name != PUBLISHER;
        Ok(Consumer { name, cursor: r.get(1)?, seen_ms, expired })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The consumer that publishes this node's writes to its peers (`engine::mesh`). What it has
/// not read has not left this node yet, so it never expires: an event after its cursor is
/// kept whatever its date and whoever else has read it.
pub const PUBLISHER: &str = "mesh";

/// Deletes the events no active consumer still needs: those every consumer seen since
/// `active_since_ms` has passed; with no active consumer, those published before
/// `active_since_ms`. Expired consumers hold nothing back, so one `watch` that never
/// returns cannot make the outbox grow forever, with one exception: the [`PUBLISHER`]
/// never expires, and nothing after its cursor is pruned (a write it has not published
/// would otherwise never reach the peers). Returns how many.
pub fn prune(conn: &Connection, active_since_ms: i64) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "WITH active AS (
             SELECT c.offset FROM _honker_stream_consumers c JOIN outbox_consumer s ON s.name = c.name
             WHERE c.topic = ?1 AND s.seen_ms >= ?2),
         publisher AS (SELECT offset FROM _honker_stream_consumers WHERE topic = ?1 AND name = ?3)
         DELETE FROM _honker_stream WHERE topic = ?1
             AND offset <= COALESCE((SELECT offset FROM publisher), offset)
             AND (CASE WHEN EXISTS (SELECT 1 FROM active)
                  THEN offset <= (SELECT MIN(offset) FROM active)
                  ELSE created_at * 1000 < ?2 END)",
        params![TOPIC, active_since_ms, PUBLISHER],
    )?)
}

/// The offset of the newest event ever published (0 when none), pruned or not: the stream's
/// AUTOINCREMENT counter, which is never reissued.
pub fn head(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = '_honker_stream'), 0)")?
        .query_row([], |r| r.get(0))?)
}

/// The offset of the oldest event still kept, if any: a consumer whose cursor is further
/// behind missed the events in between (they were pruned while it was expired).
pub fn oldest(conn: &Connection) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT MIN(offset) FROM _honker_stream WHERE topic = ?1")?
        .query_row([TOPIC], |r| r.get(0))?)
}

/// Makes the next event's offset larger than `floor` (used after a crash, to skip offsets
/// a power loss may have taken back; see `store::Ids`).
pub(crate) fn set_head_at_least(conn: &Connection, floor: i64) -> Result<(), StoreError> {
    if head(conn)? >= floor {
        return Ok(());
    }
    let updated = conn.execute("UPDATE sqlite_sequence SET seq = ?1 WHERE name = '_honker_stream'", [floor])?;
    if updated == 0 {
        conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('_honker_stream', ?1)", [floor])?;
    }
    Ok(())
}
