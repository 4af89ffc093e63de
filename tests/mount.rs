//! Mounts end to end: a real FUSE mount (`alkfs mount`) used by ordinary tools (cp, rsync,
//! tar, git, sqlite3, mv, truncate, append), write sessions seen from a second reader, bad
//! names and renames with their errnos, a killed mount process; and the SFTP server used by
//! OpenSSH's `sftp` and `sshfs` (keys per bucket, no way out of the bucket). Each test runs
//! its own node and mount on its own data dir.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::mount::{can_mount, errno_of, is_mounted, rig, settle, sh, Mount, Rig, MOUNT_TIMEOUT};
use common::{await_cond, precondition, Node, Store};

#[test]
fn ordinary_tools_work_on_the_mount_and_what_they_write_is_what_the_cli_reads() {
    let Some(rig) = rig() else { return };
    let (m, s) = (&rig.m, &rig.s);

    // cp -r of a tree of files of many sizes (inline and file blobs, one 3 MiB).
    let src = s.scratch().join("src");
    for i in 0..40u64 {
        let sub = src.join(format!("d{}", i % 4));
        fs::create_dir_all(&sub).unwrap();
        common::write_random_file(&sub.join(format!("f{i}")), i * 1013, i);
    }
    common::write_random_file(&src.join("big"), 3 << 20, 99);
    sh(s.scratch(), &format!("cp -r src {}", m.dir.display()));
    sh(s.scratch(), &format!("diff -r src {}", m.path("src").display()));
    settle(m);
    assert_eq!(s.get_bytes("/src/big"), fs::read(src.join("big")).unwrap(), "the CLI reads what cp wrote");
    assert_eq!(s.get_bytes("/src/d3/f7"), fs::read(src.join("d3/f7")).unwrap());

    // rsync -a keeps modes and mtimes; tar x unpacks an archive.
    if precondition(common::have_tool("rsync"), "rsync (apt-get install rsync)") {
        fs::set_permissions(src.join("d1/f1"), fs::Permissions::from_mode(0o600)).unwrap();
        sh(s.scratch(), &format!("rsync -a src/ {}/", m.path("synced").display()));
        sh(s.scratch(), &format!("diff -r src {}", m.path("synced").display()));
        let meta = fs::metadata(m.path("synced/d1/f1")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "rsync -a kept the mode");
        assert_eq!(meta.mtime(), fs::metadata(src.join("d1/f1")).unwrap().mtime(), "rsync -a kept the mtime");
    }
    // tar sets a directory's mode and mtime after filling it (queued like closes): the mount
    // shows them at once, the CLI once committed.
    fs::set_permissions(src.join("d2"), fs::Permissions::from_mode(0o700)).unwrap();
    sh(s.scratch(), "touch -d 2001-02-03T04:05:06Z src/d2");
    sh(s.scratch(), "tar cf src.tar src");
    fs::create_dir(m.path("untarred")).unwrap();
    sh(&m.path("untarred"), &format!("tar xf {}", s.scratch().join("src.tar").display()));
    sh(s.scratch(), &format!("diff -r src {}", m.path("untarred/src").display()));
    let d2 = fs::metadata(m.path("untarred/src/d2")).unwrap();
    assert_eq!((d2.mode() & 0o7777, d2.mtime()), (0o700, 981_173_106), "tar's directory mode and mtime, through the mount");
    settle(m);
    let listed = s.ls_json("/untarred/src");
    let d2 = listed.iter().find(|e| e["name"] == "d2").expect("d2 listed");
    assert_eq!((d2["mode"].as_str(), d2["mtime_ms"].as_i64()), (Some("700"), Some(981_173_106_000)), "tar's directory mode and mtime, committed");
    // chown clears set-user-id (the filesystem does it: HANDLE_KILLPRIV_V2).
    fs::write(m.path("setuid"), b"x").unwrap();
    fs::set_permissions(m.path("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    assert_eq!(fs::metadata(m.path("setuid")).unwrap().mode() & 0o7777, 0o4755);
    sh(&m.dir, "chown $(id -u):$(id -g) setuid");
    assert_eq!(fs::metadata(m.path("setuid")).unwrap().mode() & 0o7777, 0o755, "chown cleared set-user-id");
    // access(2) answers as the kernel would (a mount by root leaves the checks to us): a
    // file no one may run is not runnable, even for root, until its mode says so.
    sh(&m.dir, "printf '#!/bin/sh\\necho ran\\n' > script && test -r script && test -w script && ! test -x script");
    sh(&m.dir, "chmod 0700 script && test -x script && ./script | grep -q ran");

    // git init, add, commit, and a second commit; fsck finds the repository whole.
    if precondition(common::have_tool("git"), "git") {
        fs::create_dir(m.path("repo")).unwrap();
        let repo = m.path("repo");
        sh(&repo, "git init -q && echo hi > a && git add a && git -c user.email=t@t -c user.name=t commit -qm one");
        sh(&repo, "echo more >> a && git -c user.email=t@t -c user.name=t commit -qam two");
        assert_eq!(sh(&repo, "git log --format=%s").lines().collect::<Vec<_>>(), vec!["two", "one"]);
        sh(&repo, "git fsck --strict 2>&1");
        settle(m);
        assert_eq!(s.get_bytes("/repo/a"), b"hi\nmore\n");
    }

    // sqlite3 creates a database file and updates it in place.
    if precondition(common::have_tool("sqlite3"), "sqlite3 (apt-get install sqlite3)") {
        let db = m.path("app.db");
        sh(&m.dir, &format!("sqlite3 {} 'create table t(x); insert into t values (1), (2);'", db.display()));
        sh(&m.dir, &format!("sqlite3 {} 'update t set x = x * 10; insert into t values (3);'", db.display()));
        assert_eq!(sh(&m.dir, &format!("sqlite3 {} 'select sum(x) from t; pragma integrity_check;'", db.display())), "33\nok\n");
        settle(m);
        let copy = s.scratch().join("copy.db");
        fs::write(&copy, s.get_bytes("/app.db")).unwrap();
        assert_eq!(sh(s.scratch(), "sqlite3 copy.db 'select sum(x) from t;'"), "33\n", "the CLI's copy of the database is the updated one");
    }

    // A shell's `>` opens with O_TRUNC, dup2s and closes the first descriptor before writing:
    // each redirect is one version, not an empty one first.
    sh(&m.dir, "echo one > redirected && echo two > redirected && : > emptied");
    settle(m);
    assert_eq!(s.log_json(&[], "/redirected").len(), 2, "two redirects, two versions");
    assert_eq!(s.get_bytes("/redirected"), b"two\n");
    assert_eq!(s.log_json(&[], "/emptied").len(), 1, "a truncation alone commits once, at the last close");

    // mv over an existing file; truncate; append.
    fs::write(m.path("src/over"), b"new").unwrap();
    sh(&m.dir, "mv -f src/over src/d0/f0");
    assert_eq!(fs::read(m.path("src/d0/f0")).unwrap(), b"new");
    assert!(!m.path("src/over").exists());
    settle(m);
    assert_eq!(s.get_bytes("/src/d0/f0"), b"new");
    sh(&m.dir, "truncate -s 1000 src/big && printf tail >> src/big");
    let mut want = fs::read(src.join("big")).unwrap();
    want.truncate(1000);
    want.extend_from_slice(b"tail");
    assert_eq!(fs::read(m.path("src/big")).unwrap(), want);
    settle(m);
    assert_eq!(s.get_bytes("/src/big"), want);
    // A sparse write past the end leaves zeros between.
    {
        let mut f = OpenOptions::new().write(true).open(m.path("src/d2/f2")).unwrap();
        let len = f.metadata().unwrap().len();
        f.seek(SeekFrom::Start(len + 5000)).unwrap();
        f.write_all(b"end").unwrap();
    }
    settle(m);
    let got = s.get_bytes("/src/d2/f2");
    assert_eq!(got.len() as u64, fs::metadata(src.join("d2/f2")).unwrap().len() + 5003);
    assert!(got[got.len() - 5003..got.len() - 3].iter().all(|b| *b == 0) && got.ends_with(b"end"));
    assert!(!m.log().contains("panicked"), "{}", m.log());
}

#[test]
fn a_reader_holding_a_file_open_sees_the_old_bytes_until_the_writer_closes() {
    let Some(rig) = rig() else { return };
    let (m, s) = (&rig.m, &rig.s);
    s.put_bytes("/doc", b"old old old");

    let mut reader = File::open(m.path("doc")).unwrap();
    let mut writer = OpenOptions::new().write(true).truncate(true).open(m.path("doc")).unwrap();
    writer.write_all(b"NEW CONTENT, LONGER THAN BEFORE").unwrap();
    writer.flush().unwrap();

    let mut seen = String::new();
    reader.read_to_string(&mut seen).unwrap();
    assert_eq!(seen, "old old old", "the reader that opened before sees the old version");
    assert_eq!(s.get_bytes("/doc"), b"old old old", "the tree shows the old version until close");
    let mut late = String::new();
    File::open(m.path("doc")).unwrap().read_to_string(&mut late).unwrap();
    assert_eq!(late, "old old old", "a reader that opens during the write sees the old version too");

    drop(writer);
    assert_eq!(fs::read(m.path("doc")).unwrap(), b"NEW CONTENT, LONGER THAN BEFORE", "the mount shows a close at once");
    settle(m);
    assert_eq!(s.get_bytes("/doc"), b"NEW CONTENT, LONGER THAN BEFORE", "close committed it");
    let mut seen = String::new();
    reader.seek(SeekFrom::Start(0)).unwrap();
    reader.read_to_string(&mut seen).unwrap();
    assert_eq!(seen, "old old old", "a handle keeps the version it opened");
    assert_eq!(fs::read(m.path("doc")).unwrap(), b"NEW CONTENT, LONGER THAN BEFORE", "a new open sees the new version");
    let log = s.log_json(&[], "/doc");
    assert_eq!(log.len(), 2, "one version per close: {log:?}");

    // fsync commits what was written so far (programs rely on it surviving a crash).
    let mut w = OpenOptions::new().append(true).open(m.path("doc")).unwrap();
    w.write_all(b" +synced").unwrap();
    w.sync_all().unwrap();
    assert_eq!(s.get_bytes("/doc"), b"NEW CONTENT, LONGER THAN BEFORE +synced", "fsync committed");
    w.write_all(b" +closed").unwrap();
    drop(w);
    settle(m);
    assert_eq!(s.get_bytes("/doc"), b"NEW CONTENT, LONGER THAN BEFORE +synced +closed");
}

#[test]
fn bad_names_and_renames_get_the_errno_posix_promises_and_change_nothing() {
    let Some(rig) = rig() else { return };
    let (m, s) = (&rig.m, &rig.s);
    fs::create_dir_all(m.path("a/b")).unwrap();
    fs::write(m.path("a/b/f"), b"x").unwrap();
    fs::write(m.path("g"), b"y").unwrap();

    assert_eq!(errno_of(fs::rename(m.path("a"), m.path("a/b/inside"))), libc::EINVAL, "a directory into itself");
    assert_eq!(errno_of(fs::remove_dir(m.path("a"))), libc::ENOTEMPTY);
    assert_eq!(errno_of(fs::create_dir(m.path("a"))), libc::EEXIST);
    assert_eq!(errno_of(fs::write(m.path(&"n".repeat(256)), b"z")), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::rename(m.path("g"), m.path("a"))), libc::EISDIR, "a file over a directory");
    assert_eq!(errno_of(fs::rename(m.path("a"), m.path("g"))), libc::ENOTDIR, "a directory over a file");
    assert_eq!(errno_of(fs::remove_file(m.path("a"))), libc::EISDIR);
    assert_eq!(errno_of(fs::remove_dir(m.path("g"))), libc::ENOTDIR);
    assert_eq!(errno_of(File::open(m.path("nope"))), libc::ENOENT);
    // RENAME_NOREPLACE refuses an existing target.
    let c = |p: PathBuf| std::ffi::CString::new(p.into_os_string().into_encoded_bytes()).unwrap();
    let (from, to) = (c(m.path("g")), c(m.path("a/b/f")));
    // SAFETY: two valid NUL-terminated paths.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE) };
    assert_eq!((r, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::EEXIST)));
    // Past the size limit (1 TiB): EFBIG for the write, the truncate and the close, and the
    // file keeps what it had.
    {
        use std::os::unix::fs::FileExt;
        let limit = alknet_actors::proto::limits::FILE_BYTES_MAX;
        let f = OpenOptions::new().write(true).open(m.path("g")).unwrap();
        assert_eq!(errno_of(f.write_at(b"!", limit)), libc::EFBIG);
        assert_eq!(errno_of(f.set_len(limit + 1)), libc::EFBIG);
        assert_eq!(errno_of(f.sync_all()), libc::EFBIG, "the session stays failed");
    }
    assert_eq!(fs::read(m.path("g")).unwrap(), b"y");
    // A directory moves over an empty one, with what it holds.
    fs::create_dir(m.path("empty")).unwrap();
    fs::rename(m.path("a"), m.path("empty")).unwrap();
    assert_eq!(fs::read(m.path("empty/b/f")).unwrap(), b"x");
    settle(m);
    assert_eq!(s.get_bytes("/empty/b/f"), b"x");
    assert!(s.run(&["get", "/a/b/f"]).status.code() != Some(0));
    // Nothing half-done: the tree holds exactly what succeeded.
    let mut tree: Vec<String> = s.ok(&["ls", "-R", "/"]).lines().map(|l| l.split('\t').next().unwrap().to_string()).collect();
    tree.sort();
    assert_eq!(tree, vec!["/empty", "/empty/b", "/empty/b/f", "/g"]);
    assert!(!m.log().contains("panicked"));
}

