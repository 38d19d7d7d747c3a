//! Admin route tests through `warp::test` with the fake backend: every `/admin` route, its
//! JSON shape, and the pool state after each.

use modelpool::{GB, Phase};
use serde_json::json;

use super::*;

#[tokio::test]
async fn unload_refused_is_409_unless_forced() {
    let h = Harness::new(10 * GB, 4);
    let r = h.req("POST", "/admin/models/chat-a/preload").await;
    assert_eq!(r.status(), 200);
    let e = assert_error(&h.req("POST", "/admin/models/chat-a/unload").await, 409, "unload_refused");
    assert!(e["message"].as_str().unwrap().contains("pinned"), "says why: {e}");
    assert_eq!(h.model("chat-a").phase, Phase::Resident);
    // Busy (not pinned) is refused too.
    let lease = h.pool.acquire("chat-b").await.unwrap();
    let e = assert_error(&h.req("POST", "/admin/models/chat-b/unload").await, 409, "unload_refused");
    assert!(e["message"].as_str().unwrap().contains("in flight"), "{e}");
    drop(lease);
    // Forced: unloaded now, memory returned.
    let v = json(&h.req("POST", "/admin/models/chat-a/unload?force=true").await);
    assert_eq!(v["report"]["unloaded_now"], true);
    assert_eq!(v["status"]["phase"], "absent");
    assert_eq!(h.pool.ledger().pinned, 0);
    assert_bad_request(&h.req("POST", "/admin/models/chat-b/unload?force=maybe").await, "force");
    assert_error(&h.req("POST", "/admin/models/nope/unload").await, 404, "model_not_found");
}

