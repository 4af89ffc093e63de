//! Branch merges through the engine, on real data dirs, with the time of every write set by
//! the test (a [`ManualClock`](alknet_actors::proto::clock::ManualClock)): three-way cases,
//! repeat merges after GC retention, file-versus-directory conflicts, and conflict losers
//! that outlive retention until dismissed.

use alknet_actors::engine::{Engine, Scope};
use alknet_actors::gc::Retention;
use alknet_actors::proto::merge::Side;

mod common;
use common::{fresh_with_clock, get, main_scope, names, p, put};

/// Keeps nothing but heads (and what merges and conflicts still need).
const ONLY_HEADS: Retention = Retention { keep_versions: 0, keep_days: 0, outbox_keep_days: 1 };

/// A step: write `Some(bytes)` at a path, or remove it (recursively) with `None`.
type Step = (&'static str, Option<&'static str>);

fn apply(engine: &mut Engine, scope: &Scope, steps: &[Step]) {
    for (path, content) in steps {
        match content {
            Some(c) => {
                put(engine, scope, path, c.as_bytes());
            }
            None => {
                engine.remove(scope, &p(path), true).unwrap();
            }
        }
    }
}

fn read(engine: &Engine, scope: &Scope, path: &str) -> Option<String> {
    get(engine, scope, path).map(|b| String::from_utf8(b).unwrap())
}

/// A merge case: steps on main and on a branch `f` forked from main after `setup`, then a
/// merge of `f` into main, and what main must hold afterwards. Main's steps come first in
/// time, the branch's 10 ms later.
struct Case {
    name: &'static str,
    setup: &'static [Step],
    on_main: &'static [Step],
    on_branch: &'static [Step],
    expect: &'static [Step],
    conflicts: usize,
}

#[test]
fn three_way_merge_cases() {
    let cases = [
        Case { name: "new file on branch", setup: &[], on_main: &[], on_branch: &[("/n", Some("n"))], expect: &[("/n", Some("n"))], conflicts: 0 },
        Case { name: "edit on branch", setup: &[("/a", Some("1"))], on_main: &[], on_branch: &[("/a", Some("2"))], expect: &[("/a", Some("2"))], conflicts: 0 },
        Case { name: "edit on main only", setup: &[("/a", Some("1"))], on_main: &[("/a", Some("m"))], on_branch: &[], expect: &[("/a", Some("m"))], conflicts: 0 },
        Case { name: "delete on branch", setup: &[("/a", Some("1"))], on_main: &[], on_branch: &[("/a", None)], expect: &[("/a", None)], conflicts: 0 },
        Case { name: "delete on main survives", setup: &[("/a", Some("1"))], on_main: &[("/a", None)], on_branch: &[], expect: &[("/a", None)], conflicts: 0 },
        Case { name: "same edit both sides", setup: &[("/a", Some("1"))], on_main: &[("/a", Some("x"))], on_branch: &[("/a", Some("x"))], expect: &[("/a", Some("x"))], conflicts: 0 },
        Case { name: "different paths both sides", setup: &[], on_main: &[("/m", Some("m"))], on_branch: &[("/b", Some("b"))], expect: &[("/m", Some("m")), ("/b", Some("b"))], conflicts: 0 },
        Case { name: "both edit: branch wrote last", setup: &[("/a", Some("1"))], on_main: &[("/a", Some("main"))], on_branch: &[("/a", Some("branch"))], expect: &[("/a", Some("branch"))], conflicts: 1 },
        Case { name: "deleted dir with a new child on main", setup: &[("/d/x", Some("x"))], on_main: &[("/d/new", Some("new"))], on_branch: &[("/d", None)], expect: &[("/d/new", Some("new")), ("/d/x", None)], conflicts: 0 },
    ];
    for case in cases {
        let (_dir, mut engine, clock) = fresh_with_clock();
        let main = main_scope();
        apply(&mut engine, &main, case.setup);
        engine.create_branch(&main, "f", None).unwrap();
        let f = Scope::new("default", "f");
        clock.advance(10);
        apply(&mut engine, &main, case.on_main);
        clock.advance(10);
        apply(&mut engine, &f, case.on_branch);
        let report = engine.merge(&main, "f", None).unwrap();
        assert_eq!(report.conflicts.len(), case.conflicts, "{}: conflicts", case.name);
        for (path, want) in case.expect {
            assert_eq!(read(&engine, &main, path).as_deref(), *want, "{}: {path}", case.name);
        }
        // Merging again changes nothing.
        let again = engine.merge(&main, "f", None).unwrap();
        assert!(again.taken.is_empty() && again.conflicts.is_empty(), "{}: second merge {again:?}", case.name);
    }
}