#[test]
fn a_killed_mount_process_leaves_no_mount_point_and_an_unclosed_write_changes_nothing() {
    if !can_mount() {
        return;
    }
    let s = Store::new();
    let _node = Node::start(&s, &[], &[]);
    s.put_bytes("/keep", b"the old version");
    let mut m = Mount::start(&s, &[]);
    let mut w = OpenOptions::new().write(true).truncate(true).open(m.path("keep")).unwrap();
    w.write_all(b"half of a new ver").unwrap();
    common::send_signal(m.child.id(), libc::SIGKILL);
    let _ = m.child.wait();
    await_cond(MOUNT_TIMEOUT, "the mount point to go with its process", || !is_mounted(&m.dir));
    drop(w);
    assert_eq!(s.get_bytes("/keep"), b"the old version", "an unclosed write session left the old version");
    assert!(fs::read_dir(&m.dir).unwrap().next().is_none(), "the mount point is an empty directory again");
    // A new mount works, and leaves no staging files of the dead one behind.
    let m2 = Mount::start(&s, &["--read-only"]);
    assert_eq!(fs::read(m2.path("keep")).unwrap(), b"the old version");
    assert_eq!(errno_of(fs::write(m2.path("x"), b"1")), libc::EROFS);
}

/// The mount's poll threads (see `src/mount/poll.rs`): (nice value, CPU ticks used).
fn poll_threads(pid: u32) -> Vec<(i64, u64)> {
    let mut found = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        if fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim() != "alkfs-poll" {
            continue;
        }
        let stat = fs::read_to_string(task.path().join("stat")).unwrap();
        // Fields after the name, the 3rd onwards: utime 14, stime 15, nice 19.
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let field = |n: usize| f[n - 3].parse::<i64>().unwrap();
        found.push((field(19), (field(14) + field(15)) as u64));
    }
    found
}

