//! The fleet simulator: routers, the client retry layer, placement and the pooled bound.

use modelpool::Decision;
use modelpool_sim::fleet::{
    Candidate, ClientModel, FleetConfig, NO_VIEW, NodeSpec, Placement, RouterKind, choose, class_of,
    home_order, litellm_config, place, pooled_bound, run_fleet, search_placement,
};
use modelpool_sim::{SimConfig, Trace};

use crate::common::{GB, csv, replay};

fn node(id: &str, limit: u64) -> NodeSpec {
    NodeSpec { id: id.into(), limit, max_models: 4 }
}

fn fleet(nodes: Vec<NodeSpec>, router: RouterKind, node: SimConfig) -> FleetConfig {
    FleetConfig { nodes, router, node, client: ClientModel::default(), view_ttl_secs: 1.0, seed: 7 }
}

fn timed() -> SimConfig {
    SimConfig {
        load_latency_secs: 0.2,
        load_bandwidth: 10e9,
        prefill_secs_per_token: 0.0001,
        decode_secs_per_token: 0.01,
        ..SimConfig::default()
    }
}

/// `n` requests cycling over `models` (name, size in GB), one every `gap` seconds.
fn cycle(models: &[(&str, u64)], n: usize, gap: f64) -> Trace {
    let mut text = String::from("time,model,size_bytes,input_tokens,output_tokens\n");
    let mut seen = std::collections::HashSet::new();
    for i in 0..n {
        // A skewed but deterministic choice: model k with weight 1/(k+1).
        let pick = (i * 7 + i / 3) % (models.len() * (models.len() + 1) / 2);
        let (mut acc, mut k) = (0, 0);
        for j in 0..models.len() {
            acc += models.len() - j;
            if pick < acc {
                k = j;
                break;
            }
        }
        let (m, gb) = models[k];
        let size = if seen.insert(m) { (gb * GB).to_string() } else { String::new() };
        text += &format!("{:.3},{m},{size},{},{}\n", i as f64 * gap, 20 + i % 50, 4 + i % 9);
    }
    csv(&text)
}

#[test]
fn the_residency_rule_ranks_by_class_then_cost() {
    assert_eq!(class_of(Decision::Hit, 0), 0);
    assert_eq!(class_of(Decision::Join, 0), 1);
    assert_eq!(class_of(Decision::Load, 0), 2);
    assert_eq!(class_of(Decision::Load, 5), 3);
    assert_eq!(class_of(Decision::AwaitUnload, 0), 3);
    assert_eq!(class_of(Decision::Queue, 0), 4);
    assert_eq!(class_of(Decision::Reject, 0), 5);
    let c = |class, evict_bytes, wait: Option<f64>, in_flight| Candidate {
        class,
        home_rank: 0,
        evict_bytes,
        expected_wait_secs: wait,
        in_flight,
    };
    assert_eq!(choose(&[]), None);
    // Class first, even against a busier node.
    assert_eq!(choose(&[c(2, 0, Some(1.0), 0), c(0, 0, Some(0.0), 9)]), Some(1));
    // Then fewer bytes evicted, then a shorter wait (unknown = infinite), then fewer in flight.
    assert_eq!(choose(&[c(3, 8, Some(1.0), 0), c(3, 2, Some(5.0), 3)]), Some(1));
    assert_eq!(choose(&[c(4, 0, None, 0), c(4, 0, Some(30.0), 5)]), Some(1));
    assert_eq!(choose(&[c(0, 0, Some(0.0), 2), c(0, 0, Some(0.0), 1)]), Some(1));
    // Ties go to the first; a node without a view comes last.
    assert_eq!(choose(&[c(1, 0, Some(2.0), 1), c(1, 0, Some(2.0), 1)]), Some(0));
    assert_eq!(choose(&[c(NO_VIEW, 0, None, 0), c(5, 0, Some(3.0), 4)]), Some(1));
    // A load goes home first (before fewer bytes evicted); held models ignore the home order.
    let ranked =
        |class, home_rank, evict_bytes| Candidate { home_rank, ..c(class, evict_bytes, Some(1.0), 0) };
    assert_eq!(choose(&[ranked(3, 1, 0), ranked(3, 0, 9)]), Some(1));
    assert_eq!(choose(&[ranked(2, 2, 0), ranked(3, 0, 0)]), Some(0), "free memory first");
    assert_eq!(choose(&[ranked(0, 1, 0), ranked(0, 0, 0)]), Some(0));
    // The home order is a fixed permutation per model, and models spread over nodes.
    let order = home_order("llama-3.2-3b-instruct-4bit", 5);
    assert_eq!(order, home_order("llama-3.2-3b-instruct-4bit", 5));
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
    let homes: std::collections::BTreeSet<usize> =
        (0..40).map(|i| home_order(&format!("model-{i}"), 3)[0]).collect();
    assert_eq!(homes.len(), 3);
}