/// What a repeat merge produced: every path's bytes on both branches, and the report.
type Outcome = (Vec<(String, Option<String>, Option<String>)>, usize, usize);

/// A repeat-merge case. `f` forks from main after `setup`, writes `first_on_branch`, and is
/// merged into main (a merge point). Then both sides change (`then_main`, `then_branch`),
/// history may be collected, and the second merge runs `f → main` (or `main → f`).
struct Repeat {
    name: &'static str,
    setup: &'static [Step],
    first_on_branch: &'static [Step],
    then_main: &'static [Step],
    then_branch: &'static [Step],
    main_into_branch: bool,
    expect: &'static [Step],
    conflicts: usize,
}

fn run_repeat(case: &Repeat, collect_between: bool) -> Outcome {
    let (_dir, mut engine, clock) = fresh_with_clock();
    let (main, f) = (main_scope(), Scope::new("default", "f"));
    apply(&mut engine, &main, case.setup);
    engine.create_branch(&main, "f", None).unwrap();
    clock.advance(10);
    apply(&mut engine, &f, case.first_on_branch);
    engine.merge(&main, "f", None).unwrap();
    clock.advance(10);
    apply(&mut engine, &main, case.then_main);
    clock.advance(10);
    apply(&mut engine, &f, case.then_branch);
    // Old history in another bucket, so the collection always has something to prune.
    engine.create_bucket("noise").unwrap();
    apply(&mut engine, &Scope::new("noise", "main"), &[("/n", Some("1")), ("/n", Some("2"))]);
    if collect_between {
        let report = engine.gc(ONLY_HEADS).unwrap();
        assert!(report.versions_pruned > 0, "{}: the collection pruned nothing, so it proves nothing", case.name);
    }
    let report = if case.main_into_branch { engine.merge(&f, "main", None).unwrap() } else { engine.merge(&main, "f", None).unwrap() };
    let into = if case.main_into_branch { &f } else { &main };
    for (path, want) in case.expect {
        assert_eq!(read(&engine, into, path).as_deref(), *want, "{} (collected: {collect_between}): {path}", case.name);
    }
    let paths = ["/a", "/b", "/c", "/d", "/e", "/g"];
    let state = paths.iter().map(|path| (path.to_string(), read(&engine, &main, path), read(&engine, &f, path))).collect();
    (state, report.taken.len(), report.conflicts.len())
}

