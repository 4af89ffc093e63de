//! The node's door: what a connection may cost before its peer is known to be a member.
//!
//! A stranger may open a QUIC connection to any node whose address it has. Before it has
//! proved membership (a `Hello` from a member's key, or a `Join` with a ticket's secret) it
//! gets a handshake slot among [`HANDSHAKES_MAX`], a first frame of at most
//! [`HANDSHAKE_FRAME_BYTES_MAX`], and reads on the gate's own SQLite connection — never the
//! store's writer thread, which every local write waits on. Each bound hit is counted,
//! logged (the first time, then at most once a minute with the count) and shown in
//! `alkfs status`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::ids::{NodeId, Uid};
use crate::proto::limits::{CONNECTIONS_MAX, CONNECTIONS_PER_SEC_MAX, HANDSHAKES_MAX, HANDSHAKE_FRAME_BYTES_MAX};
use crate::proto::ticket::{JoinRefusal, SECRET_BYTES};
use crate::store::TreeStore;

/// How often a bound that keeps being hit is logged again.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// A named bound, as `alkfs status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BoundHit {
    /// Its name in `proto::limits`.
    pub name: String,
    /// Its value.
    pub limit: u64,
    /// Times it refused something since the node started.
    pub hits: u64,
}

struct Hits {
    limit: u64,
    count: u64,
    logged: Option<Instant>,
    logged_count: u64,
}

/// Counts of bounds hit, shared by everything that enforces one.
#[derive(Default)]
pub struct BoundHits(Mutex<BTreeMap<&'static str, Hits>>);

impl std::fmt::Debug for BoundHits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BoundHits").field(&self.report()).finish()
    }
}

impl BoundHits {
    /// Counts one refusal by bound `name` (of value `limit`), and logs it when due: `what`
    /// says what was refused and what the user can do.
    pub fn hit(&self, name: &'static str, limit: u64, what: &str) {
        let mut all = self.0.lock().expect("bound hits");
        let h = all.entry(name).or_insert(Hits { limit, count: 0, logged: None, logged_count: 0 });
        h.count += 1;
        if h.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            tracing::warn!(bound = name, limit, hits = h.count, since_last_log = h.count - h.logged_count, "{what}");
            h.logged = Some(Instant::now());
            h.logged_count = h.count;
        }
    }

    /// Every bound hit so far.
    pub fn report(&self) -> Vec<BoundHit> {
        let all = self.0.lock().expect("bound hits");
        all.iter().map(|(name, h)| BoundHit { name: name.to_string(), limit: h.limit, hits: h.count }).collect()
    }
}

/// The door: handshake slots, a read connection of its own, and the bound counters.
pub struct Gate {
    /// Its read connection to the tree, once [`Gate::attach`]ed: until then nobody is a
    /// member (an endpoint bound for a benchmark serves no sessions).
    tree: std::sync::OnceLock<Arc<Mutex<TreeStore>>>,
    handshakes: Arc<tokio::sync::Semaphore>,
    /// The members of shared buckets and where they listen ([`Gate::know_members`]): their
    /// connections pass the connection bounds (checked before anyone is known by key, so by
    /// source address, or by the id a relay vouches for).
    members: Mutex<(std::collections::HashSet<NodeId>, std::collections::HashSet<std::net::SocketAddr>)>,
    /// Bounds hit, by name (every part of the mesh counts here).
    pub hits: Arc<BoundHits>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("hits", &self.hits).finish_non_exhaustive()
    }
}

/// A handshake slot, given back when dropped.
pub type HandshakeSlot = tokio::sync::OwnedSemaphorePermit;

