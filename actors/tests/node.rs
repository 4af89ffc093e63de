//! The node's actor tree in-process, through its handle, on a real data dir: restarts keep
//! the node serving; a restart that fails counts as a failure; a child that keeps failing
//! escalates; several nodes share a process (each has its own actor names), so these tests
//! pass under `cargo test` (one process) as under nextest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alknet_actors::content::ContentStore;
use alknet_actors::engine::{file_entry, DirLock, Engine, Scope};
use alknet_actors::index::BlobIndex;
use alknet_actors::node::store::{WriteOp, WriteOutcome};
use alknet_actors::node::{self, Child, NodeConfig, NodeContext, NodeHandle};
use alknet_actors::proto::path::TreePath;

struct Started {
    handle: NodeHandle,
    sup: ractor::ActorRef<node::supervisor::SupervisorMsg>,
    done: tokio::task::JoinHandle<()>,
    content: ContentStore,
    index: Arc<BlobIndex>,
    faults: Arc<node::Faults>,
}

async fn start(dir: &std::path::Path, config: NodeConfig) -> Started {
    Engine::init(dir).unwrap();
    let content = ContentStore::open(&dir.join("content")).unwrap();
    let index = Arc::new(BlobIndex::open(dir).await.unwrap());
    let ctx = NodeContext::new(dir, Arc::new(DirLock::take(dir).unwrap()), content.clone(), index.clone(), config);
    let faults = ctx.faults.clone();
    let node::Started { supervisor: sup, done, handle } = node::start(ctx).await.unwrap();
    Started { handle, sup, done, content, index, faults }
}

async fn put(handle: &NodeHandle, content: &ContentStore, path: &str, bytes: &[u8]) -> Result<i64, String> {
    let blob = content.import_reader(bytes, |_| {}).unwrap();
    let entry = file_entry(&blob, 0o644, 0);
    let op = WriteOp::Commit { scope: Scope::new("default", "main"), items: vec![(TreePath::parse(path).unwrap(), entry, blob)], attrs: vec![] };
    match handle.write(op).await.map_err(|e| e.to_string())? {
        WriteOutcome::Seqs(s) => Ok(s[0]),
        other => panic!("unexpected outcome {other:?}"),
    }
}

async fn restarts_of(handle: &NodeHandle, child: Child) -> u64 {
    handle.health().await.unwrap().into_iter().find(|h| h.name == child.name()).unwrap().restarts
}

