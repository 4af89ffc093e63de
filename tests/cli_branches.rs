//! Branches, merges, conflicts, history and buckets through the real `alkfs` binary.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::Store;

const MAIN: &[&str] = &["--branch", "main"];

fn on(branch: &str) -> [&str; 2] {
    ["--branch", branch]
}

fn branch_names(s: &Store) -> Vec<String> {
    s.ok(&["branch", "list"]).lines().map(|l| l.split('\t').next().unwrap().to_string()).collect()
}

#[test]
fn a_write_on_a_branch_is_not_visible_on_main() {
    let s = Store::new();
    s.put_bytes("/shared.txt", b"on main");
    s.ok(&["branch", "create", "feat"]);
    s.put_bytes_with(&on("feat"), "/only-feat.txt", b"feature work");
    s.put_bytes_with(&on("feat"), "/shared.txt", b"edited on feat");

    assert_eq!(s.ls_with(&on("feat"), "/"), ["only-feat.txt", "shared.txt"]);
    assert_eq!(s.ls_with(MAIN, "/"), ["shared.txt"]);
    assert!(s.err(&["get", "/only-feat.txt"]).contains("no such file"));
    assert_eq!(s.get_bytes_with(MAIN, "/shared.txt"), b"on main");
    assert_eq!(s.get_bytes_with(&on("feat"), "/shared.txt"), b"edited on feat");
}

#[test]
fn a_branch_is_a_snapshot_of_its_parent_at_the_fork() {
    let s = Store::new();
    s.put_bytes("/base.txt", b"v1");
    s.put_bytes("/docs/readme", b"read me");
    let created = s.ok(&["branch", "create", "snap"]);
    assert!(created.contains("created branch snap from main"), "{created}");
    s.put_bytes("/base.txt", b"v2 after the fork");
    s.put_bytes("/later.txt", b"after the fork");
    s.ok(&["rm", "/docs/readme"]);

    assert_eq!(s.get_bytes_with(&on("snap"), "/base.txt"), b"v1", "the branch must keep the parent's file as of the fork");
    assert_eq!(s.get_bytes_with(&on("snap"), "/docs/readme"), b"read me", "a later delete on the parent must not reach the branch");
    assert!(s.err(&["--branch", "snap", "get", "/later.txt"]).contains("no such file"));
    assert_eq!(s.ls_with(&on("snap"), "/"), ["base.txt", "docs/"]);
    assert!(branch_names(&s).contains(&"snap".to_string()));
}

#[test]
fn merging_a_child_fast_forwards_its_new_files_into_the_parent() {
    let s = Store::new();
    s.put_bytes("/base.txt", b"base");
    s.ok(&["branch", "create", "feat"]);
    s.put_bytes_with(&on("feat"), "/new/one.txt", b"one");
    s.put_bytes_with(&on("feat"), "/two.txt", b"two");

    let report = s.ok(&["merge", "feat", "--into", "main"]);
    assert!(report.contains("fast-forward"), "main changed nothing since the fork: {report}");
    assert!(report.contains("0 conflicts"), "{report}");
    assert_eq!(s.ls_with(MAIN, "/"), ["base.txt", "new/", "two.txt"]);
    assert_eq!(s.get_bytes_with(MAIN, "/new/one.txt"), b"one");
    assert_eq!(s.get_bytes_with(MAIN, "/two.txt"), b"two");

    // Once main has changes of its own, the next merge is three-way, and brings only the new.
    s.put_bytes_with(MAIN, "/main-only.txt", b"m");
    s.put_bytes_with(&on("feat"), "/three.txt", b"three");
    let report = s.ok(&["--branch", "main", "merge", "feat"]);
    assert!(report.contains("three-way") && report.contains("1 paths taken"), "{report}");
    assert_eq!(s.ls_with(MAIN, "/"), ["base.txt", "main-only.txt", "new/", "three.txt", "two.txt"]);
}