#[test]
fn the_mount_polls_only_through_a_burst_of_requests_and_at_the_lowest_weight() {
    let Some(r) = rig() else { return };
    let pollers = poll_threads(r.m.child.id());
    assert_eq!(pollers.len(), 1, "one poll thread");
    assert_eq!(pollers[0].0, 19, "it yields to any other work (nice 19)");
    // A burst: a few hundred files made, each several requests.
    sh(&r.m.dir, "mkdir burst && for i in $(seq 300); do echo $i > burst/f$i; done");
    settle(&r.m);
    std::thread::sleep(Duration::from_millis(100)); // the pollers stop 1 ms after the last request
    let before: u64 = poll_threads(r.m.child.id()).iter().map(|t| t.1).sum();
    std::thread::sleep(Duration::from_millis(700));
    let after: u64 = poll_threads(r.m.child.id()).iter().map(|t| t.1).sum();
    assert!(after - before <= 1, "an idle mount does not spin: its poll thread used {} ticks in 0.7 s", after - before);
    assert_eq!(fs::read_to_string(r.m.path("burst/f300")).unwrap(), "300\n");
    // --no-poll starts none.
    let quiet = Mount::start(&r.s, &["--no-poll"]);
    assert!(poll_threads(quiet.child.id()).is_empty(), "--no-poll starts no poll thread");
}

// ---- SFTP ----

