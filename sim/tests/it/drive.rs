//! The trace driver against a real server over loopback (in process: the server's own pool,
//! fake backend with the simulator's timing model, and HTTP stack), the recording it compares
//! with, and the spacing that makes the comparison exact.

use std::sync::Arc;
use std::time::Duration;

use modelpool::backend::fake::FakeBackend;
use modelpool::http::{AppState, Metrics, TimedBackend};
use modelpool::{
    EvictionPolicy, FileEstimator, Learned, LogMode, Lru, ModelPool, ModelSpec, PoolConfig, SizeEstimator,
};
use modelpool_sim::drive::{self, DriveOptions};
use modelpool_sim::replay::RequestOutcome;
use modelpool_sim::space::{decision_gap, space};
use modelpool_sim::{SimConfig, Trace, run, run_recorded};

use crate::common::{GB, csv};

/// A small trace with contention: three models of 6 GB under a 13 GB limit, bursts, a pin.
fn contended() -> Trace {
    let mut text =
        String::from("time,model,op,size_bytes,input_tokens,output_tokens\n0,m0,preload,1000000000,,\n");
    let models = ["m1", "m2", "m3", "m1", "m1", "m2", "m3", "m3", "m2", "m1"];
    for (i, m) in models.iter().cycle().take(30).enumerate() {
        let size = if i < 3 { "6000000000" } else { "" };
        text += &format!("{:.3},{m},,{size},{},{}\n", 0.05 + i as f64 * 0.09, 40 + i * 7, 5 + i % 4);
    }
    csv(&text)
}

fn config() -> SimConfig {
    SimConfig {
        limit: 13 * GB,
        max_models: 3,
        load_latency_secs: 0.1,
        load_bandwidth: 60e9,
        unload_secs: 0.02,
        prefill_secs_per_token: 0.000_1,
        decode_secs_per_token: 0.01,
        queue_timeout_secs: 1.0,
        ..SimConfig::default()
    }
}

#[test]
fn recorded_outcomes_add_up_to_the_report() {
    for trace in [contended(), Trace::from_path("../traces/bursty-tenants.csv".as_ref()).unwrap()] {
        let cfg = config();
        let (o, rec) = run_recorded(&trace, &cfg).unwrap();
        assert_eq!(o.report, run(&trace, &cfg).unwrap().report, "recording changes nothing");
        let count = |k: RequestOutcome| rec.outcomes.iter().filter(|&&o| o == k).count() as u64;
        let r = &o.report;
        assert_eq!(count(RequestOutcome::Hit), r.hits);
        assert_eq!(count(RequestOutcome::Pending), 0);
        let rejected: u64 =
            rec.outcomes.iter().filter(|o| matches!(o, RequestOutcome::Rejected(_))).count() as u64;
        assert_eq!(rejected, r.dropped);
        // Every served request is a hit, a join, a load or came through the queue.
        let served = count(RequestOutcome::Hit)
            + count(RequestOutcome::Join)
            + count(RequestOutcome::Load)
            + count(RequestOutcome::Queued);
        assert_eq!(served, r.served);
        assert!(rec.marks.windows(2).all(|w| w[0].at <= w[1].at), "marks are in time order");
        assert_eq!(rec.marks.iter().filter(|m| m.arrival).count(), trace.ops.len());
    }
}

#[test]
fn spacing_reaches_its_margin_and_only_delays() {
    let trace = contended();
    let cfg = config();
    let before = decision_gap(&trace, &cfg).unwrap().unwrap();
    let margin = 30_000_000;
    assert!(before.gap < margin, "the test trace starts tighter than the margin ({before:?})");
    let spaced = space(&trace, &cfg, margin, 10_000).unwrap();
    assert!(spaced.moves > 0);
    assert!(decision_gap(&spaced.trace, &cfg).unwrap().unwrap().gap >= margin);
    assert_eq!(spaced.trace.ops.len(), trace.ops.len());
    for (a, b) in trace.ops.iter().zip(&spaced.trace.ops) {
        assert_eq!((a.kind, a.model, a.arg), (b.kind, b.model, b.arg), "order and content kept");
        assert!(b.at >= a.at, "only delays");
    }
    // Deterministic.
    assert_eq!(space(&trace, &cfg, margin, 10_000).unwrap(), spaced);
}

