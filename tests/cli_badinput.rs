//! Hostile and broken input through the real `alkfs` binary: bad paths, missing and damaged
//! stores, corrupt blobs, a busy data dir and a full disk. Every failure must be a clean
//! `alkfs: error:` (never a panic) and leave the store as it was.

mod common;

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{await_cond, expect_err, random_bytes, KillOnDrop, Store};

/// What a user can observe of a store: the root listing, the history and bytes of a file
/// written before, and the blob files on disk.
fn snapshot(s: &Store, kept: &str) -> (String, String, Vec<u8>, Vec<PathBuf>) {
    (s.ok(&["ls", "--json", "/"]), s.ok(&["log", "--json", kept]), s.get_bytes(kept), s.blob_files())
}

#[test]
fn hostile_paths_are_refused_and_change_nothing() {
    let s = Store::new();
    s.put_bytes("/keep.txt", b"keep me");
    s.put_bytes("/a/inside.txt", b"inside");
    let src = s.scratch().join("src");
    fs::write(&src, random_bytes(32 * 1024, 9)).unwrap();
    let src = src.to_str().unwrap();
    let before = snapshot(&s, "/keep.txt");

    // A NUL byte cannot travel through argv, so it is not in the table.
    let long_name = format!("/{}", "n".repeat(300));
    let deep = "/d".repeat(200);
    let too_long = "/abcdefghij".repeat(500); // 5500 bytes of valid names
    let paths: [(&str, &str); 10] = [
        ("climbs out", "../escape"),
        ("climbs past the root", "/a/../../b"),
        ("empty", ""),
        ("dot components", "a/./b/../../.."),
        ("300-byte name", &long_name),
        ("200 components", &deep),
        ("empty component", "/a//b"),
        ("5500-byte path", &too_long),
        ("the root", "/"),
        ("trailing ..", "/a/inside.txt/.."),
    ];
    for (what, path) in paths {
        let commands: [Vec<&str>; 5] = [
            vec!["put", src, path],
            vec!["put", "-", path],
            vec!["mkdir", "-p", path],
            vec!["mv", "/keep.txt", path],
            vec!["rm", "-r", path],
        ];
        for args in commands {
            let out = s.run_stdin(&args, b"bytes that must not land anywhere");
            let err = expect_err(&args, out);
            assert!(err.trim().len() > "alkfs: error:".len(), "{what}: {args:?} gave no reason: {err}");
            assert_eq!(snapshot(&s, "/keep.txt"), before, "{what}: {args:?} changed the store");
        }
        let err = s.err(&["get", path]);
        assert!(!err.contains("panicked"), "{what}: get: {err}");
    }
    assert_eq!(s.get_bytes("/a/inside.txt"), b"inside");
    assert!(s.staging_files().is_empty(), "refused puts left staging files");
}

#[test]
fn reading_what_is_not_there_fails_clearly() {
    let s = Store::new();
    s.ok(&["mkdir", "/dir"]);
    let dest = s.scratch().join("dest");
    let d = dest.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["get", "/missing"], "no such file"),
        (&["get", "/missing", d], "no such file"),
        (&["get", "/dir"], "is a directory"),
        (&["ls", "/missing"], "no such file"),
        (&["log", "/missing"], "no such file"),
        (&["--branch", "nope", "get", "/missing"], "branch list"),
    ];
    for (args, needle) in cases {
        let err = s.err(args);
        assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err}");
    }
    assert!(!dest.exists(), "a failed get must not create DEST");
}

#[test]
fn a_data_dir_never_initialised_says_to_run_init() {
    let s = Store::uninit();
    let cases: [&[&str]; 7] = [
        &["ls", "/"],
        &["get", "/x"],
        &["put", "-", "/x"],
        &["mkdir", "/d"],
        &["log", "/x"],
        &["branch", "list"],
        &["watch", "--once"],
    ];
    for args in cases {
        let err = expect_err(args, s.run_stdin(args, b"data"));
        assert!(err.contains("init"), "{args:?}: the error should point at `alkfs init`: {err}");
        assert!(!s.data().exists(), "{args:?} created the data dir of a store that was never initialised");
    }
}

#[test]
fn a_damaged_tree_db_is_reported_by_name() {
    let s = Store::new();
    s.put_bytes("/keep.txt", b"keep me");
    let db = s.data().join("tree.db");
    let wal = s.data().join("tree.db-wal");
    assert!(fs::metadata(&wal).map_or(true, |m| m.len() == 0), "precondition: everything is checkpointed into tree.db");
    // No alkfs process runs now: overwrite the first 4 KiB (the header page) with garbage.
    let mut f = fs::OpenOptions::new().write(true).open(&db).unwrap();
    f.write_all(&random_bytes(4096, 0xbad)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let damaged = fs::read(&db).unwrap();

    let cases: [&[&str]; 7] = [
        &["ls", "/"],
        &["get", "/keep.txt"],
        &["put", "-", "/new.txt"],
        &["log", "/keep.txt"],
        &["branch", "list"],
        &["watch", "--once"],
        &["init"],
    ];
    for args in cases {
        let err = expect_err(args, s.run_stdin(args, b"new bytes"));
        assert!(err.contains("tree.db") && err.contains("damaged"), "{args:?}: the error should name the damaged database: {err}");
    }
    assert!(fs::read(&db).unwrap() == damaged, "no command (not even init) may overwrite the damaged database");
}

#[test]
fn a_corrupt_blob_fails_get_and_leaves_no_dest() {
    let s = Store::new();
    let data = random_bytes(1 << 20, 77);
    s.put_bytes("/big.bin", &data);
    s.put_bytes("/small.txt", b"inline and intact");
    let blobs = s.blob_files();
    assert_eq!(blobs.len(), 1, "one file blob for the 1 MiB file: {blobs:?}");
    let mut bytes = fs::read(&blobs[0]).unwrap();
    for at in [0, 4096, 1 << 19] {
        bytes[at] ^= 0xff;
    }
    fs::write(&blobs[0], &bytes).unwrap();

    let out_dir = s.scratch().join("out");
    fs::create_dir(&out_dir).unwrap();
    let fresh = out_dir.join("fresh.bin");
    let existing = out_dir.join("existing.bin");
    fs::write(&existing, b"the user's old file").unwrap();
    let cases: [&[&str]; 3] = [
        &["get", "/big.bin"],
        &["get", "/big.bin", fresh.to_str().unwrap()],
        &["get", "/big.bin", existing.to_str().unwrap()],
    ];
    for args in cases {
        let err = s.err(args);
        assert!(err.contains("corrupt"), "{args:?}: {err}");
    }
    let mut left: Vec<_> = fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["existing.bin"], "a failed get left files behind (or lost the old DEST)");
    assert_eq!(fs::read(&existing).unwrap(), b"the user's old file", "a failed get must not touch an existing DEST");
    assert_eq!(s.get_bytes("/small.txt"), b"inline and intact", "other files still read");
    assert_eq!(s.ls("/"), ["big.bin", "small.txt"]);
}

