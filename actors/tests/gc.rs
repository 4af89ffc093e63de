//! Garbage collection on real data dirs: what it frees, what it must never free.

use alknet_actors::engine::Scope;
use alknet_actors::gc::Retention;
use alknet_actors::proto::clock::Clock;

mod common;
use common::{fresh, p};

fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn du(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() { du(&e.path()) } else { m.len() };
    }
    total
}

const ONLY_HEADS: Retention = Retention { keep_versions: 0, keep_days: 0, outbox_keep_days: 1 };

#[test]
fn frees_blobs_of_deleted_paths_branches_and_expired_versions_and_the_disk_shrinks() {
    let (dir, mut engine) = fresh();
    let main = Scope::new("default", "main");
    engine.put_reader(&main, &bytes(1, 3_000_000)[..], &p("/deleted"), |_| {}).unwrap();
    engine.put_reader(&main, &bytes(2, 3_000_000)[..], &p("/edited"), |_| {}).unwrap();
    engine.put_reader(&main, &bytes(3, 3_000_000)[..], &p("/edited"), |_| {}).unwrap();
    engine.put_reader(&main, &bytes(4, 3_000_000)[..], &p("/kept"), |_| {}).unwrap();
    engine.create_branch(&main, "scratch", None).unwrap();
    engine.put_reader(&Scope::new("default", "scratch"), &bytes(5, 3_000_000)[..], &p("/only-on-branch"), |_| {}).unwrap();
    engine.remove(&main, &p("/deleted"), false).unwrap();
    engine.delete_branch(&main, "scratch").unwrap();

    // With generous retention only the deleted branch's blob goes.
    let report = engine.gc(Retention::default()).unwrap();
    assert_eq!(report.blobs_freed, 1, "{report:?}");
    let before = du(&dir.path().join("content"));
    let report = engine.gc(ONLY_HEADS).unwrap();
    assert_eq!(report.blobs_freed, 2, "{report:?}"); // /deleted and the first /edited
    let after = du(&dir.path().join("content"));
    assert!(before - after >= 6_000_000, "disk shrank by {} bytes only", before - after);
    let mut out = Vec::new();
    let kept = engine.file_entry(&main, &p("/kept")).unwrap();
    engine.read_entry(&kept, &mut out, |_| {}).unwrap();
    assert_eq!(out, bytes(4, 3_000_000));
    assert_eq!(engine.log(&main, &p("/edited")).unwrap().len(), 1);
    assert_eq!(engine.gc(ONLY_HEADS).unwrap().blobs_freed, 0, "a second run freed more");
}

#[test]
fn a_child_branch_keeps_what_it_sees_of_its_parent() {
    let (_dir, mut engine) = fresh();
    let main = Scope::new("default", "main");
    engine.put_reader(&main, &bytes(1, 100_000)[..], &p("/f"), |_| {}).unwrap();
    engine.create_branch(&main, "child", None).unwrap();
    engine.put_reader(&main, &bytes(2, 100_000)[..], &p("/f"), |_| {}).unwrap();
    // main's old /f is the child's current /f: retention must keep it.
    engine.gc(ONLY_HEADS).unwrap();
    let child = Scope::new("default", "child");
    let entry = engine.file_entry(&child, &p("/f")).unwrap();
    let mut out = Vec::new();
    engine.read_entry(&entry, &mut out, |_| {}).unwrap();
    assert_eq!(out, bytes(1, 100_000));
    // Deleting the parent's *name* does not free what a child reads through it.
    engine.create_branch(&main, "mid", None).unwrap();
    engine.create_branch(&main, "leaf", Some("mid")).unwrap();
    engine.delete_branch(&main, "mid").unwrap();
    engine.gc(ONLY_HEADS).unwrap();
    assert!(engine.file_entry(&Scope::new("default", "leaf"), &p("/f")).is_ok());
}

