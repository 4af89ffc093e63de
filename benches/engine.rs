//! Figures of the local engine, each measured against its baseline in the same run and
//! printed as a table with the ratio. Run with `cargo bench --bench engine`; set
//! `ALKFS_BENCH_QUICK=1` for a smoke run with small sizes.
//!
//! | figure | baseline |
//! |---|---|
//! | `alkfs put` of a 1 GiB file, then `sync` | `cp` of the same file, then `sync` |
//! | engine commits, 10,000 × 4 KiB files, one transaction each | raw SQLite insert + honker publish, one transaction each (`synchronous=NORMAL`, and `FULL`: what making every commit durable would cost instead of leasing ids) |
//! | `alkfs put -r` of 10,000 × 4 KiB files | — (goal ≥ 5,000 files/s) |
//! | `alkfs ls` of 10,000 entries on a branch 5 levels deep | — (goal ≤ 20 ms), and `ls` of the same local directory |
//!
//! Scratch files go to `ALKFS_BENCH_DIR` or cargo's target tmp dir: the same disk as the
//! build, like the acceptance checks.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use alknet_actors::engine::{Access, Engine, Scope};
use alknet_actors::proto::path::TreePath;

const ALKFS: &str = env!("CARGO_BIN_EXE_alkfs");

fn quick() -> bool {
    std::env::var_os("ALKFS_BENCH_QUICK").is_some()
}

