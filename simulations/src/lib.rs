//! # alknet-simulations
//!
//! A deterministic partition harness over the replication logic the node runs: many nodes in
//! one thread, each holding the production [`alknet_actors::proto`] state machines (the
//! replicated tree and its per-path winner rule, the hybrid logical clock, the sharded
//! automerge documents and their sync protocol), a simulated network and simulated time.
//! Nothing reads a clock, spawns a thread or does I/O: a seed replays the same run.
//!
//! Use it to pin a scenario in a test:
//!
//! ```
//! use alknet_simulations::Sim;
//!
//! let mut sim = Sim::new(7).nodes(3);
//! let (a, b, c) = (0, 1, 2);
//! sim.partition(&[a], &[b, c]);
//! sim.write(a, "/notes.txt", b"written on a");
//! sim.run_for(1_000);
//! sim.write(b, "/notes.txt", b"written on b, unaware of a");
//! sim.heal();
//! sim.run_until_quiet().expect("no invariant broken");
//! // Every node shows the same winner, and lists the other version as a conflict loser.
//! assert_eq!(sim.tree(a), sim.tree(c));
//! assert_eq!(sim.conflicts(b).len(), 1);
//! ```
//!
//! - [`rng`]: the seeded randomness and the trace hash;
//! - [`node`]: one simulated node (its state and its "disk");
//! - [`sim`]: the event loop, the network, the scripting API and the invariants;
//! - [`workload`]: seeded schedules of operations and faults, runs, and shrinking.

pub mod node;
pub mod rng;
pub mod sim;
pub mod workload;

pub use node::Broken;
pub use sim::{NetParams, NodeIx, Sim, Stats, Violation};
pub use workload::{Action, SeedReport, Step, Workload};