#[test]
fn one_node_fleet_replays_like_one_pool() {
    let trace = cycle(&[("a-7b-4bit", 5), ("b-3b-4bit", 3), ("c-8b-4bit", 6), ("d-1b-4bit", 1)], 300, 0.05);
    let sim = SimConfig { limit: 10 * GB, max_models: 3, queue_timeout_secs: 0.0, ..timed() };
    let mut cfg = fleet(vec![node("only", 10 * GB)], RouterKind::Residency, sim.clone());
    cfg.nodes[0].max_models = 3;
    cfg.client.retries = 0;
    let f = run_fleet(&trace, &cfg, None).unwrap();
    let r = replay(&trace, &sim).report;
    assert_eq!(f.requests, r.requests);
    assert_eq!((f.hits, f.loads, f.served), (r.hits, r.loads, r.served), "{f:#?}\n{r:#?}");
    assert_eq!(f.node_refusals, r.rejections.values().sum::<u64>());
    assert_eq!(f.client_failed, r.dropped);
    assert!(f.node_refusals > 0, "the scenario must refuse some requests: {f:#?}");
    assert!((f.latency_p99 - r.added_latency.p99).abs() < 1e-9);
}

/// FLEET.md's experiment: two nodes, one of which refuses the model (too small for it).
#[test]
fn residency_routing_never_fails_a_request_another_node_could_serve() {
    let trace = cycle(&[("big-8b-4bit", 6)], 124, 0.1);
    let nodes = vec![node("small", 2 * GB), node("large", 10 * GB)];
    let random = run_fleet(&trace, &fleet(nodes.clone(), RouterKind::Random, timed()), None).unwrap();
    let residency = run_fleet(&trace, &fleet(nodes.clone(), RouterKind::Residency, timed()), None).unwrap();
    assert_eq!(residency.client_failed, 0, "{residency:#?}");
    assert_eq!(residency.per_node[0].requests, 0, "the small node is never tried: {residency:#?}");
    // Random routing tries the small node until LiteLLM cools it down (after more than
    // `allowed_fails` failures in a minute), costing attempts.
    assert!(random.node_refusals > 0 && random.attempts > 124, "{random:#?}");
    assert_eq!(random.requests, random.served + random.client_failed);
    // Without cooldowns, a retry may land on the refusing node again: requests fail although
    // the other node could have served them at that moment.
    let mut no_cooldown = fleet(nodes, RouterKind::Random, timed());
    no_cooldown.client.cooldown_secs = 0.0;
    let random = run_fleet(&trace, &no_cooldown, None).unwrap();
    assert!(random.client_failed > 0 && random.avoidable_failures == random.client_failed, "{random:#?}");
}

#[test]
fn the_client_layer_retries_cools_down_and_honours_should_retry() {
    let trace = cycle(&[("huge-70b-4bit", 40)], 20, 1.0);
    let nodes = vec![node("a", 16 * GB), node("b", 16 * GB)];
    let mut cfg = fleet(nodes, RouterKind::Random, timed());
    let r = run_fleet(&trace, &cfg, None).unwrap();
    // Too large everywhere: every request fails; LiteLLM retries each twice, and deployments
    // that keep failing cool down, so some attempts fail without reaching a node.
    assert_eq!(r.client_failed, 20);
    assert_eq!(r.attempts, 60);
    assert!(r.node_refusals < 60 && r.client_failures.contains_key("model_too_large"), "{r:#?}");
    assert_eq!(r.avoidable_failures, 0);
    cfg.client.honour_should_retry = true;
    let r = run_fleet(&trace, &cfg, None).unwrap();
    // A refusal marked x-should-retry: false ends its request; only attempts that met cooling
    // deployments (no node called) are retried.
    assert_eq!(r.client_failed, 20);
    assert_eq!(r.client_failures.get("model_too_large"), Some(&r.node_refusals), "{r:#?}");
    assert!(r.attempts < 60, "{r:#?}");
}

