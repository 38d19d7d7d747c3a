//! Retry hints from the work in flight: a busy model's requests are expected to end at their
//! context tokens times the model's measured service rate (else the configured prior), so a
//! refusal's `Retry-After` tracks what is left instead of guessing "as long again".

use crate::common::*;
use modelpool::{Admission, LogMode, NameEstimator, PoolConfig, PoolState, RejectCode};
use modelpool::{GB, Lru, ModelSpec};

const KV_PER_TOKEN: u64 = 1000;
/// A request of 8 prompt tokens and 8 new ones.
const KV: u64 = 16 * KV_PER_TOKEN;

/// A pool of 10 GB holding `a` (6 GB) for one 8-second request starting at 10 s, and the hint a
/// request for `b` (6 GB, needs `a`'s memory) gets at each half second of it: (elapsed, hint).
fn hints_behind_one_stream(prior_ns_per_token: Option<f64>, warm_up: bool) -> Vec<(f64, u32)> {
    let mut cfg = PoolConfig::with_limit(10 * GB);
    cfg.log = LogMode::Off;
    cfg.service_ns_per_token = prior_ns_per_token;
    let mut st = PoolState::new(cfg, Lru::new(), NameEstimator);
    let a = st.register(ModelSpec::new("a").with_size(6 * GB));
    let b = st.register(ModelSpec::new("b").with_size(6 * GB));
    st.set_kv_bytes_per_token(a, KV_PER_TOKEN);
    touch(&mut st, a, s(0));
    if warm_up {
        // One earlier request of the same shape took 8 s: 0.5 s per token of context.
        assert_eq!(st.admit_request(a, s(1), KV), Admission::Hit);
        st.release_request(a, s(9), s(1), KV);
    }
    assert_eq!(st.admit_request(a, s(10), KV), Admission::Hit);
    let mut out = Vec::new();
    for half in 1..16u64 {
        let now = s(10) + half * 500_000_000;
        let Admission::Reject(r) = st.admit_request(b, now, 0) else {
            panic!("b must be refused while a is busy")
        };
        assert_eq!(r.code, RejectCode::InsufficientMemory);
        out.push((half as f64 / 2.0, r.retry_after_secs.expect("waiting helps")));
    }
    st.release_request(a, s(18), s(10), KV);
    assert!(matches!(st.admit_request(b, s(18), 0), Admission::Load(_)), "b fits once a's request ended");
    out
}

#[test]
fn behind_a_stream_the_hint_is_what_is_left_of_it() {
    // With the model's rate measured (or the right prior), every hint is the time left rounded
    // up to a whole second: a retry at the hint succeeds, and never waits a second too long.
    for (prior, warm) in [(None, true), (Some(0.5e9), false)] {
        for (elapsed, hint) in hints_behind_one_stream(prior, warm) {
            let left = 8.0 - elapsed;
            let err = f64::from(hint) - left;
            assert!(
                (0.0..1.0).contains(&err),
                "prior {prior:?}, warm {warm}: at {elapsed} s hint {hint} s, {left} s left"
            );
        }
    }
}

#[test]
fn an_upper_bound_prior_overestimates_by_its_bound_and_the_measurement_corrects_it() {
    // The fake backend's prior is its decode time per token for every token of context (an
    // upper bound): 1 s per token, 16 tokens, 16 s, though this request takes 8 s.
    let hints = hints_behind_one_stream(Some(1e9), false);
    for &(elapsed, hint) in &hints {
        assert_eq!(f64::from(hint), (16.0 - elapsed).ceil(), "at {elapsed} s");
    }
    // The same prior after one measured request: the measured rate wins.
    for (elapsed, hint) in hints_behind_one_stream(Some(1e9), true) {
        assert_eq!(f64::from(hint), (8.0 - elapsed).ceil(), "at {elapsed} s");
    }
}

#[test]
fn without_a_rate_the_hint_falls_back_to_the_typical_request_time() {
    // No prior, no history: the typical request time (1 s before any lease ended), then "as
    // long again" once the stream has outlived it; always at least a second.
    let hints = hints_behind_one_stream(None, false);
    assert_eq!(hints[0], (0.5, 1));
    assert!(hints.iter().all(|&(_, h)| h >= 1));
    assert_eq!(hints.last().copied(), Some((7.5, 8)));
}
