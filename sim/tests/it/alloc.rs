//! The replay loop (and the engine under LRU) allocates nothing per request: replaying twice as
//! many requests over the same models costs no more allocations than the amortized growth of
//! buffers. Counted with a per-thread counting allocator (tests run in parallel threads).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use modelpool_sim::generate::{GenConfig, generate};
use modelpool_sim::{PolicyChoice, SimConfig, Trace, run};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations(trace: &Trace, cfg: &SimConfig) -> (u64, u64) {
    let before = ALLOCS.with(Cell::get);
    let out = run(trace, cfg).expect("valid config");
    let n = ALLOCS.with(Cell::get) - before;
    (n, out.report.rejections.values().sum())
}

#[test]
fn replay_allocates_nothing_per_request() {
    let full =
        generate(&GenConfig { seed: 5, requests: 200_000, models: 100, rate: 5.0, ..GenConfig::default() })
            .unwrap();
    let half = Trace { models: full.models.clone(), ops: full.ops[..100_000].to_vec() };
    let catalogue = full.models.iter().map(|m| m.size.unwrap()).sum::<u64>();
    let quarter_of_catalogue = catalogue / 4;
    // LRU only: GDSF, LFU and the Belady baselines keep their order in a BTreeSet, whose nodes
    // are allocated and freed as keys move (a policy-internal cost, not the replay's).
    for p in [PolicyChoice::LRU] {
        for cfg in [
            SimConfig::instant(quarter_of_catalogue, 1000, p),
            SimConfig { limit: catalogue * 2 / 3, max_models: 1000, policy: p, ..SimConfig::default() },
        ] {
            let (a, rej_a) = allocations(&half, &cfg);
            let (b, rej_b) = allocations(&full, &cfg);
            // No 503s here (each would be a request dropped with nothing to compare).
            assert_eq!((rej_a, rej_b), (0, 0), "{p}");
            // 100 000 more requests (tens of thousands of them misses): a handful of buffer
            // growths at most.
            assert!(b.saturating_sub(a) < 40, "{p}: {a} allocations for 100k requests, {b} for 200k");
        }
    }
}
