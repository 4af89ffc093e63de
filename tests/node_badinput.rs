//! Hostile and broken clients of a running node's control socket, spoken to raw
//! (`UnixStream`, 4-byte big-endian length + payload frames): each bad connection gets an error
//! reply or is closed, nothing bad is committed, and the node keeps serving everyone else.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{await_cond, random_bytes, status_json, Node, Store};
use serde_json::{json, Value};

const MIB: usize = 1 << 20;

fn connect(s: &Store) -> UnixStream {
    common::raw_connect(s.data())
}

fn send(stream: &mut UnixStream, payload: &[u8]) {
    common::send_frame(stream, payload);
}

fn recv(stream: &mut UnixStream) -> Value {
    common::recv_reply(stream).expect("a reply, not a closed connection")
}

/// One request on a new connection; its reply.
fn call(s: &Store, request: &Value) -> Value {
    let mut stream = connect(s);
    send(&mut stream, request.to_string().as_bytes());
    recv(&mut stream)
}

/// True when the node closed `stream` (EOF or reset); panics if it sends data or stays silent.
fn assert_closed(stream: &mut UnixStream, what: &str) {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: expected the connection closed, got {n} bytes: {:?}", &buf[..n]),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => panic!("{what}: the node did not close the connection within 10 s"),
        Err(_) => {} // reset
    }
}

fn assert_error(reply: &Value, what: &str, needle: &str) {
    assert_eq!(reply["reply"], "error", "{what}: {reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{what}: the message should mention {needle:?}: {message}");
}

fn scope() -> Value {
    json!({"bucket": "default", "branch": "main"})
}

/// The node still answers status and serves a put through the CLI, quickly.
fn assert_serving(s: &Store, node: &Node, tag: &str) {
    let started = Instant::now();
    assert_eq!(status_json(s.data()).expect("the node answers status")["pid"], node.pid(), "{tag}");
    let path = format!("/served-{tag}.txt");
    s.put_bytes(&path, tag.as_bytes());
    assert_eq!(s.get_bytes(&path), tag.as_bytes());
    assert!(started.elapsed() < Duration::from_secs(5), "{tag}: serving took {:?}", started.elapsed());
    assert!(!node.log().contains("panicked"), "{tag}: the node panicked:\n{}", node.log());
}

