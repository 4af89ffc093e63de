//! The path-tree store actor: the node's one SQLite writer.
//!
//! The actor is a thin shell: it forwards each write to a dedicated thread that owns the
//! [`Engine`] (blocking SQLite work stays off the async executor). The thread batches: when
//! it picks up a commit it also takes every commit already queued, up to
//! [`NodeConfig::batch_max`](super::NodeConfig), waiting at most `batch_delay` for more, and
//! writes them in one transaction; each caller is answered only after that transaction
//! committed, so "visible only after commit" holds for every caller. If the shared
//! transaction fails, the batch is retried one commit at a time, so one bad request cannot
//! fail its neighbours. Other writes (merges, branch operations, GC) run alone.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::{outbox::OutboxMsg, Child, Names, NodeContext};
use crate::engine::{import::commit_changes, now_ms, AttrItem, CommitItem, Engine, Scope};
use crate::gc::{GcReport, Retention};
use crate::proto::ids::VersionRef;
use crate::proto::path::TreePath;
use crate::store::merge::MergeReport;
use crate::store::Branch;

/// A write the store performs. Each variant's fields are the arguments of the [`Engine`]
/// method of the same name, documented there.
#[derive(Debug)]
#[allow(missing_docs)]
pub enum WriteOp {
    /// Commit already imported blobs as entries (batchable).
    Commit {
        /// Where.
        scope: Scope,
        /// What.
        items: Vec<CommitItem>,
        /// Attribute changes, after the items, in the same transaction.
        attrs: Vec<AttrItem>,
    },
    /// Commit changes a mount acknowledged before they commit (see `engine::acked`); the
    /// outcome is one answer per change.
    CommitAcked { scope: Scope, changes: Vec<crate::engine::acked::AckedChange> },
    /// Commit one imported file, replacing what its writer saw when it began (batchable).
    PutSeen { scope: Scope, item: Box<CommitItem>, seen: crate::store::acked::Seen },
    /// Remove a path.
    Remove { scope: Scope, path: TreePath, recursive: bool },
    /// Rename (into a directory when the target is one).
    Rename { scope: Scope, from: TreePath, to: TreePath },
    /// Move to exactly a path, replacing a file or an empty directory there.
    MoveOver { scope: Scope, from: TreePath, to: TreePath, noreplace: bool },
    /// Set the mode and/or mtime, keeping the bytes.
    SetAttr { scope: Scope, path: TreePath, mode: Option<u32>, mtime_ms: Option<i64> },
    /// Create a directory.
    Mkdir { scope: Scope, path: TreePath, parents: bool, mode: u32 },
    /// Make an old version current.
    Restore { scope: Scope, path: TreePath, version: VersionRef },
    /// Create a branch.
    CreateBranch { scope: Scope, name: String, from: Option<String> },
    /// Delete a branch.
    DeleteBranch { scope: Scope, name: String },
    /// Create a bucket.
    CreateBucket { name: String },
    /// Merge a branch into another.
    Merge { scope: Scope, from: String, into: Option<String> },
    /// Take conflicts off the list (one path, or all).
    DismissConflicts { scope: Scope, path: Option<TreePath> },
    /// Collect garbage.
    Gc { policy: Retention },
    /// Record blobs as held by the iroh-blobs index.
    MarkIndexed { hashes: Vec<crate::proto::entry::ContentHash> },
    /// The store's half of the mesh (documents, membership).
    Mesh(crate::engine::mesh::MeshOp),
}

impl WriteOp {
    /// Whether the writer may commit it in one transaction with others like it (commits of
    /// imported files, which arrive many at a time).
    fn batches(&self) -> bool {
        matches!(self, WriteOp::Commit { .. } | WriteOp::PutSeen { .. })
    }
}

/// What a write produced.
#[derive(Debug)]
pub enum WriteOutcome {
    /// Seqs of committed entries.
    Seqs(Vec<i64>),
    /// A count of paths.
    Count(u64),
    /// A path (the target of a rename).
    Path(TreePath),
    /// A new branch.
    Branch(Branch),
    /// A merge's report.
    Merge(MergeReport),
    /// Per acknowledged change, what it wrote or why it did not commit.
    Acked(Vec<Result<i64, String>>),
    /// A collection's report.
    Gc(GcReport),
    /// The mesh's answer.
    Mesh(crate::engine::mesh::MeshReply),
    /// Nothing to report.
    Done,
}

/// The reply to a write: its outcome or the error message for the user.
pub type WriteResult = Result<WriteOutcome, String>;

