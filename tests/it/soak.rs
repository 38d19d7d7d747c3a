//! Chaos soak: the real server (accept loop, keys, limits) over the fake backend injecting load
//! failures, panics while loading and unloading, slow unloads and measured sizes off the
//! estimate; clients on loopback sending normal and streaming requests, dropping streams
//! mid-way, reading slowly, sending garbage and wrong keys, and an admin client churning pins,
//! unloads (forced too) and limits. At the end:
//!
//! - every request got exactly one well-formed response (a status from the documented table, an
//!   OpenAI error object, a complete SSE stream; nothing after the response on the connection),
//!   except streams the client itself dropped after the head;
//! - the ledger is consistent: the invariant check passes, resident equals the sum of the
//!   resident models, nothing is reserved, draining or awaited, no lease, waiter or queued
//!   request is left;
//! - once every unpinned model is unloaded, memory is back to the pinned baseline;
//! - the server still serves.
//!
//! Bounded: `MODELPOOL_SOAK_SECS` (default 3) of traffic from `MODELPOOL_SOAK_CLIENTS` clients
//! (default 8). The long run (docs/server.md, "Reliability"):
//!
//! ```sh
//! MODELPOOL_SOAK_SECS=600 MODELPOOL_SOAK_CLIENTS=32 cargo test --release --test it soak -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modelpool::backend::Backend;
use modelpool::backend::fake::{FakeBackend, FaultPlan};
use modelpool::config::ServerLimitsConfig;
use modelpool::http::Auth;
use modelpool::{GB, ModelSpec, ModelType, Phase, PoolConfig};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::{Harness, eventually};

const USER: &str = "sk-soak-user";
const ADMIN: &str = "sk-soak-admin";
const PINNED: &str = "pinned-1b";
const MODELS: [&str; 5] = ["chat-1b", "chat-2b", "chat-3b", "pinned-1b", "embed"];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One finished exchange, classified.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// Status and code (`-` for 200), `stream` for a complete SSE stream.
    Reply(u16, String),
    /// A stream the client dropped on purpose after the head.
    DroppedByClient,
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    classes: Mutex<BTreeMap<Class, u64>>,
    broken: Mutex<Vec<String>>,
}

impl Tally {
    fn add(&self, c: Class) {
        *self.classes.lock().unwrap().entry(c).or_default() += 1;
    }
    fn broken(&self, what: String) {
        self.broken.lock().unwrap().push(what);
    }
}

/// A parsed HTTP/1.1 response: status, lower-case headers, de-chunked body.
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// Parse exactly one response from `raw` (read to EOF): anything after it is an error.
fn parse_one(raw: &[u8]) -> Result<Reply, String> {
    let text_end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of head")?;
    let head = std::str::from_utf8(&raw[..text_end]).map_err(|e| e.to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty head")?;
    let status: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut rest = &raw[text_end + 4..];
    let body = if headers.get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").ok_or("truncated chunk size")?;
            let size = usize::from_str_radix(
                std::str::from_utf8(&rest[..eol]).map_err(|e| e.to_string())?.trim(),
                16,
            )
            .map_err(|e| format!("chunk size: {e}"))?;
            rest = &rest[eol + 2..];
            if rest.len() < size + 2 {
                return Err("truncated chunk".into());
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
            if size == 0 {
                break;
            }
        }
        body
    } else {
        let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).ok_or("no length")?;
        if rest.len() < len {
            return Err(format!("body {} of {len} bytes", rest.len()));
        }
        let body = rest[..len].to_vec();
        rest = &rest[len..];
        body
    };
    if !rest.is_empty() {
        return Err(format!("{} bytes after the response", rest.len()));
    }
    Ok(Reply { status, headers, body })
}

