//! The command line: what `alkfs` accepts. Parsing only; [`crate::commands`] runs it.

use std::path::PathBuf;

use alknet_actors::proto::ids::VersionRef;
use clap::{Args, Parser, Subcommand};

/// alknet-fs: a peer-to-peer filesystem with branches. Every command acts on one bucket and
/// one branch (`--bucket`, `--branch`).
#[derive(Debug, Parser)]
#[command(name = "alkfs", version, about, max_term_width = 100)]
pub struct Cli {
    /// The data directory [default: $XDG_DATA_HOME/alknet-fs, or ~/.local/share/alknet-fs].
    #[arg(long, global = true, env = "ALKFS_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The bucket (tenant) to act on.
    #[arg(long, global = true, env = "ALKFS_BUCKET", default_value = "default")]
    pub bucket: String,
    /// The branch to act on.
    #[arg(long, global = true, env = "ALKFS_BRANCH", default_value = "main")]
    pub branch: String,
    /// Time travel, for reads (ls, get, log, mount): the branch as it was at a moment
    /// (2026-11-30T10:00:00Z), a while ago (90m, 2h, 7d), or just after a version was
    /// written (17@3f2a9c1b02, as `alkfs log` prints it).
    #[arg(long, global = true, value_name = "TIME|AGO|VERSION")]
    pub at: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a store in the data directory (with bucket `default`, branch `main`).
    Init,
    /// Store a local file (or `-` for stdin; a directory with -r) at PATH.
    Put {
        /// Import a directory tree.
        #[arg(short, long)]
        recursive: bool,
        /// Local source: a file, `-` for stdin, or a directory with -r.
        src: PathBuf,
        /// Destination path in the tree.
        path: String,
    },
    /// Write the file at PATH to DEST, or to stdout.
    Get {
        /// Path in the tree.
        path: String,
        /// Local destination file (stdout when absent).
        dest: Option<PathBuf>,
    },
    /// List a directory (or show a file); -R lists the whole subtree, one line per entry.
    Ls {
        /// Path in the tree.
        #[arg(default_value = "/")]
        path: String,
        /// Everything below PATH: path, kind, size and hash per line.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// Long format: kind, mode, size, mtime, version.
        #[arg(short, long)]
        long: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a file (or a directory tree with -r).
    Rm {
        /// Remove directories and their contents.
        #[arg(short, long)]
        recursive: bool,
        /// Path in the tree.
        path: String,
    },
    /// Move or rename; into DEST when DEST is a directory.
    Mv {
        /// Source path.
        from: String,
        /// Destination path.
        to: String,
    },
    /// Create a directory.
    Mkdir {
        /// Create parents as needed; no error if it exists.
        #[arg(short, long)]
        parents: bool,
        /// Path in the tree.
        path: String,
    },
    /// Show every version of PATH, newest first.
    Log {
        /// Path in the tree.
        path: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Make an old version of PATH current again.
    Restore {
        /// Path in the tree.
        path: String,
        /// The version, as `alkfs log` or `alkfs conflicts` prints it (e.g. 17@3f2a9c1b02; the
        /// same id on every node); a bare number names a version this node wrote.
        #[arg(long, value_parser = parse_version)]
        version: VersionRef,
    },
    /// Create, list or delete branches.
    #[command(subcommand)]
    Branch(BranchCmd),
    /// Create or list buckets.
    #[command(subcommand)]
    Bucket(BucketCmd),
    /// Merge branch FROM into the current branch (or --into).
    Merge {
        /// The branch to merge from.
        from: String,
        /// The branch to merge into [default: --branch].
        #[arg(long)]
        into: Option<String>,
    },
    /// List paths a merge changed on both sides, with the losing version to restore; or
    /// dismiss them (their versions then fall under ordinary retention).
    Conflicts {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Dismiss instead of list.
        #[command(subcommand)]
        action: Option<ConflictsCmd>,
    },
    /// Print a shell completion script: `source <(alkfs completions bash)`, or save it where
    /// your shell looks (e.g. `alkfs completions fish > ~/.config/fish/completions/alkfs.fish`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the stream of committed changes (JSON lines), from this consumer's saved cursor.
    Watch(WatchArgs),
    /// Maintain the content store.
    #[command(subcommand)]
    Blobs(BlobsCmd),
    /// Run the node (the daemon) in the foreground.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Print a ticket (alone on stdout) that lets another node join this bucket.
    Invite {
        /// How long the ticket stays valid (e.g. 30m, 24h, 7d).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        expires: i64,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Admit read-only members: they receive everything, their writes are refused (a
        /// backup machine, a viewer).
        #[arg(long)]
        read_only: bool,
    },
    /// Join the bucket a ticket shares (through the running node); returns once the first
    /// sync has started.
    Join {
        /// The ticket `alkfs invite` printed on the other node.
        ticket: String,
        /// The bucket's name here [default: its name on the inviting node].
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
    },
    /// List the members of the bucket, or remove one (everywhere).
    Members {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Remove instead of list.
        #[command(subcommand)]
        action: Option<MembersCmd>,
    },
    /// Show the running node: id, uptime, actors and restarts, store, blobs, last GC.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show the effective configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Test hooks of a node started with ALKFS_FAULT_INJECTION=1.
    #[command(subcommand, hide = true)]
    Debug(DebugCmd),
    /// Mount the branch at DIR (FUSE) and serve it until unmounted (`alkfs umount DIR`) or
    /// stopped (Ctrl-C). Writes go through the running node; a file being written shows its
    /// old bytes to other readers until its last writer closes it.
    Mount {
        /// An empty directory to mount on.
        dir: PathBuf,
        /// Refuse writes (needs no running node).
        #[arg(long)]
        read_only: bool,
        /// How long the kernel may cache names and attributes. Changes from peers, the CLI
        /// and SFTP are invalidated as they commit; this bounds what a missed one leaves.
        #[arg(long, default_value_t = crate::mount::fuse::ATTR_TTL.as_secs(), value_parser = clap::value_parser!(u64).range(0..=86_400))]
        cache_secs: u64,
        /// Do not keep a CPU awake through bursts of requests. By default a thread of the
        /// lowest weight (nice 19) spins while requests keep coming (and 1 ms after), which
        /// makes each request several times cheaper where waking an idle CPU is slow
        /// (virtual machines); it yields to any other work, but keeps that CPU busy.
        #[arg(long)]
        no_poll: bool,
        /// Show every symlink's target as stored. By default a mount shows links inside the
        /// bucket (an absolute target names a path of the bucket, `..` stops at its root),
        /// so a link a member wrote cannot lead programs here to a file outside the mount.
        #[arg(long)]
        outside_links: bool,
        /// Let other users of this machine reach the mount (FUSE's `allow_other`; for a user
        /// other than root, `/etc/fuse.conf` must say `user_allow_other`). By default only the
        /// mounting user and root reach it.
        #[arg(long)]
        allow_other: bool,
    },
    /// Unmounts DIR once standard input ends (the mount process that started it died): what
    /// a mount by a user other than root leaves behind to unmount itself.
    #[command(hide = true)]
    UnmountWhenGone {
        /// The mount point.
        dir: PathBuf,
    },
    /// Serve the store to other programs.
    #[command(subcommand)]
    Serve(ServeCmd),
    /// Manage who may log in to `alkfs serve sftp`.
    #[command(subcommand)]
    Sftp(SftpCmd),
    /// Unmount a mount made by `alkfs mount`.
    Umount {
        /// The mount point.
        dir: PathBuf,
    },
    /// Prune history past the retention policy and free blobs nothing references.
    /// A version survives if it is among the newest --keep-versions of its path or younger
    /// than --keep-days; give one flag alone to use only that rule.
    Gc {
        /// Old versions kept per path besides the current one.
        #[arg(long)]
        keep_versions: Option<u32>,
        /// Keep old versions younger than this many days.
        #[arg(long)]
        keep_days: Option<u32>,
    },
}

/// Conflicts subcommands.
#[derive(Debug, Subcommand)]
pub enum ConflictsCmd {
    /// Take a listed conflict off the list once you have looked at it (or all with --all).
    /// Until dismissed, the losing version stays restorable whatever the retention.
    Dismiss {
        /// The conflicted path.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        path: Option<String>,
        /// Dismiss every conflict listed on the branch.
        #[arg(long)]
        all: bool,
    },
}

/// Members subcommands.
#[derive(Debug, Subcommand)]
pub enum MembersCmd {
    /// Remove a member from the bucket on every node: it is refused on every protocol.
    Remove {
        /// Its node id (as `alkfs members` or its `alkfs status` shows it).
        node: String,
    },
    /// Give a member a role on every node: read-only (receives, may not write), writer, or
    /// owner (admits, removes, grants). An owner stays one.
    Grant {
        /// Its node id (as `alkfs members` shows it).
        node: String,
        /// read-only, writer or owner.
        role: String,
    },
    /// Say who may invite to the bucket on every node: `owners` (the default) or `writers`
    /// too (a writer's ticket admits a writer or a read-only member). Back to `owners`, the
    /// members writers admitted so far stay; later ones fall.
    Invites {
        /// owners or writers.
        who: String,
    },
}

/// Serve subcommands.
#[derive(Debug, Subcommand)]
pub enum ServeCmd {
    /// An SFTP server (for OpenSSH's sftp, sshfs, rclone): log in as a bucket's name with a
    /// key `alkfs sftp allow` authorised; serves --branch. Writes go through the running node.
    Sftp {
        /// Address and port to listen on.
        #[arg(long, default_value = "127.0.0.1:2222")]
        listen: std::net::SocketAddr,
    },
}

/// SFTP access subcommands.
#[derive(Debug, Subcommand)]
pub enum SftpCmd {
    /// Let the holder of a key log in to BUCKET over SFTP.
    Allow {
        /// The bucket.
        bucket: String,
        /// An OpenSSH public key file (e.g. ~/.ssh/id_ed25519.pub).
        pubkey_file: PathBuf,
    },
    /// Take a key off BUCKET's list (a .pub file, or the SHA256: fingerprint `list` shows).
    Revoke {
        /// The bucket.
        bucket: String,
        /// The key's .pub file or fingerprint.
        key: String,
    },
    /// List the keys allowed, per bucket.
    List,
}

/// Node subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Run the node in the foreground until SIGINT/SIGTERM.
    Run {
        /// Log format (overrides log.format).
        #[arg(long, value_parser = ["text", "json"])]
        log_format: Option<String>,
        /// Override a setting, as section.key=value (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// Where the node listens for peers (overrides net.listen), e.g. 0.0.0.0:4919.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Relay for peers behind NAT: default (n0's), disabled (nothing leaves the listen
        /// address: LANs, tests), or a relay URL (overrides net.relay).
        #[arg(long, value_name = "default|disabled|URL")]
        relay: Option<String>,
    },
}

/// Config subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration (file, then env, then --set).
    Show {
        /// Override a setting, as section.key=value (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
    },
}

