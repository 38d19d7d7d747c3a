//! `PoolState::serve_instant` against the sequence of calls its contract names (admit_request,
//! reclaimed per victim, load_finished, reclaimed per overcommit victim, release, reclaimed),
//! on two pools driven side by side through random operations: requests, pins and unpins,
//! lowered and raised limits, loads that measure above their estimate, and (with `predictive`)
//! preloads left loading so that requests join them or cancel them. After every operation the
//! two pools must agree on counters, ledger, every model's status, unloads and the decision log
//! (its count with the log off; every event with it on).

use modelpool::{
    Admission, EvictionPolicy, GB, Gdsf, Intent, Lfu, LogMode, Lru, ModelSpec, NameEstimator, Phase,
    PoolConfig, PoolState, Predictive, Served, Slot,
};

/// xorshift64*: a fixed, dependency-free stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

type Pool<P> = PoolState<P, NameEstimator>;

/// Report `victims` reclaimed at `now`, in order, into `out`.
fn reclaim_all<P: EvictionPolicy>(st: &mut Pool<P>, victims: &[Slot], now: u64, out: &mut Vec<Slot>) {
    for &v in victims {
        st.reclaimed(v, now);
        out.push(v);
    }
}

/// A load `st` admitted finished at `now` measuring `measured`: its evictions reclaimed, the
/// leases it granted ended at once.
fn finish<P: EvictionPolicy>(st: &mut Pool<P>, slot: Slot, now: u64, measured: u64, out: &mut Vec<Slot>) {
    let done = st.load_finished(slot, now, Ok(measured));
    reclaim_all(st, &done.evicted, now, out);
    for _ in 0..done.leases_granted {
        if st.release(slot, now, now) {
            reclaim_all(st, &[slot], now, out);
        }
    }
}

/// Carry out `admission` of a request or preload for `slot` at `now` as an instant driver does.
fn carry_out<P: EvictionPolicy>(
    st: &mut Pool<P>,
    slot: Slot,
    now: u64,
    measured: u64,
    request: bool,
    admission: Admission,
    out: &mut Vec<Slot>,
) {
    match admission {
        Admission::Hit if request && st.release(slot, now, now) => reclaim_all(st, &[slot], now, out),
        Admission::Load(plan) => {
            reclaim_all(st, &plan.victims, now, out);
            // The request's lease is among those the landing grants (and `finish` ends).
            finish(st, slot, now, measured, out);
        }
        // A join is granted its lease when the preload lands (`finish`); the rest change nothing
        // a driver must carry out here.
        _ => {}
    }
    let unloads = st.take_unloads();
    reclaim_all(st, &unloads, now, out);
}

fn same<P: EvictionPolicy>(a: &Pool<P>, b: &Pool<P>, what: &str) {
    assert_eq!(a.stats(), b.stats(), "{what}");
    assert_eq!(a.ledger(), b.ledger(), "{what}");
    assert_eq!(a.models_status(), b.models_status(), "{what}");
    assert_eq!(a.log().total(), b.log().total(), "{what}");
    assert!(a.log().events().eq(b.log().events()), "{what}");
    a.check_invariants().unwrap();
}

fn drive<P: EvictionPolicy>(name: &str, policy: impl Fn() -> P, log: LogMode, seed: u64) {
    let mut rng = Rng(seed);
    let models = 12;
    let limit = (8 + rng.below(40)) * GB;
    let cfg = PoolConfig { log, max_models: 2 + rng.below(8) as usize, ..PoolConfig::with_limit(limit) };
    let (mut a, mut b) =
        (Pool::new(cfg.clone(), policy(), NameEstimator), Pool::new(cfg, policy(), NameEstimator));
    let mut measured = Vec::new();
    for m in 0..models {
        let hint = (1 + rng.below(12)) * GB;
        // One model in four measures more than its estimate (overcommit), one in four less.
        let size = match rng.below(4) {
            0 => hint + hint / 2,
            1 => hint / 2,
            _ => hint,
        };
        let spec = ModelSpec::new(format!("m{m}")).with_size(hint);
        assert_eq!(a.register(spec.clone()), b.register(spec));
        measured.push(size);
    }
    let (mut ua, mut ub) = (Vec::new(), Vec::new());
    let mut now = 0u64;
    for step in 0..3000 {
        now += rng.below(3) * 1_000_000_000;
        let slot = rng.below(models) as Slot;
        let m = measured[slot as usize];
        let what = format!("{name}, {log:?}, seed {seed}, step {step}");
        match rng.below(100) {
            0..=79 => {
                let served = a.serve_instant(slot, now, m, |v| ua.push(v));
                let admission = b.admit_request(slot, now, 0);
                match served {
                    Served::Hit => assert!(matches!(admission, Admission::Hit), "{what}"),
                    Served::Loaded => assert!(matches!(admission, Admission::Load(_)), "{what}"),
                    Served::Admitted(ref x) => assert_eq!(x, &admission, "{what}"),
                }
                if let Served::Admitted(x) = served {
                    carry_out(&mut a, slot, now, m, true, x, &mut ua);
                }
                carry_out(&mut b, slot, now, m, true, admission, &mut ub);
            }
            80..=84 => {
                for (st, out) in [(&mut a, &mut ua), (&mut b, &mut ub)] {
                    let admission = st.admit(slot, now, Intent::Preload);
                    carry_out(st, slot, now, m, false, admission, out);
                }
            }
            85..=89 => {
                for (st, out) in [(&mut a, &mut ua), (&mut b, &mut ub)] {
                    let (_, victims) = st.unpin(slot, now);
                    reclaim_all(st, &victims, now, out);
                }
            }
            90..=92 => {
                let (limit, max) = ((4 + rng.below(44)) * GB, 1 + rng.below(9) as usize);
                for (st, out) in [(&mut a, &mut ua), (&mut b, &mut ub)] {
                    let evicted = st.set_limits(limit, max, now).unwrap();
                    reclaim_all(st, &evicted.unload_now, now, out);
                }
            }
            93..=96 => {
                // Start a predictive preload (the predictive policy finds candidates), left loading.
                let (pa, pb) =
                    (a.predictive_preload(now, 30_000_000_000), b.predictive_preload(now, 30_000_000_000));
                assert_eq!(pa, pb, "{what}");
            }
            _ => {
                // Land a preload still loading (one that was not cancelled).
                if a.phase(slot) == Phase::Loading {
                    for (st, out) in [(&mut a, &mut ua), (&mut b, &mut ub)] {
                        finish(st, slot, now, m, out);
                    }
                }
            }
        }
        // Cancelled preloads: the driver stops the load and reports the memory back.
        for s in 0..models as Slot {
            if a.is_cancelled_load(s) {
                assert!(b.is_cancelled_load(s), "{what}");
                reclaim_all(&mut a, &[s], now, &mut ua);
                reclaim_all(&mut b, &[s], now, &mut ub);
            }
        }
        assert_eq!(ua, ub, "{what}");
        same(&a, &b, &what);
    }
    assert!(a.stats().loads > 0 && a.stats().hits > 0, "{name}: the pools must load and hit");
}

#[test]
fn serve_instant_equals_its_call_sequence_on_random_pools() {
    for seed in 1..=6u64 {
        for log in [LogMode::Off, LogMode::Full] {
            drive("lru", Lru::new, log, seed);
            drive("gdsf", Gdsf::new, log, seed);
            drive("lfu", Lfu::new, log, seed);
            drive("predictive", Predictive::new, log, seed);
            drive("boxed lru", || Box::new(Lru::new()) as Box<dyn EvictionPolicy>, log, seed);
        }
    }
}
