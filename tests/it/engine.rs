//! Decision-core behaviours beyond the seed: nothing evicted for nothing, leases, max_models,
//! runtime limits, reservations, measured sizes, draining, idle expiry.

use crate::common::*;
use modelpool::{Admission, EvictReason, GB, Intent, Phase, RejectCode};

#[test]
fn no_eviction_when_the_load_would_fail_anyway() {
    let mut st = state(10.0);
    let a = reg_sized(&mut st, "a", 3.0);
    let b = reg_sized(&mut st, "b", 3.0);
    let c = reg_sized(&mut st, "c", 3.0);
    let big = reg_sized(&mut st, "big", 8.0);
    touch(&mut st, a, s(1));
    touch(&mut st, b, s(2));
    request(&mut st, c, s(3)); // c stays busy
    let before = st.ledger();
    let adm = st.admit(big, s(4), Intent::Request);
    let Admission::Reject(r) = adm else { panic!("{adm:?}") };
    assert_eq!(r.code, RejectCode::InsufficientMemory);
    // 10 GB limit, 3 GB busy: 7 GB could be made available.
    assert_eq!((r.need, r.available), (8 * GB, 7 * GB));
    assert_eq!(st.ledger(), before, "a rejected admission changed the ledger");
    assert_eq!(st.stats().total_evictions(), 0);
    assert_eq!([st.phase(a), st.phase(b)], [Phase::Resident, Phase::Resident]);
}

#[test]
fn too_large_for_limit_minus_pins_has_no_retry() {
    let mut st = state(10.0);
    let p = reg_sized(&mut st, "pinned", 4.0);
    preload(&mut st, p, s(0));
    let huge = reg_sized(&mut st, "huge", 7.0);
    let Admission::Reject(r) = st.admit(huge, s(1), Intent::Request) else { panic!() };
    assert_eq!(r.code, RejectCode::ModelTooLarge);
    assert_eq!(r.retry_after_secs, None);
    assert_eq!(r.available, 6 * GB);
    let msg = r.into_error("huge".into(), 4).to_string();
    assert_eq!(msg, "Model too large: 'huge' needs 7.0GB but the limit minus pinned models leaves 6.0GB");
}

#[test]
fn a_leased_model_is_never_evicted() {
    let mut st = state(8.0);
    let busy = reg_sized(&mut st, "busy", 4.0);
    let idle = reg_sized(&mut st, "idle", 4.0);
    let next = reg_sized(&mut st, "next", 4.0);
    request(&mut st, busy, s(1)); // oldest, but leased
    touch(&mut st, idle, s(2));
    let a = touch(&mut st, next, s(3));
    assert_eq!(victim_names(&st, &a), vec!["idle"]);
    assert_eq!(st.phase(busy), Phase::Resident);
    assert_eq!(st.leases(busy), 1);
}

#[test]
fn loads_in_progress_hold_their_reservation() {
    let mut st = state(10.0);
    let a = reg_sized(&mut st, "a", 6.0);
    let b = reg_sized(&mut st, "b", 6.0);
    assert!(matches!(st.admit(a, s(1), Intent::Request), Admission::Load(_)));
    assert_eq!(st.ledger().reserved, 6 * GB);
    // A second load of a different model cannot over-commit: the first one's bytes are taken.
    let Admission::Reject(r) = st.admit(b, s(1), Intent::Request) else { panic!() };
    assert_eq!(r.code, RejectCode::InsufficientMemory);
    assert!(r.retry_after_secs.unwrap() >= 1);
    // Joining the same model is single-flight.
    assert_eq!(st.admit(a, s(2), Intent::Request), Admission::Join);
    let done = st.load_finished(a, s(3), Ok(6 * GB));
    assert_eq!(done.leases_granted, 2);
    assert_eq!(st.ledger().reserved, 0);
    assert_eq!(st.ledger().resident, 6 * GB);
}