fn ssh_keygen(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    let st = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", ""]).arg("-f").arg(&key).status().expect("ssh-keygen");
    assert!(st.success());
    key
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `alkfs serve sftp`, killed when dropped.
struct SftpServer {
    _child: common::KillOnDrop,
    port: u16,
}

impl SftpServer {
    fn start(s: &Store) -> SftpServer {
        let port = free_port();
        let log = File::create(s.scratch().join("sftp.log")).unwrap();
        let child = s.cmd(&["serve", "sftp", "--listen", &format!("127.0.0.1:{port}")]).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        await_cond(MOUNT_TIMEOUT, "the sftp server to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        SftpServer { _child: common::KillOnDrop(child), port }
    }

    /// Runs an `sftp -b` batch as `user` with `key`; (success, output).
    fn batch(&self, key: &Path, user: &str, script: &str) -> (bool, String) {
        let out = Command::new("sftp")
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"])
            .arg("-P")
            .arg(self.port.to_string())
            .arg("-i")
            .arg(key)
            .arg("-b")
            .arg("-")
            .arg(format!("{user}@127.0.0.1"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(script.as_bytes())?;
                c.wait_with_output()
            })
            .expect("sftp");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn sftp_serves_a_bucket_to_openssh_with_its_keys_only_and_never_outside_it() {
    if !precondition(common::have_tool("ssh") || Command::new("sftp").arg("-h").output().is_ok(), "OpenSSH's sftp client (apt-get install openssh-client)") {
        return;
    }
    let s = Store::new();
    let _node = Node::start(&s, &[], &[]);
    s.put_bytes("/docs/a.txt", b"alpha");
    s.ok(&["bucket", "create", "other"]);
    s.put_bytes_with(&["--bucket", "other"], "/secret", b"other bucket's");
    let key = ssh_keygen(s.scratch(), "key");
    let stranger = ssh_keygen(s.scratch(), "stranger");
    s.ok(&["sftp", "allow", "default", key.with_extension("pub").to_str().unwrap()]);
    let host_key = s.data().join("sftp/host_ed25519");
    let server = SftpServer::start(&s);
    assert_eq!(fs::metadata(&host_key).unwrap().mode() & 0o777, 0o600, "the host key is private");

    let local = s.scratch().join("local.bin");
    common::write_random_file(&local, 300_000, 5);
    let back = s.scratch().join("back.bin");
    let script = format!(
        "put {local} /up.bin\nget /up.bin {back}\nls /docs\nmkdir /newdir\nrename /up.bin /newdir/moved.bin\nrm /docs/a.txt\nrmdir /docs\nls /newdir\n",
        local = local.display(),
        back = back.display()
    );
    let (ok, out) = server.batch(&key, "default", &script);
    assert!(ok, "sftp batch failed: {out}");
    assert!(out.contains("a.txt") && out.contains("moved.bin"), "{out}");
    assert!(common::same_file(&local, &back), "get returned what put sent");
    assert_eq!(s.get_bytes("/newdir/moved.bin"), fs::read(&local).unwrap());
    assert!(s.run(&["get", "/docs/a.txt"]).status.code() != Some(0), "rm removed it");

    // Nothing outside the bucket: `..` stops at its root, other buckets are other logins.
    let passwd = s.scratch().join("passwd");
    let (_, out) = server.batch(&key, "default", &format!("get /../../../../etc/passwd {}\n", passwd.display()));
    assert!(!passwd.exists(), "a path climbing out of the bucket reached the host: {out}");
    let (_, out) = server.batch(&key, "default", "ls ../..\n");
    assert!(out.contains("newdir"), "`..` above the root is the root: {out}");
    let (ok, _) = server.batch(&key, "other", "ls /\n");
    assert!(!ok, "a key of bucket default logged in to bucket other");
    let (ok, _) = server.batch(&stranger, "default", "ls /\n");
    assert!(!ok, "a key never allowed logged in");
    // A symlink pointing out of the bucket is followed inside the tree only.
    let (ok, out) = server.batch(&key, "default", "symlink /etc/passwd /esc\n");
    assert!(ok, "{out}");
    let (_, out) = server.batch(&key, "default", &format!("get /esc {}\n", passwd.display()));
    assert!(!passwd.exists(), "a symlink led out of the bucket: {out}");

    // Revoked keys are refused from the next login on; the host key stays the same.
    s.ok(&["sftp", "revoke", "default", key.with_extension("pub").to_str().unwrap()]);
    let (ok, _) = server.batch(&key, "default", "ls /\n");
    assert!(!ok, "a revoked key still logged in");
    let before = fs::read(&host_key).unwrap();
    drop(server);
    let _again = SftpServer::start(&s);
    assert_eq!(fs::read(&host_key).unwrap(), before, "the host key persists across restarts");
}

#[test]
fn bytes_written_through_sftp_read_back_through_fuse_and_sshfs_sees_what_fuse_wrote() {
    if !can_mount() || !precondition(common::have_tool("sshfs") || Command::new("sshfs").arg("-V").output().is_ok(), "sshfs (apt-get install sshfs)") {
        return;
    }
    let s = Store::new();
    let _node = Node::start(&s, &[], &[]);
    let key = ssh_keygen(s.scratch(), "key");
    s.ok(&["sftp", "allow", "default", key.with_extension("pub").to_str().unwrap()]);
    let server = SftpServer::start(&s);
    let m = Mount::start(&s, &[]);

    let src = s.scratch().join("src");
    for i in 0..30u64 {
        let sub = src.join(format!("d{}", i % 3));
        fs::create_dir_all(&sub).unwrap();
        common::write_random_file(&sub.join(format!("f{i}")), i * 4099, i);
    }
    sh(s.scratch(), &format!("cp -r src {}", m.dir.display()));

    let sshfs_dir = s.scratch().join("sshfs");
    fs::create_dir(&sshfs_dir).unwrap();
    let st = Command::new("sshfs")
        .arg("-p")
        .arg(server.port.to_string())
        .arg("-o")
        .arg(format!("IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes", key.display()))
        .arg("default@127.0.0.1:/")
        .arg(&sshfs_dir)
        .status()
        .unwrap();
    assert!(st.success(), "sshfs mount");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&sshfs_dir);
    sh(s.scratch(), &format!("diff -r src {}", sshfs_dir.join("src").display()));
    // sshfs writes (cp -r, mv over), FUSE reads them back.
    sh(s.scratch(), &format!("cp -r src {}", sshfs_dir.join("copy").display()));
    sh(s.scratch(), &format!("diff -r src {}", m.path("copy").display()));
    fs::write(sshfs_dir.join("copy/over"), b"replaced").unwrap();
    sh(&sshfs_dir, "mv -f copy/over copy/d0/f0");
    await_cond(Duration::from_secs(5), "the FUSE mount to show the sshfs rename", || fs::read(m.path("copy/d0/f0")).ok().as_deref() == Some(b"replaced".as_slice()));
}

#[test]
fn time_travel_shows_the_branch_as_it_was_in_ls_get_and_a_read_only_mount() {
    let s = Store::new();
    s.put_bytes("/doc", b"first");
    s.put_bytes("/kept", b"kept then removed");
    let v1 = s.log_json(&[], "/doc")[0]["version"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(50));
    let before = chrono_now_rfc3339();
    std::thread::sleep(Duration::from_millis(50));
    s.put_bytes("/doc", b"second");
    s.ok(&["rm", "/kept"]);
    s.put_bytes("/later", b"new");

    let names = |flags: &[&str]| -> Vec<String> {
        let mut args = flags.to_vec();
        args.extend(["ls", "/"]);
        let mut v: Vec<String> = s.ok(&args).lines().map(|l| l.trim_end_matches('/').to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&[]), vec!["doc", "later"]);
    assert_eq!(names(&["--at", &before]), vec!["doc", "kept"], "the tree at a time before the second round");
    assert_eq!(s.get_bytes_with(&["--at", &before], "/doc"), b"first");
    assert_eq!(s.get_bytes_with(&["--at", &before], "/kept"), b"kept then removed", "a file removed since reads back");
    assert_eq!(s.get_bytes_with(&["--at", &v1], "/doc"), b"first", "just after a version was written");
    assert_eq!(names(&["--at", &v1]), vec!["doc"], "nothing written after that version shows");
    assert!(s.err(&["--at", "not-a-time", "ls", "/"]).contains("give a time"));
    assert!(s.err(&["--at", &before, "rm", "/doc"]).contains("--at reads the past"));
    assert!(s.err(&["--at", "999@ffff", "ls", "/"]).contains("no version"));

    if !can_mount() {
        return;
    }
    // A mount of the past needs no node and refuses writes.
    let m = Mount::start(&s, &["--at", &before]);
    assert_eq!(fs::read(m.path("doc")).unwrap(), b"first");
    assert_eq!(fs::read(m.path("kept")).unwrap(), b"kept then removed");
    assert!(!m.path("later").exists());
    assert_eq!(errno_of(fs::write(m.path("doc"), b"rewrite history")), libc::EROFS);
}

#[test]
fn a_name_made_elsewhere_in_a_directory_the_mount_made_shows_in_the_mount() {
    // The mount knows which names are absent in the directories it made (an untar asks for
    // each new name first); a change from elsewhere must end that knowledge.
    let Some(Rig { m, node: _node, s }) = rig() else { return };
    fs::create_dir_all(m.path("made/below")).unwrap();
    fs::write(m.path("made/mine"), b"from the mount").unwrap();
    assert!(!m.path("made/cli").exists() && !m.path("made/below/cli").exists());
    settle(&m);
    s.put_bytes("/made/cli", b"from the cli");
    s.put_bytes("/made/below/cli", b"deeper");
    // The store makes the missing directories of a path; the event names the file only.
    s.put_bytes("/made/new/deeper/file", b"with its parents");
    await_cond(Duration::from_secs(5), "the CLI's files to show in the mount", || {
        fs::read(m.path("made/cli")).ok().as_deref() == Some(b"from the cli".as_slice()) && m.path("made/below/cli").exists() && m.path("made/new").is_dir()
    });
    assert_eq!(fs::read(m.path("made/new/deeper/file")).unwrap(), b"with its parents");
    let again = fs::OpenOptions::new().write(true).create_new(true).open(m.path("made/cli"));
    assert_eq!(errno_of(again), libc::EEXIST, "a create of the name made elsewhere");
    assert_eq!(fs::read(m.path("made/mine")).unwrap(), b"from the mount");
    // Made and removed elsewhere while the mount holds its directory's record.
    fs::create_dir(m.path("second")).unwrap();
    settle(&m);
    s.put_bytes("/second/x", b"x");
    s.ok(&["rm", "/second/x"]);
    s.put_bytes("/second/y", b"y");
    await_cond(Duration::from_secs(5), "the CLI's file to show in the mount", || m.path("second/y").exists());
    assert_eq!(listed(&m.path("second")), vec!["y"]);
}

#[test]
fn the_past_is_one_directory_away_in_a_mount_and_read_only() {
    let Some(Rig { m, node: _node, s }) = rig() else { return };
    fs::write(m.path("doc"), b"first").unwrap();
    fs::write(m.path("kept"), b"kept then removed").unwrap();
    settle(&m);
    let v_kept = s.log_json(&[], "/kept")[0]["version"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(50));
    let before = chrono_now_rfc3339();
    std::thread::sleep(Duration::from_millis(50));
    fs::write(m.path("doc"), b"second").unwrap();
    fs::remove_file(m.path("kept")).unwrap();
    settle(&m);

    // By time and by version, with what was removed since; the present goes on as it is.
    let at = |point: &str, p: &str| m.path(&format!(".alkfs/at/{point}/{p}"));
    assert_eq!(fs::read(at(&before, "doc")).unwrap(), b"first");
    assert_eq!(fs::read(at(&before, "kept")).unwrap(), b"kept then removed", "a removed file reads back from the past");
    assert_eq!(fs::read(at(&v_kept, "doc")).unwrap(), b"first", "just after a version was written");
    assert_eq!(listed(&at(&before, "")), vec!["doc", "kept"]);
    assert_eq!(fs::read(m.path("doc")).unwrap(), b"second");
    assert!(!m.path("kept").exists());
    fs::write(m.path("doc"), b"third").unwrap();
    assert_eq!(fs::read(at(&before, "doc")).unwrap(), b"first", "a point of the past does not move");

    // Not listed, so tools that walk the mount do not walk its history; the points opened
    // are listed in `at`.
    assert_eq!(listed(&m.dir), vec!["doc"], "the root's listing");
    assert_eq!(sh(&m.dir, "find . | sort"), ".\n./doc\n");
    let opened = listed(&m.path(".alkfs/at"));
    let mut expected = vec![before.clone(), v_kept.clone()];
    expected.sort();
    assert_eq!(opened, expected);

    // Read-only, and not to be made, removed or renamed over; names that are no point of
    // the past (a while ago would move under the kernel's cache) are not there.
    assert_eq!(errno_of(fs::write(at(&before, "doc"), b"rewrite history")), libc::EROFS);
    assert_eq!(errno_of(fs::write(at(&before, "new"), b"x")), libc::EROFS);
    assert_eq!(errno_of(fs::remove_file(at(&before, "doc"))), libc::EROFS);
    assert_eq!(errno_of(fs::create_dir(m.path(".alkfs/at/mine"))), libc::EROFS);
    assert_eq!(errno_of(fs::rename(at(&before, "doc"), m.path("restored"))), libc::EXDEV, "mv copies out of the past");
    assert_eq!(errno_of(fs::create_dir(m.path(".alkfs"))), libc::EEXIST);
    assert_eq!(errno_of(fs::remove_dir(m.path(".alkfs"))), libc::EBUSY);
    assert_eq!(errno_of(fs::rename(m.path(".alkfs"), m.path("mine"))), libc::EBUSY);
    assert_eq!(errno_of(fs::rename(m.path("doc"), m.path(".alkfs"))), libc::EISDIR, "a file over a directory");
    for bad in ["2h", "not-a-time", "999@ffff", "2999-01-01T00:00:00Z"] {
        assert!(!m.path(&format!(".alkfs/at/{bad}")).exists(), "{bad} is no point of the past");
    }
    sh(&m.dir, &format!("cp .alkfs/at/{before}/kept restored"));
    settle(&m);
    assert_eq!(s.get_bytes("/restored"), b"kept then removed", "restoring is a copy out of the past");
    assert_eq!(s.get_bytes("/doc"), b"third");
}

/// The names in directory `dir`, sorted.
fn listed(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

/// Now as RFC 3339 with milliseconds (UTC).
fn chrono_now_rfc3339() -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let out = Command::new("date").arg("-u").arg("-d").arg(format!("@{}.{:03}", ms / 1000, ms % 1000)).arg("+%Y-%m-%dT%H:%M:%S.%3NZ").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn a_file_written_on_one_node_appears_in_another_nodes_mount_and_its_bytes_are_fetched_on_open() {
    if !can_mount() {
        return;
    }
    let (a, b) = (Store::new(), Store::new());
    let _na = Node::start(&a, &[], &[]);
    let _nb = Node::start(&b, &[], &[]);
    let ticket = a.ok(&["invite"]).trim().to_string();
    assert!(b.ok(&["join", &ticket]).contains("joined bucket"));
    // The kernel may cache names and attributes for ten minutes here: only invalidation
    // (the mount follows the outbox) can show changes from elsewhere sooner.
    let m = Mount::start(&b, &["--cache-secs", "600"]);

    // Large enough to be a file blob, which B fetches from A when the file is opened.
    let bytes = common::random_bytes(3 << 20, 42);
    let local = a.scratch().join("big.bin");
    fs::write(&local, &bytes).unwrap();
    a.ok(&["put", local.to_str().unwrap(), "/from-a/big.bin"]);
    a.put_bytes("/from-a/small.txt", b"hello from A");
    await_cond(Duration::from_secs(30), "A's files to show in B's mount", || m.path("from-a/big.bin").exists() && m.path("from-a/small.txt").exists());
    await_cond(Duration::from_secs(30), "A's bytes to read back through B's mount", || fs::read(m.path("from-a/big.bin")).ok().as_deref() == Some(&bytes[..]));
    assert_eq!(fs::read(m.path("from-a/small.txt")).unwrap(), b"hello from A");

    // And back: written in B's mount, read on A.
    fs::write(m.path("from-b.txt"), b"written in B's mount").unwrap();
    settle(&m);
    await_cond(Duration::from_secs(30), "B's file to reach A", || a.run(&["get", "/from-b.txt"]).stdout == b"written in B's mount");

    // Changes from elsewhere reach the kernel's caches: a peer's new size and removal, and
    // B's own CLI writing over a file the mount has shown.
    let len = |p: &str| fs::metadata(m.path(p)).map(|md| md.len()).ok();
    assert_eq!(len("from-a/small.txt"), Some(12));
    assert_eq!(len("from-b.txt"), Some(20));
    a.put_bytes("/from-a/small.txt", b"changed on A, and longer");
    a.ok(&["rm", "/from-a/big.bin"]);
    b.put_bytes("/from-b.txt", b"rewritten by B's CLI, longer");
    await_cond(Duration::from_secs(30), "A's new size to show in B's mount", || len("from-a/small.txt") == Some(24));
    await_cond(Duration::from_secs(30), "A's removal to show in B's mount", || !m.path("from-a/big.bin").exists());
    await_cond(Duration::from_secs(10), "B's CLI write to show in B's mount", || len("from-b.txt") == Some(28));
    assert_eq!(fs::read(m.path("from-a/small.txt")).unwrap(), b"changed on A, and longer");
}

#[test]
fn reading_a_file_whose_bytes_are_on_a_peer_fetches_only_the_ranges_read() {
    if !can_mount() {
        return;
    }
    let (a, b) = (Store::new(), Store::new());
    let _na = Node::start(&a, &[], &[]);
    // Lazy: B fetches bytes only when something reads them.
    let _nb = Node::start(&b, &["--set", "net.fetch=lazy"], &[]);
    let ticket = a.ok(&["invite"]).trim().to_string();
    assert!(b.ok(&["join", &ticket]).contains("joined bucket"));
    let m = Mount::start(&b, &[]);

    let bytes = common::random_bytes(40 << 20, 7);
    let local = a.scratch().join("video.bin");
    fs::write(&local, &bytes).unwrap();
    a.ok(&["put", local.to_str().unwrap(), "/video.bin"]);
    await_cond(Duration::from_secs(30), "A's file to show in B's mount", || m.path("video.bin").exists());

    // 64 KiB from the middle: those bytes, and only their range came (the blob is not whole here).
    let mut f = File::open(m.path("video.bin")).unwrap();
    let mut got = vec![0u8; 64 << 10];
    f.seek(SeekFrom::Start(25 << 20)).unwrap();
    f.read_exact(&mut got).unwrap();
    assert!(got == bytes[25 << 20..(25 << 20) + (64 << 10)], "the range read is the range written");
    assert!(b.blob_files().iter().all(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0) < 40 << 20), "reading a range did not fetch the whole blob into B's content store");
    // The last bytes, and then the whole file in order (fetched ahead, window by window).
    f.seek(SeekFrom::End(-10)).unwrap();
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, &bytes[bytes.len() - 10..]);
    drop(f);
    assert!(fs::read(m.path("video.bin")).unwrap() == bytes, "the whole file read through ranges is what A wrote");
}

#[test]
fn a_full_disk_fails_the_write_with_enospc_and_the_file_keeps_its_old_version() {
    if !can_mount() || !precondition(common::is_root(), "the full-disk check mounts a small tmpfs, which needs root") {
        return;
    }
    let disk = common::Tmpfs::mount("48m");
    let s = Store::at(&disk.path().join("data"));
    let _node = Node::start(&s, &["--set", "net.listen=127.0.0.1:0"], &[]);
    let m = Mount::start(&s, &[]);
    fs::write(m.path("keep"), b"the old version").unwrap();
    settle(&m);

    // 100 MiB over it on a 48 MiB disk, through one descriptor (a shell's `>` or dd would
    // dup2 and close it first, which commits the truncation as a version of its own): the
    // writer is told ENOSPC, its close too, and nothing half-written shows.
    let mut f = File::create(m.path("keep")).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let failed = (0..100).find_map(|_| f.write_all(&chunk).err()).expect("100 MiB fit on a 48 MiB disk");
    assert_eq!(failed.raw_os_error(), Some(libc::ENOSPC), "the write's error: {failed}");
    assert_eq!(errno_of(f.write_all(b"more")), libc::ENOSPC, "writes after the failure fail too");
    assert_eq!(errno_of(f.sync_all()), libc::ENOSPC, "fsync reports it");
    drop(f);
    assert_eq!(fs::read(m.path("keep")).unwrap(), b"the old version", "the mount shows the old version");
    settle(&m);
    assert_eq!(s.get_bytes("/keep"), b"the old version", "the tree keeps the old version");

    // The failed session's bytes are gone, and the mount and node go on.
    assert!(common::dir_size(s.data()) < 16 << 20, "the failed write's staged bytes were freed");
    fs::write(m.path("after"), b"still serving").unwrap();
    settle(&m);
    assert_eq!(s.get_bytes("/after"), b"still serving");
}

#[test]
fn a_mount_batch_with_one_change_that_no_longer_fits_the_tree_commits_the_others() {
    use alknet_fs::control::{client::Client, Request, StagedAttr, StagedFile, WireScope};
    let s = Store::new();
    let _node = Node::start(&s, &[], &[]);
    // What a mount's write-behind sends: a closed file (its staging file taken over by the
    // node) and a chmod of a directory that was removed elsewhere meanwhile.
    // (A mount's staging directory, locked as a running mount's is.)
    let (staging, _lock) = alknet_fs::mount::journal::make_mount_dir(&s.data().join("content/staging")).unwrap();
    let bytes = common::random_bytes(100_000, 3);
    fs::write(staging.join("stage-a"), &bytes).unwrap();
    let seen = alknet_actors::store::acked::Seen::Opened(None);
    let file = StagedFile { id: "t:1".into(), seen, path: "/kept".into(), staging: Some(staging.join("stage-a")), data: None, hash: None, size: Some(bytes.len() as u64), mode: 0o644, mtime_ms: 1_000 };
    let gone = StagedAttr { id: "t:2".into(), path: "/removed-elsewhere".into(), mode: Some(0o700), mtime_ms: None };
    let scope = WireScope { bucket: "default".into(), branch: "main".into() };
    let node = Client::connect(s.data()).expect("the node's socket");
    let request = Request::PutStaged { scope, items: vec![file], attrs: vec![gone], dirs: vec![] };
    let reply = node.call(&request).expect("the batch is answered");
    assert!(matches!(&reply, alknet_fs::control::Reply::Staged { failed } if failed.is_empty()), "a chmod of a path gone meanwhile is moot, not a failure: {reply:?}");
    assert!(s.get_bytes("/kept") == bytes, "the file committed although the chmod could not");
    assert!(!staging.join("stage-a").exists(), "the staging file is consumed by the commit that recorded it");
    // Sent again (its answer lost, say), nothing is applied twice.
    node.call(&request).expect("answered again");
    assert_eq!(common::parse_json_array(&s.ok(&["log", "/kept", "--json"])).len(), 1, "one version of /kept");
}

#[test]
fn sftp_truncate_of_a_symlink_truncates_its_target_and_the_link_stays_a_link() {
    if !precondition(Command::new("ssh-keygen").arg("-?").output().is_ok(), "OpenSSH's ssh-keygen (apt-get install openssh-client)") {
        return;
    }
    let s = Store::new();
    let _node = Node::start(&s, &[], &[]);
    s.put_bytes("/target.txt", b"0123456789");
    let key = ssh_keygen(s.scratch(), "key");
    s.ok(&["sftp", "allow", "default", key.with_extension("pub").to_str().unwrap()]);
    let server = SftpServer::start(&s);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (_session, channel) = sftp_channel(server.port, &key).await;
        let sftp = russh_sftp::client::SftpSession::new(channel.into_stream()).await.unwrap();
        // (OpenSSH's order of the two paths, which our server follows as every client does.)
        sftp.symlink("/target.txt", "/link").await.unwrap();
        // SETSTAT with a size on the link: truncate(2) of the path.
        let attrs = russh_sftp::protocol::FileAttributes { size: Some(4), ..Default::default() };
        sftp.set_metadata("/link", attrs).await.unwrap();
    });
    assert_eq!(s.get_bytes("/target.txt"), b"0123", "the link's target was truncated");
    let ls = common::parse_json_array(&s.ok(&["ls", "/", "--json"]));
    let link = ls.iter().find(|e| e["path"] == "/link").expect("the link is listed");
    assert_eq!(link["kind"], "symlink", "the link is still a link: {link}");
}

