//! A close or fsync that returned is a promise: real mounts, real nodes, real faults. A
//! mount killed while the node had not committed what it acknowledged (the node stopped
//! with SIGSTOP, so the kill lands before the commit, checked); `sync FILE` after `cp` and
//! fsync with two writers return only once the file is committed; a save over a version
//! that changed meanwhile keeps the other version as a listed conflict; a change whose
//! directory was replaced by a file meanwhile is kept, not dropped; a close the node cannot
//! commit stays queued, fails fsync and commits once it can; a blob cut short on disk reads
//! as an error, not as a short file.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::mount::{errno_of, rig, settle, Rig};
use common::{await_cond, Node, Store};

/// Stops `node` (SIGSTOP) until dropped (SIGCONT): the mount's closes return and wait in
/// its queue, unsent or unanswered.
struct Paused<'n>(&'n mut Node);

impl<'n> Paused<'n> {
    fn new(node: &'n mut Node) -> Self {
        node.signal(libc::SIGSTOP);
        Paused(node)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

/// Mount staging directories left in `s`'s data dir.
fn staging_dirs(s: &Store) -> Vec<String> {
    fs::read_dir(s.data().join("content/staging"))
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str().map(str::to_string)).filter(|n| n.starts_with("mount-")).collect())
        .unwrap_or_default()
}

#[test]
fn what_a_killed_mount_acknowledged_is_committed_by_the_node() {
    let Some(Rig { mut m, mut node, s }) = rig() else { return };
    fs::write(m.path("doc.txt"), b"v1").unwrap();
    settle(&m);
    let big = common::random_bytes(200_000, 7);
    {
        let _paused = Paused::new(&mut node);
        fs::write(m.path("small.txt"), b"closed while the node was stopped").unwrap();
        fs::write(m.path("big.bin"), &big).unwrap();
        fs::create_dir(m.path("newdir")).unwrap();
        fs::write(m.path("newdir/inner.txt"), b"inner").unwrap();
        fs::write(m.path("doc.txt"), b"v2").unwrap();
        // Every close returned. The mount dies (SIGKILL) before any of it committed: the
        // tree (read without the node) has none of it.
        m.child.kill().unwrap();
        m.child.wait().unwrap();
        assert!(!s.ls("/").iter().any(|l| l.contains("small.txt")), "the kill landed after a commit: {:?}", s.ls("/"));
        assert_eq!(s.get_bytes("/doc.txt"), b"v1");
    }
    await_cond(Duration::from_secs(30), "the node to commit what the killed mount acknowledged", || s.run(&["get", "/small.txt"]).stdout == b"closed while the node was stopped");
    assert_eq!(s.get_bytes("/big.bin"), big);
    assert_eq!(s.get_bytes("/newdir/inner.txt"), b"inner");
    assert_eq!(s.get_bytes("/doc.txt"), b"v2", "the save of doc.txt replaced the version its writer opened");
    assert!(common::parse_json_array(&s.ok(&["conflicts", "--json"])).is_empty(), "nothing else changed doc.txt: no conflict");
    await_cond(Duration::from_secs(15), "the dead mount's staging directory to go", || staging_dirs(&s).is_empty());
}

#[test]
fn what_a_mount_acknowledged_while_the_node_was_down_survives_the_mount_and_commits_when_the_node_starts() {
    let Some(Rig { mut m, mut node, s }) = rig() else { return };
    node.kill();
    fs::write(m.path("while-down.txt"), b"written with no node").unwrap();
    let big = common::random_bytes(100_000, 9);
    fs::write(m.path("while-down.bin"), &big).unwrap();
    m.child.kill().unwrap();
    m.child.wait().unwrap();
    assert!(s.run(&["get", "/while-down.txt"]).stdout.is_empty(), "nothing committed without a node");
    // The next node commits them (and no new mount is needed for it).
    let _node = Node::start(&s, &[], &[]);
    await_cond(Duration::from_secs(30), "the node to commit the dead mount's journal", || s.run(&["get", "/while-down.txt"]).stdout == b"written with no node");
    assert_eq!(s.get_bytes("/while-down.bin"), big);
}

#[test]
fn sync_of_a_copied_file_returns_only_once_it_is_committed() {
    let Some(Rig { m, mut node, s }) = rig() else { return };
    let data = common::random_bytes(50_000, 3);
    let mut sync = {
        let _paused = Paused::new(&mut node);
        fs::write(m.path("copied.bin"), &data).unwrap();
        // `sync FILE` opens it read-only and fsyncs it: with the node stopped it waits.
        let mut sync = Command::new("sync").arg(m.path("copied.bin")).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert!(sync.try_wait().unwrap().is_none(), "sync returned while the file could not be committed");
        sync
    };
    let started = Instant::now();
    let status = loop {
        if let Some(st) = sync.try_wait().unwrap() {
            break st;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "sync did not return after the node came back");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "sync failed: {status}");
    assert_eq!(s.get_bytes("/copied.bin"), data, "committed when sync returned");
}

