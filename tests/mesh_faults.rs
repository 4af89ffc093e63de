//! The mesh under faults, with real processes: a real partition (iptables drops the packets
//! between two nodes' ports on loopback, made and removed by the test) during which both
//! sides write, then heal; a node SIGKILLed while it receives a large sync and its blobs.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::{await_cond, Node, Store};

fn port_of(s: &Store) -> u16 {
    let st = common::status_json(s.data()).expect("status");
    let listen = st["mesh"]["listen"][0].as_str().expect("the node listens").to_string();
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

/// Drops every UDP packet between two loopback ports while it lives. Its rules carry the
/// test process's pid in a comment: a test killed before its guard dropped (a timeout's
/// SIGKILL) leaves rules that the next partition removes.
struct Partition {
    rules: Vec<Vec<String>>,
}

/// The comment that marks this test process's rules.
const RULE_TAG: &str = "alkfs-test-partition-";

impl Partition {
    fn new(a: u16, b: u16) -> Partition {
        remove_stale_rules();
        let tag = format!("{RULE_TAG}{}", std::process::id());
        let rules: Vec<Vec<String>> = [(a, b), (b, a)]
            .iter()
            .map(|(from, to)| {
                ["INPUT", "-p", "udp", "-s", "127.0.0.1", "--sport", &from.to_string(), "--dport", &to.to_string(), "-m", "comment", "--comment", &tag, "-j", "DROP"].map(String::from).to_vec()
            })
            .collect();
        for r in &rules {
            let ok = Command::new("iptables").arg("-I").args(r).status().unwrap().success();
            assert!(ok, "iptables -I {r:?}");
        }
        Partition { rules }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for r in &self.rules {
            let _ = Command::new("iptables").arg("-D").args(r).status();
        }
    }
}

/// Removes the partition rules of test processes that are gone.
fn remove_stale_rules() {
    let out = Command::new("iptables").args(["-S", "INPUT"]).output().unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(pid) = line.split(RULE_TAG).nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()) else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let Some(rule) = line.strip_prefix("-A ") else { continue };
        let _ = Command::new("sh").arg("-c").arg(format!("iptables -D {rule}")).status();
    }
}

fn node_id(s: &Store) -> String {
    common::status_json(s.data()).expect("status")["node_id"].as_str().expect("a node id").to_string()
}

fn tree(s: &Store) -> Vec<String> {
    let mut t: Vec<String> = common::parse_json_array(&s.ok(&["ls", "-R", "/", "--json"]))
        .iter()
        .map(|r| format!("{} {} {}", r["path"].as_str().unwrap(), r["kind"], r["hash"]))
        .collect();
    t.sort();
    t
}

fn get(s: &Store, path: &str) -> Option<Vec<u8>> {
    let out = s.run(&["get", path]);
    out.status.success().then_some(out.stdout)
}

#[test]
fn both_sides_of_a_real_partition_keep_writing_and_converge_after_the_heal() {
    if !common::precondition(common::is_root() && common::have_tool("iptables"), "root and iptables (apt install iptables) drop packets between two nodes") {
        return;
    }
    let (a, b) = (Store::new(), Store::new());
    let (_na, _nb) = (Node::start(&a, &[], &[]), Node::start(&b, &[], &[]));
    b.ok(&["join", a.ok(&["invite"]).trim()]);
    a.put_bytes("/before.txt", b"before");
    await_cond(Duration::from_secs(30), "the first write to reach B", || get(&b, "/before.txt").is_some());
    let cut = Partition::new(port_of(&a), port_of(&b));
    // Both sides go on accepting writes: their own paths, and one path on both.
    for i in 0..5 {
        a.put_bytes(&format!("/a/{i}.txt"), format!("a{i}").as_bytes());
        b.put_bytes(&format!("/b/{i}.txt"), format!("b{i}").as_bytes());
    }
    a.put_bytes("/both.txt", b"from a");
    b.put_bytes("/both.txt", b"from b");
    // Held until QUIC's idle timeout (30 s) ends both sides' session: after the heal they
    // must dial again, resume from their saved sync states and exchange summaries.
    let cut_at = std::time::Instant::now();
    for (s, other) in [(&a, &b), (&b, &a)] {
        let other_id = node_id(other);
        common::await_status(s.data(), Duration::from_secs(90), "the session to end under the partition", |st| {
            st["mesh"]["peers"].as_array().is_some_and(|ps| ps.iter().any(|p| p["id"] == other_id.as_str() && p["connected"] == false))
        });
    }
    assert!(cut_at.elapsed() >= Duration::from_secs(20), "the sessions ended after {:?}: before the idle timeout, so not the partition's doing", cut_at.elapsed());
    // Still cut while more writes are made on both sides, with no session to push them.
    a.put_bytes("/a/late.txt", b"late a");
    b.put_bytes("/b/late.txt", b"late b");
    assert!(get(&b, "/a/0.txt").is_none() && get(&a, "/b/0.txt").is_none(), "the partition let writes through");
    drop(cut);
    let healed = std::time::Instant::now();
    await_cond(Duration::from_secs(90), "both sides to converge after the heal", || tree(&a) == tree(&b) && get(&a, "/b/late.txt").is_some());
    eprintln!("partition held {:?}; converged {:?} after the heal", healed - cut_at, healed.elapsed());
    for i in 0..5 {
        for s in [&a, &b] {
            await_cond(Duration::from_secs(30), "every acknowledged write's bytes", || {
                get(s, &format!("/a/{i}.txt")).as_deref() == Some(format!("a{i}").as_bytes()) && get(s, &format!("/b/{i}.txt")).as_deref() == Some(format!("b{i}").as_bytes())
            });
        }
    }
    let (wa, wb) = (get(&a, "/both.txt").unwrap(), get(&b, "/both.txt").unwrap());
    assert_eq!(wa, wb, "one winner on both sides");
    for s in [&a, &b] {
        let c = common::parse_json_array(&s.ok(&["conflicts", "--json"]));
        assert_eq!(c.len(), 1, "the other side's write is listed as the loser: {c:?}");
        assert_eq!(c[0]["path"], "/both.txt");
    }
}