#[test]
fn a_members_link_cannot_lead_a_write_on_the_mount_out_of_the_bucket() {
    let Some(rig) = rig() else { return };
    let (m, s) = (&rig.m, &rig.s);
    let victim = s.scratch().join("victim.txt");
    fs::write(&victim, "a host file").unwrap();
    // Links a member wrote (a `put -r` of a tree holding them stands for a peer's write):
    // absolute, and relative climbing above the root, both to the host file.
    let docs = s.scratch().join("docs");
    fs::create_dir_all(&docs).unwrap();
    std::os::unix::fs::symlink(&victim, docs.join("report.txt")).unwrap();
    let climb = format!("{}{}", "../".repeat(20), victim.display().to_string().trim_start_matches('/'));
    std::os::unix::fs::symlink(&climb, docs.join("escape.txt")).unwrap();
    std::os::unix::fs::symlink("inside.txt", docs.join("friendly.txt")).unwrap();
    s.ok(&["put", "-r", docs.to_str().unwrap(), "/docs"]);
    fs::write(m.path("docs/inside.txt"), b"in the bucket").unwrap();
    settle(m);
    for link in ["docs/report.txt", "docs/escape.txt"] {
        let shown = fs::read_link(m.path(link)).unwrap();
        assert!(shown.starts_with(&m.dir), "{link} leads to {} (outside the mount)", shown.display());
        let appended = OpenOptions::new().append(true).open(m.path(link)).and_then(|mut f| f.write_all(b"pwned"));
        assert!(appended.is_err(), "appending through {link} succeeded");
    }
    assert_eq!(fs::read_to_string(&victim).unwrap(), "a host file", "the host file is untouched");
    // A link that stays inside works as stored, and one made here to a path in the mount
    // is stored as the bucket's path (so it leads there on every machine).
    assert_eq!(fs::read(m.path("docs/friendly.txt")).unwrap(), b"in the bucket");
    std::os::unix::fs::symlink(m.path("docs/inside.txt"), m.path("abs-link")).unwrap();
    settle(m);
    assert_eq!(s.get_bytes("/abs-link"), b"/docs/inside.txt");
    assert_eq!(fs::read(m.path("abs-link")).unwrap(), b"in the bucket");
}

