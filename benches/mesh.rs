//! Figures of the mesh (issue 7), measured with real `alkfs` nodes on 127.0.0.1 (relays off),
//! each beside its baselines in the same run, alternating, and printed as a table of medians.
//! Run with `cargo bench --bench mesh`; `ALKFS_BENCH_QUICK=1` for a smoke run with small
//! sizes, `ALKFS_BENCH_ROUNDS=N` rounds, `ALKFS_BENCH_ONLY=small,large,latency,idle,repeat,attack`;
//! `ALKFS_BASELINE_BIN=/path/to/an/older/alkfs` adds that build's small-files sync, alternating,
//! and its fan-out (`fanout`: `ALKFS_BENCH_NODES` nodes in a full mesh, default 5 and 10).
//!
//! | figure | measured as |
//! |---|---|
//! | 10,000 × 4 KiB on A, all on B | A has written and indexed them; from B's join until B holds every blob and lists every file |
//! | ... repeated (`repeat`) | the same for `ALKFS_BENCH_REPEAT` (100) fresh joiners of one A: how many complete |
//! | one 1 GiB file A→B | the same from B's join; and from the write on A with B already joined |
//! | a one-file change on A readable on B | p50 / p99 over 200 changes, polled through B's store |
//! | an idle node with two connected peers | CPU over 30 s, % of one core |
//! | fan-out (`fanout`) | N nodes in a full mesh, one-file writes on each in turn: sync frames received per write and the share that brought nothing (`status --json`), each write until readable on every other node, then each node's idle CPU |
//! | a one-file change under attack (`attack`) | p50 / p99 A→B while 500 strangers and a hostile member hammer A, against the same quiet; A's RSS growth |
//!
//! Baselines: a raw iroh-blobs transfer of the same bytes (here: both stores in this process,
//! and A's in a second copy of this binary); iroh-docs (`ALKFS_BENCH_IROH_DOCS`, the
//! ../shared/bench/iroh-docs-baseline binary, `import` mode) and Syncthing
//! (`ALKFS_BENCH_SYNCTHING`, ../shared/bench/syncthing-baseline.sh) when given.

#[path = "attack/mod.rs"]
mod attack;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The build under test: this one, or for a baseline round `ALKFS_BASELINE_BIN`.
static BIN: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn bin() -> String {
    BIN.lock().unwrap().clone().unwrap_or_else(|| env!("CARGO_BIN_EXE_alkfs").to_string())
}

/// Runs `f` with the older build `other` as the build under test.
fn with_bin<T>(other: &str, f: impl FnOnce() -> T) -> T {
    *BIN.lock().unwrap() = Some(other.to_string());
    let out = f();
    *BIN.lock().unwrap() = None;
    out
}

fn quick() -> bool {
    std::env::var_os("ALKFS_BENCH_QUICK").is_some()
}

fn alkfs(data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin()).arg("--data").arg(data).args(args).env("ALKFS_NET_LISTEN", "127.0.0.1:0").env("ALKFS_NET_RELAY", "disabled").output().unwrap()
}