#[test]
fn a_node_killed_while_it_receives_catches_up_after_a_restart_and_its_store_is_clean() {
    let a = Store::new();
    let _na = Node::start(&a, &[], &[]);
    // Enough to be mid-transfer when the kill lands: many small files and a few large ones.
    let src = a.scratch().join("tree");
    for i in 0..300 {
        let dir = src.join(format!("d{}", i % 10));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}")), common::random_bytes(4096 + i, i as u64)).unwrap();
    }
    for i in 0..4 {
        std::fs::write(src.join(format!("big{i}")), common::random_bytes(8 << 20, 100 + i)).unwrap();
    }
    a.ok(&["put", "-r", src.to_str().unwrap(), "/data"]);
    let b = Store::new();
    let mut nb = Node::start(&b, &[], &[]);
    b.ok(&["join", a.ok(&["invite"]).trim()]);
    // Kill as soon as something arrived, before all of it did.
    await_cond(Duration::from_secs(30), "the first versions to arrive", || b.ok(&["ls", "-R", "/"]).lines().count() > 1);
    nb.kill();
    // The kill landed mid-transfer: B's store (read while no node runs) holds part of the
    // tree or part of its bytes, not all of it.
    {
        let db = rusqlite::Connection::open(b.data().join("tree.db")).unwrap();
        let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
        let (files, missing) = (count("SELECT count(*) FROM version WHERE hash IS NOT NULL"), count("SELECT count(*) FROM blob WHERE present = 0"));
        assert!(files > 0, "no file version had arrived when the kill landed");
        assert!(files < 304 || missing > 0, "the transfer had finished before the kill ({files} file versions, no blob missing): not mid-transfer");
        eprintln!("killed with {files} of 304 file versions and {missing} blobs still missing");
    }
    let _nb = Node::start(&b, &[], &[]);
    await_cond(Duration::from_secs(120), "B to catch up after the restart", || tree(&a) == tree(&b));
    await_cond(Duration::from_secs(120), "every byte to arrive", || common::status_json(b.data()).unwrap()["blobs_missing"] == 0);
    // Nothing missing, nothing damaged: every blob the tree names re-hashes to its name.
    let check = b.ok(&["blobs", "check"]);
    assert!(check.contains(", 0 failed"), "{check}");
    let out = b.ok_bytes(&["get", "/data/big3"]);
    assert!(out == common::random_bytes(8 << 20, 103), "the large file arrived whole");
    let dest = b.scratch().join("copy");
    b.ok(&["get", "/data/d7/f297", dest.to_str().unwrap()]);
    assert_eq!(std::fs::read(&dest).unwrap(), common::random_bytes(4096 + 297, 297));
}

