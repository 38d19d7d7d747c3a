//! Predictive preloads still loading are cancelled when, and only when, a real request needs
//! their room: after every evictable resident model, the one predicted latest first, never one
//! a request waits on. The core's side (ledger, plan, log) and the async pool's (the fake
//! backend's load stops, the request does not wait for it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use modelpool::backend::fake::{FakeBackend, FakeModelConfig};
use modelpool::policy::PolicyInfo;
use modelpool::{
    Admission, Event, EvictionPolicy, GB, Intent, LogMode, Lru, ModelPool, NameEstimator, Nanos, Phase,
    PolicyKind, PoolConfig, PoolState, RejectCode, SizeEstimator, Slot,
};

use crate::common::{reg_sized, s, state_with, victim_names};

/// LRU for eviction, with next requests told in advance (what `predictive` learns online).
struct Foresee {
    lru: Lru,
    next: HashMap<Slot, Nanos>,
}

impl EvictionPolicy for Foresee {
    fn name(&self) -> &'static str {
        "foresee"
    }
    fn on_insert(&mut self, slot: Slot, info: PolicyInfo, now: Nanos) {
        self.lru.on_insert(slot, info, now);
    }
    fn on_access(&mut self, slot: Slot, now: Nanos) {
        self.lru.on_access(slot, now);
    }
    fn on_remove(&mut self, slot: Slot, evicted: bool) {
        self.lru.on_remove(slot, evicted);
    }
    fn visit_victims(&self, visit: &mut dyn FnMut(Slot) -> bool) {
        self.lru.visit_victims(visit);
    }
    fn predicted_next(&self, slot: Slot, _now: Nanos) -> Option<Nanos> {
        self.next.get(&slot).copied()
    }
}

type St = PoolState<Foresee, NameEstimator>;

/// A 10 GB pool (4 model slots) whose policy expects each of `next` at the given second.
fn pool(next: &[(Slot, u64)]) -> St {
    let next = next.iter().map(|&(slot, at)| (slot, s(at))).collect();
    state_with(10.0, Foresee { lru: Lru::new(), next })
}

/// Register `models` (name, GB) in order: slots 0, 1, ...
fn with_models(st: &mut St, models: &[(&str, f64)]) -> Vec<Slot> {
    models.iter().map(|&(m, gb)| reg_sized(st, m, gb)).collect()
}

/// Admit a request for `slot` and land its load (victims reclaimed first): it holds a lease.
fn busy(st: &mut St, slot: Slot, now: Nanos) {
    let Admission::Load(plan) = st.admit(slot, now, Intent::Request) else { panic!("expected a load") };
    for &v in &plan.victims {
        st.reclaimed(v, now);
    }
    st.load_finished(slot, now, Ok(plan.reserve));
}

