//! Replication rules on real stores: several data dirs exchange their versions in every order,
//! and must end with the same tree, the same heads and the same conflicts on every node. The
//! exchange is the real one but for the network: each node's documents (`engine::mesh`),
//! admitted by invitation (membership), published from the outbox, synced document by
//! document with automerge's protocol in an order the schedule picks and cut off part-way
//! (so an operation's versions in several shards arrive apart: the whole-operation rule);
//! the network itself is tested end to end.

use std::collections::BTreeMap;
use std::sync::Arc;

use alknet_actors::engine::mesh::{Adoption, Mesh};
use alknet_actors::engine::{Engine, Scope};
use alknet_actors::proto::clock::ManualClock;
use alknet_actors::proto::ids::{Uid, VersionRef};

mod common;
use common::{deliver, fresh_with_clock, main_scope, p, put};

/// A small deterministic generator (xorshift64*), so a failing seed replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Node {
    _dir: tempfile::TempDir,
    engine: Engine,
    clock: Arc<ManualClock>,
    mesh: Mesh,
}

/// `n` stores sharing the default bucket: node 0 made it and invited the others, which
/// joined it empty.
fn mesh(n: usize) -> (Vec<Node>, Uid) {
    let mut nodes: Vec<Node> = (0..n)
        .map(|_| {
            let (dir, engine, clock) = fresh_with_clock();
            let mesh = Mesh::new(&engine).unwrap();
            Node { _dir: dir, engine, clock, mesh }
        })
        .collect();
    let (first, rest) = nodes.split_at_mut(1);
    let inviter = &mut first[0];
    let (uid, secret) = inviter.mesh.invite(&mut inviter.engine, "default", (3_600_000, n as u32, alknet_actors::proto::membership::Role::Writer), &[]).unwrap();
    for node in rest {
        let me = node.engine.tree().me();
        let (name, root) = inviter.mesh.admit(&mut inviter.engine, &uid, &secret, &me, &[]).unwrap().unwrap();
        let adoption = Adoption { name, bucket: uid, root, inviter: inviter.engine.tree().me(), inviter_addrs: vec![], my_addrs: vec![] };
        node.mesh.adopt(&mut node.engine, &adoption).unwrap();
    }
    (nodes, uid)
}

/// One round of the sync protocol from `from` to `to` and back on document `doc`; whether
/// anything was sent.
fn round(nodes: &mut [Node], uid: &Uid, from: usize, to: usize, doc: u16) -> bool {
    let mut sent = false;
    for (x, y) in [(from, to), (to, from)] {
        let (nx, ny) = two(nodes, x, y);
        let idy = ny.engine.tree().me();
        if let Some(m) = nx.mesh.generate(&nx.engine, &idy, uid, doc).unwrap() {
            deliver((&mut nx.mesh, &mut nx.engine), (&mut ny.mesh, &mut ny.engine), uid, doc, m);
            sent = true;
        }
    }
    sent
}

/// Nodes `x` and `y` (distinct) of `nodes`, both writable.
fn two(nodes: &mut [Node], x: usize, y: usize) -> (&mut Node, &mut Node) {
    assert_ne!(x, y);
    if x < y {
        let (lo, hi) = nodes.split_at_mut(y);
        (&mut lo[x], &mut hi[0])
    } else {
        let (lo, hi) = nodes.split_at_mut(x);
        (&mut hi[0], &mut lo[y])
    }
}

