//! Reads through a [`View`]: the chain of a branch and its ancestors, each link with the last
//! seq it may see. A path resolves to its newest row in the nearest link that has one; a
//! tombstone there hides anything farther up. Every query is a range scan of the clustered
//! `version` table, one per link, so cost grows with the chain (bounded) and the answer,
//! not with the history of the bucket.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::{branch_by_id, entry_from_cols, Branch, StoreError, VersionRow};
use crate::proto::clock::Stamp;
use crate::proto::entry::{EntryKind, Version};
use crate::proto::ids::{OrderKey, VersionId};
use crate::proto::limits::BRANCH_CHAIN_DEPTH_MAX;
use crate::proto::path::TreePath;

/// One link of a [`View`]: a branch's rows that arrived here by `seq_max` (a local bound:
/// what this node had at a moment) and are ordered at or before `key_max` (a bound that
/// means the same on every node: a fork stamp).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// The branch.
    pub branch: i64,
    /// Rows with a larger local seq are not seen.
    pub seq_max: i64,
    /// Rows with a larger order key are not seen.
    pub key_max: OrderKey,
}

/// A branch as of some moment: `links[0]` is the branch itself, then its parent, …. Within a
/// link a path resolves to its visible row with the largest order key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// Nearest first.
    pub links: Vec<Link>,
}

impl View {
    /// The branch as it is now (its head).
    pub fn head(conn: &Connection, branch: &Branch) -> Result<View, StoreError> {
        Self::within(conn, branch, i64::MAX, OrderKey::MAX)
    }

    /// The branch as it was at local seq `seq`: its own rows up to `seq`, its parent's up to
    /// the fork (or `seq`, whichever is earlier), and so on.
    pub fn at(conn: &Connection, branch: &Branch, seq: i64) -> Result<View, StoreError> {
        Self::within(conn, branch, seq, OrderKey::MAX)
    }

    /// The branch's rows up to `seq` and `key`, and its ancestors' as its forks bound them.
    pub fn within(conn: &Connection, branch: &Branch, seq: i64, key: OrderKey) -> Result<View, StoreError> {
        let mut links = vec![Link { branch: branch.id, seq_max: seq, key_max: key }];
        let (mut seq_max, mut key_max) = (seq.min(branch.fork_seq), key.min(branch.fork_key.unwrap_or(OrderKey::MAX)));
        let mut parent = branch.parent_id;
        while let Some(id) = parent {
            if links.len() > BRANCH_CHAIN_DEPTH_MAX {
                return Err(StoreError::Invalid(format!("branch chain of {} is deeper than {BRANCH_CHAIN_DEPTH_MAX}", branch.name)));
            }
            let p = branch_by_id(conn, id)?;
            links.push(Link { branch: p.id, seq_max, key_max });
            seq_max = seq_max.min(p.fork_seq);
            key_max = key_max.min(p.fork_key.unwrap_or(OrderKey::MAX));
            parent = p.parent_id;
        }
        Ok(View { links })
    }

    /// A view that sees nothing (the base of two unrelated histories).
    pub fn empty() -> View {
        View { links: Vec::new() }
    }

    /// This view's link of `branch_id`, if the branch is in the chain.
    pub fn link_of(&self, branch_id: i64) -> Option<&Link> {
        self.links.iter().find(|l| l.branch == branch_id)
    }
}

pub(crate) const ROW_COLS: &str = "seq, branch_id, dir, name, kind, hash, size, mode, mtime_ms, written_ms, origin, written_lc, vkey, pred";

/// A version row from a query that selects [`ROW_COLS`] first.
pub(crate) fn row_from_cols(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    row_from(r)
}

fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    let path = TreePath::stored(r.get_ref(2)?.as_str()?, r.get_ref(3)?.as_str()?);
    row_with_path(r, path)
}

