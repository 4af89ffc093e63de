//! The mesh actor: the node's iroh endpoint, one supervised session actor per connected
//! peer, invitations and joins, and fetching the bytes of replicated versions.
//!
//! ```text
//! mesh ─┬─ session(peer 1)   one QUIC connection, one stream of sync frames
//!       ├─ session(peer 2)   (a stalled peer stalls only its own session)
//!       └─ fetch tasks        bounded batches of blobs from the peers that have them
//! ```
//!
//! The rules (which documents to sync, what a frame may hold, who is a member, when to dial
//! again) are `proto`'s; the documents and membership are the store's (`engine::mesh`, run
//! by the store's writer); this module only moves bytes and keeps sessions alive.
//!
//! - **Sessions.** Every node dials the members it has no session with (backoff 1 s → 15 s);
//!   if two sessions with one peer open at once, both keep the one the smaller node id dialed.
//!   A session first exchanges a summary (a digest per document) per bucket, then runs
//!   automerge's sync protocol on the documents that differ. How changes spread is
//!   [`crate::proto::fanout`]'s: new local changes are pushed to every session at once, what
//!   arrives is not forwarded, a message is answered only when there is something to say,
//!   and the dialer's summary every [`ANTI_ENTROPY`] covers anything lost.
//! - **Membership.** A peer is admitted to a session only for buckets it is a member of
//!   (read from the store for each session), and refused before any data moves otherwise.
//!   Sessions re-check every second and drop buckets whose membership ended: a removed member
//!   is cut off within a second of the removal reaching this node.
//! - **Blobs.** iroh-blobs serves only members, and only hashes a bucket they belong to names
//!   (a gate on every connection and request). Missing blobs are fetched in batches of up to
//!   [`FETCH_BATCH_MAX`] hashes with one `GetMany` request each, at most [`FETCHES_MAX`] at a
//!   time, each bounded by a timeout; what fails is retried from another peer that has it,
//!   and a blob a peer cannot serve is found per hash (the scheduler: [`super::fetch`]).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iroh::address_lookup::MemoryLookup;
use iroh::endpoint::{presets, ConnectOptions, Connection, NetReportConfig, PortmapperConfig, RecvStream, SendStream, VarInt};
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh::{Endpoint, EndpointAddr, RelayMode};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::fetch::{Attempt, FetchError, Fetches};
use super::gate::{BoundHit, Gate};
use super::store::{WriteOp, WriteOutcome};
use super::{Child, Names, NodeContext, NodeHandle};
use crate::engine::mesh::{check_message, Adoption, ClockWait, MeshOp, MeshReply, Received};
use crate::proto::doc::CheckedMessage;
use crate::proto::entry::ContentHash;
use crate::proto::fanout::{FrameCounts, ANTI_ENTROPY_MS};
use crate::proto::ids::{NodeId, Uid};
use crate::proto::limits::{HANDSHAKE_FRAME_BYTES_MAX, SYNC_FRAME_BYTES_MAX};
use crate::proto::replica::BranchRecord;
use crate::proto::sync::{redial_after_ms, Frame, SyncError, OLDER_PROTOCOL, OLDER_SYNC_ALPNS, SYNC_ALPN};
use crate::proto::ticket::Ticket;

/// How often the node that dialed a session sends its summaries again, covering what was
/// lost ([`crate::proto::fanout`]).
pub const ANTI_ENTROPY: Duration = Duration::from_millis(ANTI_ENTROPY_MS);
/// How long a dial, a handshake or one frame's write may take.
pub const NET_TIMEOUT: Duration = Duration::from_secs(10);
pub use super::fetch::{FETCHES_MAX, FETCH_BATCH_MAX};
/// How long one fetch request may take before it is abandoned (and retried).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait between dials of a peer that is down.
pub const REDIAL_MAX: Duration = Duration::from_secs(15);
/// How often the node looks in the store for versions whose bytes never arrived (a restart
/// forgets the fetch queue; the store remembers what is missing).
pub const MISSING_SCAN: Duration = Duration::from_secs(5);

/// How long a member away (no session) still holds up its buckets' compaction: past it, it
/// is left behind and takes the epoch from nothing when it comes back
/// (`engine::compaction`). After a start, every member counts as just seen.
pub const MEMBER_AWAY_MAX: Duration = Duration::from_secs(3600);
/// Most missing blobs one scan queues.
pub const MISSING_SCAN_MAX: usize = 10_000;

/// Where the node listens and which relay it uses.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The socket address to bind.
    pub listen: SocketAddr,
    /// `None`: no relay, nothing leaves the listed addresses (tests, LANs); `Some(None)`: the
    /// default relays; `Some(Some(url))`: that relay.
    pub relay: Option<Option<String>>,
    /// Fetch the bytes of every version that arrives (`true`), or only when a user reads one.
    pub eager_fetch: bool,
}

/// The node's network: its endpoint and the address book dials go through.
#[derive(Clone, Debug)]
pub struct Net {
    /// The iroh endpoint.
    pub endpoint: Endpoint,
    /// Gossip, for announcing changed documents on each bucket's topic.
    pub gossip: iroh_gossip::net::Gossip,
    /// Addresses of peers, from tickets and from the buckets' documents.
    pub lookup: MemoryLookup,
    /// Fetch arriving versions' bytes at once (else on first read).
    pub eager_fetch: bool,
    /// This run of the node (random per start; see `Frame::Hello`).
    pub instance: u64,
    /// The door strangers knock at: handshake slots, membership read off the store's
    /// thread, and the counts of bounds hit.
    pub gate: Arc<Gate>,
}

/// Binds the node's endpoint. With relays off it touches nothing but the listen address: no
/// DNS, no relay, no UPnP, no probes (DESIGN.md, "Staying local in tests").
pub async fn bind(key: iroh::SecretKey, cfg: &NetConfig) -> Result<Net, String> {
    let gate = Gate::new();
    let lookup = MemoryLookup::new();
    let mode = match &cfg.relay {
        None => RelayMode::Disabled,
        Some(None) => RelayMode::Default,
        Some(Some(url)) => RelayMode::custom([url.parse::<iroh::RelayUrl>().map_err(|e| format!("relay URL {url}: {e}"))?]),
    };
    let mut b = Endpoint::builder(presets::Minimal)
        .secret_key(key)
        .relay_mode(mode)
        .clear_ip_transports()
        .bind_addr(cfg.listen)
        .map_err(|e| format!("listen address {}: {e}", cfg.listen))?
        .address_lookup(lookup.clone());
    if cfg.relay.is_none() {
        b = b.portmapper_config(PortmapperConfig::Disabled).net_report_config(NetReportConfig::minimal());
    }
    let endpoint = b.bind().await.map_err(|e| format!("cannot listen on {}: {e} (is another node using the port?)", cfg.listen))?;
    let gossip = iroh_gossip::net::Gossip::builder().max_message_size(crate::proto::limits::GOSSIP_MESSAGE_BYTES_MAX).spawn(endpoint.clone());
    let instance = std::collections::hash_map::RandomState::new().build_hasher().finish();
    Ok(Net { endpoint, gossip, lookup, eager_fetch: cfg.eager_fetch, instance, gate })
}

impl Net {
    /// Where this node listens, for tickets and peers.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self.endpoint.addr().ip_addrs().copied().collect();
        if out.is_empty() {
            out = self.endpoint.bound_sockets();
        }
        out
    }

    fn learn(&self, node: &NodeId, addrs: &[SocketAddr]) {
        if addrs.is_empty() {
            return;
        }
        if let Ok(id) = iroh::EndpointId::from_bytes(&node.0) {
            let mut addr = EndpointAddr::new(id);
            for a in addrs {
                addr = addr.with_ip_addr(*a);
            }
            // Replaced, not added to: a peer that restarted listens elsewhere, and a dial
            // (a blob fetch) at its old address waits out a timeout each time.
            self.lookup.set_endpoint_info(addr);
        }
    }
}

fn endpoint_id(node: &NodeId) -> Option<iroh::EndpointId> {
    iroh::EndpointId::from_bytes(&node.0).ok()
}

fn node_of(id: iroh::EndpointId) -> NodeId {
    NodeId(*id.as_bytes())
}

async fn mesh(handle: &NodeHandle, op: MeshOp) -> Result<MeshReply, String> {
    match handle.write(WriteOp::Mesh(op)).await {
        Ok(WriteOutcome::Mesh(r)) => Ok(r),
        Ok(_) => Err("unexpected answer from the store".into()),
        Err(e) => Err(e.to_string()),
    }
}

async fn read_frame(recv: &mut RecvStream) -> Result<Frame, String> {
    read_frame_max(recv, SYNC_FRAME_BYTES_MAX).await.map_err(|e| e.to_string())
}

/// Why a frame could not be read.
#[derive(Debug)]
enum ReadError {
    /// Its header announced more than the limit (nothing more was read).
    TooLarge(usize),
    /// Anything else: the stream, or bytes that are not a frame.
    Other(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::TooLarge(n) => write!(f, "a frame of {n} bytes, over the limit"),
            ReadError::Other(e) => f.write_str(e),
        }
    }
}

/// Reads one frame of at most `max` bytes: a larger one is refused from its header.
async fn read_frame_max(recv: &mut RecvStream, max: usize) -> Result<Frame, ReadError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await.map_err(|e| ReadError::Other(format!("read: {e}")))?;
    let len = Frame::body_len(header).map_err(|e: SyncError| ReadError::Other(e.to_string()))?;
    if len > max {
        return Err(ReadError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| ReadError::Other(format!("read: {e}")))?;
    Frame::decode(&body).map_err(|e| ReadError::Other(e.to_string()))
}

async fn write_frame(send: &mut SendStream, frame: &Frame) -> Result<(), String> {
    match tokio::time::timeout(NET_TIMEOUT * 3, send.write_all(&frame.encode())).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err("the peer took no data for 30 s".into()),
    }
}

/// Refuses a connection with a reason the other side can show, and lets the frame arrive.
async fn refuse(conn: &Connection, send: &mut SendStream, reason: &str) {
    let _ = write_frame(send, &Frame::Refused { reason: reason.to_string() }).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(VarInt::from_u32(403), b"refused");
}

/// Dials `id` on the sync protocol, offering the older versions too so that a peer that
/// speaks only one of them is named as such instead of failing as unreachable.
async fn connect_sync(endpoint: &Endpoint, id: iroh::EndpointId) -> Result<Connection, String> {
    let older = ConnectOptions::new().with_additional_alpns(OLDER_SYNC_ALPNS.iter().map(|a| a.to_vec()).collect());
    let connecting = endpoint.connect_with_opts(id, SYNC_ALPN, older).await.map_err(|e| e.to_string())?;
    let conn = connecting.await.map_err(|e| e.to_string())?;
    if conn.alpn() != SYNC_ALPN {
        conn.close(VarInt::from_u32(426), OLDER_PROTOCOL.as_bytes());
        return Err(OLDER_PROTOCOL.to_string());
    }
    Ok(conn)
}

/// The handler of the older sync protocols: tells the peer to upgrade and closes.
#[derive(Debug, Clone)]
pub struct OlderProtocol;