#[test]
fn an_oversized_frame_header_closes_only_that_connection() {
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    let mut healthy = connect(&s);
    send(&mut healthy, br#"{"op":"status"}"#);
    assert_eq!(recv(&mut healthy)["reply"], "status");
    // 4 GiB (the largest a 4-byte header can announce) and one byte over the 8 MiB bound.
    for len in [u32::MAX, (8 << 20) + 1] {
        let mut bad = connect(&s);
        bad.write_all(&len.to_be_bytes()).unwrap();
        assert_closed(&mut bad, &format!("a header announcing {len} bytes"));
    }
    send(&mut healthy, br#"{"op":"status"}"#);
    assert_eq!(recv(&mut healthy)["reply"], "status", "a connection opened before the bad ones is still served");
    assert_serving(&s, &node, "after-oversized");
}

#[test]
fn garbage_in_a_valid_frame_gets_an_error_reply_then_the_connection_closes() {
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    let garbage: [&[u8]; 5] = [b"{not json", b"\xff\xfe\x00", b"", br#"{"op":"format_disk"}"#, br#"{"op":"put_file","path":"/x"}"#];
    for payload in garbage {
        let what = format!("request {:?}", String::from_utf8_lossy(payload));
        let mut stream = connect(&s);
        send(&mut stream, payload);
        assert_error(&recv(&mut stream), &what, "malformed request");
        assert_closed(&mut stream, &what);
    }
    assert_serving(&s, &node, "after-garbage");
    assert!(s.ls("/").iter().all(|n| n.starts_with("served-")), "garbage committed nothing: {:?}", s.ls("/"));
}

#[test]
fn silent_connections_do_not_hold_up_other_clients() {
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    let mut silent: Vec<UnixStream> = (0..8).map(|_| connect(&s)).collect();
    let mut half = connect(&s);
    half.write_all(&[0, 0]).unwrap(); // half a header
    silent.push(half);
    assert_serving(&s, &node, "beside-silent-connections");
    let reply = call(&s, &json!({"op": "status"}));
    assert_eq!(reply["reply"], "status", "{reply}");
    // They are still open (the node waits for their request for a while, not forever).
    for (i, stream) in silent.iter_mut().enumerate() {
        stream.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        let err = stream.read(&mut buf).expect_err("nothing to read yet");
        assert_eq!(err.kind(), ErrorKind::WouldBlock, "silent connection {i} should still be open");
    }
}

#[test]
fn sigterm_is_not_held_up_by_an_idle_client_connection() {
    let s = Store::new();
    let mut node = Node::start(&s, &[], &[]);
    // A client that made a request and keeps its connection (as `Client` does), and one that
    // has not sent anything yet.
    let mut kept = connect(&s);
    send(&mut kept, br#"{"op":"status"}"#);
    assert_eq!(recv(&mut kept)["reply"], "status");
    let _silent = connect(&s);
    let started = Instant::now();
    node.signal(libc::SIGTERM);
    let status = node.wait_timeout(Duration::from_secs(10));
    let log = node.log();
    let status = status.unwrap_or_else(|| panic!("SIGTERM with idle client connections open: the node did not exit within 10 s; log:\n{log}"));
    assert_eq!(status.code(), Some(0), "{log}");
    println!("exited {:?} after SIGTERM", started.elapsed());
}

/// Starts a `put_stream` of `path`, sends `frames`, waits until the node has a staging file
/// for it, then disconnects; the node must commit nothing and drop the staging file.
fn check_cut_short(s: &Store, path: &str, frames: &[Vec<u8>], trailing: &[u8]) {
    let blobs_before = s.blob_files();
    let mut stream = connect(s);
    send(&mut stream, json!({"op": "put_stream", "scope": scope(), "path": path}).to_string().as_bytes());
    for f in frames {
        send(&mut stream, f);
    }
    stream.write_all(trailing).unwrap();
    await_cond(Duration::from_secs(10), &format!("a staging file for {path}"), || !s.staging_files().is_empty());
    drop(stream);
    await_cond(Duration::from_secs(10), &format!("the staging file of the cut-short {path} to go"), || s.staging_files().is_empty());
    let names = s.ls("/");
    assert!(!names.iter().any(|n| path.ends_with(n.as_str())), "{path} was committed: {names:?}");
    assert_eq!(s.blob_files(), blobs_before, "{path}: no blob was added");
}

#[test]
fn a_put_stream_cut_short_commits_nothing_and_leaves_no_staging_file() {
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    let mib = |seed| random_bytes(MIB, seed);
    // Three whole frames and no end frame.
    check_cut_short(&s, "/partial.bin", &[mib(1), mib(2), mib(3)], &[]);
    // One whole frame, then a frame cut off in the middle.
    let mut half = (MIB as u32).to_be_bytes().to_vec();
    half.extend_from_slice(&random_bytes(100_000, 5));
    check_cut_short(&s, "/half-frame.bin", &[mib(4)], &half);
    assert_serving(&s, &node, "after-cut-short");
    // A whole stream on the same node commits.
    let mut stream = connect(&s);
    send(&mut stream, json!({"op": "put_stream", "scope": scope(), "path": "/whole.bin"}).to_string().as_bytes());
    for seed in [6, 7] {
        send(&mut stream, &mib(seed));
    }
    send(&mut stream, &[]);
    assert_eq!(recv(&mut stream)["reply"], "seq");
    assert_eq!(s.get_bytes("/whole.bin"), [mib(6), mib(7)].concat());
    assert!(s.staging_files().is_empty());
}

#[test]
fn put_file_and_put_tree_of_a_wrong_source_get_error_replies() {
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    let dir = s.scratch().join("a-dir");
    std::fs::create_dir(&dir).unwrap();
    let file = s.scratch().join("a-file");
    std::fs::write(&file, b"file").unwrap();
    let missing = s.scratch().join("missing");
    let cases = [
        ("put_file", &dir, "not a regular file"),
        ("put_file", &missing, "missing"),
        ("put_tree", &file, "a-file: not a directory"),
        ("put_tree", &missing, "missing: No such file or directory"),
    ];
    for (op, src, needle) in cases {
        let reply = call(&s, &json!({"op": op, "scope": scope(), "path": "/dest", "src": src}));
        assert_error(&reply, &format!("{op} from {}", src.display()), needle);
    }
    let reply = call(&s, &json!({"op": "inject_panic", "actor": "store"}));
    assert_error(&reply, "inject_panic without ALKFS_FAULT_INJECTION", "fault injection is off");
    let st = status_json(s.data()).unwrap();
    assert!(st["actors"].as_array().unwrap().iter().all(|a| a["restarts"] == 0 && a["state"] == "running"), "{st:#}");
    assert!(s.ls("/").is_empty(), "nothing committed: {:?}", s.ls("/"));
    assert!(s.staging_files().is_empty());
    assert_serving(&s, &node, "after-bad-sources");
}

#[test]
fn paths_with_dotdot_get_error_replies_and_change_nothing() {
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    s.put_bytes("/ok.txt", b"ok");
    let src = s.scratch().join("src.txt");
    std::fs::write(&src, b"escape").unwrap();
    let requests = [
        json!({"op": "put_file", "scope": scope(), "path": "/../escape.txt", "src": src}),
        json!({"op": "put_file", "scope": scope(), "path": "/a/../../escape.txt", "src": src}),
        json!({"op": "put_tree", "scope": scope(), "path": "../up", "src": s.scratch()}),
        json!({"op": "put_stream", "scope": scope(), "path": ".."}),
        json!({"op": "remove", "scope": scope(), "path": "/ok.txt/../..", "recursive": true}),
        json!({"op": "rename", "scope": scope(), "from": "/ok.txt", "to": "/../ok.txt"}),
        json!({"op": "rename", "scope": scope(), "from": "/x/../ok.txt", "to": "/moved.txt"}),
        json!({"op": "mkdir", "scope": scope(), "path": "/d/../../e", "parents": true}),
        json!({"op": "restore", "scope": scope(), "path": "../ok.txt", "version": "1"}),
    ];
    for req in &requests {
        assert_error(&call(&s, req), &req.to_string(), "..");
    }
    assert_eq!(s.ls("/"), ["ok.txt"]);
    assert_eq!(s.get_bytes("/ok.txt"), b"ok");
    let outside = s.data().parent().unwrap();
    assert!(!outside.join("escape.txt").exists() && !outside.join("ok.txt").exists() && !outside.join("e").exists());
    assert_serving(&s, &node, "after-dotdot");
}

#[test]
fn the_socket_is_private_to_its_owner() {
    let s = Store::new();
    let _node = Node::start(&s, &[], &[]);
    let meta = std::fs::metadata(s.data().join("alkfs.sock")).unwrap();
    assert!(meta.file_type().is_socket(), "{meta:?}");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "the socket is owner-only: {:o}", meta.permissions().mode());
}

/// Sends one frame, tolerating a connection the node already closed.
fn send_lenient(stream: &mut UnixStream, payload: &[u8]) {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    let _ = stream.write_all(&frame);
}

/// A streamed put refused before its data was read (a bad path) is answered with the error,
/// and the data frames the client sends anyway are never parsed as requests: the node closes
/// the connection after its answer.
#[test]
fn a_failed_streamed_put_is_answered_and_its_data_never_read_as_requests() {
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    let mut stream = connect(&s);
    send(&mut stream, json!({"op": "put_stream", "scope": scope(), "path": "/../escape.bin"}).to_string().as_bytes());
    // The data: one frame that would parse as a request, were the node to read it as one.
    send_lenient(&mut stream, json!({"op": "mkdir", "scope": scope(), "path": "/smuggled", "parents": true}).to_string().as_bytes());
    for seed in 0..3 {
        send_lenient(&mut stream, &random_bytes(MIB, seed));
    }
    send_lenient(&mut stream, &[]);
    assert_error(&recv(&mut stream), "put_stream to /../escape.bin", "..");
    assert_closed(&mut stream, "after a failed streamed put");
    assert!(s.ls("/").is_empty(), "a data frame was run as a request: {:?}", s.ls("/"));
    assert_serving(&s, &node, "after-failed-stream");
}

/// A client that stalls inside a streamed put is dropped after the client timeout: it holds
/// no slot, no blocking thread and no staging file past it.
#[test]
fn a_stalled_streamed_put_is_dropped_after_the_client_timeout() {
    let s = Store::new();
    let node = Node::start(&s, &["--set", "node.client_timeout_secs=1"], &[]);
    let mut stream = connect(&s);
    send(&mut stream, json!({"op": "put_stream", "scope": scope(), "path": "/stalled.bin"}).to_string().as_bytes());
    send(&mut stream, &random_bytes(MIB, 1));
    await_cond(Duration::from_secs(10), "a staging file for the stalled put", || !s.staging_files().is_empty());
    let stalled = Instant::now();
    // ... and nothing more: the node gives up on it after a second.
    assert_error(&recv(&mut stream), "a stalled put", "no data from the client");
    assert!(stalled.elapsed() < Duration::from_secs(5), "dropped after {:?}", stalled.elapsed());
    assert_closed(&mut stream, "a stalled put");
    await_cond(Duration::from_secs(5), "the stalled put's staging file to go", || s.staging_files().is_empty());
    assert!(s.ls("/").is_empty(), "a dropped put committed: {:?}", s.ls("/"));
    assert_serving(&s, &node, "after-stalled-stream");
}

/// SIGTERM does not wait for a client stalled inside a streamed put: the put is abandoned
/// (nothing written, its staging file removed) and the node exits at once.
#[test]
fn sigterm_is_not_held_up_by_a_stalled_streamed_put() {
    let s = Store::new();
    let mut node = Node::start(&s, &[], &[]);
    let mut stream = connect(&s);
    send(&mut stream, json!({"op": "put_stream", "scope": scope(), "path": "/stalled.bin"}).to_string().as_bytes());
    send(&mut stream, &random_bytes(MIB, 2));
    await_cond(Duration::from_secs(10), "a staging file for the stalled put", || !s.staging_files().is_empty());
    let signalled = Instant::now();
    let status = node.stop_with(libc::SIGTERM, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "log:\n{}", node.log());
    assert!(signalled.elapsed() < Duration::from_secs(5), "SIGTERM took {:?} with a stalled put open", signalled.elapsed());
    assert_error(&recv(&mut stream), "a put cut by shutdown", "shutting down");
    assert!(s.staging_files().is_empty(), "the abandoned put left its staging file");
    assert!(s.ls("/").is_empty());
}

/// CPU seconds (user + system) `pid` has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / ticks
}

/// Sets the soft limit of open files of `pid`; returns the old limits.
fn limit_open_files(pid: u32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a read of the current limits into a valid struct.
    assert_eq!(unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) }, 0);
    let new = libc::rlimit { rlim_cur: soft, rlim_max: old.rlim_max };
    // SAFETY: valid structs; the target is our own child.
    assert_eq!(unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) }, 0, "prlimit");
    old
}

