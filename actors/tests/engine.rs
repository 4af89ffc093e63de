//! The engine through its API, on real data dirs: write sessions, branches and merges,
//! buckets, the outbox. (The CLI's end-to-end tests live in the root package's tests/.)

use std::fs;

use alknet_actors::engine::{Access, Engine, Scope};
use alknet_actors::proto::ids::VersionRef;
use alknet_actors::store::outbox;

mod common;
use common::{fresh, get, main_scope, names, p, put};

#[test]
fn readers_see_the_old_version_until_commit_and_abort_leaves_nothing() {
    let (dir, mut engine) = fresh();
    let s = main_scope();
    put(&mut engine, &s, "/doc", b"old");
    let big = vec![7u8; 100_000];
    let mut session = engine.open_session(&s, &p("/doc"), true).unwrap();
    session.write_at(0, &big).unwrap();
    // A second, lockless reader process would see this: the committed version.
    let reader = Engine::open(dir.path(), Access::Read).unwrap();
    assert_eq!(get(&reader, &s, "/doc").unwrap(), b"old");
    assert_eq!(get(&engine, &s, "/doc").unwrap(), b"old");
    engine.commit(&s, vec![session]).unwrap();
    assert_eq!(get(&reader, &s, "/doc").unwrap(), big);

    let history_before = engine.log(&s, &p("/doc")).unwrap().len();
    let mut aborted = engine.open_session(&s, &p("/doc"), true).unwrap();
    aborted.write_at(0, b"never").unwrap();
    drop(aborted);
    assert_eq!(get(&engine, &s, "/doc").unwrap(), big);
    assert_eq!(engine.log(&s, &p("/doc")).unwrap().len(), history_before, "an abort wrote history");
    let staging = fs::read_dir(dir.path().join("content/staging")).unwrap().count();
    assert_eq!(staging, 0, "an aborted session left its staging file");
}

#[test]
fn sessions_take_writes_in_any_order_sparse_and_truncated() {
    let (_dir, mut engine) = fresh();
    let s = main_scope();
    put(&mut engine, &s, "/f", b"0123456789");
    // Not truncated: starts from the current bytes.
    let mut a = engine.open_session(&s, &p("/f"), false).unwrap();
    a.write_at(8, b"XYZ").unwrap();
    a.write_at(0, b"ab").unwrap();
    let mut b = engine.open_session(&s, &p("/sparse"), true).unwrap();
    b.write_at(40_000, b"tail").unwrap();
    b.write_at(10, b"head").unwrap();
    let mut c = engine.open_session(&s, &p("/cut"), true).unwrap();
    c.write_at(0, &[1u8; 50_000]).unwrap();
    c.truncate(3).unwrap();
    engine.commit(&s, vec![a, b, c]).unwrap();
    assert_eq!(get(&engine, &s, "/f").unwrap(), b"ab234567XYZ");
    let sparse = get(&engine, &s, "/sparse").unwrap();
    assert_eq!(sparse.len(), 40_004);
    assert_eq!(&sparse[10..14], b"head");
    assert!(sparse[14..40_000].iter().all(|b| *b == 0));
    assert_eq!(get(&engine, &s, "/cut").unwrap(), vec![1u8; 3]);
}

#[test]
fn a_multi_file_commit_is_all_or_nothing() {
    let (_dir, mut engine) = fresh();
    let s = main_scope();
    put(&mut engine, &s, "/blocker", b"a file");
    let mut ok = engine.open_session(&s, &p("/a/new"), true).unwrap();
    ok.write_at(0, b"fine").unwrap();
    // The parent of this one is a file: the whole commit must fail.
    let mut bad = engine.open_session(&s, &p("/blocker/child"), true).unwrap();
    bad.write_at(0, b"nope").unwrap();
    let err = engine.commit(&s, vec![ok, bad]).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
    assert_eq!(get(&engine, &s, "/a/new"), None, "half of a failed commit is visible");
    assert_eq!(names(&engine, &s, "/"), ["blocker"]);
}