#[test]
fn the_server_config_is_one_the_server_accepts() {
    let trace = contended();
    let text = drive::server_config(&trace, &config(), 5000);
    let file = modelpool::config::FileConfig::from_toml(&text, "generated").unwrap();
    let args = modelpool::config::ServeArgs::default();
    let cfg = modelpool::config::ServeConfig::merge(&args, file, "generated").unwrap();
    assert_eq!(cfg.max_models, 3);
    assert_eq!(cfg.event_log, 5000);
    assert_eq!(cfg.fake.timing, config().timing());
    let m1 = cfg.models.iter().find(|m| &*m.id == "m1").unwrap();
    assert_eq!(m1.size_hint, Some(6 * GB));
}

/// A server like `modelpool serve --backend fake` configured as `cfg` with `trace`'s models.
async fn start_server(trace: &Trace, cfg: &SimConfig) -> (String, tokio::sync::oneshot::Sender<()>) {
    let t = cfg.timing();
    let fake = FakeBackend::new().with_timing(t).with_natural_tokens(1000);
    let metrics = Arc::new(Metrics::new());
    let backend = Arc::new(TimedBackend::new(Arc::new(fake), metrics.clone()));
    let mut pc = PoolConfig::with_limit(cfg.limit);
    pc.max_models = cfg.max_models;
    pc.queue_timeout = (cfg.queue_timeout_secs * 1e9) as u64;
    pc.log = LogMode::Ring(100_000);
    pc.load_latency_secs = t.load_latency_secs;
    pc.load_bandwidth = t.load_bandwidth.unwrap_or(f64::INFINITY);
    let policy: Box<dyn EvictionPolicy> = Box::new(Lru::new());
    let estimator: Box<dyn SizeEstimator> = Box::new(Learned::new(FileEstimator::default()));
    let pool: ModelPool = ModelPool::new(pc, policy, estimator, backend);
    for m in &trace.models {
        let mut spec = ModelSpec::new(m.id.clone()).with_type(m.model_type);
        spec.size_hint = m.size;
        pool.register(spec);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let state = AppState::new(pool, metrics);
    tokio::spawn(modelpool::http::serve(
        listener,
        state,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(1),
    ));
    (url, tx)
}

/// Driver options for the in-process server at `url`: real speed, no keys, no unloading first.
fn options(url: String) -> DriveOptions {
    DriveOptions {
        url,
        speed: 1.0,
        max_in_flight: 64,
        api_key: None,
        admin_key: None,
        stream: false,
        request_timeout: Duration::from_secs(60),
        no_admin: false,
        unload_first: false,
    }
}

#[test]
fn a_spaced_trace_driven_against_the_server_decides_as_predicted() {
    let cfg = config();
    let trace = space(&contended(), &cfg, 40_000_000, 10_000).unwrap().trace;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let (url, stop) = start_server(&trace, &cfg).await;
        let opts = options(url);
        let obs = drive::drive(&trace, &opts).await.unwrap();
        assert!(drive::preconditions(&trace, &obs.before).is_empty());
        let server_cfg = drive::sim_config_for(&obs.before, &SimConfig::default()).unwrap();
        assert_eq!(server_cfg.timing(), cfg.timing(), "the server reports its timing model");
        assert_eq!((server_cfg.limit, server_cfg.max_models), (cfg.limit, cfg.max_models));
        let cmp = drive::compare(&trace, 1.0, &server_cfg, &obs).unwrap();
        let text = drive::render_comparison(&cmp);
        assert!(cmp.observed.outcomes.contains_key("load") && cmp.observed.loads >= 3, "{text}");
        assert!(cmp.observed.evictions.values().sum::<u64>() > 0, "the trace evicts: {text}");
        assert!(cmp.decisions_equal, "{text}");
        assert_eq!(cmp.agree, cmp.compared, "{text}");
        let (p, o) = (&cmp.predicted, &cmp.observed);
        assert_eq!(
            (&p.outcomes, p.loads, &p.evictions, &p.models),
            (&o.outcomes, o.loads, &o.evictions, &o.models)
        );
        let _ = stop.send(());
    });
}

