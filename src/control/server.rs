//! The node's side of the control socket.
//!
//! One task per connection, at most [`CONNECTIONS_MAX`] at once (a semaphore); the first
//! frame, and each data frame of a streamed put, must arrive within the client timeout
//! (`node.client_timeout_secs`). Imports (copying and hashing the user's bytes) run on
//! blocking threads in the connection's task, not in the store: the store only commits. A
//! client that disconnects or stalls mid-stream, or a shutdown that comes first, leaves
//! nothing: its staging file is dropped and nothing was committed.
//!
//! **Framing after a failure.** A request with a body (a streamed put) that fails before its
//! end frame was read is answered with the error and its connection closed: the unread data
//! frames must never be parsed as requests. The client reads that answer even when its own
//! writes fail on the closed socket, and prints the node's error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alknet_actors::content::ContentStore;
use alknet_actors::engine::{self, file_entry, mtime_ms, CommitItem, Scope};
use alknet_actors::gc::Retention;
use alknet_actors::node::store::{WriteOp, WriteOutcome};
use alknet_actors::node::{Child, NodeHandle};
use alknet_actors::proto::frame::{self, CONTROL_FRAME_BYTES_MAX, FRAME_HEADER_BYTES};
use alknet_actors::proto::entry::{ContentHash, Entry, EntryKind};
use alknet_actors::proto::membership::Role;
use alknet_actors::proto::ids::VersionRef;
use alknet_actors::proto::path::TreePath;
use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{FailedChange, Reply, Request, Status, WireScope};
use alknet_actors::engine::acked::{Acked, AckedChange};
use alknet_actors::store::acked::Seen;

/// Connections served at once; more wait in the listen backlog.
pub const CONNECTIONS_MAX: usize = 64;
/// An idle connection between requests gets this many client timeouts.
pub const IDLE_TIMEOUTS_BETWEEN_REQUESTS: u32 = 10;
/// First pause after a failed accept (out of file descriptors, say); doubles per failure.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after failed accepts.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long shutdown waits for requests in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Data frames buffered between the socket and a streamed import.
const STREAM_QUEUE_CHUNKS: usize = 8;

/// What request handlers need.
#[derive(Clone)]
pub struct ServerCtx {
    /// The data dir.
    pub dir: PathBuf,
    /// The content store (shared holds with the node's GC).
    pub content: ContentStore,
    /// The actors.
    pub node: NodeHandle,
    /// The node's id.
    pub node_id: String,
    /// When the node started.
    pub started: Instant,
    /// Whether `InjectPanic` is allowed (tests).
    pub fault_injection: bool,
    /// Turns true when the node stops: idle connections close at once.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// How long a client may stay silent before its request or inside a streamed body.
    pub client_timeout: Duration,
    /// The configured retention (for `gc` without flags, and consumers' expiry in status).
    pub retention: Retention,
    /// Mounts' acknowledged changes that did not commit (for `status`).
    pub acked_failures: AckedFailures,
    /// A read connection to the path tree, opened on first use (what a put replaces).
    pub reader: TreeReader,
}

/// A read connection to the path tree shared by the control connections: a put reads the
/// version it will replace when it begins (each read takes microseconds).
#[derive(Clone, Default)]
pub struct TreeReader(Arc<std::sync::Mutex<Option<alknet_actors::store::TreeStore>>>);

impl TreeReader {
    /// What a write of `path` in `scope` beginning now replaces: the branch's own newest
    /// version of it (none when the branch has none, or does not exist: its commit says so).
    /// Read in the calling task: tens of microseconds, which a hop to a blocking thread
    /// would double.
    fn seen_now(&self, dir: &Path, scope: &Scope, path: &TreePath) -> Result<Seen> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(alknet_actors::store::TreeStore::open(&dir.join(alknet_actors::store::TREE_DB_FILE), false)?);
        }
        let tree = slot.as_ref().expect("opened above");
        Ok(Seen::Opened(alknet_actors::store::read::own_head_by_name(tree.conn(), &scope.bucket, &scope.branch, path)?))
    }
}

