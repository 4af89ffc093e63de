//! Epochs of a bucket's shards, the store's half (ARCHITECTURE.md, "Keeping documents
//! bounded"): automerge keeps every op, so a shard only grows; an epoch replaces every shard
//! of a bucket with a document holding what [`crate::proto::compaction::kept`] keeps of it at
//! heads the members agreed on, plus what came after them.
//!
//! - [`Mesh::compact`]: this node starts epoch n+1 from its own heads (the caller decided it
//!   is time: every member showed those heads) and returns the [`EpochBase`] to announce.
//! - [`Mesh::take_epoch`]: a peer announced an epoch. A node holding every head of the base
//!   derives the same documents itself (the same genesis change, so nothing is sent); one
//!   that does not starts the epoch from nothing and receives the documents by sync.
//!
//! Either way the node then puts back, as they are (signed by their writers), the versions it
//! holds that came after the cut and that the rule keeps: writes made while it was away or
//! while the epoch was announced are not lost, and nobody's history past the cut comes back.
//! The tree (SQLite) is not touched: every version stays there, under retention as before.
//! Sync states of the old epoch are dropped with it.

use std::collections::HashSet;

use rusqlite::{params, Connection, OptionalExtension};


use super::mesh::{meta_entries, Mesh};
use super::{Engine, Result};
use crate::proto::compaction::{kept, EpochBase, EPOCH_MAX};
use crate::proto::doc::ReplicaDoc;
use crate::proto::ids::{NodeId, Uid};
use crate::proto::replica::{self as rules, BranchRecord, Change, MetaEntry, SHARDS};
use crate::proto::signed;
use crate::proto::sync::META_DOC;
use crate::store::{Ids, StoreError};

/// The least saved size of a bucket's shards before they are compacted (and then only past
/// twice what the last epoch began with): below it, history costs less than the work.
pub const COMPACT_AFTER_DEFAULT_BYTES: u64 = 1 << 20;

/// How a node took an epoch a peer announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakenEpoch {
    /// It held every head of the base and derived the documents itself.
    Derived,
    /// It lacked some: it starts the epoch from nothing and receives it by sync.
    FromNothing,
    /// Not newer than its own: nothing changed.
    Ignored,
}

/// A bucket's epoch as this node holds it (`mesh_epoch`; read once, then kept by the mesh:
/// every message received asks for it).
#[derive(Clone, Debug, Default)]
pub struct EpochRow {
    /// The epoch (0 before the first compaction).
    pub epoch: u32,
    /// The saved size of the shards when it began.
    pub began_bytes: u64,
    /// What it was derived from (`None` at epoch 0).
    pub base: Option<EpochBase>,
}

