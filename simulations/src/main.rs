//! `alknet-simulations`: runs seeds of a workload over simulated meshes and prints a table,
//! the failing seeds (each with the command that replays it, shrunk), and a last line that
//! two runs of the same seeds can be compared by:
//! `N seeds, E events, F faults, V violations, trace HASH`.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Instant;

use alknet_simulations::rng::TraceHash;
use alknet_simulations::workload::{self, parse_ranges, ranges, schedule, SeedReport, Workload};
use alknet_simulations::Broken;
use clap::Parser;

/// The named scenarios, built in (`simulations/scenarios/NAME.toml`).
const SCENARIOS: &[(&str, &str)] = &[
    ("split-brain", include_str!("../scenarios/split-brain.toml")),
    ("flapping-link", include_str!("../scenarios/flapping-link.toml")),
    ("clock-an-hour-behind", include_str!("../scenarios/clock-an-hour-behind.toml")),
    ("crash-during-sync", include_str!("../scenarios/crash-during-sync.toml")),
    ("crash-during-merge", include_str!("../scenarios/crash-during-merge.toml")),
    ("member-removed-during-a-partition", include_str!("../scenarios/member-removed-during-a-partition.toml")),
];

#[derive(Parser, Debug)]
#[command(name = "alknet-simulations", about = "Deterministic partition simulations of an alknet-fs mesh")]
struct Args {
    /// Seeds to run, as START..END (END excluded).
    #[arg(long, default_value = "0..100")]
    seeds: String,
    /// One seed (overrides --seeds).
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes in the mesh (default: the scenario's, else 5).
    #[arg(long)]
    nodes: Option<usize>,
    /// Operations per seed (default: the scenario's, else 1000).
    #[arg(long)]
    ops: Option<usize>,
    /// A named scenario (see --list).
    #[arg(long)]
    scenario: Option<String>,
    /// List the named scenarios.
    #[arg(long)]
    list: bool,
    /// Play only these steps of the seed's schedule (e.g. 0-3,7): what a shrunk failure prints.
    #[arg(long)]
    keep: Option<String>,
    /// Break a rule on purpose: arrival-order, drop-tombstones or open-gate (the harness must fail).
    #[arg(long = "break")]
    broken: Option<String>,
    /// Print each failing seed's violations in full, and its schedule.
    #[arg(long)]
    verbose: bool,
    /// Worker threads (each runs whole seeds; a seed's run is single-threaded).
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Shrink at most this many failing seeds.
    #[arg(long, default_value_t = 3)]
    shrink: usize,
}

fn workload_of(args: &Args) -> Result<Workload, String> {
    let mut w = match &args.scenario {
        None => Workload::default(),
        Some(name) => {
            let (_, text) = SCENARIOS.iter().find(|(n, _)| n == name).ok_or_else(|| {
                format!("no scenario {name:?}; the scenarios are: {}", SCENARIOS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))
            })?;
            toml::from_str(text).map_err(|e| format!("scenario {name}: {e}"))?
        }
    };
    if let Some(n) = args.nodes {
        w.nodes = n;
    }
    if let Some(o) = args.ops {
        w.ops = o;
    }
    if w.nodes == 0 || w.nodes > 64 {
        return Err(format!("--nodes {}: between 1 and 64", w.nodes));
    }
    Ok(w)
}

