//! # alknet-simulations
//!
//! The partition-simulation harness (roadmap step 5) will live here: a discrete-event
//! simulation of many nodes driving the sans-IO core in [`alknet_actors::proto`], with fault
//! schedules from a seed and invariant checks.
//!
//! Today it holds one thing, on purpose: this crate depends on `alknet-actors` with
//! `default-features = false`, so building it proves the proto core compiles without tokio,
//! iroh, rusqlite or ractor. The test below exercises the core that way: merge decisions
//! replayed from a seed give the same result in any order.

#[cfg(test)]
mod tests {
    use alknet_actors::proto::entry::{ContentHash, Entry, EntryKind, Version};
    use alknet_actors::proto::merge::{decide, Decision, Side};

    /// A tiny deterministic generator (xorshift), so a failure names its seed.
    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    fn version(x: &mut u64) -> Option<Version> {
        let r = next(x);
        match r % 4 {
            0 => None,
            1 => Some(Version { entry: None, written: alknet_actors::proto::clock::Stamp::at((r >> 8) as i64 % 5) }),
            _ => Some(Version {
                entry: Some(Entry { kind: EntryKind::File, hash: ContentHash([(r >> 16) as u8 % 3; 32]), size: 1, mode: 0o644, mtime_ms: 0 }),
                written: alknet_actors::proto::clock::Stamp::at((r >> 8) as i64 % 5),
            }),
        }
    }

    fn outcome(base: &Option<Version>, src: &Option<Version>, tgt: &Option<Version>) -> Option<(EntryKind, ContentHash, u32)> {
        let pick = match decide(base.as_ref(), src.as_ref(), tgt.as_ref()) {
            Decision::Keep | Decision::Conflict { winner: Side::Target } => tgt,
            Decision::Take | Decision::Conflict { winner: Side::Source } => src,
        };
        Version::content_key(pick.as_ref())
    }

    #[test]
    fn two_replicas_merging_each_other_converge_for_many_seeds() {
        for seed in 1..2_000u64 {
            let mut x = seed;
            let (base, a, b) = (version(&mut x), version(&mut x), version(&mut x));
            assert_eq!(outcome(&base, &a, &b), outcome(&base, &b, &a), "seed {seed}");
        }
    }
}
