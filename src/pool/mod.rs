//! The async model pool: a [`PoolState`] behind a mutex, a [`Backend`], leases and
//! single-flight loads.
//!
//! Lock discipline: one `std::sync::Mutex` around the decision core and the handle table; it is
//! never held across an `.await`. Decisions are made under it; loads and unloads run outside it,
//! in tasks of their own, so a caller that goes away never strands other waiters.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use crate::backend::{Backend, BackendError, CancellationToken, ModelHandle};
use crate::error::PoolError;
use crate::estimate::SizeEstimator;
use crate::log::Event;
use crate::policy::{EvictionPolicy, Slot};
use crate::state::{Admission, Intent, Ledger, PoolConfig, PoolState, Ticket};
use crate::types::{ModelId, ModelSpec, ModelType, Nanos};

mod lease;
mod load;
mod queue;
mod report;

pub use lease::{Admitted, Lease};
use lease::{LeaseOwner, WaitGuard, load_outcome};
use queue::{QueueGuard, Step, Woken};
pub use report::{ConfigSummary, DryRun, PoolStatus, Residency, ResidencyEntry, UnloadReport};

type LoadResult = Option<Result<(), PoolError>>;

/// Longest a request waits for its model's own unload to finish before it is refused with
/// `model_draining` (an unload normally takes milliseconds to a second; this bounds a backend
/// whose unload hangs).
pub const UNLOAD_WAIT_MAX: Duration = Duration::from_secs(30);

struct Core<P: EvictionPolicy, E: SizeEstimator> {
    /// The decision core. It shares the estimator with [`Inner::estimator`] but never calls it:
    /// estimates are made before the lock is taken and measurements reported after it is released.
    state: PoolState<P, Arc<E>>,
    /// Handle per slot while resident or draining.
    handles: Vec<Option<Arc<dyn ModelHandle>>>,
    /// Loads in progress: their outcome is broadcast to every waiter.
    loads: HashMap<Slot, watch::Sender<LoadResult>>,
    /// Requests in the core's admission queue, by ticket: where their wake goes.
    queued: HashMap<Ticket, oneshot::Sender<Result<Woken, PoolError>>>,
    /// Predictive preload's horizon, when on ([`ModelPool::set_predictive_preload`]).
    preload_horizon: Option<Nanos>,
    /// Predictive preloads loading now: the token that cancels each, and its task (which ends
    /// after the cancelled load's memory is reported back).
    preloads: HashMap<Slot, (CancellationToken, tokio::task::JoinHandle<()>)>,
}

struct Inner<P: EvictionPolicy, E: SizeEstimator> {
    core: Mutex<Core<P, E>>,
    /// Called outside `core`'s lock only (estimators may read files or write them).
    estimator: Arc<E>,
    backend: Arc<dyn Backend>,
    epoch: Instant,
    shutting_down: AtomicBool,
    /// Notified whenever a lease ends, a load ends or a waiter gives up (shutdown waits on it).
    lease_ended: Notify,
    /// Notified after every [`PoolState::reclaimed`] (requests awaiting a model's unload).
    reclaimed: Notify,
    runtime: tokio::runtime::Handle,
    /// Back-reference to the `Arc` that owns this (set by `Arc::new_cyclic`), for tasks spawned
    /// from `&self`.
    weak: std::sync::Weak<Inner<P, E>>,
}

/// The async pool: a [`PoolState`] behind one mutex, a [`Backend`], leases and single-flight
/// loads. Cheap to clone (an `Arc`); every clone is the same pool.
///
/// Guarantees: the lock is never held across an `.await` or a backend call; a model with a live
/// [`Lease`] is never unloaded; concurrent acquires of one absent model share one load; every
/// caller that goes away mid-call (a dropped future) leaves the ledger as if it had never come
/// (see `# Cancel safety` on each async method).
pub struct ModelPool<P: EvictionPolicy = Box<dyn EvictionPolicy>, E: SizeEstimator = Box<dyn SizeEstimator>> {
    inner: Arc<Inner<P, E>>,
}

impl<P: EvictionPolicy, E: SizeEstimator> Clone for ModelPool<P, E> {
    fn clone(&self) -> Self {
        ModelPool { inner: self.inner.clone() }
    }
}

impl<P: EvictionPolicy, E: SizeEstimator> LeaseOwner for Inner<P, E> {
    fn release(&self, slot: Slot, acquired_at: Nanos, kv: u64) {
        self.end_lease(slot, Some(acquired_at), kv);
    }
}

