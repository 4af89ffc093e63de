//! Faults inside a running node (`ALKFS_FAULT_INJECTION=1`, `alkfs debug inject-panic`): an
//! actor that panics is restarted by the supervisor while clients keep writing, and no
//! acknowledged write is lost; an actor that keeps panicking past its restart budget stops the
//! node (exit 1), which leaves the data dir ready for the next node.

mod common;

use std::time::{Duration, Instant};

use common::{actor_health, await_status, status_json, verify_puts, Load, Node, Store};
use serde_json::Value;

const ACTORS: [&str; 4] = ["store", "outbox", "blobs", "gc"];
/// How long an actor may take to be running again after a panic (its first backoff is 50 ms).
const RESTART_TIMEOUT: Duration = Duration::from_secs(10);

fn restarts(status: &Value, actor: &str) -> u64 {
    actor_health(status, actor)["restarts"].as_u64().expect("restarts is a number")
}

/// The panic message each actor's fault injection raises (actors/src/node/*.rs).
fn panic_message(actor: &str) -> String {
    let noun = if actor == "blobs" { "blob" } else { actor };
    format!("fault injection: {noun} actor")
}

#[test]
fn each_actor_panics_under_load_and_every_acknowledged_write_survives() {
    let s = Store::new();
    let mut node = Node::start_faulty(&s, &[]);
    let load = Load::start(s.data(), 2);
    load.await_acked(4, Duration::from_secs(30));

    for actor in ACTORS {
        let before = restarts(&status_json(s.data()).expect("the node answers"), actor);
        let acked_before = load.acked();
        s.ok(&["debug", "inject-panic", actor]);
        let st = await_status(s.data(), RESTART_TIMEOUT, &format!("the {actor} actor to run again after its panic"), |st| {
            let a = actor_health(st, actor);
            a["state"] == "running" && restarts(st, actor) > before
        });
        assert_eq!(restarts(&st, actor), before + 1, "one panic, one restart of {actor}: {st:#}");
        for other in ACTORS.iter().filter(|o| **o != actor) {
            assert_eq!(actor_health(&st, other)["state"], "running", "a panic of {actor} must not take down {other}: {st:#}");
        }
        // The clients keep being served after the restart, not just the status.
        load.await_acked(acked_before + 4, Duration::from_secs(30));
        assert!(node.try_wait().is_none(), "the node exited after the {actor} panic; its log:\n{}", node.log());
    }

    let (acked, failed) = load.stop();
    println!("{} puts acknowledged, {} failed during the restarts", acked.len(), failed.len());
    for (put, why) in &failed {
        // A failure must be an error reported to the client, never a crash of the client.
        assert!(!why.contains("panicked") && why.contains("alkfs: error:"), "{}: {why}", put.path);
    }
    verify_puts(s.data(), &acked, &failed);

    s.put_bytes("/after-the-faults.txt", b"still serving");
    assert_eq!(s.get_bytes("/after-the-faults.txt"), b"still serving");
    let st = status_json(s.data()).expect("the node answers after the faults");
    assert_eq!(st["pid"], node.pid(), "the same node served everything");
    for actor in ACTORS {
        let a = actor_health(&st, actor);
        assert!(restarts(&st, actor) >= 1, "{actor} restarted: {a}");
        assert_eq!(a["state"], "running", "{a}");
        let failure = a["last_failure"].as_str().unwrap_or_default();
        assert!(failure.contains(&panic_message(actor)), "{actor}'s last failure names its panic: {a}");
    }
    let text = s.ok(&["status"]);
    assert!(text.contains("restarts 1") && text.contains("fault injection"), "status shows restarts and failures: {text}");
}

/// Waits for the node to either exit (true) or show `actor` running with more than `before`
/// restarts (false).
fn await_restart_or_exit(node: &mut Node, s: &Store, actor: &str, before: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if node.try_wait().is_some() {
            return true;
        }
        if let Some(st) = status_json(s.data()) {
            if actor_health(&st, actor)["state"] == "running" && restarts(&st, actor) > before {
                return false;
            }
        }
        assert!(Instant::now() < deadline, "after a panic of {actor}, the node neither restarted it nor exited within {timeout:?}; its log:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_actor_failing_past_its_restart_budget_stops_the_node_with_exit_1() {
    let s = Store::new();
    s.put_bytes("/before-the-node.txt", b"written directly");
    let mut node = Node::start_faulty(&s, &["--set", "node.restart_budget=1", "--set", "node.restart_window_secs=60"]);
    s.put_bytes("/through-the-node.txt", b"written by the node");
    let socket = s.data().join("alkfs.sock");
    assert!(socket.exists());

    let started = Instant::now();
    let mut injections = 0;
    let mut last_injection = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(20), "the node did not stop after {injections} panics of gc");
        let Some(st) = status_json(s.data()) else {
            break; // the node has stopped serving
        };
        let before = restarts(&st, "gc");
        last_injection = Instant::now();
        let out = s.run(&["debug", "inject-panic", "gc"]);
        if !out.status.success() {
            break; // it stopped between the status and the injection
        }
        injections += 1;
        if await_restart_or_exit(&mut node, &s, "gc", before, Duration::from_secs(20)) {
            break;
        }
    }
    let code = node.wait_timeout(Duration::from_secs(20).saturating_sub(last_injection.elapsed()));
    let log = node.log();
    let code = code.unwrap_or_else(|| panic!("the node did not exit within 20 s of the escalating panic; its log:\n{log}"));
    assert_eq!(code.code(), Some(1), "escalation exits 1, not {code}; log:\n{log}");
    assert_eq!(injections, 2, "a budget of 1 restarts once and stops at the second failure; log:\n{log}");
    assert!(log.contains("alkfs-gc") && log.contains("stop"), "the log names the actor and says the node stops:\n{log}");
    assert!(!log.contains("panicked at") || log.matches("panicked at").count() == injections, "only the injected panics:\n{log}");
    assert!(!socket.exists(), "the stopped node removed its socket");

    // A fresh node on the same dir starts, has the data, and serves.
    let fresh = Node::start(&s, &[], &[]);
    assert_eq!(s.get_bytes("/before-the-node.txt"), b"written directly");
    assert_eq!(s.get_bytes("/through-the-node.txt"), b"written by the node");
    s.put_bytes("/after-the-restart.txt", b"written by the fresh node");
    assert_eq!(s.get_bytes("/after-the-restart.txt"), b"written by the fresh node");
    let st = status_json(s.data()).expect("the fresh node answers");
    assert_eq!(st["pid"], fresh.pid());
    assert!(ACTORS.iter().all(|a| restarts(&st, a) == 0), "a fresh node starts with no restarts: {st:#}");
}
