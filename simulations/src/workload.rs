//! Seeded workloads: what the nodes do and which faults strike when, drawn from a seed up
//! front as a schedule (so a failing schedule can be shrunk step by step), then played
//! against a [`Sim`] and checked at quiescence.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::node::Broken;
use crate::rng::Rng;
use crate::sim::{NetParams, Sim, Violation};

/// A workload's knobs; the named scenarios (`scenarios/*.toml`) set some of them.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workload {
    /// What the scenario shows (for `--list`).
    pub description: String,
    /// Nodes in the mesh.
    pub nodes: usize,
    /// Local operations per seed (writes, overwrites, deletes, renames, mkdirs).
    pub ops: usize,
    /// Simulated time the operations are spread over, ms.
    pub duration_ms: u64,
    /// Distinct file paths written (few paths: many same-path races).
    pub paths: usize,
    /// Partition episodes (a random split, healed 1–30 s later).
    pub partitions: usize,
    /// One-way links (a random direction cut until the next heal).
    pub one_way: usize,
    /// Session resets (a random pair's connection drops).
    pub resets: usize,
    /// Crashes (a random node killed, restarted 0.5–20 s later).
    pub crashes: usize,
    /// Nodes beyond `nodes` that join at a random time through a random member.
    pub joiners: usize,
    /// Members (never node 0) removed at a random time by another member.
    pub removals: usize,
    /// Strangers that push sync messages at members without being members.
    pub intruders: usize,
    /// A removal pinned by the scenario: (time ms, by, node).
    pub remove_at: Vec<(u64, usize, usize)>,
    /// Largest clock skew, ms (each node draws one in ±this).
    pub skew_ms: i64,
    /// Largest clock drift, ppm (each node draws one in ±this).
    pub drift_ppm: i64,
    /// Clock skews pinned by the scenario, ms, for nodes 0, 1, ... (over the drawn ones).
    pub fixed_skews_ms: Vec<i64>,
    /// A split pinned by the scenario: these nodes on one side, the rest on the other, from
    /// `split_ms.0` to `split_ms.1`.
    pub split: Vec<usize>,
    /// When the pinned split starts and heals, ms.
    pub split_ms: (u64, u64),
    /// A link that goes down and up every `flap_ms.0` ms from `flap_ms.1` on (between nodes
    /// 0 and 1), `flaps` times.
    pub flaps: usize,
    /// See `flaps`.
    pub flap_ms: (u64, u64),
    /// One-way latency range, ms.
    pub latency_ms: (u64, u64),
    /// Packet loss (each costs a retransmission's delay).
    pub loss: f64,
    /// Duplicated summaries and blob messages.
    pub dup: f64,
    /// The anti-entropy period, ms.
    pub tick_ms: u64,
    /// Branches besides main (`b0`, `b1`, ...) that operations create, write on and merge
    /// with main (0: main only).
    pub branches: usize,
    /// Kill the merging node right after each merge committed (before its documents were
    /// saved or anything reached a peer), restarting it 0.5–10 s later.
    pub crash_after_merge: bool,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            description: "the soak: random operations, splits, one-way links, resets, crashes and skewed clocks".into(),
            nodes: 5,
            ops: 1_000,
            duration_ms: 120_000,
            paths: 24,
            partitions: 4,
            one_way: 2,
            resets: 4,
            crashes: 3,
            joiners: 1,
            removals: 1,
            intruders: 1,
            remove_at: Vec::new(),
            skew_ms: 600_000,
            drift_ppm: 200,
            fixed_skews_ms: Vec::new(),
            split: Vec::new(),
            split_ms: (0, 0),
            flaps: 0,
            flap_ms: (0, 0),
            latency_ms: (1, 40),
            loss: 0.02,
            dup: 0.02,
            tick_ms: 1_000,
            branches: 2,
            crash_after_merge: false,
        }
    }
}

