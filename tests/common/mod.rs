//! Shared helpers for the end-to-end tests of the `alkfs` binary: a store in a temporary data
//! dir, commands run as real processes, and local files of seeded random bytes.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

pub mod mount;
pub mod peer;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_alkfs");

/// A data dir (and a scratch dir for local files) under one temporary directory.
pub struct Store {
    /// Keeps the temporary directory alive; `None` when the data dir lives elsewhere.
    _tmp: Option<TempDir>,
    data: PathBuf,
    scratch: TempDir,
}

impl Store {
    /// A freshly initialised store.
    pub fn new() -> Self {
        let s = Self::uninit();
        s.ok(&["init"]);
        s
    }

    /// A data dir path that was never initialised (the directory does not exist yet).
    pub fn uninit() -> Self {
        let tmp = TempDir::new().expect("temp dir");
        let data = tmp.path().join("data");
        Store { _tmp: Some(tmp), data, scratch: TempDir::new().expect("scratch dir") }
    }

    /// A store in `data` (which the caller owns, e.g. a tmpfs mount), initialised.
    pub fn at(data: &Path) -> Self {
        let s = Store { _tmp: None, data: data.to_path_buf(), scratch: TempDir::new().expect("scratch dir") };
        s.ok(&["init"]);
        s
    }

    /// The data directory.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// A directory outside the data dir for local source and destination files.
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// `alkfs --data DATA ARGS…`, with the environment's ALKFS_* and RUST_LOG removed.
    pub fn cmd(&self, args: &[&str]) -> Command {
        cmd_in(&self.data, args)
    }

    /// Runs a command to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("spawn alkfs")
    }

    /// Runs a command with `input` on its stdin.
    pub fn run_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self.cmd(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn alkfs");
        let mut stdin = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            // A command that fails early closes its stdin: a broken pipe here is not our error.
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().expect("wait alkfs");
        writer.join().expect("stdin writer");
        out
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        String::from_utf8(self.ok_bytes(args)).expect("stdout is UTF-8")
    }

    /// Runs a command that must succeed; returns its stdout as bytes.
    pub fn ok_bytes(&self, args: &[&str]) -> Vec<u8> {
        expect_ok(args, self.run(args))
    }

    /// Runs a command that must fail; returns its stderr.
    pub fn err(&self, args: &[&str]) -> String {
        expect_err(args, self.run(args))
    }

    /// Stores `bytes` at `path` through `put -` (stdin); extra global flags go first.
    pub fn put_bytes_with(&self, flags: &[&str], path: &str, bytes: &[u8]) {
        let mut args = flags.to_vec();
        args.extend(["put", "-", path]);
        expect_ok(&args, self.run_stdin(&args, bytes));
    }

    /// Stores `bytes` at `path` through stdin.
    pub fn put_bytes(&self, path: &str, bytes: &[u8]) {
        self.put_bytes_with(&[], path, bytes);
    }

    /// The bytes of `path` (via `get` to stdout); extra global flags go first.
    pub fn get_bytes_with(&self, flags: &[&str], path: &str) -> Vec<u8> {
        let mut args = flags.to_vec();
        args.extend(["get", path]);
        self.ok_bytes(&args)
    }

    /// The bytes of `path` via `get` to stdout.
    pub fn get_bytes(&self, path: &str) -> Vec<u8> {
        self.get_bytes_with(&[], path)
    }

    /// The names `ls PATH` prints (directories with their trailing `/`).
    pub fn ls_with(&self, flags: &[&str], path: &str) -> Vec<String> {
        let mut args = flags.to_vec();
        args.extend(["ls", path]);
        self.ok(&args).lines().map(str::to_string).collect()
    }

    /// The names `ls PATH` prints.
    pub fn ls(&self, path: &str) -> Vec<String> {
        self.ls_with(&[], path)
    }

    /// `ls --json PATH`, parsed.
    pub fn ls_json(&self, path: &str) -> Vec<serde_json::Value> {
        parse_json_array(&self.ok(&["ls", "--json", path]))
    }

    /// `log --json PATH`, parsed (newest first).
    pub fn log_json(&self, flags: &[&str], path: &str) -> Vec<serde_json::Value> {
        let mut args = flags.to_vec();
        args.extend(["log", "--json", path]);
        parse_json_array(&self.ok(&args))
    }

    /// Files directly in `DATA/content/staging`.
    pub fn staging_files(&self) -> Vec<PathBuf> {
        list_dir(&self.data.join("content").join("staging"))
    }

    /// Every file blob under `DATA/content/<hh>/` (staging excluded).
    pub fn blob_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for dir in list_dir(&self.data.join("content")) {
            if dir.is_dir() && dir.file_name().is_some_and(|n| n != "staging") {
                out.extend(list_dir(&dir));
            }
        }
        out
    }
}

