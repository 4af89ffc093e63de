//! The fetch scheduler: which missing blobs to ask which peer for, in which batches, and what
//! a batch's outcome means. Plain state, no I/O: the mesh actor tells it what peers have
//! (`add`), runs the batches it hands out (`next_batch`), reports how each went (`finished`)
//! and ticks it once a second (`tick`).
//!
//! - **Batches.** A wanted blob has candidate peers, in the order they are tried; it waits
//!   in the queue of its first candidate. A batch is up to [`FETCH_BATCH_MAX`] blobs of one
//!   peer's queue, one `GetMany` request; at most [`FETCHES_MAX`] run at once. Queues are
//!   per peer and entries carry a ticket, so handing out a batch costs what the batch holds,
//!   whatever the number of blobs waiting (a queue entry made stale by a later decision is
//!   skipped when it comes up).
//! - **Answers per hash.** A `GetMany` response carries its blobs in request order, and a
//!   provider stops at the first blob it cannot send (GC freed it, or it was never there).
//!   So a request that failed after `k` blobs arrived names blob `k` as the one this peer
//!   cannot serve; the blobs after it are asked for again at once. A request that failed
//!   before any blob arrived may have been refused whole (a gate refuses a request with one
//!   hash it will not serve): it is split in halves, each asked for at once, until the blob
//!   it could not serve stands alone. Good blobs batched with a bad one always arrive.
//! - **Never hot.** A blob every candidate could not serve is *unavailable* (`status` counts
//!   it): a peer may not have it yet (it is fetching it too), or may never have it (its GC
//!   freed it). It is asked for again from every connected peer after a pause that doubles
//!   from [`UNAVAILABLE_RETRY_MIN`] to [`UNAVAILABLE_RETRY_MAX`], or at once when a peer says
//!   it has it or comes back; a user waiting for it is told once it has been unavailable for
//!   [`WAITERS_GIVE_UP_AFTER`] rounds. Other failures (a peer unreachable, a timeout) are
//!   retried at the next tick from every connected peer, this one last.
//! - **Linear.** Every step costs O(1) or O(log n) per blob it touches, never a pass over
//!   every blob wanted: blobs that wait are kept in the order they are due (a tick takes only
//!   the due ones), the counts `status` shows are kept as blobs move, and each peer's
//!   refusals are indexed (a peer that comes back revives only what it refused). A join of a
//!   million blobs costs the scheduler a small share of what the transfer costs
//!   (BENCHMARKS.md, "Scale").

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::proto::entry::ContentHash;
use crate::proto::ids::NodeId;

/// Most hashes in one fetch request.
pub const FETCH_BATCH_MAX: usize = 512;
/// Most fetch requests in flight.
pub const FETCHES_MAX: usize = 4;
/// First pause before a blob no peer could serve is asked for again.
pub const UNAVAILABLE_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest pause before a blob no peer could serve is asked for again.
pub const UNAVAILABLE_RETRY_MAX: Duration = Duration::from_secs(300);
/// Rounds in which no peer could serve a blob before the users waiting for it are told
/// (1 + 2 + 4 + 8 s of asking).
pub const WAITERS_GIVE_UP_AFTER: u32 = 4;

/// How a fetch request ended, besides the blobs it landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchError {
    /// The peer could not be reached, or the request timed out: nothing is known of the
    /// blobs it did not bring.
    Unreachable(String),
    /// The request failed after it was sent (refused, or the response stopped): the blob it
    /// stopped at is one the peer could not serve.
    Stopped(String),
}

/// One request's outcome, as the mesh actor saw it.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// The peer asked.
    pub peer: NodeId,
    /// The blobs asked for, in request order, with their sizes.
    pub asked: Vec<(ContentHash, u64)>,
    /// How many of `asked`, from the first, arrived whole before the response ended.
    pub received: usize,
    /// Those now in the content store and recorded present.
    pub landed: HashSet<ContentHash>,
    /// Why the response ended early, if it did.
    pub error: Option<FetchError>,
}