/// Stores `bytes` at /shared.txt on `branch`, the process's wall clock set to `time` (UTC).
fn put_at(s: &Store, branch: &str, bytes: &[u8], time: &str) {
    let args = [on(branch).as_slice(), &["put", "-", "/shared.txt"]].concat();
    let mut child = common::at_time(&s.cmd(&args), time).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    common::expect_ok(&args, child.wait_with_output().unwrap());
}

/// One three-way conflict on /shared.txt: `first` writes its side at noon, then `second`
/// writes its side with the machine's clock set half an hour *back*. The second write still
/// came later (versions carry a hybrid logical clock stamp, later than every earlier one), so
/// merging `feat` into main must keep it, whatever the clock said. (Within the clock bound of
/// an hour: a clock set back further stamps from the wall clock again, see `proto::clock`.)
fn check_conflict(first: &str, second: &str) {
    let s = Store::new();
    s.put_bytes("/shared.txt", b"common ancestor");
    s.ok(&["branch", "create", "feat"]);
    let (early, late) = (format!("early write on {first}").into_bytes(), format!("late write on {second}").into_bytes());
    put_at(&s, first, &early, "2027-06-01 12:00:00");
    put_at(&s, second, &late, "2027-06-01 11:30:00");
    let written = |b: &str| s.log_json(&on(b), "/shared.txt")[0]["written_ms"].as_i64().unwrap();
    let noon_ms = 1_811_851_200_000; // 2027-06-01T12:00:00Z: after any real write of this test
    assert!((noon_ms..noon_ms + 5_000).contains(&written(first)), "the first write is stamped with its clock: {}", written(first));
    assert_eq!(written(second), written(first), "a clock half an hour behind does not stamp the later write earlier");

    let report = s.ok(&["merge", "feat", "--into", "main"]);
    assert!(report.contains("1 conflicts") && report.contains("conflict /shared.txt"), "{report}");
    assert_eq!(s.get_bytes_with(MAIN, "/shared.txt"), late, "last writer wins: the later write ({second}) must win");

    let conflicts = common::parse_json_array(&s.ok(&["conflicts", "--json"]));
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0]["path"], "/shared.txt");
    assert_eq!(conflicts[0]["from_branch"], "feat");
    let loser = conflicts[0]["loser_version"].as_str().unwrap().to_string();
    let text = s.ok(&["conflicts"]);
    assert!(text.contains("/shared.txt") && text.contains(&format!("--version {loser}")), "{text}");

    let log = s.log_json(MAIN, "/shared.txt");
    assert!(log.len() >= 2, "log keeps both sides: {log:?}");
    assert!(log.iter().any(|v| v["version"] == loser.as_str()), "the loser version {loser} is in the log: {log:?}");

    let out = s.ok(&["restore", "/shared.txt", "--version", &loser]);
    assert!(out.contains(&format!("from version {loser}")), "{out}");
    assert_eq!(s.get_bytes_with(MAIN, "/shared.txt"), early, "restore --version <loser> brings the loser's bytes back");

    // Once looked at, the conflict can be dismissed (then ordinary retention applies).
    assert_eq!(s.ok(&["conflicts", "dismiss", "/shared.txt"]).trim(), "dismissed 1 conflict");
    assert!(s.err(&["conflicts", "dismiss", "/shared.txt"]).contains("no conflict listed"));
    assert_eq!(common::parse_json_array(&s.ok(&["conflicts", "--json"])), Vec::<serde_json::Value>::new());
}

#[test]
fn a_conflict_keeps_the_later_write_and_the_loser_is_restorable() {
    if !common::precondition(common::libfaketime().is_some(), "libfaketime (apt install faketime) sets each write's clock") {
        return;
    }
    // (first writer, second writer): whichever side wrote last must win.
    for (first, second) in [("main", "feat"), ("feat", "main")] {
        check_conflict(first, second);
    }
}

