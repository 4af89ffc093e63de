//! The iroh-blobs index of the content store: what lets peers fetch our blobs with verified
//! streaming (and byte ranges), once the mesh arrives.
//!
//! The content store's blobs become iroh-blobs entries here, *after* the commit that made
//! them: file blobs by reference (`ImportMode::TryReference`: iroh-blobs computes its outboard
//! from our immutable file and keeps no second copy), inline blobs by value. Each indexed blob
//! is held by a named tag `alkfs/<hash>`, so the blob's life stays our decision (GC releases
//! the tag) and iroh-blobs' own GC can never take a blob the tree still names.
//!
//! Indexing hashes every byte once more (that is how iroh-blobs builds an outboard), which is
//! why it runs behind the write path: the daemon's blob actor indexes continuously, and
//! `alkfs blobs index` does it on demand.

use std::path::Path;

use iroh_blobs::api::blobs::{AddPathOptions, ImportMode};
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::{BlobFormat, Hash};

use crate::content::{ContentError, ContentStore};
use crate::proto::entry::ContentHash;
use crate::store::read::PendingBlob;

/// The directory of the iroh-blobs store inside the data dir.
pub const BLOBS_DIR: &str = "blobs";
/// The tag prefix of every blob the index holds for the tree.
pub const TAG_PREFIX: &str = "alkfs/";
/// How often iroh-blobs' own GC drops entries no tag holds any more. It only ever deletes
/// what we released (untagged); by-reference files are never its to delete.
pub const INDEX_GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

/// The tag that holds blob `hash` in the index.
pub fn tag_name(hash: &ContentHash) -> String {
    format!("{TAG_PREFIX}{}", hash.to_hex())
}

/// An open iroh-blobs file store.
pub struct BlobIndex {
    store: FsStore,
    /// Where iroh-blobs writes an owned blob's bytes (`blobs/data`), also while it arrives.
    data_dir: std::path::PathBuf,
}

fn index_err(e: impl std::fmt::Display) -> ContentError {
    ContentError::Index(e.to_string())
}

impl BlobIndex {
    /// Opens (creating) the store in `DATA/blobs`. Fails if another process has it open.
    pub async fn open(data_dir: &Path) -> Result<Self, ContentError> {
        let dir = data_dir.join(BLOBS_DIR);
        let dir = std::path::absolute(&dir).map_err(|e| ContentError::io("resolve the blobs dir", e, data_dir))?;
        let mut options = iroh_blobs::store::fs::options::Options::new(&dir);
        options.gc = Some(iroh_blobs::store::GcConfig { interval: INDEX_GC_INTERVAL, add_protected: None });
        let store = FsStore::load_with_opts(dir.join("blobs.db"), options.clone())
            .await
            .map_err(|e| ContentError::Index(format!("open {}: {e}", dir.display())))?;
        Ok(BlobIndex { store, data_dir: options.path.data_path.clone() })
    }

    /// The iroh-blobs store, for protocols that serve it.
    pub fn store(&self) -> &FsStore {
        &self.store
    }

    /// The file iroh-blobs writes blob `hash`'s bytes to while it is owned by the store (and
    /// while it arrives from a peer). It exists only for blobs over the inline limit.
    pub fn owned_data_path(&self, hash: &ContentHash) -> std::path::PathBuf {
        self.data_dir.join(format!("{}.data", Hash::from_bytes(hash.0).to_hex()))
    }

    /// Adds one blob to the index and checks iroh-blobs agrees on its hash. A disagreement
    /// means the bytes on disk changed since they were written: reported as corruption.
    pub async fn add(&self, content: &ContentStore, blob: &PendingBlob) -> Result<(), ContentError> {
        let tag = tag_name(&blob.hash);
        let got = match &blob.inline {
            Some(data) => self.store.add_bytes(data.clone()).with_named_tag(&tag).await.map_err(index_err)?,
            None => {
                let path = std::path::absolute(content.blob_path(&blob.hash))
                    .map_err(|e| ContentError::io("resolve blob path", e, Path::new(".")))?;
                if !path.exists() {
                    return Err(ContentError::Missing(blob.hash));
                }
                let opts = AddPathOptions { path, format: BlobFormat::Raw, mode: ImportMode::TryReference };
                self.store.add_path_with_opts(opts).with_named_tag(&tag).await.map_err(index_err)?
            }
        };
        if got.hash.as_bytes() != &blob.hash.0 {
            // Do not leave a tag pointing at the wrong bytes.
            let _ = self.store.tags().delete(&tag).await;
            return Err(ContentError::Corrupt { hash: blob.hash, actual: ContentHash(*got.hash.as_bytes()) });
        }
        Ok(())
    }

    /// Every blob the index holds a tag for.
    pub async fn tagged(&self) -> Result<Vec<ContentHash>, ContentError> {
        use futures_lite::StreamExt;
        let mut tags = self.store.tags().list_prefix(TAG_PREFIX).await.map_err(index_err)?;
        let mut out = Vec::new();
        while let Some(tag) = tags.next().await {
            out.push(ContentHash(*tag.map_err(index_err)?.hash.as_bytes()));
        }
        Ok(out)
    }

    /// Releases the tags of `hashes` (blobs the tree's GC freed); iroh-blobs' own GC then
    /// drops their entries.
    pub async fn release(&self, hashes: &[ContentHash]) -> Result<(), ContentError> {
        for hash in hashes {
            self.store.tags().delete(tag_name(hash)).await.map_err(index_err)?;
        }
        Ok(())
    }

    /// The whole blob, verified by iroh-blobs against its BLAKE3 tree.
    pub async fn verified_bytes(&self, hash: &ContentHash) -> Result<bytes::Bytes, ContentError> {
        self.store.get_bytes(Hash::from_bytes(hash.0)).await.map_err(index_err)
    }

    /// Commits and closes the store. Without this the last writes may be lost.
    pub async fn shutdown(&self) -> Result<(), ContentError> {
        self.store.shutdown().await.map_err(index_err)
    }
}