/// `alkfs --data DATA ARGS…` for any data dir (also from threads that do not own a [`Store`]),
/// with the environment's ALKFS_* (flags, config overrides, fault injection) and RUST_LOG
/// removed and stdin closed.
pub fn cmd_in(data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--data").arg(data).args(args);
    // Nodes the tests start stay on loopback: a free port, no relay, no discovery.
    c.env("ALKFS_NET_LISTEN", "127.0.0.1:0").env("ALKFS_NET_RELAY", "disabled");
    for var in ["RUST_LOG", "XDG_DATA_HOME"] {
        c.env_remove(var);
    }
    for (var, _) in std::env::vars_os().filter(|(k, _)| k.to_string_lossy().starts_with("ALKFS_")) {
        c.env_remove(var);
    }
    c.stdin(Stdio::null());
    c
}

/// Runs `alkfs --data DATA put - PATH` with `input` on stdin.
pub fn put_stdin_in(data: &Path, path: &str, input: &[u8]) -> Output {
    let mut child = cmd_in(data, &["put", "-", path]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn alkfs");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input); // a put that fails early closes its stdin
    });
    let out = child.wait_with_output().expect("wait alkfs");
    writer.join().expect("stdin writer");
    out
}

/// Asserts that a run succeeded; returns its stdout.
pub fn expect_ok(args: &[&str], out: Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "alkfs {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Asserts that a run failed the way the CLI promises (exit 1, one `alkfs: error:` line, no
/// panic); returns its stderr.
pub fn expect_err(args: &[&str], out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "alkfs {args:?}: expected exit 1, got {}; stderr: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "alkfs {args:?} panicked: {stderr}");
    let errors = stderr.lines().filter(|l| l.starts_with("alkfs: error: ")).count();
    assert_eq!(errors, 1, "alkfs {args:?}: expected one `alkfs: error:` line, stderr: {stderr}");
    stderr
}

/// Parses a JSON array printed by `--json`.
/// The writer's seq of a version id as printed (`17@3f2a9c1b02` → 17).
pub fn version_seq(v: &serde_json::Value) -> i64 {
    let text = v.as_str().unwrap_or_else(|| panic!("a version id is a string: {v}"));
    text.split('@').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("not a version id: {text}"))
}

pub fn parse_json_array(text: &str) -> Vec<serde_json::Value> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Array(items)) => items,
        other => panic!("expected a JSON array, got {other:?} from {text:?}"),
    }
}

/// The entries of `dir`, sorted (empty when it does not exist).
pub fn list_dir(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.expect("dir entry").path()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// `len` pseudo-random bytes from `seed` (SplitMix64: fast, and distinct seeds give
/// distinct contents).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a file of `len` random bytes from `seed`, in chunks (for files of hundreds of MB).
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    const CHUNK: u64 = 8 << 20;
    let mut f = File::create(path).expect("create random file");
    let mut done = 0;
    let mut i = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        f.write_all(&random_bytes(n as usize, seed.wrapping_mul(1_000_003).wrapping_add(i))).expect("write random file");
        done += n;
        i += 1;
    }
    f.sync_all().expect("sync random file");
}