/// How many of the mounts' acknowledged changes failed to commit since the node started
/// (each is kept by its mount and sent again), and the last reason: `status` shows them.
#[derive(Clone, Default)]
pub struct AckedFailures(Arc<std::sync::Mutex<AckedFailuresSoFar>>);

/// The count, and when the last one failed and why.
type AckedFailuresSoFar = (u64, Option<(i64, String)>);

impl AckedFailures {
    fn note(&self, n: u64, error: &str) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f.0 += n;
        f.1 = Some((engine::now_ms(), error.to_string()));
    }

    /// The count, and when the last one failed and why.
    pub fn get(&self) -> (u64, Option<(i64, String)>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Serves `listener` until `shutdown` resolves, then waits for requests in flight.
pub async fn serve(listener: UnixListener, ctx: ServerCtx, shutdown: impl std::future::Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // Wait for a free slot first (more clients wait in the listen backlog), but never
        // past a shutdown.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    handle(stream, ctx).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of descriptors or memory: retrying at once would spin a core. Pause,
                // longer each time, while connections in flight finish and free what they hold.
                tracing::warn!(error = %e, ?backoff, "accepting a control connection failed; pausing");
                drop(permit);
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("requests still running after {DRAIN_TIMEOUT:?}: abandoning them (nothing half-committed)");
    }
}

async fn read_frame(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    stream.read_exact(&mut header).await?;
    let len = frame::check_header(header, CONTROL_FRAME_BYTES_MAX).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok(payload)
}

/// Serves one connection: requests one after another until the client closes it, a frame is
/// bad, or the client stays silent for the client timeout (first request) or ten of them
/// (later ones). A malformed request gets an error reply and the connection is closed: after
/// garbage the stream cannot be trusted to be in step; likewise a streamed put that failed
/// before its end frame.
async fn handle(mut stream: UnixStream, ctx: ServerCtx) {
    let mut wait = ctx.client_timeout;
    let mut stopping = ctx.stopping.clone();
    loop {
        // Between requests a connection is idle: shutdown closes it at once (no request of
        // its is lost: none was read). A request being served is finished first.
        let read = tokio::select! {
            read = tokio::time::timeout(wait, read_frame(&mut stream)) => read,
            _ = stopping.wait_for(|s| *s) => return,
        };
        let first = match read {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
            Ok(Err(e)) => return tracing::debug!(error = %e, "dropping a control connection: bad frame"),
            Err(_) => return tracing::debug!("dropping a control connection: idle"),
        };
        let error = |e: anyhow::Error| Reply::Error { message: format!("{e:#}") };
        let (reply, in_step) = match serde_json::from_slice::<Request>(&first) {
            Ok(Request::PutStream { scope: s, path: p }) => {
                let mut body = Body { stream: &mut stream, timeout: ctx.client_timeout, stopping: ctx.stopping.clone(), ended: false };
                match put_stream(&ctx, scope(s), &p, &mut body).await {
                    Ok(reply) => (reply, true),
                    Err(e) => {
                        let ended = body.ended;
                        (error(e), ended)
                    }
                }
            }
            Ok(req) => (dispatch(req, &ctx).await.unwrap_or_else(error), true),
            Err(e) => (Reply::Error { message: format!("malformed request: {e}") }, false),
        };
        let mut out = Vec::new();
        frame::encode(&encode_reply(&reply), &mut out);
        if stream.write_all(&out).await.is_err() || !in_step {
            return;
        }
        wait = ctx.client_timeout * IDLE_TIMEOUTS_BETWEEN_REQUESTS;
    }
}