#[test]
fn a_failed_load_releases_its_reservation_and_waiters() {
    let mut st = state(10.0);
    let a = reg_sized(&mut st, "a", 6.0);
    assert!(matches!(st.admit(a, s(1), Intent::Request), Admission::Load(_)));
    assert_eq!(st.admit(a, s(1), Intent::Request), Admission::Join);
    let done = st.load_finished(a, s(2), Err("disk on fire"));
    assert_eq!(done.leases_granted, 0);
    assert_eq!(st.ledger().used(), 0);
    assert_eq!(st.ledger().models, 0);
    assert_eq!(st.phase(a), Phase::Absent);
    assert_eq!(st.stats().load_failures, 1);
    st.check_invariants().unwrap();
}

#[test]
fn max_models_is_enforced_like_memory() {
    let mut st = state(100.0);
    st.set_limits(100 * GB, 2, 0).unwrap();
    let m: Vec<_> = ["a", "b", "c"].iter().map(|n| reg_sized(&mut st, n, 1.0)).collect();
    touch(&mut st, m[0], s(1));
    request(&mut st, m[1], s(2)); // busy
    let a = touch(&mut st, m[2], s(3));
    assert_eq!(victim_names(&st, &a), vec!["a"]);
    assert_eq!(st.stats().evictions_for(EvictReason::MaxModels), 1);
    // Now both resident models are busy or just used; make c busy too: no slot can be freed.
    request(&mut st, m[2], s(4));
    let Admission::Reject(r) = st.admit(m[0], s(5), Intent::Request) else { panic!() };
    assert_eq!(r.code, RejectCode::MaxModels);
    assert!(r.retry_after_secs.is_some());
    assert_eq!(st.ledger().models, 2);
}

#[test]
fn lowering_the_limit_evicts_down_to_it() {
    let mut st = state(12.0);
    let p = reg_sized(&mut st, "pinned", 3.0);
    let a = reg_sized(&mut st, "a", 3.0);
    let b = reg_sized(&mut st, "b", 3.0);
    let busy = reg_sized(&mut st, "busy", 3.0);
    preload(&mut st, p, s(0));
    touch(&mut st, a, s(1));
    touch(&mut st, b, s(2));
    request(&mut st, busy, s(3));
    let evicted = st.set_limits(7 * GB, 4, s(4)).unwrap();
    assert!(evicted.drained.is_empty());
    let idle = evicted.unload_now;
    // 12 GB used; two idle victims bring it to 6 GB, within 7 GB: busy and pinned stay.
    assert_eq!(idle.iter().map(|&v| st.spec(v).id.to_string()).collect::<Vec<_>>(), vec!["a", "b"]);
    for &v in &idle {
        st.reclaimed(v, s(4));
    }
    assert_eq!(st.ledger().used(), 6 * GB);
    // Below what pinned + busy hold: the busy model drains, the pinned one stays.
    let evicted = st.set_limits(2 * GB, 4, s(5)).unwrap();
    assert!(evicted.unload_now.is_empty());
    assert_eq!(evicted.drained.as_slice(), &[busy]);
    assert_eq!(st.phase(busy), Phase::Draining);
    assert_eq!(st.phase(p), Phase::Resident);
    // A new request for the draining model is refused with a retry hint, not served.
    let Admission::Reject(r) = st.admit(busy, s(5), Intent::Request) else { panic!() };
    assert_eq!(r.code, RejectCode::Draining);
    // Its last lease ends: the driver is told to unload it.
    assert!(st.release(busy, s(6), s(3)));
    st.reclaimed(busy, s(6));
    assert_eq!(st.ledger().used(), 3 * GB);
    assert!(st.set_limits(0, 4, s(7)).is_err());
    assert!(st.set_limits(GB, 0, s(7)).is_err());
    st.check_invariants().unwrap();
}

#[test]
fn measured_size_replaces_the_estimate_and_overcommit_evicts() {
    let mut st = state(10.0);
    let a = reg_sized(&mut st, "a", 4.0);
    let b = reg_sized(&mut st, "b", 4.0);
    touch(&mut st, a, s(1));
    // b is estimated at 4 GB but measures 7 GB: the pool is over (11 > 10) and evicts idle a.
    let Admission::Load(plan) = st.admit(b, s(2), Intent::Request) else { panic!() };
    assert!(plan.victims.is_empty());
    let done = st.load_finished(b, s(3), Ok(7 * GB));
    assert_eq!(done.evicted.len(), 1);
    assert_eq!(st.spec(done.evicted[0]).id.as_ref(), "a");
    st.reclaimed(done.evicted[0], s(3));
    assert_eq!(st.ledger().resident, 7 * GB);
    // The next admission of b reserves the measured size, not the estimate.
    st.release(b, s(4), s(3));
    st.unload(b, s(5), false).unwrap();
    st.reclaimed(b, s(5));
    assert_eq!(st.need(b), 7 * GB);
    st.check_invariants().unwrap();
}