impl Gate {
    /// A gate that admits nobody until attached to a node's tree.
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate {
            tree: std::sync::OnceLock::new(),
            handshakes: Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX)),
            members: Mutex::default(),
            hits: Arc::new(BoundHits::default()),
        })
    }

    /// Opens a read connection of its own to the tree of the node whose data dir is `dir`.
    pub fn attach(&self, dir: &Path) -> Result<(), String> {
        let tree = TreeStore::open(&dir.join(crate::store::TREE_DB_FILE), false).map_err(|e| format!("the network gate cannot read the tree: {e}"))?;
        self.tree.set(Arc::new(Mutex::new(tree))).map_err(|_| "the network gate is attached already".to_string())
    }

    /// A handshake slot, or `None` (counted and logged) when [`HANDSHAKES_MAX`] are running.
    pub fn handshake(&self) -> Option<HandshakeSlot> {
        match self.handshakes.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                self.hits.hit("HANDSHAKES_MAX", HANDSHAKES_MAX as u64, "refused a connection: too many handshakes at once (strangers connecting, or many members reconnecting; members retry)");
                None
            }
        }
    }

    /// Counts a first frame over [`HANDSHAKE_FRAME_BYTES_MAX`].
    pub fn oversized_handshake(&self, peer: &NodeId, len: usize) {
        self.hits.hit("HANDSHAKE_FRAME_BYTES_MAX", HANDSHAKE_FRAME_BYTES_MAX as u64, &format!("dropped a connection whose first frame announced {len} bytes, over the limit (last from {})", peer.short()));
    }

    /// Runs `f` on the gate's read connection, on a blocking thread.
    pub async fn read<T: Send + 'static>(&self, f: impl FnOnce(&rusqlite::Connection) -> T + Send + 'static) -> Option<T> {
        let tree = self.tree.get()?.clone();
        tokio::task::spawn_blocking(move || f(tree.lock().expect("gate db").conn())).await.ok()
    }

    /// The buckets among `asked` (all, when empty) that this node shares with `peer`, a
    /// member not removed.
    pub async fn member_buckets(&self, peer: NodeId, asked: Vec<Uid>) -> Vec<Uid> {
        self.read(move |conn| crate::engine::mesh::shared_with(conn, &peer, &asked).unwrap_or_default()).await.unwrap_or_default()
    }

    /// Whether a join of bucket `bucket` with `secret` by `joiner` may go to the store (which
    /// decides again, in the transaction that uses the invitation up).
    pub async fn may_join(&self, bucket: Uid, secret: [u8; SECRET_BYTES], joiner: NodeId, now_ms: i64) -> Result<(), JoinRefusal> {
        self.read(move |conn| crate::engine::mesh::admissible(conn, &bucket, &secret, &joiner, now_ms).unwrap_or(Err(JoinRefusal::UnknownSecret)).map(|_| ()))
            .await
            .unwrap_or(Err(JoinRefusal::UnknownSecret))
    }

    /// The filter every incoming connection passes before its handshake: refused, at the cost
    /// of one packet, beyond [`CONNECTIONS_PER_SEC_MAX`] new connections a second (a burst
    /// of [`HANDSHAKES_MAX`]) or while [`CONNECTIONS_MAX`] are open. A connection's state
    /// costs the node memory from its first packet until it has drained, whoever it turns out
    /// to be: 500 strangers reconnecting as fast as they were refused kept ~500 connections
    /// alive at ~230 KiB each (`benches/mesh.rs`, `attack`). Sessions already open are
    /// untouched; a member refused meanwhile retries at its next dial.
    pub fn incoming_filter(self: &Arc<Self>, endpoint: iroh::Endpoint) -> iroh::protocol::IncomingFilter {
        let gate = self.clone();
        let bucket = Mutex::new((HANDSHAKES_MAX as f64, Instant::now()));
        Arc::new(move |incoming| {
            if gate.is_member_addr(&incoming.remote_addr()) {
                return iroh::protocol::IncomingFilterOutcome::Accept;
            }
            let socket = &endpoint.metrics().socket;
            let open = socket.num_conns_opened.get().saturating_sub(socket.num_conns_closed.get());
            if open >= CONNECTIONS_MAX as u64 {
                gate.hits.hit("CONNECTIONS_MAX", CONNECTIONS_MAX as u64, "refused a connection before its handshake: too many open (strangers connecting, or many members at once; members retry)");
                return iroh::protocol::IncomingFilterOutcome::Reject;
            }
            let mut b = bucket.lock().expect("connection rate");
            let now = Instant::now();
            b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * CONNECTIONS_PER_SEC_MAX as f64).min(HANDSHAKES_MAX as f64);
            b.1 = now;
            if b.0 < 1.0 {
                drop(b);
                gate.hits.hit("CONNECTIONS_PER_SEC_MAX", CONNECTIONS_PER_SEC_MAX as u64, "refused a connection before its handshake: too many new ones a second (strangers connecting; members retry)");
                return iroh::protocol::IncomingFilterOutcome::Reject;
            }
            b.0 -= 1.0;
            iroh::protocol::IncomingFilterOutcome::Accept
        })
    }

    /// Records the members of shared buckets and where they listen (every mesh tick).
    pub fn know_members(&self, members: &[(NodeId, Vec<std::net::SocketAddr>)]) {
        let ids = members.iter().map(|(n, _)| *n).collect();
        let addrs = members.iter().flat_map(|(_, a)| a.iter().copied()).collect();
        *self.members.lock().expect("gate members") = (ids, addrs);
    }

    /// Whether a connection from `addr` is a member's, as far as can be told before its
    /// handshake.
    fn is_member_addr(&self, addr: &iroh::endpoint::IncomingAddr) -> bool {
        let known = self.members.lock().expect("gate members");
        match addr {
            iroh::endpoint::IncomingAddr::Ip(a) => known.1.contains(a),
            iroh::endpoint::IncomingAddr::Relay { endpoint_id, .. } => known.0.contains(&NodeId(*endpoint_id.as_bytes())),
            _ => false,
        }
    }

    /// The gate's read connection, shared with the blob gate (`None` until attached).
    pub fn tree(&self) -> Option<Arc<Mutex<TreeStore>>> {
        self.tree.get().cloned()
    }
}