/// Messages of the store actor.
pub enum StoreMsg {
    /// Perform a write and answer after it committed.
    Write(WriteOp, RpcReplyPort<WriteResult>),
    /// A direct line to this actor's writer thread, valid while this actor lives.
    Writer(RpcReplyPort<StoreWriter>),
    /// The writer thread ended (it panicked, or its engine failed): fail, so the supervisor
    /// restarts the store.
    WriterDied,
    /// Fault injection (tests only, when the node allows it): panic in the handler.
    Panic,
}

/// A direct line to the writer thread, skipping the actor's mailbox on the hot path (the
/// handle pattern of iroh-docs). It dies with the actor that handed it out: the thread
/// refuses jobs once that actor is gone, handing each job back untouched, and the caller
/// asks the restarted actor for a new line.
#[derive(Clone)]
pub struct StoreWriter {
    jobs: Sender<Job>,
}

/// What the writer answers a direct job: the write's result, or the job back when this
/// writer is shutting down and did not touch it (safe to send again elsewhere).
pub type DirectResult = Result<WriteResult, WriteOp>;

impl StoreWriter {
    /// Sends `op`; the answer arrives after commit. `Err(op)` when this writer is gone.
    // The op is handed back whole so the caller can send it elsewhere; boxing it would cost
    // an allocation on every write for the rare shutdown case.
    #[allow(clippy::result_large_err)]
    pub fn send(&self, op: WriteOp) -> Result<tokio::sync::oneshot::Receiver<DirectResult>, WriteOp> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.jobs.send(Job { op, reply: ReplyTo::Direct(tx) }) {
            Ok(()) => Ok(rx),
            Err(mpsc::SendError(job)) => Err(job.op),
        }
    }
}

/// The store actor.
pub struct StoreActor;

