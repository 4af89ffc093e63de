//! Looking after the blobs: re-hashing them all (`alkfs blobs check`), adding them to the
//! iroh-blobs index, and garbage collection.

use super::{Engine, EngineError, Result};
use crate::content::ContentError;
use crate::proto::entry::ContentHash;
use crate::store::read;
use crate::store::StoreError;

/// What an indexing or checking pass over the blobs found.
#[derive(Clone, Debug, Default)]
pub struct BlobReport {
    /// Blobs that passed.
    pub ok: u64,
    /// Blobs that failed, with why.
    pub failed: Vec<(ContentHash, String)>,
}

/// Blobs read per step of a pass over the blob table.
const BLOB_PAGE: i64 = 256;

impl Engine {
    /// Collects garbage: prunes history past `policy`, frees blobs nothing names.
    pub fn gc(&mut self, policy: crate::gc::Retention) -> Result<crate::gc::GcReport> {
        let now = self.now_ms();
        crate::gc::collect(&mut self.tree, &self.content, policy, now).map_err(|e| match e {
            crate::gc::GcError::Store(e) => EngineError::Store(e),
            crate::gc::GcError::Content(e) => EngineError::Content(e),
        })
    }

    /// Records `hashes` as held by the iroh-blobs index, in one transaction.
    pub fn mark_indexed(&mut self, hashes: &[ContentHash]) -> Result<()> {
        let now = self.now_ms();
        self.tree.transact(crate::store::Ids::AtMost(0), now, |tx| {
            for h in hashes {
                read::mark_indexed(tx.conn(), h)?;
            }
            Ok::<_, StoreError>(())
        })?;
        Ok(())
    }


    /// Visits every blob (or every one not yet indexed), a page at a time.
    fn each_blob(&self, only_pending: bool, mut f: impl FnMut(&read::PendingBlob)) -> Result<()> {
        let mut after = Vec::new();
        loop {
            let page = read::blobs_after(self.tree.conn(), &after, only_pending, BLOB_PAGE)?;
            let Some(last) = page.last() else { return Ok(()) };
            after = last.hash.0.to_vec();
            page.iter().for_each(&mut f);
        }
    }

    /// Re-hashes every blob the tree has named and reports those whose bytes are missing or
    /// no longer match (a scrub; reads the whole store).
    pub fn check_blobs(&self, mut progress: impl FnMut(u64)) -> Result<BlobReport> {
        let mut report = BlobReport::default();
        self.each_blob(false, |blob| {
            let verdict = match &blob.inline {
                Some(data) => crate::content::check(&blob.hash, blake3::hash(data)).map_err(|e| e.to_string()),
                None => self
                    .content
                    .open_file(&blob.hash)
                    .and_then(|f| crate::content::hash_file(&f).map_err(|e| ContentError::io("hash blob", e, self.dir.as_path())))
                    .map_err(|e| e.to_string())
                    .and_then(|(h, _)| crate::content::check(&blob.hash, blake3::Hash::from_bytes(h.0)).map_err(|e| e.to_string())),
            };
            match verdict {
                Ok(()) => report.ok += 1,
                Err(why) => report.failed.push((blob.hash, why)),
            }
            progress(report.ok + report.failed.len() as u64);
        })?;
        Ok(report)
    }

    /// Adds every blob not yet in the iroh-blobs index to it.
    pub async fn index_blobs(&self, index: &crate::index::BlobIndex) -> Result<BlobReport> {
        let mut pending = Vec::new();
        self.each_blob(true, |b| pending.push(b.clone()))?;
        let mut report = BlobReport::default();
        for blob in pending {
            match index.add(&self.content, &blob).await {
                Ok(()) => {
                    read::mark_indexed(self.tree.conn(), &blob.hash)?;
                    report.ok += 1;
                }
                Err(e) => report.failed.push((blob.hash, e.to_string())),
            }
        }
        Ok(report)
    }
}