/// A repeat merge takes its base from the last merge point. Collecting history in between
/// (keeping heads only) must not change what the second merge does: the base it needs
/// survives retention.
#[test]
fn a_repeat_merge_gives_the_same_result_with_or_without_gc_in_between() {
    let made_on_branch: &[Step] = &[("/a", Some("a1")), ("/c", Some("c1")), ("/e", Some("e1")), ("/g", Some("g1"))];
    let cases = [
        Repeat { name: "a delete on the source", setup: &[], first_on_branch: made_on_branch, then_main: &[], then_branch: &[("/a", None)], main_into_branch: false, expect: &[("/a", None), ("/c", Some("c1"))], conflicts: 0 },
        Repeat { name: "an edit on the source", setup: &[], first_on_branch: made_on_branch, then_main: &[], then_branch: &[("/c", Some("c2")), ("/c", Some("c3"))], main_into_branch: false, expect: &[("/c", Some("c3"))], conflicts: 0 },
        Repeat { name: "an edit on the target only", setup: &[], first_on_branch: made_on_branch, then_main: &[("/e", Some("e2"))], then_branch: &[("/g", Some("g2"))], main_into_branch: false, expect: &[("/e", Some("e2")), ("/g", Some("g2"))], conflicts: 0 },
        Repeat { name: "an edit on both sides", setup: &[], first_on_branch: made_on_branch, then_main: &[("/g", Some("gm"))], then_branch: &[("/g", Some("gb"))], main_into_branch: false, expect: &[("/g", Some("gb"))], conflicts: 1 },
        Repeat { name: "a base file edited on the source", setup: &[("/b", Some("b0"))], first_on_branch: &[("/b", Some("b1"))], then_main: &[], then_branch: &[("/b", Some("b2"))], main_into_branch: false, expect: &[("/b", Some("b2"))], conflicts: 0 },
        Repeat { name: "back the other way: main into the branch", setup: &[("/d", Some("d0"))], first_on_branch: made_on_branch, then_main: &[("/e", Some("e2")), ("/d", None)], then_branch: &[("/c", Some("c2"))], main_into_branch: true, expect: &[("/e", Some("e2")), ("/d", None), ("/c", Some("c2"))], conflicts: 0 },
    ];
    for case in &cases {
        let kept = run_repeat(case, false);
        let collected = run_repeat(case, true);
        assert_eq!(kept.2, case.conflicts, "{}: conflicts", case.name);
        assert_eq!(collected, kept, "{}: gc between the merges changed the result", case.name);
    }
}

/// One side replaced directory `/x` with a file, the other put `/x/a` in it. The merged tree
/// keeps the directory (a directory beats a file, as in last-writer-wins), and the file is a
/// listed conflict loser, restorable once the directory is moved out of the way.
#[test]
fn a_file_against_a_directory_is_a_conflict_and_the_file_stays_restorable() {
    for file_on_target in [true, false] {
        let name = if file_on_target { "file on main, child on the branch" } else { "file on the branch, child on main" };
        let (_dir, mut engine, clock) = fresh_with_clock();
        let (main, f) = (main_scope(), Scope::new("default", "f"));
        put(&mut engine, &main, "/x/old", b"old");
        engine.create_branch(&main, "f", None).unwrap();
        let (file_side, child_side) = if file_on_target { (&main, &f) } else { (&f, &main) };
        clock.advance(10);
        engine.remove(file_side, &p("/x"), true).unwrap();
        put(&mut engine, file_side, "/x", b"now a file");
        clock.advance(10);
        put(&mut engine, child_side, "/x/a", b"child");

        let report = engine.merge(&main, "f", None).unwrap();
        let winner = if file_on_target { Side::Source } else { Side::Target };
        assert!(report.conflicts.contains(&(p("/x"), winner)), "{name}: {report:?}");
        assert_eq!(read(&engine, &main, "/x/a").as_deref(), Some("child"), "{name}");
        assert_eq!(names(&engine, &main, "/x"), ["a"], "{name}: /x is a directory holding a");
        let listed = engine.conflicts(&main).unwrap();
        let conflict = listed.iter().find(|c| c.path == "/x").unwrap_or_else(|| panic!("{name}: /x not listed: {listed:?}"));

        // The loser comes back: move the directory aside, restore the file.
        engine.rename(&main, &p("/x"), &p("/x.dir")).unwrap();
        engine.restore(&main, &p("/x"), &mine(conflict.loser_seq)).unwrap();
        assert_eq!(read(&engine, &main, "/x").as_deref(), Some("now a file"), "{name}");
        assert_eq!(read(&engine, &main, "/x.dir/a").as_deref(), Some("child"), "{name}");
    }
}

#[test]
fn the_losing_side_of_a_conflict_stays_restorable() {
    let (_dir, mut engine, clock) = fresh_with_clock();
    let main = main_scope();
    put(&mut engine, &main, "/s", b"base");
    engine.create_branch(&main, "f", None).unwrap();
    let f = Scope::new("default", "f");
    clock.advance(10);
    put(&mut engine, &f, "/s", b"branch side");
    clock.advance(10);
    put(&mut engine, &main, "/s", b"main side");
    let report = engine.merge(&main, "f", None).unwrap();
    assert_eq!(report.conflicts.len(), 1);
    assert_eq!(get(&engine, &main, "/s").unwrap(), b"main side");
    let conflicts = engine.conflicts(&main).unwrap();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].path, "/s");
    // The loser outlives its branch.
    engine.delete_branch(&main, "f").unwrap();
    engine.restore(&main, &p("/s"), &mine(conflicts[0].loser_seq)).unwrap();
    assert_eq!(get(&engine, &main, "/s").unwrap(), b"branch side");
}