/// The data frames that follow a streamed put: each must come within the client timeout and
/// before a shutdown; `ended` once the empty end frame was read (the connection is then
/// in step again, whatever the put's outcome).
struct Body<'s> {
    stream: &'s mut UnixStream,
    timeout: Duration,
    stopping: tokio::sync::watch::Receiver<bool>,
    ended: bool,
}

impl Body<'_> {
    /// The next chunk of data; `None` at the end frame.
    async fn next(&mut self) -> Result<Option<Vec<u8>>> {
        let read = tokio::select! {
            read = tokio::time::timeout(self.timeout, read_frame(self.stream)) => read,
            _ = self.stopping.wait_for(|s| *s) => bail!("the node is shutting down: nothing was written; retry once it runs again"),
        };
        let frame = match read {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => bail!("the client went away mid-stream ({e}): nothing was written"),
            Err(_) => bail!("no data from the client for {:?}: the put was dropped, nothing was written", self.timeout),
        };
        if frame.is_empty() {
            self.ended = true;
            return Ok(None);
        }
        Ok(Some(frame))
    }
}

/// The reply as JSON, or, when it would not fit in one frame (a merge that touched millions
/// of paths lists them all), an error that says the operation itself completed.
fn encode_reply(reply: &Reply) -> Vec<u8> {
    let bytes = serde_json::to_vec(reply).expect("replies serialise");
    if bytes.len() <= CONTROL_FRAME_BYTES_MAX {
        return bytes;
    }
    let message = format!(
        "the operation completed, but its report ({} bytes) is larger than a control frame; see `alkfs log`, `ls` and `conflicts` for the result",
        bytes.len()
    );
    serde_json::to_vec(&Reply::Error { message }).expect("replies serialise")
}

fn scope(s: WireScope) -> Scope {
    Scope { bucket: s.bucket, branch: s.branch, at: None }
}

fn path(raw: &str) -> Result<TreePath> {
    Ok(TreePath::parse_non_root(raw)?)
}

async fn write(ctx: &ServerCtx, op: WriteOp) -> Result<WriteOutcome> {
    Ok(ctx.node.write(op).await?)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| anyhow!("import task failed: {e}"))?
}

/// Commits one imported file, replacing what `seen` names (what the path held when the put
/// began: a version that arrived while the bytes were coming in is kept, listed).
async fn commit_one(ctx: &ServerCtx, scope: Scope, item: CommitItem, seen: Seen) -> Result<Reply> {
    match write(ctx, WriteOp::PutSeen { scope, item: Box::new(item), seen }).await? {
        WriteOutcome::Seqs(s) => Ok(Reply::Seq { seq: s.first().copied().unwrap_or(0) }),
        other => bail!("unexpected store outcome {other:?}"),
    }
}

/// `mode` of `what`, if it is permission bits only (a request cannot set a file type).
fn check_mode(what: &str, mode: u32) -> Result<u32> {
    if mode > 0o7777 {
        bail!("{what}: mode {mode:o} is not permission bits (at most 7777)");
    }
    Ok(mode)
}

/// A mount's acknowledged changes prepared for their commit, in the order they commit
/// (directories, files, attribute changes), with the staging file of each file that has
/// one (removed once its commit is done); and those refused before any commit.
struct Prepared {
    changes: Vec<AckedChange>,
    staging: Vec<Option<PathBuf>>,
    refused: Vec<FailedChange>,
}

