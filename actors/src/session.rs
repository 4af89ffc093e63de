//! Write sessions: branch on write, merge on close.
//!
//! A session stages a file's new bytes in a private staging file; writes may come in any
//! order and size, leave holes (sparse) or truncate. Readers keep seeing the committed version
//! the whole time. [`Engine::commit`](crate::engine::Engine::commit) hashes and stores each
//! session's bytes and then writes all their entries in *one* SQLite transaction, so several
//! files can change together atomically. Dropping a session (abort, or a crash) deletes the
//! staging file and leaves the tree as it was.

use std::io;
use std::os::unix::fs::FileExt;

use crate::content::{hash_file, ContentError, ContentStore, Imported, StagingFile};
use crate::proto::limits::FILE_BYTES_MAX;
use crate::proto::path::TreePath;

/// Writes at least this large are hashed on every core (a mount's 1 MiB writes): one
/// thread hashes at ~1 GB/s, which would otherwise bound sequential writes.
const RAYON_HASH_BYTES_MIN: usize = 128 * 1024;

/// An open write to one path. Obtain one from [`Engine::open_session`](crate::engine::Engine::open_session).
pub struct WriteSession {
    pub(crate) path: TreePath,
    pub(crate) mode: u32,
    staging: StagingFile,
    len: u64,
    /// BLAKE3 of bytes `0..len` while every write so far was an append at the end: then close
    /// needs no second pass over the file.
    appending: Option<blake3::Hasher>,
}

impl WriteSession {
    pub(crate) fn new(path: TreePath, mode: u32, staging: StagingFile, initial_len: u64) -> Self {
        let appending = (initial_len == 0).then(blake3::Hasher::new);
        WriteSession { path, mode, staging, len: initial_len, appending }
    }

    /// An empty session on `path` (a new file, or one opened with O_TRUNC) staging into
    /// `staging` (from [`ContentStore::stage_in`](crate::content::ContentStore::stage_in)).
    pub fn empty(path: TreePath, mode: u32, staging: StagingFile) -> Self {
        Self::new(path, mode, staging, 0)
    }

    /// The path this session will write.
    pub fn path(&self) -> &TreePath {
        &self.path
    }

    /// The staged length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `data` at `offset`; a write past the end leaves a hole of zeros.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ContentError> {
        let end = offset.checked_add(data.len() as u64).filter(|e| *e <= FILE_BYTES_MAX).ok_or_else(|| ContentError::Io {
            context: format!("write to {}", self.path),
            source: io::Error::new(io::ErrorKind::FileTooLarge, format!("files are limited to {FILE_BYTES_MAX} bytes")),
        })?;
        if let Err(e) = self.staging.file().write_all_at(data, offset) {
            // Part of it may be on disk: the length is no longer known exactly, nor the hash
            // of what is there. Close rehashes the file as it is.
            self.appending = None;
            self.len = self.staging.file().metadata().map(|m| m.len()).unwrap_or(self.len).max(self.len);
            return Err(ContentError::io(format!("write to {}", self.path), e, self.staging.path()));
        }
        match &mut self.appending {
            Some(h) if offset == self.len => {
                if data.len() >= RAYON_HASH_BYTES_MIN {
                    h.update_rayon(data);
                } else {
                    h.update(data);
                }
            }
            _ => self.appending = None,
        }
        self.len = self.len.max(end);
        Ok(())
    }

    /// Sets the length to `len`, cutting or zero-extending.
    pub fn truncate(&mut self, len: u64) -> Result<(), ContentError> {
        self.staging
            .file()
            .set_len(len)
            .map_err(|e| ContentError::io(format!("truncate {}", self.path), e, self.staging.path()))?;
        if len != self.len {
            self.appending = if len == 0 { Some(blake3::Hasher::new()) } else { None };
        }
        self.len = len;
        Ok(())
    }

    /// Reads staged bytes at `offset` (a writer reading its own file back).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, ContentError> {
        self.staging.file().read_at(buf, offset).map_err(|e| ContentError::io("read staging file", e, self.staging.path()))
    }

    /// The mode the file will have.
    pub fn mode(&self) -> u32 {
        self.mode
    }

    /// Sets the mode the file will have (a `chmod` while it is open).
    pub fn set_mode(&mut self, mode: u32) {
        self.mode = mode;
    }

    /// Makes the staged bytes durable where they are (an `fsync` of an open file: the commit
    /// still waits for close).
    pub fn sync(&self) -> Result<(), ContentError> {
        self.staging.file().sync_data().map_err(|e| ContentError::io("fsync staging file", e, self.staging.path()))
    }

    /// Ends the session without committing here: the staging file stays on disk for the node
    /// to take over ([`ContentStore::import_staged`](crate::content::ContentStore::import_staged)).
    /// Returns its path, its length, and its hash when every write was an append (so the node
    /// need not read it again).
    pub fn hand_off(self) -> Result<(std::path::PathBuf, u64, Option<crate::proto::entry::ContentHash>), ContentError> {
        let WriteSession { staging, len, appending, .. } = self;
        let hash = appending.map(|h| crate::proto::entry::ContentHash(*h.finalize().as_bytes()));
        Ok((staging.keep()?, len, hash))
    }

    /// Hashes the staged bytes and moves them into the content store.
    pub(crate) fn seal(self, content: &ContentStore) -> Result<(TreePath, u32, Imported), ContentError> {
        let WriteSession { path, mode, staging, len, appending } = self;
        let (hash, size) = match appending {
            Some(h) => (crate::proto::entry::ContentHash(*h.finalize().as_bytes()), len),
            None => hash_file(staging.file()).map_err(|e| ContentError::io("hash staging file", e, staging.path()))?,
        };
        let imported = content.finish(staging, hash, size)?;
        Ok((path, mode, imported))
    }
}