/// True when two local files hold the same bytes (sizes first, then streamed).
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (ma, mb) = (fs::metadata(a).expect("stat a"), fs::metadata(b).expect("stat b"));
    if ma.len() != mb.len() {
        return false;
    }
    let (mut ra, mut rb) = (BufReader::new(File::open(a).expect("open a")), BufReader::new(File::open(b).expect("open b")));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = ra.read(&mut ba).expect("read a");
        if n == 0 {
            return true;
        }
        rb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// Disk usage of everything below `dir` (like `du`: allocated blocks).
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in list_dir(dir) {
        let meta = fs::symlink_metadata(&entry).expect("stat");
        total += meta.blocks() * 512;
        if meta.is_dir() {
            total += dir_size(&entry);
        }
    }
    total
}

/// A spawned process killed (and reaped) when dropped, so a failing test leaves nothing behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `reader` line by line on a thread; the lines arrive on the returned channel.
pub fn line_channel(reader: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Receives lines until one satisfies `pred`, or panics after `timeout`. Returns the lines
/// seen, the matching one last.
pub fn await_line(rx: &mpsc::Receiver<String>, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = std::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = pred(&line);
                seen.push(line);
                if hit {
                    return seen;
                }
            }
            Err(e) => panic!("waiting for {what}: {e:?} after {timeout:?}; lines so far: {seen:#?}"),
        }
    }
}

/// Polls `cond` every few milliseconds until it holds, or panics after `timeout`. For state
/// another process changes (a file appearing) where no notification exists.
pub fn await_cond(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------------------
// The node: `alkfs node run` as a child process, its status, and a load of concurrent puts.
// ---------------------------------------------------------------------------------------

/// How long a node may take to answer `status` after it was started.
pub const NODE_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `sig` to process `pid`.
pub fn send_signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we spawned (and have not reaped yet) and a valid signal.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

/// A running `alkfs node run`, with its stderr (the log) in a file. Dropping it SIGTERMs the
/// node, then SIGKILLs it if it has not exited within a few seconds, and reaps it: a failing
/// test leaves no node behind.
pub struct Node {
    child: Child,
    log: PathBuf,
    data: PathBuf,
    exited: Option<std::process::ExitStatus>,
}

impl Node {
    /// Spawns `alkfs --data DATA node run ARGS…` with `env` added; does not wait for it.
    pub fn spawn(s: &Store, args: &[&str], env: &[(&str, &str)]) -> Node {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = s.scratch().join(format!("node-{n}.log"));
        let mut full = vec!["node", "run"];
        full.extend_from_slice(args);
        let mut cmd = s.cmd(&full);
        cmd.envs(env.iter().copied()).stdout(Stdio::null()).stderr(File::create(&log).expect("node log file"));
        let child = cmd.spawn().expect("spawn alkfs node run");
        Node { child, log, data: s.data().to_path_buf(), exited: None }
    }

    /// Spawns a node and waits until it answers `status` (see [`Node::await_ready`]).
    pub fn start(s: &Store, args: &[&str], env: &[(&str, &str)]) -> Node {
        let mut node = Self::spawn(s, args, env);
        node.await_ready();
        node
    }

    /// A node with fault injection enabled (`ALKFS_FAULT_INJECTION=1`), ready.
    pub fn start_faulty(s: &Store, args: &[&str]) -> Node {
        Self::start(s, args, &[("ALKFS_FAULT_INJECTION", "1")])
    }

    /// Polls `status --json` until this node (by pid) answers; panics, with the node's log, if
    /// it exits first or does not answer within [`NODE_READY_TIMEOUT`].
    pub fn await_ready(&mut self) -> serde_json::Value {
        let deadline = std::time::Instant::now() + NODE_READY_TIMEOUT;
        loop {
            if let Some(st) = status_json(&self.data) {
                if st["pid"] == self.pid() {
                    return st;
                }
            }
            if let Some(status) = self.try_wait() {
                panic!("the node exited with {status} before it was ready; its log:\n{}", self.log());
            }
            assert!(std::time::Instant::now() < deadline, "the node did not answer status within {NODE_READY_TIMEOUT:?}; its log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the node wrote to stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status if it has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait node");
        }
        self.exited
    }

    /// Waits up to `timeout` for the node to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `sig` to the node (it must still be running).
    pub fn signal(&mut self, sig: libc::c_int) {
        assert!(self.try_wait().is_none(), "signalling a node that already exited with {:?}; its log:\n{}", self.exited, self.log());
        send_signal(self.pid(), sig);
    }

    /// Sends `sig` and waits up to `timeout` for the exit; panics (with the log) on timeout.
    pub fn stop_with(&mut self, sig: libc::c_int, timeout: Duration) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        self.signal(sig);
        match self.wait_timeout(timeout) {
            Some(st) => st,
            None => panic!("the node did not exit within {timeout:?} of signal {sig} ({:?} so far); its log:\n{}", started.elapsed(), self.log()),
        }
    }

    /// SIGKILLs the node and reaps it.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let st = self.wait_timeout(Duration::from_secs(10)).expect("a SIGKILLed node is reaped");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(libc::SIGKILL), "the node ended with {st} instead of the kill");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        // SAFETY: the child has not been reaped, so its pid is still ours.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        if self.wait_timeout(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `alkfs status --json` of the node of `data`, parsed; `None` when no node answers.
pub fn status_json(data: &Path) -> Option<serde_json::Value> {
    let out = cmd_in(data, &["status", "--json"]).output().expect("spawn alkfs status");
    if !out.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))))
}

