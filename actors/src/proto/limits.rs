//! Named limits, units last. Every queue, name, path and chain in alknet-fs is bounded by one
//! of these, so a hostile or buggy input fails with a clear error instead of growing without end.

/// Longest single path component (a file or directory name), as most Unix filesystems allow.
pub const NAME_BYTES_MAX: usize = 255;
/// Longest normalised absolute path, as Linux's `PATH_MAX`.
pub const PATH_BYTES_MAX: usize = 4096;
/// Deepest path (number of components below the root).
pub const PATH_DEPTH_MAX: usize = 128;
/// Longest chain of branches a read falls through (a branch, its parent, …, the root).
/// Reads cost one indexed query per link, so the chain is bounded; fork from a shallower
/// branch (or merge and start again) past it.
pub const BRANCH_CHAIN_DEPTH_MAX: usize = 32;
/// Longest bucket or branch name.
pub const LABEL_BYTES_MAX: usize = 64;
/// Longest symlink target.
pub const SYMLINK_TARGET_BYTES_MAX: usize = 4096;
/// Largest file one write session may stage (1 TiB): a runaway writer stops here.
pub const FILE_BYTES_MAX: u64 = 1 << 40;
/// Most entries one commit (one SQLite transaction) may carry; bigger imports commit in
/// batches of this size.
pub const COMMIT_ENTRIES_MAX: usize = 4096;
