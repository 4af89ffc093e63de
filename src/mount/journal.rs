//! A mount's journal: every change the mount acknowledges before the node has it (a close,
//! a mkdir, a directory's chmod or utimes) is appended here before the acknowledgement, so a
//! mount killed (SIGKILL, OOM) or ended while the node is away loses nothing it said was
//! done. Only a power loss before an `fsync` may: the journal is written, not synced.
//!
//! Where: the mount's staging directory, `content/staging/mount-<pid>-<id>/` (its large
//! files' staging files are there too), with a `lock` file the mount holds (`flock`) while
//! it runs. The directory is made under another name and renamed once locked, so a
//! directory of that shape whose lock nobody holds belongs to a mount that ended: the node
//! adopts it (`control::adopt`), commits what its journal holds as the mount would have
//! (each change carries its id: one already committed is not applied twice), and removes it.
//!
//! Format: files `journal-<n>` of frames, each a header (payload length, data length, the
//! first 8 bytes of the BLAKE3 of both) then a [`Record`] as JSON and, for a small file,
//! its bytes raw. A torn last frame (a crash mid-append) fails its checksum and ends the
//! reading. A journal file holds at most [`FILE_BYTES_MAX`] before the next is begun, and
//! is deleted once none of its changes waits any more (the current one is emptied then), so
//! the journal stays about as large as the queue of changes waiting.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::control::{StagedAttr, StagedDir, StagedFile, WireScope};

/// Bytes a journal file holds before the next one is begun.
pub const FILE_BYTES_MAX: u64 = 64 << 20;
/// Bytes of one frame's payload and data at most (a record is small; data is at most the
/// inline tier): anything larger is damage.
const FRAME_BYTES_MAX: u32 = 1 << 20;
/// The lock file a running mount holds.
pub const LOCK_FILE: &str = "lock";
const HEADER_BYTES: usize = 16;

/// One journaled change, or the scope every change of the journal is in.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// The bucket and branch of the mount (the first record of every journal file).
    Scope(WireScope),
    /// A closed file (a small one's bytes follow the record in its frame).
    File(StagedFile),
    /// A directory made.
    Dir(StagedDir),
    /// A directory's new mode and/or mtime.
    Attr(StagedAttr),
}

/// The writing side, owned by the mount's write-behind queue.
pub struct Journal {
    dir: PathBuf,
    scope: WireScope,
    file: File,
    index: u32,
    bytes: u64,
    /// Changes still waiting, per journal file.
    waiting: HashMap<u32, usize>,
}

fn file_name(index: u32) -> String {
    format!("journal-{index}")
}

fn frame(record: &Record, data: &[u8]) -> Vec<u8> {
    let payload = serde_json::to_vec(record).expect("records serialise");
    let mut sum = blake3::Hasher::new();
    sum.update(&payload);
    sum.update(data);
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len() + data.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&sum.finalize().as_bytes()[..8]);
    out.extend_from_slice(&payload);
    out.extend_from_slice(data);
    out
}

impl Journal {
    /// Begins the journal in the mount's staging directory `dir` (made and locked by
    /// [`make_mount_dir`]).
    pub fn create(dir: &Path, scope: WireScope) -> io::Result<Journal> {
        let file = Self::begin(dir, 0, &scope)?;
        let bytes = file.metadata()?.len();
        Ok(Journal { dir: dir.to_path_buf(), scope, file, index: 0, bytes, waiting: HashMap::new() })
    }

    fn begin(dir: &Path, index: u32, scope: &WireScope) -> io::Result<File> {
        let mut file = OpenOptions::new().create(true).truncate(true).write(true).open(dir.join(file_name(index)))?;
        file.write_all(&frame(&Record::Scope(scope.clone()), &[]))?;
        Ok(file)
    }

