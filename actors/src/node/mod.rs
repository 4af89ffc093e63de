//! The node: the engine run as a tree of ractor actors, each owning one piece of state.
//!
//! ```text
//! supervisor ─┬─ store   the SQLite writer (a thread that batches commits)
//!             ├─ outbox  reads committed events, fans them out
//!             ├─ blobs   the queue of blobs to index
//!             ├─ gc      schedule and record of collections
//!             └─ mesh    the iroh endpoint, invitations, blob fetches
//!                  └─ session (one per connected peer)
//! ```
//!
//! Children are registered by name and looked up per call by [`NodeHandle`], so a caller
//! never keeps a reference to a child that has since been restarted. Registered names are
//! process-wide in ractor, so each node instance has its own ([`Names`]): several nodes can
//! run in one process (tests under `cargo test`, benches).

pub mod blobs;
pub mod fetch;
pub mod gate;
pub mod gc;
pub mod mesh;
pub mod outbox;
pub mod store;
pub mod supervisor;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef, RpcReplyPort};

use crate::content::ContentStore;
use crate::engine::DirLock;
use crate::gc::{GcReport, Retention};
use crate::index::BlobIndex;

/// The supervisor's name (before the instance suffix).
pub const SUPERVISOR_ACTOR: &str = "alkfs-supervisor";
/// The store actor's name.
pub const STORE_ACTOR: &str = "alkfs-store";
/// The outbox watcher's name.
pub const OUTBOX_ACTOR: &str = "alkfs-outbox";
/// The blob actor's name.
pub const BLOB_ACTOR: &str = "alkfs-blobs";
/// The GC actor's name.
pub const GC_ACTOR: &str = "alkfs-gc";
/// The mesh actor's name.
pub const MESH_ACTOR: &str = "alkfs-mesh";

/// The registered names of one node instance's actors: `alkfs-store#3` for the store of the
/// third node this process started. Children find each other through these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    instance: u64,
}

impl Names {
    /// Names for a new node instance, unique in this process.
    pub fn unique() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Names { instance: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) }
    }

    /// The registered name of `child`.
    pub fn child(&self, child: Child) -> String {
        format!("{}#{}", child.name(), self.instance)
    }

    /// The registered name of the supervisor.
    pub fn supervisor(&self) -> String {
        format!("{SUPERVISOR_ACTOR}#{}", self.instance)
    }

    /// The running actor `child` of this node, if it is registered now.
    pub fn find<M: ractor::Message>(&self, child: Child) -> Option<ActorRef<M>> {
        ActorRef::<M>::where_is(self.child(child))
    }
}

/// Test hooks that make the real actors fail in ways a test cannot cause from outside.
#[derive(Debug, Default)]
pub struct Faults {
    failing_starts: std::sync::Mutex<std::collections::HashMap<Child, u32>>,
}

impl Faults {
    /// Makes the next `n` starts of `child` fail (as if its `pre_start` hit an error).
    pub fn fail_next_starts(&self, child: Child, n: u32) {
        self.failing_starts.lock().expect("faults lock").insert(child, n);
    }

    /// Called by each child's start: an error when a failure was asked for.
    pub(crate) fn check_start(&self, child: Child) -> Result<(), ractor::ActorProcessingErr> {
        let mut map = self.failing_starts.lock().expect("faults lock");
        match map.get_mut(&child) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(format!("fault injection: {} failed to start", child.name()).into())
            }
            _ => Ok(()),
        }
    }
}

/// How long a call waits for a child that is restarting before giving up.
pub const RESTART_WAIT: Duration = Duration::from_secs(15);
/// How long a write may take before its caller stops waiting.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a status query may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a user waits for the bytes of a pending file.
pub const FETCH_WAIT: Duration = Duration::from_secs(600);
/// How long an invitation, a join or a removal may take (a join dials the inviter).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(90);

/// The supervised children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Child {
    /// The path-tree store.
    Store,
    /// The outbox watcher.
    Outbox,
    /// The blob actor.
    Blobs,
    /// The GC actor.
    Gc,
    /// The mesh actor (idle when the node runs without a network endpoint).
    Mesh,
}

