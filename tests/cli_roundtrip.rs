//! Round trips through the real `alkfs` binary: bytes in, the same bytes out, and the tree
//! commands (ls, mv, mkdir, rm) doing what a user expects.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use common::{dir_size, random_bytes, same_file, write_random_file, Store};

const MIB: u64 = 1 << 20;

/// Puts a local file of `len` random bytes from a file and from stdin, then gets each back to
/// a DEST file and to stdout; every copy must be the exact bytes.
fn check_round_trip(s: &Store, len: u64) {
    let src = s.scratch().join(format!("src-{len}"));
    write_random_file(&src, len, len + 7);
    let want = fs::read(&src).unwrap();
    let (from_file, from_stdin) = (format!("/sized/file-{len}"), format!("/sized/stdin-{len}"));
    s.ok(&["put", src.to_str().unwrap(), &from_file]);
    s.put_bytes(&from_stdin, &want);
    for path in [&from_file, &from_stdin] {
        let dest = s.scratch().join(format!("dest-{len}"));
        s.ok(&["get", path, dest.to_str().unwrap()]);
        assert!(same_file(&src, &dest), "{len} bytes: get {path} DEST differs from what was put");
        fs::remove_file(&dest).unwrap();
        let out = s.get_bytes(path);
        assert_eq!(out.len() as u64, len, "{len} bytes: get {path} to stdout has the wrong length");
        assert!(out == want, "{len} bytes: get {path} to stdout differs from what was put");
        let listed = s.ls_json(path);
        assert_eq!(listed[0]["size"], len, "{len} bytes: ls --json {path} size");
    }
}

#[test]
fn put_get_round_trips_exact_bytes() {
    let s = Store::new();
    // Empty, one byte, the largest inline blob, the smallest file blob, and a big one.
    for len in [0, 1, 16 * 1024, 16 * 1024 + 1, 100 * MIB] {
        check_round_trip(&s, len);
    }
}

#[test]
fn get_into_an_existing_directory_uses_the_file_name() {
    let s = Store::new();
    s.put_bytes("/docs/report.txt", b"quarterly numbers");
    let dir = s.scratch().join("out");
    fs::create_dir(&dir).unwrap();
    s.ok(&["get", "/docs/report.txt", dir.to_str().unwrap()]);
    assert_eq!(fs::read(dir.join("report.txt")).unwrap(), b"quarterly numbers");
}

#[test]
fn same_content_at_two_paths_is_stored_once() {
    let s = Store::new();
    let src = s.scratch().join("big");
    write_random_file(&src, 100 * MIB, 42);
    let before = dir_size(s.data());
    s.ok(&["put", src.to_str().unwrap(), "/one"]);
    let after_one = dir_size(s.data());
    s.ok(&["put", src.to_str().unwrap(), "/copies/two"]);
    let after_two = dir_size(s.data());
    assert!(after_one - before >= 100 * MIB, "the first copy should take ~100 MiB, took {} bytes", after_one - before);
    let growth = after_two.saturating_sub(after_one);
    assert!(growth < 4 * MIB, "the second copy of the same 100 MiB grew the data dir by {growth} bytes");
    assert_eq!(s.blob_files().len(), 1, "one blob file for one content");
    for path in ["/one", "/copies/two"] {
        let dest = s.scratch().join("back");
        s.ok(&["get", path, dest.to_str().unwrap()]);
        assert!(same_file(&src, &dest), "{path} does not read back as what was put");
    }
}

/// Asserts the tree at `remote` mirrors the local directory `local`: the same names, kinds,
/// sizes and modes, the same file bytes, recursively.
fn assert_same_tree(s: &Store, local: &Path, remote: &str) {
    let mut want: Vec<String> = fs::read_dir(local).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    want.sort();
    let listed = s.ls_json(remote);
    let mut got: Vec<String> = listed.iter().map(|v| v["name"].as_str().unwrap().to_string()).collect();
    got.sort();
    assert_eq!(got, want, "ls --json {remote} vs local {}", local.display());
    for item in &listed {
        let name = item["name"].as_str().unwrap();
        let (lpath, rpath) = (local.join(name), format!("{remote}/{name}"));
        let meta = fs::symlink_metadata(&lpath).unwrap();
        let kind = item["kind"].as_str().unwrap();
        if meta.file_type().is_symlink() {
            assert_eq!(kind, "symlink", "{rpath}");
            let target = fs::read_link(&lpath).unwrap();
            assert_eq!(item["size"], target.as_os_str().len() as u64, "{rpath}: symlink target length");
        } else if meta.is_dir() {
            assert_eq!(kind, "dir", "{rpath}");
            assert_same_tree(s, &lpath, &rpath);
        } else {
            assert_eq!(kind, "file", "{rpath}");
            assert_eq!(item["size"], meta.len(), "{rpath}: size");
            assert_eq!(item["mode"], format!("{:o}", meta.permissions().mode() & 0o7777), "{rpath}: mode");
            assert_eq!(s.get_bytes(&rpath), fs::read(&lpath).unwrap(), "{rpath}: bytes");
        }
    }
}

