//! Path rules: what a path in the tree may be, and its one normal form.
//!
//! Every path that enters the store passes through [`TreePath::parse`]. The normal form is
//! absolute, `/`-separated, without empty, `.` or `..` components, without NUL, and within
//! [`NAME_BYTES_MAX`], [`PATH_BYTES_MAX`] and [`PATH_DEPTH_MAX`]. We *refuse* `..` rather than
//! resolve it: a client that sends `a/../../b` is either confused or hostile, and silently
//! clamping it at the root would write somewhere the client did not name.

use std::fmt;

use super::limits::{NAME_BYTES_MAX, PATH_BYTES_MAX, PATH_DEPTH_MAX};

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path was empty.
    #[error("empty path: name a path such as /dir/file")]
    Empty,
    /// A component was `..`.
    #[error("path {0:?} contains '..': paths are absolute and may not climb out of the root")]
    DotDot(String),
    /// A component was `.` or empty (`a//b`).
    #[error("path {0:?} has an empty or '.' component: write it without them")]
    EmptyComponent(String),
    /// A NUL byte.
    #[error("path contains a NUL byte")]
    Nul,
    /// A component longer than [`NAME_BYTES_MAX`].
    #[error("a name in the path is {0} bytes long; the limit is {NAME_BYTES_MAX}")]
    NameTooLong(usize),
    /// Longer than [`PATH_BYTES_MAX`].
    #[error("path is {0} bytes long; the limit is {PATH_BYTES_MAX}")]
    TooLong(usize),
    /// Deeper than [`PATH_DEPTH_MAX`].
    #[error("path is {0} levels deep; the limit is {PATH_DEPTH_MAX}")]
    TooDeep(usize),
    /// The root was named where a file or directory below it is needed.
    #[error("the root '/' cannot be used here: name a path below it")]
    Root,
}

/// A valid, normalised, absolute path such as `/docs/a.txt`; `/` is the root.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TreePath(String);

impl TreePath {
    /// The root directory.
    pub fn root() -> Self {
        TreePath("/".to_string())
    }

