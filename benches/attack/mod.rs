//! The attacker of the `attack` figure, in this process on a runtime of one thread (so the
//! attack's CPU is bounded at one core and measured): `STRANGERS` stranger connections at
//! once (`IDENTITIES` identities × 5), each sending a `Hello` and reconnecting as soon as it
//! is refused, and one member that reconnects and sends a forged sync message (a version in
//! the node's own name) over and over, each refused whole.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use alknet_actors::proto::clock::Stamp;
use alknet_actors::proto::doc::ReplicaDoc;
use alknet_actors::proto::entry::{ContentHash, Entry, EntryKind, Version};
use alknet_actors::proto::ids::{NodeId, OrderKey, VersionId};
use alknet_actors::proto::path::TreePath;
use alknet_actors::proto::replica::{self, BranchRecord, Change, Origin};
use alknet_actors::proto::signed::EntrySigner;
use alknet_actors::proto::sync::{Frame, SYNC_ALPN};
use alknet_actors::proto::ticket::Ticket;

#[path = "../../tests/common/peer.rs"]
mod peer;
use peer::{addr_of, endpoint, read_frame};

/// Stranger connections open at once.
pub const STRANGERS: usize = 500;
const IDENTITIES: usize = 100;

/// A running attack.
pub struct Attack {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Stranger connections made so far.
    pub connections: Arc<AtomicU64>,
    /// Forged messages sent so far.
    pub forged: Arc<AtomicU64>,
}

impl Attack {
    /// Starts the attack on the node that made `ticket` (one use of it admits the hostile
    /// member); returns once every stranger is connecting and the member has joined.
    pub fn start(ticket: &str) -> Attack {
        let ticket = Ticket::decode(ticket).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (connections, forged) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, c, f) = (stop.clone(), connections.clone(), forged.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(run(ticket, s, c, f, ready_tx));
        });
        ready_rx.recv_timeout(Duration::from_secs(60)).expect("the attack started");
        Attack { stop, thread: Some(thread), connections, forged }
    }

    /// Stops it and waits for its thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run(ticket: Ticket, stop: Arc<AtomicBool>, connections: Arc<AtomicU64>, forged: Arc<AtomicU64>, ready: std::sync::mpsc::Sender<()>) {
    let addr = addr_of(&ticket);
    // The hostile member: joins first, then sends a forgery per session.
    let ep = endpoint().await;
    let me = NodeId(*ep.id().as_bytes());
    let signer = EntrySigner::new(&ep.secret_key().to_bytes());
    let conn = ep.connect(addr.clone(), SYNC_ALPN).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&Frame::Join { bucket: ticket.bucket, secret: ticket.secret, addrs: vec![] }.encode()).await.unwrap();
    let root = match read_frame(&mut recv).await {
        Some(Frame::Joined { root, .. }) => BranchRecord::decode(&root).unwrap(),
        other => panic!("the hostile member's join: {other:?}"),
    };
    conn.close(0u32.into(), b"joined");
    // Then the strangers (before: they would take the handshake slot its join needs).
    let mut tasks = Vec::new();
    let strangers: usize = std::env::var("ALKFS_BENCH_STRANGERS").ok().and_then(|v| v.parse().ok()).unwrap_or(STRANGERS);
    let identities: usize = std::env::var("ALKFS_BENCH_IDENTITIES").ok().and_then(|v| v.parse().ok()).unwrap_or(IDENTITIES);
    for _ in 0..identities.min(strangers) {
        let ep = endpoint().await;
        for _ in 0..(strangers / identities).max(1) {
            let (ep, addr, stop, connections, bucket) = (ep.clone(), addr.clone(), stop.clone(), connections.clone(), ticket.bucket);
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(10), ep.connect(addr.clone(), SYNC_ALPN)).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    connections.fetch_add(1, Ordering::Relaxed);
                    if let Ok((mut send, mut recv)) = conn.open_bi().await {
                        let _ = send.write_all(&Frame::Hello { buckets: vec![bucket], addrs: vec![], instance: 1, clock_ms: 0 }.encode()).await;
                        while read_frame(&mut recv).await.is_some() {}
                    }
                    conn.close(0u32.into(), b"again");
                }
            }));
        }
    }
    let _ = ready.send(());
    let mut seq = 1;
    while !stop.load(Ordering::SeqCst) {
        let Ok(conn) = ep.connect(addr.clone(), SYNC_ALPN).await else { continue };
        let Ok((mut send, mut recv)) = conn.open_bi().await else { continue };
        let _ = send.write_all(&Frame::Hello { buckets: vec![ticket.bucket], addrs: vec![], instance: seq as u64, clock_ms: 0 }.encode()).await;
        seq += 1;
        // A version in the victim's name, signed by the member.
        let now = Stamp::at(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64);
        let c = Change {
            branch: root.uid,
            path: TreePath::parse(&format!("/forged-{seq}.txt")).unwrap(),
            key: OrderKey::new(now, &VersionId { node: ticket.node, seq }),
            pred: None,
            version: Version { entry: Some(Entry { kind: EntryKind::File, hash: ContentHash::EMPTY, size: 0, mode: 0o644, mtime_ms: 0 }), written: now },
            origin: Origin::Write,
            commit: None,
        };
        let key = replica::doc_key(&c.id());
        let mut d = ReplicaDoc::new(&me.0);
        d.put(&key, &signer.seal(&ticket.bucket, &key, &replica::encode(&c))).unwrap();
        let msg = d.message_to_empty_peer().unwrap();
        let _ = send.write_all(&Frame::Sync { bucket: ticket.bucket, doc: replica::shard_of(&c.branch, &c.path), epoch: 0, msg }.encode()).await;
        forged.fetch_add(1, Ordering::Relaxed);
        while read_frame(&mut recv).await.is_some() {}
        conn.close(0u32.into(), b"again");
    }
    for t in tasks {
        t.abort();
    }
    ep.close().await;
}
