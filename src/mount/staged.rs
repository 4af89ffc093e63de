//! A mount's write session: small files in memory, larger ones in a staging file.
//!
//! Why memory first: unpacking a source tree creates thousands of small files. A staging
//! file per file costs a create here and a delete after the node takes it, and ext4's inode
//! allocator slows down sharply when files are created and deleted at that pace in one
//! directory (it skips recently freed inodes: measured as 69 % of the mount's time in
//! `open`). Content up to [`INLINE_BYTES_MAX`] is stored inline in `tree.db` anyway, so it
//! goes to the node as bytes in the commit request. A session that grows past that spills
//! to a staging file once and goes on as an ordinary [`WriteSession`].

use std::path::PathBuf;

use alknet_actors::content::{ContentError, ContentStore, INLINE_BYTES_MAX};
use alknet_actors::proto::entry::ContentHash;
use alknet_actors::proto::limits::FILE_BYTES_MAX;
use alknet_actors::proto::path::TreePath;
use alknet_actors::session::WriteSession;

/// Where a session spills when it outgrows memory.
#[derive(Clone)]
pub struct Spill {
    /// The content store (its staging files are renamed into it by the node).
    pub content: ContentStore,
    /// This mount's staging directory.
    pub dir: PathBuf,
}

/// What a closed session hands to the node.
pub enum Payload {
    /// The bytes themselves (at most [`INLINE_BYTES_MAX`]).
    Bytes(Vec<u8>),
    /// A staging file of `size` bytes, with its hash when every write was an append.
    File { staging: PathBuf, size: u64, hash: Option<ContentHash> },
}

/// An open write session of one file.
pub enum Staged {
    /// Small so far: the bytes.
    Memory { path: TreePath, mode: u32, data: Vec<u8> },
    /// A staging file (boxed: a session holds a hasher's state).
    File(Box<WriteSession>),
}

impl Staged {
    /// An empty session (a new file, or O_TRUNC).
    pub fn empty(path: TreePath, mode: u32) -> Self {
        Staged::Memory { path, mode, data: Vec::new() }
    }

    /// The staged length.
    pub fn len(&self) -> u64 {
        match self {
            Staged::Memory { data, .. } => data.len() as u64,
            Staged::File(s) => s.len(),
        }
    }

    /// True when nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mode the file will have.
    pub fn mode(&self) -> u32 {
        match self {
            Staged::Memory { mode, .. } => *mode,
            Staged::File(s) => s.mode(),
        }
    }

    /// Sets the mode the file will have.
    pub fn set_mode(&mut self, m: u32) {
        match self {
            Staged::Memory { mode, .. } => *mode = m,
            Staged::File(s) => s.set_mode(m),
        }
    }

    /// Moves the bytes to a staging file when `end` would outgrow memory.
    fn make_room(&mut self, end: u64, spill: &Spill) -> Result<(), ContentError> {
        if end <= INLINE_BYTES_MAX as u64 {
            return Ok(());
        }
        if let Staged::Memory { path, mode, data } = self {
            let mut file = WriteSession::empty(path.clone(), *mode, spill.content.stage_in(&spill.dir)?);
            file.write_at(0, data)?;
            *self = Staged::File(Box::new(file));
        }
        Ok(())
    }

    /// Writes `bytes` at `offset`; a write past the end leaves a hole of zeros.
    pub fn write_at(&mut self, offset: u64, bytes: &[u8], spill: &Spill) -> Result<(), ContentError> {
        let end = offset.checked_add(bytes.len() as u64).filter(|e| *e <= FILE_BYTES_MAX).ok_or_else(|| ContentError::Io {
            context: "write".into(),
            source: std::io::Error::new(std::io::ErrorKind::FileTooLarge, format!("files are limited to {FILE_BYTES_MAX} bytes")),
        })?;
        self.make_room(end, spill)?;
        match self {
            Staged::Memory { data, .. } => {
                let (at, end) = (offset as usize, end as usize);
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[at..end].copy_from_slice(bytes);
                Ok(())
            }
            Staged::File(s) => s.write_at(offset, bytes),
        }
    }