/// Bucket `bucket_id`'s epoch, from the database.
pub fn read_epoch(conn: &Connection, bucket_id: i64) -> Result<EpochRow, StoreError> {
    let row: Option<(i64, Vec<u8>, i64)> = conn
        .query_row("SELECT epoch, base, saved_bytes FROM mesh_epoch WHERE bucket_id = ?1", [bucket_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    Ok(match row {
        None => EpochRow::default(),
        Some((epoch, base, began)) => EpochRow { epoch: epoch as u32, began_bytes: began.max(0) as u64, base: postcard::from_bytes(&base).ok() },
    })
}

/// A shared bucket's epoch, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketEpoch {
    /// The bucket's name here.
    pub bucket: String,
    /// Its epoch.
    pub epoch: u32,
    /// The saved size of its shards now.
    pub shard_bytes: u64,
    /// Their saved size when the epoch began.
    pub began_bytes: u64,
}

/// Every shared bucket's epoch.
pub fn epochs(conn: &Connection) -> Result<Vec<BucketEpoch>, StoreError> {
    let mut out = Vec::new();
    for bucket_id in super::mesh::shared_bucket_ids(conn)? {
        let bucket: String = conn.query_row("SELECT name FROM bucket WHERE id = ?1", [bucket_id], |r| r.get(0))?;
        let row = read_epoch(conn, bucket_id)?;
        out.push(BucketEpoch { bucket, epoch: row.epoch, shard_bytes: shard_bytes(conn, bucket_id)?, began_bytes: row.began_bytes });
    }
    out.sort_by(|a, b| a.bucket.cmp(&b.bucket));
    Ok(out)
}

/// The saved size of bucket `bucket_id`'s shards now.
pub fn shard_bytes(conn: &Connection, bucket_id: i64) -> Result<u64, StoreError> {
    let n: i64 = conn.query_row("SELECT coalesce(sum(length(data)), 0) FROM mesh_doc WHERE bucket_id = ?1 AND doc < ?2", params![bucket_id, SHARDS], |r| r.get(0))?;
    Ok(n.max(0) as u64)
}


/// A version as its document holds it: the key, the signed value, and the change inside.
struct Held {
    shard: u16,
    key: String,
    value: Vec<u8>,
    change: Change,
}

fn held(shard: u16, entries: Vec<(String, Vec<u8>)>) -> Vec<Held> {
    entries
        .into_iter()
        .filter_map(|(key, value)| {
            let change = rules::decode(signed::open(&value).ok()?.body).ok()?;
            Some(Held { shard, key, value, change })
        })
        .collect()
}

fn changes(held: &[Held]) -> Vec<Change> {
    held.iter().map(|h| h.change.clone()).collect()
}

impl Mesh {
    /// Compacts a bucket's shards once their saved size passes twice what the last epoch
    /// began with and at least `bytes` (`node.compact_after_kib`).
    pub fn set_compact_after(&mut self, bytes: u64) {
        self.compact_after = bytes;
    }

    /// Bucket `bucket_id`'s epoch, read from the database the first time.
    pub(super) fn epoch_row(&mut self, conn: &Connection, bucket_id: i64) -> Result<&EpochRow, StoreError> {
        if !self.epochs.contains_key(&bucket_id) {
            let row = read_epoch(conn, bucket_id)?;
            self.epochs.insert(bucket_id, row);
        }
        Ok(self.epochs.get(&bucket_id).expect("just read"))
    }

    /// The epoch of bucket `uid`'s shards here (0 for a bucket not here).
    pub fn epoch(&mut self, engine: &Engine, uid: &Uid) -> Result<u32> {
        let Some(bucket) = engine.bucket_by_uid(uid)? else { return Ok(0) };
        Ok(self.epoch_row(engine.tree().conn(), bucket.id)?.epoch)
    }

    /// What bucket `uid`'s current epoch was derived from, to announce to a peer at an
    /// earlier one (`None` at epoch 0).
    pub fn epoch_base(&mut self, engine: &Engine, uid: &Uid) -> Result<Option<EpochBase>> {
        let Some(bucket) = engine.bucket_by_uid(uid)? else { return Ok(None) };
        Ok(self.epoch_row(engine.tree().conn(), bucket.id)?.base.clone())
    }

    /// Whether bucket `uid`'s shards have grown enough to be compacted.
    pub fn compaction_due(&mut self, engine: &Engine, uid: &Uid) -> Result<bool> {
        let Some(bucket) = engine.bucket_by_uid(uid)? else { return Ok(false) };
        Ok(self.due(engine.tree().conn(), bucket.id)?)
    }

    fn due(&mut self, conn: &Connection, bucket_id: i64) -> Result<bool, StoreError> {
        let began = self.epoch_row(conn, bucket_id)?.began_bytes;
        Ok(shard_bytes(conn, bucket_id)? >= self.compact_after.max(began.saturating_mul(2)))
    }

    /// Compacts each shared bucket that is due ([`Mesh::compaction_due`]) and whose members
    /// are all at this node's heads: every member with a session (`connected`) last sent a
    /// summary equal to this node's, and none of those it waits for (`waited`: members that
    /// had a session lately) is away. A member away longer is left behind: it takes the
    /// epoch from nothing when it comes back ([`Mesh::take_epoch`]). Returns the epochs to
    /// announce.
    pub fn compact_due(&mut self, engine: &mut Engine, connected: &[NodeId], waited: &[NodeId]) -> Result<Vec<(Uid, EpochBase)>> {
        let mut out = Vec::new();
        let conn = engine.tree().conn();
        let shared: Vec<i64> = super::mesh::shared_bucket_ids(conn)?.into_iter().collect();
        for bucket_id in shared {
            if !self.due(engine.tree().conn(), bucket_id)? {
                continue;
            }
            let uid = super::mesh::bucket_uid(engine.tree().conn(), bucket_id)?;
            let epoch = self.epoch_row(engine.tree().conn(), bucket_id)?.epoch;
            let ours = self.summary(engine, &uid)?;
            let others: Vec<NodeId> = super::mesh::members(engine.tree().conn(), bucket_id)?.into_iter().filter(|m| m.removed_ms.is_none() && m.node != self.me()).map(|m| m.node).collect();
            let in_step = others.iter().all(|m| {
                if connected.contains(m) {
                    self.peer_summaries.get(&(*m, bucket_id)).is_some_and(|(e, d)| *e == epoch && *d == ours)
                } else {
                    !waited.contains(m)
                }
            });
            if in_step {
                out.push((uid, self.compact(engine, &uid)?));
            }
        }
        Ok(out)
    }

    /// Starts epoch n+1 of bucket `uid` from this node's heads of every shard and returns
    /// it, to announce to the members. The caller decides when: once every member showed
    /// these heads, each derives the same documents.
    pub fn compact(&mut self, engine: &mut Engine, uid: &Uid) -> Result<EpochBase> {
        let bucket = engine.bucket_by_uid(uid)?.ok_or_else(|| StoreError::Invalid(format!("no bucket {uid} here")))?;
        let conn = engine.tree().conn();
        let epoch = self.epoch_row(conn, bucket.id)?.epoch;
        let next = epoch.checked_add(1).filter(|e| *e <= EPOCH_MAX).ok_or_else(|| StoreError::Invalid(format!("bucket {uid} has had every epoch it may have")))?;
        let mut heads = Vec::with_capacity(SHARDS as usize);
        for shard in 0..SHARDS {
            heads.push(self.doc(conn, bucket.id, shard)?.heads().iter().map(|h| h.0).collect());
        }
        let base = EpochBase { epoch: next, heads, seen: Vec::new() };
        Ok(self.switch(engine, bucket.id, uid, base)?.0)
    }

    /// Takes epoch `base` of bucket `uid`, announced by a peer (see [`TakenEpoch`]).
    pub fn take_epoch(&mut self, engine: &mut Engine, uid: &Uid, base: &EpochBase) -> Result<TakenEpoch> {
        let Some(bucket) = engine.bucket_by_uid(uid)? else { return Ok(TakenEpoch::Ignored) };
        let epoch = self.epoch_row(engine.tree().conn(), bucket.id)?.epoch;
        if base.epoch <= epoch || !base.within_bounds() {
            return Ok(TakenEpoch::Ignored);
        }
        let (_, derived) = self.switch(engine, bucket.id, uid, base.clone())?;
        Ok(if derived { TakenEpoch::Derived } else { TakenEpoch::FromNothing })
    }

    /// Replaces bucket `bucket_id`'s shards with epoch `base`, in one transaction: derived
    /// from the base heads if they are all here and it is the next epoch, else empty; then
    /// this node's versions past the cut that the rule keeps are put back. Returns the base
    /// with `seen` as derived (or as announced, when it could not be), and whether it was.
    fn switch(&mut self, engine: &mut Engine, bucket_id: i64, uid: &Uid, mut base: EpochBase) -> Result<(EpochBase, bool)> {
        let conn = engine.tree().conn();
        let epoch = self.epoch_row(conn, bucket_id)?.epoch;
        let (mut branches, mut deleted): (Vec<BranchRecord>, HashSet<Uid>) = Default::default();
        for e in meta_entries(self.doc(conn, bucket_id, META_DOC)?) {
            match e {
                MetaEntry::Branch(b) => branches.push(b),
                MetaEntry::BranchDeleted { uid, .. } => {
                    deleted.insert(uid);
                }
                _ => {}
            }
        }
        let mut old: Vec<Held> = Vec::new();
        let mut at_base: Option<Vec<Held>> = (base.epoch == epoch + 1).then(Vec::new);
        for shard in 0..SHARDS {
            let heads: Vec<automerge::ChangeHash> = base.heads[shard as usize].iter().map(|h| automerge::ChangeHash(*h)).collect();
            let d = self.doc(conn, bucket_id, shard)?;
            if let Some(at) = at_base.as_mut() {
                match d.entries_at(&heads) {
                    Some(entries) => at.extend(held(shard, entries)),
                    None => at_base = None,
                }
            }
            old.extend(held(shard, d.entries()));
        }
        // The documents of the new epoch: the genesis of each shard, or nothing.
        let mut docs: Vec<ReplicaDoc> = Vec::with_capacity(SHARDS as usize);
        let cut: HashSet<String> = match &at_base {
            Some(at) => {
                let keep = kept(&changes(at), &branches, &deleted);
                let mut seen: Vec<Vec<(NodeId, i64)>> = vec![Vec::new(); SHARDS as usize];
                for h in at {
                    let (writer, seq) = (h.change.id().node, h.change.id().seq);
                    let s = &mut seen[h.shard as usize];
                    match s.iter_mut().find(|(w, _)| *w == writer) {
                        Some((_, high)) => *high = (*high).max(seq),
                        None => s.push((writer, seq)),
                    }
                }
                for s in &mut seen {
                    s.sort();
                }
                base.seen = seen;
                for shard in 0..SHARDS {
                    let entries: Vec<(String, Vec<u8>)> = at.iter().filter(|h| h.shard == shard && keep.contains(&h.change.id())).map(|h| (h.key.clone(), h.value.clone())).collect();
                    let genesis = ReplicaDoc::genesis(&base.genesis_actor(uid, shard), &entries, &self.actor).map_err(|e| StoreError::Invalid(e.to_string()))?;
                    docs.push(genesis);
                }
                at.iter().map(|h| h.key.clone()).collect()
            }
            None => {
                docs.extend((0..SHARDS).map(|_| ReplicaDoc::new(&self.actor)));
                HashSet::new()
            }
        };
        // Put back what came after the cut and the rule keeps (of everything held here).
        let keep_old = kept(&changes(&old), &branches, &deleted);
        let mut put_back = 0usize;
        for h in &old {
            let past_cut = match &at_base {
                Some(_) => !cut.contains(&h.key),
                None => base.after_cut(h.shard, &h.change.id().node, h.change.id().seq),
            };
            if past_cut && keep_old.contains(&h.change.id()) && docs[h.shard as usize].put(&h.key, &h.value).map_err(|e| StoreError::Invalid(e.to_string()))? {
                put_back += 1;
            }
        }
        let now = engine.now_ms();
        let mut docs = Some(docs);
        let result = engine.tree_mut().transact(Ids::AtMost(0), now, |tx| -> Result<u64, StoreError> {
            let conn = tx.conn();
            conn.execute("DELETE FROM mesh_doc WHERE bucket_id = ?1 AND doc < ?2", params![bucket_id, SHARDS])?;
            conn.execute("DELETE FROM mesh_sync WHERE bucket_id = ?1 AND doc < ?2", params![bucket_id, SHARDS])?;
            for (shard, d) in docs.take().expect("once").into_iter().enumerate() {
                self.docs.insert((bucket_id, shard as u16), d, 0);
                self.persist(tx, bucket_id, shard as u16)?;
            }
            let saved = shard_bytes(conn, bucket_id)?;
            conn.execute(
                "INSERT INTO mesh_epoch(bucket_id, epoch, base, saved_bytes) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(bucket_id) DO UPDATE SET epoch = excluded.epoch, base = excluded.base, saved_bytes = excluded.saved_bytes",
                params![bucket_id, base.epoch, postcard::to_allocvec(&base).expect("encoding to memory cannot fail"), saved as i64],
            )?;
            Ok(saved)
        });
        // Sync states of the old epoch mean nothing in the new one.
        self.states.retain(|(_, b, doc), _| !(*b == bucket_id && *doc < SHARDS));
        let saved = match result {
            Ok(saved) => saved,
            Err(e) => {
                // The documents in memory may be the new epoch's: read back what the database has.
                for shard in 0..SHARDS {
                    self.docs.remove(&(bucket_id, shard));
                }
                self.epochs.remove(&bucket_id);
                return Err(e.into());
            }
        };
        self.epochs.insert(bucket_id, EpochRow { epoch: base.epoch, began_bytes: saved, base: Some(base.clone()) });
        let derived = at_base.is_some();
        tracing::info!(bucket = %uid, epoch = base.epoch, derived, versions_before = old.len(), put_back, "the bucket's shards began a new epoch");
        Ok((base, derived))
    }
}
