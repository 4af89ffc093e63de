//! Figures of the node (issue 3), each against its baseline in the same run, printed as a
//! table. Run with `cargo bench --bench node`; `ALKFS_BENCH_QUICK=1` for a smoke run.
//!
//! | figure | baseline |
//! |---|---|
//! | commits through the daemon, 10,000 × 4 KiB from 4 concurrent clients | the engine's direct rate, one file per transaction |
//! | CPU of an idle node over 60 s | — (goal ≤ 1 % of a core) |
//! | GC mark + sweep over 100,000 entries and 10,000 blobs | — (goal ≤ 2 s) |
//! | commits through the daemon, as above | an older build's node (`ALKFS_BASELINE_BIN`), alternating |

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alknet_actors::content::Imported;
use alknet_actors::engine::{Access, Engine, Scope};
use alknet_actors::gc::Retention;
use alknet_actors::proto::entry::{ContentHash, Entry, EntryKind};
use alknet_actors::proto::path::TreePath;
use alknet_fs::control::client::Client;
use alknet_fs::control::{Request, WireScope};

const ALKFS: &str = env!("CARGO_BIN_EXE_alkfs");

fn quick() -> bool {
    std::env::var_os("ALKFS_BENCH_QUICK").is_some()
}

fn payload(i: usize) -> Vec<u8> {
    (0..4096).map(|j| ((i as u64 * 7919 + j as u64 * 31) % 251) as u8).collect()
}

