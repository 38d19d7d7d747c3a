//! Helpers shared by the simulator's integration tests.

use modelpool::Event;
use modelpool_sim::trace::parse_csv;
use modelpool_sim::{Outcome, SimConfig, Trace, run};

pub const GB: u64 = 1_000_000_000;

/// Parse an inline CSV trace.
pub fn csv(text: &str) -> Trace {
    parse_csv(text.as_bytes(), "inline.csv").expect("test trace parses")
}

/// Replay, panicking on a bad config.
pub fn replay(trace: &Trace, cfg: &SimConfig) -> Outcome {
    run(trace, cfg).expect("valid config")
}

/// Every request ends in exactly one outcome.
pub fn assert_accounted(o: &Outcome) {
    let r = &o.report;
    assert_eq!(r.served + r.dropped + r.failed, r.requests, "outcomes must add up: {r:#?}");
}

/// Events of one kind, rendered compactly, for assertions.
pub fn rejects(o: &Outcome) -> Vec<(String, &'static str, Option<u32>)> {
    o.events
        .iter()
        .filter_map(|e| match e {
            Event::Reject { model, code, retry_after_secs, .. } => {
                Some((model.to_string(), code.as_str(), *retry_after_secs))
            }
            _ => None,
        })
        .collect()
}

pub fn evictions(o: &Outcome) -> Vec<(u64, String)> {
    o.events
        .iter()
        .filter_map(|e| match e {
            Event::Evict { at, model, .. } => Some((*at, model.to_string())),
            _ => None,
        })
        .collect()
}