/// An SSH client that trusts any host key: for the hostile client below.
struct AnyHost;

impl russh::client::Handler for AnyHost {
    type Error = anyhow::Error;

    async fn check_server_key(&mut self, _key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// An SSH session to `serve sftp` on `port`, logged in to bucket `default` with `key`, and a
/// channel on its `sftp` subsystem (the session must outlive the channel).
async fn sftp_channel(port: u16, key: &Path) -> (russh::client::Handle<AnyHost>, russh::Channel<russh::client::Msg>) {
    let config = std::sync::Arc::new(russh::client::Config::default());
    let mut session = russh::client::connect(config, ("127.0.0.1", port), AnyHost).await.unwrap();
    let private = russh::keys::PrivateKey::from_openssh(fs::read(key).unwrap()).unwrap();
    let auth = session.authenticate_publickey("default", russh::keys::PrivateKeyWithHashAlg::new(std::sync::Arc::new(private), None)).await.unwrap();
    assert!(auth.success());
    let channel = session.channel_open_session().await.unwrap();
    channel.request_subsystem(true, "sftp").await.unwrap();
    (session, channel)
}

/// An SFTP packet: length, type, then `body`.
fn sftp_packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut p = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    p.push(kind);
    p.extend_from_slice(body);
    p
}

#[test]
fn an_sftp_client_sending_malformed_packets_gets_errors_and_the_server_keeps_serving_others() {
    if !precondition(Command::new("sftp").arg("-h").output().is_ok(), "OpenSSH's sftp client (apt-get install openssh-client)") {
        return;
    }
    let s = Store::new();
    let _node = Node::start(&s, &[], &[]);
    s.put_bytes("/a.txt", b"still here");
    let key = ssh_keygen(s.scratch(), "key");
    s.ok(&["sftp", "allow", "default", key.with_extension("pub").to_str().unwrap()]);
    let server = SftpServer::start(&s);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let replies = rt.block_on(async {
        let (_session, mut channel) = sftp_channel(server.port, &key).await;
        let mut hostile = Vec::new();
        hostile.extend(sftp_packet(1, &3u32.to_be_bytes())); // INIT, version 3
        hostile.extend(sftp_packet(17, &[0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff])); // STAT with a string longer than the packet
        hostile.extend(sftp_packet(250, b"no such packet type"));
        let mut open = 9u32.to_be_bytes().to_vec(); // OPEN id 9 of a path out of the bucket
        let path = b"/../../../etc/passwd";
        open.extend((path.len() as u32).to_be_bytes());
        open.extend(path);
        open.extend(1u32.to_be_bytes()); // READ
        open.extend(0u32.to_be_bytes()); // no attributes
        hostile.extend(sftp_packet(3, &open));
        hostile.extend(sftp_packet(3, &[0, 0, 0, 1])); // OPEN cut short
        channel.data(&hostile[..]).await.unwrap();
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, channel.wait()).await {
            if let russh::ChannelMsg::Data { data } = msg {
                got.extend_from_slice(&data);
            }
        }
        got
    });
    // Every reply is a well-formed packet; the open of a path above the root named no host
    // file (the bucket has no /etc/passwd: "no such file").
    let mut at = 0;
    let mut kinds = Vec::new();
    while at + 5 <= replies.len() {
        let len = u32::from_be_bytes(replies[at..at + 4].try_into().unwrap()) as usize;
        kinds.push(replies[at + 4]);
        at += 4 + len;
    }
    assert_eq!(at, replies.len(), "replies are whole packets: {replies:?}");
    assert_eq!(kinds.first(), Some(&2), "a VERSION answers INIT: {kinds:?}");
    assert!(kinds.len() >= 4, "the bad packets were answered, not dropped: {kinds:?}");
    assert!(kinds[1..].iter().all(|k| *k == 101), "every other answer is a STATUS: {kinds:?}");
    assert!(!replies.windows(5).any(|w| w == b"root:"), "no host file leaked");
    // The server still serves an ordinary client.
    let back = s.scratch().join("back.txt");
    let (ok, out) = server.batch(&key, "default", &format!("get /a.txt {}\n", back.display()));
    assert!(ok, "{out}");
    assert_eq!(fs::read(&back).unwrap(), b"still here");
}