async fn wait_running(handle: &NodeHandle, child: Child, restarts: u64) {
    let t = Instant::now();
    loop {
        let h = handle.health().await.unwrap().into_iter().find(|h| h.name == child.name()).unwrap();
        if h.restarts >= restarts && h.state == "running" {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{} not back: {h:?}", child.name());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_child_restarts_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let Started { handle, sup, content, .. } = start(dir.path(), NodeConfig::default()).await;
    let mut acked = Vec::new();
    for (i, child) in Child::ALL.into_iter().enumerate() {
        acked.push((format!("/before-{i}"), put(&handle, &content, &format!("/before-{i}"), format!("b{i}").as_bytes()).await.unwrap()));
        handle.inject_panic(child).unwrap();
        wait_running(&handle, child, 1).await;
        // The first write after a store restart goes over a dead line and must be re-sent.
        let path = format!("/after-{i}");
        put(&handle, &content, &path, format!("a{i}").as_bytes()).await.unwrap();
        assert_eq!(restarts_of(&handle, child).await, 1);
        let last = handle.health().await.unwrap().into_iter().find(|h| h.name == child.name()).unwrap().last_failure.unwrap();
        assert!(last.contains("fault injection"), "{last}");
    }
    node::stop(&sup).await;
    // Everything acknowledged is there.
    let engine = Engine::open(dir.path(), alknet_actors::engine::Access::Read).unwrap();
    let names: Vec<String> = engine.list(&Scope::new("default", "main"), &TreePath::root()).unwrap().iter().map(|r| r.path.name().to_string()).collect();
    for i in 0..4 {
        assert!(names.contains(&format!("before-{i}")) && names.contains(&format!("after-{i}")), "{names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_keeps_failing_escalates() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig { restart_budget: 1, restart_window: Duration::from_secs(60), ..NodeConfig::default() };
    let Started { handle, done, .. } = start(dir.path(), config).await;
    handle.inject_panic(Child::Gc).unwrap();
    wait_running(&handle, Child::Gc, 1).await;
    handle.inject_panic(Child::Gc).unwrap();
    // Past the budget the supervisor stops: the node's join handle completes.
    tokio::time::timeout(Duration::from_secs(10), done).await.expect("supervisor did not escalate").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_that_fails_counts_as_a_failure_and_is_retried_under_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let Started { handle, sup, content, faults, .. } = start(dir.path(), NodeConfig::default()).await;
    // The outbox panics, and its next two starts fail too: four failures in all, within the
    // budget of five. The node must ride it out, not end at the first failed restart.
    faults.fail_next_starts(Child::Outbox, 2);
    handle.inject_panic(Child::Outbox).unwrap();
    wait_running(&handle, Child::Outbox, 1).await;
    let health = handle.health().await.unwrap().into_iter().find(|h| h.name == Child::Outbox.name()).unwrap();
    assert_eq!(health.restarts, 1, "{health:?}");
    put(&handle, &content, "/after", b"served").await.unwrap();
    node::stop(&sup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_that_keep_failing_escalate_like_any_failure() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig { restart_budget: 2, restart_window: Duration::from_secs(60), ..NodeConfig::default() };
    let Started { handle, done, faults, .. } = start(dir.path(), config).await;
    faults.fail_next_starts(Child::Gc, 100);
    handle.inject_panic(Child::Gc).unwrap();
    tokio::time::timeout(Duration::from_secs(10), done).await.expect("a child that never starts again did not escalate").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_run_side_by_side_in_one_process() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(dir_a.path(), NodeConfig::default()).await;
    let b = start(dir_b.path(), NodeConfig::default()).await;
    put(&a.handle, &a.content, "/on-a", b"a").await.unwrap();
    put(&b.handle, &b.content, "/on-b", b"b").await.unwrap();
    // A fault in one node's store restarts that store alone.
    a.handle.inject_panic(Child::Store).unwrap();
    wait_running(&a.handle, Child::Store, 1).await;
    assert_eq!(restarts_of(&b.handle, Child::Store).await, 0);
    put(&a.handle, &a.content, "/on-a-again", b"a").await.unwrap();
    put(&b.handle, &b.content, "/on-b-again", b"b").await.unwrap();
    node::stop(&a.sup).await;
    node::stop(&b.sup).await;
    for (dir, mine, theirs) in [(&dir_a, "on-a", "on-b"), (&dir_b, "on-b", "on-a")] {
        let engine = Engine::open(dir.path(), alknet_actors::engine::Access::Read).unwrap();
        let names: Vec<String> = engine.list(&Scope::new("default", "main"), &TreePath::root()).unwrap().iter().map(|r| r.path.name().to_string()).collect();
        assert_eq!(names, [mine.to_string(), format!("{mine}-again")], "each node wrote its own store only (not {theirs})");
    }
}

/// From `tree.db-shm`, the WAL index SQLite shares between connections (native byte order):
/// the frames in the log (`mxFrame`, byte 16 of its header) and how many of them are copied
/// into the database file (`nBackfill`, byte 96).
fn wal_frames(dir: &std::path::Path) -> (u32, u32) {
    let shm = std::fs::read(dir.join("tree.db-shm")).unwrap();
    let at = |o: usize| u32::from_ne_bytes(shm[o..o + 4].try_into().unwrap());
    (at(16), at(96))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_reach_the_database_file_soon_after_the_store_goes_quiet() {
    // Commits run with synchronous=NORMAL: the WAL is synced when it is checkpointed. SQLite
    // alone checkpoints at 10,000 frames (or when the last connection closes), so a node
    // writing a little would keep its commits off the disk for hours.
    let dir = tempfile::tempdir().unwrap();
    let n = start(dir.path(), NodeConfig::default()).await;
    for i in 0..50 {
        put(&n.handle, &n.content, &format!("/f{i}"), b"bytes").await.unwrap();
    }
    let (frames, _) = wal_frames(dir.path());
    assert!(frames > 0, "the commits are in the WAL");
    let t = Instant::now();
    loop {
        let (frames, copied) = wal_frames(dir.path());
        if copied == frames {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "not checkpointed after the store went quiet: {copied} of {frames} frames copied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node::stop(&n.sup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_get_indexed_and_freed_ones_leave_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let Started { handle, sup, content, index, .. } = start(dir.path(), NodeConfig::default()).await;
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    put(&handle, &content, "/big", &big).await.unwrap();
    put(&handle, &content, "/small", b"small").await.unwrap();
    let t = Instant::now();
    while handle.blob_stats().await.unwrap().indexed < 2 {
        assert!(t.elapsed() < Duration::from_secs(15), "blobs not indexed: {:?}", handle.blob_stats().await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(index.tagged().await.unwrap().len(), 2);
    assert_eq!(index.verified_bytes(&alknet_actors::proto::entry::ContentHash(*blake3::hash(&big).as_bytes())).await.unwrap(), big);
    handle.write(WriteOp::Remove { scope: Scope::new("default", "main"), path: TreePath::parse("/big").unwrap(), recursive: false }).await.unwrap();
    let report = handle.gc(Some(0), Some(0)).await.unwrap();
    assert_eq!(report.blobs_freed, 1, "{report:?}");
    let t = Instant::now();
    while index.tagged().await.unwrap().len() != 1 {
        assert!(t.elapsed() < Duration::from_secs(10), "the freed blob's tag stayed in the index");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node::stop(&sup).await;
}
