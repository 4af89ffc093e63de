//! Figures of the mesh (issue 7), measured with real `alkfs` nodes on 127.0.0.1 (relays off),
//! printed as a table. Run with `cargo bench --bench mesh`; `ALKFS_BENCH_QUICK=1` for a smoke
//! run with small sizes.
//!
//! | figure | measured as |
//! |---|---|
//! | 10,000 × 4 KiB written on A, all readable on B | from B's join to every file's bytes on B (`blobs_missing` 0, all entries listed) |
//! | one 1 GiB file A→B | from the write on A to its bytes on B; MiB/s |
//! | a one-file change on A readable on B | p50 / p99 over 200 changes, polled through B's store |
//! | an idle node with two connected peers | CPU over 30 s, % of one core |
//!
//! The baselines (iroh-docs, Syncthing, a raw iroh-blobs transfer) are separate harnesses in
//! ../shared/bench; BENCHMARKS.md puts their figures from the same session beside these.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ALKFS: &str = env!("CARGO_BIN_EXE_alkfs");

fn quick() -> bool {
    std::env::var_os("ALKFS_BENCH_QUICK").is_some()
}

fn alkfs(data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(ALKFS).arg("--data").arg(data).args(args).env("ALKFS_NET_LISTEN", "127.0.0.1:0").env("ALKFS_NET_RELAY", "disabled").output().unwrap()
}

