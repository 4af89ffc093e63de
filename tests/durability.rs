//! What the real `alkfs` asks of the kernel where a crash or another user could otherwise
//! see too much or keep too little, read off `strace`: the node's secret key (made with the
//! store) exists only ever as a 0600 file, and a new blob directory is fsynced into `content/` before any commit
//! names a blob in it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{random_bytes, Store, BIN};

/// `strace` of `alkfs --data DATA ARGS…` (every thread), its trace written to `log`.
fn traced(s: &Store, log: &Path, syscalls: &str, args: &[&str]) -> Command {
    let mut c = Command::new("strace");
    c.args(["-f", "-y", "-e", &format!("trace={syscalls}"), "-o"]).arg(log).arg(BIN).arg("--data").arg(s.data()).args(args);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn have_strace() -> bool {
    common::precondition(common::have_tool("strace"), "strace (apt install strace) reads the syscalls")
}

#[test]
fn the_node_key_is_created_owner_only_from_its_first_byte() {
    if !have_strace() {
        return;
    }
    // The key is made with the store (every version the store writes is named after it).
    let s = Store::new();
    let fresh = s.scratch().join("fresh");
    let log = s.scratch().join("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-y", "-e", "trace=openat,creat,chmod,fchmod,fchmodat", "-o"])
        .arg(&log)
        .arg(BIN)
        .arg("--data")
        .arg(&fresh)
        .arg("init")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let trace = std::fs::read_to_string(&log).unwrap();
    let creates: Vec<&str> = trace.lines().filter(|l| l.contains("node.key") && (l.contains("O_CREAT") || l.contains("creat("))).collect();
    assert!(!creates.is_empty(), "the node did not create its key? trace:\n{trace}");
    for line in &creates {
        assert!(line.contains(", 0600)") && line.contains("O_EXCL"), "the key file was created readable by others, or over an existing file: {line}");
    }
    let widened: Vec<&str> = trace.lines().filter(|l| l.contains("node.key") && l.contains("chmod") && !l.contains("0600")).collect();
    assert!(widened.is_empty(), "the key's mode was changed to something else: {widened:?}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(fresh.join("node.key")).unwrap().permissions());
    assert_eq!(mode & 0o7777, 0o600);
}

#[test]
fn a_new_blob_directory_is_made_durable_before_its_first_blob_is_committed() {
    if !have_strace() {
        return;
    }
    let s = Store::new();
    let src = s.scratch().join("big");
    std::fs::write(&src, random_bytes(1 << 20, 5)).unwrap();
    let log = s.scratch().join("strace.log");
    let out = traced(&s, &log, "mkdir,mkdirat,fsync,fdatasync,rename,renameat,renameat2", &["put", src.to_str().unwrap(), "/big"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let trace = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = trace.lines().collect();
    let content = s.data().join("content");
    let content = std::fs::canonicalize(&content).unwrap();
    let made = lines.iter().position(|l| l.contains("mkdir") && l.contains(&format!("{}/", content.display()))).unwrap_or_else(|| panic!("no new blob directory in the trace:\n{trace}"));
    let synced = lines[made..].iter().position(|l| l.contains("fsync(") && l.contains(&format!("<{}>", content.display())));
    let placed = lines[made..].iter().position(|l| l.contains("rename") && l.contains("/staging/"));
    match (synced, placed) {
        (Some(sync), Some(place)) => assert!(sync < place, "content/ was fsynced only after the blob was moved into the new directory:\n{trace}"),
        _ => panic!("after creating a blob directory, content/ itself was never fsynced:\n{trace}"),
    }
}
