//! The content store: file bytes addressed by their BLAKE3 hash, stored once.
//!
//! Two tiers, because of what we measured (see ARCHITECTURE.md, "Content store"):
//!
//! - **Inline**: content of at most [`INLINE_BYTES_MAX`] lives in the path-tree database
//!   (`blob.data`), written in the same transaction as the entry that names it — one
//!   durability domain, and no file or fsync per small file.
//! - **Files**: larger content lives in `content/<hh>/<hash>`, immutable, named by its hash.
//!   An import copies and hashes in one pass ([`copy_and_hash`]): the kernel copies a chunk
//!   (`copy_file_range`) while another thread hashes the previous chunk *of the copy*, so the
//!   hash always describes the bytes we keep. The file is fsynced and renamed into place before
//!   the commit that references it.
//!
//! The iroh-blobs file store (`blobs/`) *indexes* these for verified streaming to peers:
//! file blobs by reference (`ImportMode::TryReference`, no second copy), inline ones by value.
//! Indexing hashes once more, so it runs behind the commit ([`ContentStore::index`]), never in
//! the write path. Local reads do not need the index: they stream the bytes and check the
//! BLAKE3 as they go.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};

use crate::proto::entry::ContentHash;

/// Content up to this size is stored inline in the database (matches iroh-blobs' inline limit).
pub const INLINE_BYTES_MAX: usize = 16 * 1024;
/// Bytes copied (and then hashed) per step of [`copy_and_hash`]: large enough for the hasher
/// to use both cores, small enough that the last step adds little after the copy ends.
pub const COPY_CHUNK_BYTES: u64 = 32 << 20;
/// Read buffer for sources that are not regular files (stdin, pipes).
pub const STREAM_BUF_BYTES: usize = 4 << 20;

/// Errors of the content store.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// The disk is full.
    #[error("the disk holding {0} is full: free space and retry (nothing was changed)")]
    DiskFull(PathBuf),
    /// Stored bytes no longer match their hash.
    #[error("blob {hash} is corrupt (its bytes hash to {actual}): restore it from a peer or a backup")]
    Corrupt {
        /// The expected hash.
        hash: ContentHash,
        /// What the bytes hash to now.
        actual: ContentHash,
    },
    /// A blob the tree names is not in the store.
    #[error("blob {0} is missing from the content store: restore it from a peer or a backup")]
    Missing(ContentHash),
    /// Anything else from the file system.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The iroh-blobs index failed.
    #[error("blob index (iroh-blobs): {0}")]
    Index(String),
}

impl ContentError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error, dir: &Path) -> Self {
        // tempfile wraps OS errors with the path and drops the raw code; the kind survives.
        let full = matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
            || matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded);
        if full {
            return ContentError::DiskFull(dir.to_path_buf());
        }
        ContentError::Io { context: context.into(), source }
    }
}

/// A blob ready to be committed: its hash, size, and (if small) its bytes for the inline tier.
/// A file blob carries a [`Hold`] until the commit that names it is done, so GC keeps its file.
#[derive(Clone, Debug)]
pub struct Imported {
    /// BLAKE3 of the bytes.
    pub hash: ContentHash,
    /// Length in bytes.
    pub size: u64,
    /// The bytes themselves when at most [`INLINE_BYTES_MAX`]; `None` for a file blob.
    pub inline: Option<Vec<u8>>,
    /// Keeps GC off this blob's file until dropped (after the commit).
    pub hold: Option<Arc<Hold>>,
}

/// Blobs that writes in flight (imports, sessions, later downloads) are about to reference:
/// GC never deletes a held blob. Shared by every clone of a [`ContentStore`].
#[derive(Clone, Debug, Default)]
pub struct Holds(Arc<Mutex<HashMap<ContentHash, usize>>>);

