//! A load's task: unload the victims its plan named, load through the backend (a panic is a
//! failure every waiter sees), report the outcome to the core and to every waiter, observe the
//! measured size outside the lock, and unload what the measurement pushed out.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;

use futures::FutureExt;
use tokio::sync::watch;

use super::{Core, Inner, LoadResult, take_handles};
use crate::backend::BackendError;
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
            drop(self.start_load(core, slot, Victims::new()));
        }
    }

    /// Start the load task for an admitted plan. Victim handles are taken now (they have no
    /// leases); the task unloads them, then loads, then publishes the outcome.
    pub(super) fn start_load(
        &self,
        core: &mut Core<P, E>,
        slot: Slot,
        victims: Victims,
    ) -> watch::Receiver<LoadResult> {
        let (tx, rx) = watch::channel(None);
        core.loads.insert(slot, tx);
        let victims = take_handles(core, &victims);
        let spec = core.state.spec(slot).clone();
        let inner = self.self_arc();
        tracing::info!(model = %spec.id, victims = victims.len(), reserve = core.state.need(slot), "load admitted");
        self.runtime.spawn(async move {
            inner.unload_all(victims).await;
            // A backend that panics must not leave the model loading forever with its
            // reservation held: the panic becomes a load failure every waiter sees.
            let result = AssertUnwindSafe(inner.backend.load(&spec))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(BackendError::Load("the backend panicked while loading".into())));
            let now = inner.now();
            let measured = result.as_ref().ok().map(|h| h.measured_bytes());
            let (evicted, outcome) = {
                let mut core = inner.lock();
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
        rx
    }
}