#[test]
fn victims_hold_the_reservation_until_reclaimed() {
    let mut st = state(10.0);
    let a = reg_sized(&mut st, "a", 6.0);
    let b = reg_sized(&mut st, "b", 6.0);
    touch(&mut st, a, s(1));
    let Admission::Load(plan) = st.admit(b, s(2), Intent::Request) else { panic!() };
    assert_eq!(plan.victims.len(), 1);
    // a's memory is not back yet: it is draining and b's reservation waits for it.
    let l = st.ledger();
    assert_eq!((l.draining, l.reserved, l.used()), (6 * GB, 0, 6 * GB));
    assert_eq!(st.reclaimed(a, s(3)), Some(b), "b may start once its only victim is gone");
    let l = st.ledger();
    assert_eq!((l.draining, l.reserved), (0, 6 * GB));
    st.check_invariants().unwrap();
}

#[test]
fn unload_refuses_pinned_and_busy_unless_forced() {
    let mut st = state(10.0);
    let p = reg_sized(&mut st, "p", 2.0);
    let busy = reg_sized(&mut st, "busy", 2.0);
    preload(&mut st, p, s(0));
    request(&mut st, busy, s(1));
    let e = st.unload(p, s(2), false).unwrap_err();
    assert!(e.to_string().contains("pinned"), "{e}");
    let e = st.unload(busy, s(2), false).unwrap_err();
    assert!(e.to_string().contains("1 request(s) in flight"), "{e}");
    assert_eq!(st.unload(p, s(3), true), Ok(true));
    assert_eq!(st.unload(busy, s(3), true), Ok(false), "busy: drains until its lease ends");
    assert!(st.release(busy, s(4), s(1)));
    st.reclaimed(p, s(4));
    st.reclaimed(busy, s(4));
    assert_eq!(st.ledger().used(), 0);
    assert!(st.unload(p, s(5), true).is_err(), "not loaded");
}

#[test]
fn idle_models_expire_after_their_last_request_ends() {
    let st = state(10.0);
    let mut cfg = st.config().clone();
    cfg.idle_ttl = Some(s(60));
    let mut st = modelpool::PoolState::new(cfg, modelpool::Lru::new(), modelpool::NameEstimator);
    let a = reg_sized(&mut st, "a", 1.0);
    let b = reg_sized(&mut st, "b", 1.0);
    let p = reg_sized(&mut st, "p", 1.0);
    preload(&mut st, p, s(0));
    request(&mut st, a, s(0));
    touch(&mut st, b, s(0));
    // a's request runs for 100 s: the TTL counts from its end, not its start.
    assert!(st.expire_idle(s(61)).iter().map(|&v| st.spec(v).id.to_string()).eq(["b"]));
    st.release(a, s(100), s(0));
    assert!(st.expire_idle(s(159)).is_empty());
    assert_eq!(st.expire_idle(s(160)).len(), 1);
    assert_eq!(st.phase(p), Phase::Resident, "pinned models never expire");
}

#[test]
fn preview_changes_nothing() {
    let mut st = state(8.0);
    let a = reg_sized(&mut st, "a", 4.0);
    let b = reg_sized(&mut st, "b", 4.0);
    let c = reg_sized(&mut st, "c", 4.0);
    touch(&mut st, a, s(1));
    touch(&mut st, b, s(2));
    let before = (st.ledger(), st.stats().clone(), st.log().total());
    let p = st.preview(c, s(3));
    assert_eq!(victim_names(&st, &p), vec!["a"]);
    assert_eq!(before, (st.ledger(), st.stats().clone(), st.log().total()));
}

