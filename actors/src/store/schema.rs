//! The SQLite schema and its migrations, versioned with `PRAGMA user_version` from day one.
//!
//! Each entry of [`MIGRATIONS`] moves the schema from version `i` to `i + 1` and runs in the
//! same transaction as the version bump, so a crash mid-migration leaves the old schema.

use rusqlite::Connection;

use super::StoreError;

/// Migration `i` takes the schema from version `i` to `i + 1` (public so tests can build a
/// database as an older alkfs left it).
pub const MIGRATIONS: &[&str] = &[
    // 0 → 1: buckets, branches, the version history, merge points, conflicts, the clock.
    r#"
    CREATE TABLE bucket(
        id         INTEGER PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        created_ms INTEGER NOT NULL
    );
    -- A branch reads its own rows, then its parent's up to fork_seq, and so on up the chain.
    -- A deleted branch keeps its rows while children read through it; only its name is freed.
    CREATE TABLE branch(
        id          INTEGER PRIMARY KEY,
        bucket_id   INTEGER NOT NULL REFERENCES bucket(id),
        name        TEXT NOT NULL,
        parent_id   INTEGER REFERENCES branch(id),
        fork_seq    INTEGER NOT NULL,
        depth       INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL,
        deleted_seq INTEGER
    );
    CREATE UNIQUE INDEX branch_live_name ON branch(bucket_id, name) WHERE deleted_seq IS NULL;
    -- Every version of every path, append-only; the head of a path in a branch is its row with
    -- the largest seq. Clustered by (branch, dir, name, seq DESC) so listing a directory is one
    -- range scan in which each name's newest row comes first, and a path's history is a range
    -- read newest first. kind NULL is a tombstone.
    CREATE TABLE version(
        branch_id  INTEGER NOT NULL,
        dir        TEXT NOT NULL,
        name       TEXT NOT NULL,
        seq        INTEGER NOT NULL,
        kind       TEXT,
        hash       BLOB,
        size       INTEGER NOT NULL,
        mode       INTEGER NOT NULL,
        mtime_ms   INTEGER NOT NULL,
        written_ms INTEGER NOT NULL,
        origin     TEXT NOT NULL,
        PRIMARY KEY(branch_id, dir, name, seq DESC)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX version_seq ON version(seq);
    CREATE INDEX version_branch_seq ON version(branch_id, seq);
    CREATE INDEX version_hash ON version(hash) WHERE hash IS NOT NULL;
    -- Where a merge left two branches in step: the next merge between them starts from here.
    CREATE TABLE merge_point(
        id          INTEGER PRIMARY KEY,
        from_branch INTEGER NOT NULL,
        into_branch INTEGER NOT NULL,
        from_seq    INTEGER NOT NULL,
        into_seq    INTEGER NOT NULL
    );
    CREATE INDEX merge_point_pair ON merge_point(from_branch, into_branch, into_seq);
    -- A path both sides of a merge changed: the winner became the head, the loser is a
    -- version row (loser_seq) on the same branch, restorable.
    CREATE TABLE conflict(
        id          INTEGER PRIMARY KEY,
        branch_id   INTEGER NOT NULL,
        path        TEXT NOT NULL,
        from_branch TEXT NOT NULL,
        winner_seq  INTEGER NOT NULL,
        loser_seq   INTEGER NOT NULL,
        at_ms       INTEGER NOT NULL
    );
    CREATE INDEX conflict_branch ON conflict(branch_id, id);
    -- The commit clock: the last seq handed out. Kept in a row of its own, not derived from
    -- max(version.seq), so pruning old versions can never make a seq come back.
    CREATE TABLE clock(id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER NOT NULL);
    -- Every blob the tree has named: small ones carry their bytes (the inline tier, committed
    -- with the entry); `indexed` once the iroh-blobs store holds it for verified streaming.
    CREATE TABLE blob(
        hash    BLOB PRIMARY KEY,
        size    INTEGER NOT NULL,
        data    BLOB,
        indexed INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE INDEX blob_pending ON blob(hash) WHERE indexed = 0;
    INSERT INTO clock VALUES (0, 0);
    "#,
    // 1 → 2: id leases, so no id is handed out twice after a power loss (see `store::Ids`);
    // hybrid logical clock stamps (a counter beside written_ms, and the last stamp handed
    // out); when each outbox consumer last read (consumers idle past retention expire).
    r#"
    ALTER TABLE version ADD COLUMN written_lc INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE clock ADD COLUMN last_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE clock ADD COLUMN last_lc INTEGER NOT NULL DEFAULT 0;
    UPDATE clock SET last_ms = COALESCE((SELECT max(written_ms) FROM version), 0);
    ALTER TABLE clock ADD COLUMN seq_leased INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE clock ADD COLUMN offset_leased INTEGER NOT NULL DEFAULT 0;
    UPDATE clock SET seq_leased = seq,
        offset_leased = COALESCE((SELECT seq FROM sqlite_sequence WHERE name = '_honker_stream'), 0);
    CREATE TABLE outbox_consumer(
        name    TEXT PRIMARY KEY,
        seen_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO outbox_consumer SELECT name, unixepoch() * 1000 FROM _honker_stream_consumers WHERE topic = 'tree';
    "#,
    // 2 → 3: names that mean the same on every node (see `proto::ids`). The store records the
    // node id it writes as; buckets and branches get unique ids; a version is named by its
    // writer and the writer's seq (vseq), remembers the version it replaced (pred: what its
    // writer had seen), and is ordered by vkey (stamp, writer, seq), the same order on every
    // node, instead of by local seq. A branch forked from now on sees its parent up to its
    // fork stamp (fork_key), which means the same on every node; branches forked before keep
    // their fork seq. The version table is rebuilt around its new key (`rekey_versions`).
    r#"
    ALTER TABLE clock ADD COLUMN self_node BLOB;
    ALTER TABLE bucket ADD COLUMN uid BLOB;
    UPDATE bucket SET uid = randomblob(16);
    CREATE UNIQUE INDEX bucket_uid ON bucket(uid);
    ALTER TABLE branch ADD COLUMN uid BLOB;
    UPDATE branch SET uid = randomblob(16);
    CREATE UNIQUE INDEX branch_uid ON branch(uid);
    ALTER TABLE branch ADD COLUMN fork_key BLOB;
    -- Conflicts are of two kinds: a merge's (from_branch names the source) and versions
    -- written concurrently on two nodes ('concurrent': from_branch is "@" and the loser's
    -- writer). One row per loser; a dismissed concurrent loser is remembered so that replicas
    -- arriving later do not list it again.
    ALTER TABLE conflict ADD COLUMN kind TEXT NOT NULL DEFAULT 'merge';
    CREATE UNIQUE INDEX conflict_loser ON conflict(branch_id, loser_seq);
    CREATE TABLE conflict_dismissed(loser_key BLOB PRIMARY KEY) WITHOUT ROWID;
    -- A blob a replicated version names before its bytes are here: present = 0 until fetched.
    ALTER TABLE blob ADD COLUMN present INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX blob_missing ON blob(hash) WHERE present = 0;
    CREATE TABLE version3(
        branch_id  INTEGER NOT NULL,
        dir        TEXT NOT NULL,
        name       TEXT NOT NULL,
        vkey       BLOB NOT NULL,
        seq        INTEGER NOT NULL,
        vseq       INTEGER NOT NULL,
        pred       BLOB,
        kind       TEXT,
        hash       BLOB,
        size       INTEGER NOT NULL,
        mode       INTEGER NOT NULL,
        mtime_ms   INTEGER NOT NULL,
        written_ms INTEGER NOT NULL,
        written_lc INTEGER NOT NULL,
        origin     TEXT NOT NULL,
        PRIMARY KEY(branch_id, dir, name, vkey DESC)
    ) WITHOUT ROWID;
    "#,
    // 3 → 4: the mesh's state. Each bucket's replicated documents (automerge) as a full
    // save plus increments; what each peer and this node last agreed per document; the
    // members of each bucket and where nodes listen (both read from the bucket's document);
    // invitations (only a hash of each secret).
    r#"
    CREATE TABLE mesh_doc(
        bucket_id INTEGER NOT NULL,
        doc       INTEGER NOT NULL,
        part      INTEGER NOT NULL,
        data      BLOB NOT NULL,
        PRIMARY KEY(bucket_id, doc, part)
    ) WITHOUT ROWID;
    CREATE TABLE mesh_sync(
        peer      BLOB NOT NULL,
        bucket_id INTEGER NOT NULL,
        doc       INTEGER NOT NULL,
        state     BLOB NOT NULL,
        PRIMARY KEY(peer, bucket_id, doc)
    ) WITHOUT ROWID;
    CREATE TABLE mesh_member(
        bucket_id  INTEGER NOT NULL,
        node       BLOB NOT NULL,
        added_ms   INTEGER NOT NULL,
        added_by   BLOB,
        removed_ms INTEGER,
        PRIMARY KEY(bucket_id, node)
    ) WITHOUT ROWID;
    CREATE TABLE mesh_addr(
        node       BLOB PRIMARY KEY,
        addrs      TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE mesh_invite(
        secret_hash BLOB PRIMARY KEY,
        bucket_id   INTEGER NOT NULL,
        expires_ms  INTEGER NOT NULL,
        uses_left   INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE mesh_deferred(
        id        INTEGER PRIMARY KEY,
        bucket_id INTEGER NOT NULL,
        data      BLOB NOT NULL
    );
    "#,
    // 4 → 5: each replicated document's heads digest, written with its parts, so a session
    // opens (summaries compared) without loading documents: at a million paths loading them
    // all takes seconds, comparing digests microseconds. A document with no row here is
    // loaded to compute it (stores from schema 4, until the document next changes).
    r#"
    CREATE TABLE mesh_digest(
        bucket_id INTEGER NOT NULL,
        doc       INTEGER NOT NULL,
        digest    INTEGER NOT NULL,
        PRIMARY KEY(bucket_id, doc)
    ) WITHOUT ROWID;
    "#,
    // 5 → 6: versions from peers whose operation (a rename, a merge) has not wholly arrived
    // yet: held here, out of the tree, until its last version comes, then applied together.
    r#"
    CREATE TABLE mesh_held(
        bucket_id INTEGER NOT NULL,
        node      BLOB NOT NULL,
        first_seq INTEGER NOT NULL,
        seq       INTEGER NOT NULL,
        data      BLOB NOT NULL,
        PRIMARY KEY(bucket_id, node, first_seq, seq)
    ) WITHOUT ROWID;
    "#,
    // 6 → 7: how far a node's versions were taken back out of the tree when the bucket's
    // membership stopped accepting them (proto::membership): its writer's seqs above
    // `cut_seq` are in mesh_deferred, not in `version`. NULL: nothing taken out.
    r#"
    ALTER TABLE mesh_member ADD COLUMN cut_seq INTEGER;
    "#,
    // 7 → 8: `blob` becomes a rowid table. WITHOUT ROWID keeps each row whole in the b-tree
    // searched by hash, and SQLite compares against a row that overflows its page (inline
    // bytes over about 1 KiB) by reading all of it: every insert read several small files'
    // bytes on its way down, most of the node's time while it committed a burst of them.
    // Now the hash index holds only hashes and a row's bytes are read when asked for.
    r#"
    CREATE TABLE blob_rows(
        hash    BLOB NOT NULL PRIMARY KEY,
        size    INTEGER NOT NULL,
        data    BLOB,
        indexed INTEGER NOT NULL DEFAULT 0,
        present INTEGER NOT NULL DEFAULT 1
    );
    INSERT INTO blob_rows(hash, size, data, indexed, present) SELECT hash, size, data, indexed, present FROM blob;
    DROP TABLE blob;
    ALTER TABLE blob_rows RENAME TO blob;
    CREATE INDEX blob_pending ON blob(hash) WHERE indexed = 0;
    CREATE INDEX blob_missing ON blob(hash) WHERE present = 0;
    "#,
    // 8 → 9: changes a mount acknowledged before they committed (closes, mkdirs, attribute
    // changes), by the id the mount gave each: sent again (the reply was lost, or a dead
    // mount's journal is adopted), one already here is not applied twice. `seq` is what it
    // wrote (a version's seq; 0 for nothing), so a later change can name it as the version
    // its writer had seen. Pruned by GC after the outbox retention.
    r#"
    CREATE TABLE acked_change(
        id    TEXT NOT NULL PRIMARY KEY,
        seq   INTEGER NOT NULL,
        at_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 9 → 10: the clock bound (`proto::clock::Bound`). `high_ms` is the latest stamp of any
    // version stored here: while it is ahead of the clock (a clock that was wrong wrote or
    // absorbed it, then recovered), each local write checks its path's head and orders after
    // it. Peers' versions stamped too far ahead of the wall clock wait in `mesh_future` (by
    // their stamp, to be released when it comes within the bound) instead of being applied.
    r#"
    ALTER TABLE clock ADD COLUMN high_ms INTEGER NOT NULL DEFAULT 0;
    UPDATE clock SET high_ms = last_ms;
    CREATE TABLE mesh_future(
        id        INTEGER PRIMARY KEY,
        bucket_id INTEGER NOT NULL,
        writer    BLOB NOT NULL,
        at_ms     INTEGER NOT NULL,
        data      BLOB NOT NULL
    );
    CREATE INDEX mesh_future_due ON mesh_future(at_ms);
    "#,
    // 10 → 11: roles (`proto::membership::Role`). An invitation admits with its role; each
    // member's role as the bucket's document decides it, for `alkfs members` and for this
    // node's own writes (a read-only member's are refused here before anything is written).
    r#"
    ALTER TABLE mesh_invite ADD COLUMN role TEXT NOT NULL DEFAULT 'writer';
    ALTER TABLE mesh_member ADD COLUMN role TEXT;
    "#,
    // 11 → 12: blobs by bucket, for serving (`engine::mesh::may_fetch`): a blob this node
    // fetched from a member of a bucket, for a version of that bucket. (Those a version this
    // node wrote names count without a row.) A peer's entry that merely names a hash held for
    // another bucket does not make it servable there. What was here before is trusted on
    // upgrade: servable to every bucket naming it (which the rule above would not all allow).
    r#"
    CREATE TABLE bucket_blob(
        hash      BLOB NOT NULL,
        bucket_id INTEGER NOT NULL,
        PRIMARY KEY (hash, bucket_id)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO bucket_blob(bucket_id, hash)
        SELECT DISTINCT b.bucket_id, v.hash FROM version v JOIN branch b ON b.id = v.branch_id JOIN blob ON blob.hash = v.hash
        WHERE v.hash IS NOT NULL AND blob.present = 1;
    "#,
    // 12 → 13: what waits for a peer is bounded and expires (`engine::mesh::WaitBounds`).
    // `since_ms` dates each waiting row; `writer` says whose a deferred version is (bounded
    // per writer). An operation held past its time is applied as it stands and listed in
    // `mesh_op_released`, so its later versions apply as they come. Deferred versions dropped
    // over a bound or past their time stay in the documents: `mesh_rescan` marks the bucket,
    // and its documents are read again when its branches or members change.
    r#"
    ALTER TABLE mesh_held ADD COLUMN since_ms INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX mesh_held_since ON mesh_held(since_ms);
    ALTER TABLE mesh_deferred ADD COLUMN writer BLOB;
    ALTER TABLE mesh_deferred ADD COLUMN since_ms INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX mesh_deferred_writer ON mesh_deferred(bucket_id, writer);
    CREATE INDEX mesh_deferred_since ON mesh_deferred(since_ms);
    CREATE TABLE mesh_op_released(
        bucket_id INTEGER NOT NULL,
        node      BLOB NOT NULL,
        first_seq INTEGER NOT NULL,
        PRIMARY KEY(bucket_id, node, first_seq)
    ) WITHOUT ROWID;
    CREATE TABLE mesh_rescan(
        bucket_id INTEGER PRIMARY KEY,
        dirty     INTEGER NOT NULL,
        last_ms   INTEGER NOT NULL
    );
    "#,
    // 13 → 14: who may invite to a shared bucket, as its membership last decided (the
    // bucket's document holds the owners' policies; this row is what `alkfs members` shows).
    r#"
    CREATE TABLE mesh_policy(
        bucket_id      INTEGER PRIMARY KEY,
        members_invite INTEGER NOT NULL
    );
    "#,
    // 14 → 15: each document's heads beside its digest, so a summary that shows a peer in
    // step on a document sets the sync state from them without loading the document
    // (`proto::fanout::in_step`). NULL until the document next changes.
    r#"
    ALTER TABLE mesh_digest ADD COLUMN heads BLOB;
    "#,
    // 15 → 16: each shared bucket's epoch (`engine::compaction`): its shards were compacted
    // `epoch` times, the last time from `base` (what is announced to a peer still at an
    // earlier epoch) into documents that saved as `saved_bytes`.
    r#"
    CREATE TABLE mesh_epoch(
        bucket_id   INTEGER PRIMARY KEY,
        epoch       INTEGER NOT NULL,
        base        BLOB NOT NULL,
        saved_bytes INTEGER NOT NULL
    );
    "#,
];

/// Indexes of the version table as of schema 3 (made after its rows are in place).
const VERSION_INDEXES_3: &str = r#"
    CREATE UNIQUE INDEX version_seq ON version(seq);
    CREATE INDEX version_branch_seq ON version(branch_id, seq);
    CREATE INDEX version_hash ON version(hash) WHERE hash IS NOT NULL;
    CREATE INDEX version_vseq ON version(vseq);
    CREATE INDEX version_branch_key ON version(branch_id, vkey);
"#;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database to [`SCHEMA_VERSION`], one migration per transaction. Refuses a
/// database from a newer build rather than guess at it. `db_dir` is the data dir: the
/// upgrade to schema 3 names the versions already stored after the node's key there.
pub fn migrate(conn: &mut Connection, db_dir: &std::path::Path) -> Result<(), StoreError> {
    loop {
        let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if current > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found: current, supported: SCHEMA_VERSION });
        }
        if current == SCHEMA_VERSION {
            return Ok(());
        }
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Re-read under the write lock: another process may have migrated meanwhile.
        let again: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if again == current {
            if current == 0 {
                // honker's own tables (the outbox stream) come with the first schema.
                honker_core::bootstrap_honker_schema(&tx)?;
            }
            tx.execute_batch(MIGRATIONS[current as usize])?;
            if current == 1 {
                normalise_stored_names(&tx)?;
            }
            if current == 2 {
                rekey_versions(&tx, db_dir)?;
            }
            tx.execute_batch(&format!("PRAGMA user_version = {}", current + 1))?;
        }
        tx.commit()?;
    }
}

/// Part of migration 1 → 2: paths are stored in Unicode NFC from schema 2 on (one name is one
/// path, whichever form it arrived in); rewrite the rows an older alkfs stored in another
/// form, so they stay reachable. Two forms of one path become one path's history (their seqs
/// differ). A name whose NFC form would break a limit is left as it was, with a warning.
fn normalise_stored_names(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    use crate::proto::path::{nfc, TreePath};
    let mut changes = Vec::new();
    {
        let mut st = tx.prepare("SELECT branch_id, dir, name, seq FROM version")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (dir, name): (String, String) = (r.get(1)?, r.get(2)?);
            let (dir, name) = (dir.as_str(), name.as_str());
            let (new_dir, new_name) = (nfc(dir), nfc(name));
            if new_dir == dir && new_name == name {
                continue;
            }
            let joined = if new_dir == "/" { format!("/{new_name}") } else { format!("{new_dir}/{new_name}") };
            if TreePath::parse(&joined).is_err() {
                tracing::warn!(dir, name, "a stored name is not in NFC and its NFC form breaks a limit: left as it was");
                continue;
            }
            changes.push((r.get::<_, i64>(0)?, dir.to_string(), name.to_string(), r.get::<_, i64>(3)?, new_dir.into_owned(), new_name.into_owned()));
        }
    }
    let mut update = tx.prepare("UPDATE version SET dir = ?5, name = ?6 WHERE branch_id = ?1 AND dir = ?2 AND name = ?3 AND seq = ?4")?;
    for (branch, dir, name, seq, new_dir, new_name) in &changes {
        update.execute(rusqlite::params![branch, dir, name, seq, new_dir, new_name])?;
    }
    let conflicts: Vec<(i64, String)> = {
        let mut st = tx.prepare("SELECT id, path FROM conflict")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    for (id, path) in conflicts {
        if let std::borrow::Cow::Owned(normal) = nfc(&path) {
            tx.execute("UPDATE conflict SET path = ?1 WHERE id = ?2", rusqlite::params![normal, id])?;
        }
    }
    if !changes.is_empty() {
        tracing::info!(rows = changes.len(), "stored paths rewritten in Unicode NFC");
    }
    Ok(())
}

/// Part of migration 2 → 3: records the node id this store writes as (from `DATA/node.key`,
/// created if missing) and moves every version into the table keyed by its order key, named
/// `seq@this node` and pointing at the version it replaced. Stamps of older rows are made
/// increasing along each path's history where an old wall clock went back (as the hybrid
/// clock would have), so every path keeps the head it had.
fn rekey_versions(tx: &rusqlite::Transaction<'_>, db_dir: &std::path::Path) -> Result<(), StoreError> {
    use crate::proto::clock::Stamp;
    use crate::proto::ids::{OrderKey, VersionId};
    let key = crate::identity::load_or_create(db_dir).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let me = crate::identity::node_id(&key);
    tx.execute("UPDATE clock SET self_node = ?1", [me.0.to_vec()])?;
    {
        let mut read = tx.prepare(
            "SELECT branch_id, dir, name, seq, kind, hash, size, mode, mtime_ms, written_ms, written_lc, origin
             FROM version ORDER BY branch_id, dir, name, seq",
        )?;
        let mut write = tx.prepare(
            "INSERT INTO version3(branch_id, dir, name, vkey, seq, vseq, pred, kind, hash, size, mode, mtime_ms, written_ms, written_lc, origin)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )?;
        let mut rows = read.query([])?;
        let mut prev: Option<((i64, String, String), Stamp, VersionId)> = None;
        let mut latest = Stamp::default();
        while let Some(r) = rows.next()? {
            let path: (i64, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let seq: i64 = r.get(3)?;
            let mut stamp = Stamp { ms: r.get(9)?, counter: r.get(10)? };
            let mut pred = None;
            if let Some((p, last, id)) = &prev {
                if *p == path {
                    pred = Some(id.to_bytes().to_vec());
                    if stamp <= *last {
                        stamp = Stamp::tick(*last, stamp.ms);
                    }
                }
            }
            let id = VersionId { node: me, seq };
            let vkey = OrderKey::new(stamp, &id);
            write.execute(rusqlite::params![
                path.0, path.1, path.2, vkey.0.to_vec(), seq, pred,
                r.get::<_, Option<String>>(4)?, r.get::<_, Option<Vec<u8>>>(5)?, r.get::<_, i64>(6)?, r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)?, stamp.ms, stamp.counter, r.get::<_, String>(11)?,
            ])?;
            latest = latest.max(stamp);
            prev = Some((path, stamp, id));
        }
        // A stamp moved on above may pass the last one handed out: the clock must stay ahead.
        tx.execute(
            "UPDATE clock SET last_ms = ?1, last_lc = ?2 WHERE (last_ms, last_lc) < (?1, ?2)",
            rusqlite::params![latest.ms, latest.counter],
        )?;
    }
    tx.execute_batch("DROP TABLE version; ALTER TABLE version3 RENAME TO version;")?;
    tx.execute_batch(VERSION_INDEXES_3)?;
    Ok(())
}

/// The schema version of an open database.
pub fn version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}