/// The health entry of `actor` (`store`, `outbox`, `blobs`, `gc`) in a status.
pub fn actor_health<'a>(status: &'a serde_json::Value, actor: &str) -> &'a serde_json::Value {
    let name = format!("alkfs-{actor}");
    status["actors"]
        .as_array()
        .and_then(|all| all.iter().find(|a| a["name"] == name.as_str()))
        .unwrap_or_else(|| panic!("no actor {name} in status {status:#}"))
}

/// Polls `status --json` until `cond` holds for it, or panics after `timeout` (showing the last
/// status). Returns the status that satisfied it.
pub fn await_status(data: &Path, timeout: Duration, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(st) = status_json(data) {
            if cond(&st) {
                return st;
            }
            last = Some(st);
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}; last status: {last:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One put of the load: its path and the seed and length of its bytes.
#[derive(Clone, Debug)]
pub struct Put {
    /// Path in the tree.
    pub path: String,
    /// Length of the content.
    pub len: usize,
    /// Seed of the content.
    pub seed: u64,
}

impl Put {
    /// The content.
    pub fn bytes(&self) -> Vec<u8> {
        random_bytes(self.len, self.seed)
    }
}

/// Client threads that each keep running `alkfs put - /cN/fI` (distinct paths and contents),
/// recording which puts were acknowledged (exit 0) and which failed (with their stderr).
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    acked: std::sync::Arc<std::sync::Mutex<Vec<Put>>>,
    failed: std::sync::Arc<std::sync::Mutex<Vec<(Put, String)>>>,
}

impl Load {
    /// Starts `clients` writer threads against `data`, writing `/cN/fI`. Sizes cycle through
    /// inline content, one data frame, several frames (the streamed path) and tiny files.
    pub fn start(data: &Path, clients: usize) -> Load {
        Self::start_in(data, clients, "", 0)
    }

    /// Like [`Load::start`], writing `PREFIX/cN/fI` with contents seeded by `round` too (so
    /// several loads on one store never share a path or a content).
    pub fn start_in(data: &Path, clients: usize, prefix: &str, round: u64) -> Load {
        let mut load = Load { stop: Default::default(), threads: Vec::new(), acked: Default::default(), failed: Default::default() };
        for c in 0..clients {
            let (stop, acked, failed, data, prefix) = (load.stop.clone(), load.acked.clone(), load.failed.clone(), data.to_path_buf(), prefix.to_string());
            load.threads.push(std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let len = match i % 5 {
                        0 => 100 + i as usize,
                        1 => 16 * 1024 + 1 + i as usize,
                        2 => 300_000 + i as usize,
                        3 => (1 << 20) + 12_345 + i as usize,
                        _ => 1,
                    };
                    let put = Put { path: format!("{prefix}/c{c}/f{i}"), len, seed: round << 48 | (c as u64) << 32 | i };
                    let out = put_stdin_in(&data, &put.path, &put.bytes());
                    if out.status.success() {
                        acked.lock().unwrap().push(put);
                    } else {
                        failed.lock().unwrap().push((put, String::from_utf8_lossy(&out.stderr).into_owned()));
                    }
                    i += 1;
                }
            }));
        }
        load
    }

    /// Puts acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Puts failed so far.
    pub fn failed(&self) -> usize {
        self.failed.lock().unwrap().len()
    }

    /// Waits until at least `n` puts were acknowledged, or panics after `timeout`.
    pub fn await_acked(&self, n: usize, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.acked() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {n} acknowledged puts ({} so far, {} failed: {:?})",
                self.acked(),
                self.failed(),
                self.failed.lock().unwrap().last()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the clients (each finishes the put in hand); returns (acknowledged, failed).
    pub fn stop(mut self) -> (Vec<Put>, Vec<(Put, String)>) {
        self.halt();
        (std::mem::take(&mut *self.acked.lock().unwrap()), std::mem::take(&mut *self.failed.lock().unwrap()))
    }

    fn halt(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().expect("a load client panicked");
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The distinct error messages of failed puts (paths and numbers masked), with their counts:
/// for the test's output.
pub fn failure_kinds(failed: &[(Put, String)]) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for (put, why) in failed {
        let line = why.lines().find(|l| l.starts_with("alkfs: error:")).unwrap_or(why.as_str()).replace(&put.path, "PATH");
        let masked: String = line.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).collect();
        *kinds.entry(masked).or_insert(0) += 1;
    }
    kinds
}