fn ok(data: &Path, args: &[&str]) -> String {
    let out = alkfs(data, args);
    assert!(out.status.success(), "alkfs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

struct Node {
    child: Child,
}

impl Node {
    fn start(data: &Path) -> Node {
        ok(data, &["init"]);
        let log = std::fs::File::create(data.with_extension("log")).unwrap();
        let child = Command::new(bin())
            .arg("--data")
            .arg(data)
            .args(["node", "run", "--listen", "127.0.0.1:0", "--relay", "disabled"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let node = Node { child };
        wait(Duration::from_secs(30), || alkfs(data, &["status"]).status.success());
        node
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

/// Blobs A's store has not yet indexed into iroh-blobs (read from its tree.db).
fn unindexed(data: &Path) -> i64 {
    let db = rusqlite::Connection::open_with_flags(data.join("tree.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    db.query_row("SELECT count(*) FROM blob WHERE indexed = 0", [], |r| r.get(0)).unwrap()
}

/// Waits until every blob of `data` is indexed (what iroh-docs' writer has by construction:
/// it writes through iroh-blobs).
fn wait_indexed(data: &Path) {
    wait(Duration::from_secs(600), || unindexed(data) == 0);
}

/// Waits until B holds the bytes of at least `blobs` blobs and misses none, then until
/// `ls -R /` lists `entries` lines: every file listed and readable. The polling reads B's
/// tree.db (cheap, no process per poll) and lists once at the end.
fn wait_complete(b_dir: &Path, blobs: i64, entries: usize) {
    let db = rusqlite::Connection::open_with_flags(b_dir.join("tree.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let end = Instant::now() + Duration::from_secs(600);
    loop {
        let (present, missing): (i64, i64) = db
            .query_row("SELECT coalesce(sum(present = 1), 0), coalesce(sum(present = 0), 0) FROM blob", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap_or((0, 1));
        if present >= blobs && missing == 0 && ok(b_dir, &["ls", "-R", "/"]).lines().count() >= entries {
            return;
        }
        assert!(Instant::now() < end, "B never completed: {present} blobs present, {missing} missing");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The small-files source tree: `n` files of 4 KiB, 100 per directory (the layout the
/// baselines use).
fn small_tree(root: &Path, n: usize) -> PathBuf {
    let src = root.join("src");
    if !src.exists() {
        for i in 0..n {
            let d = src.join(format!("d{}", i / 100));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(format!("f{i}")), payload(i, 4096)).unwrap();
        }
    }
    src
}

/// A has the files (one `put -r`, indexed); B joins: seconds until every file is on B.
fn many_small(root: &Path, n: usize) -> f64 {
    many_small_cpu(root, n).0
}

/// [`many_small`], and the CPU both nodes spent from the join until B was complete (s).
fn many_small_cpu(root: &Path, n: usize) -> (f64, f64) {
    let _ = std::fs::remove_dir_all(root.join("a"));
    let _ = std::fs::remove_dir_all(root.join("b"));
    let (a_dir, b_dir) = (root.join("a"), root.join("b"));
    let a = Node::start(&a_dir);
    let src = small_tree(root, n);
    ok(&a_dir, &["put", "-r", src.to_str().unwrap(), "/data"]);
    wait_indexed(&a_dir);
    let b = Node::start(&b_dir);
    let ticket = ok(&a_dir, &["invite"]);
    let t = Instant::now();
    let ticks = a.cpu_ticks() + b.cpu_ticks();
    ok(&b_dir, &["join", ticket.trim()]);
    wait_complete(&b_dir, n as i64, n + n.div_ceil(100) + 1); // files, their directories, /data
    let secs = t.elapsed().as_secs_f64();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (a.cpu_ticks() + b.cpu_ticks() - ticks) as f64 / hz;
    drop((a, b));
    (secs, cpu)
}

/// The fetch scheduler's CPU (s) for a join of `n` pending blobs, driven as the mesh actor
/// drives it: every blob added (as the join's messages name them), batches handed out and
/// landed as they come back, and once per `per_sec` blobs landed (a second of transfer) a
/// tick with the mesh's idle check and the counts `status` reads.
fn scheduler_cpu(n: usize, per_sec: usize) -> f64 {
    use alknet_actors::node::fetch::{Attempt, Fetches};
    use alknet_actors::proto::entry::ContentHash;
    use alknet_actors::proto::ids::NodeId;
    let peers = [NodeId([1; 32])];
    let hash = |i: usize| ContentHash(*blake3::hash(&i.to_le_bytes()).as_bytes());
    let hashes: Vec<ContentHash> = (0..n).map(hash).collect();
    let c0 = own_cpu_s();
    let mut f = Fetches::default();
    for h in &hashes {
        f.add(*h, 4096, &peers, false);
    }
    let (mut landed, mut since_tick, mut now) = (0, 0, Instant::now());
    loop {
        let mut batches = Vec::new();
        while let Some(b) = f.next_batch() {
            batches.push(b);
        }
        if batches.is_empty() {
            break;
        }
        for (peer, asked) in batches {
            let got = asked.len();
            let attempt = Attempt { peer, landed: asked.iter().map(|(h, _)| *h).collect(), received: got, asked, error: None };
            f.finished(&[attempt], now);
            landed += got;
            since_tick += got;
            if since_tick >= per_sec {
                since_tick = 0;
                now += Duration::from_secs(1);
                std::hint::black_box(f.is_idle());
                f.tick(&peers, now);
                std::hint::black_box(f.counts());
            }
        }
    }
    assert_eq!(landed, n);
    own_cpu_s() - c0
}

/// "100 of 100 runs complete": A holds `n` files; `runs` fresh nodes join it one after
/// another, each must get everything within the limit. Returns each run's seconds.
fn repeated_small(root: &Path, n: usize, runs: usize) -> Vec<f64> {
    let a_dir = root.join("a");
    let a = Node::start(&a_dir);
    let src = small_tree(root, n);
    ok(&a_dir, &["put", "-r", src.to_str().unwrap(), "/data"]);
    wait_indexed(&a_dir);
    let mut out = Vec::new();
    for run in 0..runs {
        let b_dir = root.join(format!("b{run}"));
        let b = Node::start(&b_dir);
        let t = Instant::now();
        ok(&b_dir, &["join", ok(&a_dir, &["invite"]).trim()]);
        wait_complete(&b_dir, n as i64, n + n.div_ceil(100) + 1);
        out.push(t.elapsed().as_secs_f64());
        eprintln!("run {}/{runs}: {:.2} s", run + 1, out[run]);
        drop(b);
        std::fs::remove_dir_all(&b_dir).unwrap();
    }
    drop(a);
    out
}

fn big_file(root: &Path, len: usize) -> PathBuf {
    let src = root.join("big");
    if !src.exists() {
        let mut f = std::fs::File::create(&src).unwrap();
        for i in 0..len >> 20 {
            std::io::Write::write_all(&mut f, &payload(i, 1 << 20)).unwrap();
        }
    }
    src
}

/// One large file: `import` = A has it (indexed), then B joins, timed from the join (what
/// iroh-docs' import mode times); otherwise B has joined and the time runs from the write on A.
fn one_large(root: &Path, len: usize, import: bool) -> f64 {
    let _ = std::fs::remove_dir_all(root.join("a"));
    let _ = std::fs::remove_dir_all(root.join("b"));
    let (a_dir, b_dir) = (root.join("a"), root.join("b"));
    let src = big_file(root, len);
    let a = Node::start(&a_dir);
    let b = Node::start(&b_dir);
    let t;
    if import {
        ok(&a_dir, &["put", src.to_str().unwrap(), "/big"]);
        wait_indexed(&a_dir);
        t = Instant::now();
        ok(&b_dir, &["join", ok(&a_dir, &["invite"]).trim()]);
    } else {
        ok(&b_dir, &["join", ok(&a_dir, &["invite"]).trim()]);
        t = Instant::now();
        ok(&a_dir, &["put", src.to_str().unwrap(), "/big"]);
    }
    wait_complete(&b_dir, 1, 1);
    let secs = t.elapsed().as_secs_f64();
    drop((a, b));
    secs
}

/// The raw baseline: the same bytes as one iroh-blobs transfer between two file stores on
/// loopback, endpoints bound the way the node binds its own (relays off). A has imported the
/// file beforehand; timed from B's connect to the blob complete in B's store, and, with
/// `land`, on to what the node does after a transfer: the blob exported into a file of its
/// own (by reference) and fsynced.
fn raw_blobs(root: &Path, len: usize, land: bool) -> f64 {
    use alknet_actors::node::mesh::{bind, NetConfig};
    let src = std::path::absolute(big_file(root, len)).unwrap();
    let dir = root.join("raw");
    let _ = std::fs::remove_dir_all(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let cfg = NetConfig { listen: "127.0.0.1:0".parse().unwrap(), relay: None, eager_fetch: true };
        let a_store = iroh_blobs::store::fs::FsStore::load(dir.join("a")).await.unwrap();
        let b_store = iroh_blobs::store::fs::FsStore::load(dir.join("b")).await.unwrap();
        let a = bind(iroh::SecretKey::generate(), &cfg).await.unwrap();
        let b = bind(iroh::SecretKey::generate(), &cfg).await.unwrap();
        let router = iroh::protocol::Router::builder(a.endpoint.clone()).accept(iroh_blobs::ALPN, iroh_blobs::BlobsProtocol::new(&a_store, None)).spawn();
        let opts = iroh_blobs::api::blobs::AddPathOptions { path: src, format: iroh_blobs::BlobFormat::Raw, mode: iroh_blobs::api::blobs::ImportMode::TryReference };
        let tag = a_store.add_path_with_opts(opts).await.unwrap();
        let mut addr = iroh::EndpointAddr::new(a.endpoint.id());
        for s in a.addrs() {
            addr = addr.with_ip_addr(s);
        }
        let t = Instant::now();
        let conn = b.endpoint.connect(addr, iroh_blobs::ALPN).await.unwrap();
        b_store.remote().fetch(conn, tag.hash).await.unwrap();
        if land {
            let target = std::path::absolute(dir.join("landed")).unwrap();
            let opts = iroh_blobs::api::blobs::ExportOptions { hash: tag.hash, mode: iroh_blobs::api::blobs::ExportMode::TryReference, target: target.clone() };
            b_store.export_with_opts(opts).await.unwrap();
            std::fs::File::open(&target).unwrap().sync_all().unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        router.shutdown().await.ok();
        a_store.shutdown().await.ok();
        b_store.shutdown().await.ok();
        secs
    })
}

/// The raw baseline across two processes, as two nodes run: this bench binary, started again
/// with `ALKFS_BENCH_RAW_SERVE=DIR`, serves the file from its own iroh-blobs store (see
/// [`raw_serve`]); B fetches it here. Timed as [`raw_blobs`].
fn raw_blobs_two_processes(root: &Path, len: usize) -> f64 {
    use alknet_actors::node::mesh::{bind, NetConfig};
    use std::io::BufRead;
    let src = std::path::absolute(big_file(root, len)).unwrap();
    let dir = root.join("raw2");
    let _ = std::fs::remove_dir_all(&dir);
    let mut server = Command::new(std::env::current_exe().unwrap())
        .env("ALKFS_BENCH_RAW_SERVE", dir.join("a"))
        .env("ALKFS_BENCH_RAW_FILE", &src)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let parts: Vec<&str> = line.split_whitespace().collect();
    let unhex = |h: &str| -> [u8; 32] { (0..32).map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap()).collect::<Vec<u8>>().try_into().unwrap() };
    let (id, at, hash) = (unhex(parts[0]), parts[1].parse::<std::net::SocketAddr>().unwrap(), iroh_blobs::Hash::from_bytes(unhex(parts[2])));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let secs = rt.block_on(async {
        let cfg = NetConfig { listen: "127.0.0.1:0".parse().unwrap(), relay: None, eager_fetch: true };
        let b_store = iroh_blobs::store::fs::FsStore::load(dir.join("b")).await.unwrap();
        let b = bind(iroh::SecretKey::generate(), &cfg).await.unwrap();
        let addr = iroh::EndpointAddr::new(iroh::EndpointId::from_bytes(&id).unwrap()).with_ip_addr(at);
        let t = Instant::now();
        let conn = b.endpoint.connect(addr, iroh_blobs::ALPN).await.unwrap();
        b_store.remote().fetch(conn, hash).await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        b_store.shutdown().await.ok();
        secs
    });
    drop(server.stdin.take());
    server.wait().unwrap();
    secs
}

/// The serving half of [`raw_blobs_two_processes`]: imports the file, prints its endpoint id,
/// address and hash on one line, and serves until its stdin closes.
fn raw_serve(dir: &Path, file: &Path) {
    use alknet_actors::node::mesh::{bind, NetConfig};
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let cfg = NetConfig { listen: "127.0.0.1:0".parse().unwrap(), relay: None, eager_fetch: true };
        let store = iroh_blobs::store::fs::FsStore::load(dir).await.unwrap();
        let a = bind(iroh::SecretKey::generate(), &cfg).await.unwrap();
        let router = iroh::protocol::Router::builder(a.endpoint.clone()).accept(iroh_blobs::ALPN, iroh_blobs::BlobsProtocol::new(&store, None)).spawn();
        let opts = iroh_blobs::api::blobs::AddPathOptions { path: file.to_path_buf(), format: iroh_blobs::BlobFormat::Raw, mode: iroh_blobs::api::blobs::ImportMode::TryReference };
        let tag = store.add_path_with_opts(opts).await.unwrap();
        println!("{} {} {}", hex(a.endpoint.id().as_bytes()), a.addrs()[0], hex(tag.hash.as_bytes()));
        tokio::task::spawn_blocking(|| std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())).await.ok();
        router.shutdown().await.ok();
        store.shutdown().await.ok();
    });
}

/// Runs an external baseline and returns its `seconds=` figure (None if it failed).
fn baseline(cmd: &mut Command) -> Option<f64> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        eprintln!("baseline {cmd:?} failed: {text}");
        return None;
    }
    let line = text.lines().rev().find(|l| l.contains("seconds="))?;
    line.split_whitespace().find_map(|w| w.strip_prefix("seconds=")).and_then(|v| v.parse().ok())
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|x, y| x.partial_cmp(y).unwrap());
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn show(xs: &[f64]) -> String {
    if xs.is_empty() {
        return "not run".into();
    }
    let list: Vec<String> = xs.iter().map(|x| format!("{x:.2}")).collect();
    format!("median {:.2} s ({})", median(xs), list.join(", "))
}

/// One-file changes on A, each polled for on B until readable: (p50, p99) in ms.
fn change_latency(root: &Path, n: usize) -> (f64, f64, Node, Node, Node) {
    let (a_dir, b_dir, c_dir) = (root.join("a"), root.join("b"), root.join("c"));
    let (a, b, c) = (Node::start(&a_dir), Node::start(&b_dir), Node::start(&c_dir));
    ok(&b_dir, &["join", ok(&a_dir, &["invite"]).trim()]);
    ok(&c_dir, &["join", ok(&a_dir, &["invite"]).trim()]);
    std::thread::sleep(Duration::from_secs(3));
    let samples = changes_seen(&a_dir, &b_dir, n, || {});
    (percentile(&samples, 0.5), percentile(&samples, 0.99), a, b, c)
}

/// `n` one-file changes written on A, each polled for on B until readable (the version is
/// there and its bytes are too); `between` runs after each. The times in ms, sorted.
fn changes_seen(a_dir: &Path, b_dir: &Path, n: usize, mut between: impl FnMut()) -> Vec<f64> {
    let reader = rusqlite::Connection::open(b_dir.join("tree.db")).unwrap();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!("change {i} {:?}", Instant::now());
        let hash = blake3::hash(body.as_bytes());
        let t = Instant::now();
        let mut child = Command::new(bin()).arg("--data").arg(a_dir).args(["put", "-", "/latency.txt"]).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        wait(Duration::from_secs(30), || {
            reader
                .query_row("SELECT present FROM blob WHERE hash = ?1", [hash.as_bytes().to_vec()], |r| r.get::<_, i64>(0))
                .map(|p| p == 1)
                .unwrap_or(false)
        });
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
        between();
    }
    samples.sort_by(|x, y| x.partial_cmp(y).unwrap());
    samples
}

/// The `q` quantile of sorted `samples`.
fn percentile(samples: &[f64], q: f64) -> f64 {
    samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)]
}

/// A process's resident memory, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    kib / 1024.0
}

/// This process's CPU time so far, in seconds (user + system, every thread).
fn own_cpu_s() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Sync frames a node counted since start (`status --json`, `mesh.frames`): sent,
/// received, brought something. `None` for a build that does not count them.
fn frames(data: &Path) -> Option<(u64, u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&ok(data, &["status", "--json"])).ok()?;
    let f = v.get("mesh")?.get("frames")?;
    let n = |k: &str| f.get(k).and_then(|x| x.as_u64());
    Some((n("sent")?, n("received")?, n("useful")?))
}

/// What [`full_mesh`] measured.
struct FanOut {
    /// Sync frames received per write, over every node (`None`: the build does not count).
    frames_per_write: Option<f64>,
    /// Of those, the share that brought nothing.
    useless: Option<f64>,
    /// From the write to its bytes readable on every other node: p50, p99 (ms).
    p50: f64,
    p99: f64,
    /// Each node's CPU while idle, % of a core: the mean and the highest.
    idle_mean: f64,
    idle_max: f64,
}

/// `n` nodes in a full mesh (node 0 invites the others); `writes` one-file changes, each
/// on the next node in turn, each timed until every other node holds its bytes. Then the
/// nodes sit idle for `idle_secs`.
fn full_mesh(root: &Path, n: usize, writes: usize, idle_secs: u64) -> FanOut {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root).unwrap();
    let dirs: Vec<PathBuf> = (0..n).map(|i| root.join(format!("n{i}"))).collect();
    let nodes: Vec<Node> = dirs.iter().map(|d| Node::start(d)).collect();
    for d in &dirs[1..] {
        ok(d, &["join", ok(&dirs[0], &["invite"]).trim()]);
    }
    // Every node connected to every other (each learns the others from the bucket's document).
    let connected = |d: &Path| -> usize {
        let v: serde_json::Value = serde_json::from_str(&ok(d, &["status", "--json"])).unwrap();
        v["mesh"]["peers"].as_array().map(|ps| ps.iter().filter(|p| p["connected"].as_bool() == Some(true)).count()).unwrap_or(0)
    };
    wait(Duration::from_secs(120), || dirs.iter().all(|d| connected(d) == n - 1));
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<Option<(u64, u64, u64)>> = dirs.iter().map(|d| frames(d)).collect();
    let readers: Vec<rusqlite::Connection> = dirs.iter().map(|d| rusqlite::Connection::open(d.join("tree.db")).unwrap()).collect();
    let mut samples = Vec::with_capacity(writes);
    for i in 0..writes {
        let w = i % n;
        let body = format!("fan-out {i} {:?}", Instant::now());
        let hash = blake3::hash(body.as_bytes());
        let t = Instant::now();
        let mut child = Command::new(bin()).arg("--data").arg(&dirs[w]).args(["put", "-", &format!("/fanout/{i}.txt")]).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        for (j, r) in readers.iter().enumerate() {
            if j == w {
                continue;
            }
            wait(Duration::from_secs(60), || {
                r.query_row("SELECT present FROM blob WHERE hash = ?1", [hash.as_bytes().to_vec()], |row| row.get::<_, i64>(0)).map(|p| p == 1).unwrap_or(false)
            });
        }
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // Answers still in flight settle (anti-entropy is 10 s away: not counted).
    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<Option<(u64, u64, u64)>> = dirs.iter().map(|d| frames(d)).collect();
    let (mut received, mut useful, mut counted) = (0u64, 0u64, true);
    for (b, a) in before.iter().zip(&after) {
        match (b, a) {
            (Some(b), Some(a)) => {
                received += a.1 - b.1;
                useful += a.2 - b.2;
            }
            _ => counted = false,
        }
    }
    samples.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: Vec<u64> = nodes.iter().map(|x| x.cpu_ticks()).collect();
    std::thread::sleep(Duration::from_secs(idle_secs));
    let idle: Vec<f64> = nodes.iter().zip(&ticks).map(|(x, t)| (x.cpu_ticks() - t) as f64 / hz / idle_secs as f64 * 100.0).collect();
    drop(nodes);
    FanOut {
        frames_per_write: counted.then(|| received as f64 / writes as f64),
        useless: counted.then(|| (received - useful.min(received)) as f64 / received.max(1) as f64),
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        idle_mean: idle.iter().sum::<f64>() / n as f64,
        idle_max: idle.iter().cloned().fold(0.0, f64::max),
    }
}

/// One line of the fan-out table.
fn fan_out_row(what: &str, f: &FanOut) -> String {
    let frames = match (f.frames_per_write, f.useless) {
        (Some(x), Some(u)) => format!("{x:.2} frames/write, {:.1} % bringing nothing", u * 100.0),
        _ => "frames not counted by this build".into(),
    };
    format!("{what}: {frames}; readable on all p50 {:.0} ms, p99 {:.0} ms; idle {:.2} % of a core (highest {:.2} %)", f.p50, f.p99, f.idle_mean, f.idle_max)
}

/// Two honest members A and B; one-file changes A→B measured quiet, then while
/// `attack::STRANGERS` stranger connections and one hostile member hammer A (from this
/// process: its CPU is the attack's, bounded at one core). Prints the figures.
fn under_attack(root: &Path, n: usize) {
    let (a_dir, b_dir) = (root.join("a"), root.join("b"));
    let (a, _b) = (Node::start(&a_dir), Node::start(&b_dir));
    ok(&b_dir, &["join", ok(&a_dir, &["invite"]).trim()]);
    std::thread::sleep(Duration::from_secs(3));
    let quiet = changes_seen(&a_dir, &b_dir, n, || {});
    let rss_before = rss_mib(a.child.id());
    let ticket = ok(&a_dir, &["invite"]);
    let (cpu0, t0) = (own_cpu_s(), Instant::now());
    let attack = attack::Attack::start(ticket.trim());
    // Let the strangers take every handshake slot before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let mut rss_max = rss_mib(a.child.id());
    let hot = changes_seen(&a_dir, &b_dir, n, || rss_max = rss_max.max(rss_mib(a.child.id())));
    let (conns, forged) = (attack.connections.load(std::sync::atomic::Ordering::Relaxed), attack.forged.load(std::sync::atomic::Ordering::Relaxed));
    let secs = t0.elapsed().as_secs_f64();
    let attack_cpu = (own_cpu_s() - cpu0) / secs * 100.0;
    attack.stop();
    let (qp50, qp99, hp50, hp99) = (percentile(&quiet, 0.5), percentile(&quiet, 0.99), percentile(&hot, 0.5), percentile(&hot, 0.99));
    println!(
        "| a one-file change A→B ({n} changes) while {} strangers and a hostile member hammer A | p50 {hp50:.0} ms, p99 {hp99:.0} ms | quiet, same nodes: p50 {qp50:.0} ms, p99 {qp99:.0} ms | {:.2}× quiet p99 |",
        attack::STRANGERS,
        hp99 / qp99
    );
    println!(
        "| ... A's RSS growth during the attack | {:.1} MiB ({rss_before:.0} → max {rss_max:.0} MiB) | — | — |",
        rss_max - rss_before
    );
    println!(
        "| ... the attack (this process, one thread) | {:.0} stranger connections/s, {:.1} forged messages/s, {attack_cpu:.0} % of a core | — | — |",
        conns as f64 / secs,
        forged as f64 / secs
    );
}

fn main() {
    if let (Some(dir), Some(file)) = (std::env::var_os("ALKFS_BENCH_RAW_SERVE"), std::env::var_os("ALKFS_BENCH_RAW_FILE")) {
        return raw_serve(Path::new(&dir), Path::new(&file));
    }
    let root = tempfile::tempdir().unwrap();
    let (n_small, big, changes, idle_secs) = if quick() { (500, 64 << 20, 20, 5) } else { (10_000, 1 << 30, 200, 30) };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let rounds: usize = env("ALKFS_BENCH_ROUNDS").and_then(|v| v.parse().ok()).unwrap_or(if quick() { 1 } else { 3 });
    // ALKFS_BENCH_ONLY=small,large,latency,idle,repeat,attack picks figures (default: all but
    // repeat).
    let only = env("ALKFS_BENCH_ONLY").unwrap_or_else(|| "small,large,latency,idle,attack".into());
    let want = |f: &str| only.split(',').any(|o| o == f);
    // The baselines of ../shared/bench, when given: an iroh-docs-baseline binary, the
    // Syncthing script.
    let iroh_docs = env("ALKFS_BENCH_IROH_DOCS");
    let syncthing = env("ALKFS_BENCH_SYNCTHING");
    // An older build of alkfs (each build syncing with itself), alternating with this one.
    let older = env("ALKFS_BASELINE_BIN");
    println!("| figure | measured | baseline, same run (alternating) | ratio |");
    println!("|---|---|---|---|");
    if want("small") {
        let r = root.path().join("small");
        std::fs::create_dir_all(&r).unwrap();
        let (mut ours, mut docs, mut st, mut old) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            ours.push(many_small(&r, n_small));
            eprintln!("round {round}: alkfs {:.2} s", ours[round]);
            if let Some(bin) = &older {
                old.push(with_bin(bin, || many_small(&r, n_small)));
                eprintln!("round {round}: the older build {:.2} s", old[round]);
            }
            if let Some(bin) = &iroh_docs {
                docs.extend(baseline(Command::new(bin).args(["--mode", "import", "-n", &n_small.to_string(), "-s", "4096", "--dir", r.to_str().unwrap()])));
                eprintln!("round {round}: iroh-docs {:?}", docs.last());
            }
            if let Some(script) = &syncthing {
                st.extend(baseline(Command::new("bash").args([script, &n_small.to_string(), "4096", "--tmpdir", r.to_str().unwrap()])));
                eprintln!("round {round}: syncthing {:?}", st.last());
            }
        }
        let m = median(&ours);
        println!("| {n_small} × 4 KiB on A, all on B from B's join | {} | iroh-docs import {}; Syncthing {} | {:.2}× iroh-docs, {:.2}× Syncthing |", show(&ours), show(&docs), show(&st), m / median(&docs), m / median(&st));
        if !old.is_empty() {
            println!("| the same, the older build (ALKFS_BASELINE_BIN) | {} | {} | {:.2}× the older build |", show(&ours), show(&old), m / median(&old));
        }
    }
    if want("repeat") {
        let r = root.path().join("repeat");
        std::fs::create_dir_all(&r).unwrap();
        let runs: usize = env("ALKFS_BENCH_REPEAT").and_then(|v| v.parse().ok()).unwrap_or(100);
        let times = repeated_small(&r, n_small, runs);
        let max = times.iter().cloned().fold(0.0, f64::max);
        println!("| {n_small} × 4 KiB to a fresh joiner, repeated | {} of {runs} runs complete; median {:.2} s, slowest {max:.2} s | — | — |", times.len(), median(&times));
    }
    if want("large") {
        let r = root.path().join("large");
        std::fs::create_dir_all(&r).unwrap();
        let (mut ours, mut raw, mut raw_land, mut raw2, mut docs, mut live) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            ours.push(one_large(&r, big, true));
            raw.push(raw_blobs(&r, big, false));
            raw_land.push(raw_blobs(&r, big, true));
            raw2.push(raw_blobs_two_processes(&r, big));
            if let Some(bin) = &iroh_docs {
                docs.extend(baseline(Command::new(bin).args(["--mode", "import", "--large", &big.to_string(), "--dir", r.to_str().unwrap()])));
            }
            live.push(one_large(&r, big, false));
            eprintln!("round {round}: alkfs {:.2} s, raw {:.2} s, raw+land {:.2} s, raw two processes {:.2} s, iroh-docs {:?}, alkfs live {:.2} s", ours[round], raw[round], raw_land[round], raw2[round], docs.last(), live[round]);
        }
        let mib = (big >> 20) as f64;
        let m = median(&ours);
        println!("| one {} MiB file on A, on B from B's join | {} ({:.0} MiB/s) | raw iroh-blobs {} ({:.0} MiB/s) | {:.2}× raw throughput |", big >> 20, show(&ours), mib / m, show(&raw), mib / median(&raw), median(&raw) / m);
        println!("| ... the same | | raw iroh-blobs + export + fsync {} | {:.2}× its throughput |", show(&raw_land), median(&raw_land) / m);
        println!("| ... the same | | raw iroh-blobs, server in a process of its own {} | {:.2}× its throughput |", show(&raw2), median(&raw2) / m);
        println!("| ... the same | | iroh-docs import {} | {:.2}× iroh-docs' time |", show(&docs), m / median(&docs));
        println!("| one {} MiB file, from the write on A (B joined) to its bytes on B | {} ({:.0} MiB/s) | — | — |", big >> 20, show(&live), mib / median(&live));
    }
    if want("attack") {
        let r = root.path().join("attack");
        std::fs::create_dir_all(&r).unwrap();
        // (Not against an older build: the attacker speaks this build's protocol.)
        under_attack(&r, changes);
    }
    if want("scheduler") {
        // The transfer's CPU per blob, measured on real nodes; the scheduler's for a join of a
        // million blobs (ALKFS_BENCH_BLOBS) at that rate.
        let r = root.path().join("scheduler");
        std::fs::create_dir_all(&r).unwrap();
        let blobs: usize = env("ALKFS_BENCH_BLOBS").and_then(|v| v.parse().ok()).unwrap_or(if quick() { 100_000 } else { 1_000_000 });
        let (secs, cpu) = many_small_cpu(&r, n_small);
        let per_blob = cpu / n_small as f64;
        let rate = (n_small as f64 / secs) as usize;
        let sched = scheduler_cpu(blobs, rate.max(1));
        let transfer = per_blob * blobs as f64;
        println!(
            "| a join of {blobs} pending blobs: the fetch scheduler's CPU | {sched:.2} s | the transfer's CPU at {:.0} µs a blob ({n_small} × 4 KiB between two nodes: {cpu:.2} s in {secs:.2} s): {transfer:.0} s | {:.2} % of the transfer's |",
            per_blob * 1e6,
            100.0 * sched / transfer
        );
    }
    if want("fanout") {
        // ALKFS_BENCH_NODES=5,10 picks the mesh sizes.
        let sizes: Vec<usize> = env("ALKFS_BENCH_NODES").unwrap_or_else(|| "5,10".into()).split(',').filter_map(|x| x.parse().ok()).collect();
        let writes = if quick() { 20 } else { 200 };
        for n in sizes {
            let r = root.path().join(format!("fanout-{n}"));
            for round in 0..rounds {
                let ours = full_mesh(&r, n, writes, idle_secs);
                let older = older.as_ref().map(|bin| with_bin(bin, || full_mesh(&r, n, writes, idle_secs)));
                let ratio = match (&older, ours.frames_per_write) {
                    (Some(o), _) => format!("p50 {:.2}×, p99 {:.2}×, idle {:.2}× the older build", ours.p50 / o.p50, ours.p99 / o.p99, ours.idle_mean / o.idle_mean.max(0.001)),
                    _ => "—".into(),
                };
                println!(
                    "| {n} nodes, full mesh, {writes} one-file writes in turn (round {round}) | {} | {} | {ratio} |",
                    fan_out_row("this build", &ours),
                    older.as_ref().map(|o| fan_out_row("older build", o)).unwrap_or_else(|| "—".into())
                );
            }
        }
    }
    let latency = want("latency") || want("idle");
    if latency {
        let r3 = root.path().join("latency");
        std::fs::create_dir_all(&r3).unwrap();
        let (p50, p99, a, b, c) = change_latency(&r3, changes);
        println!("| a one-file change on A readable on B ({changes} changes) | p50 {p50:.0} ms, p99 {p99:.0} ms | — | — |");
        if want("idle") {
            // Idle: A with two connected peers, nothing written.
            std::thread::sleep(Duration::from_secs(2));
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
            let before = a.cpu_ticks();
            std::thread::sleep(Duration::from_secs(idle_secs));
            let pct = (a.cpu_ticks() - before) as f64 / hz / idle_secs as f64 * 100.0;
            println!("| an idle node with two connected peers ({idle_secs} s) | {pct:.2} % of a core | — | — |");
        }
        drop((a, b, c));
    }
}
