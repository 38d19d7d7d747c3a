//! Leases (a request's right to use a loaded model) and the guard of a request waiting for a
//! load: together they make every way a request can end, including being dropped, give back
//! exactly what the pool set aside for it.

use std::sync::Arc;

use tokio::sync::watch;

use super::{LoadResult, ModelPool};
use crate::backend::{BackendError, ModelHandle};
use crate::error::PoolError;
use crate::estimate::SizeEstimator;
use crate::policy::{EvictionPolicy, Slot};
use crate::types::{ModelId, ModelType, Nanos};

/// Ends leases; implemented by the pool so that [`Lease`] needs no type parameters.
pub(super) trait LeaseOwner: Send + Sync {
    fn release(&self, slot: Slot, acquired_at: Nanos, kv: u64);
}

/// How a request got its lease: what `x-modelpool-admission` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// The model was resident.
    Hit,
    /// It joined a load another request started.
    Join,
    /// Its own request started the load.
    Load,
    /// It waited in the admission queue first (then hit, joined or loaded).
    Queued,
}

impl Admitted {
    /// `self`, unless it is `Hit` (a request that waited in the queue stays `Queued`).
    pub(super) fn or(self, then: Admitted) -> Admitted {
        if self == Admitted::Hit { then } else { self }
    }

    /// The header value: `hit`, `join`, `load` or `queued`.
    pub fn as_str(self) -> &'static str {
        match self {
            Admitted::Hit => "hit",
            Admitted::Join => "join",
            Admitted::Load => "load",
            Admitted::Queued => "queued",
        }
    }
}

/// A right to use a loaded model. While any lease on a model lives, the model is not unloaded;
/// dropping the lease ends the request (the model becomes evictable when no lease remains).
pub struct Lease {
    pub(super) admitted: Admitted,
    pub(super) waited: std::time::Duration,
    pub(super) slot: Slot,
    pub(super) model: ModelId,
    pub(super) model_type: ModelType,
    pub(super) handle: Arc<dyn ModelHandle>,
    pub(super) acquired_at: Nanos,
    /// KV bytes this request holds in the ledger (given back when the lease ends).
    pub(super) kv: u64,
    pub(super) owner: Arc<dyn LeaseOwner>,
}

impl Lease {
    /// The model's id.
    pub fn model(&self) -> &ModelId {
        &self.model
    }
    /// The model's type.
    pub fn model_type(&self) -> ModelType {
        self.model_type
    }
    /// How this request was admitted.
    pub fn admitted(&self) -> Admitted {
        self.admitted
    }
    /// How long the request waited for its lease (a queue wait, a load, an unload): zero for a hit.
    pub fn waited(&self) -> std::time::Duration {
        self.waited
    }
    /// KV cache bytes the ledger holds for this request until the lease ends (0 for requests
    /// acquired without a token count).
    pub fn kv_bytes(&self) -> u64 {
        self.kv
    }
    /// The loaded model, for inference calls.
    pub fn handle(&self) -> &Arc<dyn ModelHandle> {
        &self.handle
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("model", &self.model).field("slot", &self.slot).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.owner.release(self.slot, self.acquired_at, self.kv);
    }
}

/// Waits for a load's outcome on behalf of one request. If the request goes away first, the
/// guard gives back what the pool set aside for it: its place among the waiters, or the lease
/// the finished load granted it.
pub(super) struct WaitGuard<'a, P: EvictionPolicy, E: SizeEstimator> {
    pub(super) pool: &'a ModelPool<P, E>,
    pub(super) slot: Slot,
    /// The KV bytes the request was admitted with.
    pub(super) kv: u64,
    pub(super) rx: watch::Receiver<LoadResult>,
    pub(super) finished: bool,
}

impl<P: EvictionPolicy, E: SizeEstimator> WaitGuard<'_, P, E> {
    pub(super) async fn wait(&mut self) -> Result<(), PoolError> {
        load_outcome(&mut self.rx).await
    }
}

/// The outcome a load task publishes on its channel, once it is there. Cancel safe (it only
/// reads the channel).
pub(super) async fn load_outcome(rx: &mut watch::Receiver<LoadResult>) -> Result<(), PoolError> {
    loop {
        if let Some(r) = rx.borrow_and_update().clone() {
            return r;
        }
        if rx.changed().await.is_err() {
            // The sender is dropped only after publishing; treat a missing value as gone.
            return rx.borrow().clone().unwrap_or(Err(PoolError::Backend(BackendError::Gone)));
        }
    }
}

impl<P: EvictionPolicy, E: SizeEstimator> Drop for WaitGuard<'_, P, E> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let outcome = self.rx.borrow().clone();
        match outcome {
            None => {
                let mut core = self.pool.inner.lock();
                // Re-check under the lock: the load may have finished in between.
                match self.rx.borrow().clone() {
                    None => {
                        core.state.cancel_wait(self.slot, self.kv);
                        drop(core);
                        self.pool.inner.lease_ended.notify_waiters();
                    }
                    Some(Ok(())) => {
                        drop(core);
                        self.pool.inner.end_lease(self.slot, None, self.kv);
                    }
                    Some(Err(_)) => {}
                }
            }
            Some(Ok(())) => self.pool.inner.end_lease(self.slot, None, self.kv),
            Some(Err(_)) => {}
        }
    }
}
