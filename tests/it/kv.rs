//! Per-request KV cache bytes in the ledger: counted from admission to the lease's end, admitted
//! like a load when they do not fit, and given back exactly by every way a request ends.

use crate::common::*;
use modelpool::{
    Admission, GB, Intent, LogMode, Lru, ModelSpec, NameEstimator, Phase, PoolConfig, PoolState, RejectCode,
};

const MB: u64 = 1_000_000;

fn kv_state(limit_gb: u64, queue_s: u64) -> State {
    let mut cfg = PoolConfig::with_limit(limit_gb * GB).with_queue(s(queue_s), 16);
    cfg.log = LogMode::Full;
    PoolState::new(cfg, Lru::new(), NameEstimator)
}

/// Load `slot` for a request holding `kv` bytes; returns the admission.
fn load_with_kv(st: &mut State, slot: u32, now: u64, kv: u64) -> Admission {
    let a = st.admit_request(slot, now, kv);
    if let Admission::Load(plan) = &a {
        for &v in &plan.victims {
            st.reclaimed(v, now);
        }
        st.load_finished(slot, now, Ok(plan.reserve));
    }
    a
}

#[test]
fn a_hit_holds_its_kv_until_the_lease_ends() {
    let mut st = kv_state(10, 0);
    let a = reg_sized(&mut st, "a", 4.0);
    touch(&mut st, a, s(1));
    assert_eq!(st.admit_request(a, s(2), 500 * MB), Admission::Hit);
    assert_eq!(st.admit_request(a, s(3), 300 * MB), Admission::Hit);
    let l = st.ledger();
    assert_eq!(l.kv, 800 * MB);
    assert_eq!(l.used(), 4 * GB + 800 * MB);
    assert_eq!(st.model_status(a).kv_bytes, 800 * MB);
    st.release_request(a, s(4), s(2), 500 * MB);
    assert_eq!(st.ledger().kv, 300 * MB);
    st.release_request(a, s(5), s(3), 300 * MB);
    assert_eq!(st.ledger().kv, 0);
    assert_eq!(st.stats().peak_kv, 800 * MB);
    st.check_invariants().unwrap();
}

#[test]
fn the_request_that_starts_a_load_reserves_its_kv_with_the_weights() {
    let mut st = kv_state(10, 0);
    let a = reg_sized(&mut st, "a", 4.0);
    let Admission::Load(plan) = st.admit_request(a, s(1), GB) else { panic!("a load") };
    assert_eq!((plan.reserve, plan.kv), (4 * GB, GB));
    assert_eq!(st.ledger().reserved, 5 * GB, "weights and KV reserved together");
    assert_eq!(st.ledger().kv, 0);
    // A joiner's KV goes to the kv column at once.
    assert_eq!(st.admit_request(a, s(2), 2 * GB), Admission::Join);
    assert_eq!(st.ledger().kv, 2 * GB);
    // A third request whose KV does not fit beside them is refused (queue off), evicting nothing.
    let Admission::Reject(r) = st.admit_request(a, s(3), 4 * GB) else { panic!("refused") };
    assert_eq!(r.code, RejectCode::InsufficientMemory);
    st.load_finished(a, s(4), Ok(4 * GB));
    let l = st.ledger();
    assert_eq!((l.reserved, l.resident, l.kv), (0, 4 * GB, 3 * GB));
    st.release_request(a, s(5), s(4), GB);
    st.release_request(a, s(5), s(4), 2 * GB);
    assert_eq!(st.ledger().kv, 0);
    st.check_invariants().unwrap();
}

#[test]
fn a_failed_load_gives_back_its_waiters_kv() {
    let mut st = kv_state(10, 0);
    let a = reg_sized(&mut st, "a", 4.0);
    assert!(matches!(st.admit_request(a, s(1), GB), Admission::Load(_)));
    assert_eq!(st.admit_request(a, s(2), GB), Admission::Join);
    st.load_finished(a, s(3), Err("boom"));
    let l = st.ledger();
    assert_eq!((l.used(), l.kv), (0, 0));
    st.check_invariants().unwrap();
}

