//! Importing local files and directory trees: walking, importing every file into the
//! content store, and turning the result into batches of commit items. The engine commits
//! the batches itself; the node's connection tasks send them to the store actor.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{AttrItem, CommitItem, EngineError, Result};
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

/// Writes one imported file or symlink in the open transaction, replacing what its writer
/// saw when it began (`seen`; see [`crate::store::Tx::put_seen`]).
pub fn put_item_seen(tx: &mut crate::store::Tx<'_>, branch: &Branch, item: &CommitItem, seen: &crate::store::acked::Seen) -> Result<i64, StoreError> {
    let (path, entry, blob) = item;
    tx.record_blob(blob)?;
    tx.put_seen(branch, path, entry.clone(), seen)
}

/// [`commit_items`], then the attribute changes `attrs` (each path must exist).
pub fn commit_changes(tx: &mut crate::store::Tx<'_>, branch: &Branch, items: &[CommitItem], attrs: &[AttrItem]) -> Result<Vec<i64>, StoreError> {
    let mut seqs = commit_items(tx, branch, items)?;
    for (path, mode, mtime_ms) in attrs {
        seqs.push(tx.set_attr(branch, path, *mode, *mtime_ms)?);
    }
    Ok(seqs)
}

/// The most ids committing `attrs` takes (see [`ids_of`]).
pub fn ids_of_attrs(attrs: &[AttrItem]) -> u64 {
    attrs.iter().map(|(path, _, _)| ids_of_path(path)).sum()
}

/// The most ids committing `items` takes ([`crate::store::Ids`]): per item its version, one
/// per parent it may create, and its outbox event.
pub fn ids_of(items: &[CommitItem]) -> u64 {
    items.iter().map(|(path, _, _)| ids_of_path(path)).sum()
}

/// The most ids a write of one path takes: its version, one per parent it may create, and
/// its outbox event.
pub fn ids_of_path(path: &TreePath) -> u64 {
    path.ancestors().len() as u64 + 1
}

/// Most names an import's refusal lists; the count says how many more.
const BAD_NAMES_SHOWN_MAX: usize = 5;

