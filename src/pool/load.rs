//! A load's task: unload the victims its plan named, load through the backend (a panic is a
//! failure every waiter sees), report the outcome to the core and to every waiter, observe the
//! measured size outside the lock, and unload what the measurement pushed out.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;

use futures::FutureExt;
use tokio::sync::watch;

use super::{Core, Inner, LoadResult, take_handles};
use crate::backend::{BackendError, CancellationToken};
use crate::error::PoolError;
use crate::estimate::SizeEstimator;
use crate::policy::{EvictionPolicy, Slot};
use crate::state::Victims;

impl<P: EvictionPolicy, E: SizeEstimator> Inner<P, E> {
    /// Start a predictive preload if it is on and the core finds one (see
    /// [`crate::PoolState::predictive_preload`]); its outcome goes to whoever joins it.
    pub(super) fn try_preload(&self, core: &mut Core<P, E>, now: crate::types::Nanos) {
        let Some(horizon) = core.preload_horizon else { return };
        if let Some(slot) = core.state.predictive_preload(now, horizon) {
            tracing::info!(model = %core.state.spec(slot).id, "predictive preload");
            let cancel = CancellationToken::new();
            let (rx, task) = self.spawn_load(core, slot, Victims::new(), Some(cancel.clone()));
            drop(rx);
            core.preloads.insert(slot, (cancel, task));
        }
    }

    /// Under the lock: fire the cancellation of every predictive preload among `victims` that
    /// the core cancelled ([`crate::PoolState::is_cancelled_load`]) and return their tasks; each
    /// ends after its load has stopped (or ended and been unloaded) and its memory has been
    /// reported back with `reclaimed`.
    pub(super) fn cancel_preloads(
        &self,
        core: &mut Core<P, E>,
        victims: &[Slot],
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for &v in victims {
            if core.state.is_cancelled_load(v)
                && let Some((cancel, task)) = core.preloads.remove(&v)
            {
                tracing::info!(model = %core.state.spec(v).id, "predictive preload cancelled for a request's room");
                cancel.cancel();
                // Nobody waits on a cancelled preload; a later load of the model gets a new one.
                core.loads.remove(&v);
                tasks.push(task);
            }
        }
        tasks
    }

    /// Start the load task for an admitted plan. Victim handles are taken now (they have no
    /// leases); the task unloads them, then loads, then publishes the outcome.
    pub(super) fn start_load(
        &self,
        core: &mut Core<P, E>,
        slot: Slot,
        victims: Victims,
    ) -> watch::Receiver<LoadResult> {
        self.spawn_load(core, slot, victims, None).0
    }

    /// [`Inner::start_load`], returning the task too; a predictive preload passes the token
    /// that cancels it (see [`Inner::cancel_preloads`]). Victims that are cancelled preloads
    /// are waited for (their tasks report their memory back), the others unloaded here.
    fn spawn_load(
        &self,
        core: &mut Core<P, E>,
        slot: Slot,
        victims: Victims,
        cancel: Option<CancellationToken>,
    ) -> (watch::Receiver<LoadResult>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(None);
        core.loads.insert(slot, tx);
        let aborted = self.cancel_preloads(core, &victims);
        let victims = take_handles(core, &victims);
        let spec = core.state.spec(slot).clone();
        let inner = self.self_arc();
        tracing::info!(model = %spec.id, victims = victims.len() + aborted.len(), reserve = core.state.need(slot), "load admitted");
        let task = self.runtime.spawn(async move {
            for task in aborted {
                // A JoinError is a panic already turned into a reclaim, or the runtime ending.
                let _ = task.await;
            }
            inner.unload_all(victims).await;
            // A backend that panics must not leave the model loading forever with its
            // reservation held: the panic becomes a load failure every waiter sees.
            let token = cancel.clone().unwrap_or_default();
            let result = AssertUnwindSafe(inner.backend.load_cancellable(&spec, token))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(BackendError::Load("the backend panicked while loading".into())));
            let now = inner.now();
            let measured = result.as_ref().ok().map(|h| h.measured_bytes());
            let (evicted, outcome) = {
                let mut core = inner.lock();
                if let Some(cancel) = &cancel {
                    // Cancelled under the lock by a plan that took this preload's room: the core
                    // holds its memory as draining. Free what the load made, then report it.
                    if cancel.is_cancelled() {
                        drop(core);
                        if let Ok(handle) = result
                            && let Err(e) = super::guarded_unload(&handle).await
                        {
                            tracing::warn!(model = %spec.id, error = %e, "unload of a cancelled preload failed");
                        }
                        inner.reclaim(slot);
                        return;
                    }
                    core.preloads.remove(&slot);
                }
                let (done, outcome) = match result {
                    Ok(handle) => {
                        if let Some(kv) = handle.kv_bytes_per_token() {
                            core.state.set_kv_bytes_per_token(slot, kv);
                        }
                        let done = core.state.load_finished(slot, now, Ok(handle.measured_bytes()));
                        core.handles[slot as usize] = Some(handle);
                        (done, Ok(()))
                    }
                    Err(e) => {
                        let done = core.state.load_finished(slot, now, Err(&e.to_string()));
                        (done, Err(PoolError::LoadFailed { model: spec.id.clone(), source: e }))
                    }
                };
                let mut evicted = take_handles(&mut core, &done.evicted);
                if outcome.is_ok() && inner.shutting_down.load(Ordering::SeqCst) {
                    // Shutdown evicted everything resident before this load landed: evict it
                    // too (its waiters' leases drain it; an idle one is unloaded below).
                    let idle = core.state.evict_all(now, true);
                    evicted.extend(take_handles(&mut core, &idle));
                }
                if let Some(tx) = core.loads.remove(&slot) {
                    tx.send_replace(Some(outcome.clone()));
                }
                inner.deliver_wakes(&mut core);
                (evicted, outcome)
            };
            inner.lease_ended.notify_waiters();
            if let Some(measured) = measured {
                // After the lock: a learning estimator may persist the measurement to a file.
                let (estimator, spec) = (inner.estimator.clone(), spec.clone());
                let _ = tokio::task::spawn_blocking(move || estimator.observe(&spec, measured)).await;
            }
            match &outcome {
                Ok(()) => tracing::info!(model = %spec.id, "model loaded"),
                Err(e) => tracing::warn!(model = %spec.id, error = %e, "model load failed"),
            }
            inner.unload_all(evicted).await;
        });
        (rx, task)
    }
}
