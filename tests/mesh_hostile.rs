//! A hostile peer, played by this test over a real iroh connection to a real node: a
//! stranger with a valid address is refused on the sync protocol and on blob requests before
//! any data moves; a member that sends oversized or garbage frames is dropped, and the node
//! goes on serving the others; a member serving wrong bytes is never believed; a member
//! forging or rewriting entries is refused whole; an operation never finished is held; a
//! member of another bucket announcing on a bucket's gossip topic is dropped and counted.

mod common;

use std::time::Duration;

use alknet_actors::proto::clock::Stamp;
use alknet_actors::proto::doc::ReplicaDoc;
use alknet_actors::proto::entry::{ContentHash, Entry, EntryKind, Version};
use alknet_actors::proto::ids::{NodeId, OrderKey, Uid, VersionId};
use alknet_actors::proto::membership::Role;
use alknet_actors::proto::path::TreePath;
use alknet_actors::proto::replica::{self, BranchRecord, Change, CommitRef, MetaEntry, Origin};
use alknet_actors::proto::signed::EntrySigner;
use alknet_actors::proto::sync::{Frame, META_DOC, SYNC_ALPN};
use alknet_actors::proto::ticket::Ticket;
use common::peer::{addr_of, read_frame};
use common::{await_cond, Node, Store};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A stranger: a bare endpoint with a fresh identity.
async fn stranger() -> iroh::Endpoint {
    common::peer::endpoint().await
}

/// Joins with `ticket` for real (a use of it, saying where this endpoint listens, as a node
/// does), then opens a session: the connection, its stream, and the bucket's root branch as
/// the inviter sent it.
async fn join_as_member(ep: &iroh::Endpoint, ticket: &Ticket) -> (iroh::endpoint::Connection, iroh::endpoint::SendStream, iroh::endpoint::RecvStream, BranchRecord) {
    let conn = ep.connect(addr_of(ticket), SYNC_ALPN).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&Frame::Join { bucket: ticket.bucket, secret: ticket.secret, addrs: ep.bound_sockets() }.encode()).await.unwrap();
    let root = match read_frame(&mut recv).await {
        Some(Frame::Joined { root, .. }) => BranchRecord::decode(&root).unwrap(),
        other => panic!("join: {other:?}"),
    };
    send.write_all(&Frame::Hello { buckets: vec![ticket.bucket], addrs: vec![], instance: 1, clock_ms: 0 }.encode()).await.unwrap();
    assert!(matches!(read_frame(&mut recv).await, Some(Frame::Welcome { .. })), "welcome");
    (conn, send, recv, root)
}

/// A node with a shared bucket holding one file; the ticket it printed.
fn node_with_a_file() -> (Store, Node, Ticket, String) {
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    s.put_bytes("/secret.txt", b"members only");
    let ticket = Ticket::decode(&s.ok(&["invite", "--uses", "5"])).unwrap();
    let hash = common::parse_json_array(&s.ok(&["ls", "--json", "/secret.txt"]))[0]["hash"].as_str().unwrap().to_string();
    (s, node, ticket, hash)
}

/// An honest member joined to the node of `s` (its store and running node): the one whose
/// sync must go on whatever the hostile peer does.
fn honest_member_of(s: &Store) -> (Store, Node) {
    let friend = Store::new();
    let node = Node::start(&friend, &[], &[]);
    friend.ok(&["join", s.ok(&["invite"]).trim()]);
    (friend, node)
}

