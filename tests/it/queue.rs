//! The admission queue in the decision core: who waits, in what order, for how long, and what a
//! waiter that goes away leaves behind.

use crate::common::*;
use modelpool::{
    Admission, GB, Intent, LogMode, Lru, NameEstimator, Phase, PoolConfig, PoolState, RejectCode, Wake,
};

/// A state with `limit_gb`, `max_models`, a queue of `timeout_s` seconds and room for `max`.
fn queued_state(limit_gb: u64, max_models: usize, timeout_s: u64, max: usize) -> State {
    let mut cfg = PoolConfig::with_limit(limit_gb * GB).with_queue(s(timeout_s), max);
    cfg.max_models = max_models;
    cfg.log = LogMode::Full;
    PoolState::new(cfg, Lru::new(), NameEstimator)
}

fn ticket(a: Admission) -> u64 {
    match a {
        Admission::Queued(t) => t,
        other => panic!("expected to be queued, got {other:?}"),
    }
}

fn wakes(st: &mut State) -> Vec<Wake> {
    st.take_wakes().collect()
}

#[test]
fn a_request_that_would_get_a_503_waits_and_loads_when_memory_frees() {
    let mut st = queued_state(10, 4, 30, 16);
    let a = reg_sized(&mut st, "a", 6.0);
    let b = reg_sized(&mut st, "b", 6.0);
    request(&mut st, a, s(1)); // a busy
    let before = st.ledger();
    let t = ticket(st.admit(b, s(2), Intent::Request));
    assert_eq!(st.ledger(), before, "waiting changes nothing");
    assert_eq!(st.stats().total_rejections(), 0, "no 503");
    assert_eq!(st.model_status(b).queued, 1);
    assert!(wakes(&mut st).is_empty());
    // a's request ends: b's turn, with a as its victim.
    st.release(a, s(5), s(1));
    let w = wakes(&mut st);
    assert_eq!(w.len(), 1);
    assert_eq!((w[0].ticket, w[0].slot, w[0].queued_at), (t, b, s(2)));
    let Admission::Load(plan) = &w[0].outcome else { panic!("{:?}", w[0].outcome) };
    assert_eq!(plan.victims.as_slice(), &[a]);
    assert_eq!(st.phase(b), Phase::Loading);
    assert_eq!(st.queue_len(), 0);
    st.check_invariants().unwrap();
}

#[test]
fn a_zero_timeout_refuses_at_once_as_before_the_queue() {
    let mut st = queued_state(10, 4, 0, 16);
    let a = reg_sized(&mut st, "a", 6.0);
    let b = reg_sized(&mut st, "b", 6.0);
    request(&mut st, a, s(1));
    let Admission::Reject(r) = st.admit(b, s(2), Intent::Request) else { panic!("refused") };
    assert_eq!(r.code, RejectCode::InsufficientMemory);
    assert!(r.retry_after_secs.is_some());
}

#[test]
fn refusals_waiting_cannot_cure_never_wait() {
    let mut st = queued_state(10, 4, 30, 16);
    let huge = reg_sized(&mut st, "huge", 11.0);
    let Admission::Reject(r) = st.admit(huge, s(1), Intent::Request) else { panic!("refused") };
    assert_eq!((r.code, r.retry_after_secs), (RejectCode::ModelTooLarge, None));
    // Preloads are admin actions: refused at once too.
    let a = reg_sized(&mut st, "a", 6.0);
    let b = reg_sized(&mut st, "b", 6.0);
    request(&mut st, a, s(1));
    assert!(matches!(st.admit(b, s(2), Intent::Preload), Admission::Reject(_)));
    assert_eq!(st.queue_len(), 0);
}

#[test]
fn a_full_queue_refuses_with_queue_full() {
    let mut st = queued_state(10, 4, 30, 1);
    let a = reg_sized(&mut st, "a", 6.0);
    let b = reg_sized(&mut st, "b", 6.0);
    let c = reg_sized(&mut st, "c", 6.0);
    request(&mut st, a, s(1));
    ticket(st.admit(b, s(2), Intent::Request));
    let Admission::Reject(r) = st.admit(c, s(2), Intent::Request) else { panic!("refused") };
    assert_eq!(r.code, RejectCode::QueueFull);
    assert!(r.retry_after_secs.is_some_and(|s| s >= 1));
    assert_eq!(st.stats().rejections_for(RejectCode::QueueFull), 1);
}

#[test]
fn a_waiter_times_out_at_its_deadline_with_queue_timeout() {
    let mut st = queued_state(10, 4, 20, 16);
    let a = reg_sized(&mut st, "a", 6.0);
    let b = reg_sized(&mut st, "b", 6.0);
    request(&mut st, a, s(1));
    let t = ticket(st.admit(b, s(2), Intent::Request));
    // The core names when it needs a tick: when the waiter starts starving, then its deadline.
    assert_eq!(st.next_queue_deadline(s(2)), Some(s(12)));
    assert_eq!(st.next_queue_deadline(s(12)), Some(s(22)));
    st.queue_tick(s(21));
    assert!(wakes(&mut st).is_empty(), "still within its timeout");
    st.queue_tick(s(22));
    let w = wakes(&mut st);
    let Admission::Reject(r) = &w[0].outcome else { panic!("{:?}", w[0].outcome) };
    assert_eq!((w[0].ticket, r.code, r.waited), (t, RejectCode::QueueTimeout, s(20)));
    assert!(r.retry_after_secs.is_some());
    let err = r.into_error("b".into(), 4);
    assert_eq!(
        err.to_string(),
        "Queue timeout: 'b' waited 20.0s for memory or a model slot held by in-flight requests"
    );
    assert_eq!(st.queue_len(), 0);
    assert_eq!(st.model_status(b).queued, 0);
    st.check_invariants().unwrap();
}