/// Its state: the channel to the writer thread, the thread's liveness flag, and the slot
/// (shared with the next incarnation of this actor) that holds the thread's handle.
pub struct StoreState {
    jobs: Option<Sender<Job>>,
    thread: WriterThread,
    alive: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// The handle of the store's writer thread, kept across restarts of the store actor: a new
/// store waits for the old writer to finish the job in hand before it opens the database, so
/// two writers never overlap (a store that failed does not run `post_stop`).
pub type WriterThread = std::sync::Arc<std::sync::Mutex<Option<JoinHandle<()>>>>;

/// Waits (off the executor) until the writer thread in `slot`, if any, has ended.
async fn join_writer(slot: &WriterThread) {
    let old = slot.lock().expect("writer thread slot").take();
    if let Some(old) = old {
        let _ = tokio::task::spawn_blocking(move || old.join()).await;
    }
}

impl Drop for StoreState {
    /// However the actor ends (stop, panic, kill), its writer stops taking jobs.
    fn drop(&mut self) {
        self.alive.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Where a job's answer goes.
enum ReplyTo {
    Port(RpcReplyPort<WriteResult>),
    Direct(tokio::sync::oneshot::Sender<DirectResult>),
}

struct Job {
    op: WriteOp,
    reply: ReplyTo,
}

impl ReplyTo {
    fn answer(self, result: WriteResult) {
        match self {
            ReplyTo::Port(p) => {
                let _ = p.send(result);
            }
            ReplyTo::Direct(tx) => {
                let _ = tx.send(Ok(result));
            }
        }
    }
}

impl Job {
    fn answer(self, result: WriteResult) {
        self.reply.answer(result);
    }

    /// Refuses the job untouched (the writer is shutting down).
    fn refuse(self) {
        match self.reply {
            ReplyTo::Port(p) => {
                let _ = p.send(Err("the store is restarting; retry".into()));
            }
            ReplyTo::Direct(tx) => {
                let _ = tx.send(Err(self.op));
            }
        }
    }
}

impl Actor for StoreActor {
    type Msg = StoreMsg;
    type State = StoreState;
    type Arguments = NodeContext;

    async fn pre_start(&self, me: ActorRef<StoreMsg>, ctx: NodeContext) -> Result<StoreState, ActorProcessingErr> {
        join_writer(&ctx.store_writer).await;
        let engine = Engine::open_under(&ctx.dir, ctx.lock.clone(), ctx.content.clone())?.with_clock(ctx.clock.clone()).with_clock_bound(ctx.config.clock_bound);
        let (tx, rx) = mpsc::channel();
        let alive = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let writer_ctx = WriterCtx {
            batch_max: ctx.config.batch_max,
            batch_delay: ctx.config.batch_delay,
            doc_budget: ctx.config.doc_budget,
            compact_after: ctx.config.compact_after,
            last_commit: ctx.last_commit_ms.clone(),
            commits: Default::default(),
            alive: alive.clone(),
            actor: me,
            names: ctx.names.clone(),
        };
        let db = engine.tree().path().to_path_buf();
        let (commits, running) = (writer_ctx.commits.clone(), alive.clone());
        std::thread::Builder::new().name("alkfs-checkpoint".into()).spawn(move || checkpointer(&db, &commits, &running))?;
        let thread = std::thread::Builder::new().name("alkfs-store".into()).spawn(move || writer(engine, rx, writer_ctx))?;
        *ctx.store_writer.lock().expect("writer thread slot") = Some(thread);
        Ok(StoreState { jobs: Some(tx), thread: ctx.store_writer.clone(), alive })
    }

    async fn handle(&self, _me: ActorRef<StoreMsg>, msg: StoreMsg, state: &mut StoreState) -> Result<(), ActorProcessingErr> {
        match msg {
            StoreMsg::Write(op, reply) => {
                let jobs = state.jobs.as_ref().ok_or("store writer is gone")?;
                jobs.send(Job { op, reply: ReplyTo::Port(reply) }).map_err(|_| "the store writer thread stopped")?;
            }
            StoreMsg::Writer(reply) => {
                let jobs = state.jobs.clone().ok_or("store writer is gone")?;
                let _ = reply.send(StoreWriter { jobs });
            }
            StoreMsg::WriterDied => return Err("the store writer thread ended unexpectedly".into()),
            StoreMsg::Panic => panic!("fault injection: store actor"),
        }
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<StoreMsg>, state: &mut StoreState) -> Result<(), ActorProcessingErr> {
        // Drain: the writer finishes what is queued (refusing what comes later), then exits.
        state.alive.store(false, std::sync::atomic::Ordering::SeqCst);
        state.jobs.take();
        join_writer(&state.thread).await;
        Ok(())
    }
}

struct WriterCtx {
    batch_max: usize,
    batch_delay: Duration,
    /// The memory the mesh's documents may take (bytes, estimated).
    doc_budget: usize,
    /// When the mesh compacts a bucket's shards (bytes; see `NodeConfig::compact_after`).
    compact_after: u64,
    last_commit: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// Commits so far, for the checkpointer to see that there were some.
    commits: std::sync::Arc<std::sync::atomic::AtomicU64>,
    alive: std::sync::Arc<std::sync::atomic::AtomicBool>,
    actor: ActorRef<StoreMsg>,
    names: Names,
}

/// Tells the actor when the writer thread ends for any reason but the actor's own end.
struct DeathNotice(ActorRef<StoreMsg>, std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for DeathNotice {
    fn drop(&mut self) {
        if self.1.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = self.0.cast(StoreMsg::WriterDied);
        }
    }
}

/// The writer thread: owns the engine, batches commits, answers after commit. Once its actor
/// is gone (`alive` false) it finishes the job in hand, refuses the rest untouched and ends.
/// How long the store must have been quiet before its WAL is checkpointed. Commits run with
/// `synchronous=NORMAL`, which syncs the WAL only at checkpoints: waiting for a pause keeps
/// the copying (and syncing) of pages into the database out of a burst of writes ...
pub const CHECKPOINT_QUIET: Duration = Duration::from_millis(250);
/// ... but a commit is never left unsynced longer than this, pause or not (steady writes: a
/// peer replicating, a program saving every 100 ms).
pub const CHECKPOINT_AGE_MAX: Duration = Duration::from_secs(1);
/// WAL pages at which a commit checkpoints itself (160 MiB): the checkpointer's passive
/// checkpoints cannot finish while readers hold old pages, and the log must stay bounded.
pub const WAL_PAGES_MAX: u32 = 40_000;

/// Checkpoints `db`'s WAL once the store has been quiet for [`CHECKPOINT_QUIET`] after a
/// commit, or its oldest unsynced commit is [`CHECKPOINT_AGE_MAX`] old, until `alive` goes
/// false. A passive checkpoint, on a connection of its own: the writer never waits for it;
/// readers holding older pages only postpone part of it to the next round.
fn checkpointer(db: &std::path::Path, commits: &std::sync::atomic::AtomicU64, alive: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering;
    let conn = match rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no WAL checkpointer: commits reach the disk at SQLite's own checkpoints only");
            return;
        }
    };
    let tick = CHECKPOINT_QUIET / 2;
    let mut synced = commits.load(Ordering::Relaxed); // commits whose pages are all in the database file
    let mut seen = synced; // commits counted at the last tick
    let mut quiet_since = Instant::now();
    let mut unsynced_since: Option<Instant> = None;
    while alive.load(Ordering::SeqCst) {
        std::thread::sleep(tick);
        let now_count = commits.load(Ordering::Relaxed);
        if now_count != seen {
            seen = now_count;
            quiet_since = Instant::now();
        }
        if now_count == synced {
            unsynced_since = None;
            continue;
        }
        let since = *unsynced_since.get_or_insert_with(Instant::now);
        if quiet_since.elapsed() < CHECKPOINT_QUIET && since.elapsed() < CHECKPOINT_AGE_MAX {
            continue;
        }
        let started = Instant::now();
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))) {
            Ok((0, log, copied)) if copied == log => {
                (synced, unsynced_since) = (now_count, None);
                tracing::debug!(pages = log, ms = started.elapsed().as_millis() as u64, "WAL checkpointed");
            }
            Ok((busy, log, copied)) => tracing::debug!(busy, log, copied, "WAL checkpoint partial (readers or another checkpoint): again next round"),
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed: again next round"),
        }
    }
}

