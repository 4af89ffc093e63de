//! Runs one parsed command against a data directory: opens the engine with the access the
//! command needs (writers take the lock, readers do not), and prints results.

use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};

use alknet_actors::engine::{Access, Engine, Scope};
use alknet_actors::proto::clock::Stamp;
use alknet_actors::proto::ids::{OrderKey, VersionId, VersionRef};
use alknet_actors::proto::path::TreePath;
use anyhow::{bail, Context, Result};

use crate::cli::{BlobsCmd, BranchCmd, BucketCmd, Cli, Command, ConfigCmd, ConflictsCmd, DebugCmd, MembersCmd, NodeCmd, ServeCmd, SftpCmd};
use crate::control::client::Client;
use crate::control::{Reply, Request};
use crate::output;
use crate::progress::Progress;
use crate::writer::Writer;

/// The data dir: `--data`, `$ALKFS_DATA`, or the XDG data dir.
pub fn data_dir(cli: &Cli) -> Result<PathBuf> {
    if let Some(d) = &cli.data {
        return Ok(d.clone());
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("alknet-fs"));
    }
    let home = std::env::var_os("HOME").context("neither --data, ALKFS_DATA, XDG_DATA_HOME nor HOME is set: pass --data DIR")?;
    Ok(PathBuf::from(home).join(".local/share/alknet-fs"))
}

fn tree_path(raw: &str) -> Result<TreePath> {
    Ok(TreePath::parse(raw)?)
}

fn file_path(raw: &str) -> Result<TreePath> {
    Ok(TreePath::parse_non_root(raw)?)
}

/// Runs `cli`.
/// A connection to the running node, for commands only a node can do (they use its network).
fn node_client(dir: &Path, what: &str) -> Result<Client> {
    Client::connect(dir).with_context(|| format!("`alkfs {what}` needs the running node (it uses the node's network): start it with `alkfs --data {} node run`", dir.display()))
}

/// The point `--at` names, as a bound on the order of versions: a time (RFC 3339), a while
/// ago (`90m`, `2h`, `7d`), or a version id (the branch just after it was written).
pub(crate) fn at_key(dir: &Path, raw: &str) -> Result<OrderKey> {
    let is_version = raw.contains('@') || raw.strip_prefix('v').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if is_version {
        let version = VersionRef::parse(raw).map_err(|e| anyhow::anyhow!(e))?;
        return Ok(Engine::open(dir, Access::Read)?.key_of_version(&version)?);
    }
    let ms = if let Ok(t) = chrono::DateTime::parse_from_rfc3339(raw) {
        t.timestamp_millis()
    } else if let Ok(ago) = alknet_actors::proto::ticket::parse_duration_ms(raw) {
        alknet_actors::engine::now_ms() - ago
    } else {
        bail!("--at {raw:?}: give a time (2026-11-30T10:00:00Z), a while ago (90m, 2h, 7d) or a version (17@3f2a9c1b02, as `alkfs log` prints it)");
    };
    Ok(OrderKey::upto(Stamp { ms, counter: u32::MAX }))
}