/// Checks each change and makes the blob of each file: small bytes inline, a staging file
/// hashed (unless the mount did) and linked into the content store, where it stays until
/// its commit is done. A staging file already gone means the change was committed by an
/// earlier request whose answer was lost (the commit checks it was).
fn prepare_staged(content: &ContentStore, dirs: &[super::StagedDir], items: &[super::StagedFile], attrs: &[super::StagedAttr]) -> Prepared {
    let mut p = Prepared { changes: Vec::new(), staging: Vec::new(), refused: Vec::new() };
    let mut take = |id: &str, what: Result<(Acked, Option<PathBuf>)>| match what {
        Ok((what, staging)) => {
            p.changes.push(AckedChange { id: id.to_string(), what });
            p.staging.push(staging);
        }
        Err(e) => p.refused.push(FailedChange { id: id.to_string(), error: format!("{e:#}") }),
    };
    for d in dirs {
        take(&d.id, (|| Ok((Acked::Dir { path: path(&d.path)?, mode: check_mode(&d.path, d.mode)?, mtime_ms: d.mtime_ms }, None)))());
    }
    for f in items {
        take(&f.id, prepare_file(content, f));
    }
    for a in attrs {
        take(&a.id, (|| Ok((Acked::Attr { path: TreePath::parse(&a.path)?, mode: a.mode.map(|m| check_mode(&a.path, m)).transpose()?, mtime_ms: a.mtime_ms }, None)))());
    }
    p
}

/// One closed file's blob (see [`prepare_staged`]).
fn prepare_file(content: &ContentStore, f: &super::StagedFile) -> Result<(Acked, Option<PathBuf>)> {
    let dest = path(&f.path)?;
    let hash = match &f.hash {
        Some(h) => Some(ContentHash::from_hex(h).ok_or_else(|| anyhow!("malformed hash {h:?}: 64 hex digits expected"))?),
        None => None,
    };
    let (blob, staging) = match (&f.data, &f.staging) {
        (Some(data), None) => {
            let bytes = data_encoding::BASE64.decode(data.as_bytes()).map_err(|e| anyhow!("{}: malformed bytes: {e}", f.path))?;
            if bytes.len() > alknet_actors::content::INLINE_BYTES_MAX || f.size.is_some_and(|n| n != bytes.len() as u64) {
                bail!("{}: {} bytes sent inline: at most {} and the length written", f.path, bytes.len(), alknet_actors::content::INLINE_BYTES_MAX);
            }
            (content.import_reader(&bytes[..], |_| {})?, None)
        }
        (None, Some(staging)) => {
            let size = f.size.ok_or_else(|| anyhow!("{}: a staging file comes with the length written", f.path))?;
            if !staging.exists() {
                return Ok((Acked::Recorded, None));
            }
            (content.import_staged(staging, hash, size)?, Some(staging.clone()))
        }
        _ => bail!("{}: a closed file carries either its bytes or a staging file", f.path),
    };
    let entry = Entry { kind: EntryKind::File, hash: blob.hash, size: blob.size, mode: f.mode & 0o7777, mtime_ms: f.mtime_ms };
    Ok((Acked::File { path: dest, entry, blob, seen: f.seen.clone() }, staging))
}

/// Commits a mount's acknowledged changes ([`Request::PutStaged`], or the journal of a mount
/// that died): returns those that did not commit, which the mount keeps and sends again.
/// An error means none was looked at (the node is stopping or its store restarting).
pub(crate) async fn put_staged(ctx: &ServerCtx, scope: Scope, dirs: Vec<super::StagedDir>, items: Vec<super::StagedFile>, attrs: Vec<super::StagedAttr>) -> Result<Vec<FailedChange>> {
    let changes = items.len() + attrs.len() + dirs.len();
    if changes > alknet_actors::proto::limits::COMMIT_ENTRIES_MAX {
        bail!("{changes} changes in one commit; the limit is {}", alknet_actors::proto::limits::COMMIT_ENTRIES_MAX);
    }
    let content = ctx.content.clone();
    let Prepared { changes, staging, mut refused } = blocking(move || Ok(prepare_staged(&content, &dirs, &items, &attrs))).await?;
    let ids: Vec<String> = changes.iter().map(|c| c.id.clone()).collect();
    let results = match write(ctx, WriteOp::CommitAcked { scope, changes }).await? {
        WriteOutcome::Acked(r) => r,
        other => bail!("unexpected store outcome {other:?}"),
    };
    for ((id, result), staged) in ids.into_iter().zip(results).zip(staging) {
        match result {
            // Consumed by the commit that recorded it, and only then.
            Ok(_) => {
                if let Some(p) = staged {
                    let _ = std::fs::remove_file(p);
                }
            }
            Err(error) => refused.push(FailedChange { id, error }),
        }
    }
    if !refused.is_empty() {
        for f in &refused {
            tracing::warn!(change = %f.id, error = %f.error, "a mount's change did not commit; it stays staged and is sent again");
        }
        ctx.acked_failures.note(refused.len() as u64, &refused[0].error);
    }
    Ok(refused)
}