fn parse_seeds(s: &str) -> Result<std::ops::Range<u64>, String> {
    let (a, b) = s.split_once("..").ok_or_else(|| format!("--seeds {s:?}: expected START..END, e.g. 0..10000"))?;
    let (a, b): (u64, u64) = (a.parse().map_err(|_| format!("--seeds {s:?}: bad start"))?, b.parse().map_err(|_| format!("--seeds {s:?}: bad end"))?);
    if b <= a {
        return Err(format!("--seeds {s:?}: END must be above START"));
    }
    Ok(a..b)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<ExitCode, String> {
    if args.list {
        for (name, text) in SCENARIOS {
            let w: Workload = toml::from_str(text).map_err(|e| format!("scenario {name}: {e}"))?;
            println!("{name:<22} {}", w.description);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let w = workload_of(args)?;
    let broken = match args.broken.as_deref() {
        None => None,
        Some("arrival-order") => Some(Broken::ArrivalOrder),
        Some("drop-tombstones") => Some(Broken::DropTombstones),
        Some("open-gate") => Some(Broken::OpenGate),
        Some(other) => return Err(format!("--break {other:?}: arrival-order, drop-tombstones or open-gate")),
    };
    let keep = args.keep.as_deref().map(parse_ranges).transpose()?;
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => parse_seeds(&args.seeds)?.collect(),
    };
    let started = Instant::now();
    let reports = run_seeds(&seeds, &w, broken, keep.as_ref(), args.jobs.max(1));
    let secs = started.elapsed().as_secs_f64();
    let events: u64 = reports.iter().map(|r| r.events).sum();
    let faults: u64 = reports.iter().map(|r| r.faults).sum();
    let violations: u64 = reports.iter().map(|r| r.violation_count).sum();
    let failing: Vec<&SeedReport> = reports.iter().filter(|r| !r.violations.is_empty()).collect();
    let mut trace = TraceHash::default();
    for r in &reports {
        trace.add_u64(r.trace);
    }
    let scenario = args.scenario.as_deref().unwrap_or("soak");
    // Sync frames per step of the schedules, and the share that brought nothing (`proto::fanout`).
    let frames: u64 = reports.iter().map(|r| r.frames).sum();
    let useful: u64 = reports.iter().map(|r| r.useful).sum();
    let steps: usize = reports.iter().map(|r| r.steps).sum();
    println!("| scenario | nodes | ops/seed | seeds | events | faults | violations | failing seeds | seeds/s | events/s | frames/op | frames bringing nothing |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {scenario} | {} | {} | {} | {events} | {faults} | {violations} | {} | {:.1} | {:.0} | {:.2} | {:.1} % |",
        w.nodes,
        w.ops,
        reports.len(),
        failing.len(),
        reports.len() as f64 / secs,
        events as f64 / secs,
        frames as f64 / steps.max(1) as f64,
        100.0 * (frames - useful.min(frames)) as f64 / frames.max(1) as f64
    );
    for (i, r) in failing.iter().enumerate() {
        println!("seed {} failed: {}", r.seed, r.violations[0].what);
        if args.verbose {
            for v in &r.violations {
                println!("  at {} ms: {}", v.at_ms, v.what);
            }
        }
        let mut replay = format!("cargo run -p alknet-simulations --release -- --seed {} --nodes {} --ops {}", r.seed, w.nodes, w.ops);
        if let Some(s) = &args.scenario {
            replay += &format!(" --scenario {s}");
        }
        if let Some(b) = &args.broken {
            replay += &format!(" --break {b}");
        }
        let steps = schedule(r.seed, &w);
        let kept = match (&keep, i < args.shrink) {
            (Some(k), _) => Some(k.clone()),
            (None, true) => Some(workload::shrink(r.seed, &w, broken, &steps, 400)),
            (None, false) => None,
        };
        if let Some(k) = &kept {
            replay += &format!(" --keep {}", ranges(k));
            println!("  shrunk to {} of {} steps; replay: {replay} --verbose", k.len(), steps.len());
            if args.verbose {
                for ix in k {
                    println!("  step {ix}: {:?}", steps[*ix]);
                }
            }
        } else {
            println!("  replay: {replay} --verbose");
        }
    }
    println!("{} seeds, {events} events, {faults} faults, {violations} violations, trace {:016x}", reports.len(), trace.0);
    Ok(if violations == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Runs each seed once, `jobs` at a time; reports in seed order.
fn run_seeds(seeds: &[u64], w: &Workload, broken: Option<Broken>, keep: Option<&BTreeSet<usize>>, jobs: usize) -> Vec<SeedReport> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut reports: Vec<SeedReport> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&seed) = seeds.get(i) else { break };
                        out.push(workload::run(seed, w, broken, &schedule(seed, w), keep));
                    }
                    out
                })
            })
            .collect();
        workers.into_iter().flat_map(|h| h.join().expect("a seed's run panicked")).collect()
    });
    reports.sort_by_key(|r| r.seed);
    reports
}