impl<P: EvictionPolicy, E: SizeEstimator> Inner<P, E> {
    /// End a lease taken at `acquired_at`, or (`None`) one granted to a waiter that went away
    /// before using it; either way admitted with `kv` bytes. Unload the model in the background
    /// if that was its last lease and it must leave memory.
    fn end_lease(&self, slot: Slot, acquired_at: Option<Nanos>, kv: u64) {
        let now = self.now();
        let unload = {
            let mut core = self.lock();
            let must_unload = match acquired_at {
                Some(at) => core.state.release_request(slot, now, at, kv),
                None => core.state.release_unused(slot, now, kv),
            };
            let handle = if must_unload { core.handles[slot as usize].take() } else { None };
            self.deliver_wakes(&mut core);
            handle
        };
        if let Some(handle) = unload {
            let inner = self.self_arc();
            self.runtime.spawn(async move { inner.unload_handle(slot, handle).await });
        }
        self.lease_ended.notify_waiters();
    }

    fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    fn lock(&self) -> MutexGuard<'_, Core<P, E>> {
        // A panic under the lock leaves the ledger unknown; surfacing it is better than guessing.
        self.core.lock().expect("model pool lock poisoned")
    }

    fn self_arc(&self) -> Arc<Self> {
        // `&self` is borrowed from a live Arc (every Inner is built by `Arc::new_cyclic`).
        self.weak.upgrade().expect("pool inner is alive")
    }

    /// Unload one model whose memory the ledger holds as draining, then return it to the ledger
    /// (even if the backend failed: its memory is counted as returned). Returns the bytes the
    /// backend says it freed.
    async fn unload_handle(&self, slot: Slot, handle: Arc<dyn ModelHandle>) -> Option<u64> {
        let expected = self.lock().state.model_status(slot).ledger_bytes;
        let freed = match guarded_unload(&handle).await {
            Ok(freed) => {
                // Confirm the memory came back: a backend that frees much less than it measured
                // at load is leaking, and the operator should know.
                if (freed as f64) < expected as f64 * 0.9 {
                    tracing::warn!(slot, expected, freed, "unload returned less memory than the model held");
                }
                Some(freed)
            }
            Err(e) => {
                tracing::warn!(slot, error = %e, "unload failed; counting the memory as returned");
                None
            }
        };
        self.reclaim(slot);
        freed
    }

    /// Report a draining model's memory as returned and wake the requests awaiting its unload.
    fn reclaim(&self, slot: Slot) {
        let now = self.now();
        {
            let mut core = self.lock();
            core.state.reclaimed(slot, now);
            self.deliver_wakes(&mut core);
        }
        self.reclaimed.notify_waiters();
    }

    async fn unload_all(&self, victims: Vec<(Slot, Arc<dyn ModelHandle>)>) {
        for (slot, h) in victims {
            self.unload_handle(slot, h).await;
        }
    }

    /// [`Inner::unload_all`] in a task of its own, awaited: the caller still returns after the
    /// memory is back, but a caller that goes away mid-unload (an admin HTTP client that
    /// disconnects, a timeout) no longer strands the victims draining with their handles taken.
    async fn unload_all_detached(&self, victims: Vec<(Slot, Arc<dyn ModelHandle>)>) {
        if victims.is_empty() {
            return;
        }
        let inner = self.self_arc();
        // A panic in the task is already caught around the backend call; a JoinError here can
        // only be the runtime shutting down, when nothing is left to wait for.
        let _ = self.runtime.spawn(async move { inner.unload_all(victims).await }).await;
    }
}

impl<P: EvictionPolicy, E: SizeEstimator> ModelPool<P, E> {
    /// A pool over `backend` with `config`, `policy` and `estimator`.
    ///
    /// # Panics
    /// Outside a tokio runtime (loads and background unloads are spawned on the current one).
    pub fn new(config: PoolConfig, policy: P, estimator: E, backend: Arc<dyn Backend>) -> Self {
        let estimator = Arc::new(estimator);
        let inner = Arc::new_cyclic(|weak| Inner {
            core: Mutex::new(Core {
                state: PoolState::new(config, policy, estimator.clone()),
                handles: Vec::new(),
                loads: HashMap::new(),
                queued: HashMap::new(),
                preloads: HashMap::new(),
                preload_horizon: None,
            }),
            estimator,
            backend,
            epoch: Instant::now(),
            shutting_down: AtomicBool::new(false),
            lease_ended: Notify::new(),
            reclaimed: Notify::new(),
            runtime: tokio::runtime::Handle::current(),
            weak: weak.clone(),
        });
        ModelPool { inner }
    }

