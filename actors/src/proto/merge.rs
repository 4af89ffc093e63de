//! Merge rules: the three-way decision for one path, and the last-writer-wins order that
//! settles a path changed on both sides.
//!
//! Both are pure functions of the versions involved, so every node, in every merge order,
//! reaches the same result: [`lww`] is a total order on distinct contents and
//! [`decide`] is symmetric in its two sides up to which one is called "target".

use std::cmp::Ordering;

use super::entry::{EntryKind, Version};

/// Which side of a merge a version came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub enum Side {
    /// The branch being merged from.
    Source,
    /// The branch being merged into.
    Target,
}

/// What a merge does at one path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Decision {
    /// The target already holds the right version (unchanged on the source, or both sides
    /// made the same change).
    Keep,
    /// Only the source changed: take its version.
    Take,
    /// Both sides changed differently: `winner` by [`lww`]; the loser stays in the history.
    Conflict {
        /// The side whose version the target ends up with.
        winner: Side,
    },
}

/// Three-way decision for one path. `None` means the path has no version in that view;
/// a tombstone and absence count as the same ("nothing here").
pub fn decide(base: Option<&Version>, source: Option<&Version>, target: Option<&Version>) -> Decision {
    let (b, s, t) = (Version::content_key(base), Version::content_key(source), Version::content_key(target));
    if s == t || s == b {
        return Decision::Keep;
    }
    if t == b {
        return Decision::Take;
    }
    let winner = match lww(source, target) {
        Ordering::Greater => Side::Source,
        _ => Side::Target,
    };
    Decision::Conflict { winner }
}

/// Orders two versions of one path by last-writer-wins: `Greater` when `a` wins.
///
/// The rule, in order: a directory beats a non-directory (replacing a directory that may have
/// children with a file would orphan them; the file is kept as a losing version); then the later
/// `written` stamp; then, for equal times, a present entry beats a tombstone, then the larger
/// (kind, hash, mode). The last steps make it total, so two nodes never disagree.
pub fn lww(a: Option<&Version>, b: Option<&Version>) -> Ordering {
    let is_dir = |v: Option<&Version>| v.and_then(|v| v.entry.as_ref()).is_some_and(|e| e.kind == EntryKind::Dir);
    let time = |v: Option<&Version>| v.map(|v| v.written).unwrap_or(crate::proto::clock::Stamp { ms: i64::MIN, counter: 0 });
    is_dir(a)
        .cmp(&is_dir(b))
        .then(time(a).cmp(&time(b)))
        .then(Version::content_key(a).cmp(&Version::content_key(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::entry::{ContentHash, Entry};

    fn file(byte: u8, at: i64) -> Version {
        Version {
            entry: Some(Entry { kind: EntryKind::File, hash: ContentHash([byte; 32]), size: 1, mode: 0o644, mtime_ms: at }),
            written: crate::proto::clock::Stamp::at(at),
        }
    }
    fn gone(at: i64) -> Version {
        Version { entry: None, written: crate::proto::clock::Stamp::at(at) }
    }
    fn dir(at: i64) -> Version {
        Version { entry: Some(Entry::dir(0o755, at)), written: crate::proto::clock::Stamp::at(at) }
    }

    /// One row of the table: (name, base, source, target, expected).
    type Case = (&'static str, Option<Version>, Option<Version>, Option<Version>, Decision);

    /// The data-driven table of three-way cases.
    #[test]
    fn three_way_table() {
        let (a1, b2, c3) = (file(1, 1), file(2, 2), file(3, 3));
        let cases: Vec<Case> = vec![
            ("untouched", Some(a1.clone()), Some(a1.clone()), Some(a1.clone()), Decision::Keep),
            ("changed on source only", Some(a1.clone()), Some(b2.clone()), Some(a1.clone()), Decision::Take),
            ("changed on target only", Some(a1.clone()), Some(a1.clone()), Some(b2.clone()), Decision::Keep),
            ("same change both sides", Some(a1.clone()), Some(b2.clone()), Some(b2.clone()), Decision::Keep),
            ("added on source", None, Some(b2.clone()), None, Decision::Take),
            ("added on target", None, None, Some(b2.clone()), Decision::Keep),
            ("deleted on source", Some(a1.clone()), Some(gone(2)), Some(a1.clone()), Decision::Take),
            ("deleted on target", Some(a1.clone()), Some(a1.clone()), Some(gone(2)), Decision::Keep),
            ("deleted on both", Some(a1.clone()), Some(gone(2)), Some(gone(3)), Decision::Keep),
            ("tombstone equals absence", None, Some(gone(2)), None, Decision::Keep),
            ("both changed, source later", Some(a1.clone()), Some(c3.clone()), Some(b2.clone()), Decision::Conflict { winner: Side::Source }),
            ("both changed, target later", Some(a1.clone()), Some(b2.clone()), Some(c3.clone()), Decision::Conflict { winner: Side::Target }),
            ("both added differently", None, Some(c3.clone()), Some(b2.clone()), Decision::Conflict { winner: Side::Source }),
            ("delete vs later edit", Some(a1.clone()), Some(gone(2)), Some(c3.clone()), Decision::Conflict { winner: Side::Target }),
            ("later delete vs edit", Some(a1.clone()), Some(gone(9)), Some(c3.clone()), Decision::Conflict { winner: Side::Source }),
            ("dir beats later file", None, Some(file(4, 99)), Some(dir(1)), Decision::Conflict { winner: Side::Target }),
            ("equal times: larger hash", None, Some(file(9, 5)), Some(file(8, 5)), Decision::Conflict { winner: Side::Source }),
        ];
        for (name, base, source, target, expect) in cases {
            assert_eq!(decide(base.as_ref(), source.as_ref(), target.as_ref()), expect, "{name}");
        }
    }

    fn arb_version() -> impl proptest::strategy::Strategy<Value = Option<Version>> {
        use proptest::prelude::*;
        prop_oneof![
            Just(None),
            (0u8..4, 0i64..4).prop_map(|(h, t)| Some(file(h, t))),
            (0i64..4).prop_map(|t| Some(gone(t))),
            (0i64..4).prop_map(|t| Some(dir(t))),
        ]
    }

    proptest::proptest! {
        /// Merging A into B and B into A leave the path with the same content: the rule does
        /// not depend on the direction of the merge.
        #[test]
        fn merge_result_is_direction_free(base in arb_version(), a in arb_version(), b in arb_version()) {
            let result = |src: &Option<Version>, tgt: &Option<Version>| match decide(base.as_ref(), src.as_ref(), tgt.as_ref()) {
                Decision::Keep => Version::content_key(tgt.as_ref()),
                Decision::Take => Version::content_key(src.as_ref()),
                Decision::Conflict { winner: Side::Source } => Version::content_key(src.as_ref()),
                Decision::Conflict { winner: Side::Target } => Version::content_key(tgt.as_ref()),
            };
            proptest::prop_assert_eq!(result(&a, &b), result(&b, &a));
        }

        /// LWW is antisymmetric: swapping the arguments reverses the order.
        #[test]
        fn lww_is_antisymmetric(a in arb_version(), b in arb_version()) {
            proptest::prop_assert_eq!(lww(a.as_ref(), b.as_ref()), lww(b.as_ref(), a.as_ref()).reverse());
        }
    }
}