#[test]
fn hashing_keeps_one_copy_and_random_routing_duplicates() {
    let models = [("a-7b-4bit", 5), ("b-3b-4bit", 3), ("c-8b-4bit", 6), ("d-1b-4bit", 1), ("e-14b-4bit", 9)];
    let trace = cycle(&models, 600, 0.05);
    let nodes = vec![node("n0", 24 * GB), node("n1", 24 * GB), node("n2", 24 * GB)];
    let hash = run_fleet(&trace, &fleet(nodes.clone(), RouterKind::Hash, timed()), None).unwrap();
    let random = run_fleet(&trace, &fleet(nodes.clone(), RouterKind::Random, timed()), None).unwrap();
    assert_eq!(hash.duplicate_bytes_mean, 0.0, "{hash:#?}");
    assert_eq!(hash.loads, models.len() as u64, "one load per model: {hash:#?}");
    assert!(random.duplicate_bytes_mean > 0.0 && random.loads > hash.loads, "{random:#?}");
    // The fleet holds 72 GB: pooled, every model stays resident after its first load.
    let pooled = pooled_bound(&trace, &fleet(nodes, RouterKind::Hash, timed())).unwrap();
    assert_eq!(pooled.loads, models.len() as u64);
}

#[test]
fn placement_respects_room_and_copies_into_spare_memory() {
    let models =
        [("a-7b-4bit", 5), ("b-3b-4bit", 3), ("c-8b-4bit", 6), ("d-1b-4bit", 1), ("huge-70b-4bit", 40)];
    let trace = cycle(&models, 300, 0.05);
    let nodes = vec![node("n0", 8 * GB), node("n1", 8 * GB), node("n2", 12 * GB)];
    let p = place(&trace, &nodes);
    assert_eq!(p, place(&trace, &nodes), "deterministic");
    assert_eq!(p.nodes_of.len(), models.len());
    let mut bytes = [0u64; 3];
    for (m, ks) in p.nodes_of.iter().enumerate() {
        assert!(!ks.is_empty());
        let mut uniq = ks.clone();
        uniq.dedup();
        assert_eq!(uniq.len(), ks.len(), "a model is placed on a node once");
        if models[m].1 <= 12 {
            for &k in ks {
                bytes[k] += models[m].1 * GB;
            }
        }
    }
    // The huge model goes to the largest node; what fits is never over a node's memory.
    assert_eq!(p.nodes_of[4], vec![2]);
    for (k, n) in nodes.iter().enumerate() {
        assert!(bytes[k] <= n.limit, "node {k} holds {} > {}", bytes[k], n.limit);
    }
    // Spare room holds copies of the most requested models (a and b fill n0 and n1 together).
    assert_eq!(
        (p.nodes_of[0].as_slice(), p.nodes_of[1].as_slice()),
        ([0, 1].as_slice(), [1, 0].as_slice()),
        "{p:?}"
    );
    let urls: Vec<String> = (0..3).map(|k| format!("http://10.0.0.{k}:8080")).collect();
    let yaml = litellm_config(&trace, &p, &urls, &ClientModel::default());
    let deployments = p.nodes_of.iter().map(Vec::len).sum::<usize>();
    assert_eq!(yaml.matches("- model_name:").count(), deployments);
    assert!(yaml.contains("api_base: \"http://10.0.0.2:8080/v1\""));
    assert!(yaml.contains("num_retries: 2") && yaml.contains("background_health_checks: false"));
}

#[test]
fn fleet_runs_are_deterministic_and_validated() {
    let trace = cycle(&[("a-7b-4bit", 5), ("b-3b-4bit", 3), ("c-8b-4bit", 6)], 200, 0.05);
    let nodes = vec![node("n0", 8 * GB), node("n1", 8 * GB)];
    for router in RouterKind::ALL {
        let cfg = fleet(nodes.clone(), router, timed());
        assert_eq!(
            run_fleet(&trace, &cfg, None).unwrap(),
            run_fleet(&trace, &cfg, None).unwrap(),
            "{router}"
        );
    }
    let mut bad = fleet(vec![], RouterKind::Random, timed());
    assert!(run_fleet(&trace, &bad, None).unwrap_err().contains("at least one node"));
    bad.nodes = nodes;
    bad.node.policy = modelpool_sim::PolicyChoice::Belady;
    assert!(run_fleet(&trace, &bad, None).unwrap_err().contains("sees the future"));
}

