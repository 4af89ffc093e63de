//! What the path tree stores at a path: an [`Entry`] (file, directory or symlink) or a
//! tombstone, stamped with the time it was written. Plain data, shared by the SQLite store,
//! the merge rules and, later, the sync documents.

use std::fmt;

/// A BLAKE3 hash of a file's bytes: the content address in the blob store.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// The hash of zero bytes, used for directories and empty files.
    pub const EMPTY: ContentHash = ContentHash([
        0xaf, 0x13, 0x49, 0xb9, 0xf5, 0xf9, 0xa1, 0xa6, 0xa0, 0x40, 0x4d, 0xea, 0x36, 0xdc, 0xc9, 0x49, 0x9b, 0xcb,
        0x25, 0xc9, 0xad, 0xc1, 0x12, 0xb7, 0xcc, 0x9a, 0x93, 0xca, 0xe4, 0x1f, 0x32, 0x62,
    ]);

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        super::ids::hex(&self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        super::ids::unhex::<32>(s).map(ContentHash)
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}…", &self.to_hex()[..12])
    }
}

/// The three kinds of thing a path can name.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum EntryKind {
    /// A regular file; its bytes are the blob named by the hash.
    File,
    /// A directory; its children are the paths below it.
    Dir,
    /// A symbolic link; its target is the blob named by the hash (stored like file bytes).
    Symlink,
}

impl EntryKind {
    /// The one-letter code stored in SQLite and on the wire.
    pub fn code(self) -> &'static str {
        match self {
            EntryKind::File => "f",
            EntryKind::Dir => "d",
            EntryKind::Symlink => "l",
        }
    }

    /// The inverse of [`code`](Self::code).
    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "f" => Some(EntryKind::File),
            "d" => Some(EntryKind::Dir),
            "l" => Some(EntryKind::Symlink),
            _ => None,
        }
    }
}

/// A live path: its kind, content and attributes.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Entry {
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// BLAKE3 of the bytes ([`ContentHash::EMPTY`] for directories).
    pub hash: ContentHash,
    /// Length of the bytes.
    pub size: u64,
    /// Unix permission bits (without the file-type bits).
    pub mode: u32,
    /// Modification time the user sees, in milliseconds since the Unix epoch.
    pub mtime_ms: i64,
}

impl Entry {
    /// A directory entry with the given mode and time.
    pub fn dir(mode: u32, mtime_ms: i64) -> Self {
        Entry { kind: EntryKind::Dir, hash: ContentHash::EMPTY, size: 0, mode, mtime_ms }
    }

    /// What makes two versions "the same" for merging: kind, bytes and mode. The mtime is left
    /// out on purpose: two sides that wrote identical bytes did not conflict.
    pub fn content_key(&self) -> (EntryKind, ContentHash, u32) {
        (self.kind, self.hash, self.mode)
    }
}

/// One version of a path: present (`entry` is `Some`) or deleted (a tombstone), and when it
/// was written. `written` orders writers for last-writer-wins; it is the commit's hybrid
/// logical clock stamp, not the file's mtime, which a user may set to anything.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Version {
    /// The entry, or `None` for a tombstone.
    pub entry: Option<Entry>,
    /// When this version was committed (see [`Stamp`](super::clock::Stamp)).
    pub written: super::clock::Stamp,
}

impl Version {
    /// The content identity used to compare versions in a merge; tombstones and absence
    /// compare equal (both mean "nothing here").
    pub fn content_key(v: Option<&Version>) -> Option<(EntryKind, ContentHash, u32)> {
        v.and_then(|v| v.entry.as_ref()).map(Entry::content_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_hash_is_blake3_of_nothing() {
        // Pinned so proto needs no blake3 dependency; checked here against the hex from the
        // BLAKE3 reference test vectors.
        assert_eq!(ContentHash::EMPTY.to_hex(), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
        assert_eq!(ContentHash::from_hex(&ContentHash::EMPTY.to_hex()), Some(ContentHash::EMPTY));
        assert_eq!(ContentHash::from_hex("zz"), None);
    }
}