/// The engine's direct rate: one file per transaction, one writer.
fn direct_rate(dir: &Path, n: usize) -> f64 {
    Engine::init(dir).unwrap();
    let mut engine = Engine::open(dir, Access::Write).unwrap();
    let scope = Scope::new("default", "main");
    let t = Instant::now();
    for i in 0..n {
        let path = TreePath::parse(&format!("/d{}/f{i}", i / 100)).unwrap();
        engine.put_reader(&scope, &payload(i)[..], &path, |_| {}).unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Starts the node of build `bin` (this one, or `ALKFS_BASELINE_BIN`) on `dir`.
fn start_node_of(bin: &str, dir: &Path) -> Node {
    let child = Command::new(bin).arg("--data").arg(dir).args(["node", "run"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while Client::connect(dir).is_none() {
        assert!(t.elapsed() < Duration::from_secs(20), "node did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Node(child)
}

/// Commits through the daemon from `clients` threads, each its own connection per file.
fn daemon_rate(dir: &Path, n: usize, clients: usize) -> (f64, Node) {
    daemon_rate_of(ALKFS, dir, n, clients)
}

/// [`daemon_rate`] of the node of build `bin`.
fn daemon_rate_of(bin: &str, dir: &Path, n: usize, clients: usize) -> (f64, Node) {
    let node = start_node_of(bin, dir);
    let t = Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            s.spawn(move || {
                let client = Client::connect(dir).unwrap();
                for i in (c..n).step_by(clients) {
                    let req = Request::PutStream {
                        scope: WireScope { bucket: "default".into(), branch: "main".into() },
                        path: format!("/d{}/f{i}", i / 100),
                    };
                    client.call_streaming(&req, &payload(i)[..]).unwrap();
                }
            });
        }
    });
    (n as f64 / t.elapsed().as_secs_f64(), node)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Builds `entries` paths naming `blobs` distinct blobs (inline, plus 10 % file blobs),
/// deletes half of the paths, and times one collection with only heads retained.
fn gc_time(dir: &Path, entries: usize, blobs: usize) -> (Duration, u64) {
    Engine::init(dir).unwrap();
    let mut engine = Engine::open(dir, Access::Write).unwrap();
    let scope = Scope::new("default", "main");
    let mut made: Vec<Imported> = Vec::with_capacity(blobs);
    for b in 0..blobs {
        let len = if b % 10 == 0 { 20_000 } else { 1_000 };
        let mut data: Vec<u8> = (0..len).map(|j| ((b * 131 + j * 7) % 256) as u8).collect();
        data[..8].copy_from_slice(&(b as u64).to_le_bytes()); // distinct content per blob
        made.push(engine.content().import_reader(&data[..], |_| {}).unwrap());
    }
    let mut batch = Vec::new();
    for e in 0..entries {
        // Each blob is named by a run of consecutive paths, so deleting half of the groups
        // leaves about half of the blobs unreferenced.
        let blob = made[e * blobs / entries].clone();
        let entry = Entry { kind: EntryKind::File, hash: blob.hash, size: blob.size, mode: 0o644, mtime_ms: 0 };
        batch.push((TreePath::parse(&format!("/g{}/e{e}", e / 1000)).unwrap(), entry, blob));
        if batch.len() == 4096 {
            engine.commit_entries(&scope, &batch).unwrap();
            batch.clear();
        }
    }
    engine.commit_entries(&scope, &batch).unwrap();
    drop(made);
    for g in 0..(entries / 1000) / 2 {
        engine.remove(&scope, &TreePath::parse(&format!("/g{g}")).unwrap(), true).unwrap();
    }
    let _ = ContentHash::EMPTY;
    let t = Instant::now();
    let report = engine.gc(Retention { keep_versions: 0, keep_days: 0, outbox_keep_days: 1 }).unwrap();
    (t.elapsed(), report.blobs_freed)
}

fn scratch() -> PathBuf {
    let base = std::env::var_os("ALKFS_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&base).unwrap();
    base
}

fn main() {
    let tmp = tempfile::tempdir_in(scratch()).unwrap();
    let n = if quick() { 2_000 } else { 10_000 };
    eprintln!("direct commits …");
    let direct = direct_rate(&tmp.path().join("direct"), n);
    eprintln!("daemon commits …");
    let (daemon, node) = daemon_rate(&tmp.path().join("daemon"), n, 4);
    let idle_secs = if quick() { 10 } else { 60 };
    eprintln!("idle cpu over {idle_secs} s …");
    std::thread::sleep(Duration::from_secs(3)); // let the blob index finish the load's blobs
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let c0 = cpu_ticks(node.0.id());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let idle_pct = (cpu_ticks(node.0.id()) - c0) as f64 / tick / idle_secs as f64 * 100.0;
    drop(node);
    eprintln!("gc …");
    let (entries, blobs) = if quick() { (20_000, 2_000) } else { (100_000, 10_000) };
    let (gc, freed) = gc_time(&tmp.path().join("gc"), entries, blobs);
    println!("| figure | alknet-fs | baseline (same run) | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!("| commit {n} x 4 KiB through the daemon, 4 concurrent clients | {daemon:.0} files/s | engine direct, 1 per transaction: {direct:.0} files/s | {:.2}x direct | >= 0.8x |", daemon / direct);
    println!("| CPU of an idle node over {idle_secs} s | {idle_pct:.2} % of a core | - | - | <= 1 % |");
    println!("| GC mark+sweep, {entries} entries / {blobs} blobs (half the entries deleted) | {:.3} s, {freed} blobs freed | - | - | <= 2 s |", gc.as_secs_f64());
    if let Some(base) = std::env::var_os("ALKFS_BASELINE_BIN") {
        // An older build's node (`ALKFS_BASELINE_BIN`), alternating with this one's, each on
        // a fresh data dir: what a change cost the commit rate.
        let base = base.to_string_lossy().into_owned();
        let rounds = if quick() { 1 } else { 3 };
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            eprintln!("daemon commits against the baseline, round {} of {rounds} …", r + 1);
            ours.push(daemon_rate(&tmp.path().join(format!("ours-{r}")), n, 4).0);
            theirs.push(daemon_rate_of(&base, &tmp.path().join(format!("base-{r}")), n, 4).0);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (o, t) = (median(&mut ours), median(&mut theirs));
        println!("| commit {n} x 4 KiB through the daemon, against the baseline build (median of {rounds}) | {o:.0} files/s | {base}: {t:.0} files/s | {:.2}x | - |", o / t);
    }
}