/// A row of a listing of `dir`: its path is `dir` joined with the name column, without the
/// cost of re-validating a path that was validated when written.
fn row_in(dir: &TreePath) -> impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> + '_ {
    move |r| {
        let name = r.get_ref(3)?.as_str()?;
        row_with_path(r, dir.child_unchecked(name))
    }
}

fn row_with_path(r: &rusqlite::Row<'_>, path: TreePath) -> rusqlite::Result<VersionRow> {
    Ok(VersionRow {
        seq: r.get(0)?,
        branch_id: r.get(1)?,
        path,
        version: Version {
            entry: entry_from_cols(r.get_ref(4)?.as_str_or_null()?, r.get_ref(5)?.as_blob_or_null()?, r.get(6)?, r.get(7)?, r.get(8)?)?,
            written: Stamp { ms: r.get(9)?, counter: r.get(11)? },
        },
        origin: r.get(10)?,
        key: OrderKey::from_bytes(r.get_ref(12)?.as_blob()?).ok_or_else(|| bad_column(12, "vkey"))?,
        pred: match r.get_ref(13)?.as_blob_or_null()? {
            None => None,
            Some(b) => Some(VersionId::from_bytes(b).ok_or_else(|| bad_column(13, "pred"))?),
        },
    })
}

fn bad_column(i: usize, name: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(i, name.into(), rusqlite::types::Type::Blob)
}

/// Splits a non-root path into the (dir, name) columns.
pub(crate) fn dir_name(path: &TreePath) -> (String, String) {
    match path.split() {
        Some((dir, name)) => (dir.as_str().to_string(), name.to_string()),
        None => ("".to_string(), "".to_string()),
    }
}

/// The newest row of `path` visible in `view` (a tombstone included), if any.
pub fn resolve(conn: &Connection, view: &View, path: &TreePath) -> Result<Option<VersionRow>, StoreError> {
    if path.is_root() {
        return Ok(None);
    }
    let (dir, name) = dir_name(path);
    let mut st = conn.prepare_cached(&format!(
        "SELECT {ROW_COLS} FROM version WHERE branch_id = ?1 AND dir = ?2 AND name = ?3 AND vkey <= ?4 AND seq <= ?5
         ORDER BY vkey DESC LIMIT 1"
    ))?;
    for l in &view.links {
        if let Some(row) = st.query_row(params![l.branch, dir, name, l.key_max.0, l.seq_max], row_from).optional()? {
            return Ok(Some(row));
        }
    }
    Ok(None)
}

/// [`own_head`] of branch `branch` of bucket `bucket`, by their names, in one statement (a
/// put reads it as it begins; looking the branch up first took most of the time). `None`
/// also when there is no such live branch.
pub fn own_head_by_name(conn: &Connection, bucket: &str, branch: &str, path: &TreePath) -> Result<Option<VersionId>, StoreError> {
    let (dir, name) = dir_name(path);
    let key: Option<Vec<u8>> = conn
        .prepare_cached(
            "SELECT v.vkey FROM bucket k JOIN branch b ON b.bucket_id = k.id AND b.name = ?2 AND b.deleted_seq IS NULL
             JOIN version v ON v.branch_id = b.id AND v.dir = ?3 AND v.name = ?4
             WHERE k.name = ?1 ORDER BY v.vkey DESC LIMIT 1",
        )?
        .query_row(params![bucket, branch, dir, name], |r| r.get(0))
        .optional()?;
    Ok(key.and_then(|k| OrderKey::from_bytes(&k)).map(|k| k.version()))
}

/// The id of the newest row of `path` among `branch`'s own rows (not its ancestors'): the
/// version a write on the branch replaces, its predecessor.
pub fn own_head(conn: &Connection, branch: i64, path: &TreePath) -> Result<Option<VersionId>, StoreError> {
    Ok(own_head_key(conn, branch, path)?.map(|k| k.version()))
}