    /// Nanoseconds since the pool was created (tokio's clock, so paused-time tests work).
    pub fn now(&self) -> Nanos {
        self.inner.now()
    }

    /// Register a model (or update an absent one). Returns its slot. The size estimate is made
    /// here, before the pool lock is taken (an estimator may read weight files), so a slow disk
    /// never stalls admissions.
    pub fn register(&self, spec: ModelSpec) -> Slot {
        let estimate = self.inner.estimator.estimate(&spec);
        let mut core = self.inner.lock();
        let slot = core.state.register_estimated(spec, estimate);
        if core.handles.len() <= slot as usize {
            core.handles.resize(slot as usize + 1, None);
        }
        slot
    }

    /// Every registered model's spec.
    pub fn models(&self) -> Vec<ModelSpec> {
        self.inner.lock().state.specs().cloned().collect()
    }

    /// The spec of a registered model.
    pub fn spec(&self, model: &str) -> Result<ModelSpec, PoolError> {
        let core = self.inner.lock();
        let slot = core.state.slot(model).ok_or_else(|| PoolError::ModelNotFound(model.to_string()))?;
        Ok(core.state.spec(slot).clone())
    }

    /// Acquire a lease on `model`, loading it if needed. Concurrent acquires of a model that is
    /// not resident share one load; if it fails, every one of them gets its error. A model whose
    /// own unload is running is waited for (at most [`UNLOAD_WAIT_MAX`]) and loaded again.
    ///
    /// # Errors
    /// `ModelNotFound`, `ShuttingDown`, the admission refusals (`InsufficientMemory`,
    /// `ModelTooLarge`, `MaxModelsReached`, `Draining`), or `LoadFailed` with the backend's error.
    ///
    /// # Cancel safety
    /// Cancel safe. Dropping the future while it waits for a load gives its place back (the load
    /// goes on for the other waiters and stays resident); dropping it after the load landed ends
    /// the lease it was granted. A load it started is never abandoned.
    pub async fn acquire(&self, model: &str) -> Result<Lease, PoolError> {
        self.acquire_as(model, &[]).await
    }

    /// Like [`ModelPool::acquire`], but refuses (before loading anything) a model whose type is
    /// not in `allowed` (an empty slice allows every type) with `WrongModelType`.
    ///
    /// # Cancel safety
    /// As [`ModelPool::acquire`].
    pub async fn acquire_as(&self, model: &str, allowed: &[ModelType]) -> Result<Lease, PoolError> {
        self.acquire_for(model, allowed, 0).await
    }

