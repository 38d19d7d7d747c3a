//! Seeded randomized invariant test of the decision core: thousands of interleaved requests,
//! preloads, load completions and failures, lease releases, unloads, pins and limit changes,
//! driven the way the async pool drives it (victims reclaimed before their load completes).
//!
//! Checked after every step: the ledger matches the entries; no pinned or leased model is ever
//! chosen as a victim of a load, an overcommit or expiry; a rejected admission changes nothing;
//! memory stays within the limit except where pinned or busy models are allowed to keep it over
//! (a lowered limit, a load that measured above its estimate); and every request ends in exactly
//! one outcome.
//!
//! The extreme-size runs use limits and model sizes near 2^64 bytes (and sizes of 0 and 1
//! byte), where any wrapping or saturating arithmetic in admission would overcommit or panic.

use std::collections::BTreeSet;

use modelpool::{
    Admission, Event, EvictReason, EvictionPolicy, GB, Intent, LogMode, ModelSpec, NameEstimator, Phase,
    PolicyKind, PoolConfig, PoolState, Slot,
};
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct PendingLoad {
    slot: Slot,
    victims: Vec<Slot>,
    /// KV bytes of each request waiting for the load.
    waiters: Vec<u64>,
}

#[derive(Default)]
struct Outcomes {
    requests: u64,
    hits: u64,
    rejected: u64,
    granted: u64,
    failed: u64,
    cancelled: u64,
    /// Requests that found their model's own unload under way (they would wait and retry).
    awaiting_unload: u64,
}

/// Sizes and limits for a run: ordinary gigabytes, or the extremes of `u64`.
#[derive(Clone, Copy, PartialEq)]
enum Scale {
    Gigabytes,
    Extreme,
}

impl Scale {
    fn model_size(self, rng: &mut ChaCha8Rng) -> u64 {
        match self {
            Scale::Gigabytes => rng.random_range(500_000_000..6 * GB),
            Scale::Extreme => match rng.random_range(0..6) {
                0 => rng.random_range(0..=1),
                1 => rng.random_range(2..=1 << 20),
                2 => 1 << 63,
                3 => u64::MAX - rng.random_range(0..=1 << 12),
                _ => rng.random_range(1 << 60..=1 << 63),
            },
        }
    }

    fn limit(self, rng: &mut ChaCha8Rng) -> u64 {
        match self {
            Scale::Gigabytes => rng.random_range(8..=24) * GB,
            Scale::Extreme => match rng.random_range(0..4) {
                0 => u64::MAX,
                1 => u64::MAX - rng.random_range(1..=2047),
                2 => 1 << 63,
                _ => rng.random_range(1 << 62..=u64::MAX),
            },
        }
    }
}

