//! The supervisor: builds the node's actor tree and keeps it alive.
//!
//! **Restart policy** (one-for-one):
//! - a child that fails (a panic or an error in a handler), stops unexpectedly, or whose
//!   restart itself fails (an error in its `pre_start`) is restarted alone, after a backoff of `RESTART_BACKOFF_BASE × 2^(n-1)` for its n-th failure within the
//!   window, capped at [`RESTART_BACKOFF_MAX`];
//! - each child may fail at most `restart_budget` times within `restart_window` (config);
//!   one more failure **escalates**: the supervisor stops itself with an error, which ends the
//!   node (the daemon exits non-zero and says which child and why), because a child that keeps
//!   failing is not going to heal by itself and a node limping along hides it;
//! - restarts, the last failure and each child's state are kept for `alkfs status`.
//!
//! Callers never hold a child's `ActorRef` across a restart: they look the child up by its
//! registered name for each call ([`super::NodeHandle`]).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::blobs::BlobActor;
use super::gc::GcActor;
use super::outbox::OutboxActor;
use super::store::StoreActor;
use super::{Child, NodeContext};

/// First restart delay; doubles with each failure in the window.
pub const RESTART_BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Longest restart delay.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Messages of the supervisor.
pub enum SupervisorMsg {
    /// Start `Child` again (sent to itself after the backoff).
    Restart(Child),
    /// Each child's health.
    Health(RpcReplyPort<Vec<ChildHealth>>),
}

/// A child's health, for `status`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ChildHealth {
    /// The child's name.
    pub name: String,
    /// running, restarting or stopped.
    pub state: String,
    /// Restarts since the node started.
    pub restarts: u64,
    /// Its last failure, if any.
    pub last_failure: Option<String>,
}

/// The supervisor actor.
pub struct Supervisor;

struct ChildSlot {
    cell: Option<ActorCell>,
    recent: VecDeque<Instant>,
    restarts: u64,
    last_failure: Option<String>,
}

/// Its state.
pub struct SupervisorState {
    ctx: NodeContext,
    children: HashMap<Child, ChildSlot>,
}

async fn spawn_child(child: Child, ctx: &NodeContext, sup: ActorCell) -> Result<ActorCell, ActorProcessingErr> {
    ctx.faults.check_start(child)?;
    let name = Some(ctx.names.child(child));
    let cell = match child {
        Child::Store => Actor::spawn_linked(name, StoreActor, ctx.clone(), sup).await?.0.get_cell(),
        Child::Outbox => Actor::spawn_linked(name, OutboxActor, ctx.clone(), sup).await?.0.get_cell(),
        Child::Blobs => Actor::spawn_linked(name, BlobActor, ctx.clone(), sup).await?.0.get_cell(),
        Child::Gc => Actor::spawn_linked(name, GcActor, ctx.clone(), sup).await?.0.get_cell(),
        Child::Mesh => Actor::spawn_linked(name, super::mesh::MeshActor, ctx.clone(), sup).await?.0.get_cell(),
    };
    Ok(cell)
}

/// Records a failure of `child` and either schedules its restart after the backoff or, past
/// the budget, escalates (the error stops the supervisor, and with it the node).
fn failed(me: &ActorRef<SupervisorMsg>, state: &mut SupervisorState, child: Child, why: String) -> Result<(), ActorProcessingErr> {
    let slot = state.children.get_mut(&child).expect("every child has a slot");
    slot.cell = None;
    slot.last_failure = Some(why.clone());
    let now = Instant::now();
    let window = state.ctx.config.restart_window;
    while slot.recent.front().is_some_and(|t| now.duration_since(*t) > window) {
        slot.recent.pop_front();
    }
    slot.recent.push_back(now);
    let failures = slot.recent.len() as u32;
    if failures > state.ctx.config.restart_budget {
        tracing::error!(child = child.name(), failures, ?window, error = %why, "child keeps failing: escalating, the node stops");
        return Err(format!("{} failed {failures} times within {window:?} (last: {why}); the node stops", child.name()).into());
    }
    let backoff = RESTART_BACKOFF_BASE.saturating_mul(1 << (failures - 1).min(16)).min(RESTART_BACKOFF_MAX);
    tracing::warn!(child = child.name(), error = %why, ?backoff, "child failed; restarting");
    me.send_after(backoff, move || SupervisorMsg::Restart(child));
    Ok(())
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = NodeContext;

    async fn pre_start(&self, me: ActorRef<SupervisorMsg>, ctx: NodeContext) -> Result<SupervisorState, ActorProcessingErr> {
        let mut children = HashMap::new();
        // The store first: the others talk to it.
        for child in Child::ALL {
            let cell = spawn_child(child, &ctx, me.get_cell()).await?;
            children.insert(child, ChildSlot { cell: Some(cell), recent: VecDeque::new(), restarts: 0, last_failure: None });
        }
        Ok(SupervisorState { ctx, children })
    }

    async fn handle(&self, me: ActorRef<SupervisorMsg>, msg: SupervisorMsg, state: &mut SupervisorState) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart(child) => match spawn_child(child, &state.ctx, me.get_cell()).await {
                Ok(cell) => {
                    let slot = state.children.get_mut(&child).expect("every child has a slot");
                    slot.cell = Some(cell);
                    slot.restarts += 1;
                    tracing::info!(child = child.name(), restarts = slot.restarts, "child restarted");
                }
                // A restart that fails is one more failure of the child, under the same budget.
                Err(e) => failed(&me, state, child, format!("restart failed: {e}"))?,
            },
            SupervisorMsg::Health(reply) => {
                let mut out: Vec<ChildHealth> = Child::ALL
                    .iter()
                    .map(|c| {
                        let slot = &state.children[c];
                        let running = slot.cell.as_ref().is_some_and(|cell| cell.get_status() == ractor::ActorStatus::Running);
                        ChildHealth {
                            name: c.name().to_string(),
                            state: if running { "running" } else if slot.cell.is_none() { "restarting" } else { "stopped" }.into(),
                            restarts: slot.restarts,
                            last_failure: slot.last_failure.clone(),
                        }
                    })
                    .collect();
                out.sort_by(|a, b| a.name.cmp(&b.name));
                let _ = reply.send(out);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(&self, me: ActorRef<SupervisorMsg>, evt: SupervisionEvent, state: &mut SupervisorState) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, format!("stopped: {}", reason.unwrap_or_else(|| "no reason".into()))),
            _ => return Ok(()),
        };
        let Some(child) = state.children.iter().find(|(_, s)| s.cell.as_ref().is_some_and(|c| c.get_id() == cell.get_id())).map(|(c, _)| *c) else {
            return Ok(());
        };
        failed(&me, state, child, why)
    }

    async fn post_stop(&self, me: ActorRef<SupervisorMsg>, _state: &mut SupervisorState) -> Result<(), ActorProcessingErr> {
        // Stop children gracefully (the store drains its queue) instead of ractor's kill.
        me.stop_children_and_wait(Some("node shutting down".into()), Some(Duration::from_secs(30))).await;
        Ok(())
    }
}