async fn dispatch(req: Request, ctx: &ServerCtx) -> Result<Reply> {
    Ok(match req {
        Request::PutFile { scope: s, path: p, src } => {
            let (dest, scope) = (path(&p)?, scope(s));
            let seen = ctx.reader.seen_now(&ctx.dir, &scope, &dest)?;
            let content = ctx.content.clone();
            let item = blocking(move || {
                let meta = std::fs::metadata(&src).with_context(|| src.display().to_string())?;
                if !meta.is_file() {
                    bail!("{}: not a regular file (use -r for a directory)", src.display());
                }
                let blob = content.import_file(&src, |_| {})?;
                let entry = file_entry(&blob, std::os::unix::fs::MetadataExt::mode(&meta) & 0o7777, mtime_ms(&meta));
                Ok((dest, entry, blob))
            })
            .await?;
            commit_one(ctx, scope, item, seen).await?
        }
        Request::PutTree { scope: s, path: p, src } => {
            let dest = path(&p)?;
            let (content, node, scope) = (ctx.content.clone(), ctx.node.clone(), scope(s));
            let rt = tokio::runtime::Handle::current();
            let count = blocking(move || {
                Ok(engine::import_tree(&content, &src, &dest, |items| {
                    rt.block_on(node.write(WriteOp::Commit { scope: scope.clone(), items, attrs: Vec::new() }))
                        .map(|_| ())
                        .map_err(|e| engine::EngineError::Store(alknet_actors::store::StoreError::Invalid(e.to_string())))
                })?)
            })
            .await?;
            Reply::Count { count }
        }
        Request::PutStream { .. } => bail!("internal: streamed puts are served by put_stream"),
        Request::PutStaged { scope: s, items, attrs, dirs } => Reply::Staged { failed: put_staged(ctx, scope(s), dirs, items, attrs).await? },
        Request::Symlink { scope: s, path: p, target } => {
            let dest = path(&p)?;
            if target.is_empty() || target.len() > alknet_actors::proto::limits::SYMLINK_TARGET_BYTES_MAX || target.contains('\0') {
                bail!("a symlink's target must be 1 to {} bytes without NUL", alknet_actors::proto::limits::SYMLINK_TARGET_BYTES_MAX);
            }
            let blob = ctx.content.import_reader(target.as_bytes(), |_| {})?;
            let entry = Entry { kind: EntryKind::Symlink, hash: blob.hash, size: blob.size, mode: 0o777, mtime_ms: engine::now_ms() };
            commit_one(ctx, scope(s), (dest, entry, blob), Seen::AtCommit).await?
        }
        Request::SetAttr { scope: s, path: p, mode, mtime_ms } => match write(ctx, WriteOp::SetAttr { scope: scope(s), path: TreePath::parse(&p)?, mode, mtime_ms }).await? {
            WriteOutcome::Seqs(v) => Reply::Seq { seq: v.first().copied().unwrap_or(0) },
            _ => Reply::Done,
        },
        Request::MoveOver { scope: s, from, to, noreplace } => {
            write(ctx, WriteOp::MoveOver { scope: scope(s), from: path(&from)?, to: path(&to)?, noreplace }).await?;
            Reply::Done
        }
        Request::Remove { scope: s, path: p, recursive } => match write(ctx, WriteOp::Remove { scope: scope(s), path: path(&p)?, recursive }).await? {
            WriteOutcome::Count(count) => Reply::Count { count },
            _ => Reply::Done,
        },
        Request::Rename { scope: s, from, to } => match write(ctx, WriteOp::Rename { scope: scope(s), from: path(&from)?, to: TreePath::parse(&to)? }).await? {
            WriteOutcome::Path(p) => Reply::Path { path: p.to_string() },
            _ => Reply::Done,
        },
        Request::Mkdir { scope: s, path: p, parents, mode } => {
            let mode = check_mode(&p, mode.unwrap_or(alknet_actors::store::tx::DIR_MODE_DEFAULT))?;
            write(ctx, WriteOp::Mkdir { scope: scope(s), path: path(&p)?, parents, mode }).await?;
            Reply::Done
        }
        Request::Restore { scope: s, path: p, version } => match write(ctx, WriteOp::Restore { scope: scope(s), path: path(&p)?, version: VersionRef::parse(&version).map_err(|e| anyhow!(e))? }).await? {
            WriteOutcome::Seqs(v) => Reply::Seq { seq: v.first().copied().unwrap_or(0) },
            _ => Reply::Done,
        },
        Request::BranchCreate { scope: s, name, from } => match write(ctx, WriteOp::CreateBranch { scope: scope(s), name, from }).await? {
            WriteOutcome::Branch(branch) => Reply::Branch { branch },
            _ => Reply::Done,
        },
        Request::BranchDelete { scope: s, name } => {
            write(ctx, WriteOp::DeleteBranch { scope: scope(s), name }).await?;
            Reply::Done
        }
        Request::BucketCreate { name } => {
            write(ctx, WriteOp::CreateBucket { name }).await?;
            Reply::Done
        }
        Request::Merge { scope: s, from, into } => match write(ctx, WriteOp::Merge { scope: scope(s), from, into }).await? {
            WriteOutcome::Merge(report) => Reply::Merge { report },
            _ => Reply::Done,
        },
        Request::Gc { keep_versions, keep_days } => Reply::Gc { report: ctx.node.gc(keep_versions, keep_days).await? },
        Request::ConflictsDismiss { scope: s, path: p } => {
            let path = p.as_deref().map(path).transpose()?;
            match write(ctx, WriteOp::DismissConflicts { scope: scope(s), path }).await? {
                WriteOutcome::Count(count) => Reply::Count { count },
                _ => Reply::Done,
            }
        }
        Request::Status => Reply::Status { status: Box::new(status(ctx).await?) },
        Request::Invite { bucket, expires_ms, uses, read_only } => {
            let role = if read_only { Role::ReadOnly } else { Role::Writer };
            Reply::Ticket { ticket: ctx.node.invite(bucket, expires_ms, uses, role).await? }
        }
        Request::Join { ticket, name } => {
            let joined = ctx.node.join(ticket, name).await?;
            Reply::Joined { bucket: joined.bucket, inviter: joined.inviter }
        }
        Request::Fetch { hash, size } => {
            let hash = alknet_actors::proto::entry::ContentHash::from_hex(&hash).ok_or_else(|| anyhow!("not a content hash: {hash}"))?;
            ctx.node.fetch_now(hash, size).await?;
            Reply::Done
        }
        Request::ReadRange { hash, size, offset, len } => {
            let hash = alknet_actors::proto::entry::ContentHash::from_hex(&hash).ok_or_else(|| anyhow!("not a content hash: {hash}"))?;
            let bytes = ctx.node.read_range(hash, size, offset, len).await?;
            Reply::Data { data: data_encoding::BASE64.encode(&bytes) }
        }
        Request::MembersRemove { bucket, node } => {
            let node = alknet_actors::proto::ids::NodeId::from_hex(&node).ok_or_else(|| anyhow!("{node:?} is not a node id: give all 64 hex digits, as `alkfs members` prints them"))?;
            ctx.node.remove_member(bucket, node).await?;
            Reply::Done
        }
        Request::MembersGrant { bucket, node, role } => {
            let node = alknet_actors::proto::ids::NodeId::from_hex(&node).ok_or_else(|| anyhow!("{node:?} is not a node id: give all 64 hex digits, as `alkfs members` prints them"))?;
            let role = Role::parse(&role).ok_or_else(|| anyhow!("{role:?} is not a role: give read-only, writer or owner"))?;
            ctx.node.grant_role(bucket, node, role).await?;
            Reply::Done
        }
        Request::MembersInvite { bucket, members_invite } => {
            ctx.node.set_invite_policy(bucket, members_invite).await?;
            Reply::Done
        }
        Request::InjectPanic { actor } => {
            if !ctx.fault_injection {
                bail!("fault injection is off (start the node with ALKFS_FAULT_INJECTION=1, for tests only)");
            }
            let child = Child::from_name(&actor).ok_or_else(|| anyhow!("no actor {actor:?}: store, outbox, blobs or gc"))?;
            ctx.node.inject_panic(child)?;
            Reply::Done
        }
    })
}