/// Check a reply is well formed and classify it.
fn classify(r: &Reply) -> Result<Class, String> {
    let text = String::from_utf8_lossy(&r.body);
    if !matches!(r.status, 200 | 400 | 401 | 404 | 409 | 413 | 429 | 500 | 503) {
        return Err(format!("status {}: {text}", r.status));
    }
    if r.status != 200 {
        let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("{e}: {text}"))?;
        let e = &v["error"];
        if !(e["message"].is_string() && e["type"].is_string()) {
            return Err(format!("not an error object: {text}"));
        }
        // Waiting helps every 503 but these two (docs/server.md, "Errors").
        let hopeless = e["code"] == "model_too_large"
            || e["code"] == "max_models_reached"
                && e["message"].as_str().is_some_and(|m| m.contains("pinned"));
        if r.status == 503 && !hopeless && !r.headers.contains_key("retry-after") {
            return Err(format!("503 without Retry-After: {text}"));
        }
        return Ok(Class::Reply(r.status, e["code"].as_str().unwrap_or("null").to_string()));
    }
    if r.headers.get("content-type").is_some_and(|c| c.starts_with("text/event-stream")) {
        let done = text.matches("data: [DONE]\n\n").count();
        let error = text.contains("data: {\"error\"");
        return match (done, error) {
            (1, false) if text.ends_with("data: [DONE]\n\n") => Ok(Class::Reply(200, "stream".into())),
            // An error after the stream started (the model was drained under it).
            (0, true) => Ok(Class::Reply(200, "stream_error".into())),
            _ => Err(format!("bad SSE framing: {text}")),
        };
    }
    serde_json::from_slice::<Value>(&r.body).map_err(|e| format!("{e}: {text}"))?;
    Ok(Class::Reply(200, "-".into()))
}

fn request(method: &str, path: &str, key: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: soak\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(k) = key {
        head += &format!("authorization: Bearer {k}\r\n");
    }
    head += "\r\n";
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

#[derive(Clone, Copy)]
enum Read {
    All,
    Slow,
    DropAfterHead,
}

/// Send one request on a fresh connection and account for its response.
async fn exchange(addr: SocketAddr, tally: &Tally, req: Vec<u8>, read: Read, what: &str) {
    tally.sent.fetch_add(1, Ordering::Relaxed);
    let run = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(&req).await.map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        match read {
            Read::All => {
                s.read_to_end(&mut raw).await.map_err(|e| format!("read: {e}"))?;
            }
            Read::Slow => {
                let mut buf = [0u8; 256];
                loop {
                    let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    raw.extend_from_slice(&buf[..n]);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Read::DropAfterHead => {
                let mut buf = [0u8; 512];
                while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    raw.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&raw);
                if head.starts_with("HTTP/1.1 200") && head.contains("text/event-stream") {
                    return Ok(Class::DroppedByClient);
                }
                // Refused before streaming: the rest of the reply is short; read it whole.
                s.read_to_end(&mut raw).await.map_err(|e| format!("read: {e}"))?;
            }
        }
        classify(&parse_one(&raw)?)
    };
    match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Ok(c)) => tally.add(c),
        Ok(Err(e)) => tally.broken(format!("{what}: {e}")),
        Err(_) => tally.broken(format!("{what}: no response within 60 s")),
    }
}

async fn client(addr: SocketAddr, id: u64, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut rng = ChaCha8Rng::seed_from_u64(0x50a4 + id);
    while !stop.load(Ordering::Relaxed) {
        let model = MODELS[(rng.next_u32() % MODELS.len() as u32) as usize];
        let roll = rng.next_u32() % 100;
        let chat = |stream: bool| {
            serde_json::to_vec(&json!({"model": model, "stream": stream, "max_tokens": 6,
                "messages": [{"role": "user", "content": format!("soak {id}")}]}))
            .unwrap()
        };
        let (req, read, what) = match roll {
            0..30 => (request("POST", "/v1/chat/completions", Some(USER), &chat(false)), Read::All, "chat"),
            30..45 => (request("POST", "/v1/chat/completions", Some(USER), &chat(true)), Read::All, "stream"),
            45..55 => (
                request("POST", "/v1/chat/completions", Some(USER), &chat(true)),
                Read::DropAfterHead,
                "dropped stream",
            ),
            55..60 => {
                (request("POST", "/v1/chat/completions", Some(USER), &chat(true)), Read::Slow, "slow reader")
            }
            60..70 => {
                let body = serde_json::to_vec(&json!({"model": "embed", "input": ["a", "b c"]})).unwrap();
                (request("POST", "/v1/embeddings", Some(USER), &body), Read::All, "embeddings")
            }
            70..78 => {
                let body = serde_json::to_vec(
                    &json!({"model": model, "prompt": "p", "max_tokens": 4, "stream": roll % 2 == 0}),
                )
                .unwrap();
                (request("POST", "/v1/completions", Some(USER), &body), Read::All, "completions")
            }
            78..88 => {
                let n = (rng.next_u32() % 64) as usize;
                let garbage: Vec<u8> = (0..n).map(|_| rng.next_u32() as u8).collect();
                (request("POST", "/v1/chat/completions", Some(USER), &garbage), Read::All, "garbage")
            }
            88..94 => (
                request("POST", "/v1/chat/completions", Some("sk-wrong"), &chat(false)),
                Read::All,
                "wrong key",
            ),
            _ => (request("GET", "/admin/pool", Some(USER), b""), Read::All, "user key on admin"),
        };
        exchange(addr, &tally, req, read, what).await;
    }
}

