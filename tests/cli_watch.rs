//! `alkfs watch`: the stream of committed changes, per consumer, with cursors that persist
//! across processes, and a follow mode that sees changes as they commit.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{await_line, line_channel, KillOnDrop, Store};
use serde_json::Value;

/// The events `watch --once --consumer C` prints (one JSON object a line).
fn watch_once(s: &Store, consumer: &str) -> Vec<Value> {
    let out = s.ok(&["watch", "--once", "--consumer", consumer]);
    out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("watch printed a line that is not JSON ({e}): {l:?}"))).collect()
}

fn offsets(events: &[Value]) -> Vec<i64> {
    events.iter().map(|e| e["offset"].as_i64().expect("every event has an offset")).collect()
}

#[test]
fn watch_once_prints_new_events_per_consumer_and_remembers_its_cursor() {
    let s = Store::new();
    let initial = watch_once(&s, "watch");
    assert!(!initial.is_empty(), "init commits the default bucket: watch should print it");
    assert_eq!(initial[0]["op"], "bucket-create");

    let c1_before = watch_once(&s, "c1");
    assert_eq!(c1_before, initial, "a new consumer starts from the beginning");

    let files: [(&str, &[u8]); 3] = [("/one.txt", b"1"), ("/two.txt", b"two"), ("/three.txt", b"three!")];
    for (path, bytes) in files {
        s.put_bytes(path, bytes);
    }
    let c1 = watch_once(&s, "c1");
    assert_eq!(c1.len(), 3, "exactly the three writes: {c1:#?}");
    for (event, (path, bytes)) in c1.iter().zip(files) {
        assert_eq!((event["op"].as_str(), event["path"].as_str()), (Some("write"), Some(path)), "{event}");
        assert_eq!(event["size"], bytes.len() as u64, "{event}");
        assert_eq!(event["branch"], "main");
    }
    let last_before = *offsets(&c1_before).last().unwrap();
    let new_offsets = offsets(&c1);
    assert!(new_offsets[0] > last_before && new_offsets.windows(2).all(|w| w[0] < w[1]), "offsets {new_offsets:?} after {last_before}");

    assert!(watch_once(&s, "c1").is_empty(), "the cursor of c1 persisted across processes: nothing new");

    let err = s.err(&["put", "-", "../outside"]);
    assert!(err.contains(".."), "{err}");
    assert!(watch_once(&s, "c1").is_empty(), "a failed put must add no event");

    let c2 = watch_once(&s, "c2");
    assert_eq!(c2, [c1_before, c1].concat(), "another consumer still sees every event");
}

#[test]
fn each_kind_of_change_is_one_event() {
    let s = Store::new();
    s.put_bytes("/f", b"v1");
    s.put_bytes("/f", b"v2");
    watch_once(&s, "t"); // skip the backlog
    let first_version = s.log_json(&[], "/f").last().unwrap()["version"].as_str().unwrap().to_string();
    let cases: [(&[&str], &str, Option<&str>); 9] = [
        (&["mkdir", "/d"], "mkdir", Some("/d")),
        (&["mv", "/f", "/d/g"], "rename", Some("/f")),
        (&["restore", "/f", "--version", &first_version], "restore", Some("/f")),
        (&["rm", "-r", "/d"], "delete", Some("/d")),
        (&["branch", "create", "feat"], "branch-create", None),
        (&["--branch", "feat", "mkdir", "/on-feat"], "mkdir", Some("/on-feat")),
        (&["merge", "feat", "--into", "main"], "merge", None),
        (&["branch", "delete", "feat"], "branch-delete", None),
        (&["bucket", "create", "other"], "bucket-create", None),
    ];
    for (args, op, path) in cases {
        s.ok(args);
        let events = watch_once(&s, "t");
        assert_eq!(events.len(), 1, "{args:?}: {events:#?}");
        assert_eq!(events[0]["op"], op, "{args:?}: {}", events[0]);
        if let Some(path) = path {
            assert_eq!(events[0]["path"], path, "{args:?}: {}", events[0]);
        }
    }
    // Reads add nothing.
    for args in [&["ls", "/"][..], &["log", "/f"], &["get", "/f"], &["conflicts"], &["branch", "list"]] {
        s.ok(args);
    }
    assert!(watch_once(&s, "t").is_empty(), "reads must not add events");
}