/// A streamed put: the bytes flow through a bounded channel into a blocking import, which
/// stages them to disk while they arrive. Small content (one data frame, then the end) is
/// imported right here: hashing a few KiB costs less than handing it to a blocking thread.
async fn put_stream(ctx: &ServerCtx, scope: Scope, raw_path: &str, body: &mut Body<'_>) -> Result<Reply> {
    let dest = path(raw_path)?;
    let seen = ctx.reader.seen_now(&ctx.dir, &scope, &dest)?;
    let mut pending = Vec::new();
    match body.next().await? {
        None => return commit_bytes(ctx, scope, dest, &[], seen).await,
        Some(first) if first.len() <= alknet_actors::content::INLINE_BYTES_MAX => match body.next().await? {
            None => return commit_bytes(ctx, scope, dest, &first, seen).await,
            Some(next) => pending.extend([first, next]),
        },
        Some(first) => pending.push(first),
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(STREAM_QUEUE_CHUNKS);
    let content = ctx.content.clone();
    let import = tokio::task::spawn_blocking(move || content.import_reader(ChannelReader::new(rx), |_| {}));
    let mut import_stopped = false;
    for chunk in pending {
        import_stopped = tx.send(Chunk::Data(chunk)).await.is_err();
        if import_stopped {
            break;
        }
    }
    while !import_stopped {
        match body.next().await {
            Ok(Some(chunk)) => import_stopped = tx.send(Chunk::Data(chunk)).await.is_err(), // a failed import: its error is below
            Ok(None) => {
                let _ = tx.send(Chunk::End).await;
                break;
            }
            Err(e) => {
                // Abort the import (its staging file goes with it) before answering.
                let _ = tx.send(Chunk::Abort(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, e.to_string()))).await;
                drop(tx);
                let _ = import.await;
                return Err(e);
            }
        }
    }
    drop(tx);
    let blob = import.await.map_err(|e| anyhow!("import task failed: {e}"))??;
    let entry = file_entry(&blob, engine::FILE_MODE_DEFAULT, engine::now_ms());
    commit_one(ctx, scope, (dest, entry, blob), seen).await
}