#[test]
fn rclone_copies_a_tree_to_the_sftp_server_and_back() {
    if !precondition(common::have_tool("rclone"), "rclone (apt-get install rclone)") {
        return;
    }
    let s = Store::new();
    let _node = Node::start(&s, &[], &[]);
    let key = ssh_keygen(s.scratch(), "key");
    s.ok(&["sftp", "allow", "default", key.with_extension("pub").to_str().unwrap()]);
    let server = SftpServer::start(&s);
    let src = s.scratch().join("src");
    for i in 0..60u64 {
        let sub = src.join(format!("d{}", i % 4));
        fs::create_dir_all(&sub).unwrap();
        common::write_random_file(&sub.join(format!("f{i}")), i * 7919 + 1, i);
    }
    // rclone moves several files at once on several connections, and sets each one's mtime
    // after its upload: sessions of one bucket working side by side.
    let rclone = |args: &[&str]| {
        let out = Command::new("rclone")
            .args(args)
            .args(["--config", "/dev/null", "--sftp-host", "127.0.0.1", "--sftp-port", &server.port.to_string(), "--sftp-user", "default"])
            .arg("--sftp-key-file")
            .arg(&key)
            .args(["--sftp-shell-type", "none", "--sftp-disable-hashcheck", "--transfers", "8", "--low-level-retries", "1", "--retries", "1"])
            .output()
            .unwrap();
        assert!(out.status.success(), "rclone {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    rclone(&["copy", src.to_str().unwrap(), ":sftp:/up"]);
    assert_eq!(s.get_bytes("/up/d3/f7"), fs::read(src.join("d3/f7")).unwrap(), "rclone's upload reads back through the CLI");
    let back = s.scratch().join("back");
    rclone(&["copy", ":sftp:/up", back.to_str().unwrap()]);
    sh(s.scratch(), "diff -r src back");
}

#[test]
fn with_its_node_killed_the_mount_reads_on_fails_changes_in_bounded_time_and_commits_once_the_node_is_back() {
    if !can_mount() {
        return;
    }
    let s = Store::new();
    let mut node = Node::start(&s, &[], &[]);
    let m = Mount::start(&s, &[]);
    fs::write(m.path("kept"), b"before").unwrap();
    settle(&m);
    node.kill();

    assert_eq!(fs::read(m.path("kept")).unwrap(), b"before", "reads need no node");
    fs::write(m.path("while-down"), b"queued").unwrap();
    assert_eq!(fs::read(m.path("while-down")).unwrap(), b"queued", "a close shows in the mount at once");
    let t = std::time::Instant::now();
    let renamed = fs::rename(m.path("kept"), m.path("moved"));
    assert_eq!(errno_of(renamed), libc::EIO, "a change that needs the node fails");
    assert!(t.elapsed() < Duration::from_secs(30), "... without hanging the mount: {:?}", t.elapsed());
    assert_eq!(fs::read(m.path("kept")).unwrap(), b"before", "and changes nothing");

    let _node = Node::start(&s, &[], &[]);
    await_cond(Duration::from_secs(30), "the close queued while the node was down to commit", || s.run(&["get", "/while-down"]).stdout == b"queued");
    fs::rename(m.path("kept"), m.path("moved")).unwrap();
    settle(&m);
    assert_eq!(s.get_bytes("/moved"), b"before");
}

/// What POSIX tools read and the design cannot keep: special files and foreign owners are
/// refused with the errno POSIX names (EPERM), not ENOSYS or a silent no-op; an explicitly
/// set access time is kept (mail readers compare it with the mtime); a change moves the
/// change time; an open file unlinked reports no links; a directory's link count says
/// "unknown" (1), never a wrong count of subdirectories.
#[test]
fn posix_details_special_files_owners_times_and_link_counts() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    // The store is held to the end: its data dir goes with it.
    let Some(Rig { m, node: _node, s: _s }) = rig() else { return };
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
    let last_errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    // SAFETY: valid NUL-terminated paths.
    assert_eq!(unsafe { libc::mkfifo(c(&m.path("fifo")).as_ptr(), 0o644) }, -1);
    assert_eq!(last_errno(), libc::EPERM, "mkfifo");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mknod(c(&m.path("dev")).as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 3)) }, -1);
    assert_eq!(last_errno(), libc::EPERM, "mknod of a device");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mknod(c(&m.path("plain")).as_ptr(), libc::S_IFREG | 0o600, 0) }, 0, "mknod of a regular file makes one");
    assert_eq!(fs::metadata(m.path("plain")).unwrap().mode() & 0o7777, 0o600);

    fs::write(m.path("f"), b"x").unwrap();
    let meta = fs::metadata(m.path("f")).unwrap();
    assert_eq!(errno_of(std::os::unix::fs::chown(m.path("f"), Some(65534), None)), libc::EPERM, "chown to another user");
    assert_eq!(errno_of(std::os::unix::fs::chown(m.path("f"), Some(meta.uid()), Some(meta.gid()))), 0, "chown to the owner shown");

    // An access time set explicitly is kept; the mtime is not touched by it.
    let times = [libc::timespec { tv_sec: 1_000_000_000, tv_nsec: 0 }, libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }];
    // SAFETY: valid path and a two-element array.
    assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c(&m.path("f")).as_ptr(), times.as_ptr(), 0) }, 0);
    let after = fs::metadata(m.path("f")).unwrap();
    assert_eq!((after.atime(), after.mtime()), (1_000_000_000, meta.mtime()), "atime kept, mtime as it was");
    // A chmod a second later moves the change time.
    let ctime = after.ctime();
    std::thread::sleep(Duration::from_millis(1100));
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o600)).unwrap();
    assert!(fs::metadata(m.path("f")).unwrap().ctime() > ctime, "chmod moves ctime");

    // Unlinked while open: no links.
    let open = File::open(m.path("f")).unwrap();
    fs::remove_file(m.path("f")).unwrap();
    assert_eq!(open.metadata().unwrap().nlink(), 0, "fstat of an unlinked open file");
    fs::create_dir_all(m.path("d/sub")).unwrap();
    assert_eq!(fs::metadata(m.path("d")).unwrap().nlink(), 1, "a directory's link count is 'unknown'");
}
