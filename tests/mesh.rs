//! The mesh end to end: real `alkfs` nodes on 127.0.0.1 (relays and discovery off), joined by
//! tickets, writing on every node and converging; the same path raced on two nodes; branches
//! made on one node and merged on another; tickets that must be refused; a removed member;
//! a node whose clock is an hour behind.

mod common;

use std::time::Duration;

use common::{await_cond, Node, Store};

/// A mesh member: its store and its running node.
struct Member {
    s: Store,
    node: Node,
}

impl Member {
    fn start() -> Member {
        Self::start_with(&[])
    }

    fn start_with(env: &[(&str, &str)]) -> Member {
        let s = Store::new();
        let node = Node::start(&s, &[], env);
        Member { s, node }
    }

    fn id(&self) -> String {
        let st = common::status_json(self.s.data()).expect("status");
        st["node_id"].as_str().unwrap().to_string()
    }

    fn invite(&self, extra: &[&str]) -> String {
        let mut args = vec!["invite"];
        args.extend_from_slice(extra);
        let out = self.s.ok(&args);
        assert_eq!(out.lines().count(), 1, "the ticket alone on stdout: {out:?}");
        out.trim().to_string()
    }

    fn join(&self, ticket: &str) {
        let out = self.s.ok(&["join", ticket]);
        assert!(out.contains("joined bucket"), "{out}");
    }

    /// `ls -R / --json` as (path, kind, hash) triples.
    fn tree(&self) -> Vec<(String, String, String)> {
        let rows = common::parse_json_array(&self.s.ok(&["ls", "-R", "/", "--json"]));
        let mut t: Vec<(String, String, String)> = rows
            .iter()
            .map(|r| (r["path"].as_str().unwrap().to_string(), r["kind"].as_str().unwrap().to_string(), r["hash"].as_str().unwrap_or("").to_string()))
            .collect();
        t.sort();
        t
    }

    fn get(&self, path: &str) -> Option<Vec<u8>> {
        let out = self.s.run(&["get", path]);
        out.status.success().then_some(out.stdout)
    }
}

/// Three members: A invited B and C.
fn three() -> (Member, Member, Member) {
    let (a, b, c) = (Member::start(), Member::start(), Member::start());
    b.join(&a.invite(&[]));
    c.join(&a.invite(&[]));
    (a, b, c)
}

fn converged(nodes: &[&Member], what: &str) {
    await_cond(Duration::from_secs(60), what, || {
        let first = nodes[0].tree();
        nodes.iter().all(|n| n.tree() == first)
    });
}

#[test]
fn writes_on_three_nodes_converge_and_a_race_resolves_alike_everywhere_with_the_loser_restorable() {
    let (a, b, c) = three();
    for (m, name) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        m.s.put_bytes(&format!("/{name}.txt"), format!("from {name}").as_bytes());
    }
    converged(&[&a, &b, &c], "writes on all three to reach all three");
    // Each node joined its bucket's gossip topic and has neighbours there.
    for m in [&a, &b, &c] {
        common::await_status(m.s.data(), Duration::from_secs(30), "gossip neighbours", |st| st["mesh"]["gossip_topics"] == 1 && st["mesh"]["gossip_neighbors"].as_i64().unwrap_or(0) >= 1);
    }
    for m in [&a, &b, &c] {
        for name in ["a", "b", "c"] {
            await_cond(Duration::from_secs(30), "the bytes of every file", || m.get(&format!("/{name}.txt")).as_deref() == Some(format!("from {name}").as_bytes()));
        }
    }
    // A race made concurrent by construction: B's node is down while both write.
    let Member { s: bs, mut node } = b;
    node.stop_with(libc::SIGTERM, Duration::from_secs(10));
    a.s.put_bytes("/race.txt", b"one");
    bs.put_bytes("/race.txt", b"two");
    let b = Member { node: Node::start(&bs, &[], &[]), s: bs };
    converged(&[&a, &b, &c], "the race to resolve");
    let winner = a.get("/race.txt").unwrap();
    for m in [&b, &c] {
        await_cond(Duration::from_secs(30), "the same winner everywhere", || m.get("/race.txt").as_deref() == Some(&winner[..]));
    }
    let mut losers = Vec::new();
    for m in [&a, &b, &c] {
        await_cond(Duration::from_secs(30), "the loser listed on every node", || !common::parse_json_array(&m.s.ok(&["conflicts", "--json"])).is_empty());
        let rows = common::parse_json_array(&m.s.ok(&["conflicts", "--json"]));
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["path"], "/race.txt");
        losers.push(rows[0]["loser_version"].as_str().unwrap().to_string());
    }
    assert!(losers.iter().all(|l| *l == losers[0]), "one loser, named alike on every node: {losers:?}");
    // C restores the loser (it may need its bytes first: the restore is of the version).
    c.s.ok(&["restore", "/race.txt", "--version", &losers[0]]);
    let loser_bytes: &[u8] = if winner == b"one" { b"two" } else { b"one" };
    for m in [&a, &b, &c] {
        await_cond(Duration::from_secs(30), "C's restore of the loser everywhere", || m.get("/race.txt").as_deref() == Some(loser_bytes));
    }
}

