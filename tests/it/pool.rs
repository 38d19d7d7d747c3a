//! The async pool over the fake backend, on tokio's paused clock (load times cost no real time).

use std::sync::Arc;
use std::time::Duration;

use modelpool::backend::fake::{FakeBackend, FakeModelConfig};
use modelpool::backend::{GenerateEvent, GenerateRequest, Prompt};
use modelpool::{
    EvictionPolicy, GB, LogMode, ModelPool, ModelSpec, ModelType, NameEstimator, Phase, PolicyKind,
    PoolConfig, PoolError, SizeEstimator,
};

/// An LRU pool over any backend with `cfg` (the full log kept), and `models` of the given sizes.
fn pool_over(
    mut cfg: PoolConfig,
    backend: Arc<dyn modelpool::backend::Backend>,
    models: &[(&str, u64)],
) -> ModelPool {
    cfg.log = LogMode::Full;
    let policy: Box<dyn EvictionPolicy> = PolicyKind::Lru.build();
    let estimator: Box<dyn SizeEstimator> = Box::new(NameEstimator);
    let pool = ModelPool::new(cfg, policy, estimator, backend);
    for &(name, gb) in models {
        pool.register(ModelSpec::new(name).with_size(gb * GB));
    }
    pool
}

fn pool_with(limit_gb: u64, backend: Arc<FakeBackend>, models: &[(&str, u64)]) -> ModelPool {
    pool_over(PoolConfig::with_limit(limit_gb * GB), backend, models)
}

fn slow_backend(secs: u64) -> Arc<FakeBackend> {
    Arc::new(FakeBackend::new().with_load_time(Duration::from_secs(secs)))
}

fn phase(pool: &ModelPool, model: &str) -> Phase {
    pool.with_state(|st| st.phase(st.slot(model).unwrap()))
}

