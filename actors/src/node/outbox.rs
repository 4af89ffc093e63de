//! The outbox watcher actor: reads committed events from its persisted cursor and fans them
//! out to the actors that act on them (today the blob actor, which indexes new blobs; the
//! sync sessions of the mesh subscribe here next).
//!
//! It wakes in two ways: the store casts [`OutboxMsg::Wake`] right after each commit
//! (in-process, immediate), and honker's update watcher, polling `PRAGMA data_version` at
//! `outbox_poll` (default 1 s: a fallback for commits made by other connections, cheap when
//! idle), does the same through a bridging thread. A wake means "re-read", never "one event".
//! The cursor advances only after a batch was handed on: at-least-once, nothing skipped.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::blobs::BlobMsg;
use super::{Child, Names, NodeContext};
use crate::store::{outbox, TreeStore, TREE_DB_FILE};

/// The consumer name of the node's cursor in the honker stream.
pub const CONSUMER: &str = "node";
/// Wakes closer together than this are handled together: under load the watcher reads (and
/// saves its cursor) at most this often instead of after every commit, leaving the disk and
/// the cores to the writes themselves.
pub const COALESCE: std::time::Duration = std::time::Duration::from_millis(50);

/// Messages of the outbox watcher.
pub enum OutboxMsg {
    /// Something may have committed: read what is new.
    Wake,
    /// Record that the node's consumer is alive even when there is nothing to read, so it
    /// never expires while the node runs.
    Touch,
    /// The cursor and the newest event offset.
    Stats(RpcReplyPort<(i64, i64)>),
    /// Fault injection (tests only): panic in the handler.
    Panic,
}

/// The outbox watcher.
pub struct OutboxActor;

/// Its state: a read connection, the watcher thread's handle, events handed on.
pub struct OutboxState {
    tree: TreeStore,
    watcher: std::sync::Arc<honker_core::SharedUpdateWatcher>,
    handed_on: u64,
    gate: super::Coalesce,
    names: Names,
}

/// How often the node's consumer says it is alive while idle (well inside any retention).
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(3600);

impl Actor for OutboxActor {
    type Msg = OutboxMsg;
    type State = OutboxState;
    type Arguments = NodeContext;

    async fn pre_start(&self, me: ActorRef<OutboxMsg>, ctx: NodeContext) -> Result<OutboxState, ActorProcessingErr> {
        let db = ctx.dir.join(TREE_DB_FILE);
        let tree = TreeStore::open(&db, false)?;
        let config = honker_core::WatcherConfig::default().with_poll_interval(ctx.config.outbox_poll)?;
        let watcher = std::sync::Arc::new(honker_core::SharedUpdateWatcher::new_with_config(db, config));
        let (_id, rx) = watcher.subscribe();
        let wake = me.clone();
        std::thread::Builder::new().name("alkfs-outbox-wake".into()).spawn(move || {
            // Ends when the watcher is closed (post_stop) or the actor is gone.
            while rx.recv().is_ok() {
                if wake.cast(OutboxMsg::Wake).is_err() {
                    break;
                }
            }
        })?;
        me.cast(OutboxMsg::Wake)?; // catch up on what committed while we were down
        me.cast(OutboxMsg::Touch)?;
        me.send_interval(TOUCH_INTERVAL, || OutboxMsg::Touch);
        Ok(OutboxState { tree, watcher, handed_on: 0, gate: Default::default(), names: ctx.names.clone() })
    }

    async fn handle(&self, me: ActorRef<OutboxMsg>, msg: OutboxMsg, state: &mut OutboxState) -> Result<(), ActorProcessingErr> {
        match msg {
            OutboxMsg::Wake => {
                match state.gate.admit(COALESCE) {
                    super::Admit::Now => {}
                    super::Admit::Later(wait) => {
                        me.send_after(wait, || OutboxMsg::Wake);
                        return Ok(());
                    }
                    super::Admit::Scheduled => return Ok(()),
                }
                let conn = state.tree.conn();
                let mut cursor = outbox::cursor(conn, CONSUMER)?;
                loop {
                    let batch = outbox::read_after(conn, cursor, outbox::READ_BATCH_EVENTS_MAX)?;
                    let Some(&(last, _)) = batch.last() else { break };
                    let new_blobs = batch.iter().any(|(_, e)| matches!(e.op.as_str(), "write" | "merge" | "restore" | "rename"));
                    if new_blobs {
                        if let Some(blobs) = state.names.find::<BlobMsg>(Child::Blobs) {
                            let _ = blobs.cast(BlobMsg::Scan);
                        }
                    }
                    if let Some(mesh) = state.names.find::<super::mesh::MeshMsg>(Child::Mesh) {
                        let _ = mesh.cast(super::mesh::MeshMsg::Wake);
                    }
                    state.handed_on += batch.len() as u64;
                    outbox::save_cursor(conn, CONSUMER, last, crate::engine::now_ms())?;
                    cursor = last;
                }
            }
            OutboxMsg::Touch => outbox::touch(state.tree.conn(), CONSUMER, crate::engine::now_ms())?,
            OutboxMsg::Stats(reply) => {
                let conn = state.tree.conn();
                let _ = reply.send((outbox::cursor(conn, CONSUMER)?, outbox::head(conn)?));
            }
            OutboxMsg::Panic => panic!("fault injection: outbox actor"),
        }
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<OutboxMsg>, state: &mut OutboxState) -> Result<(), ActorProcessingErr> {
        // close() joins the poll thread, which may be asleep for a whole poll interval: let it
        // finish on its own rather than hold up the node's shutdown.
        let watcher = state.watcher.clone();
        tokio::task::spawn_blocking(move || watcher.close());
        Ok(())
    }
}

/// How long the node waits between honker polls by default.
pub const OUTBOX_POLL_DEFAULT: Duration = Duration::from_secs(1);
