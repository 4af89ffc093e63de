//! Helpers shared by the engine-level tests.

use alknet_actors::engine::{Access, Engine};
use alknet_actors::proto::path::TreePath;

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