/// The order key of [`own_head`].
pub fn own_head_key(conn: &Connection, branch: i64, path: &TreePath) -> Result<Option<OrderKey>, StoreError> {
    let (dir, name) = dir_name(path);
    let key: Option<Vec<u8>> = conn
        .prepare_cached("SELECT vkey FROM version WHERE branch_id = ?1 AND dir = ?2 AND name = ?3 ORDER BY vkey DESC LIMIT 1")?
        .query_row(params![branch, dir, name], |r| r.get(0))
        .optional()?;
    Ok(key.and_then(|k| OrderKey::from_bytes(&k)))
}

/// The live row of `path` in `view`: `None` when absent or deleted.
pub fn live(conn: &Connection, view: &View, path: &TreePath) -> Result<Option<VersionRow>, StoreError> {
    Ok(resolve(conn, view, path)?.filter(|r| r.version.entry.is_some()))
}

/// The live children of directory `dir` in `view`, sorted by name. Does not check that `dir`
/// is a directory; callers that care call [`live`] on it first.
pub fn list(conn: &Connection, view: &View, dir: &TreePath) -> Result<Vec<VersionRow>, StoreError> {
    let make = row_in(dir);
    // A row's name is its path after `dir/`: no split of the path per comparison.
    let after = dir.as_str().trim_end_matches('/').len() + 1;
    list_with(conn, view, dir, ROW_COLS, make, |r| &r.path.as_str()[after..], |r| r.version.entry.is_some())
}

/// The names and kinds of the live children of `dir` in `view`, sorted by name: what a plain
/// `ls` prints, read as two columns instead of a whole row each (the column reads were the
/// larger part of listing 10,000 entries).
pub fn list_names(conn: &Connection, view: &View, dir: &TreePath) -> Result<Vec<(String, EntryKind)>, StoreError> {
    let make = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(String, Option<EntryKind>)> {
        let kind = match r.get_ref(1)?.as_str_or_null()? {
            None => None,
            Some(code) => Some(EntryKind::from_code(code).ok_or_else(|| bad_column(1, "kind"))?),
        };
        Ok((r.get_ref(0)?.as_str()?.to_string(), kind))
    };
    let rows = list_with(conn, view, dir, "name, kind", make, |r| r.0.as_str(), |r| r.1.is_some())?;
    Ok(rows.into_iter().filter_map(|(name, kind)| Some((name, kind?))).collect())
}

/// The listing of `dir` in `view` as `cols` (of which `name` is one) made into `T`s by `make`:
/// the newest row of each name within each link, nearer links shadowing farther ones,
/// tombstones included until the end; then only the rows `live` keeps.
fn list_with<T>(
    conn: &Connection,
    view: &View,
    dir: &TreePath,
    cols: &str,
    make: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    name: impl Fn(&T) -> &str + Copy,
    live: impl Fn(&T) -> bool,
) -> Result<Vec<T>, StoreError> {
    // The clustered key is (branch, dir, name, vkey DESC): the first row of each name's run is
    // its newest within the limits, and later rows of the run are skipped. Each link's rows
    // arrive sorted by name (BINARY collation, the same order as Rust's `str`), so the links
    // are combined by a merge, nearer links shadowing farther ones, tombstones included.
    let mut st = conn.prepare_cached(&format!(
        "SELECT {cols} FROM version WHERE branch_id = ?1 AND dir = ?2 AND vkey <= ?3 AND seq <= ?4 ORDER BY name, vkey DESC"
    ))?;
    let name_col = st.column_index("name")?;
    let mut merged: Vec<T> = Vec::new();
    for l in &view.links {
        let mut link = Vec::new();
        let mut rows = st.query(params![l.branch, dir.as_str(), l.key_max.0, l.seq_max])?;
        while let Some(r) = rows.next()? {
            let this = r.get_ref(name_col)?.as_str().map_err(rusqlite::Error::from)?;
            if link.last().is_some_and(|prev: &T| name(prev) == this) {
                continue;
            }
            link.push(make(r)?);
        }
        merged = if merged.is_empty() { link } else { shadow_merge(merged, link, name) };
    }
    merged.retain(live);
    Ok(merged)
}

