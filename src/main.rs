//! # alkfs
//!
//! The `alkfs` binary: the command line of alknet-fs.
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
//! - [`logging`]: tracing set-up.

mod cli;
mod commands;
mod config;
mod control;
mod daemon;
mod logging;
mod output;
mod progress;
mod watch;
mod writer;

use clap::Parser;

fn main() {
    // Behave like other Unix tools in a pipeline (`alkfs ls | head`): end quietly on a
    // closed pipe instead of failing on EPIPE.
    // SAFETY: setting a signal disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = cli::Cli::parse();
    if !matches!(cli.command, cli::Command::Node(_)) {
        logging::init("text", "warn");
    }
    if let Err(err) = commands::run(cli) {
        eprintln!("alkfs: error: {err:#}");
        std::process::exit(1);
    }
}