#[tokio::test]
async fn admin_routes_change_pool_state() {
    let h = Harness::new(10 * GB, 4);
    // Status.
    let v = json(&h.req("GET", "/admin/pool").await);
    assert_eq!(v["backend"], "fake");
    assert_eq!(v["policy"], "lru");
    assert_eq!(v["ledger"]["limit"], 10 * GB);
    assert_eq!(v["models"].as_array().unwrap().len(), catalogue().len());
    assert_eq!(v["stats"]["rejections_by_code"]["insufficient_memory"], 0);
    assert_eq!(v["stats"]["evictions_by_reason"]["capacity"], 0);

    // Preload pins.
    let v = json(&h.req("POST", "/admin/models/chat-big/preload").await);
    assert_eq!(v["pinned"], true);
    assert_eq!(v["status"]["phase"], "resident");
    let m = h.model("chat-big");
    assert!(m.pinned);
    assert_eq!(h.pool.ledger().pinned, 5 * GB);
    // Preload with a slash in the id.
    let r = h.req("POST", "/admin/models/mlx-community/Llama-3.2-3B-Instruct-4bit/preload").await;
    assert_eq!(r.status(), 200, "{:?}", r.body());
    assert!(h.model("mlx-community/Llama-3.2-3B-Instruct-4bit").pinned);

    // Model status.
    let v = json(&h.req("GET", "/admin/models/chat-big").await);
    assert_eq!(v["pinned"], true);
    assert_eq!(v["measured"], 5 * GB);

    // Dry run: chat-a fits now; with a 8 GB limit it must evict the unpinned model.
    let v = json(&h.req("GET", "/admin/models/chat-a/dry-run").await);
    assert_eq!(v["decision"], "load");
    assert_eq!(v["fits"], true);
    assert_eq!(v["would_evict"], json!([]));
    h.post("/v1/chat/completions", chat_body("chat-b", false)).await;
    let r = h.req("PUT", "/admin/limits").await; // no body
    assert_bad_request(&r, "body");
    let r = warp::test::request()
        .method("PUT")
        .path("/admin/limits")
        .json(&json!({"memory_limit": "8GB"}))
        .reply(&h.routes)
        .await;
    assert_eq!(r.status(), 200, "{:?}", r.body());
    let v = json(&r);
    assert_eq!(v["ledger"]["limit"], 8 * GB);
    assert_eq!(v["evicted"], json!([]), "6 GB + 2 GB still fit in 8 GB");
    let v = json(&h.req("GET", "/admin/models/chat-a/dry-run").await);
    assert_eq!(v["decision"], "load");
    assert_eq!(v["would_evict"], json!(["chat-b"]));
    assert_eq!(h.model("chat-b").phase, Phase::Resident, "dry run changes nothing");
    let v = json(&h.req("GET", "/admin/models/huge/dry-run").await);
    assert_eq!(v["fits"], false);
    assert_eq!(v["reject_code"], "model_too_large");

    // Lowering the limit evicts the unpinned model at once; a percentage is of system memory
    // (16 GB fixed in the harness).
    let r = warp::test::request()
        .method("POST")
        .path("/admin/limits")
        .json(&json!({"memory_limit": "40%", "max_models": 3}))
        .reply(&h.routes)
        .await;
    let v = json(&r);
    assert_eq!(v["ledger"]["limit"], 6_400_000_000u64);
    assert_eq!(v["ledger"]["max_models"], 3);
    assert_eq!(v["evicted"], json!(["chat-b"]));
    assert_eq!(h.model("chat-b").phase, Phase::Absent);
    assert_eq!(h.pool.ledger().used(), 6 * GB);
    for (body, param) in [
        (json!({"memory_limit": "150%"}), "memory_limit"),
        (json!({"memory_limit": "lots"}), "memory_limit"),
        (json!({"max_models": 0}), "max_models"),
        (json!({"max_models": -1}), "max_models"),
        (json!({"limit": "1GB"}), "limit"),
    ] {
        let r = warp::test::request().method("PUT").path("/admin/limits").json(&body).reply(&h.routes).await;
        let e = assert_bad_request(&r, param);
        assert!(!e["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(h.pool.ledger().limit, 6_400_000_000, "refused changes change nothing");

    // Unpin.
    let v = json(&h.req("POST", "/admin/models/chat-big/unpin").await);
    assert_eq!(v["was_pinned"], true);
    assert!(!h.model("chat-big").pinned);
    let v = json(&h.req("POST", "/admin/models/chat-big/unpin").await);
    assert_eq!(v["was_pinned"], false);
    // Pin a resident model again.
    let v = json(&h.req("POST", "/admin/models/chat-big/pin").await);
    assert_eq!(v["pinned"], true);
    assert!(h.model("chat-big").pinned);
    assert_error(&h.req("POST", "/admin/models/chat-a/pin").await, 409, "unload_refused");

    // Preload that cannot fit: 503 with the engine's code, not 500.
    let r = h.req("POST", "/admin/models/huge/preload").await;
    assert_error(&r, 503, "model_too_large");

    // Events.
    let v = json(&h.req("GET", "/admin/events?limit=3").await);
    let ev = v["events"].as_array().unwrap();
    assert_eq!(ev.len(), 3);
    let v = json(&h.req("GET", "/admin/pool/events").await);
    let all = v["events"].as_array().unwrap();
    assert!(all.len() > 3);
    assert!(all.iter().any(|e| e["event"] == "evict" && e["model"] == "chat-b"), "{all:?}");
    assert!(all.iter().any(|e| e["event"] == "pin"), "{all:?}");
    assert_bad_request(&h.req("GET", "/admin/events?limit=abc").await, "limit");
    assert_bad_request(&h.req("GET", "/admin/events?limit=0").await, "limit");
    // Wrong method on an admin action.
    assert_error(&h.req("GET", "/admin/models/chat-a/preload").await, 405, "method_not_allowed");
    h.check_invariants();
}

#[tokio::test]
async fn pool_status_reports_the_settings_a_simulation_needs_and_events_count_since_start() {
    let t = modelpool::TimingModel {
        load_latency_secs: 0.0,
        load_bandwidth: None,
        unload_secs: 0.0,
        prefill_secs_per_token: 0.0,
        decode_secs_per_token: 0.0,
    };
    let h = Harness::with_backend(10 * GB, 3, FakeBackend::new().with_timing(t), catalogue());
    let v = json(&h.req("GET", "/admin/pool").await);
    assert_eq!(v["config"]["policy"], "lru");
    assert_eq!(v["config"]["max_queue"], 1024);
    assert!(v["config"]["idle_ttl_secs"].is_null());
    assert_eq!(v["ledger"]["max_models"], 3);
    assert_eq!(serde_json::from_value::<modelpool::TimingModel>(v["timing"].clone()).unwrap(), t);
    let e0 = json(&h.req("GET", "/admin/events?limit=1").await)["total"].as_u64().unwrap();
    h.pool.acquire("chat-a").await.unwrap();
    h.pool.acquire("chat-a").await.unwrap();
    let v = json(&h.req("GET", "/admin/events?limit=100").await);
    // A load, its completion, then a hit: three events more than before.
    assert_eq!(v["total"].as_u64().unwrap() - e0, 3, "{v}");
    let kinds: Vec<&str> =
        v["events"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(&kinds[kinds.len() - 3..], ["load", "loaded", "hit"]);
    // A backend without a timing model says so.
    let plain = Harness::new(10 * GB, 3);
    assert!(json(&plain.req("GET", "/admin/pool").await)["timing"].is_null());
}

/// `/admin/residency`: per model, where it is and what a request would cost now (issue 18).
#[tokio::test]
async fn residency_says_what_admitting_each_model_would_cost() {
    let h = Harness::new(6 * GB, 4).with_state(|s| s.with_node_id("n1"));
    let lease = h.pool.acquire("chat-a").await.unwrap(); // 2 GB, busy
    drop(h.pool.acquire("chat-b").await.unwrap()); // 2 GB, idle
    let v = json(&h.req("GET", "/admin/residency").await);
    assert_eq!(v["node"], "n1");
    assert_eq!(v["limit"], 6 * GB);
    assert_eq!(v["used"], 4 * GB);
    let m = |id: &str| v["models"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap().clone();
    assert_eq!((m("chat-a")["phase"].as_str(), m("chat-a")["leases"].as_u64()), (Some("resident"), Some(1)));
    assert_eq!(m("chat-a")["decision"], "hit");
    assert_eq!(m("chat-a")["expected_wait_secs"], 0.0);
    // chat-big (5 GB) cannot fit beside busy chat-a (evicting idle chat-b is not enough).
    assert_eq!(m("chat-big")["decision"], "reject");
    // vis (1 GB) fits without evicting anything.
    assert_eq!((m("vis")["decision"].as_str(), m("vis")["evict_bytes"].as_u64()), (Some("load"), Some(0)));
    assert!(m("vis")["expected_wait_secs"].as_f64().unwrap() >= 0.0);
    // A model larger than the limit: refused, and waiting cannot help.
    assert_eq!(m("huge")["decision"], "reject");
    assert!(m("huge")["expected_wait_secs"].is_null());
    drop(lease);
    let v = json(&h.req("GET", "/admin/residency").await);
    let big = v["models"].as_array().unwrap().iter().find(|m| m["id"] == "chat-big").unwrap().clone();
    // Once chat-a is idle: a load that evicts both 2 GB models.
    assert_eq!((big["decision"].as_str(), big["evict_bytes"].as_u64()), (Some("load"), Some(4 * GB)));
    // Nothing changed.
    assert_eq!(h.model("chat-big").phase, Phase::Absent);
    assert_eq!(h.pool.status().stats.loads, 2);
}