    /// Like [`ModelPool::acquire_as`], for a request of `tokens` tokens of context (prompt plus
    /// maximum new tokens): its KV cache ([`PoolState::kv_for_tokens`] at the model's KV bytes
    /// per token when first admitted) is counted in the ledger until the lease ends, and the
    /// request waits or is refused like a load when it does not fit
    /// ([`PoolState::admit_request`]).
    ///
    /// # Cancel safety
    /// As [`ModelPool::acquire`]; a request that goes away gives its KV bytes back too.
    pub async fn acquire_for(
        &self,
        model: &str,
        allowed: &[ModelType],
        tokens: u64,
    ) -> Result<Lease, PoolError> {
        self.check_open()?;
        let mut kv: Option<u64> = None;
        // The pool clock at the first admission; the hot path (a hit) reads no extra clock.
        let mut started: Option<Nanos> = None;
        let mut deadline: Option<Instant> = None;
        let mut how = Admitted::Hit;
        let (slot, rx) = loop {
            let (slot, step) = {
                let mut core = self.inner.lock();
                let slot = Self::slot_of(&core, model)?;
                let spec = core.state.spec(slot);
                if !allowed.is_empty() && !allowed.contains(&spec.model_type) {
                    return Err(PoolError::WrongModelType {
                        model: spec.id.clone(),
                        expected: allowed[0],
                        actual: spec.model_type,
                    });
                }
                let now = self.inner.now();
                let since = *started.get_or_insert(now);
                let kv = *kv.get_or_insert_with(|| core.state.kv_for_tokens(slot, tokens));
                let admission = core.state.admit_request(slot, now, kv);
                self.inner.start_unloads(&mut core);
                if let Admission::Load(plan) = &admission {
                    // The request's own load first, then any predictive preload beside it.
                    how = how.or(Admitted::Load);
                    let rx = self.inner.start_load(&mut core, slot, plan.victims.clone());
                    self.inner.try_preload(&mut core, now);
                    break (slot, rx);
                }
                self.inner.try_preload(&mut core, now);
                match admission {
                    Admission::Hit => {
                        let waited = Duration::from_nanos(now - since);
                        return Ok(self.lease(&core, slot, now, how, waited, kv));
                    }
                    Admission::Join => {
                        how = how.or(Admitted::Join);
                        break (slot, core.loads[&slot].subscribe());
                    }
                    Admission::Load(_) => unreachable!("started above"),
                    Admission::AwaitUnload => {
                        let until = *deadline.get_or_insert_with(|| Instant::now() + UNLOAD_WAIT_MAX);
                        (slot, Step::Unload(self.await_reclaim(&core, slot, until)?))
                    }
                    Admission::Queued(ticket) => {
                        let (tx, rx) = oneshot::channel();
                        core.queued.insert(ticket, tx);
                        (slot, Step::Queue(ticket, rx))
                    }
                    Admission::Reject(r) => {
                        let id = core.state.spec(slot).id.clone();
                        let err = r.into_error(id, core.state.config().max_models);
                        tracing::info!(
                            model,
                            code = r.code.as_str(),
                            need = r.need,
                            available = r.available,
                            "admission rejected"
                        );
                        return Err(err);
                    }
                }
            };
            match step {
                Step::Unload(reclaimed) => {
                    reclaimed.await;
                    self.check_open()?;
                }
                Step::Queue(ticket, rx) => {
                    how = Admitted::Queued;
                    let kv = kv.unwrap_or(0);
                    let mut queued = QueueGuard { pool: self, ticket, slot, kv, rx: Some(rx) };
                    match queued.wait().await? {
                        Woken::Leased => {
                            let core = self.inner.lock();
                            let now = self.inner.now();
                            let waited = Duration::from_nanos(now.saturating_sub(started.unwrap_or(now)));
                            return Ok(self.lease(&core, slot, now, how, waited, kv));
                        }
                        Woken::Wait(rx) => break (slot, rx),
                    }
                }
            }
        };
        let kv = kv.unwrap_or(0);
        let mut guard = WaitGuard { pool: self, slot, kv, rx, finished: false };
        let result = guard.wait().await;
        guard.finished = true;
        result?;
        let core = self.inner.lock();
        let now = self.inner.now();
        let waited = Duration::from_nanos(now.saturating_sub(started.unwrap_or(now)));
        Ok(self.lease(&core, slot, now, how, waited, kv))
    }

