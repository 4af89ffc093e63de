//! The `alkfs` binary: parses the command line and hands it to [`alknet_fs::commands`].

use alknet_fs::{cli, commands, logging};
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