#[test]
fn put_recursive_reproduces_a_tree() {
    let s = Store::new();
    let top = s.scratch().join("top");
    for d in ["empty", "sub/deep"] {
        fs::create_dir_all(top.join(d)).unwrap();
    }
    let files: [(&str, Vec<u8>); 5] = [
        ("a.txt", b"alpha".to_vec()),
        ("exec.sh", b"#!/bin/sh\necho hi\n".to_vec()),
        ("sub/b.bin", random_bytes(20 * 1024, 3)),
        ("sub/deep/c.txt", b"gamma".to_vec()),
        ("sub/deep/zero", Vec::new()),
    ];
    for (name, bytes) in &files {
        fs::write(top.join(name), bytes).unwrap();
    }
    fs::set_permissions(top.join("exec.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("sub/b.bin", top.join("link")).unwrap();

    s.ok(&["put", "-r", top.to_str().unwrap(), "/imported"]);

    assert_eq!(s.ls("/imported"), ["a.txt", "empty/", "exec.sh", "link", "sub/"]);
    assert_eq!(s.ls("/"), ["imported/"]);
    assert!(s.ls("/imported/empty").is_empty(), "an empty local dir imports as an empty dir");
    let long = s.ok(&["ls", "-l", "/imported"]);
    let link_line = long.lines().find(|l| l.ends_with(" link")).expect("link in ls -l");
    assert!(link_line.starts_with("l "), "ls -l marks a symlink with l: {link_line:?}");
    assert_same_tree(&s, &top, "/imported");
}

#[test]
fn put_refuses_a_directory_without_r_a_missing_source_and_r_from_stdin() {
    let s = Store::new();
    let dir = s.scratch().join("d");
    fs::create_dir(&dir).unwrap();
    let missing = s.scratch().join("missing");
    let cases: [(&[&str], &str); 3] = [
        (&["put", dir.to_str().unwrap(), "/d"], "put -r"),
        (&["put", "-r", missing.to_str().unwrap(), "/f"], missing.to_str().unwrap()),
        (&["put", "-r", "-", "/f"], "stdin"),
    ];
    for (args, needle) in cases {
        let err = s.err(args);
        assert!(err.contains(needle), "{args:?}: error should mention {needle:?}: {err}");
    }
    assert!(s.ls("/").is_empty(), "failed puts must write nothing");
}

#[test]
fn ls_long_and_json_carry_size_kind_and_version() {
    let s = Store::new();
    s.put_bytes("/f.txt", b"hello");
    s.ok(&["mkdir", "/d"]);
    let version = s.log_json(&[], "/f.txt")[0]["version"].as_str().unwrap().to_string();

    let long = s.ok(&["ls", "-l", "/"]);
    let rows: Vec<Vec<&str>> = long.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "ls -l /: {long}");
    let dir = rows.iter().find(|r| r.last() == Some(&"d/")).expect("d/ in ls -l");
    let file = rows.iter().find(|r| r.last() == Some(&"f.txt")).expect("f.txt in ls -l");
    assert_eq!((dir[0], file[0]), ("d", "-"), "kind column: {long}");
    assert_eq!((file[1], file[2]), ("0644", "5"), "mode and size of f.txt: {long}");
    assert_eq!(file[4], format!("v{version}"), "version of f.txt: {long}");
    assert!(file[3].ends_with('Z') && file[3].contains('T'), "mtime is ISO-8601: {long}");

    let json = s.ls_json("/");
    let jf = json.iter().find(|v| v["name"] == "f.txt").expect("f.txt in ls --json");
    let jd = json.iter().find(|v| v["name"] == "d").expect("d in ls --json");
    assert_eq!((jf["kind"].as_str(), jf["size"].as_u64(), jf["version"].as_str()), (Some("file"), Some(5), Some(version.as_str())));
    assert_eq!(jf["path"], "/f.txt");
    assert_eq!(jd["kind"], "dir");

    // A new write is a new version, and ls shows it.
    s.put_bytes("/f.txt", b"hello, world");
    let jf2 = s.ls_json("/f.txt");
    assert_eq!(jf2.len(), 1, "ls of a file shows that file");
    assert_eq!(jf2[0]["size"], 12);
    assert!(common::version_seq(&jf2[0]["version"]) > common::version_seq(&serde_json::Value::from(version.as_str())), "overwrite gets a newer version: {jf2:?}");
}

#[test]
fn mv_renames_files_and_moves_into_directories() {
    let s = Store::new();
    s.put_bytes("/a.txt", b"A");
    s.ok(&["mv", "/a.txt", "/b.txt"]);
    assert_eq!(s.ls("/"), ["b.txt"]);
    assert_eq!(s.get_bytes("/b.txt"), b"A");
    assert!(s.err(&["get", "/a.txt"]).contains("no such file"));

    s.ok(&["mkdir", "-p", "/src/inner"]);
    s.put_bytes("/src/inner/f", b"F");
    s.ok(&["mkdir", "/dst"]);
    s.ok(&["mv", "/src", "/dst"]); // an existing directory: move into it
    s.ok(&["mv", "/b.txt", "/dst"]);
    assert_eq!(s.ls("/"), ["dst/"]);
    assert_eq!(s.ls("/dst"), ["b.txt", "src/"]);
    assert_eq!(s.get_bytes("/dst/src/inner/f"), b"F");
    assert_eq!(s.get_bytes("/dst/b.txt"), b"A");

    // Into the root, like `mv dir/x .` in a shell.
    s.ok(&["mv", "/dst/b.txt", "/"]);
    s.ok(&["mv", "/dst/src", "/"]);
    assert_eq!(s.ls("/"), ["b.txt", "dst/", "src/"]);
    assert_eq!(s.get_bytes("/src/inner/f"), b"F");
    s.ok(&["mv", "/src", "/dst"]);
    s.ok(&["mv", "/b.txt", "/dst"]);

    // Moving a directory into itself, or a missing path, fails and changes nothing.
    let before = s.ok(&["ls", "--json", "/dst"]);
    for (from, to) in [("/dst", "/dst/src/x"), ("/missing", "/y")] {
        s.err(&["mv", from, to]);
        assert_eq!(s.ok(&["ls", "--json", "/dst"]), before, "mv {from} {to} changed the tree");
    }
}

#[test]
fn mkdir_creates_parents_only_with_p() {
    let s = Store::new();
    s.ok(&["mkdir", "-p", "/p/q/r"]);
    assert_eq!(s.ls("/p"), ["q/"]);
    assert_eq!(s.ls("/p/q"), ["r/"]);
    s.ok(&["mkdir", "-p", "/p/q/r"]); // exists: fine with -p
    let cases = [(["mkdir", "/x/y"], "mkdir -p"), (["mkdir", "/p"], "already exists")];
    for (args, needle) in cases {
        let err = s.err(&args);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(s.ls("/"), ["p/"], "failed mkdirs created nothing");
}

#[test]
fn rm_removes_files_and_trees_and_refuses_non_empty_dirs_without_r() {
    let s = Store::new();
    s.put_bytes("/keep", b"k");
    s.put_bytes("/dir/a", b"a");
    s.put_bytes("/dir/sub/b", b"b");

    let before = (s.ok(&["ls", "--json", "/"]), s.ok(&["ls", "--json", "/dir"]));
    let err = s.err(&["rm", "/dir"]);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!((s.ok(&["ls", "--json", "/"]), s.ok(&["ls", "--json", "/dir"])), before, "a refused rm changed the tree");
    assert_eq!(s.get_bytes("/dir/sub/b"), b"b");

    s.ok(&["rm", "/keep"]);
    assert_eq!(s.ls("/"), ["dir/"]);
    s.ok(&["rm", "-r", "/dir"]);
    assert!(s.ls("/").is_empty());
    for path in ["/dir/a", "/dir/sub/b", "/keep"] {
        assert!(s.err(&["get", path]).contains("no such file"), "{path} still readable after rm");
    }
    assert!(s.err(&["rm", "/keep"]).contains("no such file"));
}

#[test]
fn a_file_used_as_a_directory_is_refused_as_not_a_directory() {
    let s = Store::new();
    s.put_bytes("/f", b"a file");
    s.put_bytes("/g", b"another");
    let cases: [&[&str]; 4] = [&["put", "-", "/f/x"], &["mkdir", "-p", "/f/z"], &["mv", "/g", "/f/g"], &["mkdir", "/f/z"]];
    for args in cases {
        let err = common::expect_err(args, s.run_stdin(args, b"bytes"));
        assert!(err.contains("/f: not a directory"), "{args:?}: the error should say /f is not a directory: {err}");
    }
    assert_eq!(s.ls("/"), ["f", "g"]);
    assert_eq!(s.get_bytes("/f"), b"a file");
}

/// A name typed as NFC (Linux) and sent as NFD (macOS) is one path: stored in NFC, found by
/// either form.
#[test]
fn names_are_one_path_in_unicode_nfc_whichever_form_they_arrive_in() {
    let s = Store::new();
    let (nfc, nfd) = ("/caf\u{e9}/r\u{e9}sum\u{e9}.txt", "/cafe\u{301}/re\u{301}sume\u{301}.txt");
    s.put_bytes(nfd, b"first");
    s.put_bytes(nfc, b"second");
    assert_eq!(s.ls("/"), ["caf\u{e9}/"]);
    assert_eq!(s.ls("/caf\u{e9}"), ["r\u{e9}sum\u{e9}.txt"], "one entry, in NFC");
    assert_eq!(s.get_bytes(nfd), b"second");
    assert_eq!(s.log_json(&[], nfc).len(), 2, "both writes are versions of one path");
    s.ok(&["mv", nfd, "/cafe\u{301}/cv.txt"]);
    assert_eq!(s.ls("/caf\u{e9}"), ["cv.txt"]);

    // A local tree holding both forms of one name cannot be imported as two paths: refused
    // whole, before anything is stored.
    let top = s.scratch().join("both");
    fs::create_dir(&top).unwrap();
    fs::write(top.join("caf\u{e9}"), b"nfc").unwrap();
    fs::write(top.join("cafe\u{301}"), b"nfd").unwrap();
    fs::write(top.join("plain"), b"plain").unwrap();
    let err = s.err(&["put", "-r", top.to_str().unwrap(), "/both"]);
    assert!(err.contains("one name in Unicode NFC") && err.contains("nothing was imported"), "{err}");
    assert_eq!(s.ls("/"), ["caf\u{e9}/"], "a refused import stored nothing");
}

/// `put -r` of a tree with a name that is not valid UTF-8 fails before it commits anything:
/// never half an import.
#[test]
fn put_recursive_refuses_a_tree_with_a_name_that_is_not_utf8_before_storing_anything() {
    use std::os::unix::ffi::OsStrExt;
    let s = Store::new();
    let top = s.scratch().join("tree");
    // Enough files that a batched import would have committed some before meeting the bad
    // name (batches are 4096 entries, and the walk takes z/ before a/).
    fs::create_dir_all(top.join("z")).unwrap();
    for i in 0..5000 {
        fs::write(top.join("z").join(format!("f{i:05}")), i.to_string()).unwrap();
    }
    fs::write(top.join("z").join("big"), random_bytes(100_000, 1)).unwrap();
    fs::create_dir_all(top.join("a")).unwrap();
    fs::write(top.join("a").join(std::ffi::OsStr::from_bytes(b"bad-\xff-name")), b"x").unwrap();
    let err = s.err(&["put", "-r", top.to_str().unwrap(), "/tree"]);
    assert!(err.contains("not valid UTF-8") && err.contains("nothing was imported"), "{err}");
    assert!(s.ls("/").is_empty(), "a refused import committed part of the tree: {:?}", s.ls("/"));
    assert!(s.blob_files().is_empty() && s.staging_files().is_empty(), "a refused import left bytes behind");
}

/// `alkfs completions SHELL` prints a script the shell accepts.
#[test]
fn completions_load_into_bash_and_name_the_commands() {
    let s = Store::new();
    let script = s.ok(&["completions", "bash"]);
    for word in ["conflicts", "dismiss", "put", "node"] {
        assert!(script.contains(word), "the bash completions do not know {word:?}");
    }
    let file = s.scratch().join("alkfs.bash");
    fs::write(&file, &script).unwrap();
    let out = std::process::Command::new("bash").arg("-c").arg(format!("source {} && complete -p alkfs", file.display())).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("alkfs"), "bash did not load them: {}", String::from_utf8_lossy(&out.stderr));
    for shell in ["zsh", "fish"] {
        assert!(s.ok(&["completions", shell]).contains("alkfs"), "{shell}");
    }
    let out = s.run(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "a usage error exits 2, as clap's do");
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: bash"));
}

/// Special files (fifos, sockets, devices) are skipped by `put -r`, whatever their names: a
/// fifo whose name is not UTF-8 does not fail the import of the files beside it.
#[test]
fn put_recursive_skips_special_files_whatever_their_names() {
    use std::os::unix::ffi::OsStrExt;
    let s = Store::new();
    let top = s.scratch().join("with-fifo");
    fs::create_dir(&top).unwrap();
    fs::write(top.join("file.txt"), b"kept").unwrap();
    let fifo = top.join(std::ffi::OsStr::from_bytes(b"fifo-\xff"));
    let path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
    s.ok(&["put", "-r", top.to_str().unwrap(), "/t"]);
    assert_eq!(s.ls("/t"), ["file.txt"]);
    assert_eq!(s.get_bytes("/t/file.txt"), b"kept");
}