/// Imports `bytes` (small) and commits them at `dest`, replacing `seen`.
async fn commit_bytes(ctx: &ServerCtx, scope: Scope, dest: TreePath, bytes: &[u8], seen: Seen) -> Result<Reply> {
    let blob = ctx.content.import_reader(bytes, |_| {})?;
    let entry = file_entry(&blob, engine::FILE_MODE_DEFAULT, engine::now_ms());
    commit_one(ctx, scope, (dest, entry, blob), seen).await
}

async fn status(ctx: &ServerCtx) -> Result<Status> {
    let dir = ctx.dir.clone();
    let active_since_ms = engine::now_ms() - i64::from(ctx.retention.outbox_keep_days) * 86_400_000;
    let (store_bytes, blob_count, blobs_missing, consumers, members) = blocking(move || {
        let tree = alknet_actors::store::TreeStore::open(&dir.join(alknet_actors::store::TREE_DB_FILE), false)?;
        let blobs: i64 = tree.conn().query_row("SELECT count(*) FROM blob", [], |r| r.get(0))?;
        let missing: i64 = tree.conn().query_row("SELECT count(*) FROM blob WHERE present = 0", [], |r| r.get(0))?;
        let consumers = alknet_actors::store::outbox::consumers(tree.conn(), active_since_ms)?;
        let mut members = Vec::new();
        for id in alknet_actors::engine::mesh::shared_bucket_ids(tree.conn())? {
            let bucket: String = tree.conn().query_row("SELECT name FROM bucket WHERE id = ?1", [id], |r| r.get(0))?;
            members.push(super::BucketMembers { bucket, members: alknet_actors::engine::mesh::members(tree.conn(), id)? });
        }
        members.sort_by(|a, b| a.bucket.cmp(&b.bucket));
        Ok((disk_usage(&dir), blobs as u64, missing as u64, consumers, members))
    })
    .await?;
    let (outbox_cursor, outbox_head) = ctx.node.outbox_stats().await?;
    let (acked_failures, acked_last_failure) = ctx.acked_failures.get();
    Ok(Status {
        node_id: ctx.node_id.clone(),
        pid: std::process::id(),
        uptime_secs: ctx.started.elapsed().as_secs(),
        data_dir: ctx.dir.clone(),
        actors: ctx.node.health().await?,
        store_bytes,
        blob_count,
        blobs_missing,
        blobs: ctx.node.blob_stats().await?,
        outbox_cursor,
        outbox_head,
        last_gc: ctx.node.last_gc().await?,
        consumers,
        mesh: ctx.node.mesh_status().await.ok(),
        members,
        acked_failures,
        acked_last_failure,
    })
}