#[test]
fn waiters_that_leave_a_load_give_back_exactly_their_kv() {
    let mut st = kv_state(10, 0);
    let a = reg_sized(&mut st, "a", 4.0);
    assert!(matches!(st.admit_request(a, s(1), 3 * GB), Admission::Load(_)));
    assert_eq!(st.admit_request(a, s(2), GB), Admission::Join);
    // The starter leaves: its 3 GB cannot come out of the joiner's 1 GB alone.
    st.cancel_wait(a, 3 * GB);
    st.load_finished(a, s(3), Ok(4 * GB));
    assert_eq!(st.ledger().kv, GB, "only the joiner's KV remains");
    st.release_request(a, s(4), s(3), GB);
    assert_eq!(st.ledger().kv, 0);
    st.check_invariants().unwrap();
}

#[test]
fn kv_that_cannot_fit_beside_its_model_is_model_too_large_at_once() {
    let mut st = kv_state(10, 30);
    let a = reg_sized(&mut st, "a", 6.0);
    touch(&mut st, a, s(1));
    let Admission::Reject(r) = st.admit_request(a, s(2), 5 * GB) else { panic!("refused") };
    assert_eq!(r.code, RejectCode::ModelTooLarge);
    assert_eq!(r.retry_after_secs, None, "waiting cannot help");
    assert_eq!((r.need, r.kv), (11 * GB, 5 * GB));
    let msg = r.into_error("a".into(), 4).to_string();
    assert!(msg.contains("6.0GB of weights + 5.0GB of KV cache"), "{msg}");
    // The same for an absent model: weights and KV together exceed the limit.
    let b = reg_sized(&mut st, "b", 6.0);
    let Admission::Reject(r) = st.admit_request(b, s(3), 5 * GB) else { panic!("refused") };
    assert_eq!(r.code, RejectCode::ModelTooLarge);
    assert_eq!(st.stats().total_evictions(), 0);
}

/// Found behind LiteLLM (fleet-e2e): a request joining a load in progress was refused as
/// `model_too_large` because the loading model's reservation, which also holds the KV of the
/// request that started the load, was counted as the model's weights.
#[test]
fn a_request_behind_a_load_is_judged_against_the_weights_not_the_starters_kv() {
    let mut st = kv_state(7, 30);
    let a = reg_sized(&mut st, "a", 5.175);
    // The first request starts the load with 0.6 GB of KV; a second joins with 0.6 GB.
    let Admission::Load(_) = st.admit_request(a, s(1), 600 * MB) else { panic!("load") };
    assert_eq!(st.admit_request(a, s(1), 600 * MB), Admission::Join);
    // 1.7 GB of KV fits beside the 5.175 GB of weights (6.875 <= 7) once the others end: it
    // waits; it is not "too large".
    match st.admit_request(a, s(1), 1_700 * MB) {
        Admission::Queued(_) => {}
        other => panic!("expected to wait in the queue, got {other:?}"),
    }
    // 1.9 GB cannot fit beside the weights ever: too large, and the message names the weights.
    let Admission::Reject(r) = st.admit_request(a, s(1), 1_900 * MB) else { panic!("refused") };
    assert_eq!(r.code, RejectCode::ModelTooLarge);
    assert_eq!(r.need, 5_175 * MB + 1_900 * MB);
    st.check_invariants().unwrap();
}

#[test]
fn kv_short_beside_a_busy_pool_waits_and_is_served_when_a_lease_ends() {
    let mut st = kv_state(10, 30);
    let a = reg_sized(&mut st, "a", 4.0);
    let b = reg_sized(&mut st, "b", 4.0);
    load_with_kv(&mut st, a, s(1), 0);
    load_with_kv(&mut st, b, s(1), GB); // b busy with 1 GB of KV: used 9 GB
    let before = st.ledger();
    let Admission::Queued(t) = st.admit_request(a, s(2), 2 * GB) else { panic!("queued") };
    assert_eq!(st.ledger(), before, "nothing evicted: only in-flight work can make room");
    assert_eq!(st.stats().total_rejections(), 0);
    // b's request ends (b stays resident, now idle): a's request fits.
    st.release_request(b, s(3), s(1), GB);
    let w: Vec<_> = st.take_wakes().collect();
    assert_eq!(w.len(), 1);
    assert_eq!((w[0].ticket, w[0].kv, w[0].outcome.clone()), (t, 2 * GB, Admission::Hit));
    assert_eq!(st.ledger().kv, 2 * GB);
    assert_eq!(st.phase(b), Phase::Resident, "it fitted without evicting b");
    st.check_invariants().unwrap();
}