    /// Appends `record` (with a small file's `data`) before its change is acknowledged;
    /// returns the journal file it is in, for [`done`](Self::done).
    pub fn append(&mut self, record: &Record, data: &[u8]) -> io::Result<u32> {
        if self.bytes >= FILE_BYTES_MAX {
            let next = self.index + 1;
            self.file = Self::begin(&self.dir, next, &self.scope)?;
            if self.waiting.get(&self.index).copied().unwrap_or(0) == 0 {
                let _ = fs::remove_file(self.dir.join(file_name(self.index)));
            }
            self.index = next;
            self.bytes = self.file.metadata()?.len();
        }
        let bytes = frame(record, data);
        if let Err(e) = self.file.write_all(&bytes) {
            // Whatever part of the frame went in fails its checksum; start the next frame
            // after it all the same.
            self.bytes = self.file.metadata().map(|m| m.len()).unwrap_or(FILE_BYTES_MAX);
            return Err(e);
        }
        self.bytes += bytes.len() as u64;
        *self.waiting.entry(self.index).or_default() += 1;
        Ok(self.index)
    }

    /// A change journaled in file `index` is committed (or was never going to be sent): a
    /// file none of whose changes waits is deleted, the current one emptied.
    pub fn done(&mut self, index: u32) {
        let Some(n) = self.waiting.get_mut(&index) else { return };
        *n = n.saturating_sub(1);
        if *n > 0 {
            return;
        }
        self.waiting.remove(&index);
        if index != self.index {
            let _ = fs::remove_file(self.dir.join(file_name(index)));
        } else if let Ok(file) = Self::begin(&self.dir, index, &self.scope) {
            // Emptied, not deleted: the next change goes on into it.
            self.bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
            self.file = file;
        }
    }
}

/// Makes and locks a new staging directory for this mount process: under a temporary name
/// until it is locked, so a directory named `mount-*` with no lock held is always one whose
/// mount ended. Returns the directory and the lock (held while the returned file is open).
pub fn make_mount_dir(staging: &Path) -> io::Result<(PathBuf, File)> {
    fs::create_dir_all(staging)?;
    let id: u64 = rand::random();
    let name = format!("{}{}-{id:016x}", alknet_actors::content::MOUNT_STAGING_PREFIX, std::process::id());
    let tmp = staging.join(format!(".new-{name}"));
    fs::create_dir(&tmp)?;
    let lock = File::create(tmp.join(LOCK_FILE))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let dir = staging.join(name);
    fs::rename(&tmp, &dir)?;
    Ok((dir, lock))
}

/// Whether a mount still runs in staging directory `dir`.
pub enum Claim {
    /// Its mount runs (it holds the lock).
    Alive,
    /// Its mount ended: the lock is this adopter's while the file is open.
    Ended(File),
    /// A directory of an older alkfs (no lock file; named by its pid only): its mount ended
    /// when that process did. It has no journal.
    Legacy { alive: bool },
}

/// Finds out whether the mount of staging directory `dir` still runs.
pub fn claim(dir: &Path) -> io::Result<Claim> {
    let lock = match File::open(dir.join(LOCK_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let pid = dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(alknet_actors::content::MOUNT_STAGING_PREFIX))
                .and_then(|p| p.split('-').next())
                .and_then(|p| p.parse::<i32>().ok());
            // SAFETY: kill with signal 0 only checks that the process exists.
            let alive = pid.is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
            return Ok(Claim::Legacy { alive });
        }
        Err(e) => return Err(e),
    };
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Claim::Ended(lock));
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(Claim::Alive),
        e => Err(e),
    }
}

/// What a journal holds, in the order its changes were acknowledged: each record with the
/// scope it is in and, for a small file, its bytes. Reading a file stops at a torn or
/// damaged frame (a crash mid-append: that change was never acknowledged).
pub fn read(dir: &Path) -> io::Result<Vec<(WireScope, Record, Vec<u8>)>> {
    let mut files: Vec<(u32, PathBuf)> = fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_prefix("journal-")?.parse::<u32>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for (_, path) in files {
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let mut scope: Option<WireScope> = None;
        let mut at = 0;
        while let Some((record, data, next)) = next_frame(&bytes, at) {
            at = next;
            match record {
                Record::Scope(s) => scope = Some(s),
                r => match &scope {
                    Some(s) => out.push((s.clone(), r, data)),
                    None => break, // damaged: a journal file begins with its scope
                },
            }
        }
        if at < bytes.len() {
            tracing::warn!(journal = %path.display(), bytes = bytes.len() - at, "a journal ends in a torn or damaged frame; what it held was never acknowledged");
        }
    }
    Ok(out)
}

