//! Replay throughput on a pre-parsed in-memory trace with 100 models (Zipf 1.0, seeded), and
//! CSV parse throughput.
//!
//! Groups:
//! - `replay/instant`: instant loads and service, a pure cache simulation (what libCacheSim
//!   measures; `scripts/libcachesim-compare.sh` runs both on a 10 M-request trace), memory
//!   limit at 25% of the catalogue, `max_models` unbounded. LRU, GDSF, LFU, and the two offline
//!   baselines. Every request takes the engine's one-call instant path
//!   (`PoolState::serve_instant`).
//! - `replay/timed`: the default timings (0.5 s + 3.2 GB/s loads, token service times), so every
//!   request also goes through the event heap (release) and loads take time (joins, 503s).
//! - `parse/csv`: parsing the same trace written as CSV.
//!
//! Run: `cargo bench -p modelpool-sim --bench replay` (add `-- --quick` for a short run).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use modelpool_sim::generate::{GenConfig, generate};
use modelpool_sim::trace::parse_csv;
use modelpool_sim::{PolicyChoice, SimConfig, Trace, run};

const REQUESTS: u64 = 1_000_000;

fn trace() -> Trace {
    generate(&GenConfig {
        seed: 42,
        requests: REQUESTS,
        models: 100,
        zipf: 1.0,
        rate: 50.0,
        ..GenConfig::default()
    })
    .expect("valid generator config")
}

fn quarter_of_catalogue(t: &Trace) -> u64 {
    t.models.iter().map(|m| m.size.unwrap_or(0)).sum::<u64>() / 4
}

fn replay(c: &mut Criterion) {
    let t = trace();
    let limit = quarter_of_catalogue(&t);
    let mut g = c.benchmark_group("replay/instant");
    g.throughput(Throughput::Elements(REQUESTS));
    g.sample_size(10);
    for p in PolicyChoice::ALL {
        let cfg = SimConfig::instant(limit, 1000, p);
        g.bench_function(p.as_str(), |b| {
            b.iter(|| black_box(run(black_box(&t), &cfg).expect("valid config")))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("replay/timed");
    g.throughput(Throughput::Elements(REQUESTS));
    g.sample_size(10);
    for p in [PolicyChoice::LRU, PolicyChoice::GDSF] {
        let cfg = SimConfig { limit, max_models: 1000, policy: p, ..SimConfig::default() };
        g.bench_function(p.as_str(), |b| {
            b.iter(|| black_box(run(black_box(&t), &cfg).expect("valid config")))
        });
    }
    g.finish();
}

fn parse(c: &mut Criterion) {
    let t = trace();
    let mut csv = Vec::new();
    t.write_csv(&mut csv, &[]).expect("write to memory");
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(csv.len() as u64));
    g.sample_size(10);
    g.bench_function("csv", |b| {
        b.iter(|| black_box(parse_csv(black_box(&csv), "bench.csv").expect("valid trace")))
    });
    g.finish();
}

criterion_group!(benches, replay, parse);
criterion_main!(benches);
