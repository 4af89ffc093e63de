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
use crate::proto::compaction::{kept, EpochBase};
use crate::proto::doc::ReplicaDoc;
use crate::proto::ids::{NodeId, Uid};
use crate::proto::replica::{self as rules, BranchRecord, Change, MetaEntry, SHARDS};
use crate::proto::signed;
use crate::proto::sync::META_DOC;
use crate::store::{Ids, StoreError};

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

/// Bucket `bucket_id`'s epoch (0 before its first compaction) and the saved size of its
/// shards when that epoch began.
pub fn epoch_of(conn: &Connection, bucket_id: i64) -> Result<(u32, u64), StoreError> {
    let row: Option<(i64, i64)> = conn
        .query_row("SELECT epoch, saved_bytes FROM mesh_epoch WHERE bucket_id = ?1", [bucket_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.map(|(e, b)| (e as u32, b.max(0) as u64)).unwrap_or((0, 0)))
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
    /// Starts epoch n+1 of bucket `uid` from this node's heads of every shard and returns
    /// it, to announce to the members. The caller decides when: once every member showed
    /// these heads, each derives the same documents.
    pub fn compact(&mut self, engine: &mut Engine, uid: &Uid) -> Result<EpochBase> {
        let bucket = engine.bucket_by_uid(uid)?.ok_or_else(|| StoreError::Invalid(format!("no bucket {uid} here")))?;
        let conn = engine.tree().conn();
        let (epoch, _) = epoch_of(conn, bucket.id)?;
        let mut heads = Vec::with_capacity(SHARDS as usize);
        for shard in 0..SHARDS {
            heads.push(self.doc(conn, bucket.id, shard)?.heads().iter().map(|h| h.0).collect());
        }
        let base = EpochBase { epoch: epoch + 1, heads, seen: Vec::new() };
        Ok(self.switch(engine, bucket.id, uid, base)?.0)
    }

    /// Takes epoch `base` of bucket `uid`, announced by a peer (see [`TakenEpoch`]).
    pub fn take_epoch(&mut self, engine: &mut Engine, uid: &Uid, base: &EpochBase) -> Result<TakenEpoch> {
        let Some(bucket) = engine.bucket_by_uid(uid)? else { return Ok(TakenEpoch::Ignored) };
        let (epoch, _) = epoch_of(engine.tree().conn(), bucket.id)?;
        if base.epoch <= epoch || base.heads.len() != SHARDS as usize {
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
        let (epoch, _) = epoch_of(conn, bucket_id)?;
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
        let result = engine.tree_mut().transact(Ids::AtMost(0), now, |tx| -> Result<(), StoreError> {
            let conn = tx.conn();
            conn.execute("DELETE FROM mesh_doc WHERE bucket_id = ?1 AND doc < ?2", params![bucket_id, SHARDS])?;
            conn.execute("DELETE FROM mesh_sync WHERE bucket_id = ?1 AND doc < ?2", params![bucket_id, SHARDS])?;
            for (shard, d) in docs.take().expect("once").into_iter().enumerate() {
                self.docs.insert((bucket_id, shard as u16), d, 0);
                self.persist(tx, bucket_id, shard as u16)?;
            }
            let saved: i64 = conn.query_row("SELECT coalesce(sum(length(data)), 0) FROM mesh_doc WHERE bucket_id = ?1 AND doc < ?2", params![bucket_id, SHARDS], |r| r.get(0))?;
            conn.execute(
                "INSERT INTO mesh_epoch(bucket_id, epoch, saved_bytes) VALUES (?1, ?2, ?3)
                 ON CONFLICT(bucket_id) DO UPDATE SET epoch = excluded.epoch, saved_bytes = excluded.saved_bytes",
                params![bucket_id, base.epoch, saved],
            )?;
            Ok(())
        });
        // Sync states of the old epoch mean nothing in the new one.
        self.states.retain(|(_, b, doc), _| !(*b == bucket_id && *doc < SHARDS));
        if let Err(e) = result {
            // The documents in memory may be the new epoch's: read back what the database has.
            for shard in 0..SHARDS {
                self.docs.remove(&(bucket_id, shard));
            }
            return Err(e.into());
        }
        let derived = at_base.is_some();
        tracing::info!(bucket = %uid, epoch = base.epoch, derived, versions_before = old.len(), put_back, "the bucket's shards began a new epoch");
        Ok((base, derived))
    }
}