pub fn run(cli: Cli) -> Result<()> {
    let dir = data_dir(&cli)?;
    let at = match &cli.at {
        Some(raw) => {
            if !matches!(cli.command, Command::Get { .. } | Command::Ls { .. } | Command::Log { .. } | Command::Mount { .. }) {
                bail!("--at reads the past: it goes with ls, get, log and mount, not with this command");
            }
            Some(at_key(&dir, raw)?)
        }
        None => None,
    };
    let scope = Scope::new(&cli.bucket, &cli.branch).at(at);
    let out = io::stdout();
    let mut out = BufWriter::new(out.lock());
    match cli.command {
        Command::Init => {
            if Engine::init(&dir)? {
                writeln!(out, "initialised an alknet-fs store at {}", dir.display())?;
            } else {
                writeln!(out, "a store is already initialised at {}", dir.display())?;
            }
        }
        Command::Put { recursive, src, path } => put(&dir, &scope, recursive, &src, &path)?,
        Command::Get { path, dest } => {
            let engine = Engine::open(&dir, Access::Read)?;
            let path = file_path(&path)?;
            let entry = engine.file_entry(&scope, &path)?;
            if !engine.has_bytes(&entry.hash)? {
                // A version that came from a peer before its bytes: fetch them now, and wait.
                let client = Client::connect(&dir).with_context(|| format!("{path}: its bytes are still on a peer; start the node to fetch them (`alkfs --data {} node run`)", dir.display()))?;
                let spinner = Progress::count("fetching from peers");
                let reply = client.call(&Request::Fetch { hash: entry.hash.to_hex(), size: entry.size })?;
                spinner.finish();
                if let Reply::Error { message } = reply {
                    bail!("{path}: could not fetch its bytes: {message}");
                }
            }
            let mut bar = Progress::bytes(entry.size, "get");
            match dest {
                Some(dest) => {
                    let dest = if dest.is_dir() { dest.join(path.name()) } else { dest };
                    engine.export(&scope, &path, &dest, |n| bar.set(n))?;
                }
                None => {
                    engine.read_entry(&entry, &mut out, |n| bar.set(n))?;
                }
            }
            bar.finish();
        }
        Command::Ls { path, recursive: true, json, .. } => {
            let engine = Engine::open(&dir, Access::Read)?;
            let rows = engine.walk(&scope, &tree_path(&path)?)?;
            output::walk(&mut out, &rows, json)?;
        }
        Command::Ls { path, long: false, json: false, .. } => {
            let engine = Engine::open(&dir, Access::Read)?;
            output::names(&mut out, &engine.list_names(&scope, &tree_path(&path)?)?)?;
        }
        Command::Ls { path, long, json, .. } => {
            let engine = Engine::open(&dir, Access::Read)?;
            let rows = engine.list(&scope, &tree_path(&path)?)?;
            output::list(&mut out, &rows, long, json)?;
        }
        Command::Invite { expires, uses, read_only } => {
            let client = node_client(&dir, "invite")?;
            match client.call(&Request::Invite { bucket: scope.bucket.clone(), expires_ms: expires, uses, read_only })? {
                Reply::Ticket { ticket } => writeln!(out, "{ticket}")?,
                Reply::Error { message } => bail!(message),
                other => bail!("unexpected reply to invite: {other:?}"),
            }
        }
        Command::Join { ticket, as_name } => {
            alknet_actors::proto::ticket::Ticket::decode(&ticket)?;
            let client = node_client(&dir, "join")?;
            match client.call(&Request::Join { ticket, name: as_name })? {
                Reply::Joined { bucket, inviter } => {
                    writeln!(out, "joined bucket {bucket} (invited by {}); syncing", &inviter[..alknet_actors::proto::ids::NODE_SHORT_HEX.min(inviter.len())])?
                }
                Reply::Error { message } => bail!(message),
                other => bail!("unexpected reply to join: {other:?}"),
            }
        }
        Command::Members { json, action: None } => {
            let engine = Engine::open(&dir, Access::Read)?;
            let bucket = engine.bucket_identity(&scope.bucket)?;
            let members = alknet_actors::engine::mesh::members(engine.tree().conn(), bucket.id)?;
            let members_invite = alknet_actors::engine::mesh::members_invite(engine.tree().conn(), bucket.id)?;
            output::members(&mut out, &members, members_invite, &engine.tree().me(), json)?;
        }
        Command::Members { action: Some(MembersCmd::Remove { node }), .. } => {
            let client = node_client(&dir, "members remove")?;
            match client.call(&Request::MembersRemove { bucket: scope.bucket.clone(), node: node.clone() })? {
                Reply::Done => writeln!(out, "removed {node} from bucket {}", scope.bucket)?,
                Reply::Error { message } => bail!(message),
                other => bail!("unexpected reply: {other:?}"),
            }
        }
        Command::Members { action: Some(MembersCmd::Grant { node, role }), .. } => {
            let client = node_client(&dir, "members grant")?;
            match client.call(&Request::MembersGrant { bucket: scope.bucket.clone(), node: node.clone(), role: role.clone() })? {
                Reply::Done => writeln!(out, "{node} is now {role} in bucket {}", scope.bucket)?,
                Reply::Error { message } => bail!(message),
                other => bail!("unexpected reply: {other:?}"),
            }
        }
        Command::Members { action: Some(MembersCmd::Invites { who }), .. } => {
            let members_invite = match who.as_str() {
                "owners" => false,
                "writers" => true,
                _ => bail!("{who:?}: say `owners` (only owners invite) or `writers` (writers too)"),
            };
            let client = node_client(&dir, "members invites")?;
            match client.call(&Request::MembersInvite { bucket: scope.bucket.clone(), members_invite })? {
                Reply::Done => writeln!(out, "in bucket {}, {} may invite", scope.bucket, if members_invite { "owners and writers" } else { "only owners" })?,
                Reply::Error { message } => bail!(message),
                other => bail!("unexpected reply: {other:?}"),
            }
        }
        Command::Rm { recursive, path } => {
            let n = Writer::open(&dir)?.remove(&scope, &file_path(&path)?, recursive)?;
            tracing::debug!(paths = n, "removed");
        }
        Command::Mv { from, to } => {
            Writer::open(&dir)?.rename(&scope, &file_path(&from)?, &tree_path(&to)?)?;
        }
        Command::Mkdir { parents, path } => Writer::open(&dir)?.mkdir(&scope, &file_path(&path)?, parents)?,
        Command::Log { path, json } => {
            let engine = Engine::open(&dir, Access::Read)?;
            let rows = engine.log(&scope, &file_path(&path)?)?;
            output::log(&mut out, &engine, &rows, json)?;
        }
        Command::Restore { path, version } => {
            let seq = Writer::open(&dir)?.restore(&scope, &file_path(&path)?, &version)?;
            let me = Engine::open(&dir, Access::Read)?.tree().me();
            writeln!(out, "restored {path} from version {version} as version {}", VersionId { node: me, seq })?;
        }
        Command::Branch(cmd) => branch(&dir, &scope, cmd, &mut out)?,
        Command::Bucket(BucketCmd::Create { name }) => Writer::open(&dir)?.create_bucket(&name)?,
        Command::Bucket(BucketCmd::List) => {
            for name in Engine::open(&dir, Access::Read)?.tree().buckets()? {
                writeln!(out, "{name}")?;
            }
        }
        Command::Merge { from, into } => {
            let report = Writer::open(&dir)?.merge(&scope, &from, into.as_deref())?;
            output::merge(&mut out, &from, into.as_deref().unwrap_or(&scope.branch), &report)?;
        }
        Command::Conflicts { json, action: None } => {
            let engine = Engine::open(&dir, Access::Read)?;
            output::conflicts(&mut out, &engine.conflicts(&scope)?, json)?;
        }
        Command::Conflicts { action: Some(ConflictsCmd::Dismiss { path, all }), .. } => {
            let path = if all { None } else { path.as_deref().map(file_path).transpose()? };
            let n = Writer::open(&dir)?.dismiss_conflicts(&scope, path.as_ref())?;
            writeln!(out, "dismissed {n} conflict{}", if n == 1 { "" } else { "s" })?;
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "alkfs", &mut out);
        }
        Command::Blobs(BlobsCmd::Index) => {
            let report = Writer::open(&dir)?.index_blobs()?;
            blob_report(&mut out, "indexed", &report)?;
        }
        Command::Blobs(BlobsCmd::Check) => {
            let engine = Engine::open(&dir, Access::Read)?;
            let mut bar = Progress::count("checking blobs");
            let report = engine.check_blobs(|n| bar.set(n))?;
            bar.finish();
            blob_report(&mut out, "intact", &report)?;
        }
        Command::Gc { keep_versions, keep_days } => {
            let configured = crate::config::Config::load(&dir, &[])?.retention();
            let report = Writer::open(&dir)?.gc(configured, keep_versions, keep_days)?;
            writeln!(
                out,
                "gc: freed {} blobs ({} bytes), pruned {} old versions and {} outbox events; {} blobs live; {} ms",
                report.blobs_freed, report.bytes_freed, report.versions_pruned, report.events_pruned, report.blobs_live, report.took_ms
            )?;
        }
        Command::Node(NodeCmd::Run { log_format, set, listen, relay }) => {
            drop(out);
            // A node on a fresh machine starts on its embedded defaults: make the store.
            if Engine::check_initialised(&dir).is_err() && Engine::init(&dir)? {
                eprintln!("initialised an alknet-fs store at {}", dir.display());
            }
            let mut set = set;
            if let Some(l) = listen {
                set.push(format!("net.listen={l}"));
            }
            if let Some(r) = relay {
                set.push(format!("net.relay={r}"));
            }
            let mut config = crate::config::Config::load(&dir, &set)?;
            if let Some(f) = log_format {
                config.log.format = f;
            }
            crate::logging::init(&config.log.format, "info");
            let code = crate::daemon::run(&dir, &config)?;
            std::process::exit(code);
        }
        Command::Status { json } => {
            let client = Client::connect(&dir).with_context(|| format!("no node is running on {}: start one with `alkfs --data {} node run`", dir.display(), dir.display()))?;
            let Reply::Status { status } = client.call(&Request::Status)? else { bail!("unexpected reply to status") };
            output::status(&mut out, &status, json)?;
        }
        Command::Config(ConfigCmd::Show { set }) => {
            let config = crate::config::Config::load(&dir, &set)?;
            write!(out, "{}", toml::to_string(&config)?)?;
        }
        Command::Debug(DebugCmd::InjectPanic { actor }) => {
            let client = Client::connect(&dir).context("no node is running")?;
            client.call(&Request::InjectPanic { actor })?;
        }
        Command::Mount { dir: mountpoint, read_only, cache_secs, no_poll, outside_links, allow_other } => {
            drop(out);
            crate::logging::init("text", "info");
            let fs = crate::mount::fs::MountFs::open(&dir, scope, read_only)?;
            let options = crate::mount::fuse::MountOptions { ttl: std::time::Duration::from_secs(cache_secs), poll: !no_poll, outside_links, allow_other };
            // Said once the kernel has the mount, not before.
            let said = || eprintln!("mounted {}:{} at {} (unmount with `alkfs umount {}`)", cli.bucket, cli.branch, mountpoint.display(), mountpoint.display());
            crate::mount::fuse::serve(fs, &mountpoint, options, said)?;
            return Ok(());
        }
        Command::UnmountWhenGone { dir: mountpoint } => {
            drop(out);
            crate::mount::unmount_when_gone(&mountpoint);
            return Ok(());
        }
        Command::Serve(ServeCmd::Sftp { listen }) => {
            drop(out);
            crate::logging::init("text", "info");
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(crate::mount::sftp::serve(&dir, &cli.branch, listen))?;
            return Ok(());
        }
        Command::Sftp(SftpCmd::Allow { bucket, pubkey_file }) => {
            let fingerprint = crate::mount::sftp::allow(&dir, &bucket, &pubkey_file)?;
            writeln!(out, "allowed {fingerprint} on bucket {bucket}")?;
        }
        Command::Sftp(SftpCmd::Revoke { bucket, key }) => {
            let n = crate::mount::sftp::revoke(&dir, &bucket, &key)?;
            writeln!(out, "revoked {n} key(s) on bucket {bucket}")?;
        }
        Command::Sftp(SftpCmd::List) => {
            for k in crate::mount::sftp::allowed_keys(&dir)? {
                writeln!(out, "{}\t{}\t{}", k.bucket, k.key.fingerprint(russh::keys::ssh_key::HashAlg::Sha256), k.key.comment())?;
            }
        }
        Command::Umount { dir: mountpoint } => crate::mount::unmount(&mountpoint)?,
        Command::Watch(args) => {
            drop(out);
            crate::watch::run(&dir, &args)?;
            return Ok(());
        }
    }
    out.flush()?;
    Ok(())
}