/// What [`Fetches::finished`] decided that the mesh actor acts on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Blobs that are here now (waiters are answered).
    pub landed: Vec<ContentHash>,
    /// Blobs no candidate could serve for [`WAITERS_GIVE_UP_AFTER`] rounds (waiters are
    /// told; the blob is still asked for, less and less often).
    pub unavailable: Vec<ContentHash>,
}

/// Where a wanted blob stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// In its first candidate's queue, under this ticket.
    Queued(u64),
    /// In a batch being fetched.
    Fetching,
    /// Queued again (from every connected peer) at the first tick from `until`.
    Waiting { until: Instant },
}

#[derive(Clone, Debug)]
struct Wanted {
    size: u64,
    /// Peers to ask, first first.
    candidates: Vec<NodeId>,
    /// Peers that could not serve it since it was last asked for from everyone.
    refused: HashSet<NodeId>,
    stage: Stage,
    /// Rounds in a row in which every candidate could not serve it (0: it is not
    /// unavailable); the pause before the next doubles with each.
    rounds_refused: u32,
}

impl Wanted {
    /// Which count of [`FetchCounts`] it is in.
    fn category(&self) -> usize {
        match self.stage {
            Stage::Queued(_) => QUEUED,
            Stage::Fetching => FETCHING,
            Stage::Waiting { .. } if self.rounds_refused > 0 => UNAVAILABLE,
            Stage::Waiting { .. } => FAILED,
        }
    }
}

const QUEUED: usize = 0;
const FETCHING: usize = 1;
const FAILED: usize = 2;
const UNAVAILABLE: usize = 3;

/// The scheduler's state.
#[derive(Debug, Default)]
pub struct Fetches {
    wanted: HashMap<ContentHash, Wanted>,
    /// Blobs in each category (queued, fetching, failed, unavailable).
    counts: [usize; 4],
    /// Blobs that wait, by when they are due.
    waiting: BTreeSet<(Instant, ContentHash)>,
    /// Per peer, the blobs it could not serve since they were last asked for from everyone.
    refusals: HashMap<NodeId, HashSet<ContentHash>>,
    /// Per peer, blobs queued for it first (with the ticket that queued them).
    queues: HashMap<NodeId, VecDeque<(ContentHash, u64)>>,
    /// Peers with something queued, taken in turn.
    turn: VecDeque<NodeId>,
    /// Batches made by splitting a failed one: sent before anything else.
    ready: VecDeque<(NodeId, Vec<(ContentHash, u64)>)>,
    next_ticket: u64,
    in_flight: usize,
    fetched: u64,
}

/// Counts for `alkfs status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchCounts {
    /// Blobs waiting to be fetched or being fetched.
    pub pending: usize,
    /// Blobs whose last fetch failed (retried at the next tick).
    pub failed: usize,
    /// Blobs no connected peer could serve (asked for again after a pause).
    pub unavailable: usize,
    /// Blobs fetched since start.
    pub fetched: u64,
}

impl Fetches {
    /// Wants `hash` (of `size` bytes) from `peers`, who have it or will; `urgent` puts it
    /// first (a user waits for it). A blob that was unavailable is asked for again at once
    /// when a peer not known to lack it is named.
    pub fn add(&mut self, hash: ContentHash, size: u64, peers: &[NodeId], urgent: bool) {
        if !self.wanted.contains_key(&hash) {
            let until = Instant::now();
            self.wanted.insert(hash, Wanted { size, candidates: Vec::new(), refused: HashSet::new(), stage: Stage::Waiting { until }, rounds_refused: 0 });
            self.counts[FAILED] += 1;
            self.waiting.insert((until, hash));
        }
        let w = self.wanted.get_mut(&hash).expect("just made");
        let mut new_peer = false;
        for p in peers {
            if !w.candidates.contains(p) && !w.refused.contains(p) {
                w.candidates.push(*p);
                new_peer = true;
            }
        }
        let fresh = w.rounds_refused == 0 && w.refused.is_empty();
        let requeue = match w.stage {
            Stage::Fetching => false,
            Stage::Queued(_) => urgent,
            Stage::Waiting { .. } => fresh || new_peer || urgent,
        };
        if requeue {
            self.queue(hash, urgent);
        }
    }