/// A session between `from` and `to` as the schedule makes it: both publish, the documents
/// that differ are synced in a shuffled order, each for a few rounds only (what is left
/// waits for a later session), and the session may end (its sync states saved) or not.
fn sync(nodes: &mut [Node], uid: &Uid, from: usize, to: usize, rng: &mut Rng) {
    for i in [from, to] {
        let n = &mut nodes[i];
        n.mesh.publish(&mut n.engine).unwrap();
    }
    let ours = { let n = &mut nodes[from]; n.mesh.summary(&n.engine, uid).unwrap() };
    let theirs = { let n = &mut nodes[to]; n.mesh.summary(&n.engine, uid).unwrap() };
    let mut docs = alknet_actors::proto::sync::differing(&ours, &theirs);
    for i in (1..docs.len()).rev() {
        docs.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for doc in docs {
        for _ in 0..1 + rng.below(4) {
            if !round(nodes, uid, from, to, doc) {
                break;
            }
        }
    }
    if rng.below(3) == 0 {
        let (ida, idb) = (nodes[from].engine.tree().me(), nodes[to].engine.tree().me());
        { let n = &mut nodes[from]; n.mesh.end_session(&mut n.engine, &idb).unwrap(); }
        { let n = &mut nodes[to]; n.mesh.end_session(&mut n.engine, &ida).unwrap(); }
    }
}

/// Syncs every pair to completion.
fn sync_fully(nodes: &mut [Node], uid: &Uid, from: usize, to: usize) {
    for _ in 0..4 {
        for i in [from, to] {
            let n = &mut nodes[i];
            n.mesh.publish(&mut n.engine).unwrap();
        }
        let mut quiet = true;
        for doc in 0..alknet_actors::proto::sync::DOCS {
            for _ in 0..64 {
                if !round(nodes, uid, from, to, doc) {
                    break;
                }
                quiet = false;
            }
        }
        if quiet {
            return;
        }
    }
}

/// What a user compares: every live path with kind and content, per branch, and the listed
/// conflicts (path and losing version).
type Picture = BTreeMap<String, (Vec<(String, String, String)>, Vec<(String, String)>)>;

fn picture(engine: &Engine) -> Picture {
    let mut out = BTreeMap::new();
    for b in engine.tree().branches("default").unwrap() {
        let scope = Scope::new("default", &b.name);
        let tree = engine
            .walk(&scope, &p("/"))
            .unwrap()
            .iter()
            .map(|r| {
                let e = r.entry().unwrap();
                (r.path.to_string(), format!("{:?}", e.kind), e.hash.to_hex())
            })
            .collect();
        let mut conflicts: Vec<(String, String)> =
            engine.conflicts(&scope).unwrap().iter().map(|c| (c.path.clone(), c.loser.map(|l| l.to_string()).unwrap_or_default())).collect();
        conflicts.sort();
        out.insert(b.name.clone(), (tree, conflicts));
    }
    out
}

fn converge_all(nodes: &mut [Node], uid: &Uid, _rng: &mut Rng) {
    for _ in 0..2 {
        for from in 0..nodes.len() {
            for to in 0..nodes.len() {
                if from != to {
                    sync_fully(nodes, uid, from, to);
                }
            }
        }
    }
}

/// One random operation on one node; errors a user would see (no such file, …) are fine.
fn random_op(node: &mut Node, rng: &mut Rng, step: usize) {
    let branches: Vec<String> = node.engine.tree().branches("default").unwrap().into_iter().map(|b| b.name).collect();
    let branch = branches[rng.below(branches.len() as u64) as usize].clone();
    let scope = Scope::new("default", &branch);
    let dir = format!("/d{}", rng.below(3));
    let file = format!("{dir}/f{}", rng.below(4));
    let engine = &mut node.engine;
    let _ = match rng.below(10) {
        0..=3 => engine.put_reader(&scope, format!("{step}").as_bytes(), &p(&file), |_| {}).map(|_| ()),
        4 => engine.remove(&scope, &p(&file), false).map(|_| ()),
        5 => engine.remove(&scope, &p(&dir), true).map(|_| ()),
        6 => engine.rename(&scope, &p(&file), &p(&format!("{dir}/moved{}", rng.below(3)))).map(|_| ()),
        7 => engine.mkdir(&scope, &p(&format!("/m{}", rng.below(3))), true),
        8 if branches.len() < 3 => engine.create_branch(&main_scope(), &format!("b{step}"), None).map(|_| ()),
        _ => match branches.iter().find(|b| *b != &branch) {
            Some(other) => engine.merge(&scope, other, None).map(|_| ()),
            None => Ok(()),
        },
    };
}

#[test]
fn replicas_converge_whatever_the_order_of_delivery() {
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let (mut nodes, uid) = mesh(3);
        // Clocks apart: one 50 minutes behind, one a minute ahead (within the clock bound of an
        // hour: a version stamped further ahead than that waits, see `mesh.rs`).
        nodes[1].clock.advance(-3_000_000);
        nodes[2].clock.advance(60_000);
        for step in 0..60 {
            let n = rng.below(3) as usize;
            nodes[n].clock.advance(rng.below(3) as i64);
            if rng.below(4) == 0 {
                let (from, to) = (rng.below(3) as usize, rng.below(3) as usize);
                if from != to {
                    sync(&mut nodes, &uid, from, to, &mut rng);
                }
            } else {
                random_op(&mut nodes[n], &mut rng, step);
            }
        }
        converge_all(&mut nodes, &uid, &mut rng);
        let first = picture(&nodes[0].engine);
        for (i, node) in nodes.iter().enumerate().skip(1) {
            assert_eq!(picture(&node.engine), first, "seed {seed}: node {i} differs from node 0");
        }
        // Delivering everything again changes nothing.
        converge_all(&mut nodes, &uid, &mut rng);
        assert_eq!(picture(&nodes[0].engine), first, "seed {seed}: a repeated delivery changed node 0");
    }
}

#[test]
fn a_write_that_saw_another_wins_even_from_a_clock_an_hour_behind() {
    let mut rng = Rng(7);
    let (mut nodes, uid) = mesh(3);
    let s = main_scope();
    // A's clock runs an hour ahead of B's (and of everything B did before).
    nodes[0].clock.advance(3_600_000);
    put(&mut nodes[0].engine, &s, "/doc", b"from A");
    sync(&mut nodes, &uid, 0, 1, &mut rng);
    put(&mut nodes[1].engine, &s, "/doc", b"from B, an hour behind, after seeing A's");
    converge_all(&mut nodes, &uid, &mut rng);
    for (i, node) in nodes.iter().enumerate() {
        let head = node.engine.log(&s, &p("/doc")).unwrap().remove(0);
        assert_eq!(head.id().node, nodes[1].engine.tree().me(), "node {i}: B's write must be the head");
        assert!(node.engine.conflicts(&s).unwrap().is_empty(), "node {i}: B saw A's version: no conflict");
    }
}

