//! 503 behaviour and outcome accounting of replays: each scenario is a small trace whose
//! decisions are known, replayed through the engine's `PoolState`.

use modelpool::log::LogMode;
use modelpool::{Event, PolicyKind};
use modelpool_sim::generate::{GenConfig, Sampler, generate};
use modelpool_sim::trace::{Op, OpKind};
use modelpool_sim::{PolicyChoice, SimConfig};

use crate::common::{GB, assert_accounted, csv, evictions, rejects, replay};

/// The refusal behaviours: no admission queue (`queue_timeout 0`, refusals are immediate).
fn cfg() -> SimConfig {
    SimConfig { log: LogMode::Full, max_models: 8, queue_timeout_secs: 0.0, ..SimConfig::default() }
}

#[test]
fn pinned_set_leaving_no_room_gives_model_too_large_and_evicts_nothing() {
    let t = csv("time,model,op,size_bytes,duration\n\
                 0,pinned-a,preload,10000000000,\n\
                 0,pinned-b,preload,10000000000,\n\
                 10,big-c,,8000000000,1\n\
                 11,small-d,,3000000000,1\n\
                 12,pinned-a,,,1\n");
    for retries in [0, 5] {
        let o = replay(&t, &SimConfig { retries, ..cfg() });
        assert_accounted(&o);
        // 8 GB > 24 GB - 20 GB pinned: waiting cannot help, so no retry hint and no retry.
        assert_eq!(rejects(&o), vec![("big-c".to_string(), "model_too_large", None)]);
        assert_eq!(o.report.rejections["model_too_large"], 1);
        assert_eq!(o.report.retried, 0);
        assert_eq!(o.report.dropped, 1);
        // 3 GB fits beside the pins; the pinned model still serves.
        assert_eq!(o.report.served, 2);
        assert_eq!(o.report.hits, 1);
        assert!(evictions(&o).is_empty(), "nothing may be evicted: {:?}", evictions(&o));
        assert_eq!(o.report.evictions_total, 0);
    }
}

/// Two busy 10 GB models and an idle 3 GB one under 24 GB: a burst for a third 10 GB model is
/// refused with `insufficient_memory` and a retry hint, and the idle model is not evicted for
/// nothing (evicting it would free 3 GB of the 9 GB needed).
const BUSY: &str = "time,model,size_bytes,duration\n\
                    0,a,10000000000,60\n\
                    0.1,b,10000000000,60\n\
                    0.2,idle-d,3000000000,0.5\n\
                    20,c,10000000000,5\n\
                    20.1,c,,5\n\
                    20.2,c,,5\n\
                    30,idle-d,,0.5\n";

#[test]
fn burst_on_busy_models_gives_insufficient_memory_with_retry_hints() {
    let t = csv(BUSY);
    let o = replay(&t, &cfg());
    assert_accounted(&o);
    let r = rejects(&o);
    assert_eq!(r.len(), 3, "{r:?}");
    for (model, code, hint) in &r {
        assert_eq!((model.as_str(), *code), ("c", "insufficient_memory"));
        assert!(hint.is_some_and(|s| s >= 1), "a retry hint of at least 1 s: {hint:?}");
    }
    // Nothing was evicted: the idle model is still resident at t=30 (a hit).
    assert!(evictions(&o).is_empty(), "{:?}", evictions(&o));
    let d = o.report.models.iter().find(|m| m.model == "idle-d").unwrap();
    assert_eq!((d.requests, d.hits, d.loads), (2, 1, 1));
    assert_eq!(o.report.rate_503, 0.428571); // 3 of 7 requests
    assert_eq!(o.report.dropped, 3);
}