/// GC and imports race for real: one thread collects without pause while another, over and
/// over, makes a blob garbage and then, once a collection is under way (one that started
/// after the blob became garbage, so it will free it), imports the same bytes again outside
/// the engine's lock and commits. The import's hold lands before GC's check, between its
/// check and its delete, or after the delete, as the threads fall; in every case the commit
/// must find its bytes.
#[test]
fn gc_racing_imports_that_dedup_onto_a_garbage_blob_never_loses_their_bytes() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    const ROUNDS: usize = 300;
    let (_dir, engine) = fresh();
    let content = engine.content().clone();
    let engine = Arc::new(Mutex::new(engine));
    let main = Scope::new("default", "main");
    let data = bytes(9, 200_000);
    let done = Arc::new(AtomicBool::new(false));
    let collecting = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicU64::new(0));
    let collector = {
        let (engine, done, collecting, held) = (engine.clone(), done.clone(), collecting.clone(), held.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let mut e = engine.lock().unwrap();
                collecting.store(true, Ordering::SeqCst);
                let report = e.gc(ONLY_HEADS).unwrap();
                collecting.store(false, Ordering::SeqCst);
                drop(e);
                held.fetch_add(report.blobs_held, Ordering::SeqCst);
                // Let the other thread take the lock (std's mutex is not fair).
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    let mut raced = 0;
    for round in 0..ROUNDS {
        {
            let mut e = engine.lock().unwrap();
            e.put_reader(&main, &data[..], &p("/x"), |_| {}).unwrap();
            e.remove(&main, &p("/x"), false).unwrap(); // the blob is garbage now
        }
        // Wait (briefly) for a collection to be under way, then import while it runs.
        let waited = std::time::Instant::now();
        while !collecting.load(Ordering::SeqCst) && waited.elapsed() < std::time::Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        raced += usize::from(collecting.load(Ordering::SeqCst));
        let imported = content.import_reader(&data[..], |_| {}).unwrap();
        let entry = alknet_actors::engine::file_entry(&imported, 0o644, 0);
        let mut e = engine.lock().unwrap();
        e.commit_entries(&main, &[(p("/y"), entry.clone(), imported)]).unwrap();
        let mut out = Vec::new();
        e.read_entry(&entry, &mut out, |_| {}).unwrap_or_else(|err| panic!("round {round}: the committed blob is gone: {err}"));
        assert_eq!(out, data, "round {round}");
        e.remove(&main, &p("/y"), false).unwrap();
    }
    done.store(true, Ordering::SeqCst);
    collector.join().unwrap();
    let held = held.load(Ordering::SeqCst);
    println!("{ROUNDS} rounds, {raced} imports started during a collection, {held} times a collection spared a held blob");
    assert!(raced >= ROUNDS / 2, "only {raced} of {ROUNDS} imports ran during a collection: the race was not exercised");
}

/// Consumers idle past the outbox retention expire: they no longer hold events back, and
/// with no active consumer events older than the retention go.
#[test]
fn idle_outbox_consumers_expire_and_hold_nothing_back() {
    use alknet_actors::store::outbox;
    const DAY_MS: i64 = 86_400_000;
    let (_dir, mut engine, clock) = common::fresh_with_clock();
    clock.set(alknet_actors::engine::now_ms()); // events carry the real time of their commit
    let main = Scope::new("default", "main");
    let retention = Retention { outbox_keep_days: 7, ..Retention::default() };
    for i in 0..3 {
        common::put(&mut engine, &main, &format!("/a{i}"), b"a");
    }
    let head = outbox::head(engine.tree().conn()).unwrap();
    outbox::save_cursor(engine.tree().conn(), "stuck-watch", head - 2, clock.now_ms()).unwrap();
    outbox::save_cursor(engine.tree().conn(), "node", head, clock.now_ms()).unwrap();
    // The stuck watcher pins the outbox while it is within retention: only what it passed goes.
    assert_eq!(engine.gc(retention).unwrap().events_pruned, (head - 2) as u64);
    assert_eq!(outbox::oldest(engine.tree().conn()).unwrap(), Some(head - 1));
    clock.advance(8 * DAY_MS);
    common::put(&mut engine, &main, "/later", b"b");
    let head = outbox::head(engine.tree().conn()).unwrap();
    outbox::save_cursor(engine.tree().conn(), "node", head, clock.now_ms()).unwrap();
    // Past retention it expires: everything the active consumer passed goes.
    let report = engine.gc(retention).unwrap();
    assert_eq!(report.events_pruned, 3, "{report:?}");
    assert_eq!(outbox::oldest(engine.tree().conn()).unwrap(), None);
    let listed = outbox::consumers(engine.tree().conn(), clock.now_ms() - 7 * DAY_MS).unwrap();
    let expired: Vec<_> = listed.iter().map(|c| (c.name.as_str(), c.expired)).collect();
    assert_eq!(expired, [("node", false), ("stuck-watch", true)]);
}

#[test]
fn with_no_consumer_events_older_than_the_retention_are_pruned() {
    use alknet_actors::store::outbox;
    let (_dir, mut engine, clock) = common::fresh_with_clock();
    clock.set(alknet_actors::engine::now_ms());
    let main = Scope::new("default", "main");
    for i in 0..4 {
        common::put(&mut engine, &main, &format!("/a{i}"), b"a");
    }
    let retention = Retention { outbox_keep_days: 2, ..Retention::default() };
    assert_eq!(engine.gc(retention).unwrap().events_pruned, 0, "recent events went with no consumer to read them");
    clock.advance(3 * 86_400_000);
    let head = outbox::head(engine.tree().conn()).unwrap();
    assert_eq!(engine.gc(retention).unwrap().events_pruned, head as u64);
    assert!(outbox::read_after(engine.tree().conn(), 0, 100).unwrap().is_empty());
}

#[test]
fn orphan_files_from_a_crash_are_swept() {
    let (dir, mut engine) = fresh();
    // A file placed by an import whose commit never happened.
    let imported = engine.content().import_reader(&bytes(7, 1_000_000)[..], |_| {}).unwrap();
    let path = engine.content().blob_path(&imported.hash);
    drop(imported);
    assert!(path.exists());
    let report = engine.gc(Retention::default()).unwrap();
    assert_eq!(report.blobs_freed, 1);
    assert!(!path.exists());
    assert!(dir.path().join("content/staging").exists(), "gc removed the staging dir");
}
