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
