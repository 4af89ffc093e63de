//! A peer played by a test or a bench over a real iroh connection: a bare endpoint on
//! loopback, a node's address from its ticket, one sync frame read. Shared by the hostile
//! tests and the attack bench (`#[path]`-included there).

#![allow(dead_code)]

use std::time::Duration;

use alknet_actors::proto::sync::Frame;
use alknet_actors::proto::ticket::Ticket;

/// A bare endpoint on loopback with a fresh identity: no relay, no discovery.
pub async fn endpoint() -> iroh::Endpoint {
    endpoint_with(iroh::endpoint::QuicTransportConfig::builder().build()).await
}

/// A bare endpoint with the given QUIC transport settings.
pub async fn endpoint_with(transport: iroh::endpoint::QuicTransportConfig) -> iroh::Endpoint {
    builder(transport).bind().await.unwrap()
}

/// A bare endpoint that accepts connections for `alpns`.
pub async fn listening(alpns: &[&[u8]]) -> iroh::Endpoint {
    builder(iroh::endpoint::QuicTransportConfig::builder().build()).alpns(alpns.iter().map(|a| a.to_vec()).collect()).bind().await.unwrap()
}

fn builder(transport: iroh::endpoint::QuicTransportConfig) -> iroh::endpoint::Builder {
    iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
        .transport_config(transport)
        .relay_mode(iroh::RelayMode::Disabled)
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0")
        .unwrap()
        .portmapper_config(iroh::endpoint::PortmapperConfig::Disabled)
        .net_report_config(iroh::endpoint::NetReportConfig::minimal())
}

/// The address of the node that made `ticket`.
pub fn addr_of(ticket: &Ticket) -> iroh::EndpointAddr {
    let mut addr = iroh::EndpointAddr::new(iroh::EndpointId::from_bytes(&ticket.node.0).unwrap());
    for a in &ticket.addrs {
        addr = addr.with_ip_addr(*a);
    }
    addr
}

/// The next sync frame, or `None` when the stream ends, fails or is silent for 10 s.
pub async fn read_frame(recv: &mut iroh::endpoint::RecvStream) -> Option<Frame> {
    let mut header = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut header)).await.ok()?.ok()?;
    let len = Frame::body_len(header).ok()?;
    let mut body = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut body)).await.ok()?.ok()?;
    Frame::decode(&body).ok()
}