#[test]
fn a_waiter_that_goes_away_leaves_nothing_behind() {
    let mut st = queued_state(10, 4, 30, 16);
    let a = reg_sized(&mut st, "a", 6.0);
    let b = reg_sized(&mut st, "b", 6.0);
    request(&mut st, a, s(1));
    let t = ticket(st.admit(b, s(2), Intent::Request));
    assert!(st.cancel_queued(t, s(3)));
    assert!(!st.cancel_queued(t, s(3)), "gone already");
    st.release(a, s(4), s(1));
    assert!(wakes(&mut st).is_empty(), "nothing is loaded for a request that left");
    assert_eq!((st.phase(b), st.phase(a)), (Phase::Absent, Phase::Resident));
    st.check_invariants().unwrap();
}

#[test]
fn a_small_model_does_not_wait_behind_a_big_one() {
    // 10 GB, a busy 6 GB model: a 9 GB model cannot load until it ends; a 3 GB one can as soon
    // as the 1 GB one it needs room from finishes, and overtakes the big one (no head-of-line).
    let mut st = queued_state(10, 4, 60, 16);
    let busy = reg_sized(&mut st, "busy", 6.0);
    let small_busy = reg_sized(&mut st, "small-busy", 2.0);
    let big = reg_sized(&mut st, "big", 9.0);
    let small = reg_sized(&mut st, "small", 3.0);
    request(&mut st, busy, s(1));
    request(&mut st, small_busy, s(1));
    let t_big = ticket(st.admit(big, s(2), Intent::Request));
    let t_small = ticket(st.admit(small, s(3), Intent::Request));
    st.release(small_busy, s(4), s(1));
    let w = wakes(&mut st);
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].ticket, t_small, "the small model overtook the big one");
    assert!(matches!(w[0].outcome, Admission::Load(_)));
    assert_eq!(st.model_status(big).queued, 1);
    let _ = t_big;
}

#[test]
fn a_starving_big_model_is_not_overtaken_forever() {
    // Timeout 20 s: once the big model has waited 10 s, later arrivals may not start loads
    // before it, so the room that frees accumulates for it.
    let mut st = queued_state(10, 4, 20, 16);
    let busy = reg_sized(&mut st, "busy", 6.0);
    let small_busy = reg_sized(&mut st, "small-busy", 2.0);
    let big = reg_sized(&mut st, "big", 9.0);
    let small = reg_sized(&mut st, "small", 3.0);
    request(&mut st, busy, s(1));
    request(&mut st, small_busy, s(1));
    let t_big = ticket(st.admit(big, s(2), Intent::Request));
    st.queue_tick(s(12)); // the big model starts starving
    assert!(wakes(&mut st).is_empty());
    // A new small request would fit beside the busy ones once small-busy ends, but it must
    // queue behind the starving head, and stays there when room frees.
    let t_small = ticket(st.admit(small, s(13), Intent::Request));
    st.release(small_busy, s(14), s(1));
    assert!(wakes(&mut st).is_empty(), "the small model may not overtake a starving head");
    // The busy model ends: the big one loads first (evicting both idle models), then the small
    // one waits for room again.
    st.release(busy, s(15), s(1));
    let w = wakes(&mut st);
    assert_eq!(w[0].ticket, t_big);
    assert!(matches!(w[0].outcome, Admission::Load(_)));
    assert!(w.iter().all(|w| w.ticket != t_small), "{w:?}");
    st.check_invariants().unwrap();
}

#[test]
fn requests_for_a_model_that_became_resident_are_hits_before_any_load() {
    let mut st = queued_state(10, 1, 30, 16);
    let a = reg_sized(&mut st, "a", 2.0);
    let b = reg_sized(&mut st, "b", 2.0);
    request(&mut st, a, s(1)); // the one slot is busy
    let t_b = ticket(st.admit(b, s(2), Intent::Request));
    // The slot frees: b loads (a is the victim)...
    st.release(a, s(3), s(1));
    let w = wakes(&mut st);
    assert_eq!(w[0].ticket, t_b);
    assert!(matches!(w[0].outcome, Admission::Load(_)));
    // ... and a request for b arriving while it loads joins it.
    assert_eq!(st.admit(b, s(3), Intent::Request), Admission::Join);
}

#[test]
fn the_dry_run_names_the_ticket_the_admission_gets() {
    let mut st = queued_state(10, 4, 30, 16);
    let a = reg_sized(&mut st, "a", 6.0);
    let b = reg_sized(&mut st, "b", 6.0);
    request(&mut st, a, s(1));
    let preview = st.preview(b, s(2));
    assert_eq!(preview, st.admit(b, s(2), Intent::Request));
}
