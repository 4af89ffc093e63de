//! Signals to a running node: SIGTERM and SIGINT stop it cleanly (exit 0, socket removed, every
//! acknowledged write kept); SIGKILL loses no acknowledged write and the next node starts over
//! the stale socket; a second node on the same data dir is refused.

mod common;

use std::time::{Duration, Instant};

use common::{status_json, verify_puts, Load, Node, Put, Store};

fn socket(s: &Store) -> std::path::PathBuf {
    s.data().join("alkfs.sock")
}

#[test]
fn sigterm_under_load_exits_0_and_keeps_every_acknowledged_write() {
    let s = Store::new();
    let mut node = Node::start(&s, &[], &[]);
    let load = Load::start(s.data(), 3);
    load.await_acked(20, Duration::from_secs(30));
    let acked_at_signal = load.acked();

    let signalled = Instant::now();
    let status = node.stop_with(libc::SIGTERM, Duration::from_secs(10));
    let took = signalled.elapsed();
    let log = node.log();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0, not {status}; log:\n{log}");
    assert!(log.contains("reason=\"SIGTERM\"") && log.contains("node stopped cleanly"), "the log says why and that it stopped cleanly:\n{log}");
    assert!(!socket(&s).exists(), "the node removed its socket");

    // The clients go on without a node (their writes go straight to the store) until stopped.
    let (acked, failed) = load.stop();
    println!("SIGTERM after {acked_at_signal} acknowledged puts; node exited in {took:?}; {} acknowledged and {} failed in all: {:#?}", acked.len(), failed.len(), common::failure_kinds(&failed));
    assert!(status_json(s.data()).is_none(), "no node answers any more");
    verify_puts(s.data(), &acked, &failed);
    // A clean stop leaves no staging file behind (imports cut short by the stop drop theirs).
    assert!(s.staging_files().is_empty(), "staging files after a clean stop: {:?}", s.staging_files());
}

#[test]
fn sigint_stops_an_idle_node_cleanly_and_frees_the_data_dir() {
    let s = Store::new();
    let mut node = Node::start(&s, &[], &[]);
    s.put_bytes("/via-node.txt", b"node");
    let status = node.stop_with(libc::SIGINT, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "SIGINT exits 0, not {status}; log:\n{}", node.log());
    assert!(node.log().contains("reason=\"SIGINT\""), "{}", node.log());
    assert!(!socket(&s).exists(), "the node removed its socket");
    let err = s.err(&["status"]);
    assert!(err.contains("no node is running"), "{err}");
    // The lock is free: a direct write works, and sees what the node wrote.
    s.put_bytes("/direct.txt", b"direct");
    assert_eq!(s.get_bytes("/via-node.txt"), b"node");
    assert_eq!(s.ls("/"), ["direct.txt", "via-node.txt"]);
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_write_and_the_next_node_starts() {
    const ROUNDS: u64 = 3;
    let s = Store::new();
    let (mut all_acked, mut all_failed): (Vec<Put>, Vec<(Put, String)>) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        if round > 0 {
            assert!(socket(&s).exists(), "round {round}: the killed node's socket file is still there");
        }
        let mut node = Node::start(&s, &[], &[]);
        let load = Load::start_in(s.data(), 2, &format!("/r{round}"), round);
        load.await_acked(10 + 2 * round as usize, Duration::from_secs(30));
        // Everything acknowledged up to here went through this node: it holds the lock.
        assert_eq!(std::fs::read_to_string(s.data().join("lock")).unwrap().trim(), node.pid().to_string(), "round {round}");
        node.kill();
        let (acked, failed) = load.stop();
        println!("round {round}: {} acknowledged, {} failed: {:#?}", acked.len(), failed.len(), common::failure_kinds(&failed));
        all_acked.extend(acked);
        all_failed.extend(failed);

        // Without a node, the store is read (and written) directly.
        assert!(status_json(s.data()).is_none(), "round {round}: a killed node does not answer");
        s.ok(&["ls", "/"]);
        verify_puts(s.data(), &all_acked, &all_failed);
    }
    assert!(socket(&s).exists(), "the last killed node's socket file is still there");
    let node = Node::start(&s, &[], &[]);
    s.put_bytes("/after-the-kills.txt", b"served");
    assert_eq!(s.get_bytes("/after-the-kills.txt"), b"served");
    assert_eq!(status_json(s.data()).expect("the node answers")["pid"], node.pid());
    verify_puts(s.data(), &all_acked, &all_failed);
}

#[test]
fn a_second_node_on_the_same_data_dir_is_refused_and_the_first_keeps_serving() {
    let s = Store::new();
    let first = Node::start(&s, &[], &[]);
    s.put_bytes("/one.txt", b"one");

    let started = Instant::now();
    let mut second = Node::spawn(&s, &[], &[]);
    let status = second.wait_timeout(Duration::from_secs(5));
    let log = second.log();
    let status = status.unwrap_or_else(|| panic!("a second node on a data dir in use did not exit within 5 s; its log:\n{log}"));
    assert!(!status.success(), "the second node exited with {status}; log:\n{log}");
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("in use") && log.contains(&format!("pid {}", first.pid())), "the refusal names the node holding the lock:\n{log}");
    println!("refused in {:?}", started.elapsed());

    // The refused node touched nothing: the first still has its socket and serves.
    assert!(socket(&s).exists());
    assert_eq!(status_json(s.data()).expect("the first node answers")["pid"], first.pid());
    s.put_bytes("/two.txt", b"two");
    assert_eq!(s.ls("/"), ["one.txt", "two.txt"]);
    assert_eq!(std::fs::read_to_string(s.data().join("lock")).unwrap().trim(), first.pid().to_string());
}
