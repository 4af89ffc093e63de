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
        let mut c = Command::new(BIN);
        c.arg("--data").arg(&self.data).args(args);
        for var in ["ALKFS_DATA", "ALKFS_BUCKET", "ALKFS_BRANCH", "RUST_LOG", "XDG_DATA_HOME"] {
            c.env_remove(var);
        }
        c.stdin(Stdio::null());
        c
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