/// A listed loser survives any retention until the user dismisses it; then ordinary
/// retention applies.
#[test]
fn a_conflict_loser_outlives_retention_until_dismissed() {
    let (_dir, mut engine, clock) = fresh_with_clock();
    let main = main_scope();
    put(&mut engine, &main, "/s", b"base");
    put(&mut engine, &main, "/t", b"base");
    engine.create_branch(&main, "f", None).unwrap();
    let f = Scope::new("default", "f");
    clock.advance(10);
    put(&mut engine, &f, "/s", b"branch s");
    put(&mut engine, &f, "/t", b"branch t");
    clock.advance(10);
    put(&mut engine, &main, "/s", b"main s");
    put(&mut engine, &main, "/t", b"main t");
    engine.merge(&main, "f", None).unwrap();
    engine.delete_branch(&main, "f").unwrap();
    let listed = engine.conflicts(&main).unwrap();
    assert_eq!(listed.len(), 2);
    let loser_of = |path: &str| listed.iter().find(|c| c.path == path).unwrap().loser_seq;

    engine.gc(ONLY_HEADS).unwrap();
    assert_eq!(engine.conflicts(&main).unwrap(), listed, "retention dropped a listed conflict");
    for path in ["/s", "/t"] {
        assert!(engine.log(&main, &p(path)).unwrap().iter().any(|r| r.seq == loser_of(path)), "{path}: loser pruned while listed");
    }

    // Dismissed, /s's loser falls under retention; /t's stays listed and kept.
    assert_eq!(engine.dismiss_conflicts(&main, Some(&p("/s"))).unwrap(), 1);
    assert!(engine.dismiss_conflicts(&main, Some(&p("/nothing"))).unwrap_err().to_string().contains("no conflict"));
    engine.gc(ONLY_HEADS).unwrap();
    assert!(!engine.log(&main, &p("/s")).unwrap().iter().any(|r| r.seq == loser_of("/s")), "a dismissed loser outlived retention");
    engine.restore(&main, &p("/t"), &mine(loser_of("/t"))).unwrap();
    assert_eq!(get(&engine, &main, "/t").unwrap(), b"branch t");
    assert_eq!(engine.dismiss_conflicts(&main, None).unwrap(), 1);
    assert!(engine.conflicts(&main).unwrap().is_empty());
}

#[test]
fn merging_in_either_direction_agrees() {
    // Two branches edit the same paths; merging a into b and b into a (on separate stores
    // built the same way) leaves identical contents.
    let build = |a_into_b: bool| {
        let (dir, mut engine, clock) = fresh_with_clock();
        let main = main_scope();
        put(&mut engine, &main, "/x", b"0");
        put(&mut engine, &main, "/y", b"0");
        engine.create_branch(&main, "a", None).unwrap();
        engine.create_branch(&main, "b", None).unwrap();
        let (a, b) = (Scope::new("default", "a"), Scope::new("default", "b"));
        clock.advance(10);
        put(&mut engine, &a, "/x", b"a");
        clock.advance(10);
        put(&mut engine, &b, "/y", b"b");
        clock.advance(10);
        put(&mut engine, &b, "/x", b"b");
        clock.advance(10);
        engine.remove(&a, &p("/y"), false).unwrap();
        let (from, into) = if a_into_b { ("a", &b) } else { ("b", &a) };
        engine.merge(into, from, None).unwrap();
        let state: Vec<_> = ["/x", "/y"].iter().map(|path| get(&engine, into, path)).collect();
        drop(dir);
        state
    };
    assert_eq!(build(true), build(false));
    assert_eq!(build(true), [Some(b"b".to_vec()), None]);
}