impl ProtocolHandler for OlderProtocol {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        tracing::warn!(peer = %node_of(conn.remote_id()).short(), alpn = %String::from_utf8_lossy(conn.alpn()), "{OLDER_PROTOCOL}; refused");
        conn.close(VarInt::from_u32(426), OLDER_PROTOCOL.as_bytes());
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Incoming connections on the sync ALPN.

/// The handler of the sync protocol ([`SYNC_ALPN`]): checks who connects before anything else.
#[derive(Debug, Clone)]
pub struct SyncHandler {
    /// The node's actor names (the mesh actor is looked up per connection).
    pub names: Names,
    /// This run of the node (see `Frame::Hello`).
    pub instance: u64,
    /// The door (see [`Gate`]).
    pub gate: Arc<Gate>,
}

impl ProtocolHandler for SyncHandler {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let peer = node_of(conn.remote_id());
        // The peer's key is proven by the connection: a member goes on at once. Anyone else
        // (a stranger, or a joiner with a ticket) holds one of a bounded number of slots,
        // sends one small frame, and costs the store's writer nothing until it is admitted.
        let member = !self.gate.member_buckets(peer, Vec::new()).await.is_empty();
        let slot = if member { None } else { self.gate.handshake() };
        if !member && slot.is_none() {
            conn.close(VarInt::from_u32(503), b"busy: too many handshakes, try again");
            return Ok(());
        }
        let handle = NodeHandle::new(self.names.clone());
        let (mut send, mut recv) = match tokio::time::timeout(NET_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            _ => return Ok(()),
        };
        let first = match tokio::time::timeout(NET_TIMEOUT, read_frame_max(&mut recv, HANDSHAKE_FRAME_BYTES_MAX)).await {
            Ok(Ok(f)) => f,
            Ok(Err(ReadError::TooLarge(len))) => {
                self.gate.oversized_handshake(&peer, len);
                conn.close(VarInt::from_u32(413), b"first frame too large");
                return Ok(());
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %peer.short(), error = %e, "dropped a peer that sent a bad first frame");
                conn.close(VarInt::from_u32(400), b"bad frame");
                return Ok(());
            }
            Err(_) => {
                tracing::warn!(peer = %peer.short(), "dropped a peer that sent nothing");
                conn.close(VarInt::from_u32(408), b"timeout");
                return Ok(());
            }
        };
        let (asked, addrs, instance, their_clock) = match first {
            Frame::Join { bucket, secret, addrs } => {
                // A wrong or used-up secret is answered from the gate's own reads.
                if let Err(why) = self.gate.may_join(bucket, secret, peer, wall_ms()).await {
                    tracing::warn!(peer = %peer.short(), reason = %why, "refused a join");
                    refuse(&conn, &mut send, &why.to_string()).await;
                    return Ok(());
                }
                match mesh(&handle, MeshOp::Admit { bucket, secret, joiner: peer, addrs: addrs.clone() }).await {
                    Ok(MeshReply::Admitted(Ok((name, root)))) => {
                        tracing::info!(peer = %peer.short(), bucket = %name, "a new member joined with a ticket");
                        // Its member entry is new in the bucket's document: the other members
                        // hear of it now (they admit its sessions once they do), not at the
                        // next round of summaries.
                        if let Some(m) = self.names.find::<MeshMsg>(Child::Mesh) {
                            let _ = m.cast(MeshMsg::Changed(vec![(bucket, crate::proto::sync::META_DOC)]));
                        }
                        if write_frame(&mut send, &Frame::Joined { bucket, name, root: root.encode() }).await.is_err() {
                            return Ok(());
                        }
                        // It continues as a member: its Hello follows.
                        match tokio::time::timeout(NET_TIMEOUT, read_frame_max(&mut recv, HANDSHAKE_FRAME_BYTES_MAX)).await {
                            Ok(Ok(Frame::Hello { buckets, addrs, instance, clock_ms })) => (buckets, addrs, instance, clock_ms),
                            _ => return Ok(()),
                        }
                    }
                    Ok(MeshReply::Admitted(Err(why))) => {
                        tracing::warn!(peer = %peer.short(), reason = %why, "refused a join");
                        refuse(&conn, &mut send, &why.to_string()).await;
                        return Ok(());
                    }
                    other => {
                        let why = match other {
                            Err(e) => e,
                            _ => "unexpected answer".into(),
                        };
                        refuse(&conn, &mut send, &format!("the node could not admit you: {why}")).await;
                        return Ok(());
                    }
                }
            }
            Frame::Hello { buckets, addrs, instance, clock_ms } => (buckets, addrs, instance, clock_ms),
            _ => {
                tracing::warn!(peer = %peer.short(), "dropped a peer that did not start with Hello or Join");
                conn.close(VarInt::from_u32(400), b"expected hello");
                return Ok(());
            }
        };
        let accepted = self.gate.member_buckets(peer, asked).await;
        if accepted.is_empty() {
            tracing::warn!(peer = %peer.short(), "refused a session: not a member of any bucket it asked for");
            refuse(&conn, &mut send, "this node shares no bucket with you (not a member, or removed)").await;
            return Ok(());
        }
        if write_frame(&mut send, &Frame::Welcome { buckets: accepted.clone(), instance: self.instance, clock_ms: wall_ms() }).await.is_err() {
            return Ok(());
        }
        drop(slot);
        match self.names.find::<MeshMsg>(Child::Mesh) {
            Some(m) => {
                let clock_offset_ms = clock_offset(their_clock, wall_ms());
                let _ = m.cast(MeshMsg::Opened(Box::new(Opened { peer, dialer: peer, conn, send, recv, buckets: accepted, addrs, instance, clock_offset_ms })));
            }
            None => conn.close(VarInt::from_u32(503), b"restarting"),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Gossip, gated: the topic id alone admits no one.

/// iroh-gossip's handler behind a check: connections from nodes that share no bucket with
/// this one are closed before gossip sees them.
#[derive(Debug, Clone)]
pub struct GatedGossip {
    /// The gossip instance.
    pub gossip: iroh_gossip::net::Gossip,
    /// The door (see [`Gate`]): it answers who is a member.
    pub gate: Arc<Gate>,
}

impl ProtocolHandler for GatedGossip {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let peer = node_of(conn.remote_id());
        let member = !self.gate.member_buckets(peer, Vec::new()).await.is_empty();
        if !member {
            tracing::warn!(peer = %peer.short(), "refused a gossip connection from a node that shares no bucket");
            conn.close(VarInt::from_u32(403), b"not a member");
            return Ok(());
        }
        self.gossip.handle_connection(conn).await.map_err(AcceptError::from_err)
    }

    async fn shutdown(&self) {
        let _ = self.gossip.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------
// The blob gate: iroh-blobs serves members only, and only what their buckets name.

/// Builds the iroh-blobs protocol handler with its gate; the gate runs until the node stops.
/// A permitted request for a blob the iroh-blobs store does not hold yet (the blob actor
/// indexes in quiet moments) has it indexed on the spot, so a peer never waits for that.
pub fn gated_blobs(index: &Arc<crate::index::BlobIndex>, content: &crate::content::ContentStore, gate: &Arc<Gate>) -> iroh_blobs::BlobsProtocol {
    use iroh_blobs::provider::events::{ConnectMode, EventMask, EventSender, ObserveMode, RequestMode, ThrottleMode};
    let mask = EventMask {
        connected: ConnectMode::Intercept,
        get: RequestMode::Intercept,
        get_many: RequestMode::Intercept,
        push: RequestMode::Disabled,
        observe: ObserveMode::Intercept,
        throttle: ThrottleMode::None,
    };
    let (events, rx) = EventSender::channel(64, mask);
    match gate.tree() {
        Some(tree) => drop(tokio::spawn(blob_gate(rx, tree, index.clone(), content.clone()))),
        None => tracing::error!("the blob gate cannot read the tree: serving no blobs"),
    }
    iroh_blobs::BlobsProtocol::new(index.store(), Some(events))
}

/// Blobs a request may index at once (iroh-blobs' store takes many small adds faster in
/// parallel: DESIGN.md measured 8.1k/s one at a time, 13.9k/s with 16 in flight).
const INDEX_NOW_IN_FLIGHT: usize = 16;

/// Indexes, now, those of `hashes` the iroh-blobs store lacks (those the blob actor has not
/// reached yet), several at a time.
async fn index_now(tree: &Arc<std::sync::Mutex<crate::store::TreeStore>>, index: &Arc<crate::index::BlobIndex>, content: &crate::content::ContentStore, hashes: &[[u8; 32]]) {
    // One read of the tree for the whole request: the blobs not yet indexed, with their bytes
    // when inline.
    let (tree2, wanted) = (tree.clone(), hashes.to_vec());
    let rows: Vec<crate::store::read::PendingBlob> = tokio::task::spawn_blocking(move || {
        let t = tree2.lock().expect("gate db");
        let mut out = Vec::new();
        let Ok(mut st) = t.conn().prepare_cached("SELECT size, data FROM blob WHERE hash = ?1 AND present = 1 AND indexed = 0") else { return out };
        for h in wanted {
            if let Ok((size, inline)) = st.query_row([h.to_vec()], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))) {
                out.push(crate::store::read::PendingBlob { hash: ContentHash(h), size: size as u64, inline });
            }
        }
        out
    })
    .await
    .unwrap_or_default();
    let mut running = tokio::task::JoinSet::new();
    for pending in rows {
        while running.len() >= INDEX_NOW_IN_FLIGHT {
            running.join_next().await;
        }
        let (index, content) = (index.clone(), content.clone());
        running.spawn(async move {
            if index.store().blobs().has(iroh_blobs::Hash::from_bytes(pending.hash.0)).await.unwrap_or(false) {
                return;
            }
            if let Err(e) = index.add(&content, &pending).await {
                tracing::warn!(hash = %pending.hash, error = %e, "could not index a blob a peer asked for");
            }
        });
    }
    while running.join_next().await.is_some() {}
}

/// Blob requests the gate decides at once (each may index blobs first): requests of
/// different peers go on side by side, one peer's slow request holds up no one else's, and a
/// peer that floods requests waits for a slot.
const GATE_IN_FLIGHT: usize = 8;

async fn blob_gate(
    mut rx: tokio::sync::mpsc::Receiver<iroh_blobs::provider::events::ProviderMessage>,
    tree: Arc<std::sync::Mutex<crate::store::TreeStore>>,
    index: Arc<crate::index::BlobIndex>,
    content: crate::content::ContentStore,
) {
    use iroh_blobs::provider::events::{AbortReason, ProviderMessage};
    type Peers = Arc<std::sync::Mutex<HashMap<u64, NodeId>>>;
    let peers: Peers = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(GATE_IN_FLIGHT));
    let peer_of = |peers: &Peers, connection: u64| peers.lock().expect("gate peers").get(&connection).copied();
    let check = |tree: Arc<std::sync::Mutex<crate::store::TreeStore>>, peer: NodeId, hashes: Vec<[u8; 32]>| async move {
        tokio::task::spawn_blocking(move || {
            let t = tree.lock().expect("gate db");
            hashes.iter().all(|h| crate::engine::mesh::may_fetch(t.conn(), &peer, &ContentHash(*h)).unwrap_or(false))
        })
        .await
        .unwrap_or(false)
    };
    while let Some(msg) = rx.recv().await {
        // A connection's coming and going is decided here, in order (a short read); requests
        // go to tasks of their own.
        let msg = match msg {
            ProviderMessage::ClientConnected(msg) => {
                let peer = msg.endpoint_id.map(node_of);
                let tree2 = tree.clone();
                let member = match peer {
                    Some(p) => tokio::task::spawn_blocking(move || {
                        let t = tree2.lock().expect("gate db");
                        crate::engine::mesh::buckets_of(t.conn(), &p).map(|b| !b.is_empty()).unwrap_or(false)
                    })
                    .await
                    .unwrap_or(false),
                    None => false,
                };
                if member {
                    peers.lock().expect("gate peers").insert(msg.connection_id, peer.expect("checked"));
                    msg.tx.send(Ok(())).await.ok();
                } else {
                    tracing::warn!(peer = ?peer.map(|p| p.short()), "refused a blob connection from a non-member");
                    msg.tx.send(Err(AbortReason::Permission)).await.ok();
                }
                continue;
            }
            ProviderMessage::ConnectionClosed(msg) => {
                peers.lock().expect("gate peers").remove(&msg.connection_id);
                continue;
            }
            other => other,
        };
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (tree, index, content, peers) = (tree.clone(), index.clone(), content.clone(), peers.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match msg {
                ProviderMessage::GetRequestReceived(msg) => {
                    let hashes = vec![*msg.request.hash.as_bytes()];
                    let ok = match peer_of(&peers, msg.connection_id) {
                        Some(p) if msg.request.ranges.is_blob() => check(tree.clone(), p, hashes.clone()).await,
                        _ => false,
                    };
                    if ok {
                        index_now(&tree, &index, &content, &hashes).await;
                    }
                    msg.tx.send(if ok { Ok(()) } else { Err(AbortReason::Permission) }).await.ok();
                }
                ProviderMessage::GetManyRequestReceived(msg) => {
                    let hashes: Vec<[u8; 32]> = msg.request.hashes.iter().map(|h| *h.as_bytes()).collect();
                    let ok = match peer_of(&peers, msg.connection_id) {
                        Some(p) => check(tree.clone(), p, hashes.clone()).await,
                        None => false,
                    };
                    if ok {
                        index_now(&tree, &index, &content, &hashes).await;
                    } else {
                        tracing::warn!("refused a blob request for hashes outside the peer's buckets");
                    }
                    msg.tx.send(if ok { Ok(()) } else { Err(AbortReason::Permission) }).await.ok();
                }
                ProviderMessage::ObserveRequestReceived(msg) => {
                    let ok = match peer_of(&peers, msg.connection_id) {
                        Some(p) => check(tree.clone(), p, vec![*msg.request.hash.as_bytes()]).await,
                        None => false,
                    };
                    msg.tx.send(if ok { Ok(()) } else { Err(AbortReason::Permission) }).await.ok();
                }
                _ => {}
            }
        });
    }
}