/// Checks the store (read directly, as `get` does) against a load's outcome: every
/// acknowledged put reads back with its exact bytes, and a failed put either left nothing at
/// its path or its exact bytes (it may have committed before the failure was reported), never
/// anything else. Reads run on a few threads.
pub fn verify_puts(data: &Path, acked: &[Put], failed: &[(Put, String)]) {
    let listed: std::collections::HashSet<String> = {
        let dirs: std::collections::BTreeSet<&str> = acked.iter().chain(failed.iter().map(|(p, _)| p)).map(|p| p.path.rsplit_once('/').unwrap().0).collect();
        let mut names = std::collections::HashSet::new();
        for dir in dirs {
            let out = cmd_in(data, &["ls", "--json", dir]).output().expect("spawn alkfs ls");
            if !out.status.success() {
                continue; // a client none of whose puts committed
            }
            for row in parse_json_array(&String::from_utf8_lossy(&out.stdout)) {
                names.insert(row["path"].as_str().expect("path").to_string());
            }
        }
        names
    };
    let missing: Vec<&str> = acked.iter().filter(|p| !listed.contains(&p.path)).map(|p| p.path.as_str()).collect();
    assert!(missing.is_empty(), "{} acknowledged puts are missing from the tree: {missing:?}", missing.len());
    let mut to_read: Vec<(Put, bool)> = acked.iter().map(|p| (p.clone(), true)).collect();
    to_read.extend(failed.iter().filter(|(p, _)| listed.contains(&p.path)).map(|(p, _)| (p.clone(), false)));
    let chunks: Vec<Vec<(Put, bool)>> = to_read.chunks(to_read.len().div_ceil(4).max(1)).map(<[_]>::to_vec).collect();
    std::thread::scope(|scope| {
        for chunk in chunks {
            scope.spawn(move || {
                for (put, was_acked) in chunk {
                    let out = cmd_in(data, &["get", &put.path]).output().expect("spawn alkfs get");
                    assert!(out.status.success(), "get {} (acknowledged: {was_acked}) failed: {}", put.path, String::from_utf8_lossy(&out.stderr));
                    assert!(out.stdout == put.bytes(), "{} (acknowledged: {was_acked}) reads back {} bytes, not its {} bytes", put.path, out.stdout.len(), put.len);
                }
            });
        }
    });
}

