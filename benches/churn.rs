//! Churn (issue 22, bounded storage): writes over and over to few paths of a bucket shared
//! between two stores (the network replaced by function calls, the store's half of the mesh
//! as the node runs it, on real SQLite files), compacted by epochs as the node's tick would
//! (`Mesh::compaction_due`, both sides at the same heads after each round). Prints a table:
//! the shards' saved size at the end against a fresh bucket holding the same live entries,
//! the largest it reached, and the same churn without compaction (today's build before
//! epochs) as the baseline.
//!
//! Run with `cargo bench --bench churn`; `ALKFS_BENCH_WRITES=N` (1,000,000) writes to
//! `ALKFS_BENCH_PATHS=N` (1,000) paths, `ALKFS_BENCH_BASELINE=0` to skip the baseline.

use std::time::Instant;

use alknet_actors::content::Imported;
use alknet_actors::engine::compaction::shard_bytes;
use alknet_actors::engine::import::file_entry;
use alknet_actors::engine::mesh::{Adoption, Mesh};
use alknet_actors::engine::{Access, CommitItem, Engine, Scope};
use alknet_actors::proto::entry::ContentHash;
use alknet_actors::proto::ids::{NodeId, Uid};
use alknet_actors::proto::path::TreePath;
use alknet_actors::proto::sync::differing;

struct Side {
    engine: Engine,
    mesh: Mesh,
}

impl Side {
    fn new(dir: std::path::PathBuf) -> Side {
        Engine::init(&dir).unwrap();
        let engine = Engine::open(&dir, Access::Write).unwrap();
        let mesh = Mesh::new(&engine).unwrap();
        Side { engine, mesh }
    }

    fn me(&self) -> NodeId {
        self.engine.tree().me()
    }

    fn shard_bytes(&self, uid: &Uid) -> u64 {
        let bucket = self.engine.bucket_by_uid(uid).unwrap().unwrap();
        shard_bytes(self.engine.tree().conn(), bucket.id).unwrap()
    }
}

/// Write `round` of path `i`: a small inline file.
fn item(i: usize, round: u64) -> CommitItem {
    let bytes = [i.to_le_bytes(), round.to_le_bytes()].concat();
    let blob = Imported { hash: ContentHash(*blake3::hash(&bytes).as_bytes()), size: bytes.len() as u64, inline: Some(bytes), hold: None };
    let path = TreePath::parse(&format!("/d{}/f{i}", i / 100)).unwrap();
    (path, file_entry(&blob, 0o644, 1_767_225_600_000), blob)
}

/// A bucket on `a` shared with `b`.
fn share(a: &mut Side, b: &mut Side) -> Uid {
    let (uid, secret) = a.mesh.invite(&mut a.engine, "default", (3_600_000, 1, alknet_actors::proto::membership::Role::Writer), &[]).unwrap();
    let (name, root) = a.mesh.admit(&mut a.engine, &uid, &secret, &b.me(), &[]).unwrap().unwrap();
    b.mesh.adopt(&mut b.engine, &Adoption { name, bucket: uid, root, inviter: a.me(), inviter_addrs: vec![], my_addrs: vec![] }).unwrap();
    uid
}

/// Publishes everything committed on both (a round reads one batch of the outbox), then sync
/// messages both ways on every document that differs until both are quiet.
fn settle(a: &mut Side, b: &mut Side, uid: &Uid) {
    for s in [&mut *a, &mut *b] {
        while s.mesh.publish(&mut s.engine).unwrap().events > 0 {}
    }
    let ours = a.mesh.summary(&a.engine, uid).unwrap();
    let theirs = b.mesh.summary(&b.engine, uid).unwrap();
    for doc in differing(&ours, &theirs) {
        loop {
            let quiet_a = speak(a, b, uid, doc);
            let quiet_b = speak(b, a, uid, doc);
            if quiet_a && quiet_b {
                break;
            }
        }
    }
}

fn speak(x: &mut Side, y: &mut Side, uid: &Uid, doc: u16) -> bool {
    let (idx, idy) = (x.me(), y.me());
    let Some(m) = x.mesh.generate(&x.engine, &idy, uid, doc).unwrap() else { return true };
    let mut next = Some((true, m));
    while let Some((to_y, m)) = next.take() {
        let r = if to_y { y.mesh.receive(&mut y.engine, &idx, uid, doc, &m).unwrap() } else { x.mesh.receive(&mut x.engine, &idy, uid, doc, &m).unwrap() };
        next = r.answer.map(|a| (!to_y, a));
    }
    false
}