#[test]
fn calibration_recovers_the_fake_backends_timings_and_unload_first_empties_the_server() {
    let cfg = config();
    // Sessions on three 6 GB models (two fit): loads, evictions and many hits; no pin, so the
    // models stay resident afterwards.
    let mut text = String::from("time,model,size_bytes,input_tokens,output_tokens\n");
    let sessions = [("m1", 6), ("m2", 6), ("m1", 4), ("m3", 6), ("m2", 4)];
    let mut i = 0;
    for (m, n) in sessions {
        for _ in 0..n {
            let size = if i < 12 { "6000000000" } else { "" };
            text += &format!("{:.3},{m},{size},{},{}\n", 0.05 + i as f64 * 0.15, 30 + i * 11, 3 + i % 5);
            i += 1;
        }
    }
    let trace = csv(&text);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let (url, stop) = start_server(&trace, &cfg).await;
        let mut opts = options(url);
        let obs = drive::drive(&trace, &opts).await.unwrap();
        let hits = obs.records.iter().filter(|r| r.outcome == "hit").count();
        assert!(hits >= 9, "enough requests served at once to fit: {hits}");
        let c = drive::calibrate(&trace, &obs).unwrap();
        let t = &c.timing;
        // The fake backend sleeps exactly the model's times; HTTP adds a millisecond or two.
        let close = |got: f64, want: f64, tol: f64| (got - want).abs() <= tol * want;
        assert!(close(t.decode_secs_per_token, 0.01, 0.15), "decode {}", t.decode_secs_per_token);
        for m in ["m1", "m2", "m3"] {
            let own = c.models.get(m).unwrap_or_else(|| panic!("{m} loaded: {:?}", c.models));
            // 0.1 s + 6 GB at 60 GB/s.
            let load = own.load_secs.unwrap();
            assert!(close(load, 0.2, 0.1), "{m} load {load}");
            if let Some(d) = own.decode_secs_per_token {
                assert!(close(d, 0.01, 0.2), "{m} decode {d}");
            }
        }
        // The calibration round-trips through its file form, and a plain timing model reads
        // as a calibration without per-model entries.
        let back: modelpool_sim::Calibration =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        let near = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * b.abs(),
            (a, b) => a == b,
        };
        assert!(near(Some(back.timing.decode_secs_per_token), Some(t.decode_secs_per_token)));
        assert_eq!(back.models.keys().collect::<Vec<_>>(), c.models.keys().collect::<Vec<_>>());
        for (a, b) in back.models.values().zip(c.models.values()) {
            assert!(near(a.load_secs, b.load_secs) && near(a.decode_secs_per_token, b.decode_secs_per_token));
        }
        let plain: modelpool_sim::Calibration =
            serde_json::from_str(&serde_json::to_string(&cfg.timing()).unwrap()).unwrap();
        assert!(plain.models.is_empty() && plain.timing == cfg.timing());

        // The models stayed: a second run would start from them, unlike the simulation...
        let pool = drive::server_state(&opts).await.unwrap();
        assert!(!drive::preconditions(&trace, &pool).is_empty(), "models are resident after the run");
        // ... unless it unloads them first.
        opts.unload_first = true;
        let obs = drive::drive(&trace, &opts).await.unwrap();
        assert!(
            drive::preconditions(&trace, &obs.before).is_empty(),
            "{:?}",
            drive::preconditions(&trace, &obs.before)
        );
        let server_cfg = drive::sim_config_for(&obs.before, &SimConfig::default()).unwrap();
        let cmp = drive::compare(&trace, 1.0, &server_cfg, &obs).unwrap();
        assert_eq!(cmp.predicted.loads, cmp.observed.loads, "{}", drive::render_comparison(&cmp));

        // A pinned model is not unloaded behind the operator's back: the run is refused,
        // naming it, and the model stays.
        let http = reqwest::Client::new();
        let pin = http.post(format!("{}/admin/models/m2/preload", opts.url)).send().await.unwrap();
        assert!(pin.status().is_success(), "{}", pin.text().await.unwrap());
        let err = drive::unload_all(&opts).await.unwrap_err().to_string();
        assert!(err.contains("'m2' is pinned"), "{err}");
        let pool = drive::server_state(&opts).await.unwrap();
        let m2 = pool["models"].as_array().unwrap().iter().find(|m| m["id"] == "m2").unwrap();
        assert_eq!((m2["phase"].as_str(), m2["pinned"].as_bool()), (Some("resident"), Some(true)));
        let _ = stop.send(());
    });
}