/// One thing that happens in a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A node writes a file (new bytes drawn from `content`) on main (`on` 0) or on branch
    /// `b{on - 1}`.
    Write { node: usize, path: usize, content: u64, on: usize },
    /// A node makes branch `b{name}` from main.
    Branch { node: usize, name: usize },
    /// A node merges branch `b{name}` into main, or main into it (`back`).
    Merge { node: usize, name: usize, back: bool },
    /// A node deletes a file it shows.
    Delete { node: usize, path: usize },
    /// A node renames a file it shows.
    Rename { node: usize, from: usize, to: usize },
    /// A node makes a directory.
    Mkdir { node: usize, dir: usize },
    /// These nodes lose their links to the others.
    Partition { side: Vec<usize> },
    /// The link from one node to another stops carrying anything.
    OneWay { from: usize, to: usize },
    /// A pair's session drops.
    Reset { a: usize, b: usize },
    /// Every link works again.
    Heal,
    /// A node is killed.
    Crash { node: usize },
    /// A node joins through a member.
    Join { node: usize, via: usize },
    /// A member removes another.
    Remove { by: usize, node: usize },
    /// A stranger pushes sync messages at a member.
    Intrude { node: usize, target: usize },
    /// A node starts again.
    Restart { node: usize },
}

/// An action at a simulated time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// When, ms since the start.
    pub at_ms: u64,
    /// What.
    pub action: Action,
}

/// What one seed's run gave.
#[derive(Clone, Debug)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// Events processed.
    pub events: u64,
    /// Faults injected.
    pub faults: u64,
    /// What broke (the first [`VIOLATIONS_KEPT`](crate::sim::VIOLATIONS_KEPT)).
    pub violations: Vec<Violation>,
    /// How many violations, in all.
    pub violation_count: u64,
    /// The hash of the run's events.
    pub trace: u64,
    /// Steps of its schedule played (operations and faults).
    pub steps: usize,
    /// Sync frames delivered.
    pub frames: u64,
    /// Of those, the ones that brought something.
    pub useful: u64,
}

fn file_path(i: usize) -> String {
    format!("/d{}/f{}", i % 3, i)
}