fn writer(mut engine: Engine, jobs: Receiver<Job>, ctx: WriterCtx) {
    let _notice = DeathNotice(ctx.actor.clone(), ctx.alive.clone());
    if let Err(e) = engine.tree().conn().execute_batch(&format!("PRAGMA wal_autocheckpoint = {WAL_PAGES_MAX}")) {
        tracing::warn!(error = %e, "could not move the WAL's checkpoint size; commits checkpoint at SQLite's default");
    }
    // The mesh's documents live with the one writer of the database they are saved in.
    let mut mesh = match crate::engine::mesh::Mesh::new(&engine) {
        Ok(mut m) => {
            m.set_doc_budget(ctx.doc_budget);
            m.set_compact_after(ctx.compact_after);
            m
        }
        Err(e) => {
            tracing::error!(error = %e, "the store cannot open the mesh's state");
            return;
        }
    };
    let alive = || ctx.alive.load(std::sync::atomic::Ordering::SeqCst);
    let committed = || {
        ctx.last_commit.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        ctx.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        wake_outbox(&ctx.names);
    };
    let mut held: Option<Job> = None;
    loop {
        let job = match held.take() {
            Some(j) => j,
            None => match jobs.recv_timeout(Duration::from_millis(500)) {
                Ok(j) => j,
                Err(RecvTimeoutError::Timeout) if alive() => continue,
                Err(_) => return, // closed, or the actor is gone and nothing is queued
            },
        };
        if !alive() {
            job.refuse();
            while let Ok(j) = jobs.try_recv() {
                j.refuse();
            }
            return;
        }
        if let WriteOp::Mesh(op) = job.op {
            use crate::engine::mesh::MeshOp;
            let quiet = !matches!(op, MeshOp::Receive { .. } | MeshOp::Adopt(_));
            let result = mesh.run(&mut engine, op).map(WriteOutcome::Mesh).map_err(|e| e.to_string());
            job.reply.answer(result);
            if !quiet {
                committed();
            }
            continue;
        }
        if !job.op.batches() {
            let quiet = matches!(job.op, WriteOp::MarkIndexed { .. } | WriteOp::Gc { .. });
            let Job { op, reply } = job;
            reply.answer(run_alone(&mut engine, op));
            if !quiet {
                committed();
            }
            continue;
        }
        let mut batch = vec![job];
        let deadline = Instant::now() + ctx.batch_delay;
        while batch.len() < ctx.batch_max {
            let next = match jobs.try_recv() {
                Ok(j) => Some(j),
                Err(_) if ctx.batch_delay.is_zero() => None,
                Err(_) => jobs.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok(),
            };
            match next {
                Some(j) if j.op.batches() => batch.push(j),
                Some(j) => {
                    held = Some(j);
                    break;
                }
                None => break,
            }
        }
        commit_batch(&mut engine, batch);
        committed();
    }
}

/// Tells the outbox watcher that something committed (it reads what).
fn wake_outbox(names: &Names) {
    if let Some(outbox) = names.find::<OutboxMsg>(Child::Outbox) {
        let _ = outbox.cast(OutboxMsg::Wake);
    }
}