fn blob_report(out: &mut impl Write, verb: &str, report: &alknet_actors::engine::BlobReport) -> Result<()> {
    writeln!(out, "{} blobs {verb}, {} failed", report.ok, report.failed.len())?;
    for (hash, why) in &report.failed {
        writeln!(out, "{hash}: {why}")?;
    }
    out.flush()?;
    if !report.failed.is_empty() {
        bail!("{} blobs failed; see above", report.failed.len());
    }
    Ok(())
}


fn put(dir: &Path, scope: &Scope, recursive: bool, src: &Path, path: &str) -> Result<()> {
    let dest = file_path(path)?;
    let mut engine = Writer::open(dir)?;
    if src == Path::new("-") {
        if recursive {
            bail!("put -r reads a directory, not stdin: drop -r or name a directory");
        }
        let mut bar = Progress::bytes(0, "put");
        engine.put_reader(scope, io::stdin().lock(), &dest, |n| bar.set(n))?;
        bar.finish();
        return Ok(());
    }
    let meta = std::fs::metadata(src).with_context(|| format!("{}", src.display()))?;
    if meta.is_dir() {
        if !recursive {
            bail!("{} is a directory: use put -r to import a directory tree", src.display());
        }
        let mut bar = Progress::count("put -r");
        let n = engine.put_tree(scope, src, &dest, |n| bar.set(n))?;
        bar.finish();
        tracing::debug!(entries = n, "imported tree");
        return Ok(());
    }
    let mut bar = Progress::bytes(meta.len(), "put");
    engine.put_file(scope, src, &dest, |n| bar.set(n))?;
    bar.finish();
    Ok(())
}