impl Holds {
    /// Holds `hash` until the returned guard drops.
    pub fn hold(&self, hash: ContentHash) -> Arc<Hold> {
        *self.0.lock().expect("holds lock").entry(hash).or_insert(0) += 1;
        Arc::new(Hold { holds: self.clone(), hash })
    }

    /// Runs `f` (which deletes blob `hash`) unless the blob is held; the check and `f` happen
    /// under one lock, so no hold can slip in between. Returns whether `f` ran.
    pub fn unless_held(&self, hash: &ContentHash, f: impl FnOnce()) -> bool {
        let map = self.0.lock().expect("holds lock");
        if map.contains_key(hash) {
            return false;
        }
        f();
        drop(map);
        true
    }

    /// True when `hash` is held now.
    pub fn is_held(&self, hash: &ContentHash) -> bool {
        self.0.lock().expect("holds lock").contains_key(hash)
    }
}

/// One hold on one blob; released on drop.
#[derive(Debug)]
pub struct Hold {
    holds: Holds,
    hash: ContentHash,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut map = self.holds.0.lock().expect("holds lock");
        if let Some(n) = map.get_mut(&self.hash) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.hash);
            }
        }
    }
}

/// Copies `src` to `dst` (both regular files, `dst` empty) and returns the BLAKE3 of what
/// was written and its length. The copy runs in the kernel, chunk by chunk; a second thread
/// hashes each chunk of `dst` once it is written, through a memory map of `dst`.
pub fn copy_and_hash(src: &File, dst: &File, len: u64, mut progress: impl FnMut(u64)) -> io::Result<(ContentHash, u64)> {
    dst.set_len(0)?;
    let (tx, rx) = mpsc::sync_channel::<(u64, u64)>(4);
    let dst_for_hash = dst.try_clone()?;
    let hasher = std::thread::Builder::new().name("alkfs-hash".into()).spawn(move || -> io::Result<blake3::Hash> {
        let mut hasher = blake3::Hasher::new();
        for (start, end) in rx {
            // SAFETY: the region [start, end) of the staging file was fully written before it
            // was sent, nothing writes it again, and the map lives only for this block.
            let map = unsafe { memmap2::MmapOptions::new().offset(start).len((end - start) as usize).map(&dst_for_hash)? };
            hasher.update_rayon(&map);
        }
        Ok(hasher.finalize())
    })?;
    let mut copied = 0u64;
    let result = (|| -> io::Result<()> {
        while copied < len {
            let step = COPY_CHUNK_BYTES.min(len - copied);
            let mut done = 0u64;
            while done < step {
                let n = copy_range(src, dst, copied + done, (step - done) as usize)?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the source file shrank while being copied"));
                }
                done += n as u64;
            }
            tx.send((copied, copied + done)).map_err(|_| io::Error::other("hash thread stopped"))?;
            copied += done;
            progress(copied);
        }
        Ok(())
    })();
    drop(tx);
    let hash = hasher.join().map_err(|_| io::Error::other("hash thread panicked"))??;
    result?;
    Ok((ContentHash(*hash.as_bytes()), copied))
}

/// One `copy_file_range` at `offset` in both files, falling back to read+write where the
/// kernel or file system cannot.
fn copy_range(src: &File, dst: &File, offset: u64, len: usize) -> io::Result<usize> {
    let (mut off_in, mut off_out) = (offset as libc::loff_t, offset as libc::loff_t);
    // SAFETY: plain syscall on two open descriptors with valid offset pointers.
    let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, len, 0) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EXDEV) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; len.min(STREAM_BUF_BYTES)];
            let n = src.read_at(&mut buf, offset)?;
            dst.write_all_at(&buf[..n], offset)?;
            Ok(n)
        }
        _ => Err(err),
    }
}

/// Hashes a whole file through a memory map, on all cores.
pub fn hash_file(file: &File) -> io::Result<(ContentHash, u64)> {
    let len = file.metadata()?.len();
    let mut hasher = blake3::Hasher::new();
    if len > 0 {
        // SAFETY: staging and content files are private to this process while hashed.
        let map = unsafe { memmap2::Mmap::map(file)? };
        hasher.update_rayon(&map);
    }
    Ok((ContentHash(*hasher.finalize().as_bytes()), len))
}

