//! `alkfs node run`: the node in the foreground.
//!
//! Start-up (the CLI has created the store if the data dir had none): take the data dir's lock (a second node, or any writing CLI, is refused with a
//! message naming the holder), clear staging left by a crash, open the iroh-blobs index,
//! start the supervision tree, then listen on `DATA/alkfs.sock` (owner-only). Shutdown on
//! SIGINT or SIGTERM: stop accepting, let requests in flight finish, stop the actors (the
//! store drains its queue and closes SQLite), close the index, remove the socket, exit 0. If
//! a child exhausts its restart budget the node stops the same way and exits 1.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use alknet_actors::content::ContentStore;
use alknet_actors::engine::{DirLock, Engine};
use alknet_actors::index::BlobIndex;
use alknet_actors::node::{self, mesh, NodeContext};
use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::control::server::{self, ServerCtx};
use crate::control::SOCKET_FILE;

/// Runs the node until a signal or an escalation; returns the exit code.
pub fn run(dir: &Path, config: &Config) -> Result<i32> {
    Engine::check_initialised(dir)?;
    let lock = Arc::new(DirLock::take(dir)?);
    let content = ContentStore::open(&dir.join("content"))?;
    Engine::clear_staging(&content)?;
    let key = alknet_actors::identity::load_or_create(dir)?;
    let node_id = alknet_actors::identity::node_id(&key).to_hex();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("alkfs-node").build()?;
    rt.block_on(async move {
        // Before anything can see the node (its socket): a SIGTERM from then on stops it cleanly.
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let index = Arc::new(BlobIndex::open(dir).await?);
        let mut ctx = NodeContext::new(dir, lock, content.clone(), index.clone(), config.node_config());
        // The network: the node's key is its endpoint's identity; peers reach it on the sync
        // protocol and on iroh-blobs (both gated by membership).
        let net = mesh::bind(key.clone(), &config.net_config()?).await.map_err(anyhow::Error::msg)?;
        net.gate.attach(dir).map_err(anyhow::Error::msg)?;
        let router = iroh::protocol::Router::builder(net.endpoint.clone())
            .incoming_filter(net.gate.incoming_filter(net.endpoint.clone()))
            .accept(alknet_actors::proto::sync::SYNC_ALPN, mesh::SyncHandler { names: ctx.names.clone(), instance: net.instance, gate: net.gate.clone() })
            // After the current one: a peer offering both gets the first registered.
            .accept(alknet_actors::proto::sync::OLDER_SYNC_ALPNS[0], mesh::OlderProtocol)
            .accept(alknet_actors::proto::sync::OLDER_SYNC_ALPNS[1], mesh::OlderProtocol)
            .accept(iroh_blobs::ALPN, mesh::gated_blobs(&index, &content, &net.gate))
            .accept(iroh_gossip::ALPN, mesh::GatedGossip { gossip: net.gossip.clone(), gate: net.gate.clone() })
            .spawn();
        tracing::info!(listen = ?net.addrs(), "listening for peers");
        ctx.net = Some(net);
        let node::Started { supervisor: sup, done: mut sup_done, handle } = node::start(ctx).await?;
        let socket = dir.join(SOCKET_FILE);
        // We hold the lock: any socket file here is a leftover of a node that died.
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).with_context(|| format!("listening on {}", socket.display()))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        tracing::info!(%node_id, dir = %dir.display(), socket = %socket.display(), "node running");
        let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
        let server_ctx = ServerCtx {
            dir: dir.to_path_buf(),
            content,
            node: handle,
            node_id,
            started: Instant::now(),
            fault_injection: std::env::var_os("ALKFS_FAULT_INJECTION").is_some_and(|v| v == "1"),
            stopping: stopping_rx,
            client_timeout: std::time::Duration::from_secs(config.node.client_timeout_secs),
            retention: config.retention(),
            acked_failures: Default::default(),
            reader: Default::default(),
        };
        // What mounts that ended had acknowledged and not committed (their journals).
        let adopter = tokio::spawn(crate::control::adopt::run(server_ctx.clone()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<&'static str>();
        let server = tokio::spawn(server::serve(listener, server_ctx, async move {
            let _ = stop_rx.await;
        }));
        let reason = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
            _ = &mut sup_done => "escalation",
        };
        tracing::info!(reason, "node stopping");
        let _ = stopping_tx.send(true);
        let _ = stop_tx.send(reason);
        let _ = server.await;
        let _ = adopter.await;
        let escalated = reason == "escalation";
        if !escalated {
            node::stop(&sup).await;
            let _ = sup_done.await;
        }
        // The router closes the endpoint (peers see a clean close) and the blob store.
        let _ = router.shutdown().await;
        let _ = index.shutdown().await;
        let _ = std::fs::remove_file(&socket);
        if escalated {
            eprintln!("alkfs: error: an actor kept failing and the node stopped; see the log above, then restart with `alkfs node run`");
            return Ok(1);
        }
        tracing::info!("node stopped cleanly");
        Ok(0)
    })
}