/// A raw connection to the control socket of the node of `data` (10 s read and write timeouts).
pub fn raw_connect(data: &Path) -> std::os::unix::net::UnixStream {
    let stream = std::os::unix::net::UnixStream::connect(data.join("alkfs.sock")).expect("connect to the node");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

/// Sends one frame: 4-byte big-endian length, then `payload`.
pub fn send_frame(stream: &mut impl Write, payload: &[u8]) {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    stream.write_all(&frame).expect("send a frame");
}

/// Reads one reply frame and parses it; `None` when the node closed the connection instead.
pub fn recv_reply(stream: &mut impl Read) -> Option<serde_json::Value> {
    let mut header = [0u8; 4];
    match stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => return None,
        Err(e) => panic!("reading a reply: {e}"),
    }
    let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut payload).expect("read a reply");
    Some(serde_json::from_slice(&payload).unwrap_or_else(|e| panic!("the reply is not JSON ({e}): {}", String::from_utf8_lossy(&payload))))
}

/// What a test does when something it needs from the machine is missing (root, a tool):
/// under CI (`CI` set, as `.ci/run` does) that is a broken set-up and the test fails loudly;
/// in a local run it says what it skipped and why, and returns false.
pub fn precondition(holds: bool, what: &str) -> bool {
    if holds {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "precondition missing in CI: {what} (.ci/run installs and runs as root)");
    eprintln!("SKIPPED (local run): {what}");
    false
}

/// True when `tool` runs (`tool --version` succeeds).
pub fn have_tool(tool: &str) -> bool {
    Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// True when this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// libfaketime (its thread-safe build), if installed (Debian's `faketime` package).
pub fn libfaketime() -> Option<PathBuf> {
    ["/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1", "/usr/lib/faketime/libfaketimeMT.so.1"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The environment that runs a process under libfaketime with its wall clock at `spec`
/// (libfaketime's FAKETIME: `@2027-06-01 12:00:00` starts there and ticks on, `+2d` runs two
/// days ahead); monotonic clocks are left alone. Same pid: no wrapper process.
pub fn faketime_env(spec: &str) -> Vec<(&'static str, String)> {
    let lib = libfaketime().expect("libfaketime is installed (apt install faketime)");
    vec![("LD_PRELOAD", lib.display().to_string()), ("FAKETIME", spec.to_string()), ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()), ("TZ", "UTC".into())]
}

/// `cmd` with its wall clock starting at `time` (`YYYY-MM-DD hh:mm:ss` UTC) and ticking on.
pub fn at_time(cmd: &Command, time: &str) -> Command {
    let mut c = Command::new(cmd.get_program());
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.envs(faketime_env(&format!("@{time}")));
    c
}

/// A tmpfs mounted for the test, unmounted when dropped (also when the test fails).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::TempDir::new().unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let out = Command::new("umount").arg(self.dir.path()).output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            // Busy (a child still running): detach it lazily rather than leak the mount.
            let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
        }
    }
}
