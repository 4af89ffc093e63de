//! Ids that leave the process (version seqs, outbox offsets) are never handed out twice, not
//! even after a power loss rolls back the last commits: simulated here by putting back the
//! database files as they were at the last durable commit, which is what a disk holds after
//! a power cut under `synchronous=NORMAL` (the WAL is synced only by durable commits).

use std::fs;
use std::path::Path;

use alknet_actors::engine::{Access, Engine};
use alknet_actors::store::outbox;

mod common;
use common::{fresh, main_scope, put};

const DB_FILES: [&str; 2] = ["tree.db", "tree.db-wal"];

fn snapshot(dir: &Path, into: &Path) {
    fs::create_dir_all(into).unwrap();
    for name in DB_FILES {
        let from = dir.join(name);
        if from.exists() {
            fs::copy(&from, into.join(name)).unwrap();
        }
    }
}

/// Puts the snapshot back as the whole database: what survived the power cut.
fn power_cut_back_to(dir: &Path, snap: &Path) {
    for name in DB_FILES.iter().chain(&["tree.db-shm"]) {
        let _ = fs::remove_file(dir.join(name));
    }
    for name in DB_FILES {
        if snap.join(name).exists() {
            fs::copy(snap.join(name), dir.join(name)).unwrap();
        }
    }
}

/// Writes `n` files; returns the version seqs and the outbox offsets they were given.
fn write(engine: &mut Engine, tag: &str, n: usize) -> (Vec<i64>, Vec<i64>) {
    let before = outbox::head(engine.tree().conn()).unwrap();
    let seqs = (0..n).map(|i| put(engine, &main_scope(), &format!("/{tag}-{i}"), format!("{tag} {i}").as_bytes())).collect();
    let offsets = outbox::read_after(engine.tree().conn(), before, 10_000).unwrap().into_iter().map(|(o, _)| o).collect();
    (seqs, offsets)
}

#[test]
fn ids_handed_out_before_a_power_loss_are_never_handed_out_again() {
    let (dir, mut engine) = fresh();
    write(&mut engine, "warm", 3); // the first commit renews the lease durably
    // The disk as of the last durable commit; everything after it rides on NORMAL commits.
    let snap = dir.path().join("snapshot");
    snapshot(dir.path(), &snap);
    let (lost_seqs, lost_offsets) = write(&mut engine, "lost", 50);
    assert_eq!(lost_seqs.len(), 50);
    // The power goes: the disk rolls back to the snapshot (whatever the close wrote after it
    // is gone too).
    drop(engine);
    power_cut_back_to(dir.path(), &snap);

    let mut engine = Engine::open(dir.path(), Access::Write).unwrap();
    assert!(common::get(&engine, &main_scope(), "/lost-0").is_none(), "the snapshot should predate the lost writes");
    let (seqs, offsets) = write(&mut engine, "after", 50);
    let reused: Vec<_> = seqs.iter().filter(|s| lost_seqs.contains(s)).collect();
    assert!(reused.is_empty(), "version ids handed out again after the power loss: {reused:?}");
    let reused: Vec<_> = offsets.iter().filter(|o| lost_offsets.contains(o)).collect();
    assert!(reused.is_empty(), "outbox offsets handed out again after the power loss: {reused:?}");
}

#[test]
fn a_clean_close_gives_the_lease_back_so_ids_run_on_without_a_gap() {
    let (dir, mut engine) = fresh();
    let (first, _) = write(&mut engine, "a", 2);
    drop(engine);
    let mut engine = Engine::open(dir.path(), Access::Write).unwrap();
    let (second, _) = write(&mut engine, "b", 2);
    assert_eq!(second[0], first[1] + 1, "ids skipped after a clean close: {first:?} then {second:?}");
    // A killed process (every commit kept, no clean close) skips at most one lease, and ids
    // still only grow.
    let snap = dir.path().join("at-kill");
    snapshot(dir.path(), &snap);
    drop(engine);
    power_cut_back_to(dir.path(), &snap);
    let mut engine = Engine::open(dir.path(), Access::Write).unwrap();
    let (third, _) = write(&mut engine, "c", 1);
    assert!(third[0] > second[1] && third[0] <= second[1] + 1 + alknet_actors::store::ID_LEASE, "{second:?} then {third:?}");
}