#[test]
fn follow_mode_prints_a_change_made_after_it_started() {
    let s = Store::new();
    let mut watch = KillOnDrop(s.cmd(&["watch", "--consumer", "follower"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap());
    let lines = line_channel(watch.0.stdout.take().unwrap());
    let timeout = Duration::from_secs(10);
    // The backlog (the default bucket) shows the watcher is up and reading.
    await_line(&lines, timeout, "the backlog", |l| l.contains("bucket-create"));

    s.put_bytes("/late.txt", b"late");
    let seen = await_line(&lines, timeout, "the write of /late.txt", |l| l.contains("\"/late.txt\""));
    let event: Value = serde_json::from_str(seen.last().unwrap()).unwrap();
    assert_eq!((event["op"].as_str(), event["size"].as_u64()), (Some("write"), Some(4)), "{event}");
    assert!(seen.len() == 1, "only the new write arrived: {seen:#?}");

    s.ok(&["rm", "/late.txt"]);
    let seen = await_line(&lines, timeout, "the delete of /late.txt", |l| l.contains("\"delete\""));
    assert!(seen.len() == 1 && seen[0].contains("\"/late.txt\""), "{seen:#?}");
    assert!(watch.0.try_wait().unwrap().is_none(), "follow mode keeps running");
}

/// The outbox promises that an event's `first_seq..=last_seq` are the version rows its change
/// wrote, so a consumer (sync, GC) can read exactly those. Every version `log` shows must
/// therefore lie in the range of some event, including the directories a command creates
/// on its own.
#[test]
fn every_version_written_is_covered_by_an_event() {
    let s = Store::new();
    assert!(!watch_once(&s, "cover").is_empty(), "the backlog");
    let mut hi = 0i64; // the newest seq accounted for
    let cases: [(&[&str], &[&str]); 4] = [
        (&["put", "-", "/top.txt"], &["/top.txt"]),
        (&["put", "-", "/deep/dir/file.txt"], &["/deep", "/deep/dir", "/deep/dir/file.txt"]),
        (&["mkdir", "-p", "/p/q/r"], &["/p", "/p/q", "/p/q/r"]),
        (&["mv", "/top.txt", "/moved/here/top.txt"], &["/top.txt", "/moved", "/moved/here", "/moved/here/top.txt"]),
    ];
    for (args, paths) in cases {
        common::expect_ok(args, s.run_stdin(args, b"bytes"));
        let events = watch_once(&s, "cover");
        let ranges: Vec<(i64, i64)> = events.iter().map(|e| (e["first_seq"].as_i64().unwrap(), e["last_seq"].as_i64().unwrap())).collect();
        let mut written: Vec<(String, i64)> = Vec::new();
        for path in paths {
            for v in s.log_json(&[], path) {
                let seq = common::version_seq(&v["version"]);
                if seq > hi {
                    written.push((path.to_string(), seq));
                }
            }
        }
        assert!(!written.is_empty(), "{args:?} wrote no versions");
        for (path, seq) in &written {
            assert!(
                ranges.iter().any(|(a, b)| a <= seq && seq <= b),
                "{args:?}: version {seq} of {path} is in no event's seq range {ranges:?}: a consumer reading the events never sees it"
            );
        }
        hi = written.iter().map(|(_, s)| *s).chain(ranges.iter().map(|r| r.1)).max().unwrap().max(hi);
    }
}

/// Consumers show in `status`; one idle past the outbox retention (`gc.outbox_keep_days`)
/// expires: status says so, it no longer holds events back from pruning, and when it reads
/// again it is told which events it missed.
#[test]
fn an_idle_consumer_expires_shows_so_in_status_and_is_told_what_it_missed() {
    if !common::precondition(common::libfaketime().is_some(), "libfaketime (apt install faketime) runs the node two days ahead") {
        return;
    }
    let s = Store::new();
    std::fs::write(s.data().join("config.toml"), "[gc]\noutbox_keep_days = 1\n").unwrap();
    s.put_bytes("/a", b"a");
    assert_eq!(watch_once(&s, "old").len(), 2, "bucket-create and the write");
    // Two days later (by the node's clock) the consumer `old` has been idle past retention.
    let env = common::faketime_env("+2d");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = common::Node::start(&s, &[], &env);
    s.put_bytes("/b", b"b");
    s.put_bytes("/c", b"c");
    let status = common::await_status(s.data(), Duration::from_secs(10), "the node's consumer to pass the writes", |st| st["outbox_cursor"] == st["outbox_head"]);
    let consumers: Vec<(String, bool)> = status["consumers"].as_array().unwrap().iter().map(|c| (c["name"].as_str().unwrap().to_string(), c["expired"].as_bool().unwrap())).collect();
    assert_eq!(consumers, [("node".to_string(), false), ("old".to_string(), true)], "{status:#}");
    assert!(s.ok(&["status"]).contains("expired"), "status in text says so too");
    let gc = s.ok(&["gc"]);
    assert!(gc.contains("and 4 outbox events"), "the expired consumer no longer held events back: {gc}");
    drop(node);

    let out = s.run(&["watch", "--once", "--consumer", "old"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("missed events 3..=4"), "{stderr}");
}