// ---------------------------------------------------------------------------------------
// The mesh actor.

/// A session handed over once its handshake is done.
pub struct Opened {
    /// The peer.
    pub peer: NodeId,
    /// Who dialed (decides which of two simultaneous sessions stays).
    pub dialer: NodeId,
    /// The connection.
    pub conn: Connection,
    /// Its stream's send side.
    pub send: SendStream,
    /// Its stream's receive side.
    pub recv: RecvStream,
    /// The buckets the session carries.
    pub buckets: Vec<Uid>,
    /// Where the peer says it listens.
    pub addrs: Vec<SocketAddr>,
    /// The peer's run (see `Frame::Hello`).
    pub instance: u64,
    /// How far the peer's wall clock is ahead of this node's (negative: behind), as the
    /// handshake measured it.
    pub clock_offset_ms: i64,
}

/// How far apart two clocks are said to be at most (a peer's wild `clock_ms` is clamped to it).
const CLOCK_OFFSET_SHOWN_MAX_MS: i64 = 100 * 365 * 86_400_000;

/// `theirs - ours`, clamped to ±[`CLOCK_OFFSET_SHOWN_MAX_MS`].
fn clock_offset(theirs: i64, ours: i64) -> i64 {
    theirs.saturating_sub(ours).clamp(-CLOCK_OFFSET_SHOWN_MAX_MS, CLOCK_OFFSET_SHOWN_MAX_MS)
}

/// This machine's wall clock, for the handshake's clock comparison.
fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// What a join reports to the user.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Joined {
    /// The bucket's local name.
    pub bucket: String,
    /// The inviter.
    pub inviter: String,
}

/// A peer as `alkfs status` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    /// Its node id.
    pub id: String,
    /// Where it listens (as announced).
    pub addrs: Vec<String>,
    /// A session is open.
    pub connected: bool,
    /// `direct`, `relayed`, or `-` when not connected.
    pub path: String,
    /// Round-trip time in ms, when connected.
    pub rtt_ms: Option<u64>,
    /// When a sync message last arrived from it (ms since the epoch).
    pub last_sync_ms: Option<i64>,
    /// Documents that differed at the last summary exchange and are not yet in step.
    pub lag_docs: usize,
    /// Failed dials since the last session.
    pub failures: u32,
    /// How far its wall clock is ahead of this node's (ms; negative: behind), as measured
    /// at the last handshake.
    #[serde(default)]
    pub clock_offset_ms: Option<i64>,
}

/// The mesh's part of `alkfs status`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct MeshStatus {
    /// Where this node listens.
    pub listen: Vec<String>,
    /// Known peers.
    pub peers: Vec<PeerStatus>,
    /// Blobs waiting to be fetched.
    pub pending_fetches: usize,
    /// Blobs whose last fetch failed (retried).
    pub failed_fetches: usize,
    /// Blobs no connected peer could serve (freed by their GC, or never there): asked for
    /// again after a pause, or when a peer says it has them.
    #[serde(default)]
    pub unavailable_blobs: usize,
    /// Blobs fetched since start.
    pub fetched: u64,
    /// Buckets whose gossip topic this node joined.
    #[serde(default)]
    pub gossip_topics: usize,
    /// Gossip neighbours, summed over the topics.
    #[serde(default)]
    pub gossip_neighbors: i64,
    /// Peers' versions stamped beyond the clock bound, waiting here, by writer.
    #[serde(default)]
    pub clock_waits: Vec<ClockWait>,
    /// The clock bound, in ms (`node.clock_offset_max_secs`).
    #[serde(default)]
    pub clock_bound_ms: i64,
    /// Bounds on what peers may cost this node (`proto::limits`) that refused something.
    #[serde(default)]
    pub bounds_hit: Vec<BoundHit>,
    /// Sync frames sent and received since start, and those that brought something.
    #[serde(default)]
    pub frames: FrameCounts,
    /// Each shared bucket's epoch and the saved size of its shards (`engine::compaction`).
    #[serde(default)]
    pub epochs: Vec<crate::engine::compaction::BucketEpoch>,
}

/// Messages of the mesh actor (fields named for what they carry).
#[allow(missing_docs)]
pub enum MeshMsg {
    /// A session's handshake is done (incoming or dialed).
    Opened(Box<Opened>),
    /// A dial failed.
    DialFailed(NodeId, String),
    /// Something committed: publish.
    Wake,
    /// Once a second: dial, re-check sessions.
    Tick,
    /// Documents changed here: tell the sessions.
    Changed(Vec<(Uid, u16)>),
    /// Membership changed: sessions re-check.
    MembersChanged,
    /// Blobs to fetch from a peer that has them.
    Missing(NodeId, Vec<(ContentHash, u64)>),
    /// A fetch batch ended (its id): how each of its requests went.
    Fetched(u64, Vec<Attempt>),
    /// Make a ticket.
    Invite { bucket: String, expires_ms: i64, uses: u32, role: crate::proto::membership::Role, reply: RpcReplyPort<Result<String, String>> },
    /// Join with a ticket.
    Join { ticket: String, name: Option<String>, reply: RpcReplyPort<Result<Joined, String>> },
    /// A join's handshake with the inviter is done (run outside the actor's loop: an inviter
    /// that stalls stalls only its join): the session starts, the joiner is answered.
    JoinOpened(Box<Opened>, Joined, RpcReplyPort<Result<Joined, String>>),
    /// Remove a member.
    Remove { bucket: String, node: NodeId, reply: RpcReplyPort<Result<(), String>> },
    /// Give a member a role.
    Grant { bucket: String, node: NodeId, role: crate::proto::membership::Role, reply: RpcReplyPort<Result<(), String>> },
    /// Say who may invite: writers too, or owners only.
    InvitePolicy { bucket: String, members_invite: bool, reply: RpcReplyPort<Result<(), String>> },
    /// A sync message arrived from a peer (for status).
    Synced(NodeId, usize),
    /// Status.
    Status(RpcReplyPort<MeshStatus>),
    /// An announcement arrived on a bucket's topic.
    Announced(Uid, Vec<u8>),
    /// Fetch one blob now (a user is waiting for it): answered once it is here.
    FetchNow { hash: ContentHash, size: u64, reply: RpcReplyPort<Result<(), String>> },
    /// Bytes `offset..offset + len` of blob `hash` (of `size` bytes), whose bytes are still on
    /// peers: the chunks that cover them are fetched (verified) into the iroh-blobs store
    /// unless already there, then read from it. A mount reading a file that is not here yet
    /// waits only for what it reads.
    ReadRange { hash: ContentHash, size: u64, offset: u64, len: u64, reply: RpcReplyPort<Result<Vec<u8>, String>> },
    /// A session took a new epoch of a bucket's shards: every session sends its summary.
    EpochTaken(Uid),
    /// Fault injection (tests only): panic in the handler.
    Panic,
}

/// The mesh actor.
pub struct MeshActor;

struct SessionSlot {
    actor: ActorRef<SessionMsg>,
    dialer: NodeId,
    conn: Connection,
    opened_at: Instant,
    /// The peer's run (see `Frame::Hello`).
    instance: u64,
}

/// Two sessions with one peer opened within this long of each other were dialed at once:
/// both sides keep the one the smaller id dialed. A session opened later than that replaces
/// the old one (the peer restarted or lost its connection; the old one may be dead and
/// only time out after QUIC's idle timeout).
pub const SIMULTANEOUS_DIAL: Duration = Duration::from_secs(5);

#[derive(Default)]
struct PeerInfo {
    failures: u32,
    next_dial: Option<Instant>,
    dialing: bool,
    last_sync_ms: Option<i64>,
    lag_docs: usize,
    addrs: Vec<SocketAddr>,
    /// How far its wall clock is ahead of this node's, at the last handshake.
    clock_offset_ms: Option<i64>,
    /// When its last session ended.
    last_session: Option<Instant>,
}

/// A fetch batch in flight: its peer, its task, what it asks for.
type FetchTask = (NodeId, tokio::task::AbortHandle, Vec<(ContentHash, u64)>);

/// Its state.
pub struct MeshState {
    ctx: NodeContext,
    handle: NodeHandle,
    net: Option<Net>,
    me: NodeId,
    sessions: HashMap<NodeId, SessionSlot>,
    peers: HashMap<NodeId, PeerInfo>,
    /// Blobs to fetch, from whom, in which batches (a blob being fetched is never asked for
    /// twice at once: a `get` of a blob that is arriving waits for that fetch).
    fetches: Fetches,
    /// Fetch batches in flight, by id: their peer, the task and what it asks for (a batch
    /// whose peer restarted or went away is abandoned, not left to its timeout).
    fetch_tasks: HashMap<u64, FetchTask>,
    next_fetch: u64,
    /// Users waiting for blobs.
    waiters: HashMap<ContentHash, Vec<RpcReplyPort<Result<(), String>>>>,
    /// When the store was last scanned for missing blobs.
    last_missing_scan: Option<Instant>,
    /// Each shared bucket's gossip topic: how to announce on it, and who was asked to join.
    topics: HashMap<Uid, (iroh_gossip::api::GossipSender, HashSet<NodeId>)>,
    /// Gossip neighbours across all topics (for status).
    neighbors: Arc<std::sync::atomic::AtomicI64>,
    /// Makes announcements distinct.
    nonce: u64,
    /// Peers' versions waiting for the clock bound, by writer (for status).
    clock_waits: Vec<ClockWait>,
    /// Signs this node's gossip announcements.
    signer: crate::proto::signed::EntrySigner,
    /// Each shared bucket's members now (not removed): whose announcements count.
    members: HashMap<Uid, HashSet<NodeId>>,
    /// Sync frames of every session since start (for status).
    frames: Arc<FrameCounters>,
    /// When this actor started (a member not seen since counts as seen then).
    started: Instant,
    /// When the shared buckets were last checked for compaction.
    last_compact_check: Option<Instant>,
}

/// Sync frames counted across sessions ([`crate::proto::fanout::FrameCounts`]).
#[derive(Default)]
pub struct FrameCounters {
    sent: std::sync::atomic::AtomicU64,
    received: std::sync::atomic::AtomicU64,
    useful: std::sync::atomic::AtomicU64,
}