#[test]
fn fsync_by_one_of_two_writers_commits_what_both_wrote() {
    let Some(Rig { m, node: _node, s }) = rig() else { return };
    let mut a = OpenOptions::new().create(true).write(true).truncate(true).open(m.path("shared.txt")).unwrap();
    let mut b = OpenOptions::new().write(true).open(m.path("shared.txt")).unwrap();
    a.write_all(b"written by a, ").unwrap();
    b.write_all(b"WRITTEN BY B").unwrap();
    b.sync_all().unwrap();
    // Each descriptor wrote at its own offset 0: b's bytes over a's first twelve.
    assert_eq!(s.get_bytes("/shared.txt"), b"WRITTEN BY B, ", "fsync returned: the file as written so far is committed");
    drop((a, b));
}

#[test]
fn a_save_over_a_version_that_changed_meanwhile_keeps_the_other_as_a_listed_conflict() {
    let Some(Rig { m, node: _node, s }) = rig() else { return };
    fs::write(m.path("doc.txt"), b"version 1").unwrap();
    settle(&m);
    // An editor opens it (at version 1) ...
    let mut editor = OpenOptions::new().read(true).write(true).open(m.path("doc.txt")).unwrap();
    let mut opened = String::new();
    editor.read_to_string(&mut opened).unwrap();
    assert_eq!(opened, "version 1");
    // ... another writer saves version 2 meanwhile (through the node, as a peer's would arrive) ...
    s.put_bytes("/doc.txt", b"version 2, from elsewhere");
    // ... and the editor saves over what it opened.
    editor.set_len(0).unwrap();
    std::io::Seek::seek(&mut editor, std::io::SeekFrom::Start(0)).unwrap();
    editor.write_all(b"version 3, saved over 1").unwrap();
    drop(editor);
    settle(&m);
    assert_eq!(s.get_bytes("/doc.txt"), b"version 3, saved over 1", "the later save is the head");
    let conflicts = common::parse_json_array(&s.ok(&["conflicts", "--json"]));
    assert_eq!(conflicts.len(), 1, "version 2 is listed, not silently replaced: {conflicts:?}");
    let loser = conflicts[0]["loser_version"].as_str().unwrap().to_string();
    s.ok(&["restore", "/doc.txt", "--version", &loser]);
    assert_eq!(s.get_bytes("/doc.txt"), b"version 2, from elsewhere");
}

#[test]
fn a_close_whose_directory_became_a_file_meanwhile_is_kept_and_the_file_listed() {
    use alknet_fs::control::{client::Client, Reply, Request, StagedFile, WireScope};
    let s = Store::new();
    let _node = Node::start(&s, &[], &[]);
    // The mount closed /d/f (staged), and before its batch commits /d became a file elsewhere.
    s.put_bytes("/d", b"a file where the directory was");
    let (staging, _lock) = alknet_fs::mount::journal::make_mount_dir(&s.data().join("content/staging")).unwrap();
    let bytes = common::random_bytes(40_000, 5);
    fs::write(staging.join("stage-f"), &bytes).unwrap();
    let seen = alknet_actors::store::acked::Seen::Opened(None);
    let file = StagedFile { id: "t:1".into(), seen, path: "/d/f".into(), staging: Some(staging.join("stage-f")), data: None, hash: None, size: Some(bytes.len() as u64), mode: 0o644, mtime_ms: 1_000 };
    let node = Client::connect(s.data()).expect("the node's socket");
    let reply = node.call(&Request::PutStaged { scope: WireScope { bucket: "default".into(), branch: "main".into() }, items: vec![file], attrs: vec![], dirs: vec![] }).unwrap();
    assert!(matches!(&reply, Reply::Staged { failed } if failed.is_empty()), "{reply:?}");
    assert_eq!(s.get_bytes("/d/f"), bytes, "the acknowledged write is live");
    assert!(s.ls("/").iter().any(|l| l.starts_with("d")), "{:?}", s.ls("/"));
    let conflicts = common::parse_json_array(&s.ok(&["conflicts", "--json"]));
    assert!(conflicts.iter().any(|c| c["path"] == "/d"), "the file that stood in the way is listed: {conflicts:?}");
    let loser = conflicts.iter().find(|c| c["path"] == "/d").unwrap()["loser_version"].as_str().unwrap().to_string();
    let log = s.ok(&["log", "/d"]);
    assert!(log.contains(&loser), "and restorable from the log: {log}");
}