async fn admin_churn(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>, ops: Arc<AtomicU64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(0xad31);
    // The pinned model is the baseline: churn never touches its pin.
    let churned: Vec<&str> = MODELS.iter().copied().filter(|m| *m != PINNED).collect();
    while !stop.load(Ordering::Relaxed) {
        let m = churned[(rng.next_u32() % churned.len() as u32) as usize];
        let (method, path, body) = match rng.next_u32() % 6 {
            0 => ("POST", format!("/admin/models/{m}/pin"), Vec::new()),
            1 => ("POST", format!("/admin/models/{m}/unpin"), Vec::new()),
            2 => ("POST", format!("/admin/models/{m}/unload"), Vec::new()),
            3 => ("POST", format!("/admin/models/{m}/unload?force=true"), Vec::new()),
            4 => ("POST", format!("/admin/models/{m}/preload"), Vec::new()),
            _ => {
                let gb = 4 + rng.next_u32() % 5;
                let body = serde_json::to_vec(
                    &json!({"memory_limit": format!("{gb}GB"), "max_models": 2 + rng.next_u32() % 3}),
                )
                .unwrap();
                ("PUT", "/admin/limits".to_string(), body)
            }
        };
        ops.fetch_add(1, Ordering::Relaxed);
        exchange(addr, &tally, request(method, &path, Some(ADMIN), &body), Read::All, "admin").await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_loses_nothing_and_leaves_the_ledger_clean() {
    // Injected panics are expected: keep them out of the output (others still print).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info.payload().downcast_ref::<String>().map(String::as_str).unwrap_or("");
        if !msg.starts_with("injected panic") {
            default_hook(info);
        }
    }));
    let secs = env_or("MODELPOOL_SOAK_SECS", 3);
    let clients = env_or("MODELPOOL_SOAK_CLIENTS", 8);
    let plan = FaultPlan {
        seed: 42,
        load_failure: 0.10,
        load_panic: 0.05,
        unload_panic: 0.15,
        slow_unload: 0.20,
        slow_unload_time: Duration::from_millis(30),
        skewed_size: 0.5,
        size_skew: 0.3,
    };
    let fake = Arc::new(
        FakeBackend::new()
            .with_load_time(Duration::from_millis(10))
            .with_token_delay(Duration::from_millis(1))
            .with_faults(plan),
    );
    let specs = vec![
        ModelSpec::new("chat-1b").with_size(GB),
        ModelSpec::new("chat-2b").with_size(2 * GB),
        ModelSpec::new("chat-3b").with_size(3 * GB),
        ModelSpec::new(PINNED).with_size(GB),
        ModelSpec::new("embed").with_type(ModelType::Embeddings).with_size(GB / 2),
    ];
    let cfg = PoolConfig::with_limit(6 * GB).with_queue(Duration::from_secs(2).as_nanos() as u64, 64);
    let cfg = PoolConfig { max_models: 3, ..cfg };
    let h = Harness::with_config(cfg, fake.clone() as Arc<dyn Backend>, fake.clone(), specs);
    // Preload the baseline (retrying injected load faults).
    let mut tries = 0;
    while h.pool.preload(PINNED).await.is_err() {
        tries += 1;
        assert!(tries < 50, "the pinned model never loaded");
    }
    let baseline = h.pool.ledger().pinned;
    assert!(baseline > 0);
    let key = |s: &str| s.parse().unwrap();
    let state = h.state.clone().with_auth(Auth::new(&[key(USER)], &[key(ADMIN)], false)).with_limits(
        ServerLimitsConfig {
            write_timeout: Duration::from_millis(500),
            header_read_timeout: Duration::from_secs(2),
            body_read_timeout: Duration::from_secs(2),
            max_connections: 256,
            ..ServerLimitsConfig::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(modelpool::http::serve(
        listener,
        state,
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(10),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let admin_ops = Arc::new(AtomicU64::new(0));
    let mut tasks: Vec<_> =
        (0..clients).map(|i| tokio::spawn(client(addr, i, stop.clone(), tally.clone()))).collect();
    tasks.push(tokio::spawn(admin_churn(addr, stop.clone(), tally.clone(), admin_ops.clone())));
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    // Quiet: no request is in flight. Restore the limits and let unloads finish.
    h.pool.set_limits(Some(6 * GB), Some(3)).await.unwrap();
    let quiet = || {
        let s = h.pool.status();
        s.ledger.reserved == 0
            && s.ledger.draining == 0
            && s.ledger.awaiting == 0
            && s.models.iter().all(|m| m.leases == 0 && m.waiters == 0 && m.queued == 0)
    };
    assert!(
        eventually(Duration::from_secs(20), quiet).await,
        "pool never went quiet: {:#?}",
        h.pool.status().ledger
    );
    h.check_invariants();
    let s = h.pool.status();
    let resident: u64 = s.models.iter().filter(|m| m.phase == Phase::Resident).map(|m| m.ledger_bytes).sum();
    assert_eq!(s.ledger.resident, resident, "resident is the sum of the resident models");

    // Back to the baseline: unpin and unload everything but the pinned model, over HTTP.
    for m in MODELS.iter().filter(|m| **m != PINNED) {
        for action in ["unpin", "unload?force=true"] {
            exchange(
                addr,
                &tally,
                request("POST", &format!("/admin/models/{m}/{action}"), Some(ADMIN), b""),
                Read::All,
                "final admin",
            )
            .await;
        }
    }
    assert!(eventually(Duration::from_secs(20), quiet).await);
    let l = h.pool.ledger();
    assert_eq!((l.resident, l.pinned), (baseline, baseline), "memory back to the pinned baseline: {l:#?}");
    assert_eq!(h.model(PINNED).phase, Phase::Resident);
    h.check_invariants();

    // Still serving (a load of another model may meet an injected fault: retry).
    let mut served = false;
    for _ in 0..20 {
        let before = tally.classes.lock().unwrap().get(&Class::Reply(200, "-".into())).copied().unwrap_or(0);
        let body = serde_json::to_vec(
            &json!({"model": PINNED, "messages": [{"role": "user", "content": "still there?"}]}),
        )
        .unwrap();
        exchange(
            addr,
            &tally,
            request("POST", "/v1/chat/completions", Some(USER), &body),
            Read::All,
            "final",
        )
        .await;
        if tally.classes.lock().unwrap().get(&Class::Reply(200, "-".into())).copied().unwrap_or(0) > before {
            served = true;
            break;
        }
    }
    assert!(served, "the server still serves");

    let sent = tally.sent.load(Ordering::Relaxed);
    let classes = tally.classes.lock().unwrap().clone();
    let answered: u64 = classes.values().sum();
    let faults = fake.faults();
    println!(
        "soak: {secs} s, {clients} clients + 1 admin client, {sent} requests ({} admin ops)",
        admin_ops.load(Ordering::Relaxed)
    );
    println!(
        "soak: faults injected {} (load failures {}, load panics {}, unload panics {}, slow unloads {}, sizes off the estimate {})",
        faults.total(),
        faults.load_failures,
        faults.load_panics,
        faults.unload_panics,
        faults.slow_unloads,
        faults.skewed_sizes
    );
    let st = h.pool.status().stats;
    println!(
        "soak: pool loads {}, load failures {}, evictions {}",
        st.loads,
        st.load_failures,
        st.evictions.iter().sum::<u64>()
    );
    for (c, n) in &classes {
        println!("soak:   {n:>7}  {c:?}");
    }
    let broken = tally.broken.lock().unwrap().clone();
    assert!(
        broken.is_empty(),
        "{} requests without one well-formed response, e.g. {:?}",
        broken.len(),
        &broken[..broken.len().min(5)]
    );
    assert_eq!(answered, sent, "every request accounted for once");
    assert!(
        faults.load_failures + faults.load_panics > 0 && faults.unload_panics > 0,
        "faults were injected: {faults:?}"
    );
    assert!(
        classes.contains_key(&Class::Reply(200, "stream".into()))
            && classes.contains_key(&Class::Reply(401, "invalid_api_key".into()))
    );

    let _ = stop_server.send(());
    assert_eq!(server.await.unwrap(), 0, "nothing in flight at shutdown");
}
