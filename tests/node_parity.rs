//! The CLI gives the same results whether its writes go through a running node's socket or
//! straight into the store: one table of command steps, run once against a data dir without a
//! node and once against a data dir whose node is running, compared step by step (exit status,
//! normalised stdout, and the error message of a failing step) and then as a whole (every
//! directory's listing and every file's bytes).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use common::{random_bytes, status_json, Node, Store};
use serde_json::Value;

/// One command of the table. `{SRC}` in an argument is the local sources directory (shared by
/// both runs, so local mtimes and modes are the same); `{LOSER}` is the losing version of the
/// merge conflict, taken from this run's own `conflicts --json`.
struct Step {
    args: Vec<&'static str>,
    stdin: Option<Vec<u8>>,
    ok: bool,
    /// For some reads: the exact stdout both runs must print.
    expect: Option<&'static [u8]>,
}

fn ok(args: &[&'static str]) -> Step {
    Step { args: args.to_vec(), stdin: None, ok: true, expect: None }
}

fn ok_in(args: &[&'static str], stdin: impl Into<Vec<u8>>) -> Step {
    Step { stdin: Some(stdin.into()), ..ok(args) }
}

fn get(path: &'static str, expect: &'static [u8]) -> Step {
    Step { expect: Some(expect), ..ok(&["get", path]) }
}

fn fails(args: &[&'static str]) -> Step {
    Step { ok: false, ..ok(args) }
}

fn fails_in(args: &[&'static str], stdin: &[u8]) -> Step {
    Step { stdin: Some(stdin.to_vec()), ..fails(args) }
}

const FEAT: &str = "--branch=feat";

fn steps() -> Vec<Step> {
    vec![
        ok(&["put", "{SRC}/hello.txt", "/hello.txt"]),
        ok_in(&["put", "-", "/notes/stdin.txt"], "from stdin\n"),
        ok_in(&["put", "-", "/big.bin"], random_bytes(2_500_000, 7)), // several data frames
        ok(&["put", "-r", "{SRC}/tree", "/tree"]),
        ok(&["mkdir", "-p", "/a/b/c"]),
        fails(&["mkdir", "/a"]), // exists, no -p
        ok(&["mv", "/hello.txt", "/a/b"]),
        ok(&["mv", "/a/b/hello.txt", "/"]), // into the root
        ok(&["mv", "/hello.txt", "/a/b"]),
        ok_in(&["put", "-", "/cafe\u{301}.txt"], "sent as NFD"),
        get("/caf\u{e9}.txt", b"sent as NFD"),
        ok(&["mv", "/tree/sub/deep.txt", "/tree/renamed.txt"]),
        ok(&["rm", "/notes/stdin.txt"]),
        fails(&["rm", "/missing.txt"]),
        fails(&["rm", "/tree"]), // a non-empty directory without -r
        ok(&["rm", "-r", "/tree/sub"]),
        fails_in(&["put", "-", "../x"], b"escape"),
        fails(&["put", "{SRC}/tree", "/t2"]), // a directory without -r
        ok_in(&["put", "-", "/shared.txt"], "common ancestor"),
        ok(&["branch", "create", "feat"]),
        fails(&["branch", "create", "feat"]), // exists
        // main writes first, feat later: last writer wins, so feat's side wins the merge.
        ok_in(&["put", "-", "/shared.txt"], "main's edit"),
        ok_in(&[FEAT, "put", "-", "/shared.txt"], "feat's edit"),
        ok_in(&[FEAT, "put", "-", "/feat-only.txt"], "only on feat"),
        fails(&["merge", "main"]), // into itself
        ok(&["merge", "feat"]),
        get("/shared.txt", b"feat's edit"),
        get("/feat-only.txt", b"only on feat"),
        ok(&["conflicts"]),
        ok(&["conflicts", "--json"]),
        ok(&["restore", "/shared.txt", "--version", "{LOSER}"]),
        get("/shared.txt", b"main's edit"),
        ok(&["conflicts", "dismiss", "/shared.txt"]),
        fails(&["conflicts", "dismiss", "/shared.txt"]), // no longer listed
        ok(&["conflicts", "dismiss", "--all"]),
        fails(&["restore", "/shared.txt", "--version", "999999"]),
        ok(&["branch", "create", "tmp", "--from", "feat"]),
        ok(&["branch", "delete", "tmp"]),
        fails(&["branch", "delete", "main"]),
        ok(&["bucket", "create", "photos"]),
        ok_in(&["--bucket=photos", "put", "-", "/cat.jpg"], random_bytes(40_000, 9)),
        fails_in(&["--bucket=nosuch", "put", "-", "/x"], b"x"),
        ok(&["log", "/shared.txt"]),
        ok(&["log", "--json", "/shared.txt"]),
        ok(&["ls", "-l", "/"]),
        ok(&["gc", "--keep-versions", "0"]),
        ok(&["log", "/shared.txt"]),
        ok(&["branch", "list"]),
    ]
}

/// Replaces every ISO-8601 time (`2024-01-31T12:00:00Z`) with `<TIME>`.
fn mask_times(text: &str) -> String {
    let shape = b"dddd-dd-ddTdd:dd:ddZ";
    let b = text.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let hit = b.len() - i >= shape.len()
            && shape.iter().zip(&b[i..]).all(|(s, c)| if *s == b'd' { c.is_ascii_digit() } else { s == c });
        if hit {
            out.push_str("<TIME>");
            i += shape.len();
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Removes wall-clock fields from JSON output, at any depth.
fn strip_clock(v: &mut Value, keys: &[&str]) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !keys.contains(&k.as_str()));
            m.values_mut().for_each(|x| strip_clock(x, keys));
        }
        Value::Array(a) => a.iter_mut().for_each(|x| strip_clock(x, keys)),
        _ => {}
    }
}

/// What may differ between the runs, and only that:
/// - wall-clock times (ISO times in text, `written_ms`/`mtime_ms`/`at_ms` in JSON): each run
///   writes at its own time, and stdin puts and mkdirs stamp the time of the write;
/// - in the `gc:` line, the duration (`N ms`) and the count of pruned outbox events: the
///   node's outbox watcher is a registered consumer of the event stream and events are pruned
///   up to its cursor (which it advances asynchronously), while without a node nothing
///   consumes them.
///
/// Version numbers are NOT masked: they come from one clock advanced only by version rows,
/// so the same commands give the same versions with or without a node.
/// Masks the writer in version ids (`17@3f2a9c1b02` → `17@<NODE>`): each run is its own node.
fn mask_nodes(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('@') {
        let hex = rest[at + 1..].bytes().take_while(|c| c.is_ascii_hexdigit()).count();
        out.push_str(&rest[..=at]);
        if hex >= 10 {
            out.push_str("<NODE>");
        }
        rest = &rest[at + 1 + if hex >= 10 { hex } else { 0 }..];
    }
    out.push_str(rest);
    out
}

fn normalise(stdout: &str) -> String {
    let stdout = &mask_nodes(stdout);
    if let Ok(mut v) = serde_json::from_str::<Value>(stdout) {
        strip_clock(&mut v, &["written_ms", "mtime_ms", "at_ms"]);
        return v.to_string();
    }
    let masked: Vec<String> = mask_times(stdout)
        .lines()
        .map(|line| {
            if !line.starts_with("gc: ") {
                return line.to_string();
            }
            let w: Vec<&str> = line.split(' ').collect();
            (0..w.len()).map(|i| if matches!(w.get(i + 1), Some(&"ms") | Some(&"outbox")) { "<N>" } else { w[i] }).collect::<Vec<_>>().join(" ")
        })
        .collect();
    masked.join("\n")
}

/// A step's outcome.
#[derive(Debug, PartialEq)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Every directory's listing (wall clocks and versions removed) and every file's bytes, per
/// bucket and branch.
fn state(s: &Store) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for flags in [["--bucket=default", "--branch=main"], ["--bucket=default", "--branch=feat"], ["--bucket=photos", "--branch=main"]] {
        let mut dirs = vec!["/".to_string()];
        while let Some(dir) = dirs.pop() {
            let mut rows = common::parse_json_array(&s.ok(&[flags[0], flags[1], "ls", "--json", &dir]));
            for row in &mut rows {
                strip_clock(row, &["mtime_ms", "written_ms", "version"]);
                let path = row["path"].as_str().unwrap().to_string();
                match row["kind"].as_str() {
                    Some("dir") => dirs.push(path),
                    Some("file") => {
                        let bytes = s.ok_bytes(&[flags[0], flags[1], "get", &path]);
                        out.insert(format!("{flags:?} {path} bytes"), Value::from(bytes));
                    }
                    other => panic!("unexpected kind {other:?} in {row}"),
                }
            }
            out.insert(format!("{flags:?} ls {dir}"), Value::Array(rows));
        }
    }
    out
}

/// Runs the table against `s`; returns each step's outcome and the final state.
fn run_table(s: &Store, src: &Path) -> (Vec<Outcome>, BTreeMap<String, Value>) {
    let mut vars: HashMap<&str, String> = HashMap::from([("{SRC}", src.to_str().unwrap().to_string())]);
    let mut outcomes = Vec::new();
    for (i, step) in steps().into_iter().enumerate() {
        let args: Vec<String> = step.args.iter().map(|a| vars.iter().fold(a.to_string(), |a, (k, v)| a.replace(k, v))).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = match &step.stdin {
            Some(input) => s.run_stdin(&args, input),
            None => s.run(&args),
        };
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
        assert!(!stderr.contains("panicked"), "step {i} {args:?} panicked: {stderr}");
        if step.ok {
            assert!(out.status.success(), "step {i} {args:?} should succeed: {stderr}");
        } else {
            common::expect_err(&args, out.clone());
        }
        if let Some(want) = step.expect {
            assert_eq!(out.stdout, want, "step {i} {args:?}: stdout");
        }
        if args == ["conflicts", "--json"] {
            let rows = common::parse_json_array(&stdout);
            assert_eq!(rows.len(), 1, "one conflict: {rows:?}");
            vars.insert("{LOSER}", rows[0]["loser_version"].as_str().expect("a version id").to_string());
        }
        let stdout = if out.status.success() { normalise(&stdout) } else { String::new() };
        let stderr = stderr.replace(s.data().to_str().unwrap(), "<DATA>");
        outcomes.push(Outcome { code: out.status.code(), stdout, stderr });
    }
    (outcomes, state(s))
}

#[test]
fn every_command_gives_the_same_result_with_and_without_a_node() {
    let direct = Store::new();
    let served = Store::new();
    let src = direct.scratch().join("src");
    fs::create_dir_all(src.join("tree/sub")).unwrap();
    fs::write(src.join("hello.txt"), "hello, world\n").unwrap();
    fs::write(src.join("tree/a.txt"), "a").unwrap();
    fs::write(src.join("tree/b.bin"), random_bytes(70_000, 3)).unwrap();
    fs::write(src.join("tree/sub/deep.txt"), "deep").unwrap();
    fs::write(src.join("tree/sub/other.txt"), "other").unwrap();

    let (without, state_without) = run_table(&direct, &src);
    assert!(status_json(direct.data()).is_none(), "no node ran on the direct store");

    let node = Node::start(&served, &[], &[]);
    let (with, state_with) = run_table(&served, &src);
    // The node served those writes: it answers status, it holds the write lock (so no
    // command could have written directly), and a command that needs the lock says a node runs.
    let status = status_json(served.data()).expect("the node still answers");
    assert_eq!(status["pid"], node.pid(), "{status:#}");
    assert_eq!(fs::read_to_string(served.data().join("lock")).unwrap().trim(), node.pid().to_string(), "the node holds the lock");
    let err = served.err(&["blobs", "index"]);
    assert!(err.contains("node is running"), "{err}");
    assert!(status["outbox_cursor"].as_i64().unwrap() > 0, "the node consumed the writes' events: {status:#}");

    drop(node);

    let table = steps();
    assert_eq!(with.len(), without.len());
    for (i, (a, b)) in without.iter().zip(&with).enumerate() {
        let args = &table[i].args;
        assert_eq!(a.code, b.code, "step {i} {args:?}: exit status without a node vs with one; stderr: {:?} vs {:?}", a.stderr, b.stderr);
        assert_eq!(a.stdout, b.stdout, "step {i} {args:?}: stdout without a node vs with one");
        if a.code != Some(0) {
            assert_eq!(a.stderr, b.stderr, "step {i} {args:?}: the error message without a node vs with one");
        }
    }
    let keys: Vec<&String> = state_without.keys().collect();
    assert_eq!(keys, state_with.keys().collect::<Vec<_>>(), "the same directories and files");
    for (k, v) in &state_without {
        assert_eq!(v, &state_with[k], "{k}: without a node vs with one");
    }
    assert!(state_without.keys().any(|k| k.contains("photos") && k.ends_with("/cat.jpg bytes")), "the table reached the photos bucket");
}

/// `gc` without flags collects by the retention in `DATA/config.toml`, with or without a node:
/// one source of settings, one mapping of flags.
#[test]
fn gc_follows_the_configured_retention_with_and_without_a_node() {
    let versions_left = |s: &Store| s.log_json(&[], "/f").len();
    let direct = Store::new();
    let served = Store::new();
    for s in [&direct, &served] {
        fs::write(s.data().join("config.toml"), "[gc]\nkeep_versions = 1\nkeep_days = 0\n").unwrap();
    }
    let node = Node::start(&served, &[], &[]);
    for s in [&direct, &served] {
        for i in 0..5 {
            s.put_bytes("/f", format!("version {i}").as_bytes());
        }
        s.ok(&["gc"]);
    }
    assert_eq!(versions_left(&direct), 2, "gc without a node ignored config.toml (head + keep_versions = 1)");
    assert_eq!(versions_left(&served), 2, "the node's gc follows config.toml");
    // A flag overrides the configured rule the same way on both.
    for s in [&direct, &served] {
        s.ok(&["gc", "--keep-versions", "0"]);
    }
    assert_eq!((versions_left(&direct), versions_left(&served)), (1, 1));
    drop(node);
}