/// The frame at `at` of `bytes` and where the next begins; `None` at the end or at damage.
fn next_frame(bytes: &[u8], at: usize) -> Option<(Record, Vec<u8>, usize)> {
    let header = bytes.get(at..at + HEADER_BYTES)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?);
    let data_len = u32::from_le_bytes(header[4..8].try_into().ok()?);
    if len > FRAME_BYTES_MAX || data_len > FRAME_BYTES_MAX {
        return None;
    }
    let start = at + HEADER_BYTES;
    let payload = bytes.get(start..start + len as usize)?;
    let data = bytes.get(start + len as usize..start + len as usize + data_len as usize)?;
    let mut sum = blake3::Hasher::new();
    sum.update(payload);
    sum.update(data);
    if sum.finalize().as_bytes()[..8] != header[8..16] {
        return None;
    }
    let record = serde_json::from_slice(payload).ok()?;
    Some((record, data.to_vec(), start + len as usize + data_len as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(id: &str, path: &str) -> Record {
        Record::File(StagedFile {
            id: id.into(),
            seen: alknet_actors::store::acked::Seen::Opened(None),
            path: path.into(),
            staging: None,
            data: None,
            hash: None,
            size: Some(3),
            mode: 0o644,
            mtime_ms: 1,
        })
    }

    #[test]
    fn what_was_appended_reads_back_in_order_up_to_a_torn_frame_and_done_files_go() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, _lock) = make_mount_dir(tmp.path()).unwrap();
        assert!(matches!(claim(&dir).unwrap(), Claim::Alive), "the lock is held while the mount runs");
        let scope = WireScope { bucket: "default".into(), branch: "main".into() };
        let mut j = Journal::create(&dir, scope).unwrap();
        let a = j.append(&file("m:1", "/a"), b"one").unwrap();
        j.append(&file("m:2", "/b"), b"two").unwrap();
        let read_back = read(&dir).unwrap();
        let ids: Vec<(String, Vec<u8>)> = read_back.iter().map(|(_, r, d)| (match r { Record::File(f) => f.id.clone(), _ => String::new() }, d.clone())).collect();
        assert_eq!(ids, [("m:1".to_string(), b"one".to_vec()), ("m:2".to_string(), b"two".to_vec())]);
        // A torn tail (half a frame) ends the reading without losing what came before.
        let path = dir.join(file_name(a));
        let mut bytes = fs::read(&path).unwrap();
        let whole = bytes.len();
        bytes.extend_from_slice(&frame(&file("m:3", "/c"), b"three")[..20]);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&dir).unwrap().len(), 2);
        // A flipped bit is damage, found by the checksum.
        bytes.truncate(whole);
        bytes[whole - 2] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&dir).unwrap().len(), 1);
        // Once nothing of it waits, the file is emptied.
        let mut j = Journal::create(&dir, WireScope { bucket: "default".into(), branch: "main".into() }).unwrap();
        let i = j.append(&file("m:4", "/d"), b"").unwrap();
        assert_eq!(read(&dir).unwrap().len(), 1);
        j.done(i);
        assert!(read(&dir).unwrap().is_empty());
    }

    #[test]
    fn a_directory_whose_mount_ended_can_be_claimed_and_one_still_locked_cannot() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, lock) = make_mount_dir(tmp.path()).unwrap();
        assert!(matches!(claim(&dir).unwrap(), Claim::Alive));
        drop(lock);
        assert!(matches!(claim(&dir).unwrap(), Claim::Ended(_)));
        let legacy = tmp.path().join("mount-999999999");
        fs::create_dir(&legacy).unwrap();
        assert!(matches!(claim(&legacy).unwrap(), Claim::Legacy { alive: false }));
        let me = tmp.path().join(format!("mount-{}", std::process::id()));
        fs::create_dir(&me).unwrap();
        assert!(matches!(claim(&me).unwrap(), Claim::Legacy { alive: true }));
    }
}
