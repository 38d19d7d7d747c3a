//! Hot-path benchmarks of the engine: a hit (admission + lease release) on the decision core and
//! on the async pool, and victim selection, with 4, 64 and 1024 resident models.
//!
//! Run: `cargo bench --bench pool` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use modelpool::backend::fake::FakeBackend;
use modelpool::{
    Admission, EvictionPolicy, GB, Intent, LogMode, Lru, ModelPool, ModelSpec, NameEstimator, PolicyKind,
    PoolConfig, PoolState, SizeEstimator,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZES: [usize; 3] = [4, 64, 1024];

fn config(n: usize) -> PoolConfig {
    let mut cfg = PoolConfig::with_limit(n as u64 * GB);
    cfg.max_models = n;
    cfg.log = LogMode::Off;
    cfg
}

/// A state with `n` resident 1 GB models filling the limit exactly.
fn full_state(n: usize) -> PoolState<Lru, NameEstimator> {
    let mut st = PoolState::new(config(n), Lru::new(), NameEstimator);
    for i in 0..n {
        let s = st.register(ModelSpec::new(format!("model-{i}")).with_size(GB));
        let Admission::Load(_) = st.admit(s, i as u64, Intent::Request) else { panic!("fits") };
        st.load_finished(s, i as u64, Ok(GB));
        st.release(s, i as u64, i as u64);
    }
    st
}

fn picks(n: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    (0..4096).map(|_| rng.random_range(0..n as u32)).collect()
}

fn bench_state_hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("state_hit");
    g.throughput(Throughput::Elements(1));
    for n in SIZES {
        let mut st = full_state(n);
        let picks = picks(n);
        let mut i = 0usize;
        let mut now = n as u64;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let s = picks[i & 4095];
                i += 1;
                now += 1;
                let a = st.admit(black_box(s), now, Intent::Request);
                debug_assert_eq!(a, Admission::Hit);
                black_box(st.release(s, now, now))
            })
        });
    }
    g.finish();
}

fn bench_pool_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("pool_hit");
    g.throughput(Throughput::Elements(1));
    for n in SIZES {
        let policy: Box<dyn EvictionPolicy> = PolicyKind::Lru.build();
        let estimator: Box<dyn SizeEstimator> = Box::new(NameEstimator);
        let pool = ModelPool::new(config(n), policy, estimator, Arc::new(FakeBackend::new()));
        let names: Vec<String> = (0..n).map(|i| format!("model-{i}")).collect();
        for name in &names {
            pool.register(ModelSpec::new(name.as_str()).with_size(GB));
            rt.block_on(pool.acquire(name)).unwrap();
        }
        let picks = picks(n);
        let mut i = 0usize;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let name = &names[picks[i & 4095] as usize];
                i += 1;
                // A hit never awaits: poll it once with a no-op waker.
                let lease = futures::executor::block_on(pool.acquire(black_box(name))).unwrap();
                drop(black_box(lease));
            })
        });
    }
    g.finish();
}

fn bench_victims(c: &mut Criterion) {
    let mut g = c.benchmark_group("victim_selection");
    g.throughput(Throughput::Elements(1));
    for n in SIZES {
        // A full pool; a new 1 GB model needs exactly one victim.
        let mut st = full_state(n);
        let newcomer = st.register(ModelSpec::new("newcomer").with_size(GB));
        let mut now = n as u64 + 1;
        g.bench_function(BenchmarkId::new("first_is_evictable", n), |b| {
            b.iter(|| black_box(st.preview(black_box(newcomer), now)))
        });
        // The oldest half is pinned: the walk skips n/2 models before finding a victim.
        for s in 0..(n / 2) as u32 {
            now += 1;
            st.pin(s, now);
        }
        g.bench_function(BenchmarkId::new("oldest_half_pinned", n), |b| {
            b.iter(|| black_box(st.preview(black_box(newcomer), now)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_state_hit, bench_pool_hit, bench_victims);
criterion_main!(benches);
