//! Fuzzing on the stable toolchain: property tests (proptest, a fixed ChaCha seed) over every
//! request body through the handlers' parse and validation path, the TOML config, the GGUF
//! header reader (mutations of the real model's header), and the `Authorization` header. The
//! trace parsers are fuzzed in the simulator's tests (sim/tests/it/fuzz.rs).
//!
//! Each target runs `MODELPOOL_FUZZ_CASES` cases (default 2000) and prints how many ran; a
//! panic or a broken property fails the test with the minimal input proptest shrank it to.
//! The long run (docs/server.md, "Reliability"):
//!
//! ```sh
//! MODELPOOL_FUZZ_CASES=1000000 cargo test --release --test it fuzz:: -- --nocapture
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use modelpool::GB;
use modelpool::backend::fake::FakeBackend;
use modelpool::config::{ApiKey, FileConfig, ServeConfig};
use modelpool::http::Auth;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};
use warp::http::HeaderValue;

use crate::http::Harness;

/// Cases per target: `MODELPOOL_FUZZ_CASES`, default 2000.
fn cases() -> u32 {
    std::env::var("MODELPOOL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

/// A runner with a fixed seed (the same cases on every run and machine), no shrinking limit
/// changes, no persistence files.
fn runner() -> TestRunner {
    let config = Config { cases: cases(), failure_persistence: None, ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[7u8; 32]))
}

/// Run `test` over `strategy` and report the count.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let start = Instant::now();
    let mut runner = runner();
    let result = runner.run(&strategy, test);
    let n = cases();
    match result {
        Ok(()) => {
            println!("fuzz {name}: {n} cases, 0 failures, {:.1}s", start.elapsed().as_secs_f64())
        }
        Err(e) => panic!("fuzz {name}: {e}"),
    }
}

/// Byte-level mutations of `seed`: overwrite, insert, delete, truncate, and overwriting 8 bytes
/// with an extreme little-endian integer (lengths and counts in binary formats).
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    Word(usize, u64),
}

