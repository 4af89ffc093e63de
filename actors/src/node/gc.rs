//! The GC actor: runs collections on a schedule and on demand, and remembers the last one.
//! The collection itself runs in the store's writer thread (it must not interleave with
//! commits); this actor owns the schedule, the policy and the record.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::blobs::BlobMsg;
use super::store::{StoreMsg, WriteOp, WriteOutcome};
use super::{Child, Names, NodeContext};
use crate::engine::now_ms;
use crate::gc::{GcReport, Retention};

/// How long one collection may take before the caller stops waiting.
pub const GC_CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Messages of the GC actor.
pub enum GcMsg {
    /// Collect now with the configured policy, or the one `gc` flags make of it
    /// ([`Retention::with_flags`]: keep_versions, keep_days).
    Run((Option<u32>, Option<u32>), RpcReplyPort<Result<GcReport, String>>),
    /// The schedule's tick.
    Tick,
    /// When the last collection ran and what it did.
    Last(RpcReplyPort<Option<(i64, GcReport)>>),
    /// Fault injection (tests only): panic in the handler.
    Panic,
}

/// The GC actor.
pub struct GcActor;

/// Its state.
pub struct GcState {
    policy: Retention,
    last: Option<(i64, GcReport)>,
    names: Names,
}

impl Actor for GcActor {
    type Msg = GcMsg;
    type State = GcState;
    type Arguments = NodeContext;

    async fn pre_start(&self, me: ActorRef<GcMsg>, ctx: NodeContext) -> Result<GcState, ActorProcessingErr> {
        if !ctx.config.gc_interval.is_zero() {
            me.send_interval(ctx.config.gc_interval, || GcMsg::Tick);
        }
        Ok(GcState { policy: ctx.config.retention, last: None, names: ctx.names.clone() })
    }

    async fn handle(&self, _me: ActorRef<GcMsg>, msg: GcMsg, state: &mut GcState) -> Result<(), ActorProcessingErr> {
        match msg {
            GcMsg::Run((keep_versions, keep_days), reply) => {
                let result = collect(&state.names, state.policy.with_flags(keep_versions, keep_days)).await;
                if let Ok(report) = &result {
                    state.last = Some((now_ms(), report.clone()));
                }
                let _ = reply.send(result);
            }
            GcMsg::Tick => match collect(&state.names, state.policy).await {
                Ok(report) => state.last = Some((now_ms(), report)),
                Err(e) => tracing::warn!(error = %e, "scheduled gc failed; the next tick retries"),
            },
            GcMsg::Last(reply) => {
                let _ = reply.send(state.last.clone());
            }
            GcMsg::Panic => panic!("fault injection: gc actor"),
        }
        Ok(())
    }
}

async fn collect(names: &Names, policy: Retention) -> Result<GcReport, String> {
    let report = collect_in_store(names, policy).await?;
    if report.blobs_freed > 0 {
        if let Some(blobs) = names.find::<BlobMsg>(Child::Blobs) {
            let _ = blobs.cast(BlobMsg::Reconcile);
        }
    }
    Ok(report)
}

async fn collect_in_store(names: &Names, policy: Retention) -> Result<GcReport, String> {
    let store = names.find::<StoreMsg>(Child::Store).ok_or("the store is restarting; retry")?;
    let outcome = store
        .call(|reply| StoreMsg::Write(WriteOp::Gc { policy }, reply), Some(GC_CALL_TIMEOUT))
        .await
        .map_err(|e| e.to_string())?;
    match outcome {
        ractor::rpc::CallResult::Success(Ok(WriteOutcome::Gc(report))) => Ok(report),
        ractor::rpc::CallResult::Success(Ok(_)) => Err("unexpected reply from the store".into()),
        ractor::rpc::CallResult::Success(Err(e)) => Err(e),
        ractor::rpc::CallResult::Timeout => Err("gc timed out".into()),
        ractor::rpc::CallResult::SenderError => Err("the store restarted during gc; retry".into()),
    }
}