fn ok(data: &Path, args: &[&str]) -> String {
    let out = alkfs(data, args);
    assert!(out.status.success(), "alkfs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

struct Node {
    child: Child,
    data: PathBuf,
}

impl Node {
    fn start(data: &Path) -> Node {
        ok(data, &["init"]);
        let log = std::fs::File::create(data.with_extension("log")).unwrap();
        let child = Command::new(ALKFS)
            .arg("--data")
            .arg(data)
            .args(["node", "run", "--listen", "127.0.0.1:0", "--relay", "disabled"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let node = Node { child, data: data.to_path_buf() };
        wait(Duration::from_secs(30), || alkfs(data, &["status"]).status.success());
        node
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&ok(&self.data, &["status", "--json"])).unwrap()
    }

    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn wait(limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `len` bytes that differ for every `i` (so every file is its own blob).
fn payload(i: usize, len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = (0..len).map(|j| ((i as u64 * 7919 + j as u64 * 31) % 251) as u8).collect();
    out[..8].copy_from_slice(&(i as u64).to_le_bytes());
    out
}

/// Files written on A (as one `put -r`), then B joins: seconds until every file's bytes are on B.
fn many_small(root: &Path, n: usize) -> f64 {
    let (a_dir, b_dir) = (root.join("a"), root.join("b"));
    let a = Node::start(&a_dir);
    let src = root.join("src");
    for i in 0..n {
        let d = src.join(format!("d{}", i / 100));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i}")), payload(i, 4096)).unwrap();
    }
    ok(&a_dir, &["put", "-r", src.to_str().unwrap(), "/data"]);
    let b = Node::start(&b_dir);
    let ticket = ok(&a_dir, &["invite"]);
    let t = Instant::now();
    ok(&b_dir, &["join", ticket.trim()]);
    let want = n + n.div_ceil(100) + 1; // files, their directories, /data
    wait(Duration::from_secs(600), || {
        let st = b.status();
        st["blobs_missing"] == 0 && st["blob_count"].as_u64().unwrap_or(0) >= n as u64 && ok(&b_dir, &["ls", "-R", "/"]).lines().count() >= want
    });
    let secs = t.elapsed().as_secs_f64();
    drop((a, b));
    secs
}

/// One large file written on A after B joined: seconds until its bytes are on B.
fn one_large(root: &Path, len: usize) -> f64 {
    let (a_dir, b_dir) = (root.join("a"), root.join("b"));
    let a = Node::start(&a_dir);
    let b = Node::start(&b_dir);
    ok(&b_dir, &["join", ok(&a_dir, &["invite"]).trim()]);
    let src = root.join("big");
    let mut f = std::fs::File::create(&src).unwrap();
    let chunk = payload(1, 1 << 20);
    for _ in 0..len >> 20 {
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
    drop(f);
    let t = Instant::now();
    ok(&a_dir, &["put", src.to_str().unwrap(), "/big"]);
    wait(Duration::from_secs(600), || {
        let st = b.status();
        st["blob_count"].as_u64().unwrap_or(0) >= 1 && st["blobs_missing"] == 0
    });
    let secs = t.elapsed().as_secs_f64();
    drop((a, b));
    secs
}

/// One-file changes on A, each polled for on B until readable: (p50, p99) in ms.
fn change_latency(root: &Path, n: usize) -> (f64, f64, Node, Node, Node) {
    let (a_dir, b_dir, c_dir) = (root.join("a"), root.join("b"), root.join("c"));
    let (a, b, c) = (Node::start(&a_dir), Node::start(&b_dir), Node::start(&c_dir));
    ok(&b_dir, &["join", ok(&a_dir, &["invite"]).trim()]);
    ok(&c_dir, &["join", ok(&a_dir, &["invite"]).trim()]);
    std::thread::sleep(Duration::from_secs(3));
    let reader = rusqlite::Connection::open(b_dir.join("tree.db")).unwrap();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!("change {i}");
        let hash = blake3::hash(body.as_bytes());
        let t = Instant::now();
        let mut child = Command::new(ALKFS).arg("--data").arg(&a_dir).args(["put", "-", "/latency.txt"]).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        // Readable on B: the version is there and its bytes are too.
        wait(Duration::from_secs(30), || {
            reader
                .query_row("SELECT present FROM blob WHERE hash = ?1", [hash.as_bytes().to_vec()], |r| r.get::<_, i64>(0))
                .map(|p| p == 1)
                .unwrap_or(false)
        });
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (p(0.5), p(0.99), a, b, c)
}

fn main() {
    let root = tempfile::tempdir().unwrap();
    let (n_small, big, changes, idle_secs) = if quick() { (500, 64 << 20, 20, 5) } else { (10_000, 1 << 30, 200, 30) };
    println!("| figure | measured |");
    println!("|---|---|");
    // ALKFS_BENCH_ONLY=small runs the first figure alone (while working on it).
    let only_small = std::env::var("ALKFS_BENCH_ONLY").is_ok_and(|v| v == "small");
    let r1 = root.path().join("small");
    std::fs::create_dir_all(&r1).unwrap();
    let secs = many_small(&r1, n_small);
    println!("| {n_small} × 4 KiB written on A, all readable on B after B joins | {secs:.2} s ({:.0} files/s) |", n_small as f64 / secs);
    if only_small {
        return;
    }
    let r2 = root.path().join("large");
    std::fs::create_dir_all(&r2).unwrap();
    let secs = one_large(&r2, big);
    println!("| one {} MiB file A→B (write on A to bytes on B) | {secs:.2} s ({:.0} MiB/s) |", big >> 20, (big >> 20) as f64 / secs);
    let r3 = root.path().join("latency");
    std::fs::create_dir_all(&r3).unwrap();
    let (p50, p99, a, b, c) = change_latency(&r3, changes);
    println!("| a one-file change on A readable on B ({changes} changes) | p50 {p50:.0} ms, p99 {p99:.0} ms |");
    // Idle: A with two connected peers, nothing written.
    std::thread::sleep(Duration::from_secs(2));
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = a.cpu_ticks();
    std::thread::sleep(Duration::from_secs(idle_secs));
    let pct = (a.cpu_ticks() - before) as f64 / hz / idle_secs as f64 * 100.0;
    println!("| an idle node with two connected peers ({idle_secs} s) | {pct:.2} % of a core |");
    drop((a, b, c));
}
