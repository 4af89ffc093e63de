//! The README tells the truth: its set-up block is the two commands a newcomer runs (the
//! node, and the very test command CI runs), and its example block runs as written, line by
//! line in a shell, against a running node, with `alkfs` on the PATH as the README says to put it.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Node, Store, BIN};

/// The fenced `sh` blocks of the README, in order, as lines without comments.
fn sh_blocks() -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(block), l) => {
                let code = l.split(" # ").next().unwrap().trim();
                if !code.is_empty() && !code.starts_with('#') {
                    block.push(code.to_string());
                }
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn the_setup_block_is_the_node_and_the_ci_test_command() {
    let blocks = sh_blocks();
    let setup = &blocks[0];
    assert_eq!(setup.len(), 2, "exactly two set-up commands: {setup:?}");
    assert!(setup[0].contains("node run"), "the first runs the node: {}", setup[0]);
    let ci = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/run")).unwrap();
    assert!(ci.lines().any(|l| l.trim().starts_with(&setup[1])), "CI runs the README's test command ({}):\n{ci}", setup[1]);
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(readme.contains("cargo install --path ."), "the README says how to put alkfs on the PATH");
}

#[test]
fn the_example_block_runs_as_written_against_a_running_node() {
    let example = &sh_blocks()[1];
    assert!(example.iter().any(|l| l.starts_with("alkfs put")), "the second block is the example: {example:?}");
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    for line in example {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", line])
            .current_dir(s.scratch())
            .env("PATH", &path)
            .env("ALKFS_DATA", s.data())
            .env_remove("XDG_DATA_HOME")
            .output()
            .unwrap();
        assert!(out.status.success(), "README line `{line}` failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(std::fs::read(s.scratch().join("report-again.txt")).unwrap(), b"first draft\n", "the example's restore brought the first draft back");
    let status = common::status_json(s.data()).unwrap();
    assert_eq!(status["pid"], node.pid(), "the node served the example");
}
