//! Importing local files and directory trees: walking, importing every file into the
//! content store, and turning the result into batches of commit items. The engine commits
//! the batches itself; the node's connection tasks send them to the store actor.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{CommitItem, EngineError, Result};
use crate::content::{ContentStore, Imported};
use crate::proto::entry::{ContentHash, Entry, EntryKind};
use crate::proto::limits::COMMIT_ENTRIES_MAX;
use crate::proto::path::TreePath;
use crate::store::{Branch, StoreError};

/// Writes `items` in the open transaction: files and symlinks as puts, directories as
/// `mkdir -p` with their mode (seq 0 when the directory was already there).
pub fn commit_items(tx: &mut crate::store::Tx<'_>, branch: &Branch, items: &[CommitItem]) -> Result<Vec<i64>, StoreError> {
    let mut seqs = Vec::with_capacity(items.len());
    for (path, entry, blob) in items {
        if entry.kind == EntryKind::Dir {
            seqs.push(tx.mkdir(branch, path, true, entry.mode)?.unwrap_or(0));
        } else {
            tx.record_blob(blob)?;
            seqs.push(tx.put(branch, path, entry.clone())?);
        }
    }
    Ok(seqs)
}

/// Walks the local tree `src` (sorted, depth first), imports every file and symlink into
/// `content`, and hands `sink` batches of at most [`COMMIT_ENTRIES_MAX`] items to commit
/// (directories before what they hold). Special files are skipped with a warning.
pub fn import_tree(content: &ContentStore, src: &Path, dest: &TreePath, mut sink: impl FnMut(Vec<CommitItem>) -> Result<()>) -> Result<u64> {
    let dir_meta = fs::metadata(src).map_err(|e| EngineError::local(src, e))?;
    if !dir_meta.is_dir() {
        return Err(EngineError::local(src, io::Error::other("not a directory")));
    }
    let mut batch: Vec<CommitItem> = vec![(dest.clone(), Entry::dir(dir_meta.mode() & 0o7777, mtime_ms(&dir_meta)), empty_blob())];
    let mut count = 0u64;
    let mut stack = vec![(src.to_path_buf(), dest.clone())];
    while let Some((local, remote)) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&local)
            .map_err(|e| EngineError::local(&local, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .map_err(|e| EngineError::local(&local, e))?;
        names.sort();
        for name in names {
            let lpath = local.join(&name);
            let name = name.to_str().ok_or_else(|| EngineError::local(&lpath, io::Error::other("file name is not UTF-8")))?;
            let rpath = remote.join(name).map_err(StoreError::from)?;
            let meta = fs::symlink_metadata(&lpath).map_err(|e| EngineError::local(&lpath, e))?;
            let ft = meta.file_type();
            let item = if ft.is_dir() {
                stack.push((lpath.clone(), rpath.clone()));
                (rpath, Entry::dir(meta.mode() & 0o7777, mtime_ms(&meta)), empty_blob())
            } else if ft.is_symlink() {
                let target = fs::read_link(&lpath).map_err(|e| EngineError::local(&lpath, e))?;
                let blob = content.import_reader(target.as_os_str().as_encoded_bytes(), |_| {})?;
                let entry = Entry { kind: EntryKind::Symlink, ..file_entry(&blob, 0o777, mtime_ms(&meta)) };
                (rpath, entry, blob)
            } else if ft.is_file() {
                let blob = content.import_file(&lpath, |_| {})?;
                (rpath, file_entry(&blob, meta.mode() & 0o7777, mtime_ms(&meta)), blob)
            } else {
                tracing::warn!(path = %lpath.display(), "skipping a special file (device, socket or fifo)");
                continue;
            };
            batch.push(item);
            if batch.len() >= COMMIT_ENTRIES_MAX {
                count += batch.len() as u64;
                sink(std::mem::take(&mut batch))?;
            }
        }
    }
    count += batch.len() as u64;
    sink(batch)?;
    Ok(count)
}

/// The entry for a stored local file.
pub fn file_entry(blob: &Imported, mode: u32, mtime_ms: i64) -> Entry {
    Entry { kind: EntryKind::File, hash: blob.hash, size: blob.size, mode, mtime_ms }
}

pub(crate) fn empty_blob() -> Imported {
    Imported { hash: ContentHash::EMPTY, size: 0, inline: Some(Vec::new()), hold: None }
}

/// A local file's mtime in milliseconds.
pub fn mtime_ms(meta: &fs::Metadata) -> i64 {
    meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000
}