    /// Called under the lock when an admission answered [`Admission::AwaitUnload`]: a future
    /// that ends when the next unload is reported (or at `deadline`), registered before the lock
    /// is released so the wake-up cannot be missed. Past `deadline` (an unload that never
    /// ends), the request is refused with `model_draining` instead.
    fn await_reclaim<'s>(
        &'s self,
        core: &Core<P, E>,
        slot: Slot,
        deadline: Instant,
    ) -> Result<impl Future<Output = ()> + use<'s, P, E>, PoolError> {
        if Instant::now() >= deadline {
            let secs = UNLOAD_WAIT_MAX.as_secs() as u32;
            return Err(PoolError::Draining {
                model: core.state.spec(slot).id.clone(),
                retry_after_secs: secs,
            });
        }
        let mut notified = Box::pin(self.inner.reclaimed.notified());
        notified.as_mut().enable();
        Ok(async move {
            let _ = tokio::time::timeout_at(deadline, notified).await;
        })
    }

    fn lease(
        &self,
        core: &Core<P, E>,
        slot: Slot,
        now: Nanos,
        admitted: Admitted,
        waited: Duration,
        kv: u64,
    ) -> Lease {
        let spec = core.state.spec(slot);
        Lease {
            admitted,
            waited,
            slot,
            model: spec.id.clone(),
            model_type: spec.model_type,
            handle: core.handles[slot as usize].clone().expect("resident model has a handle"),
            acquired_at: now,
            kv,
            owner: self.inner.clone(),
        }
    }

    /// Turn predictive preload on (`Some(horizon)`) or off: after each request's admission, while
    /// nothing waits, the pool loads the absent model its policy expects to be requested soonest
    /// (within `horizon`) into free memory and a free model slot
    /// ([`PoolState::predictive_preload`]: an ordinary load in the ledger and the decision log,
    /// with its reason, never pinned, evicting nothing). Only the `predictive` policy predicts;
    /// with any other this does nothing.
    pub fn set_predictive_preload(&self, horizon: Option<Duration>) {
        self.inner.lock().preload_horizon = horizon.map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Load `model` if needed and pin it: it is never evicted until unpinned. The pin is set in
    /// the same critical section that makes the model resident.
    ///
    /// # Cancel safety
    /// Cancel safe: once admitted, the load and the pin happen whether or not the caller still
    /// waits.
    pub async fn preload(&self, model: &str) -> Result<(), PoolError> {
        self.check_open()?;
        let deadline = Instant::now() + UNLOAD_WAIT_MAX;
        let mut rx = loop {
            let reclaimed = {
                let mut core = self.inner.lock();
                let slot = Self::slot_of(&core, model)?;
                let now = self.inner.now();
                match core.state.admit(slot, now, Intent::Preload) {
                    Admission::Hit => return Ok(()),
                    Admission::Join => break core.loads[&slot].subscribe(),
                    Admission::Load(plan) => break self.inner.start_load(&mut core, slot, plan.victims),
                    Admission::AwaitUnload => self.await_reclaim(&core, slot, deadline)?,
                    Admission::Reject(r) => {
                        let id = core.state.spec(slot).id.clone();
                        return Err(r.into_error(id, core.state.config().max_models));
                    }
                    Admission::Queued(_) => unreachable!("preloads are never queued"),
                }
            };
            reclaimed.await;
            self.check_open()?;
        };
        load_outcome(&mut rx).await
    }

    fn slot_of(core: &Core<P, E>, model: &str) -> Result<Slot, PoolError> {
        core.state.slot(model).ok_or_else(|| PoolError::ModelNotFound(model.to_string()))
    }

    /// Pin a resident or loading model. Errors if it is not loaded.
    pub fn pin(&self, model: &str) -> Result<(), PoolError> {
        let mut core = self.inner.lock();
        let slot = Self::slot_of(&core, model)?;
        let now = self.inner.now();
        if core.state.pin(slot, now) {
            Ok(())
        } else {
            Err(PoolError::UnloadRefused {
                model: core.state.spec(slot).id.clone(),
                reason: "cannot pin: it is not loaded; preload it instead".into(),
            })
        }
    }

    /// Unpin a model. Returns whether it was pinned. If the pool is over its limits (after a
    /// lowered limit), models that became evictable are unloaded before this returns.
    ///
    /// # Cancel safety
    /// Cancel safe: the unpin is done before the first `.await`, and the unloads run in a task
    /// of their own, so the memory comes back even if the caller goes away.
    pub async fn unpin(&self, model: &str) -> Result<bool, PoolError> {
        let (was, victims) = {
            let mut core = self.inner.lock();
            let slot = Self::slot_of(&core, model)?;
            let now = self.inner.now();
            let (was, evicted) = core.state.unpin(slot, now);
            let victims = take_handles(&mut core, &evicted);
            self.inner.deliver_wakes(&mut core);
            (was, victims)
        };
        self.inner.unload_all_detached(victims).await;
        Ok(was)
    }

    /// Unload a model. Pinned or busy models are refused unless `force`; a forced unload of a
    /// busy model stops new requests and frees it when the in-flight ones end.
    ///
    /// # Errors
    /// `ModelNotFound`, or `UnloadRefused` saying why and how to force it.
    ///
    /// # Cancel safety
    /// Cancel safe: the backend unload runs in a task of its own and reports the memory back to
    /// the ledger whether or not the caller still waits.
    pub async fn unload(&self, model: &str, force: bool) -> Result<UnloadReport, PoolError> {
        let (slot, handle, id) = {
            let mut core = self.inner.lock();
            let slot = Self::slot_of(&core, model)?;
            let now = self.inner.now();
            let now_unload = core.state.unload(slot, now, force)?;
            let id = core.state.spec(slot).id.clone();
            let handle = if now_unload { core.handles[slot as usize].take() } else { None };
            (slot, handle, id)
        };
        let Some(handle) = handle else {
            return Ok(UnloadReport { model: id, unloaded_now: false, freed_bytes: None });
        };
        // In a task of its own: if the caller goes away mid-unload, the memory still comes back.
        let inner = self.inner.clone();
        let freed = self
            .inner
            .runtime
            .spawn(async move { inner.unload_handle(slot, handle).await })
            .await
            .ok()
            .flatten();
        Ok(UnloadReport { model: id, unloaded_now: true, freed_bytes: freed })
    }

    /// Change the memory limit and/or `max_models` and evict down to them (idle models are
    /// unloaded before this returns; busy ones drain). Returns the models evicted, in slot
    /// (registration) order.
    ///
    /// # Errors
    /// `InvalidConfig` for a zero limit or `max_models`; nothing changes then.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`ModelPool::unpin`].
    pub async fn set_limits(
        &self,
        limit: Option<u64>,
        max_models: Option<usize>,
    ) -> Result<Vec<ModelId>, PoolError> {
        let (victims, ids) = {
            let mut core = self.inner.lock();
            let l = core.state.ledger();
            let now = self.inner.now();
            let evicted =
                core.state.set_limits(limit.unwrap_or(l.limit), max_models.unwrap_or(l.max_models), now)?;
            let mut slots: Vec<Slot> = evicted.unload_now.iter().chain(&evicted.drained).copied().collect();
            slots.sort_unstable();
            let ids = slots.iter().map(|&s| core.state.spec(s).id.clone()).collect();
            let victims = take_handles(&mut core, &evicted.unload_now);
            self.inner.deliver_wakes(&mut core);
            (victims, ids)
        };
        self.inner.unload_all_detached(victims).await;
        Ok(ids)
    }

    /// Evict models idle longer than the configured TTL; returns them after unloading.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`ModelPool::unpin`].
    pub async fn expire_idle(&self) -> Vec<ModelId> {
        let (victims, ids) = {
            let mut core = self.inner.lock();
            let now = self.inner.now();
            let expired = core.state.expire_idle(now);
            let ids = expired.iter().map(|&s| core.state.spec(s).id.clone()).collect::<Vec<_>>();
            let victims = take_handles(&mut core, &expired);
            (victims, ids)
        };
        self.inner.unload_all_detached(victims).await;
        ids
    }

    /// What loading `model` now would do, changing nothing.
    pub fn dry_run(&self, model: &str) -> Result<DryRun, PoolError> {
        let core = self.inner.lock();
        let slot = Self::slot_of(&core, model)?;
        let now = self.inner.now();
        let id = core.state.spec(slot).id.clone();
        let need = core.state.need(slot);
        let base = DryRun {
            model: id.clone(),
            decision: "hit",
            fits: true,
            need,
            would_evict: Vec::new(),
            reject_code: None,
            message: None,
            retry_after_secs: None,
        };
        Ok(match core.state.preview(slot, now) {
            Admission::Hit => base,
            Admission::Join => DryRun { decision: "join", ..base },
            Admission::AwaitUnload => DryRun { decision: "await_unload", ..base },
            Admission::Queued(_) => DryRun { decision: "queue", ..base },
            Admission::Load(plan) => DryRun {
                decision: "load",
                would_evict: plan.victims.iter().map(|&v| core.state.spec(v).id.clone()).collect(),
                ..base
            },
            Admission::Reject(r) => DryRun {
                decision: "reject",
                fits: false,
                reject_code: Some(r.code.as_str()),
                message: Some(r.into_error(id, core.state.config().max_models).to_string()),
                retry_after_secs: r.retry_after_secs,
                ..base
            },
        })
    }

    /// The residency view: every model's phase and the dry-run cost of a request for it now,
    /// under one lock, changing nothing.
    pub fn residency(&self) -> Residency {
        let core = self.inner.lock();
        let now = self.inner.now();
        let st = &core.state;
        let ledger = st.ledger();
        let models = (0..st.len() as Slot)
            .map(|slot| {
                let m = st.model_status(slot);
                let view = st.admission_view(slot, now);
                ResidencyEntry {
                    id: m.id,
                    phase: m.phase,
                    leases: m.leases,
                    waiting: m.waiters + m.queued,
                    decision: view.decision.as_str(),
                    evict_bytes: view.evict_bytes,
                    expected_wait_secs: view.expected_wait_secs,
                }
            })
            .collect();
        Residency { limit: ledger.limit, used: ledger.used(), models }
    }

    /// Status for the admin API.
    pub fn status(&self) -> PoolStatus {
        let core = self.inner.lock();
        let ledger = core.state.ledger();
        PoolStatus {
            backend: self.inner.backend.name(),
            policy: core.state.policy().name(),
            ledger,
            over_limit: ledger.used() > ledger.limit,
            stats: core.state.stats().clone(),
            shutting_down: self.inner.shutting_down.load(Ordering::SeqCst),
            models: {
                let mut models = core.state.models_status();
                for m in &mut models {
                    let handle = core.state.slot(&m.id).and_then(|s| core.handles.get(s as usize)?.as_ref());
                    m.serving = handle.and_then(|h| h.serving());
                }
                models
            },
            config: {
                let c = core.state.config();
                ConfigSummary {
                    policy: core.state.policy().name(),
                    idle_ttl_secs: c.idle_ttl.map(|t| t as f64 / 1e9),
                    queue_timeout_secs: c.queue_timeout as f64 / 1e9,
                    max_queue: c.max_queue,
                    load_latency_secs: c.load_latency_secs,
                    load_bandwidth: c.load_bandwidth.is_finite().then_some(c.load_bandwidth),
                }
            },
            timing: self.inner.backend.timing(),
        }
    }

    /// The ledger.
    pub fn ledger(&self) -> Ledger {
        self.inner.lock().state.ledger()
    }

    /// The last `n` decision events, oldest first.
    pub fn events(&self, n: usize) -> Vec<Event> {
        self.inner.lock().state.log().last(n)
    }

    /// The last `n` decision events, oldest first, with the number of events recorded since the
    /// pool started (kept or not): a reader that saw `total = t` before can take the events
    /// after it as the last `total - t` (if the log still keeps them).
    pub fn events_since_start(&self, n: usize) -> (Vec<Event>, u64) {
        let core = self.inner.lock();
        (core.state.log().last(n), core.state.log().total())
    }

    /// Run `f` on the decision core under the pool lock (tests, metrics): every admission waits
    /// while it runs, so keep it short and never block in it.
    pub fn with_state<R>(&self, f: impl FnOnce(&PoolState<P, Arc<E>>) -> R) -> R {
        f(&self.inner.lock().state)
    }

    fn check_open(&self) -> Result<(), PoolError> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            Err(PoolError::ShuttingDown { retry_after_secs: 5 })
        } else {
            Ok(())
        }
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Stop taking requests, let in-flight ones finish for at most `grace`, and unload every
    /// model. Requests waiting for a load in progress are in flight too; the model they load is
    /// evicted as it lands. Models still busy when `grace` ends are unloaded as their last lease
    /// drops. Returns the number of requests still in flight (leases plus waiters) at the end.
    ///
    /// # Cancel safety
    /// Cancel safe: shutdown has begun (new requests are refused) once the future is first
    /// polled; dropping it only stops waiting for the grace period.
    pub async fn shutdown(&self, grace: Duration) -> u32 {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let victims = {
            let mut core = self.inner.lock();
            let now = self.inner.now();
            let idle = core.state.evict_all(now, true);
            // Queued requests will not get a turn: refuse them now.
            for ticket in core.state.drain_queue() {
                if let Some(tx) = core.queued.remove(&ticket) {
                    let _ = tx.send(Err(PoolError::ShuttingDown { retry_after_secs: 5 }));
                }
            }
            take_handles(&mut core, &idle)
        };
        self.inner.unload_all_detached(victims).await;
        let deadline = Instant::now() + grace;
        loop {
            let notified = self.inner.lease_ended.notified();
            let live: u32 = {
                let core = self.inner.lock();
                core.state.models_status().iter().map(|m| m.leases + m.waiters).sum()
            };
            if live == 0 || Instant::now() >= deadline {
                return live;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}

/// `handle.unload()`, with a panic turned into an error so the ledger still gets the memory back.
async fn guarded_unload(handle: &Arc<dyn ModelHandle>) -> Result<u64, BackendError> {
    AssertUnwindSafe(handle.unload())
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(BackendError::Inference("the backend panicked while unloading".into())))
}

/// Take the handles of evicted slots (they have no leases) for unloading outside the lock.
fn take_handles<P: EvictionPolicy, E: SizeEstimator>(
    core: &mut Core<P, E>,
    slots: &[Slot],
) -> Vec<(Slot, Arc<dyn ModelHandle>)> {
    slots.iter().filter_map(|&v| core.handles[v as usize].take().map(|h| (v, h))).collect()
}
