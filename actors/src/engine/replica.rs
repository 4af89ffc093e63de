//! The engine's replication calls: a bucket's identity (to join one a peer shares), its
//! branches and versions as peers see them, and changes from peers applied.

use rusqlite::params;

use super::{Engine, Result};
use crate::proto::ids::Uid;
use crate::proto::replica::{BranchRecord, Change};
use crate::store::replica::{self, Applied};
use crate::store::{Ids, StoreError};

/// A bucket as the mesh names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketIdentity {
    /// Its local id.
    pub id: i64,
    /// Its name here.
    pub name: String,
    /// Its identity on every node.
    pub uid: Uid,
}

impl Engine {
    /// Bucket `name`'s identity.
    pub fn bucket_identity(&self, name: &str) -> Result<BucketIdentity> {
        let conn = self.tree().conn();
        let (id, uid): (i64, Vec<u8>) = conn
            .query_row("SELECT id, uid FROM bucket WHERE name = ?1", [name], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|_| StoreError::NoBucket(name.to_string()))?;
        let uid = Uid::from_bytes(&uid).ok_or_else(|| StoreError::Invalid(format!("bucket {name}'s uid is damaged")))?;
        Ok(BucketIdentity { id, name: name.to_string(), uid })
    }

    /// The bucket whose identity is `uid`, if this store has it.
    pub fn bucket_by_uid(&self, uid: &Uid) -> Result<Option<BucketIdentity>> {
        let conn = self.tree().conn();
        let found: Option<(i64, String)> = rusqlite::OptionalExtension::optional(
            conn.query_row("SELECT id, name FROM bucket WHERE uid = ?1", [uid.0], |r| Ok((r.get(0)?, r.get(1)?))),
        )
        .map_err(StoreError::from)?;
        Ok(found.map(|(id, name)| BucketIdentity { id, name, uid: *uid }))
    }

    /// Makes bucket `name` the bucket a peer shares (`uid`, with root branch `root`): a new
    /// bucket, or an existing one that holds nothing yet (taken over: its identity becomes the
    /// shared one). One that holds files is refused: joining would mix two trees.
    pub fn adopt_bucket(&mut self, name: &str, uid: &Uid, root: &BranchRecord) -> Result<BucketIdentity> {
        if let Some(b) = self.bucket_by_uid(uid)? {
            return Ok(b);
        }
        let now = self.now_ms();
        let name = name.to_string();
        self.tree_mut().transact(Ids::AtMost(1), now, |tx| -> Result<(), StoreError> {
            let conn = tx.conn();
            let existing: Option<i64> =
                rusqlite::OptionalExtension::optional(conn.query_row("SELECT id FROM bucket WHERE name = ?1", [&name], |r| r.get(0)))?;
            match existing {
                Some(id) => {
                    let rows: i64 = conn.query_row(
                        "SELECT count(*) FROM version WHERE branch_id IN (SELECT id FROM branch WHERE bucket_id = ?1)",
                        [id],
                        |r| r.get(0),
                    )?;
                    let branches: i64 = conn.query_row("SELECT count(*) FROM branch WHERE bucket_id = ?1", [id], |r| r.get(0))?;
                    if rows > 0 || branches > 1 {
                        return Err(StoreError::Invalid(format!(
                            "this store already has a bucket {name:?} with files in it: join under another name (--as NAME)"
                        )));
                    }
                    conn.execute("UPDATE bucket SET uid = ?1 WHERE id = ?2", params![uid.0, id])?;
                    conn.execute("UPDATE branch SET uid = ?1, name = ?2, created_ms = ?3 WHERE bucket_id = ?4", params![root.uid.0, root.name, root.created_ms, id])?;
                }
                None => {
                    tx.create_bucket(&name)?;
                    let conn = tx.conn();
                    conn.execute("UPDATE bucket SET uid = ?1 WHERE name = ?2", params![uid.0, name])?;
                    conn.execute(
                        "UPDATE branch SET uid = ?1, name = ?2, created_ms = ?3 WHERE bucket_id = (SELECT id FROM bucket WHERE name = ?4)",
                        params![root.uid.0, root.name, root.created_ms, name],
                    )?;
                }
            }
            Ok(())
        })?;
        self.bucket_identity(&name)
    }

    /// Every branch of a bucket as its peers see it (parents before children).
    pub fn branch_records(&self, bucket: &str) -> Result<Vec<BranchRecord>> {
        let mut branches = self.tree().branches(bucket)?;
        branches.sort_by_key(|b| b.depth);
        branches.iter().map(|b| Ok(replica::branch_record(self.tree().conn(), b)?)).collect()
    }

    /// Every version of a bucket this store holds, whoever wrote it, as changes.
    pub fn all_changes(&self, bucket: &str) -> Result<Vec<Change>> {
        let id = self.bucket_identity(bucket)?.id;
        Ok(replica::bucket_changes(self.tree().conn(), id)?)
    }

    /// Applies branch records and changes from peers to bucket `uid` in one transaction.
    /// Branches whose parent is not here yet, and changes of branches not here yet, come
    /// back in [`Applied::deferred`] (changes) or are skipped (records; they come again).
    pub fn apply_from_peer(&mut self, bucket: &Uid, branches: &[BranchRecord], changes: Vec<Change>) -> Result<Applied> {
        let b = self.bucket_by_uid(bucket)?.ok_or_else(|| StoreError::Invalid(format!("no bucket with id {bucket} here")))?;
        let now = self.now_ms();
        let ids = Ids::AtMost((changes.len() + branches.len()) as u64);
        Ok(self.tree_mut().transact(ids, now, |tx| -> Result<Applied, StoreError> {
            let mut pending: Vec<&BranchRecord> = branches.iter().collect();
            // Parents first, whatever order they came in.
            loop {
                let before = pending.len();
                let mut left = Vec::new();
                for rec in pending {
                    if !tx.apply_branch(b.id, rec)? {
                        left.push(rec);
                    }
                }
                pending = left;
                if pending.is_empty() || pending.len() == before {
                    break;
                }
            }
            tx.apply_changes(b.id, changes)
        })?)
    }
}