#[test]
fn retried_requests_are_served_once_memory_frees_and_only_then_evict() {
    let t = csv(BUSY);
    let o = replay(&t, &SimConfig { retries: 200, ..cfg() });
    assert_accounted(&o);
    assert_eq!(o.report.dropped, 0);
    assert_eq!(o.report.served, 7);
    assert!(o.report.retried >= 3, "each refused request retried: {}", o.report.retried);
    // `a` and `b` load in 3.6 s and hold their leases for 60 s: `c` cannot load before ~63 s.
    let c_load = o
        .events
        .iter()
        .find_map(|e| match e {
            Event::Load { at, model, .. } if &**model == "c" => Some(*at),
            _ => None,
        })
        .expect("c loads eventually");
    assert!(c_load >= 63 * GB, "c loaded at {c_load} ns, before a and b were done");
    for (at, model) in evictions(&o) {
        assert!(at >= c_load, "{model} evicted at {at}, before c's admitted load at {c_load}");
    }
    // The wait shows up as added latency: more than 40 s for the burst.
    assert!(o.report.added_latency.max > 40.0, "{:?}", o.report.added_latency);
}

#[test]
fn max_models_gives_its_own_code() {
    let t = csv("time,model,size_bytes,duration\n0,a,1000000000,60\n0,b,1000000000,60\n1,c,1000000000,1\n");
    let o = replay(&t, &SimConfig { max_models: 2, ..cfg() });
    assert_accounted(&o);
    assert_eq!(rejects(&o).len(), 1);
    assert_eq!(rejects(&o)[0].1, "max_models_reached");
    assert!(rejects(&o)[0].2.is_some());
    assert!(evictions(&o).is_empty());
}

#[test]
fn lowering_the_limit_drains_a_busy_model_and_refuses_it_meanwhile() {
    let t = csv("time,model,op,size_bytes,duration,limit\n\
                 0,a,,10000000000,60,\n\
                 10,,set_limit,,,5GB\n\
                 11,a,,,1,\n\
                 100,a,,,1,\n");
    let o = replay(&t, &cfg());
    assert_accounted(&o);
    let r = rejects(&o);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].1, "model_draining");
    assert!(r[0].2.is_some(), "draining comes with a retry hint");
    // At 100 s it no longer fits under 5 GB at all.
    assert_eq!((r[1].1, r[1].2), ("model_too_large", None));
    // Drained at the new limit, unloaded when its lease ended (3.6 s load + 60 s service).
    let unload = o
        .events
        .iter()
        .find_map(|e| match e {
            Event::Unload { at, .. } => Some(*at),
            _ => None,
        })
        .unwrap();
    assert!(unload > 63 * GB && unload < 64 * GB, "unloaded at {unload}");
    assert_eq!(o.report.dropped, 2);
}

#[test]
fn waiters_join_a_load_in_progress_and_share_it() {
    let t = csv("time,model,size_bytes,duration\n0,a,3200000000,1\n0.5,a,,1\n1.0,a,,1\n2,a,,1\n");
    let o = replay(&t, &cfg());
    assert_accounted(&o);
    // Load: 0.5 s + 3.2 GB / 3.2 GB/s = 1.5 s. Two requests join; the last one hits.
    assert_eq!((o.report.cold_loads, o.report.joined, o.report.hits), (1, 2, 1));
    assert_eq!(o.report.loads, 1);
    assert_eq!(o.report.added_latency.max, 1.5);
}

#[test]
fn failed_loads_fail_their_waiters() {
    let t = csv("time,model,size_bytes,duration\n0,a,1000000000,1\n0.1,a,,1\n");
    let o = replay(&t, &SimConfig { load_failure_rate: 1.0, ..cfg() });
    assert_accounted(&o);
    assert_eq!(o.report.failed, 2);
    assert_eq!(o.report.served, 0);
}