#[test]
fn a_stranger_with_a_valid_address_is_refused_on_sync_and_on_blobs() {
    let (s, mut node, ticket, hash) = node_with_a_file();
    runtime().block_on(async {
        let ep = stranger().await;
        // Sync: a Hello naming the bucket (its id is no secret) gets a refusal, nothing else.
        let conn = ep.connect(addr_of(&ticket), SYNC_ALPN).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&Frame::Hello { buckets: vec![ticket.bucket], addrs: vec![], instance: 1, clock_ms: 0 }.encode()).await.unwrap();
        match read_frame(&mut recv).await {
            Some(Frame::Refused { reason }) => assert!(reason.contains("no bucket"), "{reason}"),
            other => panic!("a stranger got {other:?}"),
        }
        assert!(read_frame(&mut recv).await.is_none(), "nothing follows a refusal");
        // A Join with a made-up secret is refused too.
        let conn = ep.connect(addr_of(&ticket), SYNC_ALPN).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&Frame::Join { bucket: ticket.bucket, secret: [7; 16], addrs: vec![] }.encode()).await.unwrap();
        assert!(matches!(read_frame(&mut recv).await, Some(Frame::Refused { .. })));
        // Blobs: the hash of a file in the bucket, asked for directly, is not served.
        let store = iroh_blobs::store::mem::MemStore::new();
        let hash = iroh_blobs::Hash::from_bytes(alknet_actors::proto::entry::ContentHash::from_hex(&hash).unwrap().0);
        let got = match ep.connect(addr_of(&ticket), iroh_blobs::ALPN).await {
            Ok(conn) => tokio::time::timeout(Duration::from_secs(10), store.remote().fetch(conn, hash)).await.ok().map(|r| r.is_ok()),
            Err(_) => Some(false),
        };
        assert_ne!(got, Some(true), "a stranger fetched a member's blob");
        assert!(!store.blobs().has(hash).await.unwrap(), "no byte of it arrived");
        // Gossip: the connection is closed before gossip sees it (the topic id admits no one).
        let conn = ep.connect(addr_of(&ticket), iroh_gossip::ALPN).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
            Ok(iroh::endpoint::ConnectionError::ApplicationClosed(c)) => assert_eq!(c.error_code.into_inner(), 403),
            other => panic!("a stranger's gossip connection was not refused: {other:?}"),
        }
        ep.close().await;
    });
    // The node is unharmed and said why, once per refusal.
    assert!(s.ok(&["status"]).contains("node id"));
    let log = node.log();
    assert!(log.contains("refused a session") && log.contains("refused a join") && log.contains("refused a gossip connection"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    node.stop_with(libc::SIGTERM, Duration::from_secs(10));
}

#[test]
fn a_member_sending_oversized_or_garbage_frames_is_dropped_and_the_node_serves_the_others() {
    let (s, node, ticket, _) = node_with_a_file();
    let (friend, _friend_node) = honest_member_of(&s);
    runtime().block_on(async {
        let ep = stranger().await;
        for attack in 0..3 {
            // Join for real (the ticket allows several uses), then misbehave.
            let (conn, mut send, mut recv, _) = join_as_member(&ep, &ticket).await;
            let bad: Vec<u8> = match attack {
                0 => u32::MAX.to_be_bytes().to_vec(),                                                                   // an oversized frame
                1 => Frame::Sync { bucket: ticket.bucket, doc: 3, epoch: 0, msg: b"\x42not automerge".to_vec() }.encode(),      // garbage sync
                _ => Frame::Sync { bucket: Uid([9; 16]), doc: 3, epoch: 0, msg: vec![1, 2, 3] }.encode(),                      // a bucket not in the session
            };
            send.write_all(&bad).await.unwrap();
            if attack < 2 {
                // Dropped: the stream ends (whatever summaries were already on their way).
                let ended = tokio::time::timeout(Duration::from_secs(10), async {
                    while read_frame(&mut recv).await.is_some() {}
                })
                .await;
                assert!(ended.is_ok(), "attack {attack}: the node kept the connection");
            }
            conn.close(0u32.into(), b"done");
        }
        ep.close().await;
    });
    // The honest member still gets new writes.
    s.put_bytes("/after.txt", b"still serving");
    await_cond(Duration::from_secs(30), "the honest member to get a write made after the attacks", || friend.run(&["get", "/after.txt"]).stdout == b"still serving");
    let log = node.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("frame of 4294967295 bytes") || log.contains("over the limit"), "the oversized frame was logged: {log}");
}

#[test]
fn with_lazy_fetching_a_file_whose_bytes_are_on_a_peer_is_fetched_when_read() {
    let a = Store::new();
    let _na = Node::start(&a, &[], &[]);
    let b = Store::new();
    let _nb = Node::start(&b, &["--set", "net.fetch=lazy"], &[]);
    // Large enough that its transfer outlasts the start of the second reader.
    let big = common::random_bytes(48 << 20, 9);
    let src = a.scratch().join("big");
    std::fs::write(&src, &big).unwrap();
    a.ok(&["put", src.to_str().unwrap(), "/big.bin"]);
    b.ok(&["join", a.ok(&["invite"]).trim()]);
    await_cond(Duration::from_secs(30), "the entry to reach B", || b.ok(&["ls", "-R", "/"]).contains("/big.bin"));
    // Listed, its bytes not here: `get` fetches them and waits. Two readers at once share
    // one fetch: the blob crosses the network once.
    let readers: Vec<_> = (0..2).map(|_| b.cmd(&["get", "/big.bin"]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()).collect();
    for reader in readers {
        let out = reader.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout == big, "the fetched bytes differ");
    }
    let st = common::status_json(b.data()).expect("B's status");
    assert_eq!(st["mesh"]["fetched"], 1, "one blob, fetched once: {st}");
}

#[test]
fn a_member_that_stops_reading_stalls_only_its_own_session() {
    let (s, node, ticket, _) = node_with_a_file();
    let (friend, _friend_node) = honest_member_of(&s);
    let rt = runtime();
    // The staller joins, says Hello, asks for every document (an automerge sync message from
    // an empty document each, so the node pushes it whatever changes next), and then never
    // reads a byte: its receive window (64 KiB per stream) fills.
    let (_ep, conn, streams) = rt.block_on(async {
        let window = iroh::endpoint::VarInt::from_u32(64 << 10);
        let ep = common::peer::endpoint_with(iroh::endpoint::QuicTransportConfig::builder().stream_receive_window(window).build()).await;
        let conn = ep.connect(addr_of(&ticket), SYNC_ALPN).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&Frame::Join { bucket: ticket.bucket, secret: ticket.secret, addrs: vec![] }.encode()).await.unwrap();
        assert!(matches!(read_frame(&mut recv).await, Some(Frame::Joined { .. })));
        send.write_all(&Frame::Hello { buckets: vec![ticket.bucket], addrs: vec![], instance: 1, clock_ms: 0 }.encode()).await.unwrap();
        assert!(matches!(read_frame(&mut recv).await, Some(Frame::Welcome { .. })));
        for doc in 0..alknet_actors::proto::sync::DOCS {
            use automerge::sync::SyncDoc;
            let msg = automerge::AutoCommit::new().sync().generate_sync_message(&mut automerge::sync::State::new()).expect("a first message").encode();
            send.write_all(&Frame::Sync { bucket: ticket.bucket, doc, epoch: 0, msg }.encode()).await.unwrap();
        }
        (ep, conn, (send, recv))
    });
    // Enough new history to fill the staller's window many times over.
    let src = s.scratch().join("many");
    std::fs::create_dir_all(&src).unwrap();
    // ~8,000 versions of ~250 bytes each in the documents: megabytes of sync messages, far
    // past the staller's stream window, so the node's writes to the staller block.
    for i in 0..8000 {
        std::fs::write(src.join(format!("f{i}")), i.to_string()).unwrap();
    }
    s.ok(&["put", "-r", src.to_str().unwrap(), "/many"]);
    s.put_bytes("/last.txt", b"the honest member still gets this");
    let t = std::time::Instant::now();
    await_cond(Duration::from_secs(20), "the honest member to get writes while another member stalls", || {
        friend.run(&["get", "/last.txt"]).stdout == b"the honest member still gets this"
    });
    assert!(t.elapsed() < Duration::from_secs(15), "the stalled member held the others up: {:?}", t.elapsed());
    assert!(s.ok(&["status"]).contains("node id"), "the node answers");
    // The stall was real: the node had more for the staller than its window let through. All
    // it had received by now (UDP bytes, more than the stream's) is less than what it reads
    // once it starts reading.
    let (_send, mut recv) = streams;
    let received_while_stalled = conn.stats().udp_rx.bytes;
    let read = rt.block_on(async {
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while total <= received_while_stalled + (256 << 10) {
            match tokio::time::timeout_at(deadline, recv.read(&mut buf)).await {
                Ok(Ok(Some(n))) => total += n as u64,
                _ => break,
            }
        }
        total
    });
    assert!(read > received_while_stalled + (256 << 10), "the staller read {read} bytes, no more than the {received_while_stalled} it had received while stalled: the node never blocked on it");
    assert!(!node.log().contains("panicked"));
}

