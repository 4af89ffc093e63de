//! # alknet-fs
//!
//! The product package: the `alkfs` binary is a thin `main` over this library, so tests and
//! benchmarks drive the same code (the control client, the config) the binary runs.
//!
//! - [`cli`]: the commands and flags (clap);
//! - [`commands`]: runs a command against a data dir through the engine;
//! - [`output`]: text and JSON formats;
//! - [`progress`]: progress bars on a terminal;
//! - [`watch`]: the outbox follower;
//! - [`config`]: the node's configuration (file, env, flags);
//! - [`control`]: the local control API (socket protocol, client, server);
//! - [`daemon`]: `alkfs node run`;
//! - [`writer`]: writes go to the node when one runs, else to the engine;
//! - [`logging`]: tracing set-up;
//! - [`mount`]: the filesystem layer and its front-ends (FUSE, SFTP).

pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod logging;
pub mod mount;
pub mod output;
pub mod progress;
pub mod watch;
pub mod writer;