#[test]
fn log_lists_versions_and_restore_brings_an_old_one_back() {
    let s = Store::new();
    for body in ["first", "second", "third"] {
        s.put_bytes("/notes.txt", body.as_bytes());
    }
    let log = s.log_json(&[], "/notes.txt");
    assert_eq!(log.len(), 3, "{log:?}");
    let versions: Vec<String> = log.iter().map(|v| v["version"].as_str().unwrap().to_string()).collect();
    let seqs: Vec<i64> = log.iter().map(|v| common::version_seq(&v["version"])).collect();
    assert!(seqs.windows(2).all(|w| w[0] > w[1]), "log is newest first: {versions:?}");
    let text = s.ok(&["log", "/notes.txt"]);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().all(|l| l.contains("on main")), "{text}");

    let oldest = versions[2].clone();
    s.ok(&["restore", "/notes.txt", "--version", &oldest]);
    assert_eq!(s.get_bytes("/notes.txt"), b"first");
    assert_eq!(s.log_json(&[], "/notes.txt").len(), 4, "a restore is a new version");

    // A deleted file comes back too; a version that is not in the log is refused.
    s.ok(&["rm", "/notes.txt"]);
    s.ok(&["restore", "/notes.txt", "--version", &versions[1]]);
    assert_eq!(s.get_bytes("/notes.txt"), b"second");
    let err = s.err(&["restore", "/notes.txt", "--version", "999999"]);
    assert!(err.contains("no version 999999"), "{err}");
}

#[test]
fn a_deleted_branch_frees_its_name_and_main_cannot_be_deleted() {
    let s = Store::new();
    s.ok(&["branch", "create", "tmp"]);
    s.put_bytes_with(&on("tmp"), "/scratch.txt", b"throwaway");
    s.ok(&["branch", "delete", "tmp"]);
    assert_eq!(branch_names(&s), ["main"]);
    assert!(s.err(&["--branch", "tmp", "ls", "/"]).contains("no branch \"tmp\""));

    s.ok(&["branch", "create", "tmp"]);
    assert_eq!(branch_names(&s), ["main", "tmp"]);
    assert!(s.ls_with(&on("tmp"), "/").is_empty(), "a new branch of the same name starts from main, not the old branch");

    let err = s.err(&["branch", "delete", "main"]);
    assert!(err.contains("main") && err.contains("cannot be deleted"), "{err}");
    assert_eq!(branch_names(&s), ["main", "tmp"]);
    let err = s.err(&["branch", "create", "tmp"]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn buckets_are_isolated_and_a_missing_bucket_says_how_to_create_it() {
    let s = Store::new();
    s.put_bytes("/a.txt", b"in default");
    s.ok(&["bucket", "create", "B"]);
    assert_eq!(s.ok(&["bucket", "list"]).lines().collect::<Vec<_>>(), ["B", "default"]);
    let b: &[&str] = &["--bucket", "B"];
    assert!(s.ls_with(b, "/").is_empty(), "a new bucket is empty");
    assert!(s.err(&["--bucket", "B", "get", "/a.txt"]).contains("no such file"));
    s.put_bytes_with(b, "/b.txt", b"in B");
    assert_eq!(s.ls_with(b, "/"), ["b.txt"]);
    assert_eq!(s.ls("/"), ["a.txt"]);

    let src = s.scratch().join("f");
    std::fs::write(&src, b"x").unwrap();
    let cases: [&[&str]; 3] = [
        &["--bucket", "nope", "put", src.to_str().unwrap(), "/x"],
        &["--bucket", "nope", "mkdir", "/d"],
        &["--bucket", "nope", "ls", "/"],
    ];
    for args in cases {
        let err = s.err(args);
        assert!(err.contains("bucket create"), "{args:?}: the error should say `alkfs bucket create`: {err}");
    }
    assert_eq!(s.ok(&["bucket", "list"]).lines().count(), 2, "a failed write must not create the bucket");
}