fn branch(dir: &Path, scope: &Scope, cmd: BranchCmd, out: &mut impl Write) -> Result<()> {
    match cmd {
        BranchCmd::Create { name, from } => {
            let b = Writer::open(dir)?.create_branch(scope, &name, from.as_deref())?;
            writeln!(out, "created branch {} from {} at {}", b.name, from.as_deref().unwrap_or(&scope.branch), output::fork_point(&b))?;
        }
        BranchCmd::List => {
            let engine = Engine::open(dir, Access::Read)?;
            let all = engine.tree().branches(&scope.bucket)?;
            for b in &all {
                let parent = b.parent_id.and_then(|p| all.iter().find(|x| x.id == p)).map(|p| p.name.as_str());
                match parent {
                    Some(p) => writeln!(out, "{}\t(from {p} at {})", b.name, output::fork_point(b))?,
                    None if b.parent_id.is_some() => writeln!(out, "{}\t(from a deleted branch at {})", b.name, output::fork_point(b))?,
                    None => writeln!(out, "{}", b.name)?,
                }
            }
        }
        BranchCmd::Delete { name } => Writer::open(dir)?.delete_branch(scope, &name)?,
    }
    Ok(())
}

/// True when progress bars should be drawn.
pub fn stderr_is_terminal() -> bool {
    io::stderr().is_terminal()
}
