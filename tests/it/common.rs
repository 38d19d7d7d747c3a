//! Helpers shared by the engine tests: a state with the default policy and estimator, and a
//! driver that carries out admissions the way the async pool does, synchronously.

use modelpool::state::LoadDone;
use modelpool::{
    Admission, EvictionPolicy, GB, Intent, LogMode, Lru, ModelSpec, NameEstimator, Nanos, PoolConfig,
    PoolState, Slot,
};

pub type State = PoolState<Lru, NameEstimator>;

/// Seconds to nanoseconds.
pub fn s(secs: u64) -> Nanos {
    secs * 1_000_000_000
}

/// A state with `limit_gb` decimal GB, `max_models` 4, the full log.
pub fn state(limit_gb: f64) -> State {
    state_with(limit_gb, Lru::new())
}

/// A state with `limit_gb` decimal GB, the given policy, `max_models` 4, the full log.
pub fn state_with<P: EvictionPolicy>(limit_gb: f64, policy: P) -> PoolState<P, NameEstimator> {
    let mut cfg = PoolConfig::with_limit((limit_gb * GB as f64) as u64);
    cfg.log = LogMode::Full;
    PoolState::new(cfg, policy, NameEstimator)
}

/// Register a text-gen model by name.
pub fn reg<P: EvictionPolicy>(st: &mut PoolState<P, NameEstimator>, name: &str) -> Slot {
    st.register(ModelSpec::new(name))
}

/// Register a model with an explicit size in decimal GB.
pub fn reg_sized<P: EvictionPolicy>(st: &mut PoolState<P, NameEstimator>, name: &str, size_gb: f64) -> Slot {
    st.register(ModelSpec::new(name).with_size((size_gb * GB as f64) as u64))
}

/// Admit a request and, if it loads, carry the plan out at once with the measured size equal
/// to the reservation. Returns the admission. A request that gets a lease keeps it.
pub fn request<P: EvictionPolicy>(st: &mut PoolState<P, NameEstimator>, slot: Slot, now: Nanos) -> Admission {
    let a = st.admit(slot, now, Intent::Request);
    if let Admission::Load(plan) = &a {
        for &v in &plan.victims {
            st.reclaimed(v, now);
        }
        let done: LoadDone = st.load_finished(slot, now, Ok(plan.reserve));
        assert_eq!(done.leases_granted, 1);
    }
    a
}

/// A request that ends at once: admit (loading if needed), then release its lease.
pub fn touch<P: EvictionPolicy>(st: &mut PoolState<P, NameEstimator>, slot: Slot, now: Nanos) -> Admission {
    let a = request(st, slot, now);
    if matches!(a, Admission::Hit | Admission::Load(_)) {
        st.release(slot, now, now);
    }
    a
}

/// Preload (load and pin) synchronously.
pub fn preload<P: EvictionPolicy>(st: &mut PoolState<P, NameEstimator>, slot: Slot, now: Nanos) -> Admission {
    let a = st.admit(slot, now, Intent::Preload);
    if let Admission::Load(plan) = &a {
        for &v in &plan.victims {
            st.reclaimed(v, now);
        }
        st.load_finished(slot, now, Ok(plan.reserve));
    }
    a
}

/// Names of a plan's victims.
pub fn victim_names<P: EvictionPolicy>(st: &PoolState<P, NameEstimator>, a: &Admission) -> Vec<String> {
    match a {
        Admission::Load(plan) => plan.victims.iter().map(|&v| st.spec(v).id.to_string()).collect(),
        _ => Vec::new(),
    }
}
