//! # alknet-actors
//!
//! The core of alknet-fs, in two layers:
//!
//! - [`proto`] — always compiled, sans-IO: path rules, the entry model, merge and
//!   last-writer-wins rules, limits. No tokio, iroh, rusqlite or ractor; the simulations
//!   depend on this layer alone (`default-features = false`).
//! - behind the `runtime` feature, the parts that do I/O:
//!   - `store` — the path tree in SQLite with its honker outbox (one database file per node);
//!   - `content` — the iroh-blobs file store and the one-pass import;
//!   - `identity` — the node's key (`DATA/node.key`): its iroh identity and its node id;
//!   - `gc` — history retention and mark-and-sweep of blobs;
//!   - `index` — the iroh-blobs store indexing the content for verified streaming;
//!   - `node` — the actors: supervisor, store, outbox watcher, blobs, GC;
//!   - `session` — write sessions: branch on write, merge on close;
//!   - `engine` — the data directory: its lock, its layout, and the operations the CLI and
//!     (later) the actors call.
#![deny(missing_docs)]

pub mod proto;

#[cfg(feature = "runtime")]
pub mod content;
#[cfg(feature = "runtime")]
pub mod engine;
#[cfg(feature = "runtime")]
pub mod gc;
#[cfg(feature = "runtime")]
pub mod identity;
#[cfg(feature = "runtime")]
pub mod index;
#[cfg(feature = "runtime")]
pub mod node;
#[cfg(feature = "runtime")]
pub mod session;
#[cfg(feature = "runtime")]
pub mod store;