/// Out of file descriptors, accepting a connection fails while clients keep waiting: the node
/// backs off instead of retrying in a busy loop, and serves again once descriptors free up.
#[test]
fn failed_accepts_back_off_instead_of_spinning() {
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    let open_now = std::fs::read_dir(format!("/proc/{}/fd", node.pid())).unwrap().count() as u64;
    let old = limit_open_files(node.pid(), open_now + 2);
    let waiting: Vec<UnixStream> = (0..10).map(|_| connect(&s)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_secs(node.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_secs(node.pid()) - before;
    limit_open_files(node.pid(), old.rlim_cur);
    drop(waiting);
    assert!(used < 0.5, "the node used {used:.2} s of CPU in 2 s while out of descriptors: a busy accept loop");
    assert!(node.log().contains("accepting a control connection failed"), "the node never hit the limit, so this proved nothing:\n{}", node.log());
    assert_serving(&s, &node, "after-fd-exhaustion");
}

/// A duration that would overflow a timer is refused when the node starts, with the key named.
#[test]
fn a_setting_that_would_overflow_a_clock_is_refused_at_start() {
    let s = Store::new();
    for set in ["node.batch_delay_ms=9223372036854775807", "gc.interval_secs=9223372036854775807"] {
        let args = ["node", "run", "--set", set];
        let err = common::expect_err(&args, s.run(&args));
        let key = set.split('=').next().unwrap();
        assert!(err.contains(key) && err.contains("too large"), "{set}: {err}");
    }
}