    /// Sets the length, cutting or zero-extending.
    pub fn truncate(&mut self, len: u64, spill: &Spill) -> Result<(), ContentError> {
        if len > FILE_BYTES_MAX {
            return Err(ContentError::Io {
                context: format!("truncate to {len} bytes"),
                source: std::io::Error::new(std::io::ErrorKind::FileTooLarge, format!("files are limited to {FILE_BYTES_MAX} bytes")),
            });
        }
        self.make_room(len, spill)?;
        match self {
            Staged::Memory { data, .. } => {
                data.resize(len as usize, 0);
                Ok(())
            }
            Staged::File(s) => s.truncate(len),
        }
    }

    /// Reads staged bytes at `offset` (a writer reading its own file back).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, ContentError> {
        match self {
            Staged::Memory { data, .. } => {
                let start = (offset as usize).min(data.len());
                let n = buf.len().min(data.len() - start);
                buf[..n].copy_from_slice(&data[start..start + n]);
                Ok(n)
            }
            Staged::File(s) => s.read_at(offset, buf),
        }
    }

    /// Makes the staged bytes durable where they are (memory has nowhere to go: the commit
    /// that an fsync makes is what keeps them).
    pub fn sync(&self) -> Result<(), ContentError> {
        match self {
            Staged::Memory { .. } => Ok(()),
            Staged::File(s) => s.sync(),
        }
    }

    /// Ends the session: its bytes, or its staging file left on disk for the node.
    pub fn close(self) -> Result<Payload, ContentError> {
        match self {
            Staged::Memory { data, .. } => Ok(Payload::Bytes(data)),
            Staged::File(s) => {
                let (staging, size, hash) = (*s).hand_off()?;
                Ok(Payload::File { staging, size, hash })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(s: &Staged) -> Vec<u8> {
        let mut buf = vec![0u8; s.len() as usize];
        let n = s.read_at(0, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn small_sessions_stay_in_memory_and_a_large_one_spills_to_a_staging_file_with_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let content = ContentStore::open(&dir.path().join("content")).unwrap();
        let spill = Spill { dir: content.mount_staging_dir(1), content };
        let mut s = Staged::empty(TreePath::parse("/f").unwrap(), 0o644);
        s.write_at(0, b"hello", &spill).unwrap();
        s.write_at(10, b"world", &spill).unwrap(); // a hole of zeros between
        assert!(matches!(s, Staged::Memory { .. }));
        assert_eq!(read_all(&s), b"hello\0\0\0\0\0world");
        s.truncate(5, &spill).unwrap();
        assert_eq!(read_all(&s), b"hello");

        let big: Vec<u8> = (0..INLINE_BYTES_MAX + 100).map(|i| (i % 251) as u8).collect();
        s.write_at(5, &big, &spill).unwrap();
        assert!(matches!(s, Staged::File(_)), "past the inline limit it spilled");
        let mut want = b"hello".to_vec();
        want.extend_from_slice(&big);
        assert_eq!(read_all(&s), want);
        let Payload::File { staging, size, hash } = s.close().unwrap() else { panic!("a file payload") };
        assert_eq!((std::fs::read(&staging).unwrap(), size), (want.clone(), want.len() as u64));
        // The spill wrote the memory bytes from 0 and the rest was appended: the hash the
        // session kept is the hash of exactly these bytes.
        assert_eq!(hash.map(|h| h.0), Some(*blake3::hash(&want).as_bytes()));

        let mut small = Staged::empty(TreePath::parse("/g").unwrap(), 0o600);
        small.write_at(0, b"tiny", &spill).unwrap();
        assert!(matches!(small.close().unwrap(), Payload::Bytes(b) if b == b"tiny"));
    }
}