impl Child {
    /// In start order: the store first.
    pub const ALL: [Child; 5] = [Child::Store, Child::Outbox, Child::Blobs, Child::Gc, Child::Mesh];

    /// The registered name.
    pub fn name(self) -> &'static str {
        match self {
            Child::Store => STORE_ACTOR,
            Child::Outbox => OUTBOX_ACTOR,
            Child::Blobs => BLOB_ACTOR,
            Child::Gc => GC_ACTOR,
            Child::Mesh => MESH_ACTOR,
        }
    }

    /// The child named `name` (short or registered name).
    pub fn from_name(name: &str) -> Option<Child> {
        Child::ALL.into_iter().find(|c| c.name() == name || c.name().trim_start_matches("alkfs-") == name)
    }
}

/// The node's tunables (from the config file, env and flags).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Most commits the store writes in one transaction.
    pub batch_max: usize,
    /// How long the store waits for more commits to batch (0: only what is queued).
    pub batch_delay: Duration,
    /// Time between scheduled collections (0: none).
    pub gc_interval: Duration,
    /// The retention policy of scheduled collections.
    pub retention: Retention,
    /// honker's poll interval, the outbox watcher's fallback wake.
    pub outbox_poll: Duration,
    /// Bound of the blob actor's queue.
    pub blob_queue_max: usize,
    /// Failures a child may have within `restart_window` before the node gives up.
    pub restart_budget: u32,
    /// The window of the restart budget.
    pub restart_window: Duration,
    /// How far ahead of the wall clock a stamp may be (see [`crate::proto::clock::Bound`]).
    pub clock_bound: crate::proto::clock::Bound,
    /// The memory the shared buckets' documents may take (bytes, estimated; the least
    /// recently used are dropped past it and read back when next used).
    pub doc_budget: usize,
    /// Shards of a shared bucket are compacted once their saved size passes twice what the
    /// last epoch began with and at least this (bytes; `engine::compaction`).
    pub compact_after: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            batch_max: 256,
            batch_delay: Duration::ZERO,
            gc_interval: Duration::from_secs(3600),
            retention: Retention::default(),
            outbox_poll: outbox::OUTBOX_POLL_DEFAULT,
            blob_queue_max: 10_000,
            restart_budget: 5,
            restart_window: Duration::from_secs(60),
            clock_bound: crate::proto::clock::Bound::default(),
            doc_budget: crate::engine::doc_cache::BUDGET_DEFAULT_BYTES,
            compact_after: crate::engine::compaction::COMPACT_AFTER_DEFAULT_BYTES,
        }
    }
}

/// What every actor is started with.
#[derive(Clone)]
pub struct NodeContext {
    /// The data dir.
    pub dir: PathBuf,
    /// The write lock the node holds.
    pub lock: Arc<DirLock>,
    /// The content store, shared (with its holds) by importers and GC.
    pub content: ContentStore,
    /// The iroh-blobs index (kept outside the actors: it survives their restarts).
    pub index: Arc<BlobIndex>,
    /// Tunables.
    pub config: NodeConfig,
    /// When the store last committed (ms since the epoch): background work waits for quiet.
    pub last_commit_ms: Arc<std::sync::atomic::AtomicI64>,
    /// This node's actor names.
    pub names: Names,
    /// The time versions are stamped with (the system clock outside tests).
    pub clock: Arc<dyn crate::proto::clock::Clock>,
    /// Test hooks.
    pub faults: Arc<Faults>,
    /// The store's writer thread, across the store actor's restarts.
    pub store_writer: store::WriterThread,
    /// The network endpoint, when the node takes part in a mesh.
    pub net: Option<mesh::Net>,
}

impl NodeContext {
    /// The context of a node on `dir`, with fresh names, the system clock and no faults.
    pub fn new(dir: &std::path::Path, lock: Arc<DirLock>, content: ContentStore, index: Arc<BlobIndex>, config: NodeConfig) -> Self {
        NodeContext {
            dir: dir.to_path_buf(),
            lock,
            content,
            index,
            config,
            last_commit_ms: Default::default(),
            names: Names::unique(),
            clock: crate::engine::system_clock(),
            faults: Default::default(),
            store_writer: Default::default(),
            net: None,
        }
    }
}

