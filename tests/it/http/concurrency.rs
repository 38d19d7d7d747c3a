//! Many clients, several models, a tight limit: every request gets a 200 or a well-formed error,
//! the memory limit is never exceeded, and no model is unloaded while a request uses it.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use modelpool::backend::fake::FakeBackend;
use modelpool::backend::{
    Backend, BackendError, Embeddings, GenerateEvent, GenerateRequest, GenerateStream, ModelHandle,
};
use modelpool::{GB, ModelSpec, ModelType};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::*;

/// Counts in-flight uses per model and flags any unload while one is live.
#[derive(Default)]
struct Watch {
    in_use: Mutex<BTreeMap<String, i64>>,
    violations: AtomicU64,
    unloads: AtomicU64,
}

impl Watch {
    fn enter(&self, id: &str) {
        *self.in_use.lock().unwrap().entry(id.to_string()).or_default() += 1;
    }
    fn exit(&self, id: &str) {
        *self.in_use.lock().unwrap().entry(id.to_string()).or_default() -= 1;
    }
}

struct Checked {
    inner: FakeBackend,
    watch: Arc<Watch>,
}

struct CheckedHandle {
    id: String,
    inner: Arc<dyn ModelHandle>,
    watch: Arc<Watch>,
}

/// A generation that counts as "in use" until dropped.
struct Tracked {
    inner: GenerateStream,
    id: String,
    watch: Arc<Watch>,
}

impl Stream for Tracked {
    type Item = Result<GenerateEvent, BackendError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.watch.exit(&self.id);
    }
}

#[async_trait]
impl ModelHandle for CheckedHandle {
    fn measured_bytes(&self) -> u64 {
        self.inner.measured_bytes()
    }
    async fn generate(&self, req: GenerateRequest) -> Result<GenerateStream, BackendError> {
        self.watch.enter(&self.id);
        match self.inner.generate(req).await {
            Ok(s) => Ok(Box::pin(Tracked { inner: s, id: self.id.clone(), watch: self.watch.clone() })),
            Err(e) => {
                self.watch.exit(&self.id);
                Err(e)
            }
        }
    }
    async fn embed(&self, inputs: Vec<String>) -> Result<Embeddings, BackendError> {
        self.watch.enter(&self.id);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let r = self.inner.embed(inputs).await;
        self.watch.exit(&self.id);
        r
    }
    async fn unload(&self) -> Result<u64, BackendError> {
        let live = self.watch.in_use.lock().unwrap().get(&self.id).copied().unwrap_or(0);
        if live != 0 {
            self.watch.violations.fetch_add(1, Ordering::SeqCst);
        }
        self.watch.unloads.fetch_add(1, Ordering::SeqCst);
        self.inner.unload().await
    }
}