/// Test hooks.
#[derive(Debug, Subcommand)]
pub enum DebugCmd {
    /// Make an actor of the running node panic (store, outbox, blobs or gc).
    InjectPanic {
        /// The actor.
        actor: String,
    },
}

/// Blob subcommands.
#[derive(Debug, Subcommand)]
pub enum BlobsCmd {
    /// Add blobs not yet indexed to the iroh-blobs store (for verified streaming to peers).
    Index,
    /// Re-hash every blob and report any that is missing or corrupt (reads the whole store).
    Check,
}

/// Branch subcommands.
#[derive(Debug, Subcommand)]
pub enum BranchCmd {
    /// Create a branch (free: copies nothing).
    Create {
        /// Its name.
        name: String,
        /// The branch to fork from [default: --branch].
        #[arg(long)]
        from: Option<String>,
    },
    /// List branches.
    List,
    /// Delete a branch.
    Delete {
        /// Its name.
        name: String,
    },
}

/// Bucket subcommands.
#[derive(Debug, Subcommand)]
pub enum BucketCmd {
    /// Create a bucket with its `main` branch.
    Create {
        /// Its name.
        name: String,
    },
    /// List buckets.
    List,
}

/// Options of `watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The consumer whose cursor to read and advance.
    #[arg(long, default_value = "watch")]
    pub consumer: String,
    /// Print what is pending and exit instead of following.
    #[arg(long)]
    pub once: bool,
}

fn parse_version(s: &str) -> Result<VersionRef, String> {
    VersionRef::parse(s)
}

fn parse_duration(s: &str) -> Result<i64, String> {
    alknet_actors::proto::ticket::parse_duration_ms(s)
}
