//! Helpers shared by the engine-level tests.

use std::sync::Arc;

use alknet_actors::engine::{Access, Engine, EngineError, Scope};
use alknet_actors::proto::clock::ManualClock;
use alknet_actors::proto::path::TreePath;
use alknet_actors::store::StoreError;

/// A path, parsed (test input is always valid).
pub fn p(s: &str) -> TreePath {
    TreePath::parse(s).unwrap()
}

/// A new data dir with an initialised store, opened for writing.
pub fn fresh() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    Engine::init(dir.path()).unwrap();
    let engine = Engine::open(dir.path(), Access::Write).unwrap();
    (dir, engine)
}

/// A new store whose engine takes its time from a clock the test sets (it starts at
/// 2026-01-01T00:00:00Z and moves only when told).
#[allow(dead_code)]
pub fn fresh_with_clock() -> (tempfile::TempDir, Engine, Arc<ManualClock>) {
    let (dir, engine) = fresh();
    let clock = Arc::new(ManualClock::new(1_767_225_600_000));
    (dir, engine.with_clock(clock.clone()), clock)
}

/// The `main` branch of the default bucket.
#[allow(dead_code)]
pub fn main_scope() -> Scope {
    Scope::new("default", "main")
}

/// Stores `bytes` at `path`; returns its version.
#[allow(dead_code)]
pub fn put(engine: &mut Engine, scope: &Scope, path: &str, bytes: &[u8]) -> i64 {
    engine.put_reader(scope, bytes, &p(path), |_| {}).unwrap()
}

/// The bytes at `path`, `None` when there is no file there.
#[allow(dead_code)]
pub fn get(engine: &Engine, scope: &Scope, path: &str) -> Option<Vec<u8>> {
    let entry = match engine.file_entry(scope, &p(path)) {
        Ok(e) => e,
        Err(EngineError::Store(StoreError::NotFound(_))) => return None,
        Err(e) => panic!("get {path}: {e}"),
    };
    let mut out = Vec::new();
    engine.read_entry(&entry, &mut out, |_| {}).unwrap();
    Some(out)
}

/// The names in directory `dir`.
#[allow(dead_code)]
pub fn names(engine: &Engine, scope: &Scope, dir: &str) -> Vec<String> {
    engine.list(scope, &p(dir)).unwrap().iter().map(|r| r.path.name().to_string()).collect()
}

/// Delivers sync message `msg` of document `doc` from store `x` to store `y`, then each
/// answer back the other way, until a side has nothing to say: what a session does with a
/// message (`proto::fanout`; a store's answer counts as sent once made). Returns how many
/// messages were delivered. (Used by the mesh and replica tests.)
#[allow(dead_code)]
pub fn deliver(x: (&mut alknet_actors::engine::mesh::Mesh, &mut Engine), y: (&mut alknet_actors::engine::mesh::Mesh, &mut Engine), uid: &alknet_actors::proto::ids::Uid, doc: u16, msg: Vec<u8>) -> usize {
    let (idx, idy) = (x.1.tree().me(), y.1.tree().me());
    let (mut n, mut next) = (0, Some((true, msg)));
    while let Some((to_y, m)) = next.take() {
        n += 1;
        assert!(n < 100, "no end to the exchange on document {doc}");
        let received = if to_y { y.0.receive(y.1, &idx, uid, doc, &m) } else { x.0.receive(x.1, &idy, uid, doc, &m) };
        next = received.unwrap().answer.map(|a| (!to_y, a));
    }
    n
}