#[test]
fn retry_hints_follow_how_long_requests_run() {
    let mut st = state(8.0);
    let a = reg_sized(&mut st, "a", 5.0);
    let b = reg_sized(&mut st, "b", 5.0);
    // Requests on a typically take 4 s.
    for t in [0, 10, 20] {
        request(&mut st, a, s(t));
        st.release(a, s(t + 4), s(t));
    }
    request(&mut st, a, s(100));
    let hint = |st: &mut State, now| match st.admit(b, now, Intent::Request) {
        Admission::Reject(r) => r.retry_after_secs.unwrap(),
        other => panic!("{other:?}"),
    };
    // One second into a typical 4 s request: about 3 s left.
    assert_eq!(hint(&mut st, s(101)), 3);
    // Thirty seconds in, it is a long one: expect as long again, not a useless 1 s.
    assert_eq!(hint(&mut st, s(130)), 30);
}

#[test]
fn limits_and_sizes_near_u64_max_plan_without_overflow() {
    // The largest limit `--memory-limit` accepts is just under 2^64 bytes; a model may be
    // registered at any size up to it. Admission must still plan (evict 'a'), not wrap around.
    const EB: u64 = 1_000_000_000_000_000_000;
    let mut st = state(1.0);
    st.set_limits(18 * EB, 4, 0).unwrap();
    let a = st.register(modelpool::ModelSpec::new("a").with_size(10 * EB));
    let b = st.register(modelpool::ModelSpec::new("b").with_size(10 * EB));
    touch(&mut st, a, s(1));
    let Admission::Load(plan) = st.admit(b, s(2), Intent::Request) else { panic!("b should load") };
    assert_eq!(plan.victims.as_slice(), &[a], "b fits only once a is evicted");
    assert_eq!(st.stats().evictions_for(EvictReason::Capacity), 1);
    st.check_invariants().unwrap();
    assert!(st.ledger().used() <= st.ledger().limit);
}

#[test]
fn admission_does_not_overcommit_when_used_plus_need_passes_u64_max() {
    // Issue 14.1: `used + need` above 2^64 must not saturate into a too-small shortfall.
    let mut st = state(1.0);
    st.set_limits(u64::MAX - 2047, 4, 0).unwrap();
    let a = st.register(modelpool::ModelSpec::new("a").with_size(1 << 63));
    let b = st.register(modelpool::ModelSpec::new("b").with_size(4096));
    let c = st.register(modelpool::ModelSpec::new("c").with_size(1 << 63));
    request(&mut st, a, s(1)); // loaded and leased
    touch(&mut st, b, s(2)); // loaded and released
    let before = st.ledger();
    let adm = st.admit(c, s(3), Intent::Request);
    let Admission::Reject(r) = adm else { panic!("c must be refused, got {adm:?}") };
    assert_eq!(r.code, RejectCode::InsufficientMemory);
    assert_eq!(st.ledger(), before, "nothing evicted for nothing");
    assert_eq!(st.phase(b), Phase::Resident);
    // Evicting b (4096 bytes) leaves limit - 2^63 = 2^63 - 2048 bytes: 2048 short.
    assert_eq!(r.available, (1 << 63) - 2048);
    st.check_invariants().unwrap();

    // With a limit of u64::MAX and no victim at all, the same.
    let mut st = state(1.0);
    st.set_limits(u64::MAX, 4, 0).unwrap();
    let a = st.register(modelpool::ModelSpec::new("a").with_size(1 << 63));
    let c = st.register(modelpool::ModelSpec::new("c").with_size(1 << 63));
    request(&mut st, a, s(1));
    let Admission::Reject(r) = st.admit(c, s(2), Intent::Request) else { panic!("c must be refused") };
    assert_eq!((r.code, r.available), (RejectCode::InsufficientMemory, (1 << 63) - 1));
}

#[test]
fn a_measured_size_near_u64_max_cannot_wrap_the_ledger() {
    // Issue 14.1: `resident += measured` for a load that measures far above its estimate.
    let mut st = state(1.0);
    st.set_limits(u64::MAX, 4, 0).unwrap();
    let a = st.register(modelpool::ModelSpec::new("a").with_size(1 << 63));
    let b = st.register(modelpool::ModelSpec::new("b").with_size(1 << 62));
    request(&mut st, a, s(1));
    let Admission::Load(_) = st.admit(b, s(2), Intent::Request) else { panic!("b fits") };
    st.load_finished(b, s(3), Ok(u64::MAX));
    st.check_invariants().unwrap();
    let l = st.ledger();
    assert_eq!(l.used(), u64::MAX, "the measurement is clamped to what the ledger can count: {l:?}");
    assert_eq!(st.stats().bytes_loaded, u64::MAX, "the byte counter saturates");
}