fn edit() -> impl Strategy<Value = Edit> {
    let pos = prop_oneof![0usize..64, 0usize..1 << 22];
    prop_oneof![
        (pos.clone(), any::<u8>()).prop_map(|(p, b)| Edit::Set(p, b)),
        (pos.clone(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        pos.clone().prop_map(Edit::Delete),
        pos.clone().prop_map(Edit::Truncate),
        (pos, prop_oneof![Just(u64::MAX), Just(1 << 40), Just(u64::MAX / 7), any::<u64>(), 0u64..300])
            .prop_map(|(p, w)| Edit::Word(p, w)),
    ]
}

fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for e in edits {
        let n = v.len().max(1);
        match *e {
            Edit::Set(p, b) if !v.is_empty() => v[p % n] = b,
            Edit::Insert(p, b) => v.insert(p % (v.len() + 1), b),
            Edit::Delete(p) if !v.is_empty() => {
                v.remove(p % n);
            }
            Edit::Truncate(p) => v.truncate(p % (v.len() + 1)),
            Edit::Word(p, w) if v.len() >= 8 => {
                let at = p % (v.len() - 7);
                v[at..at + 8].copy_from_slice(&w.to_le_bytes());
            }
            _ => {}
        }
    }
    v
}

/// The request fields the endpoints know (and the admin limits body's).
const KEYS: [&str; 26] = [
    "model",
    "messages",
    "role",
    "content",
    "prompt",
    "input",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "include_usage",
    "stop",
    "seed",
    "echo",
    "encoding_format",
    "tools",
    "logprobs",
    "response_format",
    "type",
    "text",
    "image_url",
    "memory_limit",
    "max_models",
];

/// A known field name, or a short random one.
fn field_name() -> impl Strategy<Value = String> + Clone {
    prop_oneof![prop::sample::select(&KEYS[..]).prop_map(str::to_string), "[a-z_]{1,8}"]
}

/// JSON values built from the request fields the endpoints know, with values of every type.
fn json_value() -> impl Strategy<Value = Value> {
    let key = field_name();
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![Just(0u32), Just(1), Just(8), Just(u32::MAX), 0u32..40000].prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just("chat-a".to_string()),
            Just("embed".to_string()),
            Just("vis".to_string()),
            Just("user".to_string()),
            Just("system".to_string()),
            Just("text".to_string()),
            Just("base64".to_string()),
            Just("50%".to_string()),
            Just("1GB".to_string()),
            ".{0,12}",
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..7)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Valid bodies to mutate, one per route.
fn valid_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let chat = json!({"model": "chat-a", "messages": [{"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 4,
        "temperature": 0.5, "top_p": 0.9, "stop": ["x"], "seed": -1, "stream": true,
        "stream_options": {"include_usage": true}});
    let completion = json!({"model": "chat-b", "prompt": ["a", "b"], "max_tokens": 3, "echo": true});
    let embed = json!({"model": "embed", "input": ["one", "two"], "encoding_format": "base64"});
    let limits = json!({"memory_limit": "8GB", "max_models": 3});
    [
        ("/v1/chat/completions", chat),
        ("/v1/completions", completion),
        ("/v1/embeddings", embed),
        ("/admin/limits", limits),
    ]
    .into_iter()
    .map(|(p, v)| (p, serde_json::to_vec(&v).unwrap()))
    .collect()
}

const ROUTES: [&str; 4] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/admin/limits"];

#[derive(Debug, Clone)]
enum Body {
    Bytes(Vec<u8>),
    Json(Value),
    Mutated(usize, Vec<Edit>),
    /// A valid body with fields set to other values (`Some`) or removed (`None`).
    Fields(usize, Vec<(String, Option<Value>)>),
}

/// Check one reply is well formed: a known status, an OpenAI error object when not 200, and a
/// complete SSE stream (one `[DONE]` last, or an error event) when streamed.
fn check_reply(r: &warp::http::Response<Bytes>) -> Result<(), TestCaseError> {
    let status = r.status().as_u16();
    prop_assert!(matches!(status, 200 | 400 | 404 | 409 | 413 | 429 | 500 | 503), "status {status}");
    let text = String::from_utf8_lossy(r.body());
    if status != 200 {
        let v: Value =
            serde_json::from_slice(r.body()).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}");
        prop_assert!(v["error"]["type"].is_string(), "{text}");
        return Ok(());
    }
    let sse = r.headers().get("content-type").is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream"));
    if sse {
        let done = text.matches("data: [DONE]").count();
        let error = text.contains("data: {\"error\"");
        prop_assert!(done == 1 && text.ends_with("data: [DONE]\n\n") || done == 0 && error, "{text}");
    } else {
        prop_assert!(serde_json::from_slice::<Value>(r.body()).is_ok(), "{text}");
    }
    Ok(())
}

#[test]
fn request_bodies_through_parse_and_validation() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _in_runtime = rt.enter();
    // Two model slots, so valid requests load, hit and evict.
    let h = Harness::with_backend(20 * GB, 2, FakeBackend::new(), crate::http::catalogue());
    let valid = valid_bodies();
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Body::Bytes),
        json_value().prop_map(Body::Json),
        (0..valid.len(), prop::collection::vec(edit(), 1..4)).prop_map(|(i, e)| Body::Mutated(i, e)),
        (0..valid.len(), prop::collection::vec((field_name(), prop::option::of(json_value())), 1..4))
            .prop_map(|(i, f)| Body::Fields(i, f)),
    ];
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u64>::new());
    fuzz("request bodies", (0..ROUTES.len(), body), |(route, body)| {
        let (path, bytes) = match body {
            Body::Bytes(b) => (ROUTES[route], b),
            Body::Json(v) => (ROUTES[route], serde_json::to_vec(&v).unwrap()),
            Body::Mutated(i, edits) => (valid[i].0, mutate(&valid[i].1, &edits)),
            Body::Fields(i, fields) => {
                let mut v: Value = serde_json::from_slice(&valid[i].1).unwrap();
                for (k, val) in fields {
                    match val {
                        Some(val) => v[k.as_str()] = val,
                        None => {
                            v.as_object_mut().unwrap().remove(&k);
                        }
                    }
                }
                (valid[i].0, serde_json::to_vec(&v).unwrap())
            }
        };
        let r = rt.block_on(
            warp::test::request()
                .method(if path == "/admin/limits" { "PUT" } else { "POST" })
                .path(path)
                .header("content-type", "application/json")
                .body(bytes)
                .reply(&h.routes),
        );
        check_reply(&r)?;
        *statuses.lock().unwrap().entry(r.status().as_u16()).or_default() += 1;
        // Every reply is complete here, so no request holds a model.
        let status = h.pool.status();
        prop_assert!(status.models.iter().all(|m| m.leases == 0 && m.waiters == 0));
        h.pool.with_state(|s| s.check_invariants()).map_err(TestCaseError::fail)?;
        // Keep the pool serving: restore the limits a fuzzed /admin/limits may have changed.
        if path == "/admin/limits" {
            rt.block_on(h.pool.set_limits(Some(20 * GB), Some(2)))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        Ok(())
    });
    // Proptest also counts the shrinking steps of a failure; with none, one reply per case.
    println!("fuzz request bodies: replies by status {:?}", statuses.lock().unwrap());
    // Still serving after the run.
    let r = rt.block_on(h.post("/v1/chat/completions", crate::http::chat_body("chat-a", false)));
    assert_eq!(r.status(), 200);
}