#[test]
fn a_blob_cut_short_on_disk_reads_as_an_error_not_a_short_file() {
    let Some(Rig { m, node: _node, s }) = rig() else { return };
    let data = common::random_bytes(1 << 20, 11);
    s.put_bytes("/big.bin", &data);
    let blob = s.blob_files().into_iter().next().expect("a blob file");
    // Damage: the blob file loses its second half (a disk error, a bad copy of the data dir).
    OpenOptions::new().write(true).open(&blob).unwrap().set_len(512 << 10).unwrap();
    let mut f = fs::File::open(m.path("big.bin")).unwrap();
    let mut got = Vec::new();
    let read = f.read_to_end(&mut got);
    assert_eq!(errno_of(read), libc::EIO, "read {} of {} bytes and no error", got.len(), data.len());
}

#[test]
fn a_read_waiting_for_an_unreachable_peer_holds_up_its_reader_only() {
    if !common::mount::can_mount() {
        return;
    }
    let (a, b) = (Store::new(), Store::new());
    let mut na = Node::start(&a, &[], &[]);
    // Lazy: B fetches bytes only when something reads them.
    let _nb = Node::start(&b, &["--set", "net.fetch=lazy"], &[]);
    let ticket = a.ok(&["invite"]).trim().to_string();
    assert!(b.ok(&["join", &ticket]).contains("joined bucket"));
    let m = common::mount::Mount::start(&b, &[]);
    a.put_bytes("/remote.bin", &common::random_bytes(2 << 20, 3));
    await_cond(Duration::from_secs(30), "A's file to show in B's mount", || m.path("remote.bin").exists());
    fs::write(m.path("local.txt"), b"here").unwrap();
    settle(&m);
    // A stops answering: a read of its bytes waits ...
    let _paused = Paused::new(&mut na);
    let path = m.path("remote.bin");
    let reader = std::thread::spawn(move || fs::read(path).map(|b| b.len()));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!reader.is_finished(), "the read did not wait for the peer");
    // ... and everything else on the mount goes on meanwhile.
    let started = Instant::now();
    assert_eq!(fs::read(m.path("local.txt")).unwrap(), b"here");
    let names: Vec<String> = fs::read_dir(&m.dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.contains(&"local.txt".to_string()), "{names:?}");
    fs::write(m.path("another.txt"), b"written meanwhile").unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "other requests waited {:?} behind the stalled read", started.elapsed());
    assert!(!reader.is_finished(), "the stalled read was still waiting while the others were served");
    drop(_paused);
    let read = reader.join().unwrap();
    assert_eq!(read.unwrap_or(0), 2 << 20, "the read completes once the peer answers");
}

/// A close the node cannot commit is never counted done: here its staging file is cut
/// short on disk after the close returned, so the node refuses it (its length is not the
/// one written). It stays queued and is sent again, `fsync` fails with the node's words,
/// `status` counts the failure, and once the file is whole again it commits.
#[test]
fn a_close_the_node_cannot_commit_stays_queued_fails_fsync_and_commits_once_it_can() {
    let Some(Rig { m, mut node, s }) = rig() else { return };
    let bytes = common::random_bytes(200_000, 11);
    let staged = {
        let _paused = Paused::new(&mut node);
        fs::write(m.path("big.bin"), &bytes).unwrap();
        // The close returned; its bytes wait in the mount's staging file. Cut it short.
        let dirs = staging_dirs(&s);
        let staged = dirs
            .iter()
            .flat_map(|d| common::list_dir(&s.data().join("content/staging").join(d)))
            .find(|p| fs::metadata(p).is_ok_and(|md| md.len() == bytes.len() as u64))
            .expect("the closed file's staging file");
        OpenOptions::new().write(true).open(&staged).unwrap().set_len(100_000).unwrap();
        staged
    };
    let st = common::await_status(s.data(), Duration::from_secs(30), "the node to refuse the change", |st| st["acked_failures"].as_u64().is_some_and(|n| n >= 1));
    assert!(st.to_string().contains("not the 200000 written"), "status says why: {st}");
    let failed = fs::File::open(&m.dir).unwrap().sync_all();
    assert_eq!(errno_of(failed), libc::EIO, "fsync reports the change that did not commit");
    assert!(!s.run(&["get", "/big.bin"]).status.success(), "nothing half-made was committed");
    assert!(staged.exists(), "the refused change keeps its staging file");
    // Whole again: a later attempt commits it, and fsync succeeds.
    fs::write(&staged, &bytes).unwrap();
    await_cond(Duration::from_secs(30), "the change to commit once it can", || s.run(&["get", "/big.bin"]).stdout == bytes);
    settle(&m);
}
