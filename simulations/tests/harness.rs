//! The harness itself: deterministic, able to fail, and its scenarios pass.

use alknet_simulations::workload::{self, schedule, Workload};
use alknet_simulations::{Broken, Sim};

fn scenario(name: &str) -> Workload {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios").join(format!("{name}.toml"));
    toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn a_seed_replays_the_same_trace_and_other_seeds_do_not() {
    let w = Workload { ops: 300, ..Workload::default() };
    let runs: Vec<_> = [11u64, 11, 12].iter().map(|&s| workload::run(s, &w, None, &schedule(s, &w), None)).collect();
    assert_eq!((runs[0].trace, runs[0].events, runs[0].faults), (runs[1].trace, runs[1].events, runs[1].faults));
    assert_ne!(runs[0].trace, runs[2].trace);
    assert!(runs[0].faults > 0 && runs[0].events > 1_000, "{:?}", runs[0]);
}

/// The bounded soak CI runs: the default workload (5 nodes, 1,000 operations, splits,
/// one-way links, resets, crashes, clocks up to 10 minutes off) over 40 seeds.
#[test]
fn forty_seeds_of_the_soak_break_no_invariant() {
    let w = Workload::default();
    for seed in 0..40 {
        let r = workload::run(seed, &w, None, &schedule(seed, &w), None);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}\nreplay: cargo run -p alknet-simulations --release -- --seed {seed} --verbose", r.violations);
    }
}

#[test]
fn every_named_scenario_passes_its_first_seeds() {
    for name in ["split-brain", "flapping-link", "clock-an-hour-behind", "crash-during-sync", "member-removed-during-a-partition"] {
        let w = scenario(name);
        for seed in 0..5 {
            let r = workload::run(seed, &w, None, &schedule(seed, &w), None);
            assert!(r.violations.is_empty(), "{name} seed {seed}: {:?}", r.violations);
            assert!(r.faults > 0, "{name} injects faults");
        }
    }
}

/// Deliberately broken rules are caught within a few hundred seeds (here: the first few),
/// and a failing schedule shrinks to a shorter one that still fails.
#[test]
fn a_broken_rule_is_caught_and_its_schedule_shrinks() {
    let w = Workload { ops: 150, ..Workload::default() };
    for rule in [Broken::ArrivalOrder, Broken::DropTombstones, Broken::OpenGate] {
        let failing = (0..300u64).find(|&s| !workload::run(s, &w, Some(rule), &schedule(s, &w), None).violations.is_empty());
        let seed = failing.unwrap_or_else(|| panic!("{rule:?} went unnoticed for 300 seeds"));
        let steps = schedule(seed, &w);
        let kept = workload::shrink(seed, &w, Some(rule), &steps, 200);
        assert!(kept.len() < steps.len() / 2, "{rule:?}: shrunk only to {} of {} steps", kept.len(), steps.len());
        assert!(!workload::run(seed, &w, Some(rule), &steps, Some(&kept)).violations.is_empty(), "the shrunk schedule still fails");
        let back = workload::parse_ranges(&workload::ranges(&kept)).unwrap();
        assert_eq!(back, kept, "the replay command's step list reads back");
    }
}

#[test]
fn a_write_made_after_seeing_a_version_replaces_it_on_a_clock_an_hour_behind() {
    let mut sim = Sim::new(3).clocks(&[(-3_600_000, 0), (0, 0), (0, 0)]).nodes(3);
    sim.write(1, "/plan.txt", b"from b, on time");
    sim.run_until_quiet().unwrap();
    // A's clock reads an hour before b's write; it saw that write, so its own replaces it.
    sim.write(0, "/plan.txt", b"from a, an hour behind");
    sim.run_until_quiet().unwrap();
    for n in 0..3 {
        assert_eq!(sim.tree(n)["/plan.txt"], b"from a, an hour behind", "node {n}");
        assert!(sim.conflicts(n).is_empty(), "node {n}: not a conflict, a later write");
    }
}