#[test]
fn concurrent_writes_pick_one_winner_everywhere_and_list_the_loser_on_every_node() {
    let mut rng = Rng(11);
    let (mut nodes, uid) = mesh(3);
    let s = main_scope();
    put(&mut nodes[0].engine, &s, "/race", b"one");
    nodes[1].clock.advance(5);
    put(&mut nodes[1].engine, &s, "/race", b"two");
    // C hears of them in the opposite order from A and B.
    sync(&mut nodes, &uid, 1, 2, &mut rng);
    sync(&mut nodes, &uid, 0, 2, &mut rng);
    converge_all(&mut nodes, &uid, &mut rng);
    let b = nodes[1].engine.tree().me();
    for (i, node) in nodes.iter().enumerate() {
        let head = node.engine.log(&s, &p("/race")).unwrap().remove(0);
        assert_eq!(head.id().node, b, "node {i}: the later stamp (B's) wins");
        let conflicts = node.engine.conflicts(&s).unwrap();
        assert_eq!(conflicts.len(), 1, "node {i}: {conflicts:?}");
        assert_eq!(conflicts[0].path, "/race");
        assert_eq!(conflicts[0].loser.unwrap().node, nodes[0].engine.tree().me(), "node {i}: A's version lost");
        assert_eq!(conflicts[0].winner.unwrap(), head.id());
    }
    // The loser is restorable anywhere: C restores it; that restore saw both, so once it has
    // travelled nobody lists the conflict any more... but the listing is the user's to dismiss.
    let loser = nodes[2].engine.conflicts(&s).unwrap()[0].loser.unwrap();
    nodes[2].engine.restore(&s, &p("/race"), &VersionRef::parse(&loser.to_string()).unwrap()).unwrap();
    converge_all(&mut nodes, &uid, &mut rng);
    let picture0 = picture(&nodes[0].engine);
    for node in &nodes {
        assert_eq!(picture(&node.engine), picture0);
        let head = node.engine.log(&s, &p("/race")).unwrap().remove(0);
        assert_eq!(head.id().node, nodes[2].engine.tree().me(), "C's restore is the head everywhere");
    }
    // Dismissed on one node, it stays dismissed there when more versions arrive.
    nodes[0].engine.dismiss_conflicts(&s, None).unwrap();
    put(&mut nodes[1].engine, &s, "/other", b"x");
    converge_all(&mut nodes, &uid, &mut rng);
    assert!(nodes[0].engine.conflicts(&s).unwrap().is_empty());
}

#[test]
fn a_bucket_with_files_is_not_taken_over_by_a_join() {
    let (mut nodes, _) = mesh(2);
    let (_dir, mut other, _) = fresh_with_clock();
    put(&mut other, &main_scope(), "/mine", b"keep me");
    let shared = nodes[0].engine.bucket_identity("default").unwrap();
    let root = nodes[0].engine.branch_records("default").unwrap().remove(0);
    let err = other.adopt_bucket("default", &shared.uid, &root).unwrap_err().to_string();
    assert!(err.contains("--as"), "{err}");
    other.adopt_bucket("shared", &shared.uid, &root).unwrap();
    assert_eq!(common::get(&other, &main_scope(), "/mine").unwrap(), b"keep me");
    // The joined bucket took the sharer's identity and root branch.
    assert_eq!(other.bucket_identity("shared").unwrap().uid, shared.uid);
    assert_eq!(other.branch_records("shared").unwrap()[0].uid, root.uid);
    drop(nodes.pop());
}

#[test]
fn two_branches_made_at_once_under_one_name_both_survive_named_alike_everywhere() {
    let mut rng = Rng(5);
    let (mut nodes, uid) = mesh(2);
    for (i, node) in nodes.iter_mut().enumerate() {
        node.engine.create_branch(&main_scope(), "feat", None).unwrap();
        put(&mut node.engine, &Scope::new("default", "feat"), &format!("/from-{i}"), b"x");
    }
    converge_all(&mut nodes, &uid, &mut rng);
    let names = |n: &Node| {
        let mut v: Vec<String> = n.engine.tree().branches("default").unwrap().into_iter().map(|b| b.name).collect();
        v.sort();
        v
    };
    assert_eq!(names(&nodes[0]), names(&nodes[1]), "the same names on both nodes");
    let all = names(&nodes[0]);
    assert_eq!(all.len(), 3, "main and both feats: {all:?}");
    assert!(all.contains(&"feat".to_string()) && all.iter().any(|n| n.starts_with("feat~")), "{all:?}");
    // Neither branch lost its write.
    let files: Vec<String> = all
        .iter()
        .filter(|n| n.starts_with("feat"))
        .flat_map(|b| nodes[0].engine.walk(&Scope::new("default", b), &p("/")).unwrap().into_iter().map(|r| r.path.to_string()))
        .collect();
    assert!(files.contains(&"/from-0".to_string()) && files.contains(&"/from-1".to_string()), "{files:?}");
    assert_eq!(picture(&nodes[0].engine), picture(&nodes[1].engine));
}
