//! Time as an input. The engine stamps every version with the time of its commit, and
//! last-writer-wins orders by it, so where the time comes from is a decision, not a detail:
//! production reads the system clock (`engine::SystemClock`), tests set it exactly
//! ([`ManualClock`]), and the simulations will drive one clock per simulated node.
//!
//! Versions are stamped with a hybrid logical clock ([`Stamp`]): the wall clock's
//! milliseconds, and a counter for what happens within one millisecond or while the wall
//! clock stands still or goes back. Each commit's stamp is later than every stamp the store
//! handed out before, so of two writes made one after the other, the second is the later
//! writer whatever the clock said (the mesh adds the rule for stamps received from peers).

use std::sync::atomic::{AtomicI64, Ordering};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// A clock that stands still until told otherwise: tests say exactly when each write happens.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock reading `ms`.
    pub fn new(ms: i64) -> Self {
        ManualClock(AtomicI64::new(ms))
    }

    /// Sets the time to `ms`.
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }

    /// Moves the time on by `ms`.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A hybrid logical clock stamp (Kulkarni et al., 2014), ordered as (ms, counter).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Stamp {
    /// Wall-clock milliseconds since the Unix epoch (never less than any earlier stamp's).
    pub ms: i64,
    /// Orders stamps that share `ms`.
    pub counter: u32,
}

impl Stamp {
    /// A stamp at `ms` with counter 0.
    pub fn at(ms: i64) -> Self {
        Stamp { ms, counter: 0 }
    }

    /// The stamp of a new local event after `last`, the wall clock reading `now_ms`: the wall
    /// clock when it is ahead of `last`, else `last` with the counter moved on.
    pub fn tick(last: Stamp, now_ms: i64) -> Stamp {
        if now_ms > last.ms {
            Stamp::at(now_ms)
        } else {
            Stamp { ms: last.ms, counter: last.counter.saturating_add(1) }
        }
    }
}

/// A node's hybrid logical clock: the latest stamp it used or saw. Every local event is
/// stamped later than everything the node has seen, so a write made after seeing another
/// version orders after it whatever the wall clocks say; only writes that did not see each
/// other can order by wall clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hlc {
    last: Stamp,
}

impl Hlc {
    /// A clock that has used or seen up to `last` (e.g. restored from what was stored).
    pub fn new(last: Stamp) -> Self {
        Hlc { last }
    }

    /// The latest stamp used or seen.
    pub fn last(&self) -> Stamp {
        self.last
    }

    /// The stamp of a new local event, the wall clock reading `now_ms`.
    pub fn stamp(&mut self, now_ms: i64) -> Stamp {
        self.last = Stamp::tick(self.last, now_ms);
        self.last
    }

    /// Folds in a stamp seen on a peer's change.
    pub fn observe(&mut self, seen: Stamp) {
        self.last = self.last.max(seen);
    }
}

/// How far ahead of this node's wall clock a stamp may be (`node.clock_offset_max_secs`,
/// one hour by default). A peer's version stamped later waits, unapplied, and does not move
/// this node's hybrid clock; a clock that had already moved further (its own wall clock was
/// wrong, then set right) stamps from the wall clock again. So one machine with its clock
/// years ahead cannot drag every other node's stamps along for good, and `--at`, retention
/// by days and last-writer-wins keep meaning real time within the bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    /// Milliseconds ahead of the wall clock.
    pub ms: i64,
}

/// The default bound: an hour, far more than honest clocks drift, far less than a wrong one.
pub const CLOCK_OFFSET_MS_DEFAULT: i64 = 3_600_000;

impl Default for Bound {
    fn default() -> Self {
        Bound { ms: CLOCK_OFFSET_MS_DEFAULT }
    }
}

impl Bound {
    /// The latest stamp's milliseconds accepted when the wall clock reads `now_ms`.
    pub fn limit(&self, now_ms: i64) -> i64 {
        now_ms.saturating_add(self.ms)
    }

    /// Whether `stamp` is within the bound of `now_ms`.
    pub fn within(&self, stamp: Stamp, now_ms: i64) -> bool {
        stamp.ms <= self.limit(now_ms)
    }

    /// The stamp of a new local event after `last`: [`Stamp::tick`], unless `last` is beyond
    /// the bound (the clock absorbed a stamp from a wall clock that was wrong): then the wall
    /// clock's own, and the clock has recovered. Ordering after a path's earlier versions is
    /// then the writer's to keep, path by path (`store::Tx`).
    pub fn tick(&self, last: Stamp, now_ms: i64) -> Stamp {
        if self.within(last, now_ms) {
            Stamp::tick(last, now_ms)
        } else {
            Stamp::at(now_ms)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_is_later_than_the_last_stamp_whatever_the_wall_clock_says() {
        let last = Stamp { ms: 1_000, counter: 4 };
        assert_eq!(Stamp::tick(last, 2_000), Stamp::at(2_000));
        assert_eq!(Stamp::tick(last, 1_000), Stamp { ms: 1_000, counter: 5 });
        // An hour behind: still later.
        assert_eq!(Stamp::tick(last, 1_000 - 3_600_000), Stamp { ms: 1_000, counter: 5 });
        for now in [0, 999, 1_000, 1_001] {
            assert!(Stamp::tick(last, now) > last);
        }
    }

    #[test]
    fn a_clock_that_saw_a_later_stamp_stamps_after_it_even_an_hour_behind() {
        let mut hlc = Hlc::default();
        let first = hlc.stamp(10_000);
        hlc.observe(Stamp::at(20_000));
        let next = hlc.stamp(10_000 - 3_600_000);
        assert!(next > Stamp::at(20_000) && next > first);
        hlc.observe(Stamp::at(5));
        assert_eq!(hlc.last(), next, "an older stamp changes nothing");
    }

    #[test]
    fn a_clock_beyond_the_bound_returns_to_the_wall_clock() {
        let bound = Bound { ms: 1_000 };
        let now = 50_000;
        // Within the bound: the hybrid clock as ever, even ahead of the wall clock.
        assert_eq!(bound.tick(Stamp::at(now + 1_000), now), Stamp { ms: now + 1_000, counter: 1 });
        assert!(bound.within(Stamp::at(now + 1_000), now) && !bound.within(Stamp::at(now + 1_001), now));
        // Ten years ahead: the wall clock's stamp.
        assert_eq!(bound.tick(Stamp::at(now + 315_360_000_000), now), Stamp::at(now));
        assert_eq!(Bound { ms: i64::MAX }.limit(now), i64::MAX, "no overflow");
    }
}