#[test]
fn identical_content_is_stored_once_across_paths_branches_and_buckets() {
    let (dir, mut engine) = fresh();
    let s = main_scope();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    put(&mut engine, &s, "/one", &data);
    engine.create_bucket("other").unwrap();
    engine.create_branch(&s, "b", None).unwrap();
    put(&mut engine, &Scope::new("default", "b"), "/two", &data);
    put(&mut engine, &Scope::new("other", "main"), "/three", &data);
    let files: Vec<_> = walk(&dir.path().join("content")).into_iter().filter(|f| !f.contains("staging")).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(get(&engine, &Scope::new("other", "main"), "/three").unwrap(), data);
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

#[test]
fn buckets_do_not_see_each_other() {
    let (_dir, mut engine) = fresh();
    engine.create_bucket("tenant-b").unwrap();
    let (a, b) = (main_scope(), Scope::new("tenant-b", "main"));
    put(&mut engine, &a, "/secret", b"a's");
    assert_eq!(get(&engine, &b, "/secret"), None);
    assert!(names(&engine, &b, "/").is_empty());
    // A version id from bucket a cannot be restored into bucket b.
    let id = engine.log(&a, &p("/secret")).unwrap()[0].id();
    assert!(engine.restore(&b, &p("/secret"), &VersionRef::parse(&id.to_string()).unwrap()).is_err());
    // Branches are per bucket too.
    engine.create_branch(&a, "feature", None).unwrap();
    assert!(engine.merge(&b, "feature", None).is_err());
    let err = engine.put_reader(&Scope::new("nope", "main"), &b"x"[..], &p("/x"), |_| {}).unwrap_err();
    assert!(err.to_string().contains("bucket create"), "{err}");
}

#[test]
fn a_branch_is_a_snapshot_of_its_parent_at_the_fork() {
    let (_dir, mut engine) = fresh();
    let main = main_scope();
    put(&mut engine, &main, "/a", b"a1");
    engine.create_branch(&main, "f", None).unwrap();
    let f = Scope::new("default", "f");
    put(&mut engine, &main, "/a", b"a2");
    put(&mut engine, &main, "/late", b"late");
    assert_eq!(get(&engine, &f, "/a").unwrap(), b"a1");
    assert_eq!(get(&engine, &f, "/late"), None);
    put(&mut engine, &f, "/mine", b"m");
    engine.remove(&f, &p("/a"), false).unwrap();
    assert_eq!(get(&engine, &main, "/mine"), None);
    assert_eq!(get(&engine, &main, "/a").unwrap(), b"a2");
    assert_eq!(names(&engine, &f, "/"), ["mine"]);
}

#[test]
fn chains_are_bounded() {
    let (_dir, mut engine) = fresh();
    let mut from = "main".to_string();
    let mut made = 0;
    for i in 0..64 {
        let name = format!("b{i}");
        match engine.create_branch(&main_scope(), &name, Some(&from)) {
            Ok(_) => {
                made += 1;
                from = name;
            }
            Err(e) => {
                assert!(e.to_string().contains("shallower"), "{e}");
                break;
            }
        }
    }
    // main is depth 0; the deepest fork has a chain of exactly the limit's links.
    assert_eq!(made, alknet_actors::proto::limits::BRANCH_CHAIN_DEPTH_MAX - 1, "nested branches made before the limit");
    put(&mut engine, &Scope::new("default", &from), "/deep", b"ok");
}

#[test]
fn every_committed_mutation_has_one_event_and_a_rollback_has_none() {
    let (dir, mut engine) = fresh();
    let s = main_scope();
    let start = outbox::head(engine.tree().conn()).unwrap();
    put(&mut engine, &s, "/a", b"1");
    engine.mkdir(&s, &p("/d"), false).unwrap();
    engine.rename(&s, &p("/a"), &p("/d")).unwrap();
    engine.remove(&s, &p("/d"), true).unwrap();
    engine.create_branch(&s, "f", None).unwrap();
    engine.merge(&s, "f", None).unwrap();
    engine.delete_branch(&s, "f").unwrap();
    assert!(engine.remove(&s, &p("/missing"), false).is_err());
    assert!(engine.mkdir(&s, &p("/x/y"), false).is_err());
    let events = outbox::read_after(engine.tree().conn(), start, 100).unwrap();
    let ops: Vec<_> = events.iter().map(|(_, e)| e.op.as_str()).collect();
    assert_eq!(ops, ["write", "mkdir", "rename", "delete", "branch-create", "merge", "branch-delete"]);
    assert_eq!(events[2].1.to.as_deref(), Some("/d/a"));

    // A consumer's cursor survives closing and reopening the store.
    let conn = engine.tree().conn();
    outbox::save_cursor(conn, "gc", events[3].0, alknet_actors::engine::now_ms()).unwrap();
    drop(engine);
    let engine = Engine::open(dir.path(), Access::Read).unwrap();
    let cursor = outbox::cursor(engine.tree().conn(), "gc").unwrap();
    let rest = outbox::read_after(engine.tree().conn(), cursor, 100).unwrap();
    assert_eq!(rest.len(), 3);

    // Pruning drops what every consumer passed; the head (newest offset ever) stays put.
    let head = outbox::head(engine.tree().conn()).unwrap();
    drop(engine);
    let mut engine = Engine::open(dir.path(), Access::Write).unwrap();
    let now = alknet_actors::engine::now_ms();
    outbox::save_cursor(engine.tree().conn(), "watch-all", head, now).unwrap();
    outbox::save_cursor(engine.tree().conn(), "gc", head, now).unwrap();
    let report = engine.gc(alknet_actors::gc::Retention::default()).unwrap();
    assert!(report.events_pruned >= 7, "{report:?}");
    assert_eq!(outbox::head(engine.tree().conn()).unwrap(), head);
}

#[test]
fn a_second_writer_is_refused_with_a_clear_message() {
    let (dir, engine) = fresh();
    let err = Engine::open(dir.path(), Access::Write).err().expect("second writer opened");
    assert!(err.to_string().contains("in use"), "{err}");
    // Readers are welcome.
    Engine::open(dir.path(), Access::Read).unwrap();
    drop(engine);
    Engine::open(dir.path(), Access::Write).unwrap();
}

/// A store an older alkfs wrote (schema 1) with names in NFD, as files copied from a Mac
/// arrive: the upgrade rewrites them in NFC, so they stay reachable by either form and one
/// name is one path.
#[test]
fn an_older_store_with_nfd_names_is_rewritten_in_nfc_on_upgrade() {
    use alknet_actors::store::schema::MIGRATIONS;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tree.db");
    {
        let conn = honker_core::open_conn(db.to_str().unwrap(), false).unwrap();
        honker_core::bootstrap_honker_schema(&conn).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        let hash = blake3::hash(b"old bytes");
        conn.execute_batch(&format!(
            "PRAGMA user_version = 1;
             INSERT INTO bucket VALUES (1, 'default', 0);
             INSERT INTO branch(id, bucket_id, name, parent_id, fork_seq, depth, created_ms) VALUES (1, 1, 'main', NULL, 0, 0, 0);
             INSERT INTO version VALUES (1, '/', 'cafe\u{301}', 1, 'd', x'{empty}', 0, 493, 0, 0, 'mkdir');
             INSERT INTO version VALUES (1, '/cafe\u{301}', 're\u{301}sume\u{301}.txt', 2, 'f', x'{hash}', 9, 420, 0, 0, 'write');
             INSERT INTO blob(hash, size, data) VALUES (x'{hash}', 9, CAST('old bytes' AS BLOB));
             UPDATE clock SET seq = 2;",
            empty = alknet_actors::proto::entry::ContentHash::EMPTY.to_hex(),
            hash = hash.to_hex()
        ))
        .unwrap();
    }
    std::fs::create_dir_all(dir.path().join("content/staging")).unwrap();
    let mut engine = Engine::open(dir.path(), Access::Write).unwrap();
    let s = main_scope();
    assert_eq!(names(&engine, &s, "/"), ["caf\u{e9}"], "the directory's name is NFC now");
    assert_eq!(get(&engine, &s, "/caf\u{e9}/r\u{e9}sum\u{e9}.txt").unwrap(), b"old bytes", "found by its NFC name");
    assert_eq!(get(&engine, &s, "/cafe\u{301}/re\u{301}sume\u{301}.txt").unwrap(), b"old bytes", "and by its NFD name");
    put(&mut engine, &s, "/caf\u{e9}/r\u{e9}sum\u{e9}.txt", b"new bytes");
    assert_eq!(names(&engine, &s, "/caf\u{e9}"), ["r\u{e9}sum\u{e9}.txt"], "one path, not two");
    assert_eq!(engine.log(&s, &p("/cafe\u{301}/re\u{301}sume\u{301}.txt")).unwrap().len(), 2, "the old row is the path's history");
}

/// A store an older alkfs wrote (schema 2), whose wall clock once went back between two
/// writes of a path, with a branch forked by seq: the upgrade to global names keeps every
/// head and every branch's view as they were, names each version `seq@this node`, and links
/// each to the one it replaced.
#[test]
fn an_older_store_keeps_its_heads_and_forks_when_versions_get_global_names() {
    use alknet_actors::store::schema::MIGRATIONS;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tree.db");
    let (one, two, three) = (blake3::hash(b"one"), blake3::hash(b"two"), blake3::hash(b"three"));
    {
        let conn = honker_core::open_conn(db.to_str().unwrap(), false).unwrap();
        honker_core::bootstrap_honker_schema(&conn).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute_batch(MIGRATIONS[1]).unwrap();
        // seq 2 was written at a wall clock earlier than seq 1's; feat forked at seq 2, then
        // main moved on (seq 3), which feat must not see.
        conn.execute_batch(&format!(
            "PRAGMA user_version = 2;
             INSERT INTO bucket VALUES (1, 'default', 0);
             INSERT INTO branch(id, bucket_id, name, parent_id, fork_seq, depth, created_ms) VALUES (1, 1, 'main', NULL, 0, 0, 0);
             INSERT INTO branch(id, bucket_id, name, parent_id, fork_seq, depth, created_ms) VALUES (2, 1, 'feat', 1, 2, 1, 0);
             INSERT INTO version VALUES (1, '/', 'f', 1, 'f', x'{one}', 3, 420, 0, 5000, 'write', 0);
             INSERT INTO version VALUES (1, '/', 'f', 2, 'f', x'{two}', 3, 420, 0, 4000, 'write', 0);
             INSERT INTO version VALUES (1, '/', 'f', 3, 'f', x'{three}', 5, 420, 0, 6000, 'write', 0);
             INSERT INTO blob(hash, size, data) VALUES (x'{one}', 3, CAST('one' AS BLOB)), (x'{two}', 3, CAST('two' AS BLOB)), (x'{three}', 5, CAST('three' AS BLOB));
             UPDATE clock SET seq = 3, seq_leased = 3, last_ms = 6000;",
            one = one.to_hex(),
            two = two.to_hex(),
            three = three.to_hex(),
        ))
        .unwrap();
    }
    std::fs::create_dir_all(dir.path().join("content/staging")).unwrap();
    assert!(!dir.path().join("node.key").exists());
    let mut engine = Engine::open(dir.path(), Access::Write).unwrap();
    assert!(dir.path().join("node.key").exists(), "the upgrade made the node's key");
    let me = engine.tree().me();
    let (main, feat) = (main_scope(), Scope::new("default", "feat"));
    assert_eq!(get(&engine, &main, "/f").unwrap(), b"three");
    assert_eq!(get(&engine, &feat, "/f").unwrap(), b"two", "the fork by seq still sees main as it was at seq 2, though seq 2's clock read earlier");
    let log = engine.log(&main, &p("/f")).unwrap();
    let ids: Vec<String> = log.iter().map(|r| r.id().to_string()).collect();
    assert_eq!(ids, [3, 2, 1].map(|n| format!("{n}@{}", me.short())), "newest first, named seq@this node");
    assert_eq!(log[0].pred, Some(log[1].id()));
    assert_eq!(log[1].pred, Some(log[2].id()));
    assert_eq!(log[2].pred, None);
    // New writes come after the old ones whatever the migrated stamps say.
    put(&mut engine, &main, "/f", b"four");
    assert_eq!(get(&engine, &main, "/f").unwrap(), b"four");
    let log = engine.log(&main, &p("/f")).unwrap();
    assert_eq!(log[0].pred, Some(log[1].id()));
}
