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

use super::{outbox::OutboxMsg, NodeContext, OUTBOX_ACTOR};
use crate::engine::{commit_items, now_ms, CommitItem, Engine, Scope};
use crate::gc::{GcReport, Retention};
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
    },
    /// Remove a path.
    Remove { scope: Scope, path: TreePath, recursive: bool },
    /// Rename (into a directory when the target is one).
    Rename { scope: Scope, from: TreePath, to: TreePath },
    /// Create a directory.
    Mkdir { scope: Scope, path: TreePath, parents: bool },
    /// Make an old version current.
    Restore { scope: Scope, path: TreePath, seq: i64 },
    /// Create a branch.
    CreateBranch { scope: Scope, name: String, from: Option<String> },
    /// Delete a branch.
    DeleteBranch { scope: Scope, name: String },
    /// Create a bucket.
    CreateBucket { name: String },
    /// Merge a branch into another.
    Merge { scope: Scope, from: String, into: Option<String> },
    /// Collect garbage.
    Gc { policy: Retention },
    /// Record blobs as held by the iroh-blobs index.
    MarkIndexed { hashes: Vec<crate::proto::entry::ContentHash> },
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
    /// A collection's report.
    Gc(GcReport),
    /// Nothing to report.
    Done,
}

/// The reply to a write: its outcome or the error message for the user.
pub type WriteResult = Result<WriteOutcome, String>;

/// Messages of the store actor.
pub enum StoreMsg {
    /// Perform a write and answer after it committed.
    Write(WriteOp, RpcReplyPort<WriteResult>),
    /// Fault injection (tests only, when the node allows it): panic in the handler.
    Panic,
}

/// The store actor.
pub struct StoreActor;

/// Its state: the channel to the writer thread.
pub struct StoreState {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

struct Job {
    op: WriteOp,
    reply: RpcReplyPort<WriteResult>,
}

impl Actor for StoreActor {
    type Msg = StoreMsg;
    type State = StoreState;
    type Arguments = NodeContext;

    async fn pre_start(&self, _me: ActorRef<StoreMsg>, ctx: NodeContext) -> Result<StoreState, ActorProcessingErr> {
        let engine = Engine::open_under(&ctx.dir, ctx.lock.clone(), ctx.content.clone())?;
        let (tx, rx) = mpsc::channel();
        let (batch_max, batch_delay) = (ctx.config.batch_max, ctx.config.batch_delay);
        let thread = std::thread::Builder::new()
            .name("alkfs-store".into())
            .spawn(move || writer(engine, rx, batch_max, batch_delay))?;
        Ok(StoreState { jobs: Some(tx), thread: Some(thread) })
    }

    async fn handle(&self, _me: ActorRef<StoreMsg>, msg: StoreMsg, state: &mut StoreState) -> Result<(), ActorProcessingErr> {
        match msg {
            StoreMsg::Write(op, reply) => {
                let jobs = state.jobs.as_ref().ok_or("store writer is gone")?;
                jobs.send(Job { op, reply }).map_err(|_| "the store writer thread stopped")?;
            }
            StoreMsg::Panic => panic!("fault injection: store actor"),
        }
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<StoreMsg>, state: &mut StoreState) -> Result<(), ActorProcessingErr> {
        // Drain: closing the channel lets the writer finish what is queued, then it exits.
        state.jobs.take();
        if let Some(thread) = state.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(())
    }
}

/// The writer thread: owns the engine, batches commits, answers after commit.
fn writer(mut engine: Engine, jobs: Receiver<Job>, batch_max: usize, batch_delay: Duration) {
    let mut held: Option<Job> = None;
    loop {
        let job = match held.take() {
            Some(j) => j,
            None => match jobs.recv() {
                Ok(j) => j,
                Err(_) => return, // channel closed and drained: shut down
            },
        };
        if !matches!(job.op, WriteOp::Commit { .. }) {
            let result = run_alone(&mut engine, job.op);
            let _ = job.reply.send(result);
            committed();
            continue;
        }
        let mut batch = vec![job];
        let deadline = Instant::now() + batch_delay;
        while batch.len() < batch_max {
            let next = match jobs.try_recv() {
                Ok(j) => Some(j),
                Err(_) if batch_delay.is_zero() => None,
                Err(_) => match jobs.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(j) => Some(j),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
                },
            };
            match next {
                Some(j) if matches!(j.op, WriteOp::Commit { .. }) => batch.push(j),
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
fn committed() {
    if let Some(outbox) = ActorRef::<OutboxMsg>::where_is(OUTBOX_ACTOR.to_string()) {
        let _ = outbox.cast(OutboxMsg::Wake);
    }
}

fn commit_batch(engine: &mut Engine, batch: Vec<Job>) {
    let shared = engine.tree_mut().transact(now_ms(), |tx| {
        let mut all = Vec::with_capacity(batch.len());
        for job in &batch {
            let WriteOp::Commit { scope, items } = &job.op else { unreachable!("batches hold commits only") };
            let branch = crate::store::branch_by_name(tx.conn(), crate::store::bucket_id(tx.conn(), &scope.bucket)?, &scope.branch)?;
            all.push(commit_items(tx, &branch, items)?);
        }
        Ok::<_, crate::store::StoreError>(all)
    });
    match shared {
        Ok(all) => {
            for (job, seqs) in batch.into_iter().zip(all) {
                let _ = job.reply.send(Ok(WriteOutcome::Seqs(seqs)));
            }
        }
        Err(_) if batch.len() > 1 => {
            for job in batch {
                let result = run_alone(engine, job.op);
                let _ = job.reply.send(result);
            }
        }
        Err(e) => {
            let _ = batch.into_iter().next().map(|j| j.reply.send(Err(e.to_string())));
        }
    }
}

fn run_alone(engine: &mut Engine, op: WriteOp) -> WriteResult {
    let result = match op {
        WriteOp::Commit { scope, items } => engine.commit_entries(&scope, &items).map(WriteOutcome::Seqs),
        WriteOp::Remove { scope, path, recursive } => engine.remove(&scope, &path, recursive).map(|n| WriteOutcome::Count(n as u64)),
        WriteOp::Rename { scope, from, to } => engine.rename(&scope, &from, &to).map(WriteOutcome::Path),
        WriteOp::Mkdir { scope, path, parents } => engine.mkdir(&scope, &path, parents).map(|_| WriteOutcome::Done),
        WriteOp::Restore { scope, path, seq } => engine.restore(&scope, &path, seq).map(|s| WriteOutcome::Seqs(vec![s])),
        WriteOp::CreateBranch { scope, name, from } => engine.create_branch(&scope, &name, from.as_deref()).map(WriteOutcome::Branch),
        WriteOp::DeleteBranch { scope, name } => engine.delete_branch(&scope, &name).map(|_| WriteOutcome::Done),
        WriteOp::CreateBucket { name } => engine.create_bucket(&name).map(|_| WriteOutcome::Done),
        WriteOp::Merge { scope, from, into } => engine.merge(&scope, &from, into.as_deref()).map(WriteOutcome::Merge),
        WriteOp::Gc { policy } => engine.gc(policy).map(WriteOutcome::Gc),
        WriteOp::MarkIndexed { hashes } => engine.mark_indexed(&hashes).map(|_| WriteOutcome::Done),
    };
    result.map_err(|e| e.to_string())
}
