//! Figures of the mounts (issue 9), each against its baseline in the same run, printed as a
//! table. Run with `cargo bench --bench mount` (as root: it drops the page cache before cold
//! reads and starts an OpenSSH `sshd` for the SFTP baseline); `ALKFS_BENCH_QUICK=1` for a
//! smoke run with small sizes; `ALKFS_BENCH_ONLY=untar|dd|sftp` for one part;
//! `ALKFS_BASELINE_BIN=/path/to/an/older/alkfs` adds that build's untar, run alternately with
//! this one's on its own data dir, node and mount (what a change cost, in the same run).
//!
//! | figure | baseline | goal |
//! |---|---|---|
//! | untar a 10,000-file source tree onto the FUSE mount, until committed and synced | the same onto the native disk | ≤ 3× the time |
//! | sequential write of 1 GiB (`dd bs=1M conv=fsync`) | the native disk | ≥ 0.5× the throughput |
//! | sequential read of 1 GiB, cold (page cache dropped) and hot | the native disk | ≥ 0.5× |
//! | `sftp` put and get of 1 GiB | OpenSSH's own sftp-server (sshd, same client) | ≥ 0.8× |
//!
//! Native and mount runs alternate, three of each; the table shows medians. Every run is on
//! the same disk (the bench's temporary directory). Beside the untar, the same tar onto a
//! FUSE filesystem that does nothing but keep names in memory ([`floor`]): the part of the
//! figure that is the kernel's FUSE transport on this machine, which no mount can go below.

#[path = "mount/floor.rs"]
mod floor;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ALKFS: &str = env!("CARGO_BIN_EXE_alkfs");
const RUNS: usize = 3;
/// The untar's runs (each a few seconds): its baselines move most from run to run here.
const UNTAR_RUNS: usize = 5;

fn quick() -> bool {
    std::env::var_os("ALKFS_BENCH_QUICK").is_some()
}

/// A child process killed (SIGTERM, then reaped) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn alkfs(data: &Path) -> Command {
    alkfs_bin(ALKFS, data)
}

fn alkfs_bin(bin: &str, data: &Path) -> Command {
    let mut c = Command::new(bin);
    c.arg("--data").arg(data).env("ALKFS_NET_LISTEN", "127.0.0.1:0").env("ALKFS_NET_RELAY", "disabled");
    c
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn sh(script: &str) {
    run(Command::new("sh").arg("-c").arg(script));
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(20), "{what} did not happen in 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU seconds process `pid` has used (utime + stime).
fn cpu_secs(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (in parentheses, which may hold spaces): utime and stime
    // are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f.get(10).copied().unwrap_or(0.0) + f.get(11).copied().unwrap_or(0.0)) / tick
}

/// Waits (at most five minutes) until process `pid` uses less than 2 % of a core over half a
/// second.
fn wait_idle(pid: u32) {
    // Indexing the untar's 50,000 files takes more than a minute here.
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let before = cpu_secs(pid);
        std::thread::sleep(Duration::from_millis(500));
        if cpu_secs(pid) - before < 0.01 {
            return;
        }
    }
}

/// An ext4 made for the bench in a sparse image file (a loop mount), unmounted when dropped.
struct FreshExt4 {
    dir: PathBuf,
}

impl FreshExt4 {
    /// None when it cannot be made (not root, no mkfs.ext4).
    fn make(root: &Path) -> Option<Self> {
        let image = root.join("native-ext4.img");
        fs::File::create(&image).ok()?.set_len(4 << 30).ok()?;
        let made = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).stdout(Stdio::null()).stderr(Stdio::null()).status().ok()?.success();
        let dir = root.join("native-ext4");
        fs::create_dir_all(&dir).ok()?;
        let mounted = made && Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&dir).stderr(Stdio::null()).status().ok()?.success();
        mounted.then_some(FreshExt4 { dir })
    }
}

impl Drop for FreshExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