    /// Parses and normalises `raw`. A missing leading `/` is added (`a/b` is `/a/b`), one
    /// trailing `/` is dropped, and the text is put in Unicode NFC, so `café` typed on Linux
    /// (NFC) and sent by macOS (NFD) is one path; anything else irregular is refused. The
    /// length limits apply to the normal form, the one the store keeps.
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        if raw.is_empty() {
            return Err(PathError::Empty);
        }
        if raw.contains('\0') {
            return Err(PathError::Nul);
        }
        // Bound the work before normalising: NFC never more than triples a string's bytes,
        // and a normal form longer than the limit is refused below anyway.
        if raw.len() > 3 * PATH_BYTES_MAX {
            return Err(PathError::TooLong(raw.len()));
        }
        let text = nfc(raw);
        let body = text.strip_prefix('/').unwrap_or(&text);
        if body.is_empty() {
            return Ok(Self::root());
        }
        let body = body.strip_suffix('/').unwrap_or(body);
        if body.is_empty() {
            return Err(PathError::EmptyComponent(raw.to_string()));
        }
        let mut depth = 0;
        for part in body.split('/') {
            match part {
                ".." => return Err(PathError::DotDot(raw.to_string())),
                "" | "." => return Err(PathError::EmptyComponent(raw.to_string())),
                p if p.len() > NAME_BYTES_MAX => return Err(PathError::NameTooLong(p.len())),
                _ => depth += 1,
            }
        }
        if depth > PATH_DEPTH_MAX {
            return Err(PathError::TooDeep(depth));
        }
        let normal = format!("/{body}");
        if normal.len() > PATH_BYTES_MAX {
            return Err(PathError::TooLong(normal.len()));
        }
        Ok(TreePath(normal))
    }

    /// Like [`parse`](Self::parse) but refuses the root: for operations on a file or a
    /// directory below it.
    pub fn parse_non_root(raw: &str) -> Result<Self, PathError> {
        let p = Self::parse(raw)?;
        if p.is_root() {
            return Err(PathError::Root);
        }
        Ok(p)
    }

    /// The path as text, always starting with `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for `/`.
    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    /// The parent directory and the last name; `None` for the root.
    pub fn split(&self) -> Option<(TreePath, &str)> {
        if self.is_root() {
            return None;
        }
        let cut = self.0.rfind('/').expect("normal form starts with '/'");
        let parent = if cut == 0 { "/" } else { &self.0[..cut] };
        Some((TreePath(parent.to_string()), &self.0[cut + 1..]))
    }

    /// The parent directory; `None` for the root.
    pub fn parent(&self) -> Option<TreePath> {
        self.split().map(|(p, _)| p)
    }

    /// The last name; empty for the root.
    pub fn name(&self) -> &str {
        self.split().map(|(_, n)| n).unwrap_or("")
    }

    /// `self` with `name` appended. `name` must be a valid single component.
    pub fn join(&self, name: &str) -> Result<TreePath, PathError> {
        if name.contains('/') {
            return Err(PathError::EmptyComponent(name.to_string()));
        }
        Self::parse(&format!("{}/{}", self.0.trim_end_matches('/'), name))
    }

    /// `self` joined with `name`, where `name` comes from a store that only ever held
    /// validated names (a listing of this directory): checks only what is cheap.
    pub fn child_unchecked(&self, name: &str) -> TreePath {
        debug_assert!(!name.is_empty() && !name.contains('/') && name != "..");
        let mut s = String::with_capacity(self.0.len() + 1 + name.len());
        s.push_str(self.0.trim_end_matches('/'));
        s.push('/');
        s.push_str(name);
        TreePath(s)
    }

    /// The path of a stored row, from its `dir` and `name` columns, without re-validating
    /// (and re-normalising) what was validated when it was written.
    pub fn stored(dir: &str, name: &str) -> TreePath {
        debug_assert!(dir.starts_with('/') && !name.is_empty() && !name.contains('/'));
        let mut s = String::with_capacity(dir.len() + 1 + name.len());
        s.push_str(dir.trim_end_matches('/'));
        s.push('/');
        s.push_str(name);
        TreePath(s)
    }

    /// Every proper ancestor, nearest the root first, excluding the root itself.
    pub fn ancestors(&self) -> Vec<TreePath> {
        let mut out = Vec::new();
        let mut cur = self.parent();
        while let Some(p) = cur {
            if p.is_root() {
                break;
            }
            cur = p.parent();
            out.push(p);
        }
        out.reverse();
        out
    }

    /// True when `self` is `other` or lies below it.
    pub fn is_within(&self, other: &TreePath) -> bool {
        other.is_root()
            || self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes()[other.0.len()] == b'/')
    }

    /// `self` moved from below `from` to below `to` (for renames of directories).
    pub fn rebase(&self, from: &TreePath, to: &TreePath) -> Result<TreePath, PathError> {
        debug_assert!(self.is_within(from));
        let rest = &self.0[from.0.len()..];
        Self::parse(&format!("{}{}", to.0.trim_end_matches('/'), rest))
    }
}

impl serde::Serialize for TreePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TreePath {
    /// Deserialising validates: a path from the wire passes the same rules as any other.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        TreePath::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for TreePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TreePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// `text` in Unicode Normalization Form C (borrowed when it already is, the common case).
pub fn nfc(text: &str) -> std::borrow::Cow<'_, str> {
    icu_normalizer::ComposingNormalizerBorrowed::new_nfc().normalize(text)
}