/// Random traces with every feature on: pins, unpins, unloads, limit changes, retries, load
/// failures, unload times, estimates that are wrong, keep-alive expiry. Every request ends in exactly one outcome,
/// the engine's ledger stays consistent (checked at the end of every replay in debug builds),
/// and memory stays within the limit whenever estimates are not below the truth.
#[test]
fn random_traces_account_for_every_request() {
    for seed in 0..12u64 {
        let mut t = generate(&GenConfig {
            seed,
            requests: 1500,
            models: 10,
            rate: 1.0,
            sticky: 0.2,
            ..GenConfig::default()
        })
        .unwrap();
        let mut s = Sampler::new(seed + 100);
        let span = t.duration();
        let mut admin = Vec::new();
        for _ in 0..40 {
            let at = s.below(span.max(1));
            let model = s.below(t.models.len() as u64) as u32;
            let kind = [OpKind::Preload, OpKind::Pin, OpKind::Unpin, OpKind::Unload, OpKind::SetLimit]
                [s.below(5) as usize];
            let (arg, model) = if kind == OpKind::SetLimit {
                ((10 + s.below(30)) * GB, 1 + s.below(6) as u32)
            } else {
                (0, model)
            };
            admin.push(Op { at, arg, model, kind });
        }
        t.ops.extend(admin);
        t.ops.sort_by_key(|o| o.at);
        for (factor, names) in [(1.0, false), (1.3, true), (0.8, true)] {
            // Real sizes off the name estimates: loads measure more (or less) than reserved.
            let mut t = t.clone();
            for m in &mut t.models {
                m.size = m.size.map(|b| (b as f64 * factor) as u64);
            }
            let cfg = SimConfig {
                policy: PolicyChoice::ALL[(seed % 5) as usize],
                retries: 3,
                load_failure_rate: 0.05,
                unload_secs: 0.3,
                estimate_from_names: names,
                idle_ttl_secs: (seed % 2 == 0).then_some(30.0),
                seed,
                ..cfg()
            };
            let o = replay(&t, &cfg);
            assert_accounted(&o);
            let r = &o.report;
            assert_eq!(r.models.iter().map(|m| m.requests).sum::<u64>(), r.requests);
            if !names {
                // Sizes known up front: the ledger never exceeds the largest limit set.
                assert!(r.memory.peak_bytes <= 40 * GB.max(r.config.limit_bytes));
            }
        }
    }
}

#[test]
fn malformed_in_memory_traces_are_errors_not_panics() {
    use modelpool_sim::run;
    let t = csv("time,model,duration\n0,a,1\n1,b,1\n");
    let mut dup = t.clone();
    dup.models[1].id = dup.models[0].id.clone();
    assert!(run(&dup, &cfg()).unwrap_err().contains("defined twice"));
    let mut out_of_range = t.clone();
    out_of_range.ops[1].model = 7;
    assert!(run(&out_of_range, &cfg()).unwrap_err().contains("beyond the trace's models"));
    let mut unsorted = t.clone();
    unsorted.ops.swap(0, 1);
    assert!(run(&unsorted, &cfg()).unwrap_err().contains("sorted"));
    // The same errors from the instant replay (which checks each operation as it reaches it,
    // here the last ones, after requests it served) and from an offline policy (which checks
    // before it reads the trace's next uses).
    let long =
        csv(&(0..50).fold("time,model,duration\n".to_string(), |s, i| s + &format!("{i},m{},0\n", i % 3)));
    for policy in [PolicyChoice::Online(PolicyKind::Lru), PolicyChoice::Belady] {
        let c = SimConfig::instant(100 * GB, 2, policy);
        assert!(run(&long, &c).is_ok());
        let mut bad = long.clone();
        bad.ops[49].model = 9;
        assert!(run(&bad, &c).unwrap_err().contains("beyond the trace's models"), "{policy:?}");
        let mut late = long.clone();
        late.ops[48].at = 100;
        assert!(run(&late, &c).unwrap_err().contains("sorted"), "{policy:?}");
    }
    // Times and durations near the end of u64 saturate instead of overflowing.
    let far = csv("time,model,size_bytes,duration\n18000000000,a,1000,9000000000\n18000000001,a,,1\n");
    let o = replay(&far, &cfg());
    assert_accounted(&o);
}

