//! The node's actor tree in-process, through its handle, on a real data dir: restarts keep
//! the node serving; a child that keeps failing escalates.
//!
//! Actor names are process-global, so each test here starts its own node and nextest runs
//! every test in its own process (the project's test command).

use std::sync::Arc;
use std::time::{Duration, Instant};

use alknet_actors::content::ContentStore;
use alknet_actors::engine::{file_entry, DirLock, Engine, Scope};
use alknet_actors::index::BlobIndex;
use alknet_actors::node::store::{WriteOp, WriteOutcome};
use alknet_actors::node::{self, Child, NodeConfig, NodeContext, NodeHandle};
use alknet_actors::proto::path::TreePath;

async fn start(dir: &std::path::Path, config: NodeConfig) -> (NodeHandle, ractor::ActorRef<node::supervisor::SupervisorMsg>, tokio::task::JoinHandle<()>, ContentStore) {
    Engine::init(dir).unwrap();
    let content = ContentStore::open(&dir.join("content")).unwrap();
    let ctx = NodeContext {
        dir: dir.to_path_buf(),
        lock: Arc::new(DirLock::take(dir).unwrap()),
        content: content.clone(),
        index: Arc::new(BlobIndex::open(dir).await.unwrap()),
        config,
        last_commit_ms: Default::default(),
    };
    let (sup, done) = node::start(ctx).await.unwrap();
    (NodeHandle::default(), sup, done, content)
}

async fn put(handle: &NodeHandle, content: &ContentStore, path: &str, bytes: &[u8]) -> Result<i64, String> {
    let blob = content.import_reader(bytes, |_| {}).unwrap();
    let entry = file_entry(&blob, 0o644, 0);
    let op = WriteOp::Commit { scope: Scope::new("default", "main"), items: vec![(TreePath::parse(path).unwrap(), entry, blob)] };
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
    let (handle, sup, _done, content) = start(dir.path(), NodeConfig::default()).await;
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
    let (handle, _sup, done, _content) = start(dir.path(), config).await;
    handle.inject_panic(Child::Gc).unwrap();
    wait_running(&handle, Child::Gc, 1).await;
    handle.inject_panic(Child::Gc).unwrap();
    // Past the budget the supervisor stops: the node's join handle completes.
    tokio::time::timeout(Duration::from_secs(10), done).await.expect("supervisor did not escalate").unwrap();
}