#[test]
fn kv_short_with_an_idle_model_evicts_it_and_is_served_once_it_has_unloaded() {
    let mut st = kv_state(10, 30);
    let a = reg_sized(&mut st, "a", 4.0);
    let b = reg_sized(&mut st, "b", 5.0);
    touch(&mut st, a, s(1));
    touch(&mut st, b, s(2)); // both idle: used 9 GB
    let Admission::Queued(t) = st.admit_request(a, s(3), 2 * GB) else { panic!("queued") };
    assert_eq!(st.phase(b), Phase::Draining, "the idle model makes room for the KV");
    assert_eq!(st.take_unloads().as_slice(), &[b], "the driver unloads it");
    assert!(st.take_unloads().is_empty());
    // A second pump before the unload ends evicts nothing more.
    st.queue_tick(s(4));
    assert!(st.take_unloads().is_empty());
    assert!(st.take_wakes().next().is_none(), "it waits for the memory to come back");
    st.reclaimed(b, s(5));
    let w: Vec<_> = st.take_wakes().collect();
    assert_eq!((w[0].ticket, w[0].outcome.clone()), (t, Admission::Hit));
    assert_eq!(st.ledger().used(), 6 * GB);
    // The eviction is logged as made for `a`.
    let for_a = st.log().events().any(|e| {
        matches!(e, modelpool::Event::Evict { model, for_model: Some(f), .. } if &**model == "b" && &**f == "a")
    });
    assert!(for_a);
    st.check_invariants().unwrap();
}

#[test]
fn without_the_queue_a_kv_short_request_awaits_the_unload_it_caused() {
    let mut st = kv_state(10, 0);
    let a = reg_sized(&mut st, "a", 4.0);
    let b = reg_sized(&mut st, "b", 5.0);
    touch(&mut st, a, s(1));
    touch(&mut st, b, s(2));
    assert_eq!(st.admit_request(a, s(3), 2 * GB), Admission::AwaitUnload);
    assert_eq!(st.take_unloads().as_slice(), &[b]);
    st.reclaimed(b, s(4));
    assert_eq!(st.admit_request(a, s(4), 2 * GB), Admission::Hit);
    st.check_invariants().unwrap();
}

#[test]
fn a_full_queue_refuses_a_kv_short_request_without_evicting_for_it() {
    let mut cfg = PoolConfig::with_limit(10 * GB).with_queue(s(30), 1);
    cfg.log = LogMode::Full;
    let mut st: State = PoolState::new(cfg, Lru::new(), NameEstimator);
    let a = reg_sized(&mut st, "a", 4.0);
    let b = reg_sized(&mut st, "b", 5.0);
    let c = reg_sized(&mut st, "c", 8.0);
    touch(&mut st, a, s(1));
    load_with_kv(&mut st, b, s(2), 0); // b busy
    // c waits for memory (a idle is not enough, b is busy): the queue's one place is taken.
    assert!(matches!(st.admit(c, s(3), Intent::Request), Admission::Queued(_)));
    let Admission::Reject(r) = st.admit_request(a, s(4), 2 * GB) else { panic!("queue full") };
    assert_eq!(r.code, RejectCode::QueueFull);
    assert_eq!(st.stats().total_evictions(), 0, "nothing evicted for a refused request");
    assert!(st.take_unloads().is_empty());
}

#[test]
fn the_kv_rate_comes_from_the_spec_the_rule_or_the_backend() {
    let mut st = kv_state(100, 0);
    let given = st.register(ModelSpec::new("given").with_kv_per_token(46_080));
    let named = st.register(ModelSpec::new("llama-8b-4bit"));
    let emb = st.register(ModelSpec::new("bge-m3").with_type(modelpool::ModelType::Embeddings));
    assert_eq!(st.kv_bytes_per_token(given), 46_080);
    assert_eq!(st.kv_bytes_per_token(named), 178_885, "2 x sqrt(8e9)");
    assert_eq!(st.kv_bytes_per_token(emb), 0);
    assert_eq!(st.kv_for_tokens(given, 8192), 377_487_360, "SmolLM2 135M f32 at 8k: 377 MB");
    st.set_kv_bytes_per_token(named, 131_072);
    assert_eq!(st.kv_for_tokens(named, 1000), 131_072_000);
}
