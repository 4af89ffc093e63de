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
}
