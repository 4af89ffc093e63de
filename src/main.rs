//! # alkfs
//!
//! The `alkfs` binary: the command line of alknet-fs.
//!
//! - [`cli`]: the commands and flags (clap);
//! - [`commands`]: runs a command against a data dir through the engine;
//! - [`output`]: text and JSON formats;
//! - [`progress`]: progress bars on a terminal;
//! - [`watch`]: the outbox follower.

mod cli;
mod commands;
mod output;
mod progress;
mod watch;

use clap::Parser;

fn main() {
    // Behave like other Unix tools in a pipeline (`alkfs ls | head`): end quietly on a
    // closed pipe instead of failing on EPIPE.
    // SAFETY: setting a signal disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse();
    if let Err(err) = commands::run(cli) {
        eprintln!("alkfs: error: {err:#}");
        std::process::exit(1);
    }
}
