//! The async side of the core's admission queue: handing each queued request its turn (or
//! its refusal), keeping the queue's clock while requests wait, and giving back what a turn
//! granted a request that has gone away.

use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::{Core, Inner, LoadResult, ModelPool};
use crate::backend::BackendError;
use crate::error::PoolError;
use crate::estimate::SizeEstimator;
use crate::policy::{EvictionPolicy, Slot};
use crate::state::{Admission, Ticket, Wake};

/// What a queued request's turn brought it.
pub(super) enum Woken {
    /// The core granted it a lease on the resident model.
    Leased,
    /// It waits for a load (one it joined, or one its turn started).
    Wait(watch::Receiver<LoadResult>),
}

impl<P: EvictionPolicy, E: SizeEstimator> Inner<P, E> {
    /// Carry out the admissions the core decided for queued requests (after any state call
    /// that can free capacity), and hand each to its waiting request. Under the lock.
    pub(super) fn deliver_wakes(&self, core: &mut Core<P, E>) {
        self.start_unloads(core);
        while core.state.has_wakes() {
            let wakes: Vec<Wake> = core.state.take_wakes().collect();
            for w in wakes {
                let woken = match w.outcome {
                    Admission::Hit => Ok(Woken::Leased),
                    Admission::Join => Ok(Woken::Wait(core.loads[&w.slot].subscribe())),
                    Admission::Load(plan) => Ok(Woken::Wait(self.start_load(core, w.slot, plan.victims))),
                    Admission::Reject(r) => {
                        let id = core.state.spec(w.slot).id.clone();
                        Err(r.into_error(id, core.state.config().max_models))
                    }
                    Admission::Queued(_) | Admission::AwaitUnload => unreachable!("a wake is decided"),
                };
                let Some(tx) = core.queued.remove(&w.ticket) else { continue };
                if let Err(unclaimed) = tx.send(woken) {
                    // Its request went away between the decision and now: give back what the
                    // decision set aside for it (a lease, or its place among a load's waiters).
                    self.undo_wake(core, w.slot, w.kv, unclaimed);
                }
            }
            self.start_unloads(core);
        }
    }

    /// Unload, in tasks of their own, the idle models the core evicted by itself (room for a
    /// request's KV cache). Under the lock.
    pub(super) fn start_unloads(&self, core: &mut Core<P, E>) {
        if !core.state.has_unloads() {
            return;
        }
        let victims = core.state.take_unloads();
        // A cancelled preload's own task reports its memory back; nobody needs to wait for it.
        drop(self.cancel_preloads(core, &victims));
        for (slot, handle) in super::take_handles(core, &victims) {
            let inner = self.self_arc();
            self.runtime.spawn(async move { inner.unload_handle(slot, handle).await });
        }
    }

    /// Give back what a wake granted a request that is gone. Under the lock.
    pub(super) fn undo_wake(
        &self,
        core: &mut Core<P, E>,
        slot: Slot,
        kv: u64,
        woken: Result<Woken, PoolError>,
    ) {
        let now = self.now();
        match woken {
            Ok(Woken::Leased) => {
                if core.state.release_unused(slot, now, kv)
                    && let Some(handle) = core.handles[slot as usize].take()
                {
                    let inner = self.self_arc();
                    self.runtime.spawn(async move { inner.unload_handle(slot, handle).await });
                }
            }
            Ok(Woken::Wait(rx)) => match rx.borrow().clone() {
                None => core.state.cancel_wait(slot, kv),
                Some(Ok(())) => {
                    if core.state.release_unused(slot, now, kv)
                        && let Some(handle) = core.handles[slot as usize].take()
                    {
                        let inner = self.self_arc();
                        self.runtime.spawn(async move { inner.unload_handle(slot, handle).await });
                    }
                }
                Some(Err(_)) => {}
            },
            Err(_) => {}
        }
    }
}

/// The next step of an acquire that cannot be served at once.
pub(super) enum Step<F> {
    /// Wait for the model's own unload, then admit again.
    Unload(F),
    /// Wait in the core's admission queue under this ticket.
    Queue(Ticket, oneshot::Receiver<Result<Woken, PoolError>>),
}

/// A request waiting in the core's admission queue. While it waits it also keeps the queue's
/// clock: at the queue's next deadline it asks the core to re-examine the queue (timeouts, a
/// starving head). Dropped before its turn came, it leaves the queue; dropped after, it gives
/// back what its turn granted.
pub(super) struct QueueGuard<'a, P: EvictionPolicy, E: SizeEstimator> {
    pub(super) pool: &'a ModelPool<P, E>,
    pub(super) ticket: Ticket,
    pub(super) slot: Slot,
    /// The KV bytes the request asked for.
    pub(super) kv: u64,
    /// `None` once the wake has been taken.
    pub(super) rx: Option<oneshot::Receiver<Result<Woken, PoolError>>>,
}

impl<P: EvictionPolicy, E: SizeEstimator> QueueGuard<'_, P, E> {
    pub(super) async fn wait(&mut self) -> Result<Woken, PoolError> {
        let inner = &self.pool.inner;
        loop {
            let deadline = {
                let core = inner.lock();
                core.state.next_queue_deadline(inner.now())
            };
            let at = deadline.map_or(Instant::now() + Duration::from_secs(3600), |ns| {
                inner.epoch + Duration::from_nanos(ns)
            });
            let rx = self.rx.as_mut().expect("waiting until the wake is taken");
            tokio::select! {
                woken = rx => {
                    self.rx = None;
                    return woken.unwrap_or(Err(PoolError::Backend(BackendError::Gone)));
                }
                _ = tokio::time::sleep_until(at) => {
                    let mut core = inner.lock();
                    core.state.queue_tick(inner.now());
                    inner.deliver_wakes(&mut core);
                }
            }
        }
    }
}

impl<P: EvictionPolicy, E: SizeEstimator> Drop for QueueGuard<'_, P, E> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let inner = &self.pool.inner;
        let mut core = inner.lock();
        // Wakes are sent under the lock, so under it the receiver's state is final.
        match rx.try_recv() {
            Ok(woken) => inner.undo_wake(&mut core, self.slot, self.kv, woken),
            Err(_) => {
                core.queued.remove(&self.ticket);
                core.state.cancel_queued(self.ticket, inner.now());
                inner.deliver_wakes(&mut core);
            }
        }
        drop(core);
        inner.lease_ended.notify_waiters();
    }
}