/// Walks the local tree `src` (sorted, depth first), imports every file and symlink into
/// `content`, and hands `sink` batches of at most [`COMMIT_ENTRIES_MAX`] items to commit
/// (directories before what they hold). Special files are skipped with a warning.
///
/// The whole tree's names are checked first ([`check_names`]): a name that cannot be a path
/// (not UTF-8, too long) or two names that are one path in Unicode NFC fail the import
/// before anything is copied or committed, so a refused import never leaves half a tree.
pub fn import_tree(content: &ContentStore, src: &Path, dest: &TreePath, mut sink: impl FnMut(Vec<CommitItem>) -> Result<()>) -> Result<u64> {
    let dir_meta = fs::metadata(src).map_err(|e| EngineError::local(src, e))?;
    if !dir_meta.is_dir() {
        return Err(EngineError::local(src, io::Error::other("not a directory")));
    }
    check_names(src, dest)?;
    let mut batch: Vec<CommitItem> = vec![(dest.clone(), Entry::dir(dir_meta.mode() & 0o7777, mtime_ms(&dir_meta)), empty_blob())];
    let mut count = 0u64;
    let mut stack = vec![(src.to_path_buf(), dest.clone())];
    while let Some((local, remote)) = stack.pop() {
        for name in sorted_names(&local)? {
            let lpath = local.join(&name);
            let meta = fs::symlink_metadata(&lpath).map_err(|e| EngineError::local(&lpath, e))?;
            let ft = meta.file_type();
            if !ft.is_dir() && !ft.is_symlink() && !ft.is_file() {
                tracing::warn!(path = %lpath.display(), "skipping a special file (device, socket or fifo)");
                continue;
            }
            // Checked above; the tree changing under the import is reported, not panicked on.
            let name = name.to_str().ok_or_else(|| EngineError::local(&lpath, io::Error::other("file name is not UTF-8")))?;
            let rpath = remote.join(name).map_err(StoreError::from)?;
            let item = if ft.is_dir() {
                stack.push((lpath.clone(), rpath.clone()));
                (rpath, Entry::dir(meta.mode() & 0o7777, mtime_ms(&meta)), empty_blob())
            } else if ft.is_symlink() {
                let target = fs::read_link(&lpath).map_err(|e| EngineError::local(&lpath, e))?;
                let blob = content.import_reader(target.as_os_str().as_encoded_bytes(), |_| {})?;
                let entry = Entry { kind: EntryKind::Symlink, ..file_entry(&blob, 0o777, mtime_ms(&meta)) };
                (rpath, entry, blob)
            } else {
                let blob = content.import_file(&lpath, |_| {})?;
                (rpath, file_entry(&blob, meta.mode() & 0o7777, mtime_ms(&meta)), blob)
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

/// The names in directory `dir`, sorted.
fn sorted_names(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| EngineError::local(dir, e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .map_err(|e| EngineError::local(dir, e))?;
    names.sort();
    Ok(names)
}

/// Checks every name of the tree `src` (to be imported at `dest`) before anything is stored:
/// one pass of directory reads, no file is opened. Special files, which the import skips
/// anyway, are not held against it.
fn check_names(src: &Path, dest: &TreePath) -> Result<()> {
    let mut bad: Vec<String> = Vec::new();
    let mut stack = vec![(src.to_path_buf(), dest.clone())];
    while let Some((local, remote)) = stack.pop() {
        let mut seen: std::collections::HashMap<TreePath, std::path::PathBuf> = std::collections::HashMap::new();
        for entry in fs::read_dir(&local).map_err(|e| EngineError::local(&local, e))? {
            let entry = entry.map_err(|e| EngineError::local(&local, e))?;
            let lpath = entry.path();
            let ft = entry.file_type().map_err(|e| EngineError::local(&lpath, e))?;
            if !ft.is_dir() && !ft.is_symlink() && !ft.is_file() {
                continue;
            }
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                bad.push(format!("{}: the name is not valid UTF-8", lpath.display()));
                continue;
            };
            let rpath = match remote.join(name) {
                Ok(p) => p,
                Err(e) => {
                    bad.push(format!("{}: {e}", lpath.display()));
                    continue;
                }
            };
            if let Some(other) = seen.insert(rpath.clone(), lpath.clone()) {
                let (first, second) = if other < lpath { (other, lpath) } else { (lpath, other) };
                bad.push(format!("{} and {} are one name in Unicode NFC ({rpath})", first.display(), second.display()));
                continue;
            }
            if ft.is_dir() {
                stack.push((lpath, rpath));
            }
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    bad.sort();
    let shown = bad.iter().take(BAD_NAMES_SHOWN_MAX).cloned().collect::<Vec<_>>().join("; ");
    let more = bad.len().saturating_sub(BAD_NAMES_SHOWN_MAX);
    let more = if more > 0 { format!(" (and {more} more)") } else { String::new() };
    Err(EngineError::BadNames { src: src.to_path_buf(), count: bad.len(), shown: format!("{shown}{more}") })
}

/// The entry for a stored local file.
pub fn file_entry(blob: &Imported, mode: u32, mtime_ms: i64) -> Entry {
    Entry { kind: EntryKind::File, hash: blob.hash, size: blob.size, mode, mtime_ms }
}

/// A commit item that makes directory `path` (as `mkdir -p`; kept as it is if it exists).
pub fn dir_item(path: TreePath, mode: u32, mtime_ms: i64) -> CommitItem {
    (path, Entry::dir(mode & 0o7777, mtime_ms), empty_blob())
}

pub(crate) fn empty_blob() -> Imported {
    Imported { hash: ContentHash::EMPTY, size: 0, inline: Some(Vec::new()), hold: None }
}

/// A local file's mtime in milliseconds.
pub fn mtime_ms(meta: &fs::Metadata) -> i64 {
    meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000
}