/// Churns `writes` versions over `paths` paths on `a`, `batch` paths a commit, settling
/// with `b` every `round` writes and compacting as the node would when `compact`. Returns
/// (final shard bytes on a, on b, largest on a, epochs, seconds).
fn churn(a: &mut Side, b: &mut Side, uid: &Uid, (writes, paths): (usize, usize), compact: bool) -> (u64, u64, u64, u32, f64) {
    let scope = Scope::new("default", "main");
    // A round's operations (commits) reach the other side whole before they are applied; a
    // round well under the bound on what waits (`store::waiting`) keeps them all in it.
    let (batch, round) = (100, 2_000);
    let t = Instant::now();
    let (mut largest, mut epochs) = (0u64, 0u32);
    let mut done = 0;
    while done < writes {
        let n = batch.min(writes - done);
        let items: Vec<CommitItem> = (done..done + n).map(|w| item(w % paths, (w / paths) as u64 + 1)).collect();
        a.engine.commit_entries(&scope, &items).unwrap();
        done += n;
        if done % round == 0 || done == writes {
            settle(a, b, uid);
            largest = largest.max(a.shard_bytes(uid));
            if compact && a.mesh.compaction_due(&a.engine, uid).unwrap() {
                // Both sides hold the same heads (just settled): what the node's tick checks.
                assert_eq!(a.mesh.summary(&a.engine, uid).unwrap(), b.mesh.summary(&b.engine, uid).unwrap());
                let base = a.mesh.compact(&mut a.engine, uid).unwrap();
                b.mesh.take_epoch(&mut b.engine, uid, &base).unwrap();
                epochs = base.epoch;
            }
            if done % (round * 50) == 0 {
                eprintln!("{done} writes, shards {} KiB, epoch {epochs}, {:.0} s", a.shard_bytes(uid) >> 10, t.elapsed().as_secs_f64());
            }
        }
    }
    (a.shard_bytes(uid), b.shard_bytes(uid), largest, epochs, t.elapsed().as_secs_f64())
}

fn main() {
    let writes: usize = std::env::var("ALKFS_BENCH_WRITES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let paths: usize = std::env::var("ALKFS_BENCH_PATHS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let baseline = std::env::var("ALKFS_BENCH_BASELINE").map(|v| v != "0").unwrap_or(true);
    let root = tempfile::tempdir().unwrap();
    let scope = Scope::new("default", "main");
    // A fresh bucket holding what the churn leaves live: each path's last write.
    let fresh = {
        let (mut a, mut b) = (Side::new(root.path().join("fa")), Side::new(root.path().join("fb")));
        let items: Vec<CommitItem> = (0..paths).map(|i| item(i, 0)).collect();
        a.engine.commit_entries(&scope, &items).unwrap();
        let uid = share(&mut a, &mut b);
        settle(&mut a, &mut b, &uid);
        a.shard_bytes(&uid)
    };
    let run = |name: &str, compact: bool| {
        let (mut a, mut b) = (Side::new(root.path().join(format!("{name}a"))), Side::new(root.path().join(format!("{name}b"))));
        let uid = share(&mut a, &mut b);
        let out = churn(&mut a, &mut b, &uid, (writes, paths), compact);
        let tree = |s: &Side| s.engine.walk(&scope, &TreePath::parse("/").unwrap()).unwrap().into_iter().map(|r| (r.path.to_string(), r.key)).collect::<Vec<_>>();
        assert_eq!(tree(&a), tree(&b), "both sides show the same tree");
        out
    };
    let (ea, eb, largest, epochs, secs) = run("c", true);
    println!("| churn: {writes} writes to {paths} paths, two members | measured |");
    println!("|---|---|");
    println!("| a fresh bucket of the same {paths} live entries, shards saved | {} KiB |", fresh >> 10);
    println!("| with epochs: shards saved at the end (A; B) | {} KiB; {} KiB = {:.1}x fresh, after {epochs} epochs ({secs:.0} s) |", ea >> 10, eb >> 10, ea as f64 / fresh as f64);
    println!("| with epochs: the largest the shards reached | {} KiB = {:.1}x fresh |", largest >> 10, largest as f64 / fresh as f64);
    if baseline {
        let (na, _, _, _, nsecs) = run("n", false);
        println!("| without epochs (the build before them): shards saved at the end | {} KiB = {:.1}x fresh ({nsecs:.0} s); with epochs {:.0}x smaller |", na >> 10, na as f64 / fresh as f64, na as f64 / ea as f64);
    }
}