/// The schedule a seed gives, sorted by time (ties keep their drawing order).
pub fn schedule(seed: u64, w: &Workload) -> Vec<Step> {
    let mut rng = Rng::new(seed, 2);
    let n = w.nodes.max(1);
    // Members and joiners write; strangers only intrude.
    let writers = n + w.joiners;
    let paths = w.paths.max(1);
    let d = w.duration_ms.max(1);
    let mut steps = Vec::new();
    for _ in 0..w.ops {
        let at_ms = rng.below(d);
        let node = rng.below(writers as u64) as usize;
        let path = rng.below(paths as u64) as usize;
        let branches = w.branches as u64;
        let action = match rng.below(100) {
            0..=47 => Action::Write { node, path, content: rng.next_u64(), on: 0 },
            48..=59 => Action::Write { node, path, content: rng.next_u64(), on: if branches > 0 { 1 + rng.below(branches) as usize } else { 0 } },
            60..=72 => Action::Delete { node, path },
            73..=86 => Action::Rename { node, from: path, to: rng.below(paths as u64) as usize },
            87..=95 => Action::Mkdir { node, dir: rng.below(3) as usize },
            _ if branches == 0 => Action::Write { node, path, content: rng.next_u64(), on: 0 },
            96..=97 => Action::Branch { node, name: rng.below(branches) as usize },
            _ => Action::Merge { node, name: rng.below(branches) as usize, back: rng.chance(0.3) },
        };
        let merged = matches!(action, Action::Merge { .. });
        steps.push(Step { at_ms, action });
        if merged && w.crash_after_merge {
            steps.push(Step { at_ms, action: Action::Crash { node } });
            steps.push(Step { at_ms: at_ms + rng.between(500, 10_000), action: Action::Restart { node } });
        }
    }
    if n > 1 {
        for _ in 0..w.partitions {
            let at_ms = rng.below(d);
            let mut side: Vec<usize> = (0..n).filter(|_| rng.chance(0.5)).collect();
            if side.is_empty() || side.len() == n {
                side = vec![rng.below(n as u64) as usize];
            }
            steps.push(Step { at_ms, action: Action::Partition { side } });
            steps.push(Step { at_ms: at_ms + rng.between(1_000, 30_000), action: Action::Heal });
        }
        for _ in 0..w.one_way {
            let from = rng.below(n as u64) as usize;
            let to = (from + 1 + rng.below(n as u64 - 1) as usize) % n;
            steps.push(Step { at_ms: rng.below(d), action: Action::OneWay { from, to } });
        }
        for _ in 0..w.resets {
            let a = rng.below(n as u64) as usize;
            let b = (a + 1 + rng.below(n as u64 - 1) as usize) % n;
            steps.push(Step { at_ms: rng.below(d), action: Action::Reset { a, b } });
        }
    }
    for _ in 0..w.crashes {
        let at_ms = rng.below(d);
        let node = rng.below(n as u64) as usize;
        steps.push(Step { at_ms, action: Action::Crash { node } });
        steps.push(Step { at_ms: at_ms + rng.between(500, 20_000), action: Action::Restart { node } });
    }
    for j in 0..w.joiners {
        steps.push(Step { at_ms: rng.below(d), action: Action::Join { node: n + j, via: rng.below(n as u64) as usize } });
    }
    if n > 2 {
        for _ in 0..w.removals {
            let node = 1 + rng.below(n as u64 - 1) as usize;
            let by = (node + 1 + rng.below(n as u64 - 1) as usize) % n;
            steps.push(Step { at_ms: rng.below(d), action: Action::Remove { by, node } });
        }
    }
    for k in 0..w.intruders {
        steps.push(Step { at_ms: rng.below(d), action: Action::Intrude { node: writers + k, target: rng.below(n as u64) as usize } });
    }
    for &(at_ms, by, node) in &w.remove_at {
        steps.push(Step { at_ms, action: Action::Remove { by, node } });
    }
    if !w.split.is_empty() {
        steps.push(Step { at_ms: w.split_ms.0, action: Action::Partition { side: w.split.clone() } });
        steps.push(Step { at_ms: w.split_ms.1, action: Action::Heal });
    }
    for i in 0..w.flaps {
        let at_ms = w.flap_ms.1 + i as u64 * w.flap_ms.0;
        let action = if i % 2 == 0 { Action::Partition { side: vec![0] } } else { Action::Heal };
        steps.push(Step { at_ms, action });
    }
    steps.sort_by_key(|s| s.at_ms);
    steps
}

/// A mesh for `seed` as the workload describes it (nodes, clocks, network).
pub fn mesh(seed: u64, w: &Workload, broken: Option<Broken>) -> Sim {
    let mut rng = Rng::new(seed, 3);
    let clocks: Vec<(i64, i64)> = (0..w.nodes)
        .map(|i| {
            let skew = rng.between(0, 2 * w.skew_ms.max(0) as u64) as i64 - w.skew_ms.max(0);
            let drift = rng.between(0, 2 * w.drift_ppm.max(0) as u64) as i64 - w.drift_ppm.max(0);
            (w.fixed_skews_ms.get(i).copied().unwrap_or(skew), drift)
        })
        .collect();
    let mut sim = Sim::new(seed).network(NetParams { latency_ms: w.latency_ms, loss: w.loss, dup: w.dup, tick_ms: w.tick_ms }).clocks(&clocks);
    if let Some(rule) = broken {
        sim = sim.broken(rule);
    }
    sim.nodes(w.nodes).outsiders(w.joiners + w.intruders)
}