/// Serves every blob request with the size asked for and then garbage: a peer that lies
/// about bytes (it passes the size check, then fails verification).
#[derive(Debug, Clone)]
struct Liar {
    size: std::sync::Arc<std::sync::atomic::AtomicU64>,
    asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl iroh::protocol::ProtocolHandler for Liar {
    async fn accept(&self, conn: iroh::endpoint::Connection) -> Result<(), iroh::protocol::AcceptError> {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let mut request = [0u8; 256];
            let _ = tokio::time::timeout(Duration::from_secs(2), recv.read(&mut request)).await;
            self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let size = self.size.load(std::sync::atomic::Ordering::SeqCst);
            let mut lie = size.to_le_bytes().to_vec();
            lie.extend(std::iter::repeat_n(0xAB_u8, size as usize * 2));
            let _ = send.write_all(&lie).await;
            let _ = send.finish();
        }
        Ok(())
    }
}

#[test]
fn a_member_serving_wrong_bytes_is_never_believed_and_the_right_bytes_arrive_later() {
    // A fetches lazily, so the bytes are asked for only when the test reads them.
    let a = Store::new();
    let _na = Node::start(&a, &["--set", "net.fetch=lazy"], &[]);
    a.put_bytes("/hello.txt", b"hi");
    let ticket = Ticket::decode(&a.ok(&["invite", "--uses", "5"])).unwrap();
    // W, an honest member, writes a small (inline tier) and a large file; A learns of them.
    let w = Store::new();
    let mut nw = Node::start(&w, &[], &[]);
    w.ok(&["join", a.ok(&["invite"]).trim()]);
    let small = common::random_bytes(200, 3);
    let large = common::random_bytes(200 << 10, 4);
    w.put_bytes("/small.bin", &small);
    w.put_bytes("/large.bin", &large);
    await_cond(Duration::from_secs(30), "A to list W's files", || {
        let ls = a.ok(&["ls", "-R", "/"]);
        ls.contains("/small.bin") && ls.contains("/large.bin")
    });
    let st = common::status_json(w.data()).expect("W's status");
    let w_listen: std::net::SocketAddr = st["mesh"]["listen"][0].as_str().unwrap().parse().unwrap();
    nw.stop_with(libc::SIGTERM, Duration::from_secs(10));
    // W's identity now speaks from a liar: same key, same address, a session with A, and
    // garbage for every blob.
    let key: [u8; 32] = std::fs::read(w.data().join("node.key")).unwrap().try_into().unwrap();
    let liar = Liar { size: Default::default(), asked: Default::default() };
    let rt = runtime();
    let (router, session) = rt.block_on(async {
        let ep = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
            .secret_key(iroh::SecretKey::from_bytes(&key))
            .relay_mode(iroh::RelayMode::Disabled)
            .clear_ip_transports()
            .bind_addr(w_listen)
            .unwrap()
            .portmapper_config(iroh::endpoint::PortmapperConfig::Disabled)
            .net_report_config(iroh::endpoint::NetReportConfig::minimal())
            .bind()
            .await
            .unwrap();
        let router = iroh::protocol::Router::builder(ep.clone()).accept(iroh_blobs::ALPN, liar.clone()).spawn();
        let conn = ep.connect(addr_of(&ticket), SYNC_ALPN).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&Frame::Hello { buckets: vec![ticket.bucket], addrs: vec![w_listen], instance: 1, clock_ms: 0 }.encode()).await.unwrap();
        assert!(matches!(read_frame(&mut recv).await, Some(Frame::Welcome { .. })), "the liar is a member");
        // Read (and ignore) whatever the session sends, so it never stalls.
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(Some(_)) = recv.read(&mut buf).await {}
            drop(send);
        });
        (router, (conn, drain))
    });
    for (path, len) in [("/small.bin", small.len()), ("/large.bin", large.len())] {
        liar.size.store(len as u64, std::sync::atomic::Ordering::SeqCst);
        let asked = liar.asked.load(std::sync::atomic::Ordering::SeqCst);
        let mut get = a.cmd(&["get", path]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).spawn().unwrap();
        await_cond(Duration::from_secs(30), "A to ask the liar for the bytes", || liar.asked.load(std::sync::atomic::Ordering::SeqCst) > asked);
        std::thread::sleep(Duration::from_millis(500));
        // The lie is not believed: `get` is still waiting (or failed), and printed nothing.
        if let Some(status) = get.try_wait().unwrap() {
            assert!(!status.success(), "{path}: get succeeded on a liar's bytes");
        }
        let _ = get.kill();
        let out = get.wait_with_output().unwrap();
        assert!(out.stdout.is_empty(), "{path}: get printed {} bytes from a liar", out.stdout.len());
    }
    let db = rusqlite::Connection::open(a.data().join("tree.db")).unwrap();
    let missing: i64 = db.query_row("SELECT count(*) FROM blob WHERE present = 0", [], |r| r.get(0)).unwrap();
    assert_eq!(missing, 2, "both blobs are still missing on A");
    // The liar goes away for good (its socket freed for the honest W).
    rt.block_on(async {
        let (conn, drain) = session;
        conn.close(0u32.into(), b"bye");
        drain.abort();
        router.shutdown().await.unwrap();
        router.endpoint().close().await;
        drop(router); // the last handle of the endpoint: its socket closes
    });
    drop(rt);
    await_cond(Duration::from_secs(10), "the liar's socket to be freed", || std::net::UdpSocket::bind(w_listen).is_ok());
    // The honest W comes back at its address: A gets the right bytes.
    let _nw = Node::start(&w, &["--listen", &w_listen.to_string()], &[]);
    for (path, want) in [("/small.bin", &small), ("/large.bin", &large)] {
        await_cond(Duration::from_secs(60), "A to get the right bytes from the honest W", || {
            let out = a.run(&["get", path]);
            out.status.success() && &out.stdout == want
        });
    }
    let check = a.run(&["blobs", "check"]);
    assert!(check.status.success(), "A's store checks clean: {}", String::from_utf8_lossy(&check.stdout));
    let log = _na.log();
    assert!(log.contains("mismatch"), "the bad bytes were logged: {log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// Its first sync message of `doc` that carries changes, as if to a peer that has nothing:
/// what a hostile member pushes unasked.
fn unasked_message(doc: &mut ReplicaDoc) -> Vec<u8> {
    doc.message_to_empty_peer().expect("no message carried the changes")
}

/// A member forging what others write: a version named for another node, a signature that
/// does not hold, an admission in an owner's name, an entry with no signature. Each message
/// is refused whole, the peer dropped and the reason logged; nothing of it shows on the node
/// (not even the valid entries sent with it); the honest member keeps converging.
#[test]
fn a_member_forging_entries_is_refused_whole_and_nothing_of_it_is_applied() {
    let (s, node, ticket, _) = node_with_a_file();
    let (friend, _friend_node) = honest_member_of(&s);
    let stranger_id = NodeId([0x5a; 32]);
    let reasons = runtime().block_on(async {
        let ep = stranger().await;
        let me = NodeId(*ep.id().as_bytes());
        let signer = EntrySigner::new(&ep.secret_key().to_bytes());
        assert_eq!(signer.id(), me);
        let victim = ticket.node;
        let mut reasons = Vec::new();
        for attack in 0..4 {
            let (conn, mut send, mut recv, root) = join_as_member(&ep, &ticket).await;
            let version = |node: NodeId, path: &str| Change {
                branch: root.uid,
                path: TreePath::parse(path).unwrap(),
                key: OrderKey::new(Stamp::at(1_900_000_000_000), &VersionId { node, seq: 7 }),
                pred: None,
                version: Version { entry: Some(Entry { kind: EntryKind::File, hash: ContentHash::EMPTY, size: 0, mode: 0o644, mtime_ms: 0 }), written: Stamp::at(1_900_000_000_000) },
                origin: Origin::Write,
                commit: None,
            };
            // A valid entry of the member's own goes with each forged one: it must not be applied either.
            let honest = version(me, "/honest-part.txt");
            let (doc, forged): (u16, (String, Vec<u8>)) = match attack {
                0 => {
                    let c = version(victim, "/forged.txt");
                    let key = replica::doc_key(&c.id());
                    (replica::shard_of(&c.branch, &c.path), (key.clone(), signer.seal(&ticket.bucket, &key, &replica::encode(&c))))
                }
                1 => {
                    let c = version(me, "/tampered.txt");
                    let key = replica::doc_key(&c.id());
                    let mut value = signer.seal(&ticket.bucket, &key, &replica::encode(&c));
                    *value.last_mut().unwrap() ^= 1;
                    (replica::shard_of(&c.branch, &c.path), (key, value))
                }
                2 => {
                    let e = MetaEntry::Member { node: stranger_id, added_by: victim, at_ms: 1, role: Role::Owner };
                    (META_DOC, (e.key(), signer.seal(&ticket.bucket, &e.key(), &e.value())))
                }
                _ => {
                    let c = version(me, "/unsigned.txt");
                    (replica::shard_of(&c.branch, &c.path), (replica::doc_key(&c.id()), replica::encode(&c)))
                }
            };
            let mut d = ReplicaDoc::new(&me.0);
            d.put(&forged.0, &forged.1).unwrap();
            if doc != META_DOC && replica::shard_of(&honest.branch, &honest.path) == doc {
                let key = replica::doc_key(&honest.id());
                d.put(&key, &signer.seal(&ticket.bucket, &key, &replica::encode(&honest))).unwrap();
            }
            send.write_all(&Frame::Sync { bucket: ticket.bucket, doc, epoch: 0, msg: unasked_message(&mut d) }.encode()).await.unwrap();
            // Dropped: the stream ends (whatever summaries were already on their way).
            let ended = tokio::time::timeout(Duration::from_secs(10), async { while read_frame(&mut recv).await.is_some() {} }).await;
            assert!(ended.is_ok(), "attack {attack}: the node kept the connection");
            reasons.push(conn.close_reason().map(|r| format!("{r:?}")).unwrap_or_default());
            conn.close(0u32.into(), b"done");
        }
        ep.close().await;
        reasons
    });
    let log = node.log();
    assert!(!log.contains("panicked"), "{log}");
    let refusals = log.matches("refused whole").count();
    assert_eq!(refusals, 4, "each forged message refused whole and logged once ({reasons:?}): {log}");
    assert!(log.contains("who does not write it"), "the forged writer named: {log}");
    assert!(log.contains("a bad signature"), "the bad signature named: {log}");
    assert!(log.contains("older protocol"), "the unsigned entry named: {log}");
    // Nothing of any message shows.
    for path in ["/forged.txt", "/tampered.txt", "/unsigned.txt", "/honest-part.txt"] {
        assert!(!s.run(&["ls", path]).status.success(), "{path} was applied");
    }
    assert!(!s.ok(&["members", "--json"]).contains(&stranger_id.to_hex()), "the forged admission was applied");
    // The honest member still gets new writes.
    s.put_bytes("/after.txt", b"still serving");
    await_cond(Duration::from_secs(30), "the honest member to get a write made after the attacks", || friend.run(&["get", "/after.txt"]).stdout == b"still serving");
}

/// A member rewriting history: overwriting one of its own entries (a valid signature, by
/// the right writer) and deleting one. Each message is refused whole, the peer dropped and
/// the reason logged, the entry stays as first written. An operation that claims a thousand
/// versions and sends one is held out of the tree (bounded and dated: `store::waiting`, whose
/// expiry the engine tests drive with a clock). The honest member keeps converging.
#[test]
fn a_member_overwriting_deleting_or_never_finishing_is_refused_or_held_and_the_others_go_on() {
    let (s, node, ticket, _) = node_with_a_file();
    let (friend, _friend_node) = honest_member_of(&s);
    runtime().block_on(async {
        let ep = stranger().await;
        let me = NodeId(*ep.id().as_bytes());
        let signer = EntrySigner::new(&ep.secret_key().to_bytes());
        let (conn, mut send, recv, root) = join_as_member(&ep, &ticket).await;
        let version = |path: &str, seq: i64, size: u64, commit: Option<CommitRef>| Change {
            branch: root.uid,
            path: TreePath::parse(path).unwrap(),
            key: OrderKey::new(Stamp::at(common_now_ms()), &VersionId { node: me, seq }),
            pred: None,
            version: Version { entry: Some(Entry { kind: EntryKind::File, hash: ContentHash::EMPTY, size, mode: 0o644, mtime_ms: 0 }), written: Stamp::at(common_now_ms()) },
            origin: Origin::Write,
            commit,
        };
        let sealed = |c: &Change| {
            let key = replica::doc_key(&c.id());
            (replica::shard_of(&c.branch, &c.path), key.clone(), signer.seal(&ticket.bucket, &key, &replica::encode(c)))
        };
        // Its own entry, honestly: applied (the control).
        let mine = version("/mine.txt", 1, 0, None);
        let (doc, key, value) = sealed(&mine);
        let mut d = ReplicaDoc::new(&me.0);
        d.put(&key, &value).unwrap();
        send.write_all(&Frame::Sync { bucket: ticket.bucket, doc, epoch: 0, msg: unasked_message(&mut d) }.encode()).await.unwrap();
        let mut saw = false;
        for _ in 0..300 {
            if s.run(&["ls", "/mine.txt"]).status.success() {
                saw = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(saw, "the member's own honest entry was applied");
        drop((send, recv));
        conn.close(0u32.into(), b"next");
        // Rewrites: the same key with other content (signed by its writer), and a deletion.
        let rewritten = version("/mine.txt", 1, 7, None);
        let (_, _, other) = sealed(&rewritten);
        for attack in ["overwrite", "delete"] {
            let (conn, mut send, mut recv, _) = join_as_member(&ep, &ticket).await;
            let mut raw = automerge::AutoCommit::load(&d.save()).unwrap().with_actor(automerge::ActorId::from(&b"rewriter"[..]));
            match attack {
                "overwrite" => automerge::transaction::Transactable::put(&mut raw, automerge::ROOT, &key, automerge::ScalarValue::Bytes(other.clone())).unwrap(),
                _ => automerge::transaction::Transactable::delete(&mut raw, automerge::ROOT, &key).unwrap(),
            }
            // Every change, the rewrite last, as one sync message (an honest document would
            // not make it: `ReplicaDoc` refuses to).
            let changes: Vec<Vec<u8>> = raw.get_changes(&[]).iter().map(|c| c.raw_bytes().to_vec()).collect();
            let msg = automerge::sync::Message { heads: raw.get_heads(), need: vec![], have: vec![], changes: changes.into(), flags: None, version: automerge::sync::MessageVersion::V1 }.encode();
            send.write_all(&Frame::Sync { bucket: ticket.bucket, doc, epoch: 0, msg }.encode()).await.unwrap();
            let ended = tokio::time::timeout(Duration::from_secs(10), async { while read_frame(&mut recv).await.is_some() {} }).await;
            assert!(ended.is_ok(), "{attack}: the node kept the connection");
            conn.close(0u32.into(), b"done");
        }
        // An operation of a thousand versions of which one is sent: held, not shown.
        let (conn, mut send, _recv, _) = join_as_member(&ep, &ticket).await;
        let part = version("/part-of-a-thousand.txt", 2, 0, Some(CommitRef { first_seq: 2, len: 1000 }));
        let (doc, key, value) = sealed(&part);
        let mut d = ReplicaDoc::new(&me.0);
        d.put(&key, &value).unwrap();
        send.write_all(&Frame::Sync { bucket: ticket.bucket, doc, epoch: 0, msg: unasked_message(&mut d) }.encode()).await.unwrap();
        let tree = rusqlite::Connection::open_with_flags(s.data().join(alknet_actors::store::TREE_DB_FILE), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let mut held = 0;
        for _ in 0..300 {
            held = tree.query_row("SELECT count(*) FROM mesh_held", [], |r| r.get::<_, i64>(0)).unwrap();
            if held > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(held, 1, "the part was held");
        conn.close(0u32.into(), b"done");
        ep.close().await;
    });
    let log = node.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(log.matches("refused whole").count(), 2, "each rewrite refused whole and logged once: {log}");
    assert!(log.contains("replaces an entry written once"), "the overwrite named: {log}");
    assert!(log.contains("other than setting an entry"), "the deletion named: {log}");
    let entry = common::parse_json_array(&s.ok(&["ls", "--json", "/mine.txt"]));
    assert_eq!(entry[0]["size"], 0, "the entry is as first written");
    assert!(!s.run(&["ls", "/part-of-a-thousand.txt"]).status.success(), "a part of an unfinished operation was shown");
    s.put_bytes("/after.txt", b"still serving");
    await_cond(Duration::from_secs(30), "the honest member to get a write made after the attacks", || friend.run(&["get", "/after.txt"]).stdout == b"still serving");
    // The attacker pushed its entry to the node alone and announced nothing: the node does not
    // forward it (`proto::fanout`), and its summary to the honest member (anti-entropy, every
    // 10 s) carries it there.
    await_cond(Duration::from_secs(30), "the honest member to have what the node accepted", || friend.run(&["ls", "/mine.txt"]).status.success());
}

/// The node's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap()
}

#[test]
fn a_huge_first_frame_and_hundreds_of_strangers_at_once_cost_the_node_little_and_members_go_on() {
    const STRANGERS: usize = 100;
    const CONNECTIONS_EACH: usize = 5;
    let (s, node, ticket, _) = node_with_a_file();
    let (friend, _friend_node) = honest_member_of(&s);
    await_cond(Duration::from_secs(30), "the friend to have the file", || friend.run(&["get", "/secret.txt"]).status.success());
    let rss_before = rss_kib(node.pid());
    let started = std::time::Instant::now();
    runtime().block_on(async {
        // A first frame announcing 32 MiB: refused from its header, before any of it is read.
        let ep = stranger().await;
        let conn = ep.connect(addr_of(&ticket), SYNC_ALPN).await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&((32u32 << 20).to_be_bytes())).await.unwrap();
        let _ = send.write_all(&vec![0u8; 1 << 20]).await;
        match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
            Ok(iroh::endpoint::ConnectionError::ApplicationClosed(c)) => assert_eq!(c.error_code.into_inner(), 413),
            other => panic!("a 32 MiB first frame was not refused: {other:?}"),
        }
        // Hundreds of strangers connecting at once, each saying nothing: they take the
        // handshake slots (the rest are closed at once) and never reach the members' sessions.
        let mut eps = Vec::new();
        for _ in 0..STRANGERS {
            eps.push(stranger().await);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for ep in &eps {
            for _ in 0..CONNECTIONS_EACH {
                let (ep, addr) = (ep.clone(), addr_of(&ticket));
                tasks.spawn(async move {
                    let conn = ep.connect(addr, SYNC_ALPN).await.ok()?;
                    let (mut send, _recv) = conn.open_bi().await.ok()?;
                    send.write_all(&[0u8]).await.ok()?; // a frame header never finished
                    tokio::time::sleep(Duration::from_secs(8)).await;
                    Some(conn)
                });
            }
        }
        // Meanwhile a member's write reaches the other member.
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.put_bytes("/during.txt", b"written while strangers knock");
        let arrived = tokio::task::spawn_blocking({
            let friend_dir = friend.data().to_path_buf();
            move || {
                let t = std::time::Instant::now();
                while t.elapsed() < Duration::from_secs(10) {
                    let out = std::process::Command::new(env!("CARGO_BIN_EXE_alkfs")).arg("--data").arg(&friend_dir).args(["get", "/during.txt"]).output().unwrap();
                    if out.status.success() {
                        return Some(t.elapsed());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                None
            }
        })
        .await
        .unwrap();
        assert!(arrived.is_some(), "a member's write did not reach the other member while strangers knocked");
        while tasks.join_next().await.is_some() {}
        for ep in eps {
            ep.close().await;
        }
        ep.close().await;
    });
    assert!(started.elapsed() < Duration::from_secs(60));
    // The bounds were hit, counted, and logged once each (not once per stranger).
    let st = common::status_json(s.data()).expect("status");
    let hits = st["mesh"]["bounds_hit"].as_array().cloned().unwrap_or_default();
    let hit = |name: &str| hits.iter().find(|h| h["name"] == name).and_then(|h| h["hits"].as_u64()).unwrap_or(0);
    assert!(hit("HANDSHAKES_MAX") > 0, "{hits:?}");
    assert!(hit("CONNECTIONS_PER_SEC_MAX") > 0, "500 connections at once: most refused before their handshake: {hits:?}");
    assert_eq!(hit("HANDSHAKE_FRAME_BYTES_MAX"), 1, "{hits:?}");
    let log = node.log();
    assert_eq!(log.lines().filter(|l| l.contains("too many handshakes")).count(), 1, "logged once, with a count");
    assert!(s.ok(&["status"]).contains("HANDSHAKES_MAX"));
    let grown_mib = rss_kib(node.pid()).saturating_sub(rss_before) / 1024;
    assert!(grown_mib <= 64, "the node grew by {grown_mib} MiB under the strangers");
}

/// Bucket isolation: a member of one bucket names, in a version of its own, the hash of a
/// file only another bucket of the node holds. The version is applied (it is the member's to
/// write), but the node serves that hash only to members of buckets it came into by a write
/// here or a fetch from their members: the member gets no byte of it. The bucket's own file
/// is served to it (the check can pass).
#[test]
fn a_member_naming_a_hash_only_another_bucket_holds_gets_none_of_its_bytes() {
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    s.ok(&["bucket", "create", "private"]);
    let secret = vec![0x5e; 100_000];
    s.put_bytes_with(&["--bucket", "private"], "/diary.bin", &secret);
    s.put_bytes("/public.txt", b"for the members of default");
    let hash_of = |flags: &[&str], path: &str| {
        let mut args = flags.to_vec();
        args.extend(["ls", "--json", path]);
        ContentHash::from_hex(common::parse_json_array(&s.ok(&args))[0]["hash"].as_str().unwrap()).unwrap()
    };
    let (private, public) = (hash_of(&["--bucket", "private"], "/diary.bin"), hash_of(&[], "/public.txt"));
    let ticket = Ticket::decode(&s.ok(&["invite"])).unwrap();
    runtime().block_on(async {
        let ep = stranger().await;
        let me = NodeId(*ep.id().as_bytes());
        let signer = EntrySigner::new(&ep.secret_key().to_bytes());
        let (_conn, mut send, _recv, root) = join_as_member(&ep, &ticket).await;
        // A version of the member's own, in the shared bucket, naming the private hash.
        let c = Change {
            branch: root.uid,
            path: TreePath::parse("/named.bin").unwrap(),
            key: OrderKey::new(Stamp::at(common_now_ms()), &VersionId { node: me, seq: 1 }),
            pred: None,
            version: Version { entry: Some(Entry { kind: EntryKind::File, hash: private, size: secret.len() as u64, mode: 0o644, mtime_ms: 0 }), written: Stamp::at(common_now_ms()) },
            origin: Origin::Write,
            commit: None,
        };
        let key = replica::doc_key(&c.id());
        let mut d = ReplicaDoc::new(&me.0);
        d.put(&key, &signer.seal(&ticket.bucket, &key, &replica::encode(&c))).unwrap();
        let doc = replica::shard_of(&c.branch, &c.path);
        send.write_all(&Frame::Sync { bucket: ticket.bucket, doc, epoch: 0, msg: unasked_message(&mut d) }.encode()).await.unwrap();
        await_cond(Duration::from_secs(20), "the member's version to be applied", || s.run(&["ls", "/named.bin"]).status.success());
        // Asked for directly: the private bytes are refused; the bucket's own are served.
        let fetch = |hash: ContentHash| {
            let ep = ep.clone();
            let addr = addr_of(&ticket);
            async move {
                let store = iroh_blobs::store::mem::MemStore::new();
                let h = iroh_blobs::Hash::from_bytes(hash.0);
                let conn = ep.connect(addr, iroh_blobs::ALPN).await.ok()?;
                let ok = tokio::time::timeout(Duration::from_secs(10), store.remote().fetch(conn, h)).await.ok().map(|r| r.is_ok());
                Some((ok, store.blobs().has(h).await.unwrap_or(false)))
            }
        };
        let (ok, has) = fetch(private).await.unwrap_or((Some(false), false));
        assert_ne!(ok, Some(true), "a member of one bucket fetched another bucket's bytes");
        assert!(!has, "no byte of the other bucket's file arrived");
        assert_eq!(fetch(public).await, Some((Some(true), true)), "the bucket's own file is served to its member");
        ep.close().await;
    });
    let log = node.log();
    assert!(!log.contains("panicked"), "{log}");
}

fn common_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Cross-bucket gossip: a member of bucket `default` only, knowing bucket `private`'s id,
/// joins its gossip topic (iroh-gossip admits per node, and it is a member of something
/// here) and announces there, as itself and as a member of `private` it is not. The node
/// drops both (counted, logged once each) and tracks nothing for them, and `private`'s
/// honest member keeps converging.
#[test]
fn a_member_of_another_bucket_announcing_on_a_buckets_topic_is_dropped_and_counted() {
    use alknet_actors::proto::sync::{topic_of, Announcement};
    let s = Store::new();
    let node = Node::start(&s, &[], &[]);
    s.ok(&["bucket", "create", "private"]);
    s.put_bytes_with(&["--bucket", "private"], "/diary.txt", b"private");
    let private_ticket = s.ok(&["--bucket", "private", "invite"]);
    let private = Ticket::decode(private_ticket.trim()).unwrap().bucket;
    let friend = Store::new();
    let _friend_node = Node::start(&friend, &[], &[]);
    friend.ok(&["join", private_ticket.trim()]);
    await_cond(Duration::from_secs(30), "the honest member of private to get its file", || {
        friend.run(&["--bucket", "private", "get", "/diary.txt"]).status.success()
    });
    let friend_id = NodeId::from_hex(common::status_json(friend.data()).unwrap()["node_id"].as_str().unwrap()).unwrap();
    let ticket = Ticket::decode(&s.ok(&["invite"])).unwrap();
    let received = runtime().block_on(async {
        let ep = stranger().await;
        let me = NodeId(*ep.id().as_bytes());
        let signer = EntrySigner::new(&ep.secret_key().to_bytes());
        let (_conn, _send, _recv, _root) = join_as_member(&ep, &ticket).await;
        // Gossip dials by id: the node's address, as its ticket gives it.
        let lookup = iroh::address_lookup::MemoryLookup::new();
        lookup.add_endpoint_info(addr_of(&ticket));
        ep.address_lookup().unwrap().add(lookup);
        let gossip = iroh_gossip::net::Gossip::builder().spawn(ep.clone());
        let router = iroh::protocol::Router::builder(ep.clone()).accept(iroh_gossip::ALPN, gossip.clone()).spawn();
        let topic = iroh_gossip::TopicId::from_bytes(topic_of(&private));
        let node_id = iroh::EndpointId::from_bytes(&ticket.node.0).unwrap();
        // The node joins the topic on its next tick after the bucket is shared; a Join that
        // comes before is dropped by iroh-gossip, so the attacker asks again, as a node would.
        let mut sub = None;
        for _ in 0..6 {
            if let Ok(joined) = tokio::time::timeout(Duration::from_secs(5), gossip.subscribe_and_join(topic, vec![node_id])).await {
                sub = Some(joined.unwrap());
                break;
            }
        }
        let sub = sub.expect("the member of default joined private's topic within 30 s");
        let (sender, mut receiver) = sub.split();
        for (nonce, named) in [(1, me), (2, friend_id)] {
            let a = Announcement { nonce, node: named, docs: vec![(META_DOC, 1)] };
            sender.broadcast(a.seal(&private, &signer).into()).await.unwrap();
        }
        // What reaches it of private's announcements while the owner writes there.
        let mut received = 0;
        for i in 0..3 {
            s.put_bytes_with(&["--bucket", "private"], &format!("/later-{i}.txt"), b"later");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        use futures_lite::StreamExt;
        while let Ok(Some(Ok(event))) = tokio::time::timeout_at(deadline, receiver.next()).await {
            if let iroh_gossip::api::Event::Received(m) = event {
                let a = Announcement::open(&private, &m.content);
                assert!(a.is_ok(), "what arrives is a sealed announcement, nothing of the documents");
                received += 1;
            }
        }
        router.shutdown().await.unwrap();
        ep.close().await;
        received
    });
    let hit = |name: &str| {
        let st = common::status_json(s.data()).expect("status");
        st["mesh"]["bounds_hit"].as_array().cloned().unwrap_or_default().iter().find(|h| h["name"] == name).and_then(|h| h["hits"].as_u64()).unwrap_or(0)
    };
    await_cond(Duration::from_secs(20), "both announcements dropped and counted", || hit("GOSSIP_NOT_A_MEMBER") >= 1 && hit("GOSSIP_UNSEALED") >= 1);
    let log = node.log();
    assert_eq!(log.lines().filter(|l| l.contains("not a member of the bucket")).count(), 1, "logged once");
    assert!(!log.contains("panicked"), "{log}");
    // The honest member goes on.
    s.put_bytes_with(&["--bucket", "private"], "/after.txt", b"after");
    await_cond(Duration::from_secs(30), "the honest member to get the later write", || friend.run(&["--bucket", "private", "get", "/after.txt"]).status.success());
    eprintln!("announcements of private that reached the member of default: {received}");
}

/// An inviter that takes a joiner's first frame and then says nothing holds up that join
/// only: while `alkfs join` waits on it, the node's writes still reach its peer at once.
#[test]
fn a_stalling_inviter_holds_up_only_its_join() {
    let (s, _node, _ticket, _) = node_with_a_file();
    let (friend, _friend_node) = honest_member_of(&s);
    let rt = runtime();
    let (heard, stall) = std::sync::mpsc::channel::<()>();
    let ep = rt.block_on(common::peer::listening(&[SYNC_ALPN]));
    let ticket = Ticket { node: NodeId(*ep.id().as_bytes()), addrs: ep.bound_sockets(), relay: None, bucket: Uid::mint(&NodeId(*ep.id().as_bytes()), [5; 8]), secret: [9; 16] };
    let ep2 = ep.clone();
    rt.spawn(async move {
        let conn = ep2.accept().await.unwrap().await.unwrap();
        let (_send, mut recv) = conn.accept_bi().await.unwrap();
        if matches!(read_frame(&mut recv).await, Some(Frame::Join { .. })) {
            heard.send(()).unwrap();
        }
        // Silent from here on, the connection held open.
        tokio::time::sleep(Duration::from_secs(120)).await;
        drop(conn);
    });
    let join = common::KillOnDrop(s.cmd(&["join", &ticket.encode()]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap());
    stall.recv_timeout(Duration::from_secs(30)).expect("the join reached the stalling inviter");
    s.put_bytes("/during-the-join.txt", b"written while a join waits");
    let t = std::time::Instant::now();
    await_cond(Duration::from_secs(20), "the write to reach the peer during the join", || friend.run(&["get", "/during-the-join.txt"]).stdout == b"written while a join waits");
    assert!(t.elapsed() < Duration::from_secs(5), "the write took {:?} to reach the peer while a join waited", t.elapsed());
    drop(join);
    drop(rt);
}