#[test]
fn a_split_brain_on_one_path_keeps_the_loser_listed_and_its_bytes_on_every_node() {
    let mut sim = Sim::new(5).nodes(4);
    sim.partition(&[0, 1], &[2, 3]);
    sim.write(0, "/same.txt", b"left");
    sim.write(3, "/same.txt", b"right");
    sim.run_for(5_000);
    assert_eq!(sim.tree(1)["/same.txt"], b"left");
    assert_eq!(sim.tree(2)["/same.txt"], b"right");
    sim.heal();
    sim.run_until_quiet().unwrap();
    let winner = sim.tree(0)["/same.txt"].clone();
    let loser: &[u8] = if winner == b"left" { b"right" } else { b"left" };
    for n in 0..4 {
        assert_eq!(sim.tree(n)["/same.txt"], winner, "node {n}");
        assert_eq!(sim.conflicts(n), vec![("/same.txt".to_string(), loser.to_vec())], "node {n}");
    }
}

#[test]
fn a_node_killed_before_saving_its_documents_still_delivers_what_it_committed() {
    let mut sim = Sim::new(9).nodes(3);
    sim.partition(&[0], &[1, 2]);
    sim.write(0, "/kept.txt", b"committed");
    sim.rename(0, "/kept.txt", "/moved.txt");
    // Killed before its documents were saved: only the committed changes survive.
    sim.crash(0);
    sim.heal();
    sim.run_for(3_000);
    assert!(!sim.tree(1).contains_key("/moved.txt"), "nothing reached the others while it was down");
    sim.restart(0);
    sim.run_until_quiet().unwrap();
    for n in 0..3 {
        assert_eq!(sim.tree(n).get("/moved.txt").map(Vec::as_slice), Some(&b"committed"[..]), "node {n}");
        assert!(!sim.tree(n).contains_key("/kept.txt"), "node {n}");
    }
}

/// The README's example, as written there (this test fails if the two part ways).
#[test]
fn the_readme_example_runs_as_written() {
    let readme = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let start = readme.find("```rust\nuse alknet_simulations::Sim;").expect("the README's example") + "```rust\n".len();
    let example = &readme[start..start + readme[start..].find("```").unwrap()];
    let here = include_str!("harness.rs");
    let body = &here[here.rfind("    // --- the README's example ---\n").unwrap()..];
    let ours: Vec<&str> = body.lines().skip(1).take_while(|l| *l != "    // --- end ---").map(str::trim).collect();
    let theirs: Vec<&str> = example.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    assert_eq!(ours, theirs, "the README's example and this test differ");
    // --- the README's example ---
    use alknet_simulations::Sim;
    let mut sim = Sim::new(7).nodes(3);
    let (a, b, c) = (0, 1, 2);
    sim.partition(&[a], &[b, c]);
    sim.write(a, "/notes.txt", b"written on a");
    sim.run_for(1_000);
    sim.write(b, "/notes.txt", b"written on b, unaware of a");
    sim.heal();
    sim.run_until_quiet().expect("no invariant broken");
    // Every node shows the same winner, and lists the other version as a conflict loser.
    assert_eq!(sim.tree(a), sim.tree(c));
    assert_eq!(sim.conflicts(b).len(), 1);
    // --- end ---
}

/// A rename is one operation of two versions that live in two shards and can reach a peer
/// apart: the peer holds the first back until the second is there, so it never shows the file
/// at neither path (or at both). (The harness checks this on every run; here with the two
/// halves' documents made to arrive far apart.)
#[test]
fn a_rename_reaches_a_peer_whole() {
    let mut sim = Sim::new(4).nodes(2);
    // Two paths in different shards, so the rename's halves travel in different documents.
    let (from, to) = (0..100)
        .map(|i| (format!("/r{i}"), format!("/s{i}")))
        .find(|(f, t)| {
            let b = alknet_simulations::node::MAIN;
            let shard = |p: &str| alknet_actors::proto::replica::shard_of(&b, &alknet_actors::proto::path::TreePath::parse(p).unwrap());
            shard(f) != shard(t)
        })
        .unwrap();
    sim.write(0, &from, b"moving");
    sim.run_until_quiet().unwrap();
    assert!(sim.rename(0, &from, &to));
    let mut seen = Vec::new();
    for _ in 0..200 {
        sim.run_for(1);
        let t = sim.tree(1);
        seen.push((t.contains_key(&from), t.contains_key(&to)));
    }
    sim.run_until_quiet().unwrap();
    assert!(seen.iter().all(|s| *s == (true, false) || *s == (false, true)), "half a rename was shown: {seen:?}");
    assert_eq!(seen.last(), Some(&(false, true)));
}