impl FrameCounters {
    fn add(n: &std::sync::atomic::AtomicU64) {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn counts(&self) -> FrameCounts {
        let get = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        FrameCounts { sent: get(&self.sent), received: get(&self.received), useful: get(&self.useful) }
    }
}

impl Actor for MeshActor {
    type Msg = MeshMsg;
    type State = MeshState;
    type Arguments = NodeContext;

    async fn pre_start(&self, me: ActorRef<MeshMsg>, ctx: NodeContext) -> Result<MeshState, ActorProcessingErr> {
        ctx.faults.check_start(Child::Mesh)?;
        let handle = NodeHandle::new(ctx.names.clone());
        let net = ctx.net.clone();
        let key = crate::identity::load_or_create(&ctx.dir)?;
        let my_id = crate::identity::node_id(&key);
        let signer = crate::proto::signed::EntrySigner::new(&key.to_bytes());
        if let Some(net) = &net {
            if let Ok(MeshReply::Changed(changed)) = mesh(&handle, MeshOp::AnnounceAddrs(net.addrs())).await {
                let _ = me.cast(MeshMsg::Changed(changed));
            }
            me.send_interval(Duration::from_secs(1), || MeshMsg::Tick);
            let _ = me.cast(MeshMsg::Wake);
            // Dial the members now, not a second from now (a restarted node's first writes
            // wait for its sessions).
            let _ = me.cast(MeshMsg::Tick);
        }
        Ok(MeshState {
            ctx,
            handle,
            net,
            me: my_id,
            sessions: HashMap::new(),
            peers: HashMap::new(),
            fetches: Fetches::default(),
            fetch_tasks: HashMap::new(),
            next_fetch: 0,
            waiters: HashMap::new(),
            last_missing_scan: None,
            topics: HashMap::new(),
            neighbors: Default::default(),
            nonce: std::collections::hash_map::RandomState::new().build_hasher().finish(),
            clock_waits: Vec::new(),
            signer,
            members: HashMap::new(),
            frames: Arc::default(),
            started: Instant::now(),
            last_compact_check: None,
        })
    }