fn is_mounted(dir: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().any(|l| l.split(' ').nth(4) == dir.to_str())
}

fn drop_caches() -> bool {
    sh("sync");
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Writes a source-like tree of `n` files (200 B to 12 KiB, in 40 × 12 directories), seeded.
fn make_tree(root: &Path, n: usize) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..n {
        let dir = root.join(format!("src/m{}/s{}", i % 40, (i / 40) % 12));
        fs::create_dir_all(&dir).unwrap();
        let len = 200 + (next() % 11_800) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| (next() % 96 + 32) as u8).collect();
        fs::write(dir.join(format!("f{i}.rs")), bytes).unwrap();
    }
}

fn row(out: &mut Vec<String>, figure: &str, native: f64, mount: f64, unit: &str, ratio: f64, goal: &str) {
    out.push(format!("| {figure} | {native:.2} {unit} | {mount:.2} {unit} | {ratio:.2}× | {goal} |"));
}

fn main() {
    let q = quick();
    let files = if q { 500 } else { 10_000 };
    let big_mib: usize = if q { 64 } else { 1024 };
    let root = tempfile::Builder::new().prefix("alkfs-bench-mount-").tempdir_in(std::env::temp_dir()).unwrap();
    let root = root.path();
    let data = root.join("data");
    run(alkfs(&data).arg("init"));
    let node = Proc(alkfs(&data).args(["node", "run"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    wait_for("the node to answer", || alkfs(&data).arg("status").output().is_ok_and(|o| o.status.success()));
    let mnt = root.join("mnt");
    let native = root.join("native");
    fs::create_dir_all(&mnt).unwrap();
    fs::create_dir_all(&native).unwrap();
    let mount = Proc(alkfs(&data).arg("mount").arg(&mnt).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    wait_for("the mount", || is_mounted(&mnt));
    let mut table = vec!["| figure | native | alkfs | ratio | goal |".to_string(), "|---|---|---|---|---|".to_string()];

    let only = std::env::var("ALKFS_BENCH_ONLY").unwrap_or_default();
    let run_part = |part: &str| only.is_empty() || only == part;

    // 1. untar a source tree. Natively into a freshly made ext4 (a loop device on the same
    // disk), when this runs as root: ext4 that has seen hundreds of thousands of files
    // deleted (earlier benches, builds) takes 0.25 s to 6 s for the same tar, as its inode
    // allocator passes over recently freed inodes; a fresh one is the fair, repeatable case.
    let fresh = FreshExt4::make(root);
    let native_untar = fresh.as_ref().map(|f| f.dir.clone()).unwrap_or_else(|| native.clone());
    if run_part("untar") {
        let tree = root.join("tree");
        make_tree(&tree, files);
        let tar = root.join("tree.tar");
        run(Command::new("tar").arg("cf").arg(&tar).arg("-C").arg(&tree).arg("."));
        let floor_dir = root.join("floor");
        fs::create_dir_all(&floor_dir).unwrap();
        let floor_mount = floor::mount(&floor_dir).expect("mounting the in-memory floor filesystem");
        wait_for("the floor mount", || is_mounted(&floor_dir));
        // An older build beside this one (ALKFS_BASELINE_BIN): its own data dir, node, mount.
        let baseline = std::env::var("ALKFS_BASELINE_BIN").ok().map(|bin| {
            let data = root.join("data-baseline");
            run(alkfs_bin(&bin, &data).arg("init"));
            let node = Proc(alkfs_bin(&bin, &data).args(["node", "run"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
            wait_for("the baseline node to answer", || alkfs_bin(&bin, &data).arg("status").output().is_ok_and(|o| o.status.success()));
            let mnt = root.join("mnt-baseline");
            fs::create_dir_all(&mnt).unwrap();
            let mount = Proc(alkfs_bin(&bin, &data).arg("mount").arg(&mnt).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
            wait_for("the baseline mount", || is_mounted(&mnt));
            (mnt, node, mount)
        });
        let (mut tn, mut tf, mut tm, mut tb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..UNTAR_RUNS {
            let mut runs = vec![(&native_untar, &mut tn), (&floor_dir, &mut tf), (&mnt, &mut tm)];
            if let Some((bmnt, _, _)) = &baseline {
                runs.push((bmnt, &mut tb));
            }
            for (dir, times) in runs {
                let target = dir.join(format!("untar{r}"));
                fs::create_dir(&target).unwrap();
                sh("sync");
                // Both start on a quiet machine: the node indexes what the last mount run
                // wrote (background work once writes stop, seconds of CPU for 10,000 files),
                // which would otherwise slow whichever run comes next.
                wait_idle(node.0.id());
                if let Some((_, bnode, _)) = &baseline {
                    wait_idle(bnode.0.id());
                }
                let on_mount = dir == &mnt || baseline.as_ref().is_some_and(|(b, _, _)| dir == b);
                times.push(timed(|| {
                    run(Command::new("tar").arg("xf").arg(&tar).arg("-C").arg(&target));
                    // On the mount, until every file is committed: an fsync of a directory there
                    // waits for the write-behind queue (and forces nothing to disk).
                    if on_mount {
                        fs::File::open(&target).unwrap().sync_all().unwrap();
                    }
                }));
            }
        }
        // Lazily, as `alkfs umount` does; fuser's own unmount waits forever here.
        run(Command::new("fusermount3").arg("-u").arg("-z").arg(&floor_dir));
        if let Err(e) = floor_mount.join() {
            eprintln!("the floor filesystem's session: {e}");
        }
        let (n, f, m) = (median(tn), median(tf), median(tm));
        let on = if fresh.is_some() { "native: a fresh ext4; " } else { "native: the bench's dir (NOT a fresh ext4: not root); " };
        row(&mut table, &format!("untar {files} files ({on}the mount: until committed)"), n, m, "s", m / n, "≤ 3× the time");
        row(&mut table, &format!("untar {files} files onto the in-memory FUSE floor (native as above)"), n, f, "s", f / n, "— (what FUSE alone costs here)");
        row(&mut table, &format!("untar {files} files: the mount against the floor"), f, m, "s", m / f, "≤ 1.5× the floor");
        if let Some((bmnt, bnode, bmount)) = baseline {
            let b = median(tb);
            row(&mut table, &format!("untar {files} files: the baseline build's mount against the floor"), f, b, "s", b / f, "— (ALKFS_BASELINE_BIN)");
            row(&mut table, &format!("untar {files} files: this build against the baseline build"), b, m, "s", m / b, "— (what the change cost)");
            run(Command::new("fusermount3").arg("-u").arg("-z").arg(&bmnt));
            drop(bmount);
            drop(bnode);
        }

        // What one request to the FUSE process costs (the floor under every per-file figure):
        // fsync of a file open for reading goes to the filesystem every time, and does nothing.
        let calls = if q { 2_000 } else { 20_000 };
        let (mut rn, mut rm) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            for (dir, times) in [(&native, &mut rn), (&mnt, &mut rm)] {
                let probe = dir.join("fsync-probe");
                fs::write(&probe, b"probe").unwrap();
                fs::File::open(dir).unwrap().sync_all().unwrap();
                let f = fs::File::open(&probe).unwrap();
                let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
                times.push(timed(|| {
                    for _ in 0..calls {
                        assert_eq!(unsafe { libc::fsync(fd) }, 0);
                    }
                }) / calls as f64 * 1e6);
            }
        }
        let (n, m) = (median(rn), median(rm));
        row(&mut table, "one request to the filesystem (fsync, nothing to write)", n, m, "µs", m / n, "— (the floor: tar sends ~8 per file)");

        // How soon another process sees a close on a quiet mount (an editor's save): until
        // its version is in tree.db, read as the CLI reads it.
        let db = rusqlite::Connection::open_with_flags(data.join("tree.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let versions = || db.query_row("SELECT count(*) FROM version", [], |r| r.get::<_, i64>(0)).unwrap();
        wait_idle(node.0.id()); // done indexing the untarred files
        let mut seen = Vec::new();
        for i in 0..30 {
            std::thread::sleep(Duration::from_millis(200));
            let before = versions();
            fs::write(mnt.join(format!("save{i}.txt")), b"an editor's save").unwrap();
            let t = Instant::now();
            while versions() == before {
                std::thread::sleep(Duration::from_micros(200));
            }
            seen.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let p50 = median(seen);
        table.push(format!("| a close on a quiet mount, until other processes see it (p50 of 30) | — | {p50:.2} ms | — | — (was 11 ms: the 10 ms linger) |"));
    }

    // 2. sequential write and read of 1 GiB.
    let source = root.join("source.bin");
    {
        let mut f = fs::File::create(&source).unwrap();
        let mut x: u64 = 1;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..big_mib {
            for c in buf.chunks_mut(8) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
    }
    let bytes = (big_mib as f64) * 1024.0 * 1024.0;
    if run_part("dd") {
        wait_idle(node.0.id()); // the untar's files indexed: its CPU is not the reads' to share
        let gbs = |secs: f64| bytes / secs / 1e9;
        let (mut wn, mut wm, mut cn, mut cm, mut hn, mut hm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut cold = true;
        for r in 0..RUNS {
            for (dir, w, c, h) in [(&native, &mut wn, &mut cn, &mut hn), (&mnt, &mut wm, &mut cm, &mut hm)] {
                let target = dir.join(format!("big{r}"));
                sh(&format!("cat {} > /dev/null; sync", source.display()));
                wait_idle(node.0.id());
                w.push(gbs(timed(|| run(Command::new("dd").arg(format!("if={}", source.display())).arg(format!("of={}", target.display())).args(["bs=1M", "conv=fsync", "status=none"])))));
                cold &= drop_caches();
                c.push(gbs(timed(|| run(Command::new("dd").arg(format!("if={}", target.display())).args(["of=/dev/null", "bs=1M", "status=none"])))));
                h.push(gbs(timed(|| run(Command::new("dd").arg(format!("if={}", target.display())).args(["of=/dev/null", "bs=1M", "status=none"])))));
            }
        }
        let (n, m) = (median(wn), median(wm));
        row(&mut table, &format!("write {big_mib} MiB (dd bs=1M conv=fsync)"), n, m, "GB/s", m / n, "≥ 0.5×");
        let (n, m) = (median(cn), median(cm));
        row(&mut table, &format!("read {big_mib} MiB, cold{}", if cold { "" } else { " (NOT dropped: not root)" }), n, m, "GB/s", m / n, "≥ 0.5×");
        let (n, m) = (median(hn), median(hm));
        row(&mut table, &format!("read {big_mib} MiB, hot (page cache)"), n, m, "GB/s", m / n, "≥ 0.5×");
    }

    // 3. sftp put/get against OpenSSH's sftp-server, on a fresh store and node of its own:
    // the first node is still indexing the gigabytes written above for its peers, which
    // takes CPU an upload needs.
    drop(mount);
    drop(node);
    let data2 = root.join("data-sftp");
    run(alkfs(&data2).arg("init"));
    let node2 = Proc(alkfs(&data2).args(["node", "run"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    wait_for("the second node to answer", || alkfs(&data2).arg("status").output().is_ok_and(|o| o.status.success()));
    let sftp = if run_part("sftp") { sftp_figures(root, &data2, &source, bytes) } else { Ok(Vec::new()) };
    match sftp {
        Ok(rows) => table.extend(rows),
        Err(why) => table.push(format!("| sftp put/get | — | — | — | not measured: {why} |")),
    }
    drop(node2);
    println!("{}", table.join("\n"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn sftp_batch(port: u16, key: &Path, user: &str, script: &str) -> f64 {
    timed(|| {
        let mut child = Command::new("sftp")
            .args(["-q", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
            .arg("-P")
            .arg(port.to_string())
            .arg("-i")
            .arg(key)
            .arg("-b")
            .arg("-")
            .arg(format!("{user}@127.0.0.1"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "sftp batch failed: {script}");
    })
}

fn sftp_figures(root: &Path, data: &Path, source: &Path, bytes: f64) -> Result<Vec<String>, String> {
    let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"].into_iter().map(PathBuf::from).find(|p| p.exists()).ok_or("no sshd (apt-get install openssh-server)")?;
    if unsafe { libc::geteuid() } != 0 {
        return Err("sshd needs root".into());
    }
    let key = root.join("key");
    run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", ""]).arg("-f").arg(&key));
    let host = root.join("ssh_host");
    run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", ""]).arg("-f").arg(&host));
    run(alkfs(data).args(["sftp", "allow", "default"]).arg(key.with_extension("pub")));

    // OpenSSH: sshd on loopback, this user, the same key, its internal sftp server.
    let home = root.join("sshd-home");
    fs::create_dir_all(&home).unwrap();
    let auth = root.join("authorized_keys");
    fs::copy(key.with_extension("pub"), &auth).unwrap();
    let _ = fs::create_dir_all("/run/sshd");
    let sshd_port = free_port();
    let config = root.join("sshd_config");
    fs::write(
        &config,
        format!(
            "Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nPasswordAuthentication no\n",
            host.display(),
            auth.display()
        ),
    )
    .unwrap();
    let _sshd = Proc(Command::new(&sshd).arg("-D").arg("-e").arg("-f").arg(&config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(|e| e.to_string())?);
    wait_for("sshd to listen", || std::net::TcpStream::connect(("127.0.0.1", sshd_port)).is_ok());
    let alk_port = free_port();
    let _server = Proc(alkfs(data).args(["serve", "sftp", "--listen"]).arg(format!("127.0.0.1:{alk_port}")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    wait_for("alkfs serve sftp to listen", || std::net::TcpStream::connect(("127.0.0.1", alk_port)).is_ok());

    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let back = root.join("back.bin");
    let remote_native = home.join("sftp.bin");
    let (mut pn, mut pm, mut gn, mut gm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..RUNS {
        // Each transfer starts with nothing dirty: the one before wrote a gigabyte, and its
        // writeback would slow whichever came next.
        sh(&format!("cat {} > /dev/null; sync", source.display()));
        pn.push(bytes / 1e9 / sftp_batch(sshd_port, &key, &user, &format!("put {} {}\n", source.display(), remote_native.display())));
        sh("sync");
        pm.push(bytes / 1e9 / sftp_batch(alk_port, &key, "default", &format!("put {} /sftp{r}.bin\n", source.display())));
        let _ = fs::remove_file(&back);
        sh("sync");
        gn.push(bytes / 1e9 / sftp_batch(sshd_port, &key, &user, &format!("get {} {}\n", remote_native.display(), back.display())));
        let _ = fs::remove_file(&back);
        sh("sync");
        gm.push(bytes / 1e9 / sftp_batch(alk_port, &key, "default", &format!("get /sftp{r}.bin {}\n", back.display())));
    }
    let mut rows = Vec::new();
    let mib = bytes / (1024.0 * 1024.0);
    let (n, m) = (median(pn), median(pm));
    row(&mut rows, &format!("sftp put {mib:.0} MiB"), n, m, "GB/s", m / n, "≥ 0.8× (OpenSSH sshd)");
    let (n, m) = (median(gn), median(gm));
    row(&mut rows, &format!("sftp get {mib:.0} MiB"), n, m, "GB/s", m / n, "≥ 0.8× (OpenSSH sshd)");
    Ok(rows)
}