/// Merges two name-sorted listings; on equal names the `near` row wins.
fn shadow_merge<T>(near: Vec<T>, far: Vec<T>, name: impl Fn(&T) -> &str) -> Vec<T> {
    let mut out = Vec::with_capacity(near.len() + far.len());
    let (mut a, mut b) = (near.into_iter().peekable(), far.into_iter().peekable());
    loop {
        let order = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => name(x).cmp(name(y)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => return out,
        };
        match order {
            std::cmp::Ordering::Less => out.extend(a.next()),
            std::cmp::Ordering::Greater => out.extend(b.next()),
            std::cmp::Ordering::Equal => {
                out.extend(a.next());
                b.next();
            }
        }
    }
}

/// Every live path strictly below `root` in `view`, by path (parents before children).
pub fn subtree(conn: &Connection, view: &View, root: &TreePath) -> Result<BTreeMap<TreePath, VersionRow>, StoreError> {
    // Rows whose dir is `root` or lies below it: `dir = root OR dir in [root/, root0)`, '0' being
    // the byte after '/'.
    let base = root.as_str().trim_end_matches('/');
    let (lo, hi) = (format!("{base}/"), format!("{base}0"));
    let mut st = conn.prepare_cached(&format!(
        "SELECT {ROW_COLS} FROM version WHERE branch_id = ?1 AND (dir = ?2 OR (dir >= ?3 AND dir < ?4)) AND vkey <= ?5 AND seq <= ?6
         ORDER BY dir, name, vkey DESC"
    ))?;
    let mut seen: BTreeMap<TreePath, VersionRow> = BTreeMap::new();
    let root_dir = if root.is_root() { "/".to_string() } else { root.as_str().to_string() };
    for l in &view.links {
        let mut rows = st.query(params![l.branch, root_dir, lo, hi, l.key_max.0, l.seq_max])?;
        let mut last: Option<TreePath> = None;
        while let Some(r) = rows.next()? {
            let row = row_from(r)?;
            if last.as_ref() == Some(&row.path) {
                continue;
            }
            last = Some(row.path.clone());
            seen.entry(row.path.clone()).or_insert(row);
        }
    }
    seen.retain(|_, r| r.version.entry.is_some());
    // A live row under a dead directory is not reachable: drop it, so callers see a tree.
    let dead_parent = |p: &TreePath, seen: &BTreeMap<TreePath, VersionRow>| {
        p.ancestors().iter().any(|a| a.is_within(root) && a != root && !seen.contains_key(a))
    };
    let unreachable: Vec<TreePath> = seen.keys().filter(|p| dead_parent(p, &seen)).cloned().collect();
    for p in unreachable {
        seen.remove(&p);
    }
    Ok(seen)
}

/// Every version of `path` visible in `view`, newest first.
pub fn history(conn: &Connection, view: &View, path: &TreePath) -> Result<Vec<VersionRow>, StoreError> {
    let (dir, name) = dir_name(path);
    let mut st = conn.prepare_cached(&format!(
        "SELECT {ROW_COLS} FROM version WHERE branch_id = ?1 AND dir = ?2 AND name = ?3 AND vkey <= ?4 AND seq <= ?5
         ORDER BY vkey DESC"
    ))?;
    let mut out = Vec::new();
    for l in &view.links {
        for row in st.query_map(params![l.branch, dir, name, l.key_max.0, l.seq_max], row_from)? {
            out.push(row?);
        }
    }
    Ok(out)
}

/// The rows of version `version` (its writer's seq and a prefix of the writer's id): one,
/// unless the prefix is too short to tell writers apart.
pub fn by_version(conn: &Connection, version: &crate::proto::ids::VersionRef, me: &crate::proto::ids::NodeId) -> Result<Vec<VersionRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {ROW_COLS} FROM version WHERE vseq = ?1"))?;
    let rows = stmt.query_map([version.seq], row_from)?.collect::<Result<Vec<_>, _>>()?;
    let mut found: Vec<VersionRow> = rows.into_iter().filter(|r| version.names(&r.id(), me)).collect();
    found.dedup_by(|a, b| a.id() == b.id());
    Ok(found)
}