#[tokio::test(start_paused = true)]
async fn concurrent_acquires_share_one_load() {
    let backend = slow_backend(5);
    let pool = pool_with(10, backend.clone(), &[("a", 4)]);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire("a").await.map(|l| l.model().to_string()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "a");
    }
    assert_eq!(backend.load_count(), 1);
    let stats = pool.status().stats;
    assert_eq!((stats.loads, stats.joins + stats.hits + 1), (1, 16));
    // All leases were dropped with their tasks.
    assert_eq!(pool.with_state(|st| st.leases(0)), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_load_reaches_every_waiter_with_its_error() {
    let backend = slow_backend(2);
    backend.fail_next_loads("a", 1);
    let pool = pool_with(10, backend.clone(), &[("a", 4)]);
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire("a").await.map(|_| ()) })
        })
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(&err, PoolError::LoadFailed { .. }), "{err:?}");
        assert_eq!(err.to_string(), "failed to load model 'a': load failed: injected failure loading 'a'");
    }
    assert_eq!(backend.load_count(), 1);
    let l = pool.ledger();
    assert_eq!((l.reserved, l.used(), l.models), (0, 0, 0), "no reservation left behind");
    // The next acquire tries again and succeeds.
    let lease = pool.acquire("a").await.unwrap();
    assert_eq!(lease.handle().measured_bytes(), 4 * GB);
    assert_eq!(backend.load_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_loads_of_different_models_never_exceed_the_limit() {
    let backend = slow_backend(10);
    let pool = pool_with(10, backend.clone(), &[("a", 6), ("b", 6), ("c", 4)]);
    let p = pool.clone();
    let a = tokio::spawn(async move { p.acquire("a").await.map(|_| ()) });
    tokio::task::yield_now().await;
    // a's 6 GB are reserved while it loads: b cannot also start.
    let err = pool.acquire("b").await.unwrap_err();
    assert!(
        matches!(err, PoolError::InsufficientMemory { retry_after_secs, .. } if retry_after_secs >= 1),
        "{err:?}"
    );
    // c fits beside a: both load in parallel, each holding its reservation.
    let p = pool.clone();
    let c = tokio::spawn(async move { p.acquire("c").await.map(|_| ()) });
    tokio::task::yield_now().await;
    let l = pool.ledger();
    assert_eq!(l.reserved, 10 * GB);
    assert!(l.used() <= l.limit);
    a.await.unwrap().unwrap();
    c.await.unwrap().unwrap();
    assert_eq!(backend.load_count(), 2);
    assert!(pool.status().stats.peak_used <= 10 * GB);
}

#[tokio::test(start_paused = true)]
async fn a_model_with_a_live_lease_is_not_unloaded() {
    let backend = slow_backend(1);
    let pool = pool_with(8, backend.clone(), &[("a", 4), ("b", 4), ("c", 4)]);
    let lease_a = pool.acquire("a").await.unwrap();
    drop(pool.acquire("b").await.unwrap());
    // c needs room: b (idle) goes although a is older.
    drop(pool.acquire("c").await.unwrap());
    assert_eq!(phase(&pool, "a"), Phase::Resident);
    assert_eq!(phase(&pool, "b"), Phase::Absent);
    // Forcing an unload of a busy model drains it: memory returns only when the lease drops.
    let report = pool.unload("a", true).await.unwrap();
    assert!(!report.unloaded_now);
    assert_eq!(phase(&pool, "a"), Phase::Draining);
    let err = pool.acquire("a").await.unwrap_err();
    assert!(matches!(err, PoolError::Draining { .. }), "{err:?}");
    let mut stream =
        lease_a.handle().generate(GenerateRequest::greedy(Prompt::Text("hi".into()), 4)).await.unwrap();
    use futures::StreamExt;
    assert!(matches!(stream.next().await, Some(Ok(GenerateEvent::Delta(_)))), "still serving its request");
    drop(stream);
    drop(lease_a);
    // The unload runs in a background task.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(phase(&pool, "a"), Phase::Absent);
    assert_eq!(backend.unload_count(), 2);
    assert_eq!(pool.ledger().used(), 4 * GB);
}

#[tokio::test(start_paused = true)]
async fn preload_pins_before_anyone_can_evict() {
    let backend = slow_backend(3);
    let pool = pool_with(8, backend.clone(), &[("p", 4), ("a", 4), ("b", 4)]);
    pool.preload("p").await.unwrap();
    for m in ["a", "b", "a", "b"] {
        drop(pool.acquire(m).await.unwrap());
        assert_eq!(phase(&pool, "p"), Phase::Resident);
    }
    let st = pool.status();
    assert!(st.models.iter().find(|m| m.id.as_ref() == "p").unwrap().pinned);
    assert_eq!(st.ledger.pinned, 4 * GB);
    // Unpinned, it is an ordinary LRU victim again.
    assert!(pool.unpin("p").await.unwrap());
    drop(pool.acquire("a").await.unwrap());
    assert_eq!(phase(&pool, "p"), Phase::Absent);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_leaves_nothing_behind() {
    let backend = slow_backend(10);
    let pool = pool_with(10, backend.clone(), &[("a", 4)]);
    // The request gives up after 1 s; the load goes on for the others.
    let r = tokio::time::timeout(Duration::from_secs(1), pool.acquire("a")).await;
    assert!(r.is_err());
    let lease = pool.acquire("a").await.unwrap();
    assert_eq!(pool.with_state(|st| st.leases(0)), 1, "only the live lease counts");
    drop(lease);
    assert_eq!(pool.with_state(|st| st.leases(0)), 0);
    assert_eq!(backend.load_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn measured_size_enters_the_ledger() {
    let backend = Arc::new(FakeBackend::new());
    backend.configure("a", FakeModelConfig { measured_bytes: Some(3 * GB), ..Default::default() });
    let pool = pool_with(10, backend, &[("a", 4)]);
    drop(pool.acquire("a").await.unwrap());
    let status = pool.status();
    let a = &status.models[0];
    assert_eq!((a.estimate.bytes, a.measured, a.ledger_bytes), (4 * GB, Some(3 * GB), 3 * GB));
    assert_eq!(status.ledger.resident, 3 * GB);
}

#[tokio::test(start_paused = true)]
async fn runtime_limit_change_and_max_models() {
    let backend = slow_backend(1);
    let pool = pool_with(12, backend, &[("a", 4), ("b", 4), ("c", 4)]);
    for m in ["a", "b", "c"] {
        drop(pool.acquire(m).await.unwrap());
    }
    let evicted = pool.set_limits(Some(8 * GB), None).await.unwrap();
    assert_eq!(evicted.iter().map(|m| m.to_string()).collect::<Vec<_>>(), vec!["a"]);
    assert_eq!(pool.ledger().used(), 8 * GB);
    let evicted = pool.set_limits(None, Some(1)).await.unwrap();
    assert_eq!(evicted.len(), 1);
    assert_eq!(pool.ledger().models, 1);
    assert!(matches!(pool.set_limits(Some(0), None).await, Err(PoolError::InvalidConfig(_))));
}

#[tokio::test(start_paused = true)]
async fn wrong_type_and_unknown_models_are_refused_before_loading() {
    let backend = Arc::new(FakeBackend::new());
    let pool = pool_with(10, backend.clone(), &[]);
    pool.register(ModelSpec::new("embed").with_type(ModelType::Embeddings).with_size(GB));
    let err = pool.acquire_as("embed", &[ModelType::TextGen, ModelType::Vision]).await.unwrap_err();
    assert_eq!(err.to_string(), "model 'embed' is an embeddings model; this endpoint needs a text-gen model");
    assert!(matches!(pool.acquire("nope").await, Err(PoolError::ModelNotFound(m)) if m == "nope"));
    assert_eq!(backend.load_count(), 0);
    let lease = pool.acquire_as("embed", &[ModelType::Embeddings]).await.unwrap();
    let out = lease.handle().embed(vec!["hello".into(), "world".into()]).await.unwrap();
    assert_eq!(out.vectors.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn dry_run_says_what_would_happen() {
    let pool = pool_with(8, slow_backend(1), &[("a", 4), ("b", 4), ("c", 4), ("huge", 9)]);
    drop(pool.acquire("a").await.unwrap());
    drop(pool.acquire("b").await.unwrap());
    let d = pool.dry_run("c").unwrap();
    assert_eq!((d.decision, d.fits), ("load", true));
    assert_eq!(d.would_evict.iter().map(|m| m.to_string()).collect::<Vec<_>>(), vec!["a"]);
    let d = pool.dry_run("huge").unwrap();
    assert_eq!((d.decision, d.fits, d.reject_code), ("reject", false, Some("model_too_large")));
    assert_eq!(pool.dry_run("a").unwrap().decision, "hit");
    assert_eq!(phase(&pool, "a"), Phase::Resident, "dry runs evict nothing");
}

#[tokio::test(start_paused = true)]
async fn shutdown_refuses_new_requests_and_drains() {
    let backend = slow_backend(1);
    let pool = pool_with(10, backend.clone(), &[("a", 2), ("b", 2)]);
    let lease = pool.acquire("a").await.unwrap();
    drop(pool.acquire("b").await.unwrap());
    let p = pool.clone();
    let shutdown = tokio::spawn(async move { p.shutdown(Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(matches!(pool.acquire("b").await, Err(PoolError::ShuttingDown { .. })));
    drop(lease);
    assert_eq!(shutdown.await.unwrap(), 0, "every lease ended within the grace period");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(pool.ledger().used(), 0);
    assert_eq!(backend.unload_count(), 2);
}

/// A backend whose loads panic (a bug in a backend must not wedge the pool).
struct PanickingBackend;

#[async_trait::async_trait]
impl modelpool::backend::Backend for PanickingBackend {
    fn name(&self) -> &'static str {
        "panicking"
    }
    async fn load(
        &self,
        spec: &ModelSpec,
    ) -> Result<Arc<dyn modelpool::backend::ModelHandle>, modelpool::backend::BackendError> {
        tokio::time::sleep(Duration::from_secs(1)).await;
        panic!("backend bug while loading {}", spec.id);
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_backend_fails_the_load_and_frees_the_reservation() {
    let pool = pool_over(PoolConfig::with_limit(10 * GB), Arc::new(PanickingBackend), &[("a", 4)]);
    let p = pool.clone();
    let waiter = tokio::spawn(async move { p.acquire("a").await.map(|_| ()) });
    let err = pool.acquire("a").await.unwrap_err();
    assert_eq!(err.to_string(), "failed to load model 'a': load failed: the backend panicked while loading");
    assert!(matches!(waiter.await.unwrap(), Err(PoolError::LoadFailed { .. })));
    let l = pool.ledger();
    assert_eq!((l.reserved, l.models), (0, 0));
    assert_eq!(phase(&pool, "a"), Phase::Absent);
}

/// The fake backend, with unloads that take `unload_time` (tokio time): a real backend frees
/// gigabytes, which is not instant, so a caller can go away while it runs.
struct SlowUnloadBackend {
    inner: Arc<FakeBackend>,
    unload_time: Duration,
}

struct SlowUnloadHandle {
    inner: Arc<dyn modelpool::backend::ModelHandle>,
    unload_time: Duration,
}

#[async_trait::async_trait]
impl modelpool::backend::ModelHandle for SlowUnloadHandle {
    fn measured_bytes(&self) -> u64 {
        self.inner.measured_bytes()
    }
    async fn generate(
        &self,
        req: GenerateRequest,
    ) -> Result<modelpool::backend::GenerateStream, modelpool::backend::BackendError> {
        self.inner.generate(req).await
    }
    async fn embed(
        &self,
        inputs: Vec<String>,
    ) -> Result<modelpool::backend::Embeddings, modelpool::backend::BackendError> {
        self.inner.embed(inputs).await
    }
    async fn unload(&self) -> Result<u64, modelpool::backend::BackendError> {
        tokio::time::sleep(self.unload_time).await;
        self.inner.unload().await
    }
}

#[async_trait::async_trait]
impl modelpool::backend::Backend for SlowUnloadBackend {
    fn name(&self) -> &'static str {
        "slow-unload"
    }
    async fn load(
        &self,
        spec: &ModelSpec,
    ) -> Result<Arc<dyn modelpool::backend::ModelHandle>, modelpool::backend::BackendError> {
        let inner = self.inner.load(spec).await?;
        Ok(Arc::new(SlowUnloadHandle { inner, unload_time: self.unload_time }))
    }
}

fn slow_unload_pool(limit_gb: u64, models: &[(&str, u64)]) -> (ModelPool, Arc<FakeBackend>) {
    let fake = Arc::new(FakeBackend::new());
    let backend = Arc::new(SlowUnloadBackend { inner: fake.clone(), unload_time: Duration::from_secs(5) });
    (pool_over(PoolConfig::with_limit(limit_gb * GB), backend, models), fake)
}

/// An admin call (unload, set_limits, unpin, expire) whose caller goes away while the backend
/// is freeing memory (an HTTP client that disconnects) must still finish the unload: otherwise
/// the model stays draining forever, its bytes never return to the ledger and every later
/// request for it is refused as `model_draining`.
#[tokio::test(start_paused = true)]
async fn a_cancelled_admin_unload_still_returns_the_memory() {
    let (pool, fake) = slow_unload_pool(10, &[("a", 4), ("b", 4)]);
    drop(pool.acquire("a").await.unwrap());
    drop(pool.acquire("b").await.unwrap());
    // The caller of unload gives up after 1 s, while the backend is still freeing 'a'.
    assert!(tokio::time::timeout(Duration::from_secs(1), pool.unload("a", false)).await.is_err());
    // The caller of set_limits gives up too, while 'b' is being freed.
    assert!(tokio::time::timeout(Duration::from_secs(1), pool.set_limits(Some(GB), None)).await.is_err());
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!((phase(&pool, "a"), phase(&pool, "b")), (Phase::Absent, Phase::Absent));
    assert_eq!(fake.unload_count(), 2);
    let l = pool.ledger();
    assert_eq!((l.draining, l.used()), (0, 0), "no memory left draining: {l:?}");
    pool.with_state(|st| st.check_invariants()).unwrap();
    // 'a' loads again.
    pool.set_limits(Some(10 * GB), None).await.unwrap();
    drop(pool.acquire("a").await.unwrap());
}

/// A request waiting for a load when shutdown begins is in flight: shutdown waits for it (within
/// the grace period), and the model it loaded is unloaded like every other, not left resident.
#[tokio::test(start_paused = true)]
async fn shutdown_during_a_load_waits_for_its_request_and_unloads_the_model() {
    let backend = slow_backend(10);
    let pool = pool_with(10, backend.clone(), &[("a", 4)]);
    let p = pool.clone();
    let request = tokio::spawn(async move {
        let lease = p.acquire("a").await?;
        tokio::time::sleep(Duration::from_secs(2)).await; // the request runs for 2 s
        drop(lease);
        Ok::<_, PoolError>(())
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(phase(&pool, "a"), Phase::Loading);
    let started = tokio::time::Instant::now();
    let live = pool.shutdown(Duration::from_secs(30)).await;
    // The load ends at 10 s and the request 2 s later: shutdown waited for both.
    assert_eq!((live, started.elapsed()), (0, Duration::from_secs(11)));
    request.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(phase(&pool, "a"), Phase::Absent);
    assert_eq!(pool.ledger().used(), 0);
    assert_eq!(backend.unload_count(), 1);
}

/// Requests that give up while a load is in flight, but only after it has landed (their lease
/// granted, never used), did not run for zero seconds: they must not drag the typical request
/// time, and with it every `Retry-After`, towards zero.
#[tokio::test(start_paused = true)]
async fn waiters_dropped_after_their_load_landed_do_not_shorten_retry_hints() {
    let pool = pool_with(10, slow_backend(5), &[("a", 6), ("b", 6)]);
    // One real request of 10 s sets the typical request time.
    let lease = pool.acquire("a").await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    drop(lease);
    // 20 requests wait for b's load and go away once it has landed, before being polled again.
    let mut waiters: Vec<_> = (0..20).map(|_| Box::pin(pool.acquire("b"))).collect();
    for w in &mut waiters {
        assert!(futures::poll!(w.as_mut()).is_pending());
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(phase(&pool, "b"), Phase::Resident);
    drop(waiters);
    assert_eq!(pool.with_state(|st| st.leases(st.slot("b").unwrap())), 0);
    // b is busy with a fresh request: a must wait for it, about one typical request time.
    let _b = pool.acquire("b").await.unwrap();
    let err = pool.acquire("a").await.unwrap_err();
    assert!(matches!(err, PoolError::InsufficientMemory { .. }), "{err:?}");
    assert_eq!(err.retry_after_secs(), Some(10));
}

/// Many requests, preloads, unpins, forced unloads and limit changes at once, with callers that
/// give up at random points (timeouts): once everything has settled, no lease, waiter,
/// reservation or draining byte is left and the ledger matches the models.
#[tokio::test(start_paused = true)]
async fn cancelled_callers_under_churn_leave_a_consistent_pool() {
    for seed in 0..SEEDS {
        churn_with_cancellations(seed).await;
    }
}

const SEEDS: u64 = 16;

async fn churn_with_cancellations(seed: u64) {
    use rand::{RngExt, SeedableRng};
    let fake = Arc::new(FakeBackend::new().with_load_time(Duration::from_secs(3)));
    let backend = Arc::new(SlowUnloadBackend { inner: fake.clone(), unload_time: Duration::from_secs(2) });
    let mut cfg = PoolConfig::with_limit(12 * GB);
    cfg.max_models = 3;
    if seed % 2 == 1 {
        // Half the runs queue what would be refused: waiters are cancelled at random too.
        cfg = cfg.with_queue(Duration::from_secs(5).as_nanos() as u64, 8);
    }
    let policy: Box<dyn EvictionPolicy> = PolicyKind::Lru.build();
    let estimator: Box<dyn SizeEstimator> = Box::new(NameEstimator);
    let pool = ModelPool::new(cfg, policy, estimator, backend);
    for i in 0..6u64 {
        pool.register(ModelSpec::new(format!("m{i}")).with_size((2 + i % 3) * GB));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut tasks = Vec::new();
    for _ in 0..400 {
        let pool = pool.clone();
        let model = format!("m{}", rng.random_range(0..6u32));
        let op = rng.random_range(0..10u32);
        let start = Duration::from_millis(rng.random_range(0..60_000));
        let give_up = Duration::from_millis(rng.random_range(1..8_000));
        let hold = Duration::from_millis(rng.random_range(0..4_000));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(start).await;
            let work = async {
                match op {
                    0 => drop(pool.preload(&model).await),
                    1 => drop(pool.unpin(&model).await),
                    2 => drop(pool.unload(&model, true).await),
                    3 => {
                        let limit = if hold.as_millis().is_multiple_of(2) { 6 * GB } else { 12 * GB };
                        drop(pool.set_limits(Some(limit), None).await)
                    }
                    _ => {
                        if let Ok(lease) = pool.acquire(&model).await {
                            tokio::time::sleep(hold).await;
                            drop(lease);
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(give_up, work).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    pool.with_state(|st| st.check_invariants()).unwrap();
    let status = pool.status();
    let l = status.ledger;
    assert_eq!((l.reserved, l.draining, l.awaiting), (0, 0, 0), "seed {seed}: {l:?}");
    assert_eq!(pool.with_state(|s| s.queue_len()), 0, "seed {seed}: a waiter was left behind");
    for m in &status.models {
        assert_eq!((m.leases, m.waiters), (0, 0), "seed {seed}: {}", m.id);
        assert!(matches!(m.phase, Phase::Absent | Phase::Resident), "seed {seed}: {} {:?}", m.id, m.phase);
    }
    // Every model can still be served.
    pool.set_limits(Some(12 * GB), None).await.unwrap();
    for i in 0..6 {
        drop(pool.unpin(&format!("m{i}")).await);
    }
    for i in 0..6 {
        drop(pool.acquire(&format!("m{i}")).await.unwrap());
    }
}

/// Issue 14.3: an idle model evicted for another one is unloaded in the background; a request
/// for it during that unload waits for it and then loads the model again, instead of a 503
/// `model_draining`.
#[tokio::test(start_paused = true)]
async fn a_request_during_its_models_unload_waits_and_loads_it_again() {
    let (pool, fake) = slow_unload_pool(6, &[("a", 4), ("b", 4)]);
    drop(pool.acquire("a").await.unwrap());
    // b evicts a; a's unload takes 5 s.
    let b = {
        let pool = pool.clone();
        tokio::spawn(async move { drop(pool.acquire("b").await.unwrap()) })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(phase(&pool, "a"), Phase::Draining);
    assert_eq!(pool.dry_run("a").unwrap().decision, "await_unload");
    let started = tokio::time::Instant::now();
    let lease = pool.acquire("a").await.expect("waits for the unload instead of model_draining");
    assert!(started.elapsed() >= Duration::from_secs(4), "it waited for the unload");
    b.await.unwrap();
    assert_eq!(phase(&pool, "a"), Phase::Resident);
    drop(lease);
    assert_eq!(fake.load_count(), 3, "a, b, a again");
    assert_eq!(pool.status().stats.total_rejections(), 0);
    pool.with_state(|st| st.check_invariants()).unwrap();
}

/// An estimator that checks, each time it is called, whether the pool's lock is free: another
/// thread must be able to read the ledger while `estimate` or `observe` runs.
struct LockProbe {
    pool: std::sync::OnceLock<ModelPool<Box<dyn EvictionPolicy>, LockProbe>>,
    /// One entry per call: (which call, whether the pool lock was free during it).
    calls: std::sync::Mutex<Vec<(&'static str, bool)>>,
}

impl LockProbe {
    fn probe(&self, call: &'static str) {
        let Some(pool) = self.pool.get() else { return };
        let pool = pool.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = pool.ledger();
            let _ = tx.send(());
        });
        let free = rx.recv_timeout(Duration::from_secs(2)).is_ok();
        self.calls.lock().unwrap().push((call, free));
    }
}

impl SizeEstimator for LockProbe {
    fn estimate(&self, spec: &ModelSpec) -> modelpool::Estimate {
        self.probe("estimate");
        NameEstimator.estimate(spec)
    }
    fn observe(&self, _spec: &ModelSpec, _measured: u64) {
        self.probe("observe");
    }
}

/// Estimators may do I/O (weight files, GGUF headers, a measurement file): the pool calls them
/// before taking its lock (register) and after releasing it (a load's measurement), so the
/// decision core never waits on a disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimators_run_outside_the_pool_lock() {
    let probe = LockProbe { pool: std::sync::OnceLock::new(), calls: Default::default() };
    let policy: Box<dyn EvictionPolicy> = PolicyKind::Lru.build();
    let pool = ModelPool::new(PoolConfig::with_limit(10 * GB), policy, probe, Arc::new(FakeBackend::new()));
    pool.with_state(|st| st.estimator().pool.set(pool.clone()).ok().expect("set once"));
    pool.register(ModelSpec::new("m-1b").with_size(GB));
    drop(pool.acquire("m-1b").await.unwrap());
    let calls = || pool.with_state(|st| st.estimator().calls.lock().unwrap().clone());
    assert!(crate::http::eventually(Duration::from_secs(10), || calls().len() == 2).await, "{:?}", calls());
    assert_eq!(calls(), vec![("estimate", true), ("observe", true)]);
}

fn queued_pool(
    limit_gb: u64,
    timeout: Duration,
    max_queue: usize,
    models: &[(&str, u64)],
) -> (ModelPool, Arc<FakeBackend>) {
    let fake = Arc::new(FakeBackend::new().with_load_time(Duration::from_secs(1)));
    let cfg = PoolConfig::with_limit(limit_gb * GB).with_queue(timeout.as_nanos() as u64, max_queue);
    (pool_over(cfg, fake.clone(), models), fake)
}

/// Issue 8: a burst for more models than fit at once is served by waiting, not with 503s.
#[tokio::test(start_paused = true)]
async fn a_burst_waits_for_memory_instead_of_getting_503s() {
    let (pool, fake) = queued_pool(10, Duration::from_secs(60), 64, &[("a", 6), ("b", 6), ("c", 6)]);
    let mut tasks = Vec::new();
    for (i, m) in ["a", "b", "c", "a", "b", "c"].into_iter().enumerate() {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
            let lease = pool.acquire(m).await?;
            tokio::time::sleep(Duration::from_secs(2)).await; // the request runs 2 s
            drop(lease);
            Ok::<_, PoolError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("every request is served");
    }
    let st = pool.status();
    assert_eq!(st.stats.total_rejections(), 0, "no 503");
    assert!(st.stats.queued >= 2, "{:?}", st.stats);
    assert_eq!(st.stats.queued, st.stats.dequeued);
    assert!(fake.load_count() >= 3);
    pool.with_state(|s| s.check_invariants()).unwrap();
    assert_eq!(pool.with_state(|s| s.queue_len()), 0);
}

/// A queued request that waits the whole timeout gets `queue_timeout` with a retry hint; one
/// beyond `max_queue` gets `queue_full`.
#[tokio::test(start_paused = true)]
async fn queue_timeout_and_queue_full_are_503_class_errors_with_retry_hints() {
    let (pool, _) = queued_pool(10, Duration::from_secs(5), 1, &[("a", 6), ("b", 6), ("c", 6)]);
    let lease = pool.acquire("a").await.unwrap(); // a stays busy
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.acquire("b").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let full = pool.acquire("c").await.unwrap_err();
    assert!(matches!(full, PoolError::QueueFull { .. }), "{full:?}");
    assert!(full.retry_after_secs().is_some());
    let started = tokio::time::Instant::now();
    let timed_out = waiter.await.unwrap().unwrap_err();
    assert!(matches!(timed_out, PoolError::QueueTimeout { .. }), "{timed_out:?}");
    assert!(timed_out.retry_after_secs().is_some_and(|s| s >= 1));
    assert!(started.elapsed() <= Duration::from_secs(5));
    drop(lease);
    pool.with_state(|s| s.check_invariants()).unwrap();
    assert_eq!(pool.with_state(|s| s.queue_len()), 0);
}

/// A queued request whose caller goes away leaves the queue at once; nothing is loaded for it.
#[tokio::test(start_paused = true)]
async fn a_queued_request_that_goes_away_leaves_the_queue_and_loads_nothing() {
    let (pool, fake) = queued_pool(10, Duration::from_secs(60), 8, &[("a", 6), ("b", 6)]);
    let lease = pool.acquire("a").await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(1), pool.acquire("b")).await.is_err());
    assert_eq!(pool.with_state(|s| s.queue_len()), 0, "the caller left: so did its place");
    drop(lease);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(phase(&pool, "b"), Phase::Absent, "nothing loaded for a request that left");
    assert_eq!(fake.load_count(), 1);
    pool.with_state(|s| s.check_invariants()).unwrap();
}

#[tokio::test(start_paused = true)]
async fn leases_hold_their_kv_at_the_backends_rate_and_give_it_back_however_they_end() {
    // The backend reports 1 MB of KV per token once loaded; before that the rule's figure is
    // used (the first request keeps what it was admitted with).
    let backend =
        Arc::new(FakeBackend::new().with_load_time(Duration::from_secs(1)).with_kv_per_token(1_000_000));
    let pool = pool_with(10, backend, &[("a", 4), ("b", 4)]);
    let rule = pool.with_state(|st| st.kv_bytes_per_token(st.slot("a").unwrap()));
    let first = pool.acquire_for("a", &[], 100).await.unwrap();
    assert_eq!(first.kv_bytes(), 100 * rule);
    let second = pool.acquire_for("a", &[], 1000).await.unwrap();
    assert_eq!(second.kv_bytes(), GB, "1000 tokens at the backend's 1 MB");
    assert_eq!(pool.ledger().kv, 100 * rule + GB);
    // A request for b (not loaded: the rule's rate) whose weights and KV do not fit beside a's
    // busy requests would wait in the queue, off here (the library default): it is refused,
    // evicting nothing.
    let err = pool.acquire_for("b", &[], 60_000).await.unwrap_err();
    assert_eq!(err.reject_code(), Some(modelpool::RejectCode::InsufficientMemory));
    drop(first);
    drop(second);
    assert_eq!(pool.ledger().kv, 0);
    // A waiter that goes away mid-load gives its KV back.
    let pool2 = pool.clone();
    let waiter = tokio::spawn(async move { pool2.acquire_for("b", &[], 500).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    waiter.abort();
    let _ = waiter.await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(pool.ledger().kv, 0);
    pool.with_state(|st| st.check_invariants()).unwrap();
    let status = pool.status();
    let a = status.models.iter().find(|m| &*m.id == "a").unwrap();
    assert_eq!(a.kv_bytes_per_token, 1_000_000);
}

/// The fake backend follows the simulator's timing model exactly: loads of `latency + bytes /
/// bandwidth`, tokens at absolute deadlines `prefill x prompt + (i + 1) x decode` from the start
/// (no drift however slowly the consumer reads), embeddings of `prefill x inputs`, unloads of a
/// fixed time (paused clock: exact to the nanosecond).
#[tokio::test(start_paused = true)]
async fn the_fake_backend_follows_the_timing_model_without_drift() {
    use futures::StreamExt;
    use modelpool::backend::Backend;
    let t = modelpool::TimingModel {
        load_latency_secs: 0.25,
        load_bandwidth: Some(2e9),
        unload_secs: 0.1,
        prefill_secs_per_token: 0.001,
        decode_secs_per_token: 0.02,
    };
    let fake = FakeBackend::new().with_timing(t).with_natural_tokens(1000);
    let start = tokio::time::Instant::now();
    let h = fake.load(&ModelSpec::new("m").with_size(3 * GB)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_nanos(t.load_nanos(3 * GB)));
    assert_eq!(start.elapsed(), Duration::from_millis(1750));
    // "one two three four": 4 prompt tokens.
    let g0 = tokio::time::Instant::now();
    let mut s =
        h.generate(GenerateRequest::greedy(Prompt::Text("one two three four".into()), 50)).await.unwrap();
    let mut n = 0u64;
    while let Some(ev) = s.next().await {
        if let GenerateEvent::Delta(_) = ev.unwrap() {
            assert_eq!(g0.elapsed(), t.token_deadline(4, n), "token {n} on its deadline");
            n += 1;
            // A slow reader does not push later tokens back.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(n, 50);
    assert_eq!(g0.elapsed(), Duration::from_nanos(t.service_nanos(4, 50)) + Duration::from_millis(5));
    let e0 = tokio::time::Instant::now();
    let emb = FakeBackend::new().with_timing(t);
    let eh = emb.load(&ModelSpec::new("e").with_type(ModelType::Embeddings).with_size(GB)).await.unwrap();
    let e1 = tokio::time::Instant::now();
    assert_eq!(e1 - e0, Duration::from_millis(750));
    eh.embed(vec!["a b c".into(), "d e".into()]).await.unwrap();
    assert_eq!(e1.elapsed(), Duration::from_millis(5));
    let u0 = tokio::time::Instant::now();
    h.unload().await.unwrap();
    assert_eq!(u0.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn predictive_preload_loads_a_periodic_model_before_its_request() {
    let mut cfg = PoolConfig::with_limit(10 * GB);
    cfg.log = LogMode::Full;
    let pool = ModelPool::new(
        cfg,
        PolicyKind::Predictive.build(),
        Box::new(NameEstimator) as Box<dyn SizeEstimator>,
        slow_backend(1),
    );
    for m in ["job", "chat"] {
        pool.register(ModelSpec::new(m).with_size(2 * GB));
    }
    pool.set_predictive_preload(Some(Duration::from_secs(60)));
    // A job every 100 s; an operator unloads it after each run.
    for k in 0..3u64 {
        tokio::time::sleep_until(
            tokio::time::Instant::now() + Duration::from_secs(if k == 0 { 0 } else { 100 }),
        )
        .await;
        drop(pool.acquire("job").await.unwrap());
        pool.unload("job", false).await.unwrap();
    }
    assert_eq!(phase(&pool, "job"), Phase::Absent);
    // 80 s later a chat request: the job is due in about 20 s, so it is preloaded beside it.
    tokio::time::sleep(Duration::from_secs(80)).await;
    drop(pool.acquire("chat").await.unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(phase(&pool, "job"), Phase::Resident);
    let st = pool.status();
    assert!(!st.models.iter().find(|m| m.id.as_ref() == "job").unwrap().pinned);
    let predicted: Vec<f64> = pool
        .events(usize::MAX)
        .iter()
        .filter_map(|e| match e {
            modelpool::Event::Load { model, predicted_in_secs: Some(p), .. } if model.as_ref() == "job" => {
                Some(*p)
            }
            _ => None,
        })
        .collect();
    assert_eq!(predicted.len(), 1, "one predictive preload");
    assert!((15.0..25.0).contains(&predicted[0]), "{predicted:?}");
    // The job's next run finds it resident: a hit, no load of its own.
    let loads = pool.status().stats.loads;
    tokio::time::sleep(Duration::from_secs(18)).await;
    drop(pool.acquire("job").await.unwrap());
    assert_eq!(pool.status().stats.loads, loads);
}