/// Bytes under `dir` (allocated blocks, as `du` counts them).
pub fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        total += if meta.is_dir() { disk_usage(&entry.path()) } else { std::os::unix::fs::MetadataExt::blocks(&meta) * 512 };
    }
    total
}

/// What the connection hands the blocking import of a streamed put.
enum Chunk {
    /// More bytes.
    Data(Vec<u8>),
    /// The client's end frame: the bytes are complete.
    End,
    /// The put was cut short (the client went away or stalled, the node is stopping).
    Abort(std::io::Error),
}

/// Adapts the chunks of a streamed put to `Read`, for the blocking import. Only an explicit
/// [`Chunk::End`] ends the bytes: a channel closed without one (the connection's task was
/// dropped) is an error, so a cut-off stream can never pass for a whole file.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    buf: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl ChannelReader {
    fn new(rx: tokio::sync::mpsc::Receiver<Chunk>) -> Self {
        ChannelReader { rx, buf: Vec::new(), pos: 0, ended: false }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Some(Chunk::End) => self.ended = true,
                Some(Chunk::Abort(e)) => return Err(e),
                None => return Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the streamed put was dropped before its end")),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_too_large_for_a_frame_becomes_an_error_that_says_it_completed() {
        let taken = (0..200_000).map(|i| TreePath::parse(&format!("/a-rather-long-directory-name/file-{i:08}")).unwrap()).collect();
        let report = alknet_actors::store::merge::MergeReport { fast_forward: true, taken, conflicts: vec![], examined: 0 };
        let bytes = encode_reply(&Reply::Merge { report });
        assert!(bytes.len() <= CONTROL_FRAME_BYTES_MAX);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("\"reply\":\"error\"") && text.contains("completed"), "{}", &text[..200.min(text.len())]);
        // A normal reply passes through untouched.
        assert_eq!(encode_reply(&Reply::Done), serde_json::to_vec(&Reply::Done).unwrap());
    }
}