#[test]
fn a_removed_member_unaware_of_its_removal_admits_nobody_and_its_later_writes_stay_out() {
    // Seed 656 of the soak, pinned: node 3 is removed while node 1 is down and node 3 cannot
    // hear of it; node 3 writes and admits node 4; node 1 comes back on node 3's side first.
    let mut sim = Sim::new(656).nodes(4).outsiders(1);
    sim.write(3, "/before.txt", b"seen by the remover");
    sim.run_until_quiet().unwrap();
    sim.crash(1);
    sim.partition(&[1, 3, 4], &[0, 2]);
    assert!(sim.remove(0, 3));
    sim.write(3, "/after.txt", b"unseen");
    assert!(sim.join(4, 3), "node 3 does not know it was removed");
    sim.run_for(5_000);
    sim.write(4, "/newcomer.txt", b"admitted by a removed member");
    sim.restart(1);
    sim.run_for(10_000);
    let names = |sim: &Sim, n: usize| sim.tree(n).into_keys().collect::<Vec<_>>();
    assert_eq!(names(&sim, 1), ["/after.txt", "/before.txt", "/newcomer.txt"], "node 1 took it all, not knowing");
    sim.heal();
    sim.run_until_quiet().unwrap();
    for n in [0, 1, 2] {
        assert_eq!(names(&sim, n), ["/before.txt"], "node {n}");
    }
    assert_eq!(names(&sim, 3), ["/after.txt", "/before.txt", "/newcomer.txt"], "the removed node keeps what it has");
}

#[test]
fn a_merge_reaches_every_node_whole_even_when_its_node_dies_right_after_committing_it() {
    let mut sim = Sim::new(11).nodes(3);
    sim.write(0, "/shared.txt", b"base");
    sim.run_until_quiet().unwrap();
    assert!(sim.branch(1, "feature", "main"));
    sim.run_until_quiet().unwrap();
    sim.write_on(2, "feature", "/new.txt", b"on the branch");
    sim.write_on(2, "feature", "/shared.txt", b"changed on the branch");
    sim.write(0, "/shared.txt", b"changed on main");
    sim.run_until_quiet().unwrap();
    for n in 0..3 {
        let feature = sim.tree_on(n, "feature").unwrap();
        assert_eq!((&feature["/new.txt"][..], &feature["/shared.txt"][..]), (&b"on the branch"[..], &b"changed on the branch"[..]), "node {n}");
        assert_eq!(sim.tree(n)["/shared.txt"], b"changed on main", "node {n}: main does not see the branch");
    }
    assert!(sim.merge(1, "feature", "main"));
    // Killed before its documents were saved or a message left: the merge is on its disk only.
    sim.crash(1);
    sim.run_for(3_000);
    assert!(!sim.tree(0).contains_key("/new.txt"));
    sim.restart(1);
    sim.run_until_quiet().unwrap();
    for n in 0..3 {
        let main = sim.tree(n);
        assert_eq!(main["/new.txt"], b"on the branch", "node {n}");
        let (winner, conflicts) = (main["/shared.txt"].clone(), sim.conflicts(n));
        let loser: &[u8] = if winner == b"changed on main" { b"changed on the branch" } else { b"changed on main" };
        assert_eq!(conflicts, [("/shared.txt".to_string(), loser.to_vec())], "node {n}: the side that lost is listed, its bytes kept");
    }
}
