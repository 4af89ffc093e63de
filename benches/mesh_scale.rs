//! The mesh at scale (issue 7): a bucket of 1,000,000 paths shared between two stores, the
//! network replaced by function calls (the store's half of the mesh, as the node runs it,
//! on real SQLite files). Prints a table:
//!
//! | figure | measured as |
//! |---|---|
//! | one change's sync CPU | CPU time of this thread from the commit's publish on A, through every sync message both ways, until neither side has anything to say (p50 / max over 20 changes) |
//! | reconnecting an in-sync peer | both sides end the session (their sync states saved), then a new one: summaries exchanged and compared, nothing differs (warm: documents in memory; cold: the node just restarted) |
//!
//! Run with `cargo bench --bench mesh_scale`; `ALKFS_BENCH_PATHS=N` for another size.

use std::time::Instant;

use alknet_actors::content::Imported;
use alknet_actors::engine::import::file_entry;
use alknet_actors::engine::mesh::{Adoption, Mesh};
use alknet_actors::engine::{Access, CommitItem, Engine, Scope};
use alknet_actors::proto::entry::ContentHash;
use alknet_actors::proto::ids::{NodeId, Uid};
use alknet_actors::proto::path::TreePath;
use alknet_actors::proto::sync::differing;

struct Side {
    dir: std::path::PathBuf,
    engine: Engine,
    mesh: Mesh,
}

impl Side {
    fn new(dir: std::path::PathBuf) -> Side {
        Engine::init(&dir).unwrap();
        let engine = Engine::open(&dir, Access::Write).unwrap();
        let mesh = Mesh::new(&engine).unwrap();
        Side { dir, engine, mesh }
    }

    fn me(&self) -> NodeId {
        self.engine.tree().me()
    }

    /// Reopens the store: a node restart (documents and sync states read back from tree.db).
    fn restart(self) -> Side {
        let dir = self.dir;
        drop(self.engine);
        let engine = Engine::open(&dir, Access::Write).unwrap();
        let mesh = Mesh::new(&engine).unwrap();
        Side { dir, engine, mesh }
    }
}

/// CPU seconds this thread has used.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn item(i: usize, salt: u64) -> CommitItem {
    let bytes = [i.to_le_bytes(), salt.to_le_bytes()].concat();
    let blob = Imported { hash: ContentHash(*blake3::hash(&bytes).as_bytes()), size: bytes.len() as u64, inline: Some(bytes), hold: None };
    let path = TreePath::parse(&format!("/d{}/f{i}", i / 1000)).unwrap();
    let entry = file_entry(&blob, 0o644, 1_767_225_600_000);
    (path, entry, blob)
}

thread_local! {
    /// CPU seconds spent generating and receiving sync messages (a breakdown for the table).
    static SPLIT: std::cell::Cell<(f64, f64)> = const { std::cell::Cell::new((0.0, 0.0)) };
}

fn timed<T>(receive: bool, f: impl FnOnce() -> T) -> T {
    let c = thread_cpu();
    let out = f();
    let d = thread_cpu() - c;
    SPLIT.with(|s| {
        let (g, r) = s.get();
        s.set(if receive { (g, r + d) } else { (g + d, r) });
    });
    out
}

/// Sync messages both ways on `docs` until both are quiet. Returns (messages, bytes).
fn settle(a: &mut Side, b: &mut Side, uid: &Uid, docs: &[u16]) -> (usize, usize) {
    let (mut messages, mut bytes) = (0, 0);
    for &doc in docs {
        loop {
            // Each side speaks; the other answers while it has something to say.
            let (m1, b1) = speak(a, b, uid, doc);
            let (m2, b2) = speak(b, a, uid, doc);
            (messages, bytes) = (messages + m1 + m2, bytes + b1 + b2);
            if m1 + m2 == 0 {
                break;
            }
        }
    }
    (messages, bytes)
}