/// One randomized run; returns how many predictive preloads it cancelled.
fn run(seed: u64, kind: PolicyKind, steps: usize, scale: Scale) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let first_limit = if scale == Scale::Extreme { scale.limit(&mut rng) } else { 16 * GB };
    let mut cfg = PoolConfig::with_limit(first_limit);
    cfg.log = LogMode::Full;
    cfg.max_models = rng.random_range(2..=6);
    cfg.idle_ttl = Some(30_000_000_000);
    // Half the runs queue requests that would be refused (a 0 timeout: the queue is off).
    if seed % 2 == 1 {
        cfg.queue_timeout = rng.random_range(1..20) * 1_000_000_000;
        cfg.max_queue = rng.random_range(1..12);
    }
    let mut st: PoolState<Box<dyn EvictionPolicy>, NameEstimator> =
        PoolState::new(cfg, kind.build(), NameEstimator);
    let n_models = 12;
    for i in 0..n_models {
        let size = scale.model_size(&mut rng);
        st.register(ModelSpec::new(format!("m{i}")).with_size(size));
    }
    let mut pending: Vec<PendingLoad> = Vec::new();
    // (slot, acquired at, KV bytes)
    let mut leases: Vec<(Slot, u64, u64)> = Vec::new();
    let mut to_reclaim: Vec<Slot> = Vec::new();
    let mut out = Outcomes::default();
    let mut queued: Vec<modelpool::Ticket> = Vec::new();
    let mut over_allowed = false;
    let mut now = 0u64;
    // Two runs in three give requests a KV cache (up to half their model's size).
    let with_kv = !seed.is_multiple_of(3);

    for step in 0..steps {
        now += rng.random_range(1..2_000_000_000);
        let before = st.ledger();
        let pinned_before: Vec<bool> = (0..n_models).map(|s| st.is_pinned(s)).collect();
        let leased_before: Vec<u32> = (0..n_models).map(|s| st.leases(s)).collect();
        let log_before = st.log().total();
        let op = rng.random_range(0..100);
        // The model whose lease ends in this step (it may be evicted as its last lease ends).
        let mut released: Option<Slot> = None;
        // The model unpinned in this step (it may be evicted at once if the pool is over).
        let mut unpinned: Option<Slot> = None;
        let ctx = format!("seed {seed} {kind} step {step} op {op}");
        match op {
            // A request.
            0..=39 => {
                let slot = rng.random_range(0..n_models);
                out.requests += 1;
                let kv =
                    if with_kv && rng.random_bool(0.7) { rng.random_range(0..=st.need(slot) / 2) } else { 0 };
                let preview = st.preview(slot, now);
                let admission = st.admit_request(slot, now, kv);
                if kv == 0 {
                    assert_eq!(preview, admission, "{ctx}: the dry run and the admission disagree");
                }
                let kv_short = kv > 0 && matches!(before_phase(&preview), Phase::Resident | Phase::Loading);
                match admission {
                    Admission::Hit => {
                        out.hits += 1;
                        leases.push((slot, now, kv));
                        let used = st.ledger().used();
                        assert!(used <= before.limit.max(before.used()), "{ctx}: a hit's KV over-committed");
                    }
                    Admission::Join => {
                        pending.iter_mut().find(|p| p.slot == slot).expect(&ctx).waiters.push(kv);
                        let used = st.ledger().used();
                        assert!(used <= before.limit.max(before.used()), "{ctx}: a join's KV over-committed");
                    }
                    Admission::Load(plan) => {
                        let used = st.ledger().used();
                        assert!(used <= before.limit.max(before.used()), "{ctx}: admission over-committed");
                        assert_eq!(plan.kv, kv, "{ctx}: the plan reserves the request's KV");
                        pending.push(PendingLoad { slot, victims: plan.victims.to_vec(), waiters: vec![kv] });
                    }
                    Admission::Queued(ticket) => {
                        if !kv_short {
                            assert_eq!(st.ledger(), before, "{ctx}: queueing changed the ledger");
                        }
                        queued.push(ticket);
                    }
                    Admission::AwaitUnload => {
                        out.awaiting_unload += 1;
                        if kv_short && st.phase(slot) != Phase::Draining {
                            // Its KV fits once draining memory is back.
                            let l = st.ledger();
                            assert!(l.committed() + kv <= l.limit, "{ctx}: awaits memory that will not come");
                            assert!(l.draining > 0, "{ctx}: awaits an unload when none runs");
                        } else {
                            assert_eq!(
                                st.phase(slot),
                                Phase::Draining,
                                "{ctx}: awaits an unload that is not running"
                            );
                            assert_eq!(st.leases(slot), 0, "{ctx}: awaits the unload of a busy model");
                            assert_eq!(st.ledger(), before, "{ctx}: awaiting an unload changed the ledger");
                        }
                    }
                    Admission::Reject(r) => {
                        out.rejected += 1;
                        assert_ne!(
                            (st.phase(slot), st.leases(slot)),
                            (Phase::Draining, 0),
                            "{ctx}: refused a model whose unload is running"
                        );
                        assert_eq!(st.ledger(), before, "{ctx}: a rejection changed the ledger");
                        assert!(
                            r.code != modelpool::RejectCode::ModelTooLarge || r.retry_after_secs.is_none()
                        );
                    }
                }
            }
            // An operator's preload, or (with a predicting policy) a predictive one.
            40..=42 => {
                let slot = rng.random_range(0..n_models);
                if rng.random_bool(0.5) {
                    if let Admission::Load(plan) = st.admit(slot, now, Intent::Preload) {
                        pending.push(PendingLoad {
                            slot,
                            victims: plan.victims.to_vec(),
                            waiters: Vec::new(),
                        });
                    }
                } else if let Some(p) = st.predictive_preload(now, 120_000_000_000) {
                    assert_eq!(st.ledger().used(), before.used() + st.need(p), "{ctx}: a preload evicted");
                    assert!(st.ledger().used() <= st.ledger().limit, "{ctx}: a preload over-committed");
                    pending.push(PendingLoad { slot: p, victims: Vec::new(), waiters: Vec::new() });
                }
            }
            // A victim's memory comes back.
            43..=54 => {
                if let Some(p) = pending.iter_mut().find(|p| !p.victims.is_empty()) {
                    let v = p.victims.remove(0);
                    st.reclaimed(v, now);
                } else if !to_reclaim.is_empty() {
                    let v = to_reclaim.swap_remove(rng.random_range(0..to_reclaim.len()));
                    st.reclaimed(v, now);
                }
            }
            // A load whose victims are gone completes, or fails.
            55..=69 => {
                if let Some(i) = pending.iter().position(|p| p.victims.is_empty()) {
                    let p = pending.swap_remove(i);
                    let ok = rng.random_bool(0.85);
                    let reserve = st.need(p.slot);
                    let result = if ok {
                        Ok((reserve as f64 * rng.random_range(0.7..1.3)) as u64)
                    } else {
                        Err("injected")
                    };
                    let done = st.load_finished(p.slot, now, result);
                    if ok {
                        assert_eq!(
                            done.leases_granted as usize,
                            p.waiters.len(),
                            "{ctx}: waiters and leases differ"
                        );
                        out.granted += p.waiters.len() as u64;
                        leases.extend(p.waiters.iter().map(|&kv| (p.slot, now, kv)));
                        to_reclaim.extend(done.evicted.iter().copied());
                        if st.ledger().used() > st.ledger().limit {
                            over_allowed = true;
                        }
                    } else {
                        out.failed += p.waiters.len() as u64;
                    }
                }
            }
            // A request ends.
            70..=84 => {
                if !leases.is_empty() {
                    let (slot, at, kv) = leases.swap_remove(rng.random_range(0..leases.len()));
                    released = Some(slot);
                    if st.release_request(slot, now, at, kv) {
                        to_reclaim.push(slot);
                    }
                }
            }
            // A waiter goes away.
            85..=86 => {
                if !queued.is_empty() && rng.random_bool(0.5) {
                    let t = queued.swap_remove(rng.random_range(0..queued.len()));
                    assert!(st.cancel_queued(t, now), "{ctx}: a queued ticket must be cancellable");
                    out.cancelled += 1;
                } else if let Some(p) = pending.iter_mut().find(|p| !p.waiters.is_empty()) {
                    let kv = p.waiters.swap_remove(rng.random_range(0..p.waiters.len()));
                    out.cancelled += 1;
                    st.cancel_wait(p.slot, kv);
                }
            }
            87 => {
                to_reclaim.extend(st.expire_idle(now).iter().copied());
                st.queue_tick(now);
            }
            88..=89 => {
                let slot = rng.random_range(0..n_models);
                unpinned = Some(slot);
                let (_, evicted) = st.unpin(slot, now);
                to_reclaim.extend(evicted.iter().copied());
            }
            90..=94 => {
                let slot = rng.random_range(0..n_models);
                if let Ok(true) = st.unload(slot, now, rng.random_bool(0.5)) {
                    to_reclaim.push(slot);
                }
            }
            _ => {
                let limit = scale.limit(&mut rng);
                let max = rng.random_range(2..=6);
                let evicted = st.set_limits(limit, max, now).unwrap();
                to_reclaim.extend(evicted.unload_now.iter().copied());
                over_allowed = true;
            }
        }
        // Queued requests whose turn came, carried out as the pool does.
        let wakes: Vec<modelpool::Wake> = st.take_wakes().collect();
        for w in wakes {
            let i =
                queued.iter().position(|&t| t == w.ticket).unwrap_or_else(|| panic!("{ctx}: unknown ticket"));
            queued.swap_remove(i);
            let waited = now.saturating_sub(w.queued_at);
            match &w.outcome {
                Admission::Reject(r) if r.code == modelpool::RejectCode::QueueTimeout => {
                    assert!(waited >= st.config().queue_timeout, "{ctx}: timed out early")
                }
                _ => assert!(waited < st.config().queue_timeout, "{ctx}: admitted past its timeout"),
            }
            match w.outcome {
                Admission::Hit => {
                    out.hits += 1;
                    leases.push((w.slot, now, w.kv));
                }
                Admission::Join => {
                    pending.iter_mut().find(|p| p.slot == w.slot).expect(&ctx).waiters.push(w.kv)
                }
                Admission::Load(plan) => pending.push(PendingLoad {
                    slot: w.slot,
                    victims: plan.victims.to_vec(),
                    waiters: vec![w.kv],
                }),
                Admission::Reject(_) => out.rejected += 1,
                other => panic!("{ctx}: a wake is decided, got {other:?}"),
            }
        }
        assert_eq!(st.queue_len(), queued.len(), "{ctx}: every queued request is accounted for");
        // Idle models the core evicted for a request's KV: the driver unloads them.
        to_reclaim.extend(st.take_unloads());
        // Predictive preloads a plan cancelled: their loads stop (never finished); their memory
        // comes back as the plan's (or the unload list's) victim.
        pending.retain(|p| {
            let cancelled = st.is_cancelled_load(p.slot);
            assert!(!cancelled || p.waiters.is_empty(), "{ctx}: cancelled a preload a request waits on");
            !cancelled
        });
        st.check_invariants().unwrap_or_else(|e| panic!("{ctx}: {e}"));
        // Victims of loads, overcommit and expiry were neither pinned nor leased.
        let new_events: Vec<&Event> = st.log().events().skip(log_before as usize).collect();
        for e in new_events {
            if let Event::Evict { model, reason, .. } = e {
                let s = st.slot(model).unwrap() as usize;
                if matches!(
                    reason,
                    EvictReason::Capacity
                        | EvictReason::MaxModels
                        | EvictReason::Overcommit
                        | EvictReason::Expired
                ) {
                    assert!(
                        !pinned_before[s] || unpinned == Some(s as Slot),
                        "{ctx}: evicted pinned {model} ({reason:?})"
                    );
                    let last_lease_ended = released == Some(s as Slot) && leased_before[s] == 1;
                    assert!(
                        leased_before[s] == 0 || last_lease_ended,
                        "{ctx}: evicted leased {model} ({reason:?})"
                    );
                    assert_eq!(st.leases(s as Slot), 0, "{ctx}: evicted {model} with live leases");
                }
            }
        }
        let l = st.ledger();
        if l.used() <= l.limit {
            over_allowed = false;
        }
        assert!(l.used() <= l.limit || over_allowed, "{ctx}: over the limit without cause: {l:?}");
        // While over, everything still resident is pinned or busy, or memory is on its way back.
        if l.used() > l.limit {
            let idle_unpinned = (0..n_models)
                .filter(|&s| st.phase(s) == Phase::Resident && !st.is_pinned(s) && st.leases(s) == 0)
                .count();
            assert!(idle_unpinned == 0 || l.committed() <= l.limit, "{ctx}: over with idle models {l:?}");
        }
        let leased: u32 = (0..n_models).map(|s| st.leases(s)).sum();
        assert_eq!(leased as usize, leases.len(), "{ctx}: lease count");
    }

    // Wind down: queued requests go away, every load completes, every request ends, every
    // draining model returns.
    out.cancelled += st.drain_queue().len() as u64;
    queued.clear();
    while let Some(p) = pending.pop() {
        for v in p.victims {
            st.reclaimed(v, now);
        }
        let done = st.load_finished(p.slot, now, Ok(st.need(p.slot)));
        out.granted += u64::from(done.leases_granted);
        leases.extend(p.waiters.iter().map(|&kv| (p.slot, now, kv)));
        to_reclaim.extend(done.evicted.iter().copied());
    }
    for (slot, at, kv) in leases.drain(..) {
        if st.release_request(slot, now, at, kv) {
            to_reclaim.push(slot);
        }
    }
    let mut seen = BTreeSet::new();
    for v in to_reclaim {
        if seen.insert(v) {
            st.reclaimed(v, now);
        }
    }
    st.check_invariants().unwrap();
    let l = st.ledger();
    assert_eq!((l.reserved, l.draining, l.kv), (0, 0, 0), "seed {seed} {kind}: {l:?}");
    // Every request ended exactly once: hit, rejected, granted after a load, failed, or gave up.
    assert_eq!(
        out.requests,
        out.hits + out.rejected + out.granted + out.failed + out.cancelled + out.awaiting_unload,
        "seed {seed} {kind}: requests and outcomes differ"
    );
    assert!(
        out.hits > 0 && out.rejected > 0 && out.granted > 0,
        "seed {seed} {kind}: the run exercised too little"
    );
    st.stats().preloads_cancelled
}