/// Errors of calls into the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The child did not come back within [`RESTART_WAIT`].
    #[error("the node's {0} is not running (restarting?); retry, or check `alkfs status`")]
    Unavailable(&'static str),
    /// The call timed out.
    #[error("the node's {0} did not answer in time")]
    Timeout(&'static str),
    /// The operation failed; the message is for the user.
    #[error("{0}")]
    Failed(String),
}

/// A cheap handle to the running node's actors. Writes go over a cached direct line to the
/// store's writer thread, renewed from the store actor after a restart.
#[derive(Clone)]
pub struct NodeHandle {
    names: Names,
    writer: Arc<std::sync::Mutex<Option<store::StoreWriter>>>,
}

impl NodeHandle {
    /// A handle to the node whose actors have these names.
    pub fn new(names: Names) -> Self {
        NodeHandle { names, writer: Default::default() }
    }

    /// Calls `child` with a message built around a reply port, looking the child up by name
    /// and waiting (up to [`RESTART_WAIT`]) while it restarts. A call whose child died holding
    /// the reply is not retried: it may have had an effect, so the caller decides.
    async fn call<M: ractor::Message, T: Send + 'static>(
        &self,
        child: Child,
        build: impl Fn(RpcReplyPort<T>) -> M,
        timeout: Duration,
    ) -> Result<T, NodeError> {
        let deadline = Instant::now() + RESTART_WAIT;
        loop {
            if let Some(actor) = self.names.find::<M>(child) {
                match actor.call(&build, Some(timeout)).await {
                    Ok(ractor::rpc::CallResult::Success(v)) => return Ok(v),
                    Ok(ractor::rpc::CallResult::Timeout) => return Err(NodeError::Timeout(child.name())),
                    Ok(ractor::rpc::CallResult::SenderError) => {
                        return Err(NodeError::Failed(format!("the node's {} restarted during the request; it may or may not have been applied: check, then retry", child.name())))
                    }
                    Err(_) => {} // stopping: wait for the restart
                }
            }
            if Instant::now() >= deadline || !tree_alive(&self.names) {
                return Err(NodeError::Unavailable(child.name()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Performs a write through the store; answers after commit. A write the store handed
    /// back untouched (it was restarting) is sent again to its successor, until
    /// [`RESTART_WAIT`] runs out.
    pub async fn write(&self, op: store::WriteOp) -> Result<store::WriteOutcome, NodeError> {
        let deadline = Instant::now() + RESTART_WAIT;
        let mut op = op;
        loop {
            let cached = self.writer.lock().expect("writer cache").clone();
            let writer = match cached {
                Some(w) => w,
                None => {
                    let w = self.call(Child::Store, store::StoreMsg::Writer, QUERY_TIMEOUT).await?;
                    *self.writer.lock().expect("writer cache") = Some(w.clone());
                    w
                }
            };
            let returned = match writer.send(op) {
                Ok(rx) => match tokio::time::timeout(WRITE_TIMEOUT, rx).await {
                    Ok(Ok(Ok(result))) => return result.map_err(NodeError::Failed),
                    Ok(Ok(Err(back))) => back,
                    Ok(Err(_)) => {
                        *self.writer.lock().expect("writer cache") = None;
                        return Err(NodeError::Failed(
                            "the node's store restarted during the request; it may or may not have been applied: check, then retry".into(),
                        ));
                    }
                    Err(_) => return Err(NodeError::Timeout(STORE_ACTOR)),
                },
                Err(back) => back,
            };
            // Not applied: the writer was going away. Ask the (new) actor for a new line.
            *self.writer.lock().expect("writer cache") = None;
            if Instant::now() >= deadline || !tree_alive(&self.names) {
                return Err(NodeError::Unavailable(STORE_ACTOR));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            op = returned;
        }
    }

    /// Runs a collection now: the configured policy, with `gc`'s flags applied
    /// ([`Retention::with_flags`]).
    pub async fn gc(&self, keep_versions: Option<u32>, keep_days: Option<u32>) -> Result<GcReport, NodeError> {
        self.call(Child::Gc, |reply| gc::GcMsg::Run((keep_versions, keep_days), reply), gc::GC_CALL_TIMEOUT).await?.map_err(NodeError::Failed)
    }

    /// The last collection, if any.
    pub async fn last_gc(&self) -> Result<Option<(i64, GcReport)>, NodeError> {
        self.call(Child::Gc, gc::GcMsg::Last, QUERY_TIMEOUT).await
    }

    /// The blob actor's figures.
    pub async fn blob_stats(&self) -> Result<blobs::BlobStats, NodeError> {
        self.call(Child::Blobs, blobs::BlobMsg::Stats, QUERY_TIMEOUT).await
    }

    /// The outbox cursor and head.
    pub async fn outbox_stats(&self) -> Result<(i64, i64), NodeError> {
        self.call(Child::Outbox, outbox::OutboxMsg::Stats, QUERY_TIMEOUT).await
    }

    /// A ticket to bucket `bucket`, valid `expires_ms`, for `uses` joins.
    pub async fn invite(&self, bucket: String, expires_ms: i64, uses: u32, role: crate::proto::membership::Role) -> Result<String, NodeError> {
        self.call(Child::Mesh, |reply| mesh::MeshMsg::Invite { bucket: bucket.clone(), expires_ms, uses, role, reply }, JOIN_TIMEOUT)
            .await?
            .map_err(NodeError::Failed)
    }

    /// Joins the bucket `ticket` shares, under `name` (or the inviter's name).
    pub async fn join(&self, ticket: String, name: Option<String>) -> Result<mesh::Joined, NodeError> {
        self.call(Child::Mesh, |reply| mesh::MeshMsg::Join { ticket: ticket.clone(), name: name.clone(), reply }, JOIN_TIMEOUT)
            .await?
            .map_err(NodeError::Failed)
    }

    /// Removes `node` from bucket `bucket` everywhere.
    pub async fn remove_member(&self, bucket: String, node: crate::proto::ids::NodeId) -> Result<(), NodeError> {
        self.call(Child::Mesh, |reply| mesh::MeshMsg::Remove { bucket: bucket.clone(), node, reply }, JOIN_TIMEOUT)
            .await?
            .map_err(NodeError::Failed)
    }

    /// Gives member `node` of `bucket` role `role` (an owner's act).
    pub async fn grant_role(&self, bucket: String, node: crate::proto::ids::NodeId, role: crate::proto::membership::Role) -> Result<(), NodeError> {
        self.call(Child::Mesh, |reply| mesh::MeshMsg::Grant { bucket: bucket.clone(), node, role, reply }, JOIN_TIMEOUT)
            .await?
            .map_err(NodeError::Failed)
    }

    /// Lets writers of `bucket` invite too (`members_invite`), or only owners (an owner's act).
    pub async fn set_invite_policy(&self, bucket: String, members_invite: bool) -> Result<(), NodeError> {
        self.call(Child::Mesh, |reply| mesh::MeshMsg::InvitePolicy { bucket: bucket.clone(), members_invite, reply }, JOIN_TIMEOUT)
            .await?
            .map_err(NodeError::Failed)
    }

    /// Fetches blob `hash` from peers now and waits until it is here.
    pub async fn fetch_now(&self, hash: crate::proto::entry::ContentHash, size: u64) -> Result<(), NodeError> {
        self.call(Child::Mesh, |reply| mesh::MeshMsg::FetchNow { hash, size, reply }, FETCH_WAIT).await?.map_err(NodeError::Failed)
    }

    /// Bytes `offset..offset + len` of blob `hash` (of `size` bytes), whose bytes are on peers
    /// (see [`mesh::MeshMsg::ReadRange`]).
    pub async fn read_range(&self, hash: crate::proto::entry::ContentHash, size: u64, offset: u64, len: u64) -> Result<Vec<u8>, NodeError> {
        self.call(Child::Mesh, |reply| mesh::MeshMsg::ReadRange { hash, size, offset, len, reply }, mesh::FETCH_TIMEOUT + mesh::NET_TIMEOUT).await?.map_err(NodeError::Failed)
    }

    /// The mesh's status (peers, fetches).
    pub async fn mesh_status(&self) -> Result<mesh::MeshStatus, NodeError> {
        self.call(Child::Mesh, mesh::MeshMsg::Status, QUERY_TIMEOUT).await
    }

    /// Each child's health.
    pub async fn health(&self) -> Result<Vec<supervisor::ChildHealth>, NodeError> {
        let sup = ActorRef::<supervisor::SupervisorMsg>::where_is(self.names.supervisor()).ok_or(NodeError::Unavailable("supervisor"))?;
        match sup.call(supervisor::SupervisorMsg::Health, Some(QUERY_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(h)) => Ok(h),
            _ => Err(NodeError::Timeout("supervisor")),
        }
    }

    /// Fault injection for tests: makes `child` panic in its handler.
    pub fn inject_panic(&self, child: Child) -> Result<(), NodeError> {
        let n = &self.names;
        let sent = match child {
            Child::Store => n.find::<store::StoreMsg>(child).map(|a| a.cast(store::StoreMsg::Panic).is_ok()),
            Child::Outbox => n.find::<outbox::OutboxMsg>(child).map(|a| a.cast(outbox::OutboxMsg::Panic).is_ok()),
            Child::Blobs => n.find::<blobs::BlobMsg>(child).map(|a| a.cast(blobs::BlobMsg::Panic).is_ok()),
            Child::Gc => n.find::<gc::GcMsg>(child).map(|a| a.cast(gc::GcMsg::Panic).is_ok()),
            Child::Mesh => n.find::<mesh::MeshMsg>(child).map(|a| a.cast(mesh::MeshMsg::Panic).is_ok()),
        };
        match sent {
            Some(true) => Ok(()),
            _ => Err(NodeError::Unavailable(child.name())),
        }
    }
}

/// Merges triggers that arrive closer together than a window into one run: background work
/// (outbox reads, blob scans) runs at most once per window instead of after every commit.
#[derive(Debug, Default)]
pub(crate) struct Coalesce {
    last: Option<Instant>,
    scheduled: bool,
}

/// What a [`Coalesce`] gate says to a trigger.
pub(crate) enum Admit {
    /// Run now (recorded as the latest run).
    Now,
    /// Too soon: schedule the trigger again after this long.
    Later(Duration),
    /// Too soon, and a later run is already scheduled: drop this trigger.
    Scheduled,
}

impl Coalesce {
    /// Decides what to do with a trigger arriving now.
    pub(crate) fn admit(&mut self, window: Duration) -> Admit {
        let wait = self.last.map(|t| window.saturating_sub(t.elapsed())).filter(|w| !w.is_zero());
        match wait {
            Some(_) if self.scheduled => Admit::Scheduled,
            Some(wait) => {
                self.scheduled = true;
                Admit::Later(wait)
            }
            None => {
                self.scheduled = false;
                self.last = Some(Instant::now());
                Admit::Now
            }
        }
    }
}

/// False once the supervisor is gone (the node is stopping or gave up): no child will come
/// back, so callers stop waiting for one.
fn tree_alive(names: &Names) -> bool {
    ActorRef::<supervisor::SupervisorMsg>::where_is(names.supervisor()).is_some_and(|s| s.get_status() <= ractor::ActorStatus::Running)
}

/// A started node: its supervisor, what completes when the supervisor ends (cleanly after
/// [`stop`], or because a child exhausted its restart budget), and a handle for calls.
pub struct Started {
    /// The supervisor.
    pub supervisor: ActorRef<supervisor::SupervisorMsg>,
    /// Completes when the supervisor ends.
    pub done: tokio::task::JoinHandle<()>,
    /// Calls into the node.
    pub handle: NodeHandle,
}

/// Starts the supervision tree.
pub async fn start(ctx: NodeContext) -> Result<Started, NodeError> {
    let handle = NodeHandle::new(ctx.names.clone());
    let (supervisor, done) = Actor::spawn(Some(ctx.names.supervisor()), supervisor::Supervisor, ctx)
        .await
        .map_err(|e| NodeError::Failed(format!("starting the node: {e}")))?;
    Ok(Started { supervisor, done, handle })
}

/// Stops the tree gracefully: the store finishes queued writes first.
pub async fn stop(sup: &ActorRef<supervisor::SupervisorMsg>) {
    let _ = sup.stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(60))).await;
}