/// Seeded mutations of valid CSV and JSONL traces (flipped, inserted and deleted bytes, cut
/// lines): parsing returns a trace or an error naming a line and a field, never panics, and any
/// trace that parses also replays without panicking.
#[test]
fn mutated_traces_parse_or_fail_cleanly() {
    use modelpool_sim::trace::{TraceError, parse_csv, parse_jsonl};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../traces/admin-ops.jsonl");
    let jsonl = std::fs::read(&path).unwrap();
    let mut csv_text = Vec::new();
    modelpool_sim::Trace::from_path(&path).unwrap().write_csv(&mut csv_text, &[]).unwrap();
    let alphabet = b"0123456789.,-:{}\"\n\r #abcxyz_eEGB%";
    let mut s = Sampler::new(77);
    let (mut ok, mut err) = (0, 0);
    for i in 0..3000 {
        let base = if i % 2 == 0 { &csv_text } else { &jsonl };
        let mut b = base.clone();
        for _ in 0..1 + s.below(4) {
            let pos = s.below(b.len() as u64) as usize;
            match s.below(4) {
                0 => b[pos] = alphabet[s.below(alphabet.len() as u64) as usize],
                1 => b.insert(pos, alphabet[s.below(alphabet.len() as u64) as usize]),
                2 => {
                    b.remove(pos);
                }
                _ => b.truncate(pos),
            }
            if b.is_empty() {
                b.push(b'\n');
            }
        }
        let parsed = if i % 2 == 0 { parse_csv(&b, "m.csv") } else { parse_jsonl(&b, "m.jsonl") };
        match parsed {
            Ok(t) => {
                ok += 1;
                let o = replay(&t, &cfg());
                assert_accounted(&o);
            }
            Err(TraceError::Parse { line, field, .. }) => {
                err += 1;
                assert!(line >= 1 && !field.is_empty(), "line {line} field {field:?}");
            }
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
    // Both outcomes happen: the mutations are neither all harmless nor all fatal.
    assert!(ok > 100 && err > 100, "ok {ok}, err {err}");
}

#[test]
fn idle_ttl_evicts_after_the_last_request_ends_at_the_servers_check_cadence() {
    // Load 0.5 s + 1 GB at 3.2 GB/s = 0.8125 s; served until 1.8125 s; a hit at 5 s ends at 6 s.
    let t = csv("time,model,size_bytes,duration\n0,a,1000000000,1\n5,a,,1\n40,a,,1\n");
    let without = replay(&t, &cfg());
    assert_eq!((without.report.hits, without.report.cold_loads), (2, 1));
    let o = replay(&t, &SimConfig { idle_ttl_secs: Some(10.0), ..cfg() });
    assert_accounted(&o);
    // Idle from 6 s (end of the request, not its start): expirable from 16 s; the check runs
    // every ttl/4 = 2.5 s, so at 17.5 s. The request at 40 s loads it again; it ends at
    // 41.8125 s and the model expires again at the 52.5 s check (checks go on until nothing
    // is left to expire).
    assert_eq!((o.report.hits, o.report.cold_loads), (1, 2));
    assert_eq!(o.report.evictions["expired"], 2);
    assert_eq!(evictions(&o), vec![(17_500_000_000, "a".to_string()), (52_500_000_000, "a".to_string())]);
    // A model in use is never expired, however long its request.
    let long = csv("time,model,size_bytes,duration\n0,a,1000000000,100\n50,b,1000000000,1\n");
    let o = replay(&long, &SimConfig { idle_ttl_secs: Some(10.0), ..cfg() });
    let a_evicted: Vec<u64> = evictions(&o).into_iter().filter(|(_, m)| m == "a").map(|(at, _)| at).collect();
    assert_eq!(a_evicted.len(), 1);
    assert!(a_evicted[0] >= 110_812_500_000, "a expired at {} while busy until 100.8 s", a_evicted[0]);
    assert!(SimConfig { idle_ttl_secs: Some(0.0), ..cfg() }.validate().is_err());
}

/// Issue 14.3, as the server now behaves: a request for a model whose own unload is under way
/// waits for the unload and loads the model again; it is never refused as `model_draining`.
#[test]
fn a_request_during_its_models_unload_waits_for_it_and_loads_again() {
    // a is unloaded (idle) at t=10; the unload takes 2 s; a is asked for again at t=11, inside
    // that window, and a preload of it at t=11.5.
    let t = csv("time,model,op,size_bytes,duration\n\
                 0,a,,8000000000,1\n\
                 10,a,unload,,\n\
                 11,a,,,1\n\
                 11.5,a,preload,,\n");
    for retries in [0, 3] {
        let o = replay(&t, &SimConfig { limit: 10 * GB, unload_secs: 2.0, retries, ..cfg() });
        assert_accounted(&o);
        assert!(rejects(&o).is_empty(), "no 503: {:?}", rejects(&o));
        assert_eq!((o.report.served, o.report.dropped, o.report.admin.refused), (2, 0, 0));
        let a = &o.report.models[0];
        assert_eq!((a.loads, a.unloads), (2, 1), "a loads again after its unload");
        let loads: Vec<u64> = o
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Load { at, .. } => Some(*at),
                _ => None,
            })
            .collect();
        assert_eq!(loads, vec![0, 12 * GB], "the second load starts as the unload ends");
        assert!(o.events.iter().any(|e| matches!(e, Event::Pin { .. })), "the parked preload pinned it");
    }
}