/// Plays `steps` (only those whose index `keep` holds, when given) against a mesh for
/// `seed`, then heals everything, restarts every node, and runs to quiescence.
pub fn run(seed: u64, w: &Workload, broken: Option<Broken>, steps: &[Step], keep: Option<&BTreeSet<usize>>) -> SeedReport {
    let mut sim = mesh(seed, w, broken);
    for (i, step) in steps.iter().enumerate() {
        if keep.is_some_and(|k| !k.contains(&i)) {
            continue;
        }
        sim.run_until(step.at_ms);
        match &step.action {
            Action::Write { node, path, content, on: 0 } => {
                sim.write(*node, &file_path(*path), &content.to_le_bytes());
            }
            Action::Write { node, path, content, on } => {
                sim.write_on(*node, &format!("b{}", on - 1), &file_path(*path), &content.to_le_bytes());
            }
            Action::Branch { node, name } => {
                sim.branch(*node, &format!("b{name}"), "main");
            }
            Action::Merge { node, name, back } => {
                let b = format!("b{name}");
                if *back {
                    sim.merge(*node, "main", &b);
                } else {
                    sim.merge(*node, &b, "main");
                }
            }
            Action::Delete { node, path } => {
                sim.delete(*node, &file_path(*path));
            }
            Action::Rename { node, from, to } => {
                sim.rename(*node, &file_path(*from), &file_path(*to));
            }
            Action::Mkdir { node, dir } => {
                sim.mkdir(*node, &format!("/d{dir}"));
            }
            Action::Partition { side } => {
                let other: Vec<usize> = (0..sim.len()).filter(|i| !side.contains(i)).collect();
                sim.partition(side, &other);
            }
            Action::OneWay { from, to } => sim.cut_one_way(*from, *to),
            Action::Reset { a, b } => sim.reset(*a, *b),
            Action::Heal => sim.heal(),
            Action::Crash { node } => sim.crash(*node),
            Action::Join { node, via } => {
                sim.join(*node, *via);
            }
            Action::Remove { by, node } => {
                sim.remove(*by, *node);
            }
            Action::Intrude { node, target } => sim.intrude(*node, *target),
            Action::Restart { node } => sim.restart(*node),
        }
    }
    sim.heal();
    for n in 0..sim.len() {
        sim.restart(n);
    }
    let _ = sim.run_until_quiet();
    let stats = sim.stats();
    SeedReport {
        seed,
        events: stats.events,
        faults: stats.faults,
        violations: sim.violations().to_vec(),
        violation_count: stats.violations,
        trace: sim.trace_hash(),
        steps: steps.iter().enumerate().filter(|(i, _)| keep.is_none_or(|k| k.contains(i))).count(),
        frames: stats.frames,
        useful: stats.useful,
    }
}

/// Reduces a failing schedule to a short one that still fails (delta debugging: drop
/// halves, then quarters, ... of what is kept, keeping each drop that still fails). Returns
/// the kept step indexes. At most `budget` runs.
pub fn shrink(seed: u64, w: &Workload, broken: Option<Broken>, steps: &[Step], budget: usize) -> BTreeSet<usize> {
    let mut keep: Vec<usize> = (0..steps.len()).collect();
    let mut runs = 0;
    let mut chunk = keep.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        while i < keep.len() && runs < budget {
            let trial: BTreeSet<usize> = keep.iter().enumerate().filter(|(j, _)| *j < i || *j >= i + chunk).map(|(_, s)| *s).collect();
            runs += 1;
            if !run(seed, w, broken, steps, Some(&trial)).violations.is_empty() {
                keep = trial.into_iter().collect();
            } else {
                i += chunk;
            }
        }
        if chunk == 1 || runs >= budget {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    keep.into_iter().collect()
}

/// `0-3,7,9-12` for a set of indexes (what `--keep` reads back).
pub fn ranges(set: &BTreeSet<usize>) -> String {
    let mut out: Vec<String> = Vec::new();
    let v: Vec<usize> = set.iter().copied().collect();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j { v[i].to_string() } else { format!("{}-{}", v[i], v[j]) });
        i = j + 1;
    }
    out.join(",")
}

/// Reads `0-3,7` back.
pub fn parse_ranges(s: &str) -> Result<BTreeSet<usize>, String> {
    let mut out = BTreeSet::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("bad step list {s:?}: expected e.g. 0-3,7");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                out.extend(a..=b);
            }
            None => {
                out.insert(part.parse().map_err(|_| bad())?);
            }
        }
    }
    Ok(out)
}
