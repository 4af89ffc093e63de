//! The blob actor: owns the queue of blobs to obtain and index.
//!
//! Today "obtain" means indexing local blobs into the iroh-blobs store (so peers can fetch
//! them verified); the mesh adds fetching from peers through the same queue. The queue is
//! bounded ([`NodeConfig::blob_queue_max`](super::NodeConfig)) and de-duplicated; it is filled
//! by scanning the `blob` table for unindexed rows, so nothing is lost when it is full or
//! when the actor restarts: the next scan finds what is still pending. A failed blob is
//! retried with exponential backoff, up to [`ATTEMPTS_MAX`] times per node run.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::store::{StoreMsg, WriteOp};
use super::{Child, Names, NodeContext};
use crate::content::ContentStore;
use crate::index::BlobIndex;
use crate::proto::entry::ContentHash;
use crate::store::read::{self, PendingBlob};
use crate::store::{TreeStore, TREE_DB_FILE};

/// Tries per blob before giving up until the next node start.
pub const ATTEMPTS_MAX: u32 = 8;
/// First retry delay; doubles per attempt.
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(600);
/// Scans closer together than this are merged into one: indexing is background work and
/// should come in batches, not chase every commit.
pub const SCAN_COALESCE: Duration = Duration::from_millis(200);
/// Indexing waits until the store has not committed for this long: a burst of writes is not
/// slowed by the background hashing of what it wrote ...
pub const QUIET_BEFORE_WORK: Duration = Duration::from_millis(250);
/// ... but never waits longer than this, so a steady load still gets its blobs indexed.
pub const DEFER_MAX: Duration = Duration::from_secs(10);

/// Messages of the blob actor.
pub enum BlobMsg {
    /// New blobs may be pending: scan the table and work the queue.
    Scan,
    /// Work the queue (also the retry timer).
    Work,
    /// Release index tags of blobs the tree no longer names (after a collection).
    Reconcile,
    /// Queue length and blobs indexed so far.
    Stats(RpcReplyPort<BlobStats>),
    /// Fault injection (tests only): panic in the handler.
    Panic,
}

/// What the blob actor reports.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct BlobStats {
    /// Blobs waiting.
    pub pending: u64,
    /// Blobs indexed since the node started.
    pub indexed: u64,
    /// Blobs that failed every attempt.
    pub failed: u64,
}

/// The blob actor.
pub struct BlobActor;

struct Entry {
    blob: PendingBlob,
    attempts: u32,
    not_before: Instant,
}

/// Its state.
pub struct BlobState {
    tree: TreeStore,
    content: ContentStore,
    index: Arc<BlobIndex>,
    queue: VecDeque<ContentHash>,
    entries: HashMap<ContentHash, Entry>,
    queue_max: usize,
    given_up: std::collections::HashSet<ContentHash>,
    stats: BlobStats,
    timer_armed: bool,
    /// A scan was asked for: it runs when the queue is next worked (see [`BlobState::work`]).
    scan_due: bool,
    scan_gate: super::Coalesce,
    last_commit_ms: Arc<std::sync::atomic::AtomicI64>,
    deferred_since: Option<Instant>,
    names: Names,
}

impl Actor for BlobActor {
    type Msg = BlobMsg;
    type State = BlobState;
    type Arguments = NodeContext;

    async fn pre_start(&self, me: ActorRef<BlobMsg>, ctx: NodeContext) -> Result<BlobState, ActorProcessingErr> {
        let tree = TreeStore::open(&ctx.dir.join(TREE_DB_FILE), false)?;
        me.cast(BlobMsg::Reconcile)?; // a collection may have run while no node did
        me.cast(BlobMsg::Scan)?;
        Ok(BlobState {
            tree,
            content: ctx.content.clone(),
            index: ctx.index.clone(),
            queue: VecDeque::new(),
            entries: HashMap::new(),
            queue_max: ctx.config.blob_queue_max,
            given_up: Default::default(),
            stats: BlobStats::default(),
            timer_armed: false,
            scan_due: false,
            scan_gate: Default::default(),
            last_commit_ms: ctx.last_commit_ms.clone(),
            deferred_since: None,
            names: ctx.names.clone(),
        })
    }

    async fn handle(&self, me: ActorRef<BlobMsg>, msg: BlobMsg, state: &mut BlobState) -> Result<(), ActorProcessingErr> {
        match msg {
            BlobMsg::Scan => {
                match state.scan_gate.admit(SCAN_COALESCE) {
                    super::Admit::Now => {}
                    super::Admit::Later(wait) => {
                        me.send_after(wait, || BlobMsg::Scan);
                        return Ok(());
                    }
                    super::Admit::Scheduled => return Ok(()),
                }
                state.scan_due = true;
                state.work(&me).await?;
            }
            BlobMsg::Work => {
                state.timer_armed = false;
                state.work(&me).await?;
            }
            BlobMsg::Reconcile => {
                let tagged = state.index.tagged().await?;
                let freed = state.not_named(&tagged)?;
                if !freed.is_empty() {
                    state.index.release(&freed).await?;
                    tracing::info!(released = freed.len(), "released index tags of freed blobs");
                }
            }
            BlobMsg::Stats(reply) => {
                let mut stats = state.stats.clone();
                stats.pending = state.queue.len() as u64;
                let _ = reply.send(stats);
            }
            BlobMsg::Panic => panic!("fault injection: blob actor"),
        }
        Ok(())
    }
}

