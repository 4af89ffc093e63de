//! Faults inside a running node (`ALKFS_FAULT_INJECTION=1`, `alkfs debug inject-panic`): an
//! actor that panics is restarted by the supervisor while clients keep writing, and no
//! acknowledged write is lost; an actor that keeps panicking past its restart budget stops the
//! node (exit 1), promptly even with a request in flight, and leaves the data dir ready for
//! the next node.

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

/// Waits until the node's JSON log records restart number `n` of `actor`, or the node exits
/// (true). Watching the log, not polling `status`, keeps the test's own requests out of the
/// node while it stops (see the test after this one).
fn await_logged_restart_or_exit(node: &mut Node, actor: &str, n: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let name = format!("alkfs-{actor}");
    loop {
        if node.try_wait().is_some() {
            return true;
        }
        let restarted = node.log().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).any(|l| {
            let f = &l["fields"];
            f["message"] == "child restarted" && f["child"] == name.as_str() && f["restarts"] == n
        });
        if restarted {
            return false;
        }
        assert!(Instant::now() < deadline, "after panic {n} of {actor}, the node neither restarted it nor exited within {timeout:?}; its log:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_actor_failing_past_its_restart_budget_stops_the_node_with_exit_1() {
    let s = Store::new();
    s.put_bytes("/before-the-node.txt", b"written directly");
    let budget = ["--set", "node.restart_budget=1", "--set", "node.restart_window_secs=60", "--log-format", "json"];
    let mut node = Node::start_faulty(&s, &budget);
    s.put_bytes("/through-the-node.txt", b"written by the node");
    let socket = s.data().join("alkfs.sock");
    assert!(socket.exists());

    let mut injections = 0;
    let escalating = loop {
        assert!(injections < 5, "the node did not stop after {injections} panics of gc; its log:\n{}", node.log());
        let injected = Instant::now();
        s.ok(&["debug", "inject-panic", "gc"]);
        injections += 1;
        if await_logged_restart_or_exit(&mut node, "gc", injections, Duration::from_secs(20)) {
            break injected;
        }
    };
    let code = node.wait_timeout(Duration::from_secs(20).saturating_sub(escalating.elapsed()));
    let log = node.log();
    let code = code.unwrap_or_else(|| panic!("the node did not exit within 20 s of the escalating panic; its log:\n{log}"));
    println!("exited {:?} after the escalating panic", escalating.elapsed());
    assert_eq!(code.code(), Some(1), "escalation exits 1, not {code}; log:\n{log}");
    assert_eq!(injections, 2, "a budget of 1 restarts once and stops at the second failure; log:\n{log}");
    assert!(log.contains("alkfs-gc") && log.contains("stop"), "the log names the actor and says the node stops:\n{log}");
    assert_eq!(log.matches("panicked at").count() as u64, injections, "only the injected panics:\n{log}");
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

/// A node that escalates has already stopped its actors when it drains the requests in
/// flight, so those cannot finish: they must fail fast instead of waiting for a restart that
/// will never come (and holding the exit that long). A streamed put is in flight (its data
/// sent, its end frame not yet) when the gc actor fails past a budget of 0; its end frame is
/// sent once the node logs that it is stopping.
#[test]
fn a_request_in_flight_during_an_escalation_does_not_hold_up_the_exit() {
    let s = Store::new();
    let mut node = Node::start_faulty(&s, &["--set", "node.restart_budget=0", "--log-format", "json"]);
    let mut stream = common::raw_connect(s.data());
    stream.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let request = serde_json::json!({"op": "put_stream", "scope": {"bucket": "default", "branch": "main"}, "path": "/in-flight.bin"});
    common::send_frame(&mut stream, request.to_string().as_bytes());
    let data = common::random_bytes(1 << 20, 11);
    common::send_frame(&mut stream, &data);
    common::await_cond(Duration::from_secs(10), "the put to be staging its data", || !s.staging_files().is_empty());

    let injected = Instant::now();
    s.ok(&["debug", "inject-panic", "gc"]);
    common::await_cond(Duration::from_secs(10), "the node to log that it stops", || node.log().contains(r#""reason":"escalation""#));
    // The node may already have aborted the put (a shutdown ends bodies in flight) and
    // closed the connection: then this write fails, and its answer is still there to read.
    let _ = std::io::Write::write_all(&mut stream, &0u32.to_be_bytes());
    let reply = common::recv_reply(&mut stream);
    let replied = injected.elapsed();
    drop(stream); // an idle connection would hold the exit by itself (see node_badinput)
    let code = node.wait_timeout(Duration::from_secs(40));
    let took = injected.elapsed();
    let log = node.log();
    assert_eq!(code.and_then(|c| c.code()), Some(1), "escalation exits 1; log:\n{log}");
    println!("reply {reply:?} after {replied:?}; exit after {took:?}");
    match reply.as_ref().map(|r| r["reply"].as_str()) {
        Some(Some("seq")) => assert_eq!(s.get_bytes("/in-flight.bin"), data, "a put acknowledged while stopping is kept"),
        _ => assert!(s.ls("/").is_empty(), "a put not acknowledged left nothing: {:?}", s.ls("/")),
    }
    assert!(
        took < Duration::from_secs(5),
        "the node took {took:?} to exit after the escalating panic (the reply to the put in flight came after {replied:?}: {reply:?}); log:\n{log}"
    );
}