/// The version with id `seq`, if it exists.
pub fn by_seq(conn: &Connection, seq: i64) -> Result<Option<VersionRow>, StoreError> {
    Ok(conn
        .prepare_cached(&format!("SELECT {ROW_COLS} FROM version WHERE seq = ?1"))?
        .query_row([seq], row_from)
        .optional()?)
}

/// Paths with a row on `branch_id` in the seq range `(after, upto]`.
pub fn changed_paths(conn: &Connection, branch_id: i64, after: i64, upto: i64) -> Result<Vec<TreePath>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT DISTINCT dir, name FROM version WHERE branch_id = ?1 AND seq > ?2 AND seq <= ?3",
    )?;
    let rows = st.query_map(params![branch_id, after, upto], |r| Ok(TreePath::stored(r.get_ref(0)?.as_str()?, r.get_ref(1)?.as_str()?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Paths with a row on `branch_id` ordered in `(after, upto]` that arrived after seq `floor`
/// and by seq `seq_max`: what a fork stamp lets one view see and another not.
pub fn changed_paths_by_key(
    conn: &Connection,
    branch_id: i64,
    after: &OrderKey,
    upto: &OrderKey,
    floor: i64,
    seq_max: i64,
) -> Result<Vec<TreePath>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT DISTINCT dir, name FROM version WHERE branch_id = ?1 AND vkey > ?2 AND vkey <= ?3 AND seq > ?4 AND seq <= ?5",
    )?;
    let rows = st.query_map(params![branch_id, after.0, upto.0, floor, seq_max], |r| {
        Ok(TreePath::stored(r.get_ref(0)?.as_str()?, r.get_ref(1)?.as_str()?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The bytes of inline blob `hash`: `Ok(None)` when the blob is a file blob or unknown.
pub fn inline_blob(conn: &Connection, hash: &crate::proto::entry::ContentHash) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT data FROM blob WHERE hash = ?1")?
        .query_row([hash.0.to_vec()], |r| r.get::<_, Option<Vec<u8>>>(0))
        .optional()?
        .flatten())
}

/// A blob the iroh-blobs index does not hold yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingBlob {
    /// Its hash.
    pub hash: crate::proto::entry::ContentHash,
    /// Its size.
    pub size: u64,
    /// Its bytes, for inline blobs.
    pub inline: Option<Vec<u8>>,
}

/// Up to `limit` blobs after `after` (by hash), all of them or only those not yet indexed.
pub fn blobs_after(conn: &Connection, after: &[u8], only_pending: bool, limit: i64) -> Result<Vec<PendingBlob>, StoreError> {
    // Two statements, so the pending one can use the partial index `blob_pending`.
    let sql = if only_pending {
        "SELECT hash, size, data FROM blob WHERE hash > ?1 AND indexed = 0 ORDER BY hash LIMIT ?2"
    } else {
        "SELECT hash, size, data FROM blob WHERE hash > ?1 ORDER BY hash LIMIT ?2"
    };
    let mut st = conn.prepare_cached(sql)?;
    let rows = st.query_map(rusqlite::params![after, limit], |r| {
        let hash: Vec<u8> = r.get(0)?;
        let hash: [u8; 32] = hash
            .try_into()
            .map_err(|_| rusqlite::Error::InvalidColumnType(0, "hash".into(), rusqlite::types::Type::Blob))?;
        Ok(PendingBlob { hash: crate::proto::entry::ContentHash(hash), size: r.get::<_, i64>(1)? as u64, inline: r.get(2)? })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Marks `hash` as held by the iroh-blobs index.
pub fn mark_indexed(conn: &Connection, hash: &crate::proto::entry::ContentHash) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE blob SET indexed = 1 WHERE hash = ?1")?.execute([hash.0.to_vec()])?;
    Ok(())
}