impl BlobState {
    /// Those of `hashes` the tree no longer names.
    fn not_named(&self, hashes: &[ContentHash]) -> Result<Vec<ContentHash>, ActorProcessingErr> {
        let mut named = self.tree.conn().prepare_cached("SELECT 1 FROM blob WHERE hash = ?1")?;
        let mut out = Vec::new();
        for h in hashes {
            if !named.exists([h.0.to_vec()])? {
                out.push(*h);
            }
        }
        Ok(out)
    }

    /// Fills the queue from the table, de-duplicated, up to the bound.
    fn scan(&mut self) -> Result<(), ActorProcessingErr> {
        let mut after = Vec::new();
        while self.queue.len() < self.queue_max {
            let page = read::blobs_after(self.tree.conn(), &after, true, 256)?;
            let Some(last) = page.last() else { break };
            after = last.hash.0.to_vec();
            for blob in page {
                if self.queue.len() >= self.queue_max {
                    break;
                }
                if self.entries.contains_key(&blob.hash) || self.given_up.contains(&blob.hash) {
                    continue;
                }
                self.queue.push_back(blob.hash);
                self.entries.insert(blob.hash, Entry { blob, attempts: 0, not_before: Instant::now() });
            }
        }
        Ok(())
    }

    /// Scans if one is due, then indexes every queued blob that is due; arms a timer for the
    /// earliest retry. Waits for the store to be quiet first (see [`QUIET_BEFORE_WORK`]),
    /// the scan too: a scan reads every pending blob (small ones with their bytes), so
    /// scanning at every commit of a long burst of writes cost more than the writes.
    async fn work(&mut self, me: &ActorRef<BlobMsg>) -> Result<(), ActorProcessingErr> {
        if self.queue.is_empty() && !self.scan_due {
            return Ok(());
        }
        let since_commit = crate::engine::now_ms() - self.last_commit_ms.load(std::sync::atomic::Ordering::Relaxed);
        let waited = self.deferred_since.get_or_insert_with(Instant::now).elapsed();
        if since_commit < QUIET_BEFORE_WORK.as_millis() as i64 && waited < DEFER_MAX {
            if !self.timer_armed {
                self.timer_armed = true;
                me.send_after(QUIET_BEFORE_WORK, || BlobMsg::Work);
            }
            return Ok(());
        }
        self.deferred_since = None;
        if std::mem::take(&mut self.scan_due) {
            self.scan()?;
        }
        let now = Instant::now();
        let mut done = Vec::new();
        let mut later = VecDeque::new();
        while let Some(hash) = self.queue.pop_front() {
            let entry = self.entries.get_mut(&hash).expect("queued blobs have entries");
            if entry.not_before > now {
                later.push_back(hash);
                continue;
            }
            match self.index.add(&self.content, &entry.blob).await {
                Ok(()) => {
                    self.entries.remove(&hash);
                    done.push(hash);
                }
                Err(e) => {
                    entry.attempts += 1;
                    if entry.attempts >= ATTEMPTS_MAX {
                        tracing::error!(%hash, error = %e, "giving up indexing a blob until the node restarts; run `alkfs blobs check`");
                        self.entries.remove(&hash);
                        self.given_up.insert(hash);
                        self.stats.failed += 1;
                    } else {
                        let delay = RETRY_BASE.saturating_mul(1 << entry.attempts.min(20)).min(RETRY_MAX);
                        tracing::warn!(%hash, error = %e, attempt = entry.attempts, ?delay, "indexing a blob failed; will retry");
                        entry.not_before = Instant::now() + delay;
                        later.push_back(hash);
                    }
                }
            }
        }
        self.queue = later;
        if !done.is_empty() {
            self.stats.indexed += done.len() as u64;
            if let Some(store) = self.names.find::<StoreMsg>(Child::Store) {
                // Fire and forget: a blob not marked is indexed again next time (idempotent).
                let (tx, _rx) = ractor::concurrency::oneshot();
                let _ = store.cast(StoreMsg::Write(WriteOp::MarkIndexed { hashes: done }, tx.into()));
            }
        }
        if let Some(next) = self.queue.iter().filter_map(|h| self.entries.get(h)).map(|e| e.not_before).min() {
            if !self.timer_armed {
                self.timer_armed = true;
                me.send_after(next.saturating_duration_since(Instant::now()), || BlobMsg::Work);
            }
        }
        Ok(())
    }
}
