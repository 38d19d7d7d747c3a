//! Decision logs of hand-written scenarios, as insta YAML snapshots: a change in eviction or
//! rejection behaviour shows up as a reviewed diff.

use crate::common::*;
use modelpool::{Event, EvictionPolicy, Gdsf, Intent, ModelSpec, ModelType, NameEstimator, PoolState};

fn log<P: EvictionPolicy>(st: &PoolState<P, NameEstimator>) -> Vec<Event> {
    st.log().events().cloned().collect()
}

#[test]
fn lru_with_a_pinned_model_and_a_busy_one() {
    let mut st = state(16.0);
    let p = reg(&mut st, "llama-3-8b-instruct"); // 5 GB from the reference table
    let a = reg(&mut st, "mistral-7b"); // 4 GB
    let b = reg(&mut st, "llama-3.2-3b"); // 2 GB
    let c = reg(&mut st, "codellama-13b"); // 8 GB
    preload(&mut st, p, s(0));
    touch(&mut st, a, s(1));
    request(&mut st, b, s(2)); // b stays busy
    touch(&mut st, a, s(3));
    touch(&mut st, c, s(4)); // needs 8 of 16 with 11 used: a goes (b is busy, p pinned)
    touch(&mut st, a, s(5)); // 15 used + 4: c goes
    st.release(b, s(6), s(2));
    st.check_invariants().unwrap();
    insta::assert_yaml_snapshot!(log(&st));
}

#[test]
fn rejections_evict_nothing() {
    let mut st = state(10.0);
    let p = st.register(
        ModelSpec::new("pinned-embedder").with_type(ModelType::Embeddings).with_size(3_000_000_000),
    );
    let a = reg_sized(&mut st, "a", 4.0);
    let huge = reg_sized(&mut st, "huge", 8.0);
    let big = reg_sized(&mut st, "big", 6.0);
    preload(&mut st, p, s(0));
    request(&mut st, a, s(1));
    let _ = st.admit(huge, s(2), Intent::Request); // too large beside the pin
    let _ = st.admit(big, s(3), Intent::Request); // a is busy: insufficient, nothing evicted
    st.release(a, s(4), s(1));
    touch(&mut st, big, s(5)); // now a can go
    st.check_invariants().unwrap();
    insta::assert_yaml_snapshot!(log(&st));
}

#[test]
fn overcommit_and_a_lowered_limit() {
    let mut st = state(12.0);
    let a = reg_sized(&mut st, "a", 4.0);
    let b = reg_sized(&mut st, "b", 4.0);
    let c = reg_sized(&mut st, "c", 2.0);
    touch(&mut st, a, s(1));
    touch(&mut st, c, s(2));
    let _ = st.admit(b, s(3), Intent::Request);
    let done = st.load_finished(b, s(13), Ok(7_500_000_000)); // measured 7.5 GB, not 4
    for &v in &done.evicted {
        st.reclaimed(v, s(13));
    }
    st.release(b, s(14), s(13));
    for v in st.set_limits(8_000_000_000, 2, s(20)).unwrap().unload_now {
        st.reclaimed(v, s(20));
    }
    st.check_invariants().unwrap();
    insta::assert_yaml_snapshot!(log(&st));
}

#[test]
fn gdsf_keeps_the_model_that_is_costly_to_reload() {
    let mut st = state_with(12.0, Gdsf::new());
    let big = reg_sized(&mut st, "big-70b", 8.0);
    let small = reg_sized(&mut st, "small-1b", 2.0);
    let other = reg_sized(&mut st, "other-1b", 2.0);
    let next = reg_sized(&mut st, "next-1b", 2.0);
    // The big model took 40 s to load, the small ones 1 s: per byte, big is 2.5x costlier.
    let _ = st.admit(big, s(0), Intent::Request);
    st.load_finished(big, s(40), Ok(8_000_000_000));
    st.release(big, s(41), s(40));
    for (slot, t) in [(small, 50), (other, 60)] {
        let _ = st.admit(slot, s(t), Intent::Request);
        st.load_finished(slot, s(t + 1), Ok(2_000_000_000));
        st.release(slot, s(t + 2), s(t + 1));
    }
    // LRU would evict big (oldest); GDSF evicts a cheap small model instead.
    let _ = st.admit(next, s(70), Intent::Request);
    insta::assert_yaml_snapshot!(log(&st));
}

/// The admission queue: a burst for three 6 GB models under 10 GB while one is busy waits,
/// is served in arrival order as leases end, and the one that waits too long times out.
#[test]
fn queued_burst_is_served_in_order_and_the_last_times_out() {
    let mut cfg = modelpool::PoolConfig::with_limit(10_000_000_000).with_queue(s(20), 8);
    cfg.log = modelpool::LogMode::Full;
    let mut st = PoolState::new(cfg, modelpool::Lru::new(), NameEstimator);
    let a = reg_sized(&mut st, "a", 6.0);
    let b = reg_sized(&mut st, "b", 6.0);
    let c = reg_sized(&mut st, "c", 6.0);
    request(&mut st, a, s(0)); // a busy
    assert!(matches!(st.admit(b, s(1), Intent::Request), modelpool::Admission::Queued(_)));
    assert!(matches!(st.admit(c, s(2), Intent::Request), modelpool::Admission::Queued(_)));
    // a's request ends at 5 s: b's turn (a evicted). The driver carries the load out.
    st.release(a, s(5), s(0));
    let wakes: Vec<_> = st.take_wakes().collect();
    let modelpool::Admission::Load(plan) = &wakes[0].outcome else { panic!("{wakes:?}") };
    for &v in &plan.victims {
        st.reclaimed(v, s(5));
    }
    st.load_finished(b, s(6), Ok(6_000_000_000));
    // b's request runs past c's deadline (2 s + 20 s): c times out at its tick.
    st.queue_tick(s(12)); // c starts starving: nothing else waits, nothing changes
    st.queue_tick(s(22));
    assert_eq!(st.take_wakes().count(), 1);
    st.release(b, s(30), s(6));
    st.check_invariants().unwrap();
    insta::assert_yaml_snapshot!(log(&st));
}