    /// Whether `hash` is wanted (queued, in flight, failed or unavailable).
    pub fn is_wanted(&self, hash: &ContentHash) -> bool {
        self.wanted.contains_key(hash)
    }

    /// Whether nothing is queued or in flight (the store may be scanned for more).
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.ready.is_empty() && self.counts[QUEUED] == 0
    }

    /// Changes what is wanted of `hash` with `f`, keeping the counts and the waiting order.
    fn update(&mut self, hash: &ContentHash, f: impl FnOnce(&mut Wanted)) {
        let Some(w) = self.wanted.get_mut(hash) else { return };
        let (before, was) = (w.category(), w.stage);
        f(w);
        let (after, now) = (w.category(), w.stage);
        self.counts[before] -= 1;
        self.counts[after] += 1;
        if was != now {
            if let Stage::Waiting { until } = was {
                self.waiting.remove(&(until, *hash));
            }
            if let Stage::Waiting { until } = now {
                self.waiting.insert((until, *hash));
            }
        }
    }

    /// `hash` is no longer wanted (it landed).
    fn forget(&mut self, hash: &ContentHash) -> bool {
        let Some(w) = self.wanted.remove(hash) else { return false };
        self.counts[w.category()] -= 1;
        if let Stage::Waiting { until } = w.stage {
            self.waiting.remove(&(until, *hash));
        }
        for p in &w.refused {
            if let Some(r) = self.refusals.get_mut(p) {
                r.remove(hash);
            }
        }
        true
    }

    /// The peers a blob is asked from, first first (for a range read).
    pub fn candidates(&self, hash: &ContentHash) -> Vec<NodeId> {
        self.wanted.get(hash).map(|w| w.candidates.clone()).unwrap_or_default()
    }

    /// Puts `hash` in its first candidate's queue; without one it waits for the next tick
    /// (which asks every connected peer).
    fn queue(&mut self, hash: ContentHash, front: bool) {
        let Some(w) = self.wanted.get(&hash) else { return };
        let Some(&peer) = w.candidates.first() else {
            if !matches!(w.stage, Stage::Waiting { .. }) {
                self.update(&hash, |w| w.stage = Stage::Waiting { until: Instant::now() });
            }
            return;
        };
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.update(&hash, |w| w.stage = Stage::Queued(ticket));
        let q = self.queues.entry(peer).or_default();
        if q.is_empty() {
            self.turn.push_back(peer);
        }
        if front {
            q.push_front((hash, self.next_ticket));
        } else {
            q.push_back((hash, self.next_ticket));
        }
    }

    /// The next request to send, if one may start: a peer and the blobs to ask it for.
    pub fn next_batch(&mut self) -> Option<(NodeId, Vec<(ContentHash, u64)>)> {
        if self.in_flight >= FETCHES_MAX {
            return None;
        }
        if let Some((peer, batch)) = self.ready.pop_front() {
            self.in_flight += 1;
            return Some((peer, batch));
        }
        while let Some(peer) = self.turn.pop_front() {
            let Some(q) = self.queues.get_mut(&peer) else { continue };
            let mut batch = Vec::new();
            while batch.len() < FETCH_BATCH_MAX {
                let Some((hash, ticket)) = q.pop_front() else { break };
                match self.wanted.get_mut(&hash) {
                    Some(w) if w.stage == Stage::Queued(ticket) => {
                        // Queued to fetching: neither waits, so only the counts move.
                        w.stage = Stage::Fetching;
                        self.counts[QUEUED] -= 1;
                        self.counts[FETCHING] += 1;
                        batch.push((hash, w.size));
                    }
                    _ => {} // stale: decided otherwise since
                }
            }
            if q.is_empty() {
                self.queues.remove(&peer);
            } else {
                self.turn.push_back(peer);
            }
            if !batch.is_empty() {
                self.in_flight += 1;
                return Some((peer, batch));
            }
        }
        None
    }

    /// A batch ended (one request, or two: blobs of the inline tier and larger ones go in
    /// separate requests on one connection): what arrived is done, and each blob that did
    /// not is decided (see the module's notes).
    pub fn finished(&mut self, attempts: &[Attempt], now: Instant) -> Settled {
        self.in_flight = self.in_flight.saturating_sub(1);
        let mut settled = Settled::default();
        for a in attempts {
            self.settle(a, now, &mut settled);
        }
        settled
    }

    fn settle(&mut self, a: &Attempt, now: Instant, settled: &mut Settled) {
        for (h, _) in &a.asked {
            if a.landed.contains(h) && self.forget(h) {
                self.fetched += 1;
                settled.landed.push(*h);
            }
        }
        let received = a.received.min(a.asked.len());
        // Arrived but not landed (a local failure), or never asked past an unreachable
        // peer: retried at the next tick.
        let mut failed: Vec<ContentHash> = a.asked[..received].iter().map(|(h, _)| *h).filter(|h| !a.landed.contains(h)).collect();
        let rest = &a.asked[received..];
        match (&a.error, rest.len()) {
            (_, 0) => {}
            (Some(FetchError::Stopped(_)), n) if received > 0 || n == 1 => {
                // The response stopped at this blob: this peer cannot serve it.
                let (bad, after) = (rest[0].0, &rest[1..]);
                if self.refused_by(bad, a.peer, now) {
                    settled.unavailable.push(bad);
                }
                self.ask_again(a.peer, after);
            }
            (Some(FetchError::Stopped(_)), n) => {
                // Refused before anything arrived: maybe whole, for one bad blob. Halves.
                let (left, right) = rest.split_at(n / 2);
                self.ask_again(a.peer, left);
                self.ask_again(a.peer, right);
            }
            _ => failed.extend(rest.iter().map(|(h, _)| *h)),
        }
        for h in failed {
            // Other candidates first at the next tick; this one last.
            self.update(&h, |w| {
                w.candidates.retain(|p| *p != a.peer);
                w.candidates.push(a.peer);
                w.stage = Stage::Waiting { until: now };
            });
        }
    }

    /// Asks `peer` again, at once and as one request, for those of `blobs` still wanted.
    fn ask_again(&mut self, peer: NodeId, blobs: &[(ContentHash, u64)]) {
        let batch: Vec<(ContentHash, u64)> = blobs.iter().copied().filter(|(h, _)| self.wanted.get(h).is_some_and(|w| w.stage == Stage::Fetching)).collect();
        if !batch.is_empty() {
            self.ready.push_back((peer, batch));
        }
    }

    /// `peer` could not serve `hash`: the next candidate is tried; with none left the blob
    /// is unavailable, and waits a pause that doubles each round. True when it has been so
    /// for [`WAITERS_GIVE_UP_AFTER`] rounds now (its waiters are told).
    fn refused_by(&mut self, hash: ContentHash, peer: NodeId, now: Instant) -> bool {
        let Some(w) = self.wanted.get_mut(&hash) else { return false };
        w.candidates.retain(|p| *p != peer);
        w.refused.insert(peer);
        self.refusals.entry(peer).or_default().insert(hash);
        if w.candidates.is_empty() {
            let mut told = false;
            self.update(&hash, |w| {
                w.rounds_refused += 1;
                let pause = UNAVAILABLE_RETRY_MIN.saturating_mul(1 << (w.rounds_refused - 1).min(16)).min(UNAVAILABLE_RETRY_MAX);
                w.stage = Stage::Waiting { until: now + pause };
                told = w.rounds_refused == WAITERS_GIVE_UP_AFTER;
            });
            return told;
        }
        self.queue(hash, false);
        false
    }

    /// Once a second: failed blobs are queued again with every `connected` peer as a
    /// candidate (those that failed last), and unavailable ones whose pause is over are
    /// asked for again from everyone connected.
    /// With no peer connected nothing is due: the blobs wait for one.
    pub fn tick(&mut self, connected: &[NodeId], now: Instant) {
        if connected.is_empty() {
            return;
        }
        while let Some(&(until, h)) = self.waiting.first() {
            if until > now {
                break;
            }
            self.waiting.pop_first();
            let Some(w) = self.wanted.get_mut(&h) else { continue };
            // Everyone connected is asked again (those that failed last, last).
            for p in w.refused.drain() {
                if let Some(r) = self.refusals.get_mut(&p) {
                    r.remove(&h);
                }
            }
            for p in connected.iter().rev() {
                if !w.candidates.contains(p) {
                    w.candidates.insert(0, *p);
                }
            }
            // Out of the waiting order already; `queue` moves its count.
            self.queue(h, false);
        }
    }

    /// `peer` has a new session (it restarted, or came back): what it could not serve
    /// before it may serve now, so it is a candidate again, and unavailable blobs are
    /// asked of it at once.
    pub fn peer_returned(&mut self, peer: NodeId) {
        let mut due = Vec::new();
        for h in self.refusals.remove(&peer).unwrap_or_default() {
            let Some(w) = self.wanted.get_mut(&h) else { continue };
            if w.refused.remove(&peer) && !w.candidates.contains(&peer) {
                w.candidates.push(peer);
                if matches!(w.stage, Stage::Waiting { .. }) {
                    due.push(h);
                }
            }
        }
        for h in due {
            self.queue(h, false);
        }
    }

    /// The counts `status` shows.
    pub fn counts(&self) -> FetchCounts {
        FetchCounts { pending: self.counts[QUEUED] + self.counts[FETCHING], failed: self.counts[FAILED], unavailable: self.counts[UNAVAILABLE], fetched: self.fetched }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> ContentHash {
        ContentHash([i; 32])
    }

    const A: NodeId = NodeId([1; 32]);
    const B: NodeId = NodeId([2; 32]);

    fn attempt(peer: NodeId, asked: &[(ContentHash, u64)], received: usize, error: Option<FetchError>) -> Attempt {
        let landed = asked[..received].iter().map(|(h, _)| *h).collect();
        Attempt { peer, asked: asked.to_vec(), received, landed, error }
    }

    fn stopped() -> Option<FetchError> {
        Some(FetchError::Stopped("reset".into()))
    }

    /// Drives every batch to an end where only `bad` cannot be served by `peer`, as a
    /// provider that stops at it (or a gate that refuses any request naming it) answers.
    fn run(f: &mut Fetches, bad: &HashSet<ContentHash>, refuse_whole: bool) -> (Vec<ContentHash>, Vec<ContentHash>, usize) {
        let (mut landed, mut unavailable, mut requests) = (Vec::new(), Vec::new(), 0);
        while let Some((peer, batch)) = f.next_batch() {
            requests += 1;
            let stop = batch.iter().position(|(h, _)| bad.contains(h));
            let received = match stop {
                Some(_) if refuse_whole => 0,
                Some(i) => i,
                None => batch.len(),
            };
            let s = f.finished(&[attempt(peer, &batch, received, stop.map(|_| FetchError::Stopped("no".into())))], Instant::now());
            landed.extend(s.landed);
            unavailable.extend(s.unavailable);
        }
        (landed, unavailable, requests)
    }

    #[test]
    fn good_blobs_batched_with_unservable_ones_all_arrive_and_the_bad_ones_are_unavailable() {
        for refuse_whole in [false, true] {
            let mut f = Fetches::default();
            for i in 0..100 {
                f.add(h(i), 10, &[A], false);
            }
            let bad: HashSet<ContentHash> = [h(3), h(50), h(51), h(99)].into();
            let (landed, told, requests) = run(&mut f, &bad, refuse_whole);
            assert_eq!(landed.len(), 96, "refuse_whole={refuse_whole}");
            assert!(told.is_empty(), "waiters are told only after several rounds");
            // Halving finds each bad blob in about log2(n) requests (a provider that stops in
            // order names it at once, unless it is the first of a request).
            assert!(requests <= 4 * 2 * 7, "{requests} requests (refuse_whole={refuse_whole})");
            let c = f.counts();
            assert_eq!((c.pending, c.failed, c.unavailable, c.fetched), (0, 0, 4, 96));
            // Not retried hot: nothing is handed out before the pause is over ...
            f.tick(&[A, B], Instant::now());
            assert!(f.next_batch().is_none());
            // ... and after it, they are asked for from everyone connected.
            f.tick(&[A, B], Instant::now() + UNAVAILABLE_RETRY_MIN);
            let (_, batch) = f.next_batch().expect("asked again");
            assert_eq!(batch.len(), 4);
        }
    }

    #[test]
    fn a_blob_one_peer_lacks_comes_from_the_next_and_a_peer_that_names_it_revives_an_unavailable_one() {
        let mut f = Fetches::default();
        f.add(h(1), 10, &[A, B], false);
        let (peer, batch) = f.next_batch().unwrap();
        assert_eq!(peer, A);
        let s = f.finished(&[attempt(A, &batch, 0, stopped())], Instant::now());
        assert!(s.unavailable.is_empty());
        let (peer, batch) = f.next_batch().unwrap();
        assert_eq!(peer, B, "the next candidate is asked at once");
        f.finished(&[attempt(B, &batch, 0, stopped())], Instant::now());
        assert_eq!(f.counts().unavailable, 1);
        assert!(f.next_batch().is_none());
        // A peer that did not refuse it names it: asked again at once.
        let c = NodeId([3; 32]);
        f.add(h(1), 10, &[A], false);
        assert!(f.next_batch().is_none(), "a peer that refused it is not asked again before the pause");
        f.add(h(1), 10, &[c], false);
        assert_eq!(f.next_batch().map(|(p, _)| p), Some(c));
        // A peer that refused it and comes back (a new session) is asked again at once.
        let mut f = Fetches::default();
        f.add(h(2), 10, &[A], false);
        let (_, batch) = f.next_batch().unwrap();
        f.finished(&[attempt(A, &batch, 0, stopped())], Instant::now());
        assert_eq!(f.counts().unavailable, 1);
        f.peer_returned(A);
        assert_eq!(f.next_batch().map(|(p, b)| (p, b.len())), Some((A, 1)));
    }

    #[test]
    fn a_blob_no_one_serves_is_asked_for_less_and_less_often_and_its_waiters_are_told() {
        let mut f = Fetches::default();
        f.add(h(1), 10, &[A], true);
        let mut now = Instant::now();
        let mut pauses = Vec::new();
        let (_, mut batch) = f.next_batch().expect("asked");
        for round in 1..=6u32 {
            let told = f.finished(&[attempt(A, &batch, 0, stopped())], now).unavailable;
            assert_eq!(told.len(), usize::from(round == WAITERS_GIVE_UP_AFTER), "round {round}");
            let mut waited = Duration::ZERO;
            batch = loop {
                waited += Duration::from_millis(250);
                assert!(waited < UNAVAILABLE_RETRY_MAX * 2, "never asked again");
                f.tick(&[A], now + waited);
                if let Some((_, b)) = f.next_batch() {
                    break b;
                }
            };
            pauses.push(waited);
            now += waited;
        }
        assert!(pauses.windows(2).all(|w| w[1] >= w[0] * 2 - Duration::from_millis(250)), "the pause doubles: {pauses:?}");
    }


    #[test]
    fn an_unreachable_peer_is_retried_at_the_next_tick_others_first() {
        let mut f = Fetches::default();
        for i in 0..3 {
            f.add(h(i), 10, &[A], false);
        }
        let (peer, batch) = f.next_batch().unwrap();
        f.finished(&[attempt(peer, &batch, 1, Some(FetchError::Unreachable("timeout".into())))], Instant::now());
        assert_eq!(f.counts().failed, 2);
        assert!(f.next_batch().is_none(), "not before the tick");
        f.tick(&[A, B], Instant::now());
        let (peer, batch) = f.next_batch().unwrap();
        assert_eq!((peer, batch.len()), (B, 2));
    }

    impl Fetches {
        /// The kept counts, waiting order and refusal index agree with the blobs' stages.
        fn check(&self) {
            let mut counts = [0; 4];
            let mut waiting = BTreeSet::new();
            let mut refusals: HashMap<NodeId, HashSet<ContentHash>> = HashMap::new();
            for (h, w) in &self.wanted {
                counts[w.category()] += 1;
                if let Stage::Waiting { until } = w.stage {
                    waiting.insert((until, *h));
                }
                for p in &w.refused {
                    refusals.entry(*p).or_default().insert(*h);
                }
            }
            assert_eq!(counts, self.counts);
            assert_eq!(waiting, self.waiting);
            let kept: HashMap<NodeId, HashSet<ContentHash>> = self.refusals.iter().filter(|(_, r)| !r.is_empty()).map(|(p, r)| (*p, r.clone())).collect();
            assert_eq!(refusals, kept);
        }
    }

    proptest::proptest! {
        /// Whatever happens to blobs (added, fetched in batches that land, stop or fail,
        /// ticks, peers coming back), the kept counts and orders are those of the stages.
        #[test]
        fn the_kept_counts_and_orders_follow_every_step(ops in proptest::collection::vec((0u8..6, 0u8..40, 0u8..3, 0u8..8), 1..200)) {
            let peers = [A, B, NodeId([3; 32])];
            let mut f = Fetches::default();
            let mut now = Instant::now();
            let mut flying: Vec<(NodeId, Vec<(ContentHash, u64)>)> = Vec::new();
            for (op, x, p, k) in ops {
                match op {
                    0 | 1 => f.add(h(x), 10, &[peers[p as usize]], op == 1),
                    2 => flying.extend(f.next_batch()),
                    3 => if !flying.is_empty() {
                        let (peer, batch) = flying.remove(x as usize % flying.len());
                        let received = (k as usize).min(batch.len());
                        let error = match k % 3 { 0 => None, 1 => stopped(), _ => Some(FetchError::Unreachable("gone".into())) };
                        let error = if received == batch.len() { None } else { error.or(stopped()) };
                        f.finished(&[attempt(peer, &batch, received, error)], now);
                    },
                    4 => {
                        now += Duration::from_millis(250 * u64::from(k));
                        f.tick(&peers[..=p as usize], now);
                    }
                    _ => f.peer_returned(peers[p as usize]),
                }
                f.check();
            }
        }
    }

    #[test]
    fn at_most_fetches_max_requests_run_and_an_urgent_blob_goes_first() {
        let mut f = Fetches::default();
        for i in 0..(FETCH_BATCH_MAX * 6) as u32 {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_le_bytes());
            f.add(ContentHash(b), 1, &[A], false);
        }
        f.add(h(0xff), 1, &[B], true);
        let mut batches = Vec::new();
        while let Some(b) = f.next_batch() {
            batches.push(b);
        }
        assert_eq!(batches.len(), FETCHES_MAX);
        assert!(batches.iter().all(|(_, b)| b.len() <= FETCH_BATCH_MAX));
        assert!(batches.iter().any(|(p, b)| *p == B && b[0].0 == h(0xff)));
    }
}
