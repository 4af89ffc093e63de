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
use alknet_actors::node::{self, NodeContext};
use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::control::server::{self, ServerCtx};
use crate::control::SOCKET_FILE;

/// The node's secret key file inside the data dir.
pub const NODE_KEY_FILE: &str = "node.key";

/// The node's id: the public half of the key in `DATA/node.key`, created on first use.
///
/// The key is the node's identity (its iroh endpoint in the mesh), so it is created with mode
/// 0600 from its first byte, written in full and fsynced under a temporary name, then renamed
/// into place and the directory fsynced: no moment where another user could read it, and no
/// power loss that leaves half a key.
pub fn node_id(dir: &Path) -> Result<String> {
    let path = dir.join(NODE_KEY_FILE);
    let key = match std::fs::read(&path) {
        Ok(bytes) => {
            let bytes: [u8; 32] = bytes.try_into().map_err(|_| anyhow::anyhow!("{} is damaged (not 32 bytes): remove it to make a new node id", path.display()))?;
            iroh::SecretKey::from_bytes(&bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = iroh::SecretKey::generate();
            write_secret(dir, &path, &key.to_bytes())?;
            key
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(key.public().to_string())
}

/// Writes `bytes` to `path` (in `dir`) readable by the owner alone from the start, durably.
fn write_secret(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{NODE_KEY_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp); // a leftover of an interrupted first start
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    // The umask may only take bits away; make sure of exactly 0600 all the same.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes).and_then(|_| file.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("moving {} into place", tmp.display()))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync {}", dir.display()))?;
    Ok(())
}

/// Runs the node until a signal or an escalation; returns the exit code.
pub fn run(dir: &Path, config: &Config) -> Result<i32> {
    Engine::check_initialised(dir)?;
    let lock = Arc::new(DirLock::take(dir)?);
    let content = ContentStore::open(&dir.join("content"))?;
    Engine::clear_staging(&content)?;
    let node_id = node_id(dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("alkfs-node").build()?;
    rt.block_on(async move {
        // Before anything can see the node (its socket): a SIGTERM from then on stops it cleanly.
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let index = Arc::new(BlobIndex::open(dir).await?);
        let ctx = NodeContext::new(dir, lock, content.clone(), index.clone(), config.node_config());
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
        };
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
        let escalated = reason == "escalation";
        if !escalated {
            node::stop(&sup).await;
            let _ = sup_done.await;
        }
        index.shutdown().await?;
        let _ = std::fs::remove_file(&socket);
        if escalated {
            eprintln!("alkfs: error: an actor kept failing and the node stopped; see the log above, then restart with `alkfs node run`");
            return Ok(1);
        }
        tracing::info!("node stopped cleanly");
        Ok(0)
    })
}