/// The content directories of a data dir.
#[derive(Clone, Debug)]
pub struct ContentStore {
    root: PathBuf,
    holds: Holds,
    /// The fan-out directories (`content/<hh>`) this process knows to be durable: created,
    /// and their entry in `content/` fsynced. Until then a blob renamed into one could vanish
    /// with its directory on power loss, after the commit that names it.
    durable_dirs: Arc<Mutex<[bool; 256]>>,
}

impl ContentStore {
    /// The content store under `root` (`DATA/content`); creates its directories.
    pub fn open(root: &Path) -> Result<Self, ContentError> {
        let store = ContentStore { root: root.to_path_buf(), holds: Holds::default(), durable_dirs: Arc::new(Mutex::new([false; 256])) };
        if !store.staging_dir().is_dir() {
            let io = |e| ContentError::io(format!("create {}", root.display()), e, root);
            fs::create_dir_all(store.staging_dir()).map_err(io)?;
            sync_dir(root).map_err(io)?;
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(io)?;
            }
        }
        Ok(store)
    }

    /// The holds of writes in flight.
    pub fn holds(&self) -> &Holds {
        &self.holds
    }

    /// The content root (`DATA/content`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where write sessions and imports stage bytes; same file system as the blobs, so a
    /// finished file is renamed, never copied.
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// Removes leftover staging files (from a crash). Only call while holding the data dir's
    /// write lock: otherwise they may belong to a live writer.
    pub fn clear_staging(&self) -> Result<usize, ContentError> {
        let mut n = 0;
        let entries = fs::read_dir(self.staging_dir()).map_err(|e| ContentError::io("read staging dir", e, &self.root))?;
        for entry in entries.flatten() {
            if fs::remove_file(entry.path()).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The path of file blob `hash`.
    pub fn blob_path(&self, hash: &ContentHash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// A new, empty staging file, removed again when the guard drops unless kept.
    pub fn stage(&self) -> Result<StagingFile, ContentError> {
        let tmp = tempfile::Builder::new()
            .prefix("stage-")
            .tempfile_in(self.staging_dir())
            .map_err(|e| ContentError::io("create a staging file", e, &self.root))?;
        Ok(StagingFile { tmp })
    }

    /// Where a mount process of this machine keeps the staging files of its write sessions:
    /// `staging/mount-<pid>/`, a directory, so the node's [`clear_staging`](Self::clear_staging)
    /// at start (files only) leaves the sessions of a mount that outlives a node restart alone.
    pub fn mount_staging_dir(&self, pid: u32) -> PathBuf {
        self.staging_dir().join(format!("{MOUNT_STAGING_PREFIX}{pid}"))
    }

    /// A mount's closed file, a staging file another process of this machine wrote, made a
    /// blob while the staging file stays where it is: it is consumed only by the commit that
    /// records it (the caller removes it once that commit is done), so a commit that fails
    /// can be sent again. It must be a regular file of `size` bytes directly inside a
    /// `staging/mount-*` directory, so a request cannot make the node read any other file.
    /// Small content is read inline; larger content is hashed unless `hash` is given (the
    /// mount hashed its appends), fsynced, and hard-linked into place (no byte copied; the
    /// directory fsynced after), unless the blob is there already.
    pub fn import_staged(&self, path: &Path, hash: Option<ContentHash>, size: u64) -> Result<Imported, ContentError> {
        let refuse = |why: &str| ContentError::Io {
            context: format!("take staging file {}", path.display()),
            source: io::Error::new(io::ErrorKind::InvalidInput, why.to_string()),
        };
        let parent = path.parent().ok_or_else(|| refuse("no parent directory"))?;
        // Compared resolved: the node and the mount may name the data dir differently
        // (one relative, one absolute).
        let resolved = |p: &Path| fs::canonicalize(p).ok();
        let in_mount_dir = parent.parent().and_then(resolved).is_some_and(|d| Some(d) == resolved(&self.staging_dir()))
            && parent.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(MOUNT_STAGING_PREFIX));
        if !in_mount_dir || path.file_name().is_none() {
            return Err(refuse("not a mount's staging file of this data dir"));
        }
        if !fs::symlink_metadata(parent).is_ok_and(|m| m.file_type().is_dir()) {
            return Err(refuse("the mount's staging directory is not a directory"));
        }
        let meta = fs::symlink_metadata(path).map_err(|e| ContentError::io("stat staging file", e, &self.root))?;
        if !meta.file_type().is_file() {
            return Err(refuse("not a regular file"));
        }
        if meta.len() != size {
            return Err(refuse(&format!("{} bytes, not the {size} written", meta.len())));
        }
        let io = |what: &str, e| ContentError::io(what.to_string(), e, &self.root);
        let file = File::open(path).map_err(|e| io("open staging file", e))?;
        if size <= INLINE_BYTES_MAX as u64 {
            let mut data = Vec::with_capacity(size as usize);
            (&file).take(size).read_to_end(&mut data).map_err(|e| io("read staging file", e))?;
            return Ok(inline(data));
        }
        let hash = match hash {
            Some(h) => h,
            None => hash_file(&file).map_err(|e| io("hash staging file", e))?.0,
        };
        // Hold before looking: once held, GC cannot delete an existing copy we dedup onto.
        let hold = self.holds.hold(hash);
        let target = self.blob_path(&hash);
        if !target.exists() {
            file.sync_data().map_err(|e| io("fsync staging file", e))?;
            let dir = target.parent().expect("blob path has a parent");
            self.make_fan_out_durable(hash.0[0], dir).map_err(|e| io("create blob dir", e))?;
            match fs::hard_link(path, &target) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("link blob into place", e)),
            }
            sync_dir(dir).map_err(|e| io("fsync blob dir", e))?;
        }
        Ok(Imported { hash, size, inline: None, hold: Some(hold) })
    }

    /// A new staging file in `dir` (a mount's staging directory, created if missing).
    pub fn stage_in(&self, dir: &Path) -> Result<StagingFile, ContentError> {
        fs::create_dir_all(dir).map_err(|e| ContentError::io("create a staging dir", e, &self.root))?;
        let tmp = tempfile::Builder::new().prefix("stage-").tempfile_in(dir).map_err(|e| ContentError::io("create a staging file", e, &self.root))?;
        Ok(StagingFile { tmp })
    }

    /// Imports a regular file: one pass of copy and hash into staging, then [`finish`](Self::finish).
    pub fn import_file(&self, src: &Path, progress: impl FnMut(u64)) -> Result<Imported, ContentError> {
        let io = |what: &str, e| ContentError::io(format!("{what} {}", src.display()), e, &self.root);
        let file = File::open(src).map_err(|e| io("open", e))?;
        let len = file.metadata().map_err(|e| io("stat", e))?.len();
        if len <= INLINE_BYTES_MAX as u64 {
            let mut data = Vec::with_capacity(len as usize);
            (&file).take(INLINE_BYTES_MAX as u64 + 1).read_to_end(&mut data).map_err(|e| io("read", e))?;
            if data.len() <= INLINE_BYTES_MAX {
                return Ok(inline(data));
            }
        }
        let staging = self.stage()?;
        let (hash, size) = copy_and_hash(&file, staging.file(), len, progress).map_err(|e| io("copy", e))?;
        self.finish(staging, hash, size)
    }

    /// Imports everything `reader` yields (stdin, a pipe): buffered, hashed as it is written.
    pub fn import_reader(&self, mut reader: impl Read, mut progress: impl FnMut(u64)) -> Result<Imported, ContentError> {
        let io = |what: &str, e| ContentError::io(what.to_string(), e, &self.root);
        let mut head = Vec::with_capacity(INLINE_BYTES_MAX + 1);
        (&mut reader).take(INLINE_BYTES_MAX as u64 + 1).read_to_end(&mut head).map_err(|e| io("read input", e))?;
        if head.len() <= INLINE_BYTES_MAX {
            return Ok(inline(head));
        }
        let mut staging = self.stage()?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head);
        staging.tmp.write_all(&head).map_err(|e| io("write staging file", e))?;
        let mut size = head.len() as u64;
        let mut buf = vec![0u8; STREAM_BUF_BYTES];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io("read input", e)),
            };
            hasher.update_rayon(&buf[..n]);
            staging.tmp.write_all(&buf[..n]).map_err(|e| io("write staging file", e))?;
            size += n as u64;
            progress(size);
        }
        self.finish(staging, ContentHash(*hasher.finalize().as_bytes()), size)
    }

    /// Makes a fully written staging file the blob `hash`: fsync, then rename into place (or
    /// drop it when the blob is already there: dedup). Small content goes inline instead.
    pub fn finish(&self, staging: StagingFile, hash: ContentHash, size: u64) -> Result<Imported, ContentError> {
        let io = |what: &str, e| ContentError::io(what.to_string(), e, &self.root);
        if size <= INLINE_BYTES_MAX as u64 {
            let data = fs::read(staging.tmp.path()).map_err(|e| io("read staging file", e))?;
            return Ok(inline(data));
        }
        // Hold before looking: once held, GC cannot delete an existing copy we dedup onto.
        let hold = self.holds.hold(hash);
        let target = self.blob_path(&hash);
        if !target.exists() {
            staging.file().sync_data().map_err(|e| io("fsync staging file", e))?;
            let dir = target.parent().expect("blob path has a parent");
            self.make_fan_out_durable(hash.0[0], dir).map_err(|e| io("create blob dir", e))?;
            staging.tmp.persist(&target).map_err(|e| io("move blob into place", e.error))?;
            sync_dir(dir).map_err(|e| io("fsync blob dir", e))?;
        }
        Ok(Imported { hash, size, inline: None, hold: Some(hold) })
    }

    /// Creates fan-out directory `dir` (for blobs starting with byte `first`) if needed and
    /// fsyncs `content/`, once per directory and process, so the directory entry is on disk
    /// before any blob in it is committed.
    fn make_fan_out_durable(&self, first: u8, dir: &Path) -> io::Result<()> {
        let mut known = self.durable_dirs.lock().expect("durable dirs lock");
        if !known[first as usize] {
            fs::create_dir_all(dir)?;
            sync_dir(&self.root)?;
            known[first as usize] = true;
        }
        Ok(())
    }

    /// Opens file blob `hash` for reading.
    pub fn open_file(&self, hash: &ContentHash) -> Result<File, ContentError> {
        File::open(self.blob_path(hash)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ContentError::Missing(*hash),
            _ => ContentError::io(format!("open blob {hash}"), e, &self.root),
        })
    }

    /// Copies file blob `hash` to `out`, checking its BLAKE3 on the way; on a mismatch the
    /// bytes already written are the caller's to discard (see `Engine::get`).
    pub fn read_to(&self, hash: &ContentHash, out: &mut impl Write, mut progress: impl FnMut(u64)) -> Result<u64, ContentError> {
        let mut file = self.open_file(hash)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; STREAM_BUF_BYTES];
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(|e| ContentError::io(format!("read blob {hash}"), e, &self.root))?;
            if n == 0 {
                break;
            }
            hasher.update_rayon(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| ContentError::Io { context: "write output".into(), source: e })?;
            total += n as u64;
            progress(total);
        }
        check(hash, hasher.finalize())?;
        Ok(total)
    }

    /// Copies file blob `hash` into the regular file `dst` in one pass (kernel copy, hashing
    /// the copy), and checks the BLAKE3.
    pub fn export_file(&self, hash: &ContentHash, dst: &File, progress: impl FnMut(u64)) -> Result<u64, ContentError> {
        let src = self.open_file(hash)?;
        let len = src.metadata().map_err(|e| ContentError::io("stat blob", e, &self.root))?.len();
        let (actual, n) = copy_and_hash(&src, dst, len, progress).map_err(|e| ContentError::io("copy out", e, &self.root))?;
        check(hash, blake3::Hash::from_bytes(actual.0))?;
        Ok(n)
    }
}

