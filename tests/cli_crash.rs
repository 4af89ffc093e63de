//! Crash safety of the real `alkfs` binary: writers killed with SIGKILL at varying points must
//! leave the store with either the old state or the new one, never a mix, and the store must
//! keep working.

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{await_cond, same_file, write_random_file, Store};

const MB: u64 = 1_000_000;
const ROUNDS: u64 = 8;

/// SIGKILLs `child` after `delay` (if it has not exited); returns true when the kill is what
/// ended it.
fn kill_after(mut child: std::process::Child, delay: Duration) -> bool {
    std::thread::sleep(delay); // the varying point of the crash is the point of the test
    let _ = child.kill(); // SIGKILL; a no-op error if it already exited
    let status = child.wait().unwrap();
    status.signal() == Some(libc::SIGKILL)
}

#[test]
fn a_put_killed_at_any_point_leaves_the_old_or_the_new_file() {
    let s = Store::new();
    let mut old = s.scratch().join("old");
    write_random_file(&old, 20 * MB, 1);
    s.ok(&["put", old.to_str().unwrap(), "/f"]);
    let got = s.scratch().join("got");
    let (mut interrupted, mut completed) = (0, 0);

    for round in 0..ROUNDS {
        let new: PathBuf = s.scratch().join(format!("new-{round}"));
        write_random_file(&new, 200 * MB, 100 + round);
        let delay = Duration::from_millis(20 + round * 40); // 20 ms .. 300 ms
        let child = s.cmd(&["put", new.to_str().unwrap(), "/f"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let killed = kill_after(child, delay);

        s.ok(&["get", "/f", got.to_str().unwrap()]);
        if same_file(&got, &old) {
            assert!(killed, "round {round}: the put exited by itself but /f still holds the old bytes");
            interrupted += 1;
            fs::remove_file(&new).unwrap();
        } else if same_file(&got, &new) {
            completed += 1;
            fs::remove_file(&old).unwrap();
            old = new; // the next round must leave this one or its own
        } else {
            panic!("round {round} (killed after {delay:?}): /f is neither the old nor the new bytes ({} bytes)", fs::metadata(&got).unwrap().len());
        }
        fs::remove_file(&got).unwrap();
        let ls = s.ls_json("/");
        assert_eq!(ls.len(), 1, "round {round}: {ls:?}");
        assert_eq!(ls[0]["size"], fs::metadata(&old).unwrap().len(), "round {round}: ls and get disagree");
    }
    println!("{interrupted} puts interrupted, {completed} completed");
    s.ok(&["mkdir", "/after"]);
    assert!(s.staging_files().is_empty(), "staging files of killed puts survived the next write: {:?}", s.staging_files());
    assert!(interrupted > 0, "no kill landed inside a put: the test did not exercise a crash");
}

/// Where a kill of a merge landed, read while the process was stopped just before it.
#[derive(Debug, PartialEq)]
enum Landed {
    /// Before the merge's transaction began (start-up).
    Before,
    /// Inside the merge's write transaction: the case the test is for.
    Inside,
    /// After it committed.
    After,
}

/// True when some connection holds `db`'s write lock: a write transaction is open.
fn write_transaction_open(db: &std::path::Path) -> bool {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::ZERO).unwrap();
    match conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;") {
        Ok(()) => false,
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => true,
        Err(e) => panic!("probing the write lock: {e}"),
    }
}

