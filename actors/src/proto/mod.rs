//! The sans-IO core: rules and plain data with no tokio, iroh, rusqlite or ractor, so the
//! simulations can run them deterministically and every rule is testable as a pure function.
//!
//! - [`clock`]: time as an input (the system clock in production, set by tests);
//! - [`path`]: what a path may be and its normal form;
//! - [`ids`]: names that mean the same on every node (node, version, bucket and branch ids)
//!   and the order of a path's versions;
//! - [`entry`]: what the tree stores at a path;
//! - [`merge`]: the three-way decision and the last-writer-wins order;
//! - [`replica`]: what replicates (changes, branch records), where (shards), and the rules
//!   that make replicas agree (the head, conflicts);
//! - [`tree`]: a bucket's replicated changes in memory and the tree they show (the
//!   simulations' replica);
//! - [`membership`]: who belongs to a bucket and whose versions are accepted;
//! - [`ticket`]: invitations to a bucket and the inviter's decision;
//! - [`doc`]: a replicated document of write-once entries (automerge) and its sync;
//! - [`fanout`]: how a change spreads through a mesh (push, answer, anti-entropy);
//! - [`signed`]: entries signed by their writer's node key, and the check of a message's;
//! - [`sync`]: the frames of the sync protocol between two nodes and their limits;
//! - [`frame`]: length-prefixed frames of the control socket;
//! - [`limits`]: every bound, named, with units.

pub mod clock;
pub mod compaction;
pub mod doc;
pub mod entry;
pub mod fanout;
#[cfg(test)]
mod fuzz;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod membership;
pub mod merge;
pub mod path;
pub mod replica;
pub mod signed;
pub mod sync;
pub mod ticket;
pub mod tree;