#[test]
fn a_branch_made_on_one_node_and_merged_on_another_shows_up_on_the_third() {
    let (a, b, c) = three();
    b.s.ok(&["branch", "create", "feature"]);
    b.s.put_bytes_with(&["--branch", "feature"], "/feature.txt", b"made on B");
    await_cond(Duration::from_secs(30), "the branch to reach C", || c.s.ok(&["branch", "list"]).contains("feature"));
    await_cond(Duration::from_secs(30), "the branch's file to reach C", || c.s.run(&["--branch", "feature", "get", "/feature.txt"]).stdout == b"made on B");
    c.s.ok(&["merge", "feature"]);
    await_cond(Duration::from_secs(30), "C's merge to reach A", || a.get("/feature.txt").as_deref() == Some(&b"made on B"[..]));
    converged(&[&a, &b, &c], "all three after the merge");
}

#[test]
fn used_up_forged_and_expired_tickets_are_refused_with_a_clear_error_and_the_node_still_joins_later() {
    let (a, c) = (Member::start(), Member::start());
    let b = Member::start();
    let ticket = a.invite(&[]);
    b.join(&ticket);
    let used = c.s.err(&["join", &ticket]);
    assert!(used.contains("used up"), "{used}");
    let fresh = a.invite(&[]);
    let forged = format!("{}xxxxx", &fresh[..fresh.len() - 5]);
    let err = c.s.err(&["join", &forged]);
    assert!(err.contains("not an alkfs ticket") || err.contains("refused"), "{err}");
    let err = c.s.err(&["join", "hello"]);
    assert!(err.contains("not an alkfs ticket"), "{err}");
    let short = a.invite(&["--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let err = c.s.err(&["join", &short]);
    assert!(err.contains("expired"), "{err}");
    // None of that stopped C from joining with a good ticket.
    c.join(&fresh);
    a.s.put_bytes("/after.txt", b"x");
    await_cond(Duration::from_secs(30), "C to get A's write", || c.get("/after.txt").as_deref() == Some(&b"x"[..]));
    assert!(!a.node.log().contains("panicked") && !c.node.log().contains("panicked"));
}

#[test]
fn a_removed_member_gets_nothing_new_within_seconds_while_the_others_go_on() {
    let (a, b, c) = three();
    a.s.put_bytes("/before.txt", b"before");
    converged(&[&a, &b, &c], "the first write");
    let cid = c.id();
    let connected_to_c = |m: &Member| common::status_json(m.s.data()).expect("status")["mesh"]["peers"].as_array().is_some_and(|ps| ps.iter().any(|p| p["id"] == cid.as_str() && p["connected"] == true));
    for m in [&a, &b] {
        await_cond(Duration::from_secs(30), "sessions with C before its removal", || connected_to_c(m));
    }
    a.s.ok(&["members", "remove", &cid]);
    let members = a.s.ok(&["members", "--json"]);
    assert!(members.contains("removed_ms"), "{members}");
    // The removal is carried out: A and B (once the removal reached it) end their sessions
    // with C, and C gets no new one.
    let cut_off = |m: &Member| !connected_to_c(m);
    for m in [&a, &b] {
        await_cond(Duration::from_secs(30), "the removed member's sessions to end", || cut_off(m));
    }
    let sessions_with_c = |m: &Member| m.node.log().lines().filter(|l| l.contains("session open") && l.contains(&cid[..8])).count();
    let opened = (sessions_with_c(&a), sessions_with_c(&b));
    assert!(opened.0 > 0 && opened.1 > 0, "the logs name sessions with C (else the check below proves nothing)");
    a.s.put_bytes("/after.txt", b"after");
    b.s.put_bytes("/from-b.txt", b"b");
    await_cond(Duration::from_secs(30), "B to get A's later write", || b.get("/after.txt").as_deref() == Some(&b"after"[..]));
    await_cond(Duration::from_secs(30), "A to get B's", || a.get("/from-b.txt").is_some());
    // Through all of that C had no session with either (a write reaches a node only through
    // one), and it holds neither write, not even as an entry.
    assert!(cut_off(&a) && cut_off(&b), "a removed member is connected again");
    assert_eq!((sessions_with_c(&a), sessions_with_c(&b)), opened, "a removed member got a new session");
    let tree = c.tree();
    assert!(!tree.iter().any(|(p, _, _)| p == "/after.txt" || p == "/from-b.txt"), "a removed member received a new write: {tree:?}");
    let in_b = common::parse_json_array(&b.s.ok(&["members", "--json"]));
    let c_in_b = in_b.iter().find(|m| m["node"] == cid.as_str()).expect("C listed on B");
    assert!(c_in_b["removed_ms"].is_i64(), "B knows C was removed: {c_in_b}");
}

#[test]
fn a_node_an_hour_behind_overwrites_what_it_has_seen_and_wins_everywhere() {
    if !common::precondition(common::libfaketime().is_some(), "libfaketime (apt install faketime) sets B's clock an hour behind") {
        return;
    }
    let env = common::faketime_env("-1h");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Member::start();
    let b = Member::start_with(&env);
    b.join(&a.invite(&[]));
    a.s.put_bytes("/doc.txt", b"A's, an hour ahead");
    await_cond(Duration::from_secs(30), "A's version to reach B", || b.get("/doc.txt").as_deref() == Some(&b"A's, an hour ahead"[..]));
    // B's CLI writes through B's node (whose clock is an hour behind): it has seen A's version.
    b.s.put_bytes("/doc.txt", b"B's, seen A's");
    for m in [&a, &b] {
        await_cond(Duration::from_secs(30), "B's later write to win everywhere", || m.get("/doc.txt").as_deref() == Some(&b"B's, seen A's"[..]));
        assert!(common::parse_json_array(&m.s.ok(&["conflicts", "--json"])).is_empty(), "B saw A's version: no conflict");
    }
}

/// A joiner receives versions whose blobs the inviter's GC freed (their entries stay in the
/// bucket's documents). Those cannot arrive; every other blob must, also those batched with
/// them in one request, and `status` says what never will without the node asking hot.
#[test]
fn blobs_freed_by_the_inviters_gc_do_not_hold_back_the_others_and_are_reported_unavailable() {
    let a = Member::start();
    let c = Member::start();
    // Shared first (the invitation shares the bucket), so old versions go into its documents.
    let ticket = a.invite(&[]);
    let big = |i: u64, v: u64| common::random_bytes(40 << 10, i * 10 + v);
    for i in 0..6u64 {
        a.s.put_bytes(&format!("/small{i}.txt"), format!("small {i} v1").as_bytes());
        a.s.put_bytes(&format!("/big{i}.bin"), &big(i, 1));
    }
    for i in 0..6u64 {
        a.s.put_bytes(&format!("/small{i}.txt"), format!("small {i} v2").as_bytes());
        a.s.put_bytes(&format!("/big{i}.bin"), &big(i, 2));
    }
    let gc = a.s.ok(&["gc", "--keep-versions", "0", "--keep-days", "0"]);
    assert!(gc.starts_with("gc: freed 12 blobs"), "the first versions' blobs were freed: {gc}");
    c.join(&ticket);
    for i in 0..6u64 {
        await_cond(Duration::from_secs(60), "every current file's bytes on the joiner", || {
            c.get(&format!("/small{i}.txt")).as_deref() == Some(format!("small {i} v2").as_bytes()) && c.get(&format!("/big{i}.bin")) == Some(big(i, 2))
        });
    }
    // The first versions' entries arrived, and their blobs are said to be unavailable.
    let log = common::parse_json_array(&c.s.ok(&["log", "/big0.bin", "--json"]));
    assert_eq!(log.len(), 2, "both versions of /big0.bin reached the joiner: {log:?}");
    let st = common::await_status(c.s.data(), Duration::from_secs(60), "the freed blobs reported unavailable", |st| st["mesh"]["unavailable_blobs"] == 12);
    assert_eq!(st["blobs_missing"], 12, "{st}");
    // Not asked for hot: a round of requests after a pause that doubles (1, 2, 4 s ...), so
    // the inviter refuses in a few distinct seconds of eight, not in every one.
    let refusal_seconds = || -> std::collections::BTreeSet<String> {
        a.node.log().lines().filter(|l| l.contains("refused a blob request")).map(|l| l[..19].to_string()).collect()
    };
    let before = refusal_seconds();
    std::thread::sleep(Duration::from_secs(8));
    let rounds = refusal_seconds().difference(&before).count();
    assert!(rounds <= 4, "the joiner asked in {rounds} of 8 seconds for blobs nobody has");
    assert!(!c.node.log().contains("runs past the request"), "a successful fetch was logged as failed");
}

#[test]
fn a_write_made_apart_under_a_directory_removed_elsewhere_is_listed_on_both_after_the_heal() {
    let a = Member::start();
    let b = Member::start();
    b.join(&a.invite(&[]));
    a.s.put_bytes("/d/old.txt", b"old");
    converged(&[&a, &b], "the first write");
    // Apart (B's node down: its CLI writes to its store): B writes below /d, A removes /d.
    let Member { s: bs, mut node } = b;
    node.stop_with(libc::SIGTERM, Duration::from_secs(10));
    bs.put_bytes("/d/new.txt", b"written on B while apart");
    a.s.ok(&["rm", "-r", "/d"]);
    let b = Member { node: Node::start(&bs, &[], &[]), s: bs };
    converged(&[&a, &b], "the two to converge after the heal");
    for m in [&a, &b] {
        let tree = m.tree();
        assert!(tree.iter().any(|(p, k, _)| p == "/d" && k == "dir"), "the directory came back: {tree:?}");
        assert!(tree.iter().any(|(p, _, _)| p == "/d/new.txt"), "B's write is listed: {tree:?}");
        assert!(!tree.iter().any(|(p, _, _)| p == "/d/old.txt"), "A's removal of what it had seen stands: {tree:?}");
        assert_eq!(m.s.ls("/d"), vec!["new.txt".to_string()], "`ls /d` reaches it");
        await_cond(Duration::from_secs(30), "its bytes", || m.get("/d/new.txt").as_deref() == Some(&b"written on B while apart"[..]));
    }
}

/// How long until `path` reads `want` on every one of `nodes`.
fn readable_everywhere(nodes: &[&Member], path: &str, want: &[u8], limit: Duration) -> Duration {
    let started = std::time::Instant::now();
    for (i, m) in nodes.iter().enumerate() {
        // `get` waits for bytes still on a peer: bounded by what is left of the limit.
        let get = || {
            let mut child = m.s.cmd(&["get", path]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).spawn().unwrap();
            let deadline = started + limit;
            while child.try_wait().unwrap().is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let out = child.wait_with_output().unwrap();
            out.status.success().then_some(out.stdout)
        };
        while get().as_deref() != Some(want) {
            if started.elapsed() > limit {
                let logs: Vec<String> = nodes.iter().map(|n| n.node.log()).collect();
                panic!("{path} not readable on node {i} after {limit:?}; logs:\n{}", logs.join("\n=====\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    started.elapsed()
}

#[test]
fn writes_are_pushed_to_every_node_at_once_after_joins_and_after_a_restart() {
    // Pushed, not left to the summaries every ten seconds: well under that.
    const LIMIT: Duration = Duration::from_secs(5);
    let (a, b, c) = three();
    let mut times = Vec::new();
    for (i, m) in [&b, &c, &a, &b, &c].iter().enumerate() {
        let (path, body) = (format!("/first-{i}.txt"), format!("written by one, read by all ({i})"));
        m.s.put_bytes(&path, body.as_bytes());
        times.push(readable_everywhere(&[&a, &b, &c], &path, body.as_bytes(), LIMIT));
    }
    eprintln!("after the joins: {times:?}");
    // A killed and restarted (at its address, as a node with a configured port does):
    // from the moment it answers, writes on any node reach all.
    let listen = common::status_json(a.s.data()).unwrap()["mesh"]["listen"][0].as_str().unwrap().to_string();
    let Member { s: as_, mut node } = a;
    node.kill();
    let a = Member { node: Node::start(&as_, &["--listen", &listen], &[]), s: as_ };
    let mut times = Vec::new();
    for (i, m) in [&a, &b, &c, &a].iter().enumerate() {
        let (path, body) = (format!("/after-restart-{i}.txt"), format!("after the restart ({i})"));
        m.s.put_bytes(&path, body.as_bytes());
        times.push(readable_everywhere(&[&a, &b, &c], &path, body.as_bytes(), LIMIT));
    }
    eprintln!("after A's restart: {times:?}");
}

/// A CLI `put` replaces what the node held when it began: a peer's version that arrived
/// while the put's bytes were still coming in is concurrent with it, so the one that loses
/// is listed by `conflicts` on every node (and restorable), not silently replaced.
#[test]
fn a_peers_version_that_arrives_during_a_slow_put_is_listed_not_replaced() {
    use std::io::Write;
    let a = Member::start();
    let b = Member::start();
    b.join(&a.invite(&[]));
    a.s.put_bytes("/doc.txt", b"version 1");
    await_cond(Duration::from_secs(30), "version 1 on B", || b.get("/doc.txt").as_deref() == Some(&b"version 1"[..]));
    // A's put begins: its bytes come in slowly (the node has begun importing them).
    let mut put = a.s.cmd(&["put", "-", "/doc.txt"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().unwrap();
    let mut stdin = put.stdin.take().unwrap();
    let big = common::random_bytes(1 << 20, 9);
    stdin.write_all(&big).unwrap();
    await_cond(Duration::from_secs(10), "A's node to be importing the put", || !a.s.staging_files().is_empty());
    // Meanwhile B's version 2 arrives at A.
    b.s.put_bytes("/doc.txt", b"version 2, from B");
    await_cond(Duration::from_secs(30), "version 2 on A", || a.get("/doc.txt").as_deref() == Some(&b"version 2, from B"[..]));
    stdin.write_all(b"the end").unwrap();
    drop(stdin);
    assert!(put.wait().unwrap().success(), "A's put");
    let mut losers = Vec::new();
    for m in [&a, &b] {
        await_cond(Duration::from_secs(30), "the race listed on every node", || common::parse_json_array(&m.s.ok(&["conflicts", "--json"])).len() == 1);
        let rows = common::parse_json_array(&m.s.ok(&["conflicts", "--json"]));
        assert_eq!(rows[0]["path"], "/doc.txt", "{rows:?}");
        losers.push(rows[0]["loser_version"].as_str().unwrap().to_string());
    }
    assert_eq!(losers[0], losers[1], "one loser, named alike on both nodes");
    let winner = a.get("/doc.txt").unwrap();
    await_cond(Duration::from_secs(30), "one winner on both", || b.get("/doc.txt").as_deref() == Some(&winner[..]));
    // Whichever lost is kept: restoring it brings its bytes back.
    let put_bytes: Vec<u8> = [&big[..], b"the end"].concat();
    let loser_bytes: &[u8] = if winner == put_bytes { b"version 2, from B" } else { &put_bytes };
    a.s.ok(&["restore", "/doc.txt", "--version", &losers[0]]);
    assert_eq!(a.get("/doc.txt").as_deref(), Some(loser_bytes), "the restored loser");
}

/// `log --json` of `path`: each version's `written_ms`.
fn written_ms(m: &Member, path: &str) -> Vec<i64> {
    common::parse_json_array(&m.s.ok(&["log", path, "--json"])).iter().filter_map(|r| r["written_ms"].as_i64()).collect()
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[test]
fn a_node_ten_years_ahead_waits_on_the_others_and_leaves_their_clocks_alone() {
    if !common::precondition(common::libfaketime().is_some(), "libfaketime (apt install faketime) sets Z's clock ten years ahead") {
        return;
    }
    const YEAR_MS: i64 = 365 * 86_400_000;
    let env = common::faketime_env("+3650d");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (a, b) = (Member::start(), Member::start());
    let z = Member::start_with(&env);
    b.join(&a.invite(&[]));
    z.join(&a.invite(&[]));
    let zid = z.id();
    z.s.put_bytes("/from-z.txt", b"written ten years ahead");
    assert!(written_ms(&z, "/from-z.txt")[0] > wall_ms() + 9 * YEAR_MS, "Z's clock really is ten years ahead");
    // A and B hold Z's version unapplied, and say whose clock is ahead and by how much.
    for m in [&a, &b] {
        await_cond(Duration::from_secs(30), "Z's version to wait, named in status", || {
            let st = common::status_json(m.s.data()).expect("status");
            st["mesh"]["clock_waits"].as_array().is_some_and(|w| w.iter().any(|w| w["writer"] == zid.as_str() && w["ahead_ms"].as_i64().unwrap_or(0) > 9 * YEAR_MS))
        });
        assert!(m.get("/from-z.txt").is_none(), "a version ten years ahead is not applied");
    }
    // Their own new versions, and those they pass on, are dated by real time.
    a.s.put_bytes("/from-a.txt", b"a");
    await_cond(Duration::from_secs(30), "A's write to reach B", || b.get("/from-a.txt").is_some());
    for m in [&a, &b] {
        let at = written_ms(m, "/from-a.txt")[0];
        assert!((at - wall_ms()).abs() < 3_600_000, "A's version is dated {at}, not now");
    }
    b.s.put_bytes("/from-b.txt", b"b");
    assert!((written_ms(&b, "/from-b.txt")[0] - wall_ms()).abs() < 3_600_000, "B's clock was not dragged along");
    // Z is told: its status names the peers whose clocks are behind its own.
    let st = z.s.ok(&["status"]);
    assert!(st.contains("this node's clock is") && st.contains("versions written here wait there"), "{st}");
}

#[test]
fn a_read_only_member_receives_everything_and_its_writes_are_refused_until_it_is_made_a_writer() {
    let (a, r) = (Member::start(), Member::start());
    r.join(&a.invite(&["--read-only"]));
    let rid = r.id();
    a.s.put_bytes("/from-a.txt", b"a");
    await_cond(Duration::from_secs(30), "A's write to reach the read-only member", || r.get("/from-a.txt").as_deref() == Some(&b"a"[..]));
    // Both list its role.
    for m in [&a, &r] {
        await_cond(Duration::from_secs(30), "roles listed", || {
            let ms = common::parse_json_array(&m.s.ok(&["members", "--json"]));
            ms.iter().any(|x| x["node"] == rid.as_str() && x["role"] == "ReadOnly") && ms.iter().any(|x| x["node"] != rid.as_str() && x["role"] == "Owner")
        });
    }
    assert!(a.s.ok(&["members"]).contains("read-only"));
    // Its own CLI refuses writes with a clear error, and nothing is written.
    let out = r.s.run(&["put", "-", "/from-r.txt"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("read-only member"), "{err}");
    assert!(r.get("/from-r.txt").is_none());
    // It cannot invite, remove or grant.
    for args in [&["invite"][..], &["members", "remove", &a.id()], &["members", "grant", &rid, "writer"]] {
        let out = r.s.run(args);
        assert!(!out.status.success(), "{args:?} succeeded on a read-only member");
        assert!(String::from_utf8_lossy(&out.stderr).contains("owner"), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Made a writer, it writes, and A gets it.
    a.s.ok(&["members", "grant", &rid, "writer"]);
    await_cond(Duration::from_secs(30), "the grant to reach R", || {
        common::parse_json_array(&r.s.ok(&["members", "--json"])).iter().any(|x| x["node"] == rid.as_str() && x["role"] == "Writer")
    });
    r.s.put_bytes("/from-r.txt", b"r");
    await_cond(Duration::from_secs(30), "R's write to reach A", || a.get("/from-r.txt").as_deref() == Some(&b"r"[..]));
}

#[test]
fn a_writer_invites_once_an_owner_lets_writers_invite_and_its_invitees_stay_when_that_ends() {
    let (a, w, c) = (Member::start(), Member::start(), Member::start());
    w.join(&a.invite(&[]));
    let wid = w.id();
    await_cond(Duration::from_secs(30), "the writer to know its role", || {
        common::parse_json_array(&w.s.ok(&["members", "--json"])).iter().any(|x| x["node"] == wid.as_str() && x["role"] == "Writer")
    });
    // Only owners invite until an owner says otherwise; the writer is told why.
    let out = w.s.run(&["invite"]);
    assert!(!out.status.success(), "a writer invited by default");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not let writers invite"), "{err}");
    assert!(w.s.ok(&["members"]).contains("who may invite: owners ("));
    a.s.ok(&["members", "invites", "writers"]);
    await_cond(Duration::from_secs(30), "the policy to reach the writer", || w.s.ok(&["members"]).contains("who may invite: owners and writers"));
    // The writer's ticket admits C, and every member takes it as a writer.
    c.join(&w.invite(&[]));
    let cid = c.id();
    for m in [&a, &w, &c] {
        await_cond(Duration::from_secs(30), "C listed as a writer", || {
            common::parse_json_array(&m.s.ok(&["members", "--json"])).iter().any(|x| x["node"] == cid.as_str() && x["role"] == "Writer")
        });
    }
    c.s.put_bytes("/from-c.txt", b"c");
    await_cond(Duration::from_secs(30), "C's write to reach A", || a.get("/from-c.txt").as_deref() == Some(&b"c"[..]));
    // Back to owners only: the writer may not invite again, and C stays.
    a.s.ok(&["members", "invites", "owners"]);
    await_cond(Duration::from_secs(30), "the policy to reach the writer", || w.s.ok(&["members"]).contains("who may invite: owners ("));
    assert!(!w.s.run(&["invite"]).status.success(), "a writer invited after inviting was turned off");
    assert!(common::parse_json_array(&a.s.ok(&["members", "--json"])).iter().any(|x| x["node"] == cid.as_str() && x["removed_ms"].is_null()));
    c.s.put_bytes("/from-c-2.txt", b"c2");
    await_cond(Duration::from_secs(30), "C's later write to reach A", || a.get("/from-c-2.txt").as_deref() == Some(&b"c2"[..]));
}

/// Churn on one path compacts the bucket on every member by itself: once every member is at
/// the same heads, each derives the same epoch (or takes it from a peer that did), the saved
/// shards shrink everywhere, every node shows the same tree, and writes after the epoch
/// still reach everyone.
#[test]
fn churn_compacts_the_bucket_on_every_member_and_the_tree_stays_the_same() {
    let start = || {
        let s = Store::new();
        std::fs::write(s.data().join("config.toml"), "[node]\ncompact_after_kib = 16\n").unwrap();
        let node = Node::start(&s, &[], &[]);
        Member { s, node }
    };
    let (a, b, c) = (start(), start(), start());
    b.join(&a.invite(&[]));
    c.join(&a.invite(&[]));
    for i in 0..300 {
        a.s.put_bytes("/hot", format!("hot {i}").as_bytes());
    }
    b.s.put_bytes("/from-b", b"b");
    converged(&[&a, &b, &c], "the churn to reach every member");
    let epoch = |m: &Member| common::status_json(m.s.data()).map(|st| (st["mesh"]["epochs"][0]["epoch"].as_u64().unwrap_or(0), st["mesh"]["epochs"][0]["shard_bytes"].as_u64().unwrap_or(0)));
    for m in [&a, &b, &c] {
        common::await_status(m.s.data(), Duration::from_secs(90), "the bucket's first epoch", |st| st["mesh"]["epochs"][0]["epoch"].as_u64().unwrap_or(0) >= 1);
    }
    // An epoch began only past 16 KiB of shards (`node.compact_after_kib`); what is live
    // (three paths, the last branch records) saves in a few.
    for m in [&a, &b, &c] {
        let (e, bytes) = epoch(m).unwrap();
        assert!(bytes < 6 << 10, "{}: epoch {e}, shards {bytes} bytes", m.id());
    }
    converged(&[&a, &b, &c], "the same tree on every member after the epoch");
    c.s.put_bytes("/after", b"after the epoch");
    converged(&[&a, &b, &c], "a write after the epoch to reach every member");
    assert_eq!(a.get("/hot").as_deref(), Some(&b"hot 299"[..]));
}