#[test]
fn a_second_writer_is_refused_while_the_first_holds_the_lock() {
    let s = Store::new();
    s.put_bytes("/before.txt", b"before");
    let mut slow = KillOnDrop(
        s.cmd(&["put", "-", "/slow"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(),
    );
    let pid = slow.0.id().to_string();
    let lock = s.data().join("lock");
    await_cond(Duration::from_secs(10), "the slow put to take the write lock", || {
        fs::read_to_string(&lock).is_ok_and(|p| p.trim() == pid)
    });
    let mut stdin = slow.0.stdin.take().unwrap();
    let first_part = random_bytes(100 * 1024, 5);
    stdin.write_all(&first_part).unwrap();

    let src = s.scratch().join("second");
    fs::write(&src, b"second writer").unwrap();
    let writers: [&[&str]; 4] =
        [&["put", src.to_str().unwrap(), "/second"], &["mkdir", "/d"], &["rm", "/before.txt"], &["branch", "create", "b"]];
    for args in writers {
        let started = Instant::now();
        let err = s.err(args);
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?} waited {:?} instead of failing fast", started.elapsed());
        assert!(err.contains("in use") && err.contains(&pid), "{args:?}: should say the data dir is in use by pid {pid}: {err}");
    }
    // Readers do not need the lock.
    assert_eq!(s.ls("/"), ["before.txt"]);

    let second_part = random_bytes(50 * 1024, 6);
    stdin.write_all(&second_part).unwrap();
    drop(stdin);
    let status = slow.0.wait().unwrap();
    assert!(status.success(), "the first put failed: {status}");
    assert_eq!(s.get_bytes("/slow"), [first_part, second_part].concat());
    assert_eq!(s.ls("/"), ["before.txt", "slow"]);
    s.ok(&["mkdir", "/d"]); // the lock is free again
}

/// Fills a 20 MiB tmpfs with a 50 MiB put (from a file, or from stdin; straight into the store
/// or through a running node): the put must fail saying the disk is full, and the store must
/// be as it was, and still writable.
fn check_full_disk(from_stdin: bool, with_node: bool) {
    if !common::precondition(common::is_root(), "the full-disk checks mount a small tmpfs, which needs root") {
        return;
    }
    let mnt = common::Tmpfs::mount("20m");
    let s = Store::at(&mnt.path().join("data"));
    let node = with_node.then(|| common::Node::start(&s, &[], &[]));
    let one = s.scratch().join("one");
    fs::write(&one, random_bytes(1 << 20, 1)).unwrap();
    s.ok(&["put", one.to_str().unwrap(), "/one"]);
    let before = snapshot(&s, "/one");

    let big = s.scratch().join("big");
    common::write_random_file(&big, 50 << 20, 2);
    let err = if from_stdin {
        let args = ["put", "-", "/big"];
        expect_err(&args, s.run_stdin(&args, &fs::read(&big).unwrap()))
    } else {
        s.err(&["put", big.to_str().unwrap(), "/big"])
    };
    assert_eq!(snapshot(&s, "/one"), before, "a put that ran out of space changed the store");
    assert_eq!(s.get_bytes("/one"), fs::read(&one).unwrap());
    assert!(s.staging_files().is_empty(), "the failed put left its staging file filling the disk");
    s.put_bytes("/small.txt", b"there is room for this");
    assert_eq!(s.ls("/"), ["one", "small.txt"]);
    if let Some(node) = &node {
        assert!(!node.log().contains("panicked"), "{}", node.log());
    }
    // Last, so a wrong message does not hide the checks above.
    assert!(err.contains("is full") && !err.contains("roken pipe"), "the error should say the disk is full: {err}");
}

#[test]
fn a_full_disk_fails_a_put_from_a_file_cleanly() {
    check_full_disk(false, false);
}

#[test]
fn a_full_disk_fails_a_put_from_stdin_cleanly() {
    check_full_disk(true, false);
}

#[test]
fn a_full_disk_fails_a_put_through_the_node_with_the_nodes_error() {
    check_full_disk(false, true);
}

#[test]
fn a_full_disk_fails_a_streamed_put_through_the_node_with_the_nodes_error_not_a_broken_pipe() {
    check_full_disk(true, true);
}