fn cancelled(st: &St) -> Vec<(String, String)> {
    st.log()
        .events()
        .filter_map(|e| match e {
            Event::PreloadCancelled { model, for_model, .. } => {
                Some((model.to_string(), for_model.to_string()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_request_that_needs_a_loading_preloads_room_cancels_it() {
    let mut st = pool(&[(1, 30)]);
    let [chat, job, big] = with_models(&mut st, &[("chat", 2.0), ("job", 2.0), ("big", 7.0)])[..] else {
        unreachable!()
    };
    busy(&mut st, chat, s(0));
    assert_eq!(st.predictive_preload(s(1), s(60)), Some(job));
    assert_eq!(st.phase(job), Phase::Loading);
    // 7 GB: chat is busy (2), the preload holds 2 of the 10: only cancelling it makes room.
    let a = st.admit(big, s(2), Intent::Request);
    assert_eq!(victim_names(&st, &a), ["job"]);
    assert!(st.is_cancelled_load(job));
    assert_eq!(st.phase(job), Phase::Draining);
    // big's 7 GB reservation: 2 of it still held by the cancelled preload's draining memory.
    let l = st.ledger();
    assert_eq!((l.reserved, l.awaiting, l.draining, l.models), (5 * GB, 2 * GB, 2 * GB, 2));
    st.check_invariants().unwrap();
    assert_eq!(cancelled(&st), [("job".to_string(), "big".to_string())]);
    assert_eq!(st.stats().preloads_cancelled, 1);
    // The driver stops the load and reports the memory back: big's load may start.
    assert_eq!(st.reclaimed(job, s(2)), Some(big));
    assert!(!st.is_cancelled_load(job));
    assert_eq!(st.phase(job), Phase::Absent);
    st.load_finished(big, s(3), Ok(7 * GB));
    st.check_invariants().unwrap();
    // A later request for the job loads it anew, as any absent model.
    assert!(st.release(big, s(4), s(3)) || st.ledger().resident == 9 * GB);
    assert!(matches!(st.admit(job, s(5), Intent::Request), Admission::Load(_)));
    st.check_invariants().unwrap();
}

#[test]
fn resident_idle_models_go_before_a_preload_is_cancelled() {
    let mut st = pool(&[(1, 30)]);
    let [chat, job, big] = with_models(&mut st, &[("chat", 2.0), ("job", 2.0), ("big", 7.0)])[..] else {
        unreachable!()
    };
    busy(&mut st, chat, s(0));
    st.release(chat, s(0), s(0));
    assert_eq!(st.predictive_preload(s(1), s(60)), Some(job));
    // 7 GB: evicting idle chat (2) is enough beside the preload's 2.
    let a = st.admit(big, s(2), Intent::Request);
    assert_eq!(victim_names(&st, &a), ["chat"]);
    assert_eq!(st.phase(job), Phase::Loading);
    assert!(cancelled(&st).is_empty());
    st.check_invariants().unwrap();
}

#[test]
fn a_preload_a_request_waits_on_is_never_cancelled() {
    let mut st = pool(&[(1, 30)]);
    let [chat, job, big] = with_models(&mut st, &[("chat", 2.0), ("job", 2.0), ("big", 7.0)])[..] else {
        unreachable!()
    };
    busy(&mut st, chat, s(0));
    assert_eq!(st.predictive_preload(s(1), s(60)), Some(job));
    // The job's request arrives during the preload: it joins, so the preload is useful now.
    assert_eq!(st.admit(job, s(2), Intent::Request), Admission::Join);
    let Admission::Reject(r) = st.admit(big, s(3), Intent::Request) else { panic!("expected a refusal") };
    assert_eq!(r.code, RejectCode::InsufficientMemory);
    assert_eq!(st.phase(job), Phase::Loading);
    assert!(cancelled(&st).is_empty());
    // The waiter leaves: the preload is nobody's again, and cancellable.
    st.cancel_wait(job, 0);
    let a = st.admit(big, s(4), Intent::Request);
    assert_eq!(victim_names(&st, &a), ["job"]);
    st.check_invariants().unwrap();
}

#[test]
fn the_preload_predicted_latest_is_cancelled_first_and_only_as_many_as_needed() {
    // Slots: 0 chat, 1 soon (next request at 20 s), 2 late (at 50 s), 3 small.
    let mut st = pool(&[(1, 20), (2, 50)]);
    let [chat, soon, late, small] =
        with_models(&mut st, &[("chat", 4.0), ("soon", 2.0), ("late", 2.0), ("small", 3.0)])[..]
    else {
        unreachable!()
    };
    busy(&mut st, chat, s(0));
    assert_eq!(st.predictive_preload(s(1), s(60)), Some(soon));
    assert_eq!(st.predictive_preload(s(1), s(60)), Some(late));
    // 3 GB beside 4 + 2 + 2: one preload must go, the one expected later.
    let a = st.admit(small, s(2), Intent::Request);
    assert_eq!(victim_names(&st, &a), ["late"]);
    assert_eq!(st.phase(soon), Phase::Loading);
    st.check_invariants().unwrap();
}

#[test]
fn a_request_short_of_a_model_slot_cancels_a_preload() {
    let mut cfg = PoolConfig::with_limit(10 * GB);
    cfg.max_models = 2;
    cfg.log = LogMode::Full;
    let next = [(1, s(30))].into_iter().collect();
    let mut st = PoolState::new(cfg, Foresee { lru: Lru::new(), next }, NameEstimator);
    let [chat, job, other] = with_models(&mut st, &[("chat", 1.0), ("job", 1.0), ("other", 1.0)])[..] else {
        unreachable!()
    };
    busy(&mut st, chat, s(0));
    assert_eq!(st.predictive_preload(s(1), s(60)), Some(job));
    let a = st.admit(other, s(2), Intent::Request);
    assert_eq!(victim_names(&st, &a), ["job"]);
    assert_eq!(st.ledger().models, 2);
    st.check_invariants().unwrap();
}

#[test]
fn a_request_whose_kv_needs_the_room_cancels_a_preload_through_the_unload_list() {
    let mut st = pool(&[(1, 30)]);
    let [chat, job] = with_models(&mut st, &[("chat", 6.0), ("job", 2.0)])[..] else { unreachable!() };
    st.set_kv_bytes_per_token(chat, 1_000_000);
    busy(&mut st, chat, s(0));
    st.release(chat, s(0), s(0));
    assert_eq!(st.predictive_preload(s(1), s(60)), Some(job));
    // 3 GB of KV beside chat's 6: only the preload's 2 GB stands in the way.
    let kv = st.kv_for_tokens(chat, 3000);
    assert_eq!(kv, 3 * GB);
    assert_eq!(st.admit_request(chat, s(2), kv), Admission::AwaitUnload);
    assert!(st.is_cancelled_load(job));
    assert_eq!(st.take_unloads().as_slice(), &[job]);
    st.reclaimed(job, s(2));
    assert_eq!(st.admit_request(chat, s(2), kv), Admission::Hit);
    st.check_invariants().unwrap();
}

/// The async pool over the fake backend: the preload's load stops at once, and the request
/// that needed its room waits only for its own load.
#[tokio::test(start_paused = true)]
async fn the_pool_stops_a_cancelled_preloads_load_and_the_request_does_not_wait_for_it() {
    let mut cfg = PoolConfig::with_limit(10 * GB);
    cfg.log = LogMode::Full;
    let backend = Arc::new(FakeBackend::new().with_load_time(Duration::from_secs(1)));
    let pool = ModelPool::new(
        cfg,
        PolicyKind::Predictive.build(),
        Box::new(NameEstimator) as Box<dyn SizeEstimator>,
        backend.clone(),
    );
    for (m, gb) in [("job", 2), ("chat", 2), ("big", 7)] {
        pool.register(modelpool::ModelSpec::new(m).with_size(gb * GB));
    }
    pool.set_predictive_preload(Some(Duration::from_secs(60)));
    // A job every 100 s; an operator unloads it after each run.
    for k in 0..3u64 {
        if k > 0 {
            tokio::time::sleep(Duration::from_secs(100)).await;
        }
        drop(pool.acquire("job").await.unwrap());
        pool.unload("job", false).await.unwrap();
    }
    // From now on the job's model takes a minute to load.
    backend
        .configure("job", FakeModelConfig { load_time: Some(Duration::from_secs(60)), ..Default::default() });
    tokio::time::sleep(Duration::from_secs(80)).await;
    let chat = pool.acquire("chat").await.unwrap();
    let phase = |m: &str| pool.with_state(|st| st.phase(st.slot(m).unwrap()));
    assert_eq!(phase("job"), Phase::Loading, "the job is preloaded beside the chat request");
    let loads = backend.load_count();
    let t0 = tokio::time::Instant::now();
    let big = pool.acquire("big").await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(1), "only big's own load");
    assert_eq!(backend.load_count(), loads + 1);
    assert_eq!(phase("job"), Phase::Absent);
    let st = pool.status();
    assert_eq!(st.stats.preloads_cancelled, 1);
    assert_eq!((st.ledger.resident, st.ledger.reserved, st.ledger.draining), (9 * GB, 0, 0));
    let events = pool.events(usize::MAX);
    assert!(events.iter().any(|e| matches!(e,
        Event::PreloadCancelled { model, for_model, .. } if model.as_ref() == "job" && for_model.as_ref() == "big")));
    pool.with_state(|st| st.check_invariants()).unwrap();
    drop((chat, big));
    // The job's own request later loads it (the cancelled task is gone and left nothing).
    tokio::time::sleep(Duration::from_secs(5)).await;
    pool.unload("big", false).await.unwrap();
    drop(pool.acquire("job").await.unwrap());
    assert_eq!(phase("job"), Phase::Resident);
    pool.with_state(|st| st.check_invariants()).unwrap();
}