fn run(cmd: &mut Command) {
    let out = cmd.stdout(Stdio::null()).output().expect("spawn");
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn alkfs(data: &Path) -> Command {
    let mut c = Command::new(ALKFS);
    c.arg("--data").arg(data);
    c
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn random_file(path: &Path, len: usize) {
    let mut data = vec![0u8; len];
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ len as u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, &data).unwrap();
}

struct Row {
    figure: String,
    ours: String,
    baseline: String,
    ratio: String,
    goal: String,
}

/// `alkfs put` vs `cp`, each followed by `sync`, alternating; medians.
fn ingest(scratch: &Path, rows: &mut Vec<Row>) {
    let len = if quick() { 64 << 20 } else { 1 << 30 };
    let src = scratch.join("ingest.src");
    random_file(&src, len);
    let _ = std::fs::read(&src); // warm the page cache, as for cp
    run(&mut Command::new("sync"));
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..5 {
        let dst = scratch.join("ingest.cp");
        theirs.push(timed(|| {
            run(Command::new("cp").arg(&src).arg(&dst));
            run(&mut Command::new("sync"));
        }));
        std::fs::remove_file(&dst).unwrap();
        let data = scratch.join(format!("ingest.data{i}"));
        run(alkfs(&data).arg("init"));
        run(&mut Command::new("sync"));
        ours.push(timed(|| {
            run(alkfs(&data).arg("put").arg(&src).arg("/big"));
            run(&mut Command::new("sync"));
        }));
        std::fs::remove_dir_all(&data).unwrap();
        run(&mut Command::new("sync"));
    }
    let (o, t) = (median(ours), median(theirs));
    let mib = len as f64 / (1 << 20) as f64;
    rows.push(Row {
        figure: format!("put {} MiB + sync (median of 5)", len >> 20),
        ours: format!("{:.3} s ({:.0} MiB/s)", o.as_secs_f64(), mib / o.as_secs_f64()),
        baseline: format!("cp + sync {:.3} s ({:.0} MiB/s)", t.as_secs_f64(), mib / t.as_secs_f64()),
        ratio: format!("{:.2}x cp", t.as_secs_f64() / o.as_secs_f64()),
        goal: ">= 0.7x".into(),
    });
    std::fs::remove_file(&src).unwrap();
}

/// Engine commits, one file per transaction, vs raw SQLite insert + publish per transaction.
fn commit_rate(scratch: &Path, rows: &mut Vec<Row>) {
    let n = if quick() { 1_000 } else { 10_000 };
    let data = scratch.join("commit.data");
    Engine::init(&data).unwrap();
    let mut engine = Engine::open(&data, Access::Write).unwrap();
    let scope = Scope::new("default", "main");
    let payloads: Vec<Vec<u8>> = (0..n)
        .map(|i| (0..4096).map(|j| ((i as u64 * 7919 + j as u64 * 31) % 251) as u8).collect())
        .collect();
    let ours = timed(|| {
        for (i, bytes) in payloads.iter().enumerate() {
            let path = TreePath::parse(&format!("/d{}/f{i}", i / 100)).unwrap();
            engine.put_reader(&scope, &bytes[..], &path, |_| {}).unwrap();
        }
    });
    drop(engine);
    let raw = raw_sqlite(&scratch.join("raw.db"), &payloads, "NORMAL");
    let raw_full = raw_sqlite(&scratch.join("raw-full.db"), &payloads, "FULL");
    let rate = |t: Duration| n as f64 / t.as_secs_f64();
    let (ours_rate, raw_rate, full_rate) = (rate(ours), rate(raw), rate(raw_full));
    rows.push(Row {
        figure: format!("commit {n} x 4 KiB, 1 file per transaction (engine API, ids leased)"),
        ours: format!("{ours_rate:.0} files/s"),
        baseline: format!("raw SQLite insert+publish {raw_rate:.0} tx/s"),
        ratio: format!("{:.2}x raw", ours_rate / raw_rate),
        goal: ">= 5,000 files/s".into(),
    });
    rows.push(Row {
        figure: "the same floor with synchronous=FULL (every commit durable, the alternative to leases)".into(),
        ours: format!("{ours_rate:.0} files/s"),
        baseline: format!("raw SQLite insert+publish, FULL: {full_rate:.0} tx/s"),
        ratio: format!("{:.2}x raw FULL", ours_rate / full_rate),
        goal: "-".into(),
    });
}

/// The floor under any commit: one row and one outbox event per transaction, same pragmas
/// (honker's: WAL, `synchronous=NORMAL`), or with `synchronous` set to `sync`.
fn raw_sqlite(db: &Path, payloads: &[Vec<u8>], sync: &str) -> Duration {
    let mut conn = honker_core::open_conn(db.to_str().unwrap(), false).unwrap();
    conn.execute_batch(&format!("PRAGMA synchronous = {sync}")).unwrap();
    honker_core::attach_honker_functions(&conn).unwrap();
    honker_core::bootstrap_honker_schema(&conn).unwrap();
    conn.execute_batch(
        "CREATE TABLE t(dir TEXT, name TEXT, seq INTEGER, hash BLOB, data BLOB, PRIMARY KEY(dir, name, seq DESC)) WITHOUT ROWID",
    )
    .unwrap();
    timed(|| {
        for (i, bytes) in payloads.iter().enumerate() {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
            let hash = blake3::hash(bytes);
            tx.execute(
                "INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![format!("/d{}", i / 100), format!("f{i}"), i as i64, hash.as_bytes().to_vec(), bytes],
            )
            .unwrap();
            tx.query_row("SELECT honker_stream_publish('t', NULL, ?1)", [format!("{{\"seq\":{i}}}")], |r| r.get::<_, i64>(0))
                .unwrap();
            tx.commit().unwrap();
        }
    })
}

/// `alkfs put -r` of a tree of small files.
fn put_tree(scratch: &Path, rows: &mut Vec<Row>) {
    let (dirs, per) = if quick() { (10, 100) } else { (100, 100) };
    let tree = scratch.join("small");
    for d in 0..dirs {
        std::fs::create_dir_all(tree.join(format!("d{d}"))).unwrap();
        for f in 0..per {
            random_file(&tree.join(format!("d{d}/f{f}")), 4096 + f);
        }
    }
    let mut times = Vec::new();
    for i in 0..3 {
        let data = scratch.join(format!("tree.data{i}"));
        run(alkfs(&data).arg("init"));
        times.push(timed(|| run(alkfs(&data).arg("put").arg("-r").arg(&tree).arg("/small"))));
        std::fs::remove_dir_all(&data).unwrap();
    }
    let n = dirs * per;
    let t = median(times);
    rows.push(Row {
        figure: format!("alkfs put -r {n} x 4 KiB (median of 3, whole process)"),
        ours: format!("{:.0} files/s ({:.3} s)", n as f64 / t.as_secs_f64(), t.as_secs_f64()),
        baseline: "-".into(),
        ratio: "-".into(),
        goal: ">= 5,000 files/s".into(),
    });
}

/// `alkfs ls` of a 10,000-entry directory on a branch 5 forks deep, vs `ls` of the same
/// directory on the local file system.
fn list(scratch: &Path, rows: &mut Vec<Row>) {
    let n = if quick() { 1_000 } else { 10_000 };
    let wide = scratch.join("wide");
    std::fs::create_dir_all(&wide).unwrap();
    for i in 0..n {
        std::fs::File::create(wide.join(format!("e{i}"))).unwrap();
    }
    let data = scratch.join("ls.data");
    run(alkfs(&data).arg("init"));
    run(alkfs(&data).args(["put", "-r"]).arg(&wide).arg("/wide"));
    let mut prev = "main".to_string();
    for b in 1..=5 {
        run(alkfs(&data).args(["branch", "create", &format!("b{b}"), "--from", &prev]));
        prev = format!("b{b}");
    }
    let runs = 31;
    let ours = median((0..runs).map(|_| timed(|| run(alkfs(&data).args(["--branch", "b5", "ls", "/wide"])))).collect());
    let local = median((0..runs).map(|_| timed(|| run(Command::new("ls").arg(&wide)))).collect());
    let engine = Engine::open(&data, Access::Read).unwrap();
    let scope = Scope::new("default", "b5");
    let path = TreePath::parse("/wide").unwrap();
    let inproc = median((0..runs).map(|_| timed(|| assert_eq!(engine.list(&scope, &path).unwrap().len(), n))).collect());
    rows.push(Row {
        figure: format!("alkfs ls of {n} entries on a depth-5 branch (median of {runs}, whole process)"),
        ours: format!("{:.1} ms (in-process list {:.1} ms)", ours.as_secs_f64() * 1e3, inproc.as_secs_f64() * 1e3),
        baseline: format!("GNU ls of the local dir {:.1} ms", local.as_secs_f64() * 1e3),
        ratio: format!("{:.2}x ls", ours.as_secs_f64() / local.as_secs_f64()),
        goal: "<= 20 ms".into(),
    });
}

fn scratch_dir() -> PathBuf {
    let base = std::env::var_os("ALKFS_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&base).unwrap();
    base
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let scratch = tempfile::tempdir_in(scratch_dir()).unwrap();
    let mut rows = Vec::new();
    eprintln!("ingest …");
    ingest(scratch.path(), &mut rows);
    eprintln!("commit rate …");
    commit_rate(scratch.path(), &mut rows);
    eprintln!("put -r …");
    put_tree(scratch.path(), &mut rows);
    eprintln!("ls …");
    list(scratch.path(), &mut rows);
    println!("| figure | alknet-fs | baseline (same run) | ratio | goal |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {} | {} |", r.figure, r.ours, r.baseline, r.ratio, r.goal);
    }
}