/// `x`'s next message on `doc` to `y`, if any, and the answers that follow (a store's answer
/// is made as it receives: its work is in the receive's time). Returns (messages, bytes).
fn speak(x: &mut Side, y: &mut Side, uid: &Uid, doc: u16) -> (usize, usize) {
    let (idx, idy) = (x.me(), y.me());
    let (mut messages, mut bytes) = (0, 0);
    let mut next = timed(false, || x.mesh.generate(&x.engine, &idy, uid, doc).unwrap()).map(|m| (true, m));
    while let Some((to_y, m)) = next.take() {
        (messages, bytes) = (messages + 1, bytes + m.len());
        let r = if to_y {
            timed(true, || y.mesh.receive(&mut y.engine, &idx, uid, doc, &m).unwrap())
        } else {
            timed(true, || x.mesh.receive(&mut x.engine, &idy, uid, doc, &m).unwrap())
        };
        next = r.answer.map(|a| (!to_y, a));
    }
    (messages, bytes)
}

/// Every document, the bucket's own first (as a session's summaries order them).
fn all_docs() -> Vec<u16> {
    let digests = vec![0; alknet_actors::proto::sync::DOCS as usize];
    differing(&digests, &[])
}

fn main() {
    let paths: usize = std::env::var("ALKFS_BENCH_PATHS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let root = tempfile::tempdir().unwrap();
    let scope = Scope::new("default", "main");
    let mut a = Side::new(root.path().join("a"));
    let mut b = Side::new(root.path().join("b"));
    let t = Instant::now();
    for start in (0..paths).step_by(10_000) {
        let items: Vec<CommitItem> = (start..(start + 10_000).min(paths)).map(|i| item(i, 0)).collect();
        a.engine.commit_entries(&scope, &items).unwrap();
    }
    let write_s = t.elapsed().as_secs_f64();
    // B joins A's bucket.
    let t = Instant::now();
    let (uid, secret) = a.mesh.invite(&mut a.engine, "default", (3_600_000, 1, alknet_actors::proto::membership::Role::Writer), &[]).unwrap();
    let (name, root_branch) = a.mesh.admit(&mut a.engine, &uid, &secret, &b.me(), &[]).unwrap().unwrap();
    b.mesh.adopt(&mut b.engine, &Adoption { name, bucket: uid, root: root_branch, inviter: a.me(), inviter_addrs: vec![], my_addrs: vec![] }).unwrap();
    a.mesh.publish(&mut a.engine).unwrap();
    let share_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (messages, bytes) = settle(&mut a, &mut b, &uid, &all_docs());
    let first_s = t.elapsed().as_secs_f64();
    let walked = b.engine.walk(&scope, &TreePath::parse("/").unwrap()).unwrap().len();
    assert!(walked >= paths, "B has {walked} of {paths} paths");
    println!("| figure ({paths} paths, 64 shards) | measured |");
    println!("|---|---|");
    println!("| writing them on A (engine, 10,000 per commit) | {write_s:.1} s |");
    println!("| sharing the bucket: invite, admit, adopt (A's documents built from its tree) | {share_s:.1} s |");
    println!("| first sync to B (every version applied to B's tree) | {first_s:.1} s, {messages} messages, {:.1} MiB |", bytes as f64 / (1 << 20) as f64);
    // One change at a time.
    let mut cpu = Vec::new();
    let mut wall = Vec::new();
    let changes: usize = std::env::var("ALKFS_BENCH_CHANGES").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    // With a memory budget for documents (ALKFS_BENCH_DOC_MIB), kept as the node keeps it:
    // trimmed after every operation.
    let budget: Option<usize> = std::env::var("ALKFS_BENCH_DOC_MIB").ok().and_then(|v| v.parse::<usize>().ok()).map(|m| m << 20);
    if let Some(bytes) = budget {
        for side in [&mut a, &mut b] {
            side.mesh.set_doc_budget(bytes);
            side.mesh.trim();
        }
    }
    eprintln!("changes start");
    SPLIT.with(|s| s.set((0.0, 0.0)));
    let mut publish_cpu = 0.0;
    for i in 0..changes {
        let items = vec![item(i * 7919 % paths, 1 + i as u64)];
        a.engine.commit_entries(&scope, &items).unwrap();
        let (c0, t0) = (thread_cpu(), Instant::now());
        let published = a.mesh.publish(&mut a.engine).unwrap();
        publish_cpu += thread_cpu() - c0;
        let docs: Vec<u16> = published.changed.iter().map(|(_, d)| *d).collect();
        settle(&mut a, &mut b, &uid, &docs);
        if budget.is_some() {
            a.mesh.trim();
            b.mesh.trim();
        }
        cpu.push((thread_cpu() - c0) * 1000.0);
        wall.push(t0.elapsed().as_secs_f64() * 1000.0);
        let entry = b.engine.file_entry(&scope, &items[0].0).unwrap();
        assert_eq!(entry.hash, items[0].1.hash, "the change reached B");
    }
    let (gen_cpu, recv_cpu) = SPLIT.with(|s| s.get());
    let per = |x: f64| x * 1000.0 / changes as f64;
    cpu.sort_by(|x, y| x.partial_cmp(y).unwrap());
    wall.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let with = budget.map(|b| format!(", documents kept to {} MiB a side", b >> 20)).unwrap_or_default();
    println!("| one change's sync CPU, A's publish to B applied and both quiet ({changes} changes{with}) | p50 {:.1} ms, max {:.1} ms (wall p50 {:.1} ms) |", cpu[changes / 2], cpu[changes - 1], wall[changes / 2]);
    println!("| ... of which, per change: publish on A; generating messages; receiving them | {:.1} ms; {:.1} ms; {:.1} ms |", per(publish_cpu), per(gen_cpu), per(recv_cpu));
    // Reconnecting an in-sync peer.
    let reconnect = |a: &mut Side, b: &mut Side| -> (f64, usize) {
        let t = Instant::now();
        let ours = a.mesh.summary(&a.engine, &uid).unwrap();
        let theirs = b.mesh.summary(&b.engine, &uid).unwrap();
        let diff = differing(&ours, &theirs);
        let (messages, _) = settle(a, b, &uid, &diff);
        (t.elapsed().as_secs_f64() * 1000.0, messages)
    };
    let (ida, idb) = (a.me(), b.me());
    a.mesh.end_session(&mut a.engine, &idb).unwrap();
    b.mesh.end_session(&mut b.engine, &ida).unwrap();
    let (warm_ms, warm_msgs) = reconnect(&mut a, &mut b);
    a.mesh.end_session(&mut a.engine, &idb).unwrap();
    b.mesh.end_session(&mut b.engine, &ida).unwrap();
    let (mut a, mut b) = (a.restart(), b.restart());
    let (cold_ms, cold_msgs) = reconnect(&mut a, &mut b);
    println!("| reconnecting an in-sync peer, documents in memory | {warm_ms:.1} ms ({warm_msgs} sync messages) |");
    println!("| reconnecting an in-sync peer, both nodes just restarted | {cold_ms:.1} ms ({cold_msgs} sync messages) |");
    // What the documents take in memory against their saved size: every document of both
    // sides loaded (a sync of each), the process's resident memory before and after.
    for side in [&mut a, &mut b] {
        side.mesh.set_doc_budget(usize::MAX);
    }
    let before = heap_mib();
    let t = Instant::now();
    settle(&mut a, &mut b, &uid, &all_docs());
    let load_s = t.elapsed().as_secs_f64();
    let after = heap_mib();
    let (docs, est) = (a.mesh.docs_in_memory().0 + b.mesh.docs_in_memory().0, a.mesh.docs_in_memory().1 + b.mesh.docs_in_memory().1);
    let saved_mib = est as f64 / alknet_actors::engine::doc_cache::MEMORY_PER_SAVED_BYTE as f64 / (1 << 20) as f64;
    println!(
        "| every document of both sides loaded ({docs}) | {load_s:.1} s; heap in use {before:.0} → {after:.0} MiB: {:.0} MiB for {saved_mib:.0} MiB saved ({:.1} bytes a saved byte) |",
        after - before,
        (after - before) / saved_mib.max(0.001)
    );
}

/// The heap this process has in use (allocated, not freed), MiB: what the documents take,
/// where the resident size keeps what earlier ones freed.
fn heap_mib() -> f64 {
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as f64 / (1 << 20) as f64
}