/// One script, two worlds: played by the simulator (`alknet-simulations`, the proto core in
/// one thread) and by three real nodes with a real partition. Both must end in the same tree
/// (paths and bytes) and list the same conflict losers (path and whose write lost).
///
/// A writes and deletes alone; 1.2 s later (so its stamps are later in both worlds) C
/// overwrites the same path and edits the file A deleted, and B writes its own path.
#[test]
fn a_scripted_partition_ends_in_the_tree_the_simulation_predicts() {
    if !common::precondition(common::is_root() && common::have_tool("iptables"), "root and iptables (apt install iptables) drop packets between nodes") {
        return;
    }
    use alknet_simulations::Sim;
    // The simulation.
    let mut sim = Sim::new(1).nodes(3);
    sim.write(0, "/before.txt", b"before");
    sim.run_until_quiet().unwrap();
    sim.partition(&[0], &[1, 2]);
    sim.write(0, "/same.txt", b"left");
    sim.write(0, "/a.txt", b"a");
    assert!(sim.delete(0, "/before.txt"));
    sim.run_for(1_200);
    sim.write(2, "/same.txt", b"right");
    sim.write(2, "/before.txt", b"edited on c");
    sim.write(1, "/b.txt", b"b");
    sim.run_for(3_000);
    sim.heal();
    sim.run_until_quiet().unwrap();
    let sim_tree: BTreeMap<String, Vec<u8>> = sim.tree(0);
    let writer_of = |sim: &Sim, n: usize, loser: &alknet_actors::proto::ids::VersionId| (0..3).find(|&i| sim.node(i).id == loser.node).unwrap_or(n);
    let sim_conflicts: Vec<(String, usize)> = {
        let node = sim.node(0);
        let mut c: Vec<_> = node.conflicts().iter().map(|c| (c.path.as_str().to_string(), writer_of(&sim, 0, &c.loser))).collect();
        c.sort();
        c
    };
    assert!(sim_conflicts.len() >= 2, "the script races twice: {sim_conflicts:?}");

    // The real mesh.
    let stores = [Store::new(), Store::new(), Store::new()];
    let _nodes: Vec<Node> = stores.iter().map(|s| Node::start(s, &[], &[])).collect();
    let ids: Vec<String> = stores.iter().map(|s| common::status_json(s.data()).unwrap()["node_id"].as_str().unwrap().to_string()).collect();
    for s in &stores[1..] {
        s.ok(&["join", stores[0].ok(&["invite"]).trim()]);
    }
    stores[0].put_bytes("/before.txt", b"before");
    for s in &stores[1..] {
        await_cond(Duration::from_secs(30), "the first write everywhere", || get(s, "/before.txt").is_some());
    }
    let (pa, pb, pc) = (port_of(&stores[0]), port_of(&stores[1]), port_of(&stores[2]));
    let cuts = [Partition::new(pa, pb), Partition::new(pa, pc)];
    stores[0].put_bytes("/same.txt", b"left");
    stores[0].put_bytes("/a.txt", b"a");
    stores[0].ok(&["rm", "/before.txt"]);
    std::thread::sleep(Duration::from_millis(1_200));
    stores[2].put_bytes("/same.txt", b"right");
    stores[2].put_bytes("/before.txt", b"edited on c");
    stores[1].put_bytes("/b.txt", b"b");
    std::thread::sleep(Duration::from_secs(3));
    assert!(get(&stores[1], "/a.txt").is_none(), "the partition let writes through");
    drop(cuts);
    let real_tree = |s: &Store| -> BTreeMap<String, Vec<u8>> {
        common::parse_json_array(&s.ok(&["ls", "-R", "/", "--json"]))
            .iter()
            .filter(|r| r["kind"] == "file")
            .map(|r| {
                let p = r["path"].as_str().unwrap().to_string();
                let bytes = get(s, &p).unwrap_or_default();
                (p, bytes)
            })
            .collect()
    };
    let real_conflicts = |s: &Store| -> Vec<(String, usize)> {
        let mut c: Vec<(String, usize)> = common::parse_json_array(&s.ok(&["conflicts", "--json"]))
            .iter()
            .map(|r| {
                let loser = r["loser_version"].as_str().unwrap();
                let node = loser.split('@').nth(1).unwrap();
                (r["path"].as_str().unwrap().to_string(), ids.iter().position(|id| id.starts_with(node) || node.starts_with(id.as_str())).unwrap_or(99))
            })
            .collect();
        c.sort();
        c
    };
    for (i, s) in stores.iter().enumerate() {
        await_cond(Duration::from_secs(90), "the real mesh to reach the simulated tree", || real_tree(s) == sim_tree);
        await_cond(Duration::from_secs(30), "the real mesh to list the simulated conflicts", || real_conflicts(s) == sim_conflicts);
        assert_eq!(real_tree(s), sim_tree, "node {i}");
    }
}