/// Merging back and forth looks only at what changed since the branches were last in step,
/// not at a branch's whole history (and still gets the result right).
#[test]
fn a_merge_looks_only_at_what_changed_since_the_branches_were_last_in_step() {
    let (_dir, mut engine, clock) = fresh_with_clock();
    let (main, f) = (main_scope(), Scope::new("default", "f"));
    engine.create_branch(&main, "f", None).unwrap();
    let items: Vec<_> = (0..1000)
        .map(|i| {
            let blob = engine.content().import_reader(format!("file {i}").as_bytes(), |_| {}).unwrap();
            (p(&format!("/f/{i:04}")), alknet_actors::engine::file_entry(&blob, 0o644, 0), blob)
        })
        .collect();
    engine.commit_entries(&f, &items).unwrap();
    let first = engine.merge(&main, "f", None).unwrap();
    assert!(first.examined > 1000, "the first merge looks at every new path: {}", first.examined);
    clock.advance(10);
    put(&mut engine, &main, "/m", b"main's");
    let back = engine.merge(&f, "main", None).unwrap();
    assert_eq!(back.taken, [p("/m")]);
    clock.advance(10);
    put(&mut engine, &f, "/one-more", b"more");
    let again = engine.merge(&main, "f", None).unwrap();
    assert_eq!(again.taken, [p("/one-more")]);
    assert_eq!(again.examined, 2, "only /one-more and /m (which came back from main) changed on f since the last merges");
    assert_eq!(get(&engine, &main, "/f/0999").unwrap(), b"file 999");
    assert_eq!(names(&engine, &main, "/").len(), 3);
}

/// Every file of a branch: path → bytes.
fn tree(engine: &Engine, scope: &Scope) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut dirs = vec![p("/")];
    while let Some(dir) = dirs.pop() {
        for row in engine.list(scope, &dir).unwrap() {
            match row.entry().unwrap().kind {
                alknet_actors::proto::entry::EntryKind::Dir => dirs.push(row.path.clone()),
                _ => {
                    out.insert(row.path.to_string(), get(engine, scope, row.path.as_str()).unwrap());
                }
            }
        }
    }
    out
}

/// Random writes, deletes and merges in both directions on two branches (seeded): after any
/// history, merging one way and then back leaves both branches holding the same tree. A merge
/// that skipped a path it should have looked at would leave them apart.
#[test]
fn back_and_forth_merges_always_bring_two_branches_into_step() {
    const PATHS: [&str; 8] = ["/a", "/b", "/d/x", "/d/y", "/d/e/z", "/e", "/d", "/d/e"];
    for seed in 0..60u64 {
        let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut next = |n: u64| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) % n
        };
        let (_dir, mut engine, clock) = fresh_with_clock();
        let (main, f) = (main_scope(), Scope::new("default", "f"));
        engine.create_branch(&main, "f", None).unwrap();
        for _ in 0..40 {
            clock.advance(next(3) as i64);
            let side = if next(2) == 0 { &main } else { &f };
            let path = PATHS[next(PATHS.len() as u64) as usize];
            match next(10) {
                0..=4 => {
                    // A write may meet a directory where it wants a file, or the reverse: fine.
                    let _ = engine.put_reader(side, format!("{seed} {}", next(1000)).as_bytes(), &p(path), |_| {});
                }
                5..=6 => {
                    let _ = engine.remove(side, &p(path), true);
                }
                7 => {
                    engine.merge(&main, "f", None).unwrap();
                }
                8 => {
                    engine.merge(&f, "main", None).unwrap();
                }
                _ => {
                    let _ = engine.gc(ONLY_HEADS);
                }
            }
        }
        engine.merge(&main, "f", None).unwrap();
        engine.merge(&f, "main", None).unwrap();
        assert_eq!(tree(&engine, &main), tree(&engine, &f), "seed {seed}: the branches are not in step after merging both ways");
    }
}

/// A version this node wrote, by its seq.
fn mine(seq: i64) -> alknet_actors::proto::ids::VersionRef {
    alknet_actors::proto::ids::VersionRef { seq, node_prefix: None }
}