/// Runs `merge` and kills it after `delay`: stops it first (SIGSTOP), looks whether its write
/// transaction is open, then SIGKILLs it. Returns whether it was in the transaction, and
/// whether the kill is what ended it.
fn kill_merge_after(s: &Store, branch: &str, delay: Duration) -> (bool, bool) {
    let mut child = s.cmd(&["merge", branch, "--into", "main"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(delay); // the varying point of the crash is the point of the test
    common::send_signal(child.id(), libc::SIGSTOP);
    let inside = write_transaction_open(&s.data().join("tree.db"));
    let _ = child.kill();
    let status = child.wait().unwrap();
    (inside, status.signal() == Some(libc::SIGKILL))
}

#[test]
fn a_merge_killed_at_any_point_is_all_or_nothing() {
    const FILES: usize = 3000;
    const INSIDE_MIN: usize = 4;
    const ROUNDS_MAX: usize = 40;
    let s = Store::new();
    s.put_bytes("/base.txt", b"base");
    let tree = s.scratch().join("tree");
    fs::create_dir(&tree).unwrap();
    let names: Vec<String> = (0..FILES).map(|i| format!("file-{i:04}.txt")).collect();
    for (i, name) in names.iter().enumerate() {
        fs::write(tree.join(name), format!("small file {i}")).unwrap();
    }
    let mut seen = Vec::new();
    // The kill point walks towards the merge's transaction, later after a kill that came too
    // early and earlier after one that came too late, so the machine's speed does not matter;
    // inside it, it moves on, so the kills land at different points of the transaction.
    let mut delay = Duration::from_millis(5);
    for round in 0..ROUNDS_MAX {
        let (branch, dir) = (format!("b{round}"), format!("/m{round}"));
        s.ok(&["branch", "create", &branch, "--from", "main"]);
        s.ok(&["--branch", &branch, "put", "-r", tree.to_str().unwrap(), &dir]);

        let (inside, killed) = kill_merge_after(&s, &branch, delay);
        let merged = s.ls("/").contains(&format!("m{round}/"));
        let landed = match (inside, merged) {
            (true, false) => Landed::Inside,
            (true, true) => panic!("round {round}: the merge committed while its transaction was still open"),
            (false, true) => Landed::After,
            (false, false) => Landed::Before,
        };
        if merged {
            assert_eq!(s.ls(&dir), names, "round {round}: a partial merge reached main");
        } else {
            assert!(killed, "round {round}: the merge exited by itself but merged nothing");
            assert!(s.err(&["ls", &dir]).contains("no such file"), "round {round}: a killed merge left part of its work");
        }
        delay = match landed {
            Landed::Before => delay * 3 / 2,
            Landed::After => delay * 2 / 3,
            Landed::Inside => delay * 6 / 5,
        };
        seen.push(landed);
        // The store takes new writes, and the merge can be finished.
        let probe = format!("/probe-{round}");
        s.put_bytes(&probe, probe.as_bytes());
        assert_eq!(s.get_bytes(&probe), probe.as_bytes());
        s.ok(&["merge", &branch, "--into", "main"]);
        assert_eq!(s.ls(&dir), names, "round {round}: merging again after the kill must bring every file");
        if seen.iter().filter(|l| **l == Landed::Inside).count() >= INSIDE_MIN {
            break;
        }
    }
    let count = |l: Landed| seen.iter().filter(|x| **x == l).count();
    let (before, inside, after) = (count(Landed::Before), count(Landed::Inside), count(Landed::After));
    println!("kills: {before} before the merge's transaction, {inside} inside it, {after} after its commit");
    assert!(inside >= INSIDE_MIN, "only {inside} of {} kills landed inside the merge's transaction: the test did not exercise a crash mid-merge", seen.len());
}

#[test]
fn staging_files_left_by_a_killed_put_are_cleared_by_the_next_write() {
    let s = Store::new();
    let big = s.scratch().join("big");
    write_random_file(&big, 200 * MB, 9);
    for round in 0..3 {
        let mut child = s.cmd(&["put", big.to_str().unwrap(), "/big"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        // Kill it once it is staging bytes: the state a crash mid-put leaves.
        await_cond(Duration::from_secs(10), "the put to start staging", || {
            !s.staging_files().is_empty() || child.try_wait().unwrap().is_some()
        });
        let _ = child.kill();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "round {round}: the put ended before it was killed");
        assert!(!s.staging_files().is_empty(), "round {round}: a put killed mid-way leaves its staging file");
        assert!(s.err(&["get", "/big"]).contains("no such file"), "round {round}: a killed put committed");
    }
    // Readers do not touch staging (a writer may own it); the next write command clears it.
    s.ok(&["ls", "/"]);
    assert!(!s.staging_files().is_empty());
    s.ok(&["mkdir", "/after"]);
    assert_eq!(s.staging_files(), Vec::<PathBuf>::new(), "leftover staging files survived the next write");
    s.ok(&["put", big.to_str().unwrap(), "/big"]);
    let got = s.scratch().join("got");
    s.ok(&["get", "/big", got.to_str().unwrap()]);
    assert!(same_file(&big, &got));
    assert!(s.staging_files().is_empty());
}
