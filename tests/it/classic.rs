//! The original plan's eight behaviours (its size table, its 503 text, its tests), kept exactly.

use crate::common::*;
use modelpool::{
    Admission, FixedMemory, GB, Intent, MemoryLimit, ModelSpec, ModelType, NameEstimator, Phase, PoolError,
    RejectCode, SizeEstimator,
};

#[test]
fn entry_fields_and_defaults() {
    let spec = ModelSpec::new("test");
    assert_eq!(spec.model_type, ModelType::TextGen);
    assert_eq!(ModelType::TextGen.to_string(), "text-gen");
    let mut st = state(16.0);
    let slot = st.register(spec);
    let status = st.model_status(slot);
    assert_eq!(status.model_type, ModelType::TextGen);
    assert!(!status.pinned);
    assert_eq!(status.phase, Phase::Absent);
    assert_eq!(status.leases, 0);
    let cfg = st.config();
    assert_eq!(cfg.max_models, 4);
}

#[test]
fn absolute_memory_limit() {
    let limit: MemoryLimit = "16GB".parse().unwrap();
    assert_eq!(limit, MemoryLimit::Bytes(16 * GB));
    assert_eq!(limit.resolve(&FixedMemory(1)), 16 * GB);
    let st = state(16.0);
    assert_eq!(st.ledger().limit, 16 * GB);
}

#[test]
fn percentage_memory_limit_uses_system_total() {
    let mem = FixedMemory(64 * GB);
    for s in ["50%", "0.5", " 50 % "] {
        let limit: MemoryLimit = s.trim().parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(limit.resolve(&mem), 32 * GB, "{s}");
    }
}

#[test]
fn size_table_from_name() {
    let est = |n: &str| NameEstimator.estimate(&ModelSpec::new(n)).bytes;
    assert_eq!(est("mlx-community/Llama-3.2-3B-Instruct"), 2 * GB);
    assert_eq!(est("mistral-7B"), 4 * GB);
    assert_eq!(est("llama-3-8b-instruct"), 5 * GB);
    assert_eq!(est("llama-2-13b"), 8 * GB);
    assert_eq!(est("llama-70B"), 40 * GB);
    assert_eq!(est("some-model"), 4 * GB);
}

#[test]
fn evictable_excludes_pinned() {
    let mut st = state(10.0);
    let pinned = reg_sized(&mut st, "pinned", 4.0);
    let a = reg_sized(&mut st, "a", 4.0);
    let big = reg_sized(&mut st, "big", 6.0);
    preload(&mut st, pinned, s(1));
    touch(&mut st, a, s(2));
    // Loading "big" needs 4 GB back: only "a" may go, although "pinned" is older.
    let plan = st.preview(big, s(3));
    assert_eq!(victim_names(&st, &plan), vec!["a"]);
}

#[test]
fn lru_evicts_oldest_unpinned() {
    let mut st = state(12.0);
    let m: Vec<_> = ["a", "b", "c"].iter().map(|n| reg_sized(&mut st, n, 4.0)).collect();
    for (i, &slot) in m.iter().enumerate() {
        touch(&mut st, slot, s(i as u64 + 1));
    }
    touch(&mut st, m[0], s(10)); // "a" is now the most recent
    let d = reg_sized(&mut st, "d", 4.0);
    let a = touch(&mut st, d, s(11));
    assert_eq!(victim_names(&st, &a), vec!["b"]);
    assert_eq!(st.phase(m[1]), Phase::Absent);
    assert_eq!(st.phase(m[0]), Phase::Resident);
}

#[test]
fn preloaded_model_survives_eviction() {
    let mut st = state(8.0);
    let p = reg_sized(&mut st, "preloaded", 4.0);
    preload(&mut st, p, s(0));
    for (i, n) in ["x", "y", "z"].iter().enumerate() {
        let slot = reg_sized(&mut st, n, 4.0);
        touch(&mut st, slot, s(i as u64 + 1));
        assert_eq!(st.phase(p), Phase::Resident, "preloaded evicted while loading {n}");
    }
    assert!(st.is_pinned(p));
    assert_eq!(st.stats().evictions_for(modelpool::EvictReason::Capacity), 2);
}

#[test]
fn insufficient_memory_is_a_503_class_error_with_the_seed_message() {
    let mut st = state(8.0);
    let a = reg_sized(&mut st, "a", 5.0);
    let b = reg_sized(&mut st, "b", 5.0);
    request(&mut st, a, s(1)); // holds its lease: not evictable
    let adm = st.admit(b, s(2), Intent::Request);
    let Admission::Reject(r) = adm else { panic!("expected a rejection, got {adm:?}") };
    assert_eq!(r.code, RejectCode::InsufficientMemory);
    let err = r.into_error("b".into(), 4);
    assert!(matches!(err, PoolError::InsufficientMemory { retry_after_secs, .. } if retry_after_secs >= 1));
    assert_eq!(err.to_string(), "Insufficient memory: need 5.0GB, only 3.0GB available after eviction");
    assert_eq!(err.reject_code(), Some(RejectCode::InsufficientMemory));
}