#[test]
fn randomized_invariants_hold_for_every_policy() {
    for kind in PolicyKind::ALL {
        let cancelled: u64 = (0..12).map(|seed| run(seed, kind, 3000, Scale::Gigabytes)).sum();
        // Only `predictive` predicts, so only it preloads (and has preloads to cancel).
        assert_eq!(cancelled > 0, kind == PolicyKind::Predictive, "{kind}: {cancelled} preloads cancelled");
    }
}

#[test]
fn randomized_invariants_hold_at_extreme_sizes() {
    for kind in PolicyKind::ALL {
        for seed in 0..12 {
            let _ = run(1000 + seed, kind, 3000, Scale::Extreme);
        }
    }
}

#[test]
fn randomized_runs_are_reproducible() {
    fn digest(seed: u64) -> String {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut st = crate::common::state(8.0);
        let slots: Vec<_> = (0..6)
            .map(|i| st.register(ModelSpec::new(format!("m{i}")).with_size(rng.random_range(GB..4 * GB))))
            .collect();
        for t in 0..500 {
            let s = slots[rng.random_range(0..slots.len())];
            crate::common::touch(&mut st, s, t);
        }
        serde_json::to_string(&st.log().events().collect::<Vec<_>>()).unwrap()
    }
    assert_eq!(digest(7), digest(7));
    assert_ne!(digest(7), digest(8));
    let _ = rand::rng().next_u32(); // the thread RNG exists but the runs above never use it
}

/// The phase a dry run implies (`Hit`: resident, `Join`: loading).
fn before_phase(preview: &Admission) -> Phase {
    match preview {
        Admission::Hit => Phase::Resident,
        Admission::Join => Phase::Loading,
        _ => Phase::Absent,
    }
}