/// fsyncs a directory: makes the entries created or renamed in it durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Fails with [`ContentError::Corrupt`] unless `actual` is `hash`.
pub fn check(hash: &ContentHash, actual: blake3::Hash) -> Result<(), ContentError> {
    if actual.as_bytes() != &hash.0 {
        return Err(ContentError::Corrupt { hash: *hash, actual: ContentHash(*actual.as_bytes()) });
    }
    Ok(())
}

fn inline(data: Vec<u8>) -> Imported {
    Imported { hash: ContentHash(*blake3::hash(&data).as_bytes()), size: data.len() as u64, inline: Some(data), hold: None }
}

/// The name prefix of a mount process's staging directory (see [`ContentStore::mount_staging_dir`]).
pub const MOUNT_STAGING_PREFIX: &str = "mount-";

/// A staging file, deleted on drop unless [`ContentStore::finish`] moved it into place.
pub struct StagingFile {
    tmp: tempfile::NamedTempFile,
}

impl StagingFile {
    /// The open file.
    pub fn file(&self) -> &File {
        self.tmp.as_file()
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Leaves the file on disk (another process takes it over, see
    /// [`ContentStore::import_staged`]) and returns its path.
    pub fn keep(self) -> Result<PathBuf, ContentError> {
        let path = self.tmp.path().to_path_buf();
        self.tmp.into_temp_path().keep().map_err(|e| ContentError::io("keep staging file", e.error, &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mounts_staging_file_is_taken_whichever_way_the_data_dir_is_named_and_no_other_file_is() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("content");
        let node = ContentStore::open(&real).unwrap();
        // The mount names the same directory another way (here a symlink; in life, relative
        // against absolute).
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let mount = ContentStore::open(&link).unwrap();
        let staged = mount.stage_in(&mount.mount_staging_dir(7)).unwrap();
        staged.file().write_all(b"closed on the mount").unwrap();
        let path = staged.keep().unwrap();
        assert!(path.starts_with(&link));
        let blob = node.import_staged(&path, None, 19).expect("the node takes the mount's staging file");
        assert_eq!(blob.inline.as_deref(), Some(&b"closed on the mount"[..]));
        assert!(path.exists(), "it stays until the commit that records it");

        let outside = tmp.path().join("mount-7");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("stage-x"), b"not staged").unwrap();
        assert!(node.import_staged(&outside.join("stage-x"), None, 10).is_err(), "a file outside the staging dir is refused");
        let plain = node.staging_dir().join("stage-y");
        fs::write(&plain, b"the node's own staging").unwrap();
        assert!(node.import_staged(&plain, None, 22).is_err(), "only files in a mount's directory");
        // A large one is linked into place, and the staging file stays.
        let big = vec![7u8; INLINE_BYTES_MAX + 1];
        let staged = mount.stage_in(&mount.mount_staging_dir(7)).unwrap();
        staged.file().write_all(&big).unwrap();
        let path = staged.keep().unwrap();
        assert!(node.import_staged(&path, None, big.len() as u64 + 1).is_err(), "another length than written is refused");
        let blob = node.import_staged(&path, None, big.len() as u64).unwrap();
        assert_eq!(fs::read(node.blob_path(&blob.hash)).unwrap(), big);
        assert!(path.exists());
    }
}