#[test]
fn every_slot_pinned_is_max_models_reached_without_retry() {
    // Issue 14.2: pinned models are never evicted, so a retry hint would loop clients forever.
    let mut st = state(10.0);
    st.set_limits(10 * GB, 1, 0).unwrap();
    let p = reg_sized(&mut st, "pinned", 1.0);
    let other = reg_sized(&mut st, "other", 1.0);
    preload(&mut st, p, s(0));
    let before = st.ledger();
    let Admission::Reject(r) = st.admit(other, s(1), Intent::Request) else { panic!("no slot") };
    assert_eq!((r.code, r.retry_after_secs), (RejectCode::MaxModels, None));
    assert_eq!(st.ledger(), before);
    let err = r.into_error("other".into(), 1);
    assert_eq!(err.retry_after_secs(), None);
    assert_eq!(
        err.to_string(),
        "Too many models: 'other' cannot load while all 1 model slots are held by pinned models; unpin one or raise max_models"
    );
    // A busy (not pinned) slot is temporary: it keeps its retry hint.
    let mut st = state(10.0);
    st.set_limits(10 * GB, 1, 0).unwrap();
    let busy = reg_sized(&mut st, "busy", 1.0);
    let other = reg_sized(&mut st, "other", 1.0);
    request(&mut st, busy, s(0));
    let Admission::Reject(r) = st.admit(other, s(1), Intent::Request) else { panic!("no slot") };
    assert_eq!(r.code, RejectCode::MaxModels);
    assert!(r.retry_after_secs.is_some_and(|s| s >= 1));
    // Unpinning frees the slot for the next admission.
    let mut st = state(10.0);
    st.set_limits(10 * GB, 1, 0).unwrap();
    let p = reg_sized(&mut st, "pinned", 1.0);
    let other = reg_sized(&mut st, "other", 1.0);
    preload(&mut st, p, s(0));
    st.unpin(p, s(1));
    assert!(matches!(st.admit(other, s(2), Intent::Request), Admission::Load(_)));
    st.check_invariants().unwrap();
}

#[test]
fn a_request_for_a_model_whose_unload_runs_awaits_it_then_loads() {
    // Issue 14.3: an idle victim is being unloaded; a request for it waits, it is not refused.
    let mut st = state(6.0);
    let a = reg_sized(&mut st, "a", 4.0);
    let b = reg_sized(&mut st, "b", 4.0);
    touch(&mut st, a, s(1));
    let Admission::Load(plan) = st.admit(b, s(2), Intent::Request) else { panic!("b loads") };
    assert_eq!(plan.victims.as_slice(), &[a]);
    // a's unload is under way (not yet reclaimed).
    let before = st.ledger();
    assert_eq!(st.preview(a, s(2)), Admission::AwaitUnload);
    assert_eq!(st.admit(a, s(2), Intent::Request), Admission::AwaitUnload);
    assert_eq!(st.ledger(), before, "awaiting changes nothing");
    assert_eq!(st.stats().total_rejections(), 0, "no 503");
    // The unload ends; the waiting request is admitted again: a loads once b is done with.
    st.reclaimed(a, s(3));
    st.load_finished(b, s(3), Ok(4 * GB));
    st.release(b, s(4), s(3));
    let Admission::Load(plan) = st.admit(a, s(4), Intent::Request) else { panic!("a loads again") };
    assert_eq!(plan.victims.as_slice(), &[b]);
    st.check_invariants().unwrap();
    // A model drained while requests are still on it (a forced unload) stays refused.
    let mut st = state(10.0);
    let a = reg_sized(&mut st, "a", 4.0);
    request(&mut st, a, s(1));
    assert_eq!(st.unload(a, s(2), true), Ok(false));
    let Admission::Reject(r) = st.admit(a, s(3), Intent::Request) else { panic!("refused") };
    assert_eq!(r.code, RejectCode::Draining);
}
