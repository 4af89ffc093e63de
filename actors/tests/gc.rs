//! Garbage collection on real data dirs: what it frees, what it must never free.

use alknet_actors::engine::Scope;
use alknet_actors::gc::Retention;

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

#[test]
fn a_blob_held_by_a_write_in_flight_is_never_freed() {
    // Race GC against imports that dedup onto a blob nothing references: many iterations.
    let (_dir, mut engine) = fresh();
    let main = Scope::new("default", "main");
    let data = bytes(9, 200_000);
    for round in 0..50 {
        // The blob exists but nothing names it any more.
        engine.put_reader(&main, &data[..], &p("/x"), |_| {}).unwrap();
        engine.remove(&main, &p("/x"), false).unwrap();
        // A write in flight imports the same bytes (dedups onto the existing file) ...
        let imported = engine.content().import_reader(&data[..], |_| {}).unwrap();
        // ... GC runs before its commit ...
        let report = engine.gc(ONLY_HEADS).unwrap();
        assert!(report.blobs_held >= 1, "round {round}: {report:?}");
        // ... and the commit still finds its bytes.
        let entry = alknet_actors::proto::entry::Entry {
            kind: alknet_actors::proto::entry::EntryKind::File,
            hash: imported.hash,
            size: imported.size,
            mode: 0o644,
            mtime_ms: 0,
        };
        engine.commit_entries(&main, &[(p("/y"), entry.clone(), imported)]).unwrap();
        let mut out = Vec::new();
        engine.read_entry(&entry, &mut out, |_| {}).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(out, data);
        engine.remove(&main, &p("/y"), false).unwrap();
    }
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