#[async_trait]
impl Backend for Checked {
    fn name(&self) -> &'static str {
        "checked-fake"
    }
    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn ModelHandle>, BackendError> {
        let inner = self.inner.load(spec).await?;
        Ok(Arc::new(CheckedHandle { id: spec.id.to_string(), inner, watch: self.watch.clone() }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_clients_tight_limit_no_lost_request_no_overcommit_no_unload_under_use() {
    const CLIENTS: usize = 32;
    const REQUESTS: usize = 25;
    let models = [
        ("gen-1", ModelType::TextGen, 2 * GB),
        ("gen-2", ModelType::TextGen, 2 * GB),
        ("gen-3", ModelType::TextGen, 3 * GB),
        ("gen-4", ModelType::TextGen, GB),
        ("emb-1", ModelType::Embeddings, GB),
    ];
    let specs: Vec<ModelSpec> =
        models.iter().map(|(id, t, b)| ModelSpec::new(*id).with_type(*t).with_size(*b)).collect();
    let limit = 5 * GB; // at most two or three of them at once
    let watch = Arc::new(Watch::default());
    let fake = FakeBackend::new()
        .with_load_time(Duration::from_millis(3))
        .with_token_delay(Duration::from_micros(300));
    let backend = Arc::new(Checked { inner: fake, watch: watch.clone() });
    let h = Arc::new(Harness::with_dyn_backend(limit, 3, backend, Arc::new(FakeBackend::new()), specs));

    // Sample the ledger continuously while the clients run.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (h, stop) = (h.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = 0u64;
            let mut max_used = 0;
            while !stop.load(Ordering::SeqCst) {
                let l = h.pool.ledger();
                max_used = max_used.max(l.used());
                assert!(l.used() <= l.limit, "ledger over the limit: {l:?}");
                assert!(l.models <= l.max_models, "too many models: {l:?}");
                h.check_invariants();
                samples += 1;
                tokio::task::yield_now().await;
            }
            (samples, max_used)
        })
    };

    // Rounds of the workload until the limit has forced a few evictions (the first round almost
    // always does; which requests win is up to the scheduler).
    let mut by_outcome: BTreeMap<(u16, Option<String>), usize> = BTreeMap::new();
    let mut total = 0;
    let mut rounds = 0;
    while rounds < 20 && (rounds == 0 || watch.unloads.load(Ordering::SeqCst) < 3) {
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let h = h.clone();
            let seed = (rounds * CLIENTS + c) as u64;
            tasks.push(tokio::spawn(async move {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let mut outcomes: Vec<(u16, Option<String>)> = Vec::new();
                for _ in 0..REQUESTS {
                    let pick = rng.random_range(0..5usize);
                    let stream = rng.random_bool(0.5);
                    let (path, body) = if pick == 4 {
                        ("/v1/embeddings", json!({"model": "emb-1", "input": ["a b c", "d"]}))
                    } else {
                        ("/v1/chat/completions", chat_body(&format!("gen-{}", pick + 1), stream))
                    };
                    let r = h.post(path, body.clone()).await;
                    let status = r.status().as_u16();
                    if status == 200 {
                        if body["stream"] == true {
                            let data = sse_data(r.body());
                            assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
                            assert_eq!(data.last().unwrap(), "[DONE]");
                        } else {
                            let v = json(&r);
                            assert!(v.get("choices").is_some() || v.get("data").is_some(), "{v}");
                        }
                        outcomes.push((200, None));
                    } else {
                        let e = assert_error(&r, status, json(&r)["error"]["code"].as_str().unwrap_or("?"));
                        let code = e["code"].as_str().unwrap().to_string();
                        assert_eq!(status, 503, "only capacity refusals expected: {e}");
                        assert!(
                            ["insufficient_memory", "max_models_reached", "model_draining"]
                                .contains(&code.as_str()),
                            "{e}"
                        );
                        assert!(retry_after(&r).is_some_and(|s| s >= 1), "Retry-After on {code}");
                        outcomes.push((status, Some(code)));
                    }
                    // Think time: gives models idle windows in which they can be evicted.
                    tokio::time::sleep(Duration::from_micros(rng.random_range(0..1500u64))).await;
                }
                outcomes
            }));
        }
        for t in tasks {
            for o in t.await.expect("client task") {
                *by_outcome.entry(o).or_default() += 1;
                total += 1;
            }
        }
        rounds += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let (samples, max_used) = sampler.await.expect("sampler");

    assert_eq!(total, rounds * CLIENTS * REQUESTS, "every request got an answer");
    let ok = by_outcome.get(&(200, None)).copied().unwrap_or(0);
    // How many are served depends on timing; that some are, and the rest are refused cleanly,
    // does not.
    assert!(ok > 0, "requests served: {by_outcome:?}");
    assert!(samples > 100, "the sampler ran ({samples} samples)");
    assert!(max_used <= limit);
    assert!(watch.unloads.load(Ordering::SeqCst) > 0, "the limit forced evictions");
    assert_eq!(watch.violations.load(Ordering::SeqCst), 0, "a model was unloaded under a request");
    // Everything released at the end.
    assert!(
        eventually(Duration::from_secs(2), || h.pool.status().models.iter().all(|m| m.leases == 0)).await
    );
    let s = h.pool.status().stats;
    assert!(s.total_evictions() > 0);
    h.check_invariants();
    eprintln!(
        "{rounds} round(s), outcomes: {by_outcome:?}; evictions {}; peak {} of {limit}",
        s.total_evictions(),
        s.peak_used
    );
}