/// Checks a bucket or branch name: 1..=[`LABEL_BYTES_MAX`](super::limits::LABEL_BYTES_MAX)
/// bytes of ASCII letters, digits, `-`, `_` and `.`, not starting with `.`.
pub fn check_label(kind: &str, name: &str) -> Result<(), String> {
    use super::limits::LABEL_BYTES_MAX;
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > LABEL_BYTES_MAX || name.starts_with('.') || !name.chars().all(ok_char) {
        return Err(format!(
            "invalid {kind} name {name:?}: use 1 to {LABEL_BYTES_MAX} letters, digits, '-', '_' or '.', not starting with '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expect: Result<&str, PathError>) {
        assert_eq!(TreePath::parse(raw).as_ref().map(|p| p.as_str()), expect.as_ref().map(|s| *s), "input {raw:?}");
    }

    #[test]
    fn parse_table() {
        let long = "n".repeat(300);
        let deep = "/d".repeat(PATH_DEPTH_MAX + 1);
        let cases: Vec<(&str, Result<&str, PathError>)> = vec![
            ("/", Ok("/")),
            ("/a", Ok("/a")),
            ("a/b", Ok("/a/b")),
            ("/a/b/", Ok("/a/b")),
            ("/a b/ü.txt", Ok("/a b/ü.txt")),
            ("", Err(PathError::Empty)),
            ("../escape", Err(PathError::DotDot("../escape".into()))),
            ("/a/../../b", Err(PathError::DotDot("/a/../../b".into()))),
            ("a/./b/../../..", Err(PathError::EmptyComponent("a/./b/../../..".into()))),
            ("/a//b", Err(PathError::EmptyComponent("/a//b".into()))),
            ("//", Err(PathError::EmptyComponent("//".into()))),
            ("/a\0b", Err(PathError::Nul)),
            (&long, Err(PathError::NameTooLong(300))),
            (&deep, Err(PathError::TooDeep(PATH_DEPTH_MAX + 1))),
            // NFD (as macOS sends it) becomes NFC: one name, one path.
            ("/cafe\u{301}/x", Ok("/caf\u{e9}/x")),
            ("/caf\u{e9}/x", Ok("/caf\u{e9}/x")),
        ];
        for (raw, expect) in cases {
            check(raw, expect);
        }
    }

    #[test]
    fn the_length_limit_applies_to_the_normal_form() {
        // 16 names of 255 bytes and their separators: 4096 bytes with the leading '/'.
        let names: Vec<String> = (0..16).map(|i| format!("{i:x}").repeat(255)[..255].to_string()).collect();
        let exact = format!("/{}", names.join("/"));
        assert_eq!(exact.len(), PATH_BYTES_MAX);
        assert_eq!(TreePath::parse(&exact).unwrap().as_str(), exact);
        // 17 names of 240 bytes: 4096 bytes as typed without the leading '/', 4097 in normal form.
        let over = (0..17).map(|i| format!("{i:x}").repeat(240)[..240].to_string()).collect::<Vec<_>>().join("/");
        assert_eq!(over.len(), PATH_BYTES_MAX);
        assert_eq!(TreePath::parse(&over), Err(PathError::TooLong(PATH_BYTES_MAX + 1)));
        // A trailing '/' takes the input over the limit, not its normal form.
        assert_eq!(TreePath::parse(&format!("{exact}/")).unwrap().as_str(), exact);
        // A name is measured in NFC too: 100 'é' are 300 bytes as NFD, 200 as NFC.
        assert!(TreePath::parse(&format!("/{}", "e\u{301}".repeat(100))).is_ok());
    }

    #[test]
    fn relations() {
        let p = TreePath::parse("/a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "/a/b");
        assert_eq!(p.name(), "c");
        assert_eq!(p.ancestors().iter().map(|a| a.as_str()).collect::<Vec<_>>(), ["/a", "/a/b"]);
        assert!(p.is_within(&TreePath::parse("/a").unwrap()));
        assert!(!TreePath::parse("/ab").unwrap().is_within(&TreePath::parse("/a").unwrap()));
        let moved = p.rebase(&TreePath::parse("/a").unwrap(), &TreePath::parse("/x/y").unwrap()).unwrap();
        assert_eq!(moved.as_str(), "/x/y/b/c");
        assert_eq!(TreePath::root().join("f").unwrap().as_str(), "/f");
        assert!(TreePath::parse_non_root("/").is_err());
    }

    #[test]
    fn labels() {
        assert!(check_label("branch", "feature-1.x").is_ok());
        for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(65)] {
            assert!(check_label("branch", bad).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Whatever the input, a parsed path is in normal form and parses to itself.
        #[test]
        fn parse_is_idempotent(raw in "[a-z./\\x00]{0,40}") {
            if let Ok(p) = TreePath::parse(&raw) {
                let again = TreePath::parse(p.as_str()).unwrap();
                proptest::prop_assert_eq!(&again, &p);
                proptest::prop_assert!(!p.as_str().contains("/../") && !p.as_str().contains("//"));
            }
        }
    }
}