/// The documented example config (src/config.rs), every field set.
const EXAMPLE_TOML: &str = r#"listen = "127.0.0.1:8080"
memory_limit = "75%"
max_models = 4
policy = "lru"
backend = "fake"
preload = ["m1"]
idle_ttl = "10m"
queue_timeout = "60s"
max_queue = 1024
shutdown_grace = "30s"
max_body = "4MB"
log_level = "info"
api_keys = ["sk-1"]
admin_keys = ["adm-1"]
public_metrics = false
insecure_no_auth = false
header_read_timeout = "10s"
body_read_timeout = "30s"
write_timeout = "30s"
max_connections = 1024
context_tokens = 32768

[fake]
load_time = "300ms"
token_delay = "0ms"

[[models]]
id = "m1"
type = "text-gen"
size = "5GB"
context = 2048

[[models]]
id = "m2"
type = "embeddings"
"#;

#[test]
fn toml_config_files() {
    let toml_text = prop_oneof![
        prop::collection::vec(edit(), 1..6).prop_map(|e| mutate(EXAMPLE_TOML.as_bytes(), &e)),
        // Line-level: keep, drop or duplicate lines and swap values between them.
        prop::collection::vec((0usize..40, 0usize..40, 0u8..3), 1..6).prop_map(|ops| {
            let mut lines: Vec<String> = EXAMPLE_TOML.lines().map(str::to_string).collect();
            for (a, b, op) in ops {
                let (a, b) = (a % lines.len().max(1), b % lines.len().max(1));
                match op {
                    0 if !lines.is_empty() => {
                        lines.remove(a);
                    }
                    1 if !lines.is_empty() => lines.insert(b, lines[a].clone()),
                    _ if lines.len() > 1 => {
                        let va = lines[a].split_once('=').map(|(_, v)| v.to_string());
                        if let (Some(v), Some((k, _))) = (va, lines[b].clone().split_once('=')) {
                            lines[b] = format!("{k}={v}");
                        }
                    }
                    _ => {}
                }
            }
            lines.join("\n").into_bytes()
        }),
        "[a-z_\\[\\]=\" .0-9%\n#{},]{0,120}".prop_map(String::into_bytes),
    ];
    fuzz("toml config", toml_text, |bytes| {
        let text = String::from_utf8_lossy(&bytes);
        let Ok(file) = FileConfig::from_toml(&text, "fuzz.toml") else {
            return Ok(());
        };
        // Merging reads the file system for paths; fuzzed paths are not followed.
        let touches_fs = file.models_dir.is_some()
            || file.api_keys_file.is_some()
            || file.admin_keys_file.is_some()
            || file.models.iter().any(|m| m.path.is_some());
        if !touches_fs && let Ok(c) = ServeConfig::merge(&Default::default(), file, "fuzz.toml") {
            prop_assert!(c.max_models >= 1 && !c.models.is_empty() && c.limits.max_connections >= 1);
            prop_assert!(
                c.listen.ip().is_loopback()
                    || c.insecure_no_auth
                    || !c.api_keys.is_empty() && !c.admin_keys.is_empty()
            );
        }
        Ok(())
    });
}