#[test]
fn on_a_committed_trace_residency_routing_and_a_searched_placement_approach_the_pooled_bound() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../traces/chat-zipf.csv");
    let trace = Trace::from_path(std::path::Path::new(path)).unwrap();
    let nodes: Vec<NodeSpec> = (0..3).map(|k| node(&format!("n{k}"), 12 * GB)).collect();
    let sim = SimConfig::default();
    let run = |r| run_fleet(&trace, &fleet(nodes.clone(), r, sim.clone()), None).unwrap();
    let (random, hash, residency) =
        (run(RouterKind::Random), run(RouterKind::Hash), run(RouterKind::Residency));
    let pooled = pooled_bound(&trace, &fleet(nodes.clone(), RouterKind::Residency, sim.clone())).unwrap();
    assert!(
        residency.miss_ratio <= 1.5 * pooled.miss_ratio,
        "{} vs {}",
        residency.miss_ratio,
        pooled.miss_ratio
    );
    assert!(
        residency.miss_ratio * 4.0 <= random.miss_ratio,
        "{} vs {}",
        residency.miss_ratio,
        random.miss_ratio
    );
    assert!(residency.miss_ratio < hash.miss_ratio);
    assert_eq!(residency.avoidable_failures, 0);
    // The local search only keeps improvements over the greedy placement.
    let cfg = fleet(nodes.clone(), RouterKind::Placement, sim);
    let greedy = place(&trace, &nodes);
    let searched = search_placement(&trace, &cfg, greedy.clone(), 1).unwrap();
    let score = |p: &Placement| {
        let r = run_fleet(&trace, &cfg, Some(p)).unwrap();
        r.requests - r.hits + 2 * r.client_failed
    };
    assert!(score(&searched) < score(&greedy), "the search finds a better placement on this trace");
}

/// The rule and the home order agree with the LiteLLM strategy's (tools/litellm/
/// modelpool_routing.py) on their shared fixture.
#[test]
fn the_rule_matches_the_litellm_strategy_on_the_shared_fixture() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fleet/choices.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "the fixture covers every class and tie-break");
    for case in cases {
        let model = case["model"].as_str().unwrap();
        let views = case["views"].as_array().unwrap();
        let candidates: Vec<Candidate> = views
            .iter()
            .enumerate()
            .map(|(i, view)| {
                let in_flight = case["in_flight"][i].as_u64().unwrap() as u32;
                let home_rank = case["home_rank"].get(i).and_then(|v| v.as_u64()).unwrap_or(0) as u32;
                let entry = view["models"]
                    .as_array()
                    .and_then(|ms| ms.iter().find(|m| m["id"].as_str() == Some(model)));
                match entry {
                    None => Candidate {
                        class: NO_VIEW,
                        home_rank,
                        evict_bytes: 0,
                        expected_wait_secs: None,
                        in_flight,
                    },
                    Some(e) => {
                        // An unknown decision (a newer node) ranks as no view, as in Python.
                        let decision: Option<Decision> = serde_json::from_value(e["decision"].clone()).ok();
                        let evict_bytes = e["evict_bytes"].as_u64().unwrap_or(0);
                        let Some(decision) = decision else {
                            return Candidate {
                                class: NO_VIEW,
                                home_rank,
                                evict_bytes: 0,
                                expected_wait_secs: None,
                                in_flight,
                            };
                        };
                        Candidate {
                            class: class_of(decision, evict_bytes),
                            home_rank,
                            evict_bytes,
                            expected_wait_secs: e["expected_wait_secs"].as_f64(),
                            in_flight,
                        }
                    }
                }
            })
            .collect();
        let expected = case["expected"].as_u64().unwrap() as usize;
        assert_eq!(choose(&candidates), Some(expected), "case {}", case["name"]);
    }
    for h in fixture["home_orders"].as_array().unwrap() {
        let order: Vec<usize> = serde_json::from_value(h["order"].clone()).unwrap();
        let n = h["nodes"].as_u64().unwrap() as usize;
        assert_eq!(home_order(h["model"].as_str().unwrap(), n), order, "{h}");
    }
}
