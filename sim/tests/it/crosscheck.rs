//! Cross-check: with instant loads, unloads and service there are no concurrency effects, so
//! the engine under LRU must behave exactly like a textbook LRU cache with a byte capacity and
//! an entry cap. The reference below is written independently of the engine.

use modelpool_sim::generate::{GenConfig, generate};
use modelpool_sim::trace::{OpKind, Trace};
use modelpool_sim::{PolicyChoice, SimConfig};

use crate::common::{GB, replay};

/// Misses and evictions of an LRU stack: most recent first; a miss evicts from the back until
/// the new item fits in bytes and count; an item larger than the capacity is never cached.
fn lru_stack(trace: &Trace, capacity: u64, max_items: usize) -> (u64, u64) {
    let size = |m: u32| trace.models[m as usize].size.unwrap();
    let mut stack: Vec<u32> = Vec::new();
    let (mut misses, mut evictions) = (0, 0);
    for op in trace.ops.iter().filter(|o| o.kind == OpKind::Request) {
        if let Some(pos) = stack.iter().position(|&m| m == op.model) {
            let m = stack.remove(pos);
            stack.insert(0, m);
            continue;
        }
        misses += 1;
        let need = size(op.model);
        if need > capacity {
            continue;
        }
        while stack.iter().map(|&m| size(m)).sum::<u64>() + need > capacity || stack.len() + 1 > max_items {
            stack.pop();
            evictions += 1;
        }
        stack.insert(0, op.model);
    }
    (misses, evictions)
}

#[test]
fn lru_replay_matches_an_independent_lru_stack() {
    for (seed, models, zipf) in [(1u64, 12usize, 1.0), (2, 24, 0.8), (3, 40, 1.2)] {
        let t =
            generate(&GenConfig { seed, requests: 20_000, models, zipf, ..GenConfig::default() }).unwrap();
        for limit_gb in [6, 12, 24, 48, 96] {
            for max_models in [2, 4, 1000] {
                let cfg = SimConfig::instant(limit_gb * GB, max_models, PolicyChoice::LRU);
                let r = replay(&t, &cfg).report;
                let (misses, evictions) = lru_stack(&t, limit_gb * GB, max_models);
                let label = format!("seed {seed}, {limit_gb} GB, max {max_models}");
                assert_eq!(r.requests - r.hits, misses, "{label}");
                assert_eq!(r.evictions_total, evictions, "{label}");
                assert_eq!(r.joined, 0, "{label}: instant loads leave nothing to join");
                // Too-large models are refused, never loaded; everything else is a cold load.
                assert_eq!(r.cold_loads + r.rejections["model_too_large"], misses, "{label}");
            }
        }
    }
}