/// The real model's GGUF header (up to the first 4 MiB), or a small synthetic one when the
/// models are not set up (scripts/setup.sh fetches them).
fn gguf_seed() -> (Vec<u8>, &'static str) {
    let real = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if let Ok(f) = std::fs::File::open(&real) {
        use std::io::Read;
        let mut v = Vec::new();
        f.take(4 << 20).read_to_end(&mut v).unwrap();
        return (v, "SmolLM2-135M-Instruct.Q4_1.gguf");
    }
    let mut v = b"GGUF".to_vec();
    v.extend(3u32.to_le_bytes());
    v.extend(2u64.to_le_bytes()); // tensors
    v.extend(2u64.to_le_bytes()); // kv
    for (k, t) in [("general.name", 8u32), ("general.alignment", 4)] {
        v.extend((k.len() as u64).to_le_bytes());
        v.extend(k.as_bytes());
        v.extend(t.to_le_bytes());
        if t == 8 {
            v.extend(4u64.to_le_bytes());
            v.extend(b"test");
        } else {
            v.extend(32u32.to_le_bytes());
        }
    }
    for name in ["a.weight", "b.weight"] {
        v.extend((name.len() as u64).to_le_bytes());
        v.extend(name.as_bytes());
        v.extend(2u32.to_le_bytes());
        v.extend(64u64.to_le_bytes());
        v.extend(32u64.to_le_bytes());
        v.extend(2u32.to_le_bytes());
        v.extend(0u64.to_le_bytes());
    }
    (v, "a synthetic header (models/ not set up)")
}

#[test]
fn gguf_header_reader() {
    let (mut seed, what) = gguf_seed();
    let path = PathBuf::from("fuzz.gguf");
    // Keep only the header (what the reader consumes), so each case mutates what it reads.
    struct Counting<'a>(&'a [u8], usize);
    impl std::io::Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = std::io::Read::read(&mut &self.0[self.1..], buf)?;
            self.1 += n;
            Ok(n)
        }
    }
    let mut counting = Counting(&seed, 0);
    let reference =
        modelpool::catalog::read_gguf_tensors(&mut counting, &path).expect("the seed header parses");
    let header_len = counting.1;
    seed.truncate(header_len);
    assert!(!reference.is_empty());
    println!("fuzz gguf: mutating {what} ({} bytes, {} tensors)", seed.len(), reference.len());
    fuzz("gguf header", prop::collection::vec(edit(), 1..5), |edits| {
        let bytes = mutate(&seed, &edits);
        if let Ok(tensors) = modelpool::catalog::read_gguf_tensors(&bytes[..], &path) {
            prop_assert!(tensors.len() <= 1_000_000);
        }
        Ok(())
    });
}

#[test]
fn authorization_header() {
    let keys: Vec<ApiKey> = ["sk-user-1", "sk-user-2"].iter().map(|k| k.parse().unwrap()).collect();
    let admin: Vec<ApiKey> = vec!["adm-0123".parse().unwrap()];
    let auth = Arc::new(Auth::new(&keys, &admin, false));
    let value = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        (
            prop_oneof![
                Just("Bearer "),
                Just("bearer "),
                Just("BEARER  "),
                Just("Basic "),
                Just(""),
                Just("Bearer")
            ],
            prop_oneof![
                prop::sample::select(&["sk-user-1", "sk-user-2", "adm-0123", "sk-user-", ""][..])
                    .prop_map(str::to_string),
                "[ -~]{0,12}"
            ],
            prop_oneof![Just(""), Just(" "), Just("x"), Just("\t")],
        )
            .prop_map(|(s, k, t)| format!("{s}{k}{t}").into_bytes()),
    ];
    let path =
        prop_oneof![Just("/v1/models"), Just("/admin/pool"), Just("/metrics"), Just("/health"), Just("/v1")];
    fuzz("authorization header", (path, prop::option::of(value)), |(path, value)| {
        let header = match value.as_deref().map(HeaderValue::from_bytes) {
            Some(Ok(h)) => Some(h),
            Some(Err(_)) => return Ok(()), // not a legal header value: hyper refuses it first
            None => None,
        };
        let got = auth.check(path, header.as_ref()).is_ok();
        // The reference: the token after a case-insensitive "Bearer ", trimmed.
        let token = header.as_ref().and_then(|h| {
            let b = h.as_bytes();
            (b.len() >= 7 && b[..7].eq_ignore_ascii_case(b"bearer "))
                .then(|| String::from_utf8_lossy(b[7..].trim_ascii()).into_owned())
        });
        let is = |set: &[ApiKey]| token.as_deref().is_some_and(|t| set.iter().any(|k| k.expose() == t));
        let want = match path {
            "/health" => true,
            "/v1/models" | "/v1" => is(&keys) || is(&admin),
            _ => is(&admin),
        };
        prop_assert_eq!(got, want, "{:?} {:?}", path, header);
        Ok(())
    });
}