/// The report's retry hints against the waits they predicted, on a scripted scenario: one
/// 8-second request holds model a (6 GB of 10); requests for b (6 GB) every second are refused
/// with a hint, and each one's hint is the time left of a's request rounded up to a second.
#[test]
fn retry_hints_are_the_time_left_of_the_blocking_request() {
    let mut text =
        String::from("time,model,size_bytes,input_tokens,output_tokens\n0,a-7b-4bit,6000000000,8,8\n");
    for i in 1..8 {
        let size = if i == 1 { "6000000000" } else { "" };
        text += &format!("{i}.5,b-7b-4bit,{size},0,0\n");
    }
    let trace = crate::common::csv(&text);
    let cfg = SimConfig {
        limit: 10 * crate::common::GB,
        load_latency_secs: 0.0,
        load_bandwidth: f64::INFINITY,
        prefill_secs_per_token: 0.5,
        decode_secs_per_token: 0.5,
        queue_timeout_secs: 0.0,
        kv_cache: true,
        ..SimConfig::default()
    };
    let h = crate::common::replay(&trace, &cfg).report.retry_hints;
    assert_eq!((h.with_hint, h.resolved, h.too_short, h.over_by_more_than_1s), (7, 7, 0, 0), "{h:#?}");
    // a's request ends at 8 s: the refusal at 1.5 s waits 6.5 s and is told 7 s.
    assert!(h.max_over_secs <= 1.0 && h.mean_error_secs > 0.0, "{h:#?}");
}

#[test]
fn a_models_own_timings_replace_the_global_ones_for_it_alone() {
    use modelpool_sim::ModelTiming;
    // One 10 GB slot of room: `slow` is served, then `other` needs its memory. With the global
    // rates `slow` is done (10 tokens x 20 ms) before `other` arrives; with its own decode
    // time of 1 s per token it is still busy, so `other` waits for it in the queue.
    let t = csv("time,model,size_bytes,input_tokens,output_tokens\n\
                 0,slow,10000000000,10,10\n\
                 2,other,10000000000,10,10\n");
    let base = SimConfig {
        limit: 12 * GB,
        load_latency_secs: 1.0,
        load_bandwidth: f64::INFINITY,
        queue_timeout_secs: 60.0,
        ..SimConfig::default()
    };
    let plain = replay(&t, &base);
    assert_eq!(plain.report.queue.queued, 0);
    let own = ModelTiming { decode_secs_per_token: Some(1.0), load_secs: Some(0.5), ..Default::default() };
    let cfg = SimConfig { model_timing: [("slow".to_string(), own)].into(), ..base.clone() };
    let o = replay(&t, &cfg);
    assert_accounted(&o);
    assert_eq!(o.report.queue.queued, 1, "other waits for slow's 10 s of decoding");
    // slow loads in its own 0.5 s and is served until 10.502 s (10 prompt tokens at the global
    // 0.2 ms, 10 generated at its own 1 s); other waits 8.502 s, then loads (1 s, the global
    // time): 9.502 s added.
    assert!((o.report.added_latency.max - 9.502).abs() < 1e-3, "{:?}", o.report.added_latency);
    // A bad per-model timing is refused, naming the model.
    let bad = ModelTiming { load_secs: Some(-1.0), ..Default::default() };
    let err = SimConfig { model_timing: [("slow".to_string(), bad)].into(), ..base }.validate().unwrap_err();
    assert!(err.contains("slow") && err.contains("load time"), "{err}");
}