    async fn handle(&self, me: ActorRef<MeshMsg>, msg: MeshMsg, state: &mut MeshState) -> Result<(), ActorProcessingErr> {
        match msg {
            MeshMsg::Wake => {
                if state.net.is_some() {
                    if let Ok(MeshReply::Changed(changed)) = mesh(&state.handle, MeshOp::Publish).await {
                        if !changed.is_empty() {
                            broadcast(state, &changed);
                            announce(state, &changed).await;
                            // A full batch may leave more to publish.
                            let _ = me.cast(MeshMsg::Wake);
                        }
                    }
                }
            }
            MeshMsg::Changed(changed) => broadcast(state, &changed),
            MeshMsg::Announced(bucket, bytes) => {
                // Signed by the node it names, for this bucket, and that node a member now: a
                // stranger's, a removed member's or another bucket's announcement is dropped
                // (and makes this node track nothing).
                // Counted and logged like a bound (once, then once a minute): iroh-gossip
                // admits per node, so a member of another bucket here can reach this topic.
                let refused = |name: &'static str, what: String| {
                    if let Some(net) = &state.net {
                        net.gate.hits.hit(name, 0, &what);
                    }
                };
                let a = match crate::proto::sync::Announcement::open(&bucket, &bytes) {
                    Ok(a) => a,
                    Err(e) => {
                        refused("GOSSIP_UNSEALED", format!("dropped a gossip announcement not sealed for its bucket by the node it names: {e}"));
                        return Ok(());
                    }
                };
                if a.node == state.me {
                    return Ok(());
                }
                if !state.members.get(&bucket).is_some_and(|m| m.contains(&a.node)) {
                    refused("GOSSIP_NOT_A_MEMBER", format!("dropped a gossip announcement from {}, not a member of the bucket", a.node.short()));
                    return Ok(());
                }
                // With a session, the announcer pushes its changes itself (`proto::fanout`).
                // Without one: dial it at the next tick, and meanwhile ask one peer that
                // shares the bucket, which may have the change already.
                if !state.sessions.contains_key(&a.node) {
                    if let Some(p) = state.peers.get_mut(&a.node) {
                        p.next_dial = None;
                    }
                    let members = state.members.get(&bucket);
                    let mut asked: Vec<&SessionSlot> = state.sessions.iter().filter(|(p, _)| members.is_some_and(|m| m.contains(p))).map(|(_, s)| s).collect();
                    if !asked.is_empty() {
                        state.nonce = state.nonce.wrapping_add(1);
                        let s = asked.swap_remove((state.nonce % asked.len() as u64) as usize);
                        let _ = s.actor.cast(SessionMsg::Ask(bucket));
                    }
                }
            }
            MeshMsg::Tick => tick(&me, state).await,
            MeshMsg::EpochTaken(bucket) => {
                for s in state.sessions.values() {
                    let _ = s.actor.cast(SessionMsg::Ask(bucket));
                }
            }
            MeshMsg::MembersChanged => {
                for s in state.sessions.values() {
                    let _ = s.actor.cast(SessionMsg::Recheck);
                }
                // Whose announcements count, now, not at the next tick.
                if let Some(net) = state.net.clone() {
                    join_topics(&me, state, &net).await;
                }
            }
            MeshMsg::Opened(opened) => open_session(&me, state, *opened).await,
            MeshMsg::DialFailed(peer, why) => {
                let p = state.peers.entry(peer).or_default();
                p.dialing = false;
                p.failures = p.failures.saturating_add(1);
                let wait = Duration::from_millis(redial_after_ms(p.failures)).min(REDIAL_MAX);
                p.next_dial = Some(Instant::now() + wait);
                tracing::debug!(peer = %peer.short(), error = %why, retry_in = ?wait, "dial failed");
            }
            MeshMsg::Missing(peer, blobs) => {
                for (hash, size) in blobs {
                    state.fetches.add(hash, size, &[peer], false);
                }
                pump_fetches(&me, state);
            }
            MeshMsg::Fetched(id, attempts) => {
                if state.fetch_tasks.remove(&id).is_none() {
                    return Ok(()); // abandoned (its peer restarted or left) and settled then
                }
                let settled = state.fetches.finished(&attempts, Instant::now());
                for h in &settled.landed {
                    for w in state.waiters.remove(h).unwrap_or_default() {
                        let _ = w.send(Ok(()));
                    }
                }
                for h in &settled.unavailable {
                    tracing::warn!(hash = %h, "no connected peer can serve a blob (freed by their GC, or never there); asked for again later");
                    for w in state.waiters.remove(h).unwrap_or_default() {
                        let _ = w.send(Err("no connected peer can serve its bytes (they may have been freed by the peers' GC); see `alkfs status`".into()));
                    }
                }
                pump_fetches(&me, state);
            }
            MeshMsg::Invite { bucket, expires_ms, uses, role, reply } => {
                let Some(net) = &state.net else {
                    let _ = reply.send(Err("this node runs without a network endpoint".into()));
                    return Ok(());
                };
                let addrs = net.addrs();
                let answer = match mesh(&state.handle, MeshOp::Invite { bucket, expires_ms, uses, role, addrs: addrs.clone() }).await {
                    Ok(MeshReply::Invited(uid, secret)) => {
                        // The home relay, when the node uses one, lets a joiner behind NAT reach it.
                        let relay = net.endpoint.addr().relay_urls().next().map(|u| u.to_string());
                        Ok(Ticket { node: state.me, addrs, relay, bucket: uid, secret }.encode())
                    }
                    Ok(_) => Err("unexpected answer from the store".to_string()),
                    Err(e) => Err(e),
                };
                let _ = reply.send(answer);
            }
            MeshMsg::Join { ticket, name, reply } => {
                let (me2, handle, net, my_id) = (me.clone(), state.handle.clone(), state.net.clone(), state.me);
                tokio::spawn(async move {
                    match join(&handle, net, my_id, &ticket, name).await {
                        Ok((opened, joined)) => {
                            let _ = me2.cast(MeshMsg::JoinOpened(Box::new(opened), joined, reply));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                });
            }
            MeshMsg::JoinOpened(opened, joined, reply) => {
                open_session(&me, state, *opened).await;
                let _ = reply.send(Ok(joined));
            }
            MeshMsg::Remove { bucket, node, reply } => {
                let result = member_changed(state, MeshOp::Remove { bucket, node }).await;
                let _ = reply.send(result);
            }
            MeshMsg::Grant { bucket, node, role, reply } => {
                let result = member_changed(state, MeshOp::Grant { bucket, node, role }).await;
                let _ = reply.send(result);
            }
            MeshMsg::InvitePolicy { bucket, members_invite, reply } => {
                let result = member_changed(state, MeshOp::InvitePolicy { bucket, members_invite }).await;
                let _ = reply.send(result);
            }
            MeshMsg::Synced(peer, lag) => {
                let p = state.peers.entry(peer).or_default();
                p.last_sync_ms = Some(crate::engine::now_ms());
                p.lag_docs = lag;
            }
            MeshMsg::Status(reply) => {
                let mut st = status(state);
                if let Ok(MeshReply::Epochs(epochs)) = mesh(&state.handle, MeshOp::Epochs).await {
                    st.epochs = epochs;
                }
                let _ = reply.send(st);
            }
            MeshMsg::FetchNow { hash, size, reply } => {
                let connected: Vec<NodeId> = state.sessions.keys().copied().collect();
                if connected.is_empty() && state.fetches.candidates(&hash).is_empty() {
                    let _ = reply.send(Err("its bytes are on a peer and no peer is connected: check `alkfs status` (peers)".into()));
                    return Ok(());
                }
                state.waiters.entry(hash).or_default().push(reply);
                state.fetches.add(hash, size, &connected, true);
                pump_fetches(&me, state);
            }
            MeshMsg::ReadRange { hash, size, offset, len, reply } => {
                // Peers known to hold it first, then every connected one.
                let mut peers: Vec<NodeId> = state.fetches.candidates(&hash);
                let others: Vec<NodeId> = state.sessions.keys().copied().filter(|p| !peers.contains(p)).collect();
                peers.extend(others);
                let Some(net) = state.net.clone() else {
                    let _ = reply.send(Err("the mesh is not running: its bytes are on a peer".into()));
                    return Ok(());
                };
                if peers.is_empty() {
                    let _ = reply.send(Err("its bytes are on a peer and no peer is connected: check `alkfs status` (peers)".into()));
                    return Ok(());
                }
                let (index, endpoint) = (state.ctx.index.clone(), net.endpoint.clone());
                tokio::spawn(async move {
                    let _ = reply.send(read_range(&endpoint, &index, &peers, hash, size, offset, len).await);
                });
            }
            MeshMsg::Panic => panic!("fault injection: mesh actor"),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(&self, me: ActorRef<MeshMsg>, evt: SupervisionEvent, state: &mut MeshState) -> Result<(), ActorProcessingErr> {
        let ended = match &evt {
            SupervisionEvent::ActorTerminated(cell, _, _) | SupervisionEvent::ActorFailed(cell, _) => Some(cell.get_id()),
            _ => None,
        };
        if let Some(id) = ended {
            if let SupervisionEvent::ActorFailed(_, e) = &evt {
                tracing::warn!(error = %e, "a sync session failed; the peer is dialed again");
            }
            let gone: Vec<NodeId> = state.sessions.iter().filter(|(_, s)| s.actor.get_id() == id).map(|(p, _)| *p).collect();
            for peer in gone {
                state.sessions.remove(&peer);
                let p = state.peers.entry(peer).or_default();
                p.next_dial = Some(Instant::now() + Duration::from_millis(200));
                p.last_session = Some(Instant::now());
                // Its session ended (the peer died, or the network broke): a fetch from it
                // would wait on a dead connection.
                abandon_fetches(&me, state, peer);
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<MeshMsg>, state: &mut MeshState) -> Result<(), ActorProcessingErr> {
        for (_, s) in state.sessions.drain() {
            s.actor.stop(Some("node stopping".into()));
            s.conn.close(VarInt::from_u32(0), b"node stopping");
        }
        Ok(())
    }
}

/// Runs a removal or a grant, then tells every session: the bucket's document changed, and
/// who may sync is to be checked again.
async fn member_changed(state: &MeshState, op: MeshOp) -> Result<(), String> {
    match mesh(&state.handle, op).await {
        Ok(MeshReply::MemberChanged(uid)) => {
            broadcast(state, &[(uid, crate::proto::sync::META_DOC)]);
            for s in state.sessions.values() {
                let _ = s.actor.cast(SessionMsg::Recheck);
            }
            Ok(())
        }
        Ok(_) => Err("unexpected answer from the store".into()),
        Err(e) => Err(e),
    }
}

fn broadcast(state: &MeshState, changed: &[(Uid, u16)]) {
    for s in state.sessions.values() {
        let _ = s.actor.cast(SessionMsg::Changed(changed.to_vec()));
    }
}

/// Compacts the shared buckets that are due and whose members are all at this node's heads
/// (`Mesh::compact_due`), and announces each new epoch to every session.
async fn compact_due(state: &mut MeshState, connected: &[NodeId]) {
    let waited: Vec<NodeId> = state
        .peers
        .iter()
        .filter(|(p, info)| !connected.contains(p) && info.last_session.unwrap_or(state.started).elapsed() < MEMBER_AWAY_MAX)
        .map(|(p, _)| *p)
        .collect();
    match mesh(&state.handle, MeshOp::CompactDue { connected: connected.to_vec(), waited }).await {
        Ok(MeshReply::Compacted(done)) => {
            for (bucket, base) in done {
                for s in state.sessions.values() {
                    let _ = s.actor.cast(SessionMsg::Epoch(bucket, Box::new(base.clone())));
                }
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "compacting the shared buckets failed; tried again at the next tick"),
    }
}

/// Announces changed documents on their buckets' gossip topics (reaching members this node
/// has no session with, e.g. across a node that relays gossip).
async fn announce(state: &mut MeshState, changed: &[(Uid, u16)]) {
    let mut by_bucket: HashMap<Uid, Vec<u16>> = HashMap::new();
    for (b, d) in changed {
        by_bucket.entry(*b).or_default().push(*d);
    }
    for (bucket, docs) in by_bucket {
        let Some((sender, _)) = state.topics.get(&bucket) else { continue };
        let Ok(MeshReply::Summary(_, digests)) = mesh(&state.handle, MeshOp::Summary(bucket)).await else { continue };
        state.nonce = state.nonce.wrapping_add(1);
        let a = crate::proto::sync::Announcement {
            nonce: state.nonce,
            node: state.me,
            docs: docs.iter().map(|d| (*d, digests.get(*d as usize).copied().unwrap_or(0))).collect(),
        };
        if let Err(e) = sender.broadcast(a.seal(&bucket, &state.signer).into()).await {
            tracing::debug!(error = %e, "gossip announcement not sent");
        }
    }
}

/// Joins the gossip topic of every shared bucket, with its members as bootstrap, and asks
/// newly known members to join.
async fn join_topics(me: &ActorRef<MeshMsg>, state: &mut MeshState, net: &Net) {
    let Ok(MeshReply::Shared(shared)) = mesh(&state.handle, MeshOp::Shared).await else { return };
    state.members = shared.iter().map(|(b, m)| (*b, m.iter().copied().collect())).collect();
    for (bucket, members) in shared {
        let ids: Vec<iroh::EndpointId> = members.iter().filter_map(endpoint_id).collect();
        match state.topics.get_mut(&bucket) {
            Some((sender, known)) => {
                let new: Vec<iroh::EndpointId> = members.iter().filter(|m| !known.contains(m)).filter_map(endpoint_id).collect();
                if !new.is_empty() {
                    let _ = sender.join_peers(new).await;
                    known.extend(members);
                }
            }
            None => {
                let topic = iroh_gossip::TopicId::from_bytes(crate::proto::sync::topic_of(&bucket));
                let Ok(sub) = net.gossip.subscribe(topic, ids).await else { continue };
                let (sender, mut receiver) = sub.split();
                let (me2, neighbors) = (me.clone(), state.neighbors.clone());
                tokio::spawn(async move {
                    use futures_lite::StreamExt;
                    use std::sync::atomic::Ordering::Relaxed;
                    let mut mine = 0;
                    while let Some(Ok(event)) = receiver.next().await {
                        match event {
                            iroh_gossip::api::Event::Received(m) => {
                                if me2.cast(MeshMsg::Announced(bucket, m.content.to_vec())).is_err() {
                                    break;
                                }
                            }
                            iroh_gossip::api::Event::NeighborUp(_) => {
                                mine += 1;
                                neighbors.fetch_add(1, Relaxed);
                            }
                            iroh_gossip::api::Event::NeighborDown(_) => {
                                mine -= 1;
                                neighbors.fetch_sub(1, Relaxed);
                            }
                            iroh_gossip::api::Event::Lagged => {}
                        }
                    }
                    neighbors.fetch_sub(mine, Relaxed);
                });
                state.topics.insert(bucket, (sender, members.into_iter().collect()));
            }
        }
    }
}

async fn tick(me: &ActorRef<MeshMsg>, state: &mut MeshState) {
    let Some(net) = state.net.clone() else { return };
    let scan_due = state.last_missing_scan.is_none_or(|t| t.elapsed() >= MISSING_SCAN);
    let connected: Vec<NodeId> = state.sessions.keys().copied().collect();
    if net.eager_fetch && scan_due && !connected.is_empty() && state.fetches.is_idle() {
        state.last_missing_scan = Some(Instant::now());
        if let Ok(MeshReply::Blobs(missing)) = mesh(&state.handle, MeshOp::Missing(MISSING_SCAN_MAX)).await {
            for (hash, size) in missing {
                // One the scheduler knows (an unavailable one waiting out its pause among
                // them) is left where it is.
                if !state.fetches.is_wanted(&hash) {
                    state.fetches.add(hash, size, &connected, false);
                }
            }
        }
    }
    state.fetches.tick(&connected, Instant::now());
    pump_fetches(me, state);
    for s in state.sessions.values() {
        let _ = s.actor.cast(SessionMsg::Recheck);
    }
    // Whether members are in step changes with their summaries, every ANTI_ENTROPY.
    if state.last_compact_check.is_none_or(|t| t.elapsed() >= ANTI_ENTROPY) {
        state.last_compact_check = Some(Instant::now());
        compact_due(state, &connected).await;
    }
    let Ok(MeshReply::Peers(peers)) = mesh(&state.handle, MeshOp::Peers).await else { return };
    // Where the bucket's documents say each member listens; a peer with a session said
    // where it listens when it opened it, which is fresher (it may have restarted since it
    // last wrote its addresses, and they may not have arrived yet).
    for (peer, addrs) in &peers {
        if !state.sessions.contains_key(peer) {
            net.learn(peer, addrs);
        }
    }
    net.gate.know_members(&peers);
    join_topics(me, state, &net).await;
    if let Ok(MeshReply::ClockWaits(missing, waits, hits)) = mesh(&state.handle, MeshOp::ReleaseDue).await {
        for h in hits {
            net.gate.hits.hit(h.name, h.limit, &h.what);
        }
        if !missing.is_empty() && net.eager_fetch {
            for (hash, size) in missing {
                if !state.fetches.is_wanted(&hash) {
                    state.fetches.add(hash, size, &connected, false);
                }
            }
            pump_fetches(me, state);
        }
        state.clock_waits = waits;
    }
    let now = Instant::now();
    for (peer, addrs) in peers {
        let p = state.peers.entry(peer).or_default();
        p.addrs = addrs;
        if state.sessions.contains_key(&peer) || p.dialing || p.next_dial.is_some_and(|t| t > now) {
            continue;
        }
        p.dialing = true;
        let (me2, handle, net2, my_id) = (me.clone(), state.handle.clone(), net.clone(), state.me);
        tokio::spawn(async move {
            match dial(&handle, &net2, &my_id, &peer).await {
                Ok(opened) => {
                    let _ = me2.cast(MeshMsg::Opened(Box::new(opened)));
                }
                Err(e) => {
                    let _ = me2.cast(MeshMsg::DialFailed(peer, e));
                }
            }
        });
    }
}

/// Dials `peer` and runs the handshake: `Hello` with the buckets this node shares with it.
async fn dial(handle: &NodeHandle, net: &Net, me: &NodeId, peer: &NodeId) -> Result<Opened, String> {
    let id = endpoint_id(peer).ok_or("not a valid node id")?;
    let asked = match mesh(handle, MeshOp::Accept { peer: *peer, asked: Vec::new() }).await? {
        MeshReply::Buckets(b) => b,
        _ => Vec::new(),
    };
    if asked.is_empty() {
        return Err("no bucket shared with this peer any more".into());
    }
    let conn = match tokio::time::timeout(NET_TIMEOUT, connect_sync(&net.endpoint, id)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("cannot reach {}: {e}", peer.short())),
        Err(_) => return Err(format!("cannot reach {}: no answer within {NET_TIMEOUT:?}", peer.short())),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let addrs = net.addrs();
    let answer = async {
        let sent_ms = wall_ms();
        write_frame(&mut send, &Frame::Hello { buckets: asked.clone(), addrs, instance: net.instance, clock_ms: sent_ms }).await?;
        match read_frame(&mut recv).await? {
            // Their clock read `clock_ms` about half a round trip ago.
            Frame::Welcome { buckets, instance, clock_ms } => Ok((buckets, instance, clock_offset(clock_ms, (sent_ms + wall_ms()) / 2))),
            Frame::Refused { reason } => Err(reason),
            _ => Err("the peer answered something else".to_string()),
        }
    };
    let (buckets, instance, clock_offset_ms) = match tokio::time::timeout(NET_TIMEOUT * 3, answer).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            conn.close(VarInt::from_u32(0), b"refused");
            return Err(e);
        }
        Err(_) => {
            conn.close(VarInt::from_u32(408), b"timeout");
            return Err("the peer did not answer the handshake in time".into());
        }
    };
    Ok(Opened { peer: *peer, dialer: *me, conn, send, recv, buckets, addrs: Vec::new(), instance, clock_offset_ms })
}

/// Joins with a ticket: dials the inviter, proves the secret and adopts the bucket. Runs in a
/// task of its own; the connection it opened becomes the first session when the mesh actor
/// starts it (`MeshMsg::JoinOpened`).
async fn join(handle: &NodeHandle, net: Option<Net>, my_id: NodeId, text: &str, name: Option<String>) -> Result<(Opened, Joined), String> {
    let net = net.ok_or("this node runs without a network endpoint")?;
    let ticket = Ticket::decode(text).map_err(|e| e.to_string())?;
    if ticket.node == my_id {
        return Err("this ticket was made by this node: give it to another node".into());
    }
    net.learn(&ticket.node, &ticket.addrs);
    if let (Some(url), Some(id)) = (ticket.relay.as_deref().and_then(|u| u.parse::<iroh::RelayUrl>().ok()), endpoint_id(&ticket.node)) {
        net.lookup.add_endpoint_info(EndpointAddr::new(id).with_relay_url(url));
    }
    // The handshake's Joined frame carries the bucket's name and root: read it here, then
    // adopt before the session starts applying what the inviter sends.
    let id = endpoint_id(&ticket.node).ok_or("the ticket names an invalid node id")?;
    let conn = match tokio::time::timeout(NET_TIMEOUT, connect_sync(&net.endpoint, id)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("cannot reach the inviter at {:?}: {e}", ticket.addrs)),
        Err(_) => return Err(format!("cannot reach the inviter at {:?}: no answer within {NET_TIMEOUT:?}", ticket.addrs)),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let addrs = net.addrs();
    write_frame(&mut send, &Frame::Join { bucket: ticket.bucket, secret: ticket.secret, addrs: addrs.clone() }).await?;
    let (remote_name, root) = match tokio::time::timeout(NET_TIMEOUT * 3, read_frame(&mut recv)).await {
        Ok(Ok(Frame::Joined { bucket, name, root })) if bucket == ticket.bucket => {
            (name, BranchRecord::decode(&root).map_err(|e| format!("the inviter sent a bad root branch: {e}"))?)
        }
        Ok(Ok(Frame::Refused { reason })) => return Err(reason),
        Ok(Ok(_)) => return Err("the inviter answered something else".into()),
        Ok(Err(e)) => return Err(format!("the inviter closed the connection: {e}")),
        Err(_) => return Err("the inviter did not answer within 30 s".into()),
    };
    let local = name.unwrap_or_else(|| remote_name.clone());
    let adoption = Adoption { name: local.clone(), bucket: ticket.bucket, root, inviter: ticket.node, inviter_addrs: ticket.addrs.clone(), my_addrs: addrs.clone() };
    match mesh(handle, MeshOp::Adopt(Box::new(adoption))).await {
        Ok(MeshReply::Adopted(_)) => {}
        Ok(_) => return Err("unexpected answer from the store".into()),
        Err(e) => {
            let _ = write_frame(&mut send, &Frame::Refused { reason: "the joiner could not take the bucket".into() }).await;
            conn.close(VarInt::from_u32(0), b"cannot adopt");
            return Err(e);
        }
    }
    let sent_ms = wall_ms();
    write_frame(&mut send, &Frame::Hello { buckets: vec![ticket.bucket], addrs, instance: net.instance, clock_ms: sent_ms }).await?;
    let (buckets, instance, clock_offset_ms) = match tokio::time::timeout(NET_TIMEOUT * 3, read_frame(&mut recv)).await {
        Ok(Ok(Frame::Welcome { buckets, instance, clock_ms })) => (buckets, instance, clock_offset(clock_ms, (sent_ms + wall_ms()) / 2)),
        Ok(Ok(Frame::Refused { reason })) => return Err(reason),
        _ => return Err("the inviter did not welcome the new member".into()),
    };
    let opened = Opened { peer: ticket.node, dialer: my_id, conn, send, recv, buckets, addrs: ticket.addrs.clone(), instance, clock_offset_ms };
    Ok((opened, Joined { bucket: local, inviter: ticket.node.to_hex() }))
}

async fn open_session(me: &ActorRef<MeshMsg>, state: &mut MeshState, opened: Opened) {
    let peer = opened.peer;
    let p = state.peers.entry(peer).or_default();
    p.dialing = false;
    if let Some(net) = &state.net {
        net.learn(&peer, &opened.addrs);
    }
    let restarted = state.sessions.get(&peer).is_some_and(|s| s.instance != opened.instance);
    if restarted {
        abandon_fetches(me, state, peer);
    }
    if let Some(existing) = state.sessions.get(&peer) {
        let keep_new = if restarted {
            // The peer started again: its old session is dead, whether it looks it or not.
            true
        } else if existing.opened_at.elapsed() < SIMULTANEOUS_DIAL {
            // Dialed at once: both sides keep the one the smaller id dialed.
            opened.dialer == state.me.min(peer) && existing.dialer != state.me.min(peer)
        } else {
            true
        };
        if !keep_new {
            opened.conn.close(VarInt::from_u32(0), b"duplicate session");
            return;
        }
        existing.actor.stop(Some("replaced".into()));
        existing.conn.close(VarInt::from_u32(0), b"duplicate session");
        state.sessions.remove(&peer);
    }
    let p = state.peers.entry(peer).or_default();
    p.failures = 0;
    p.next_dial = None;
    p.clock_offset_ms = Some(opened.clock_offset_ms);
    let bound = state.ctx.config.clock_bound;
    if opened.clock_offset_ms > bound.ms {
        tracing::warn!(peer = %peer.short(), ahead_s = opened.clock_offset_ms / 1000, bound_s = bound.ms / 1000, "the peer's clock is ahead of this node's beyond the clock bound: its new versions will wait here until their time (see alkfs status)");
    } else if -opened.clock_offset_ms > bound.ms {
        tracing::warn!(peer = %peer.short(), ahead_s = -opened.clock_offset_ms / 1000, bound_s = bound.ms / 1000, "this node's clock is ahead of the peer's beyond the clock bound: versions written here will wait there until their time. Check this machine's clock (timedatectl, NTP)");
    }
    let conn = opened.conn.clone();
    let (dialer, instance) = (opened.dialer, opened.instance);
    let eager_fetch = state.net.as_ref().is_none_or(|n| n.eager_fetch);
    let args = SessionArgs { opened, handle: state.handle.clone(), mesh: me.clone(), eager_fetch, frames: state.frames.clone() };
    match Actor::spawn_linked(None, SessionActor, args, me.get_cell()).await {
        Ok((actor, _)) => {
            tracing::info!(peer = %peer.short(), "session open");
            state.sessions.insert(peer, SessionSlot { actor, dialer, conn, opened_at: Instant::now(), instance });
            // What it could not serve before it may serve now (it restarted, or came back).
            state.fetches.peer_returned(peer);
            pump_fetches(me, state);
        }
        Err(e) => tracing::warn!(peer = %peer.short(), error = %e, "could not start a session"),
    }
}

fn pump_fetches(me: &ActorRef<MeshMsg>, state: &mut MeshState) {
    let Some(net) = state.net.clone() else { return };
    while let Some((peer, batch)) = state.fetches.next_batch() {
        let (me2, index, content, handle) = (me.clone(), state.ctx.index.clone(), state.ctx.content.clone(), state.handle.clone());
        let endpoint = net.endpoint.clone();
        state.next_fetch += 1;
        let id = state.next_fetch;
        let asked = batch.clone();
        let task = tokio::spawn(async move {
            let attempts = fetch_batch(&endpoint, &index, &content, &handle, peer, batch).await;
            let _ = me2.cast(MeshMsg::Fetched(id, attempts));
        });
        state.fetch_tasks.insert(id, (peer, task.abort_handle(), asked));
    }
}

/// Abandons the fetches in flight from `peer` (it restarted, or its session ended: their
/// connection is likely dead, and a fetch on it would wait out its timeout); what they
/// asked for is asked again at the next tick.
fn abandon_fetches(me: &ActorRef<MeshMsg>, state: &mut MeshState, peer: NodeId) {
    let ids: Vec<u64> = state.fetch_tasks.iter().filter(|(_, (p, _, _))| *p == peer).map(|(id, _)| *id).collect();
    for id in ids {
        let Some((_, task, asked)) = state.fetch_tasks.remove(&id) else { continue };
        task.abort();
        let attempt = Attempt { peer, asked, received: 0, landed: HashSet::new(), error: Some(FetchError::Unreachable("the peer restarted or left".into())) };
        state.fetches.finished(&[attempt], Instant::now());
    }
    pump_fetches(me, state);
}

/// Fetches `batch` from `peer` over one connection, verified, and lands each blob in the
/// content store. Blobs of the inline tier are decoded straight from the response (verified
/// against their hash as they stream) into memory and land in `tree.db`: no trip through the
/// iroh-blobs store, which would have written each one a second time (the blob actor indexes
/// them later, as it does local writes). Larger ones go into the iroh-blobs store, which
/// keeps their outboard, and are moved (not copied) from there into `content/`. Returns how
/// each request went, for the scheduler to decide what did not arrive.
async fn fetch_batch(endpoint: &Endpoint, index: &crate::index::BlobIndex, content: &crate::content::ContentStore, handle: &NodeHandle, peer: NodeId, batch: Vec<(ContentHash, u64)>) -> Vec<Attempt> {
    let (small, large): (Vec<_>, Vec<_>) = batch.iter().copied().partition(|(_, size)| *size as usize <= crate::content::INLINE_BYTES_MAX);
    let mut attempts = Vec::new();
    let mut landed: Vec<(ContentHash, Option<Vec<u8>>)> = Vec::new();
    let attempt = |asked: Vec<(ContentHash, u64)>, received: usize, error: Option<FetchError>| Attempt { peer, asked, received, landed: HashSet::new(), error };
    let conn = async {
        let id = endpoint_id(&peer).ok_or("bad peer id")?;
        tokio::time::timeout(NET_TIMEOUT, endpoint.connect(id, iroh_blobs::ALPN)).await.map_err(|_| "connect timeout".to_string())?.map_err(|e| e.to_string())
    }
    .await;
    match conn {
        Err(e) => {
            tracing::warn!(peer = %peer.short(), blobs = batch.len(), error = %e, "cannot reach a peer for blobs; tried again");
            for part in [small, large].into_iter().filter(|p| !p.is_empty()) {
                attempts.push(attempt(part, 0, Some(FetchError::Unreachable(e.clone()))));
            }
        }
        Ok(conn) => {
            if !small.is_empty() {
                let (got, error) = match tokio::time::timeout(FETCH_TIMEOUT, fetch_inline(conn.clone(), &small)).await {
                    Ok((got, error)) => (got, error.map(|e| stopped_or_gone(&conn, e))),
                    Err(_) => (Vec::new(), Some(FetchError::Unreachable("timed out".into()))),
                };
                if let Some(e) = &error {
                    tracing::warn!(peer = %peer.short(), blobs = small.len(), arrived = got.len(), error = ?e, "a blob request ended early; what did not arrive is asked for again");
                }
                let received = got.len();
                landed.extend(got.into_iter().map(|(h, bytes)| (h, Some(bytes))));
                attempts.push(attempt(small, received, error));
            }
            if !large.is_empty() {
                let (received, got, error) = fetch_into_store(&conn, index, content, peer, &large).await;
                landed.extend(got.into_iter().map(|h| (h, None)));
                attempts.push(attempt(large, received, error));
            }
            conn.close(VarInt::from_u32(0), b"done");
        }
    }
    // One transaction records the whole batch; what it could not record counts as not landed.
    let got: HashSet<ContentHash> = landed.iter().map(|(h, _)| *h).collect();
    match mesh(handle, MeshOp::BlobsArrived(peer, landed)).await {
        Ok(_) => {
            for a in &mut attempts {
                a.landed = a.asked.iter().map(|(h, _)| *h).filter(|h| got.contains(h)).collect();
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not record fetched blobs; fetched again"),
    }
    attempts
}

/// A request's failure: the peer stopped the response (it could not serve the blob it stopped
/// at), unless the connection itself is gone (the peer died or the network broke: nothing is
/// known of that blob).
fn stopped_or_gone(conn: &iroh::endpoint::Connection, error: String) -> FetchError {
    match conn.close_reason() {
        Some(reason) => FetchError::Unreachable(format!("{error} (connection closed: {reason})")),
        None => FetchError::Stopped(error),
    }
}

/// The ranges of a GetMany of `n` blobs: each whole, exactly `n` of them, so the response's
/// decoder knows where it ends (`ChunkRangesSeq::all()` asks for unboundedly many children,
/// and the decoder then reported every successful response as running past the request).
fn whole_blobs(n: usize) -> iroh_blobs::protocol::ChunkRangesSeq {
    use iroh_blobs::protocol::{ChunkRanges, ChunkRangesSeq};
    ChunkRangesSeq::from_ranges(std::iter::repeat_n(ChunkRanges::all(), n))
}

/// Reads inline-tier blobs `want` from one GetMany response, each verified against its hash
/// (iroh-blobs' response decoder checks every chunk against the BLAKE3 tree) and its size
/// checked before a byte is buffered. Returns what arrived before the first error, and it.
async fn fetch_inline(conn: iroh::endpoint::Connection, want: &[(ContentHash, u64)]) -> (Vec<(ContentHash, Vec<u8>)>, Option<String>) {
    use iroh_blobs::get::fsm::{self, EndBlobNext};
    use iroh_blobs::protocol::GetManyRequest;
    let mut got = Vec::with_capacity(want.len());
    let req = GetManyRequest::new(want.iter().map(|(h, _)| iroh_blobs::Hash::from_bytes(h.0)).collect(), whole_blobs(want.len()));
    let result: Result<(), String> = async {
        let mut child = match fsm::start_get_many(conn, req, Default::default()).await.map_err(|e| e.to_string())? {
            Ok(child) => child,
            Err(closing) => {
                closing.next().await.map_err(|e| e.to_string())?;
                return Ok(());
            }
        };
        loop {
            let &(hash, size) = want.get(child.offset() as usize).ok_or("the response runs past the request")?;
            let (body, announced) = child.next(iroh_blobs::Hash::from_bytes(hash.0)).next().await.map_err(|e| e.to_string())?;
            if announced != size {
                return Err(format!("blob {hash}: the peer announced {announced} bytes, the version names {size}"));
            }
            let (end, bytes) = body.concatenate_into_vec().await.map_err(|e| format!("blob {hash}: {e}"))?;
            got.push((hash, bytes));
            match end.next() {
                EndBlobNext::MoreChildren(next) => child = next,
                EndBlobNext::Closing(closing) => {
                    closing.next().await.map_err(|e| e.to_string())?;
                    return Ok(());
                }
            }
        }
    }
    .await;
    (got, result.err())
}

/// Blobs at least this large start going to disk while they arrive (see
/// [`write_back_while_arriving`]).
const WRITEBACK_FROM: u64 = 32 << 20;
/// How often the arriving bytes of a large blob are handed to the disk.
const WRITEBACK_EVERY: Duration = Duration::from_millis(200);

/// Starts the kernel writing an arriving blob's bytes to disk every [`WRITEBACK_EVERY`]
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: start, do not wait). Without it, a large blob's
/// pages stay dirty until the fsync that makes it durable before it is recorded present, and
/// that fsync then writes the whole blob after the transfer instead of during it. Best
/// effort: a file not there yet is skipped; the closing fsync is what durability rests on.
async fn write_back_while_arriving(paths: Vec<std::path::PathBuf>) {
    let mut tick = tokio::time::interval(WRITEBACK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let paths = paths.clone();
        let _ = tokio::task::spawn_blocking(move || {
            use std::os::fd::AsRawFd;
            for path in &paths {
                if let Ok(file) = std::fs::File::open(path) {
                    // SAFETY: a plain syscall on a descriptor this function owns for the call.
                    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
                }
            }
        })
        .await;
    }
}

/// Most bytes one [`MeshMsg::ReadRange`] answers (they go back in one control frame, as
/// base64).
pub const READ_RANGE_MAX: u64 = 4 << 20;

/// Bytes `offset..offset + len` (clipped to `size`) of blob `hash`: fetched from the first of
/// `peers` that serves them, unless the iroh-blobs store already holds them, then read from
/// the store. The store keeps the chunks it got (tagged like a whole fetch, so its GC leaves
/// them), and a later fetch of the whole blob asks only for the rest.
async fn read_range(endpoint: &Endpoint, index: &crate::index::BlobIndex, peers: &[NodeId], hash: ContentHash, size: u64, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    use iroh_blobs::protocol::{ChunkRanges, ChunkRangesExt, GetRequest};
    let end = offset.saturating_add(len.min(READ_RANGE_MAX)).min(size);
    if offset >= end {
        return Ok(Vec::new());
    }
    let store = index.store();
    let blob = iroh_blobs::Hash::from_bytes(hash.0);
    let _ = store.tags().set(crate::index::tag_name(&hash), blob).await;
    let request = GetRequest::blob_ranges(blob, ChunkRanges::bytes(offset..end));
    let mut last_error = String::from("no peer tried");
    for peer in peers {
        let local = store.remote().local_for_request(request.clone()).await.map_err(|e| e.to_string())?;
        if local.is_complete() {
            break;
        }
        let fetched = async {
            let id = endpoint_id(peer).ok_or("bad peer id")?;
            let conn = tokio::time::timeout(NET_TIMEOUT, endpoint.connect(id, iroh_blobs::ALPN)).await.map_err(|_| "connect timeout".to_string())?.map_err(|e| e.to_string())?;
            let got = tokio::time::timeout(FETCH_TIMEOUT, store.remote().execute_get(conn.clone(), local.missing())).await;
            conn.close(VarInt::from_u32(0), b"done");
            match got {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_string()),
            }
        }
        .await;
        match fetched {
            Ok(()) => {} // complete? the next turn checks (a peer may hold only part of it)
            Err(e) => {
                tracing::debug!(peer = %peer.short(), %hash, offset, error = %e, "a range fetch failed; trying the next peer");
                last_error = format!("from peer {}: {e}", peer.short());
            }
        }
    }
    if !store.remote().local_for_request(request).await.map_err(|e| e.to_string())?.is_complete() {
        return Err(format!("bytes {offset}..{end} did not arrive ({last_error})"));
    }
    let bytes = store.blobs().export_ranges(blob, offset..end).concatenate().await.map_err(|e| e.to_string())?;
    if bytes.len() as u64 != end - offset {
        return Err(format!("the store gave {} bytes for {offset}..{end}", bytes.len()));
    }
    Ok(bytes)
}

/// Fetches blobs above the inline tier into the iroh-blobs store in one GetMany request and
/// moves each complete one into `content/` (fsynced). Returns how many of `want`, from the
/// first, arrived whole; those that landed; and why the response ended early, if it did.
async fn fetch_into_store(
    conn: &iroh::endpoint::Connection,
    index: &crate::index::BlobIndex,
    content: &crate::content::ContentStore,
    peer: NodeId,
    want: &[(ContentHash, u64)],
) -> (usize, Vec<ContentHash>, Option<FetchError>) {
    use iroh_blobs::protocol::GetManyRequest;
    let store = index.store();
    // Tagged first, so iroh-blobs' own GC never takes one between its arrival and its landing.
    for (h, _) in want {
        let _ = store.tags().set(crate::index::tag_name(h), iroh_blobs::Hash::from_bytes(h.0)).await;
    }
    let req = GetManyRequest::new(want.iter().map(|(h, _)| iroh_blobs::Hash::from_bytes(h.0)).collect(), whole_blobs(want.len()));
    let started = std::time::Instant::now();
    let arriving: Vec<_> = want.iter().filter(|(_, size)| *size >= WRITEBACK_FROM).map(|(h, _)| index.owned_data_path(h)).collect();
    let writeback = (!arriving.is_empty()).then(|| tokio::spawn(write_back_while_arriving(arriving)));
    let error = match tokio::time::timeout(FETCH_TIMEOUT, store.remote().execute_get_many(conn.clone(), req)).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(stopped_or_gone(conn, e.to_string())),
        Err(_) => Some(FetchError::Unreachable("timed out".into())),
    };
    if let Some(task) = writeback {
        task.abort();
    }
    if let Some(e) = &error {
        tracing::warn!(peer = %peer.short(), blobs = want.len(), error = ?e, "a blob request ended early; what did not arrive is asked for again");
    }
    let transferred = started.elapsed();
    let mut landed = Vec::new();
    let mut received = 0;
    let mut in_order = true;
    for &(h, _) in want {
        let hash = iroh_blobs::Hash::from_bytes(h.0);
        in_order &= store.blobs().has(hash).await.unwrap_or(false);
        received += usize::from(in_order);
        let result: Result<(), String> = async {
            let target = std::path::absolute(content.blob_path(&h)).map_err(|e| e.to_string())?;
            if target.exists() {
                return Ok(());
            }
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            }
            if !store.blobs().has(hash).await.unwrap_or(false) {
                return Err("did not arrive".to_string());
            }
            let opts = iroh_blobs::api::blobs::ExportOptions { hash, mode: iroh_blobs::api::blobs::ExportMode::TryReference, target: target.clone() };
            store.export_with_opts(opts).await.map_err(|e| e.to_string())?;
            std::fs::File::open(&target).and_then(|f| f.sync_all()).map_err(|e| e.to_string())?;
            if let Some(dir) = target.parent() {
                std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => landed.push(h),
            Err(e) => tracing::debug!(hash = %h, error = %e, "a blob did not land; fetched again"),
        }
    }
    let bytes: u64 = want.iter().map(|(_, s)| s).sum();
    tracing::debug!(peer = %peer.short(), blobs = want.len(), bytes, transfer_ms = transferred.as_millis() as u64, land_ms = (started.elapsed() - transferred).as_millis() as u64, "fetched blobs into the content store");
    (received, landed, error)
}

fn status(state: &MeshState) -> MeshStatus {
    let listen = state.net.as_ref().map(|n| n.addrs().iter().map(|a| a.to_string()).collect()).unwrap_or_default();
    let mut peers: Vec<PeerStatus> = state
        .peers
        .iter()
        .map(|(id, p)| {
            let session = state.sessions.get(id);
            let (path, rtt_ms) = match session {
                Some(s) => {
                    let paths = s.conn.paths();
                    let sel = paths.iter().find(|p| p.is_selected());
                    match sel {
                        Some(p) => (if p.is_ip() { "direct" } else { "relayed" }.to_string(), Some(p.rtt().as_millis() as u64)),
                        None => ("-".to_string(), None),
                    }
                }
                None => ("-".to_string(), None),
            };
            PeerStatus {
                id: id.to_hex(),
                addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
                connected: session.is_some(),
                path,
                rtt_ms,
                last_sync_ms: p.last_sync_ms,
                lag_docs: p.lag_docs,
                failures: p.failures,
                clock_offset_ms: p.clock_offset_ms,
            }
        })
        .collect();
    peers.sort_by(|a, b| a.id.cmp(&b.id));
    let counts = state.fetches.counts();
    MeshStatus {
        listen,
        peers,
        pending_fetches: counts.pending,
        failed_fetches: counts.failed,
        unavailable_blobs: counts.unavailable,
        fetched: counts.fetched,
        gossip_topics: state.topics.len(),
        gossip_neighbors: state.neighbors.load(std::sync::atomic::Ordering::Relaxed),
        clock_waits: state.clock_waits.clone(),
        clock_bound_ms: state.ctx.config.clock_bound.ms,
        bounds_hit: state.net.as_ref().map(|n| n.gate.hits.report()).unwrap_or_default(),
        frames: state.frames.counts(),
        epochs: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------
// One session with one peer.

/// Messages of a session.
pub enum SessionMsg {
    /// A frame from the peer (other than a sync message).
    Frame(Frame),
    /// A sync message from the peer, read and checked by the session's reader.
    Sync {
        /// Its bucket.
        bucket: Uid,
        /// Its document.
        doc: u16,
        /// The epoch it is of.
        epoch: u32,
        /// The message, or why it was refused whole.
        checked: Result<CheckedMessage, String>,
    },
    /// The peer's stream ended.
    Closed(String),
    /// Documents changed here.
    Changed(Vec<(Uid, u16)>),
    /// Send the summary of this bucket now (a member this node cannot reach announced a
    /// change: the peer may have it).
    Ask(Uid),
    /// Re-check membership; every [`ANTI_ENTROPY`], send summaries again.
    Recheck,
    /// A bucket's shards began an epoch here: tell the peer.
    Epoch(Uid, Box<crate::proto::compaction::EpochBase>),
}

/// What a session starts with.
pub struct SessionArgs {
    opened: Opened,
    handle: NodeHandle,
    mesh: ActorRef<MeshMsg>,
    eager_fetch: bool,
    frames: Arc<FrameCounters>,
}

/// A session actor.
pub struct SessionActor;

/// Its state.
pub struct SessionState {
    peer: NodeId,
    conn: Connection,
    send: SendStream,
    buckets: HashSet<Uid>,
    handle: NodeHandle,
    mesh: ActorRef<MeshMsg>,
    reader: tokio::task::JoinHandle<()>,
    last_summary: Instant,
    /// Summaries went out at least once (both sides send the first).
    summaries_sent: bool,
    /// Documents that differed at the last summary and have not settled.
    lagging: HashSet<(Uid, u16)>,
    /// Fetch the bytes of what arrives at once.
    eager_fetch: bool,
    /// This node dialed the session: it sends the summaries every [`ANTI_ENTROPY`].
    dialed_here: bool,
    frames: Arc<FrameCounters>,
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(&self, me: ActorRef<SessionMsg>, args: SessionArgs) -> Result<SessionState, ActorProcessingErr> {
        let Opened { peer, dialer, conn, send, mut recv, buckets, .. } = args.opened;
        let me2 = me.clone();
        // The reader reads each sync message and checks its signatures (`check_message`, on a
        // blocking thread) before the session sees it: a refused message never reaches the
        // store's thread, and the next message is checked while the store applies this one.
        // Only messages of the session's buckets are checked (the session may drop buckets
        // later, never add one); others go to the session as they are, to be ignored.
        let session_buckets: HashSet<Uid> = buckets.iter().copied().collect();
        let reader = tokio::spawn(async move {
            loop {
                let msg = match read_frame(&mut recv).await {
                    Ok(Frame::Sync { bucket, doc, epoch, msg }) if session_buckets.contains(&bucket) => {
                        let checked = tokio::task::spawn_blocking(move || check_message(&bucket, doc, &msg))
                            .await
                            .unwrap_or_else(|_| Err("checking the message failed".into()));
                        SessionMsg::Sync { bucket, doc, epoch, checked }
                    }
                    Ok(f) => SessionMsg::Frame(f),
                    Err(e) => {
                        let _ = me2.cast(SessionMsg::Closed(e));
                        return;
                    }
                };
                if me2.cast(msg).is_err() {
                    return;
                }
            }
        });
        let mut state = SessionState {
            peer,
            conn,
            send,
            buckets: buckets.into_iter().collect(),
            handle: args.handle,
            mesh: args.mesh,
            reader,
            last_summary: Instant::now(),
            summaries_sent: false,
            lagging: HashSet::new(),
            eager_fetch: args.eager_fetch,
            dialed_here: dialer != peer,
            frames: args.frames,
        };
        // The first summaries go out from the handler, where a peer that already left ends
        // the session quietly instead of failing its start.
        state.last_summary = Instant::now() - ANTI_ENTROPY;
        let _ = me.cast(SessionMsg::Recheck);
        Ok(state)
    }

    async fn handle(&self, me: ActorRef<SessionMsg>, msg: SessionMsg, state: &mut SessionState) -> Result<(), ActorProcessingErr> {
        // A peer that is gone, or stops taking data, ends its session; nothing else fails.
        if let Err(e) = self.handle_inner(&me, msg, state).await {
            tracing::info!(peer = %state.peer.short(), reason = %e, "session closed");
            me.stop(None);
        }
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<SessionMsg>, state: &mut SessionState) -> Result<(), ActorProcessingErr> {
        state.reader.abort();
        let _ = state.send.finish();
        state.conn.close(VarInt::from_u32(0), b"session ended");
        let _ = mesh(&state.handle, MeshOp::EndSession(state.peer)).await;
        Ok(())
    }
}

impl SessionActor {
    async fn handle_inner(&self, me: &ActorRef<SessionMsg>, msg: SessionMsg, state: &mut SessionState) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Frame(frame) => {
                FrameCounters::add(&state.frames.received);
                on_frame(me, state, frame).await?
            }
            SessionMsg::Sync { bucket, doc, epoch, checked } if state.buckets.contains(&bucket) => {
                FrameCounters::add(&state.frames.received);
                on_sync(me, state, (bucket, doc, epoch), checked).await?
            }
            SessionMsg::Sync { .. } => {
                FrameCounters::add(&state.frames.received);
                tracing::warn!(peer = %state.peer.short(), "ignored a sync message for a bucket outside the session")
            }
            SessionMsg::Closed(why) => {
                tracing::info!(peer = %state.peer.short(), reason = %why, "session closed");
                me.stop(None);
            }
            SessionMsg::Changed(changed) => {
                for (bucket, doc) in changed {
                    if state.buckets.contains(&bucket) {
                        send_generated(state, bucket, doc).await?;
                    }
                }
            }
            SessionMsg::Ask(bucket) => {
                if state.buckets.contains(&bucket) {
                    send_summary(state, bucket).await?;
                }
            }
            SessionMsg::Epoch(bucket, base) => {
                if state.buckets.contains(&bucket) {
                    send(state, &Frame::Epoch { bucket, base: *base }).await?;
                }
            }
            SessionMsg::Recheck => {
                let still = match mesh(&state.handle, MeshOp::Accept { peer: state.peer, asked: state.buckets.iter().copied().collect() }).await {
                    Ok(MeshReply::Buckets(b)) => b.into_iter().collect::<HashSet<Uid>>(),
                    _ => state.buckets.clone(),
                };
                if still.len() < state.buckets.len() {
                    tracing::warn!(peer = %state.peer.short(), "the peer is no longer a member of a bucket of this session: dropped from it");
                    state.buckets = still;
                }
                if state.buckets.is_empty() {
                    let _ = write_frame(&mut state.send, &Frame::Refused { reason: "you are no longer a member of any bucket this node shares".into() }).await;
                    state.conn.close(VarInt::from_u32(403), b"removed");
                    me.stop(None);
                    return Ok(());
                }
                // The first summaries go both ways; then the dialer's alone do the work.
                if state.last_summary.elapsed() >= ANTI_ENTROPY && (state.dialed_here || !state.summaries_sent) {
                    send_summaries(state).await?;
                }
            }
        }
        Ok(())
    }
}

async fn send_summaries(state: &mut SessionState) -> Result<(), ActorProcessingErr> {
    state.last_summary = Instant::now();
    state.summaries_sent = true;
    let buckets: Vec<Uid> = state.buckets.iter().copied().collect();
    for bucket in buckets {
        send_summary(state, bucket).await?;
    }
    Ok(())
}

async fn send_summary(state: &mut SessionState, bucket: Uid) -> Result<(), ActorProcessingErr> {
    if let MeshReply::Summary(epoch, digests) = mesh(&state.handle, MeshOp::Summary(bucket)).await? {
        send(state, &Frame::Summary { bucket, epoch, digests }).await?;
    }
    Ok(())
}

async fn send(state: &mut SessionState, frame: &Frame) -> Result<(), ActorProcessingErr> {
    write_frame(&mut state.send, frame).await?;
    FrameCounters::add(&state.frames.sent);
    Ok(())
}

/// Sends what the peer lacks of one document, if anything; says whether something went.
async fn send_generated(state: &mut SessionState, bucket: Uid, doc: u16) -> Result<bool, ActorProcessingErr> {
    if let MeshReply::Message(Some(msg), epoch) = mesh(&state.handle, MeshOp::Generate { peer: state.peer, bucket, doc }).await? {
        send(state, &Frame::Sync { bucket, doc, epoch, msg }).await?;
        Ok(true)
    } else {
        state.lagging.remove(&(bucket, doc));
        Ok(false)
    }
}

async fn on_frame(me: &ActorRef<SessionMsg>, state: &mut SessionState, frame: Frame) -> Result<(), ActorProcessingErr> {
    match frame {
        Frame::Summary { bucket, epoch, digests } if state.buckets.contains(&bucket) => {
            let docs = match mesh(&state.handle, MeshOp::Compare { peer: state.peer, bucket, epoch, digests }).await? {
                MeshReply::Differing(d, answer) => {
                    // While the bucket is due a compaction, the side that did not dial
                    // answers the dialer's summaries with its own: each then knows whether
                    // the other is at its heads (`Mesh::compact_due`).
                    if answer && !state.dialed_here {
                        send_summary(state, bucket).await?;
                    }
                    d
                }
                MeshReply::PeerBehind(base) => {
                    send(state, &Frame::Epoch { bucket, base }).await?;
                    Vec::new()
                }
                MeshReply::PeerAhead => {
                    // Ours is the earlier epoch: our summary makes the peer announce its own.
                    send_summary(state, bucket).await?;
                    Vec::new()
                }
                _ => Vec::new(),
            };
            for doc in &docs {
                state.lagging.insert((bucket, *doc));
            }
            let _ = state.mesh.cast(MeshMsg::Synced(state.peer, state.lagging.len()));
            let mut sent = false;
            for doc in docs {
                sent |= send_generated(state, bucket, doc).await?;
            }
            if sent {
                FrameCounters::add(&state.frames.useful);
            }
        }
        Frame::Epoch { bucket, base } if state.buckets.contains(&bucket) => {
            let epoch = base.epoch;
            if let MeshReply::Taken(how) = mesh(&state.handle, MeshOp::TakeEpoch { bucket, base }).await? {
                if how != crate::engine::compaction::TakenEpoch::Ignored {
                    tracing::info!(peer = %state.peer.short(), epoch, how = ?how, "took a new epoch of a bucket's shards");
                    // Every peer learns of it from our summaries.
                    let _ = state.mesh.cast(MeshMsg::EpochTaken(bucket));
                }
            }
        }
        Frame::Refused { reason } => {
            tracing::warn!(peer = %state.peer.short(), reason, "the peer ended the session");
            me.stop(None);
        }
        other => {
            // A frame for a bucket outside the session, or a handshake frame mid-session.
            tracing::warn!(peer = %state.peer.short(), frame = ?std::mem::discriminant(&other), "ignored a frame outside the session's buckets");
        }
    }
    Ok(())
}

/// A sync message of the session's bucket `bucket`, document `doc`, as the reader checked it:
/// applied (or the peer dropped if it was refused), then answered.
async fn on_sync(me: &ActorRef<SessionMsg>, state: &mut SessionState, (bucket, doc, epoch): (Uid, u16, u32), checked: Result<CheckedMessage, String>) -> Result<(), ActorProcessingErr> {
    let received = match checked {
        Ok(msg) => mesh(&state.handle, MeshOp::Receive { peer: state.peer, bucket, doc, epoch, msg }).await,
        Err(why) => Err(format!("a sync message from {} was refused whole: {why}", state.peer.short())),
    };
    match received {
        Ok(MeshReply::Received(r)) => {
            let Received { applied, members_changed, entries, answer, epoch } = *r;
            if !applied.missing_blobs.is_empty() && state.eager_fetch {
                let _ = state.mesh.cast(MeshMsg::Missing(state.peer, applied.missing_blobs));
            }
            if members_changed {
                let _ = state.mesh.cast(MeshMsg::MembersChanged);
            }
            // Not forwarded: its writer pushes it to its own peers (`proto::fanout`).
            if entries > 0 || answer.is_some() {
                FrameCounters::add(&state.frames.useful);
            }
            match answer {
                Some(msg) => send(state, &Frame::Sync { bucket, doc, epoch, msg }).await?,
                None => {
                    state.lagging.remove(&(bucket, doc));
                }
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(peer = %state.peer.short(), error = %e, "dropped a peer whose sync message was refused");
            state.conn.close(VarInt::from_u32(400), b"bad sync message");
            me.stop(None);
            return Ok(());
        }
    }
    let _ = state.mesh.cast(MeshMsg::Synced(state.peer, state.lagging.len()));
    Ok(())
}

/// The mesh's part of the node, for `status`.
pub async fn mesh_status(names: &Names) -> Option<MeshStatus> {
    let m = names.find::<MeshMsg>(Child::Mesh)?;
    match m.call(MeshMsg::Status, Some(Duration::from_secs(5))).await {
        Ok(ractor::rpc::CallResult::Success(s)) => Some(s),
        _ => None,
    }
}