fn commit_batch(engine: &mut Engine, batch: Vec<Job>) {
    let ids = batch.iter().map(|job| match &job.op {
        WriteOp::Commit { items, attrs, .. } => crate::engine::import::ids_of(items) + crate::engine::import::ids_of_attrs(attrs),
        WriteOp::PutSeen { item, .. } => crate::engine::import::ids_of_path(&item.0),
        _ => unreachable!("batches hold commits only"),
    });
    let ids = crate::store::Ids::AtMost(ids.sum());
    let now = engine.now_ms();
    let shared = engine.tree_mut().transact(ids, now, |tx| {
        let mut all = Vec::with_capacity(batch.len());
        for job in &batch {
            match &job.op {
                WriteOp::Commit { scope, items, attrs } => {
                    let branch = crate::store::branch_by_name(tx.conn(), crate::store::bucket_id(tx.conn(), &scope.bucket)?, &scope.branch)?;
                    all.push(commit_changes(tx, &branch, items, attrs)?);
                }
                WriteOp::PutSeen { scope, item, seen } => {
                    let branch = crate::store::branch_by_name(tx.conn(), crate::store::bucket_id(tx.conn(), &scope.bucket)?, &scope.branch)?;
                    all.push(vec![crate::engine::import::put_item_seen(tx, &branch, item, seen)?]);
                }
                _ => unreachable!("batches hold commits only"),
            }
        }
        Ok::<_, crate::store::StoreError>(all)
    });
    match shared {
        Ok(all) => {
            for (job, seqs) in batch.into_iter().zip(all) {
                job.answer(Ok(WriteOutcome::Seqs(seqs)));
            }
        }
        Err(_) if batch.len() > 1 => {
            for job in batch {
                let Job { op, reply } = job;
                reply.answer(run_alone(engine, op));
            }
        }
        Err(e) => {
            if let Some(job) = batch.into_iter().next() {
                job.answer(Err(e.to_string()));
            }
        }
    }
}

fn run_alone(engine: &mut Engine, op: WriteOp) -> WriteResult {
    let result = match op {
        WriteOp::Commit { scope, items, attrs } => engine.commit_changes(&scope, &items, &attrs).map(WriteOutcome::Seqs),
        WriteOp::CommitAcked { scope, changes } => engine.commit_acked(&scope, &changes).map(WriteOutcome::Acked),
        WriteOp::PutSeen { scope, item, seen } => engine.put_seen(&scope, &item, &seen).map(|s| WriteOutcome::Seqs(vec![s])),
        WriteOp::Remove { scope, path, recursive } => engine.remove(&scope, &path, recursive).map(|n| WriteOutcome::Count(n as u64)),
        WriteOp::Rename { scope, from, to } => engine.rename(&scope, &from, &to).map(WriteOutcome::Path),
        WriteOp::MoveOver { scope, from, to, noreplace } => engine.move_over(&scope, &from, &to, noreplace).map(|_| WriteOutcome::Done),
        WriteOp::SetAttr { scope, path, mode, mtime_ms } => engine.set_attr(&scope, &path, mode, mtime_ms).map(|s| WriteOutcome::Seqs(vec![s])),
        WriteOp::Mkdir { scope, path, parents, mode } => engine.mkdir_mode(&scope, &path, parents, mode).map(|_| WriteOutcome::Done),
        WriteOp::Restore { scope, path, version } => engine.restore(&scope, &path, &version).map(|s| WriteOutcome::Seqs(vec![s])),
        WriteOp::CreateBranch { scope, name, from } => engine.create_branch(&scope, &name, from.as_deref()).map(WriteOutcome::Branch),
        WriteOp::DeleteBranch { scope, name } => engine.delete_branch(&scope, &name).map(|_| WriteOutcome::Done),
        WriteOp::CreateBucket { name } => engine.create_bucket(&name).map(|_| WriteOutcome::Done),
        WriteOp::Merge { scope, from, into } => engine.merge(&scope, &from, into.as_deref()).map(WriteOutcome::Merge),
        WriteOp::DismissConflicts { scope, path } => engine.dismiss_conflicts(&scope, path.as_ref()).map(|n| WriteOutcome::Count(n as u64)),
        WriteOp::Gc { policy } => engine.gc(policy).map(WriteOutcome::Gc),
        WriteOp::MarkIndexed { hashes } => engine.mark_indexed(&hashes).map(|_| WriteOutcome::Done),
        WriteOp::Mesh(_) => unreachable!("mesh requests are run by the writer with its documents"),
    };
    result.map_err(|e| e.to_string())
}
