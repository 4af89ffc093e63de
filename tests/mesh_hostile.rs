//! A hostile peer, played by this test over a real iroh connection to a real node: a
//! stranger with a valid address is refused on the sync protocol and on blob requests before
//! any data moves; a member that sends oversized or garbage frames is dropped, and the node
//! goes on serving the others.

mod common;

use std::time::Duration;

use alknet_actors::proto::ids::Uid;
use alknet_actors::proto::sync::{Frame, SYNC_ALPN};
use alknet_actors::proto::ticket::Ticket;
use common::{await_cond, Node, Store};
use iroh::endpoint::presets;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A bare endpoint on loopback with a fresh identity: no relay, no discovery.
async fn stranger() -> iroh::Endpoint {
    iroh::Endpoint::builder(presets::Minimal)
        .relay_mode(iroh::RelayMode::Disabled)
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0")
        .unwrap()
        .portmapper_config(iroh::endpoint::PortmapperConfig::Disabled)
        .net_report_config(iroh::endpoint::NetReportConfig::minimal())
        .bind()
        .await
        .unwrap()
}

fn addr_of(ticket: &Ticket) -> iroh::EndpointAddr {
    let mut addr = iroh::EndpointAddr::new(iroh::EndpointId::from_bytes(&ticket.node.0).unwrap());
    for a in &ticket.addrs {
        addr = addr.with_ip_addr(*a);
    }
    addr
}

async fn read_frame(recv: &mut iroh::endpoint::RecvStream) -> Option<Frame> {
    let mut header = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut header)).await.ok()?.ok()?;
    let len = Frame::body_len(header).ok()?;
    let mut body = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut body)).await.ok()?.ok()?;
    Frame::decode(&body).ok()
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

#[test]
fn a_stranger_with_a_valid_address_is_refused_on_sync_and_on_blobs() {
    let (s, mut node, ticket, hash) = node_with_a_file();
    runtime().block_on(async {
        let ep = stranger().await;
        // Sync: a Hello naming the bucket (its id is no secret) gets a refusal, nothing else.
        let conn = ep.connect(addr_of(&ticket), SYNC_ALPN).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&Frame::Hello { buckets: vec![ticket.bucket], addrs: vec![] }.encode()).await.unwrap();
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
    let friend = Store::new();
    let _friend_node = Node::start(&friend, &[], &[]);
    friend.ok(&["join", s.ok(&["invite"]).trim()]);
    runtime().block_on(async {
        let ep = stranger().await;
        for attack in 0..3 {
            // Join for real (the ticket allows several uses), then misbehave.
            let conn = ep.connect(addr_of(&ticket), SYNC_ALPN).await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&Frame::Join { bucket: ticket.bucket, secret: ticket.secret, addrs: vec![] }.encode()).await.unwrap();
            assert!(matches!(read_frame(&mut recv).await, Some(Frame::Joined { .. })), "attack {attack}: join");
            send.write_all(&Frame::Hello { buckets: vec![ticket.bucket], addrs: vec![] }.encode()).await.unwrap();
            assert!(matches!(read_frame(&mut recv).await, Some(Frame::Welcome { .. })), "attack {attack}: welcome");
            let bad: Vec<u8> = match attack {
                0 => u32::MAX.to_be_bytes().to_vec(),                                                                   // an oversized frame
                1 => Frame::Sync { bucket: ticket.bucket, doc: 3, msg: b"\x42not automerge".to_vec() }.encode(),      // garbage sync
                _ => Frame::Sync { bucket: Uid([9; 16]), doc: 3, msg: vec![1, 2, 3] }.encode(),                      // a bucket not in the session
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
    let big = common::random_bytes(3 << 20, 9);
    let src = a.scratch().join("big");
    std::fs::write(&src, &big).unwrap();
    a.ok(&["put", src.to_str().unwrap(), "/big.bin"]);
    b.ok(&["join", a.ok(&["invite"]).trim()]);
    await_cond(Duration::from_secs(30), "the entry to reach B", || b.ok(&["ls", "-R", "/"]).contains("/big.bin"));
    // Listed, its bytes not here: `get` fetches them and waits.
    let out = b.run(&["get", "/big.bin"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == big, "the fetched bytes differ");
}

#[test]
fn a_member_that_stops_reading_stalls_only_its_own_session() {
    let (s, node, ticket, _) = node_with_a_file();
    let friend = Store::new();
    let _friend_node = Node::start(&friend, &[], &[]);
    friend.ok(&["join", s.ok(&["invite"]).trim()]);
    let rt = runtime();
    // The staller joins, says Hello, and then never reads a byte (its receive window fills).
    let (_ep, _conn, _streams) = rt.block_on(async {
        let ep = stranger().await;
        let conn = ep.connect(addr_of(&ticket), SYNC_ALPN).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&Frame::Join { bucket: ticket.bucket, secret: ticket.secret, addrs: vec![] }.encode()).await.unwrap();
        assert!(matches!(read_frame(&mut recv).await, Some(Frame::Joined { .. })));
        send.write_all(&Frame::Hello { buckets: vec![ticket.bucket], addrs: vec![] }.encode()).await.unwrap();
        assert!(matches!(read_frame(&mut recv).await, Some(Frame::Welcome { .. })));
        (ep, conn, (send, recv))
    });
    // Enough new history to fill the staller's window many times over.
    let src = s.scratch().join("many");
    std::fs::create_dir_all(&src).unwrap();
    // ~8,000 versions of ~250 bytes each in the documents: megabytes of sync messages, past
    // QUIC's stream window, so the node's writes to the staller block.
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
    assert!(!node.log().contains("panicked"));
}
