//! Bounded resources over a real socket: a client trickling its head or body is dropped (or gets
//! a 408), a client that stops reading a stream is cut off and its lease released, connections
//! over the cap get a well-formed 503, `max_tokens` above the context is a clear 400.

use std::net::SocketAddr;
use std::time::Duration;

use modelpool::GB;
use modelpool::backend::fake::FakeBackend;
use modelpool::config::ServerLimitsConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

fn limits() -> ServerLimitsConfig {
    ServerLimitsConfig {
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_millis(300),
        max_connections: 3,
        ..ServerLimitsConfig::default()
    }
}

async fn start(state: AppState) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(modelpool::http::serve(
        listener,
        state,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(2),
    ));
    (addr, tx)
}

/// Read until EOF (or 10 s, which fails the caller's assertions); the text read.
async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_head_is_dropped_and_a_trickled_body_gets_408() {
    let h = Harness::new(10 * GB, 4);
    let (addr, _stop) = start(h.state.clone().with_limits(limits())).await;
    // Half a request head, then nothing: the connection is closed without a reply.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let t = std::time::Instant::now();
    let text = read_all(&mut s).await;
    assert!(t.elapsed() < Duration::from_secs(9), "closed by the header timeout, not ours");
    assert!(!text.contains(" 200 "), "{text}");
    // A connection that sends nothing, and one idle after a request, are closed the same way.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let t = std::time::Instant::now();
    assert_eq!(read_all(&mut s).await, "");
    assert!(t.elapsed() < Duration::from_secs(9));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let t = std::time::Instant::now();
    let text = read_all(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200") && t.elapsed() < Duration::from_secs(9), "{text}");
    // A body promised at 100 bytes that sends 10: 408 request_timeout, well-formed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":").await.unwrap();
    let text = read_all(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["code"], "request_timeout");
    // The server still serves.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    assert!(read_all(&mut s).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reader_that_stops_reading_is_cut_off_and_releases_the_model() {
    // A generation far longer than the socket buffers hold.
    // One byte of KV cache per token, so the long request fits the ledger.
    let fake = FakeBackend::new().with_natural_tokens(300_000).with_kv_per_token(1);
    let mut spec = modelpool::ModelSpec::new("chat-a").with_size(2 * GB);
    spec.kv_bytes_per_token = Some(1);
    let h = Harness::with_backend(10 * GB, 4, fake, vec![spec]);
    let state = h.state.clone().with_limits(ServerLimitsConfig { context_tokens: 300_000, ..limits() });
    let (addr, _stop) = start(state).await;
    let body = serde_json::json!({
        "model": "chat-a", "stream": true, "max_tokens": 300_000,
        "messages": [{"role": "user", "content": "hi"}],
    })
    .to_string();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(eventually(Duration::from_secs(5), || h.model("chat-a").leases == 1).await);
    // Stop reading (keep the socket open): the write timeout ends the response.
    assert!(
        eventually(Duration::from_secs(20), || h.model("chat-a").leases == 0).await,
        "the lease is released once writes stall"
    );
    h.check_invariants();
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_a_well_formed_503() {
    let h = Harness::new(10 * GB, 4);
    let lim = ServerLimitsConfig { header_read_timeout: Duration::from_secs(30), ..limits() };
    let (addr, _stop) = start(h.state.clone().with_limits(lim)).await;
    // Three idle keep-alive connections fill the cap (each has served a request).
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let text = read_all(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after: 1"), "{text}");
    let v: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "server_busy");
    assert_eq!(h.state.metrics.responses("server", 503), 1);
    // One closes: a new connection is served again.
    drop(held.pop());
    let ok = eventually_async(Duration::from_secs(5), || async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        read_all(&mut s).await.starts_with("HTTP/1.1 200")
    })
    .await;
    assert!(ok);
}

async fn eventually_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn max_tokens_above_the_context_is_a_clear_400() {
    let h = Harness::new(10 * GB, 4).with_state(|s| {
        s.with_limits(ServerLimitsConfig { context_tokens: 4096, ..ServerLimitsConfig::default() })
            .with_contexts([("chat-b".to_string(), 100)])
    });
    let mut body = chat_body("chat-a", false);
    body["max_tokens"] = 5000.into();
    let e = assert_bad_request(&h.post("/v1/chat/completions", body.clone()).await, "max_tokens");
    assert!(e["message"].as_str().unwrap().contains("context of 4096 tokens"), "{e}");
    body["max_tokens"] = 4096.into();
    assert_eq!(h.post("/v1/chat/completions", body).await.status(), 200);
    let mut body = chat_body("chat-b", false);
    body["max_completion_tokens"] = 101.into();
    let e = assert_bad_request(&h.post("/v1/chat/completions", body).await, "max_completion_tokens");
    assert!(e["message"].as_str().unwrap().contains("context of 100 tokens"), "{e}");
    // No max_tokens: the default (512) is capped at the context, not refused.
    assert_eq!(h.post("/v1/chat/completions", chat_body("chat-b", false)).await.status(), 200);
    let r = h
        .post("/v1/completions", serde_json::json!({"model": "chat-b", "prompt": "x", "max_tokens": 1000}))
        .await;
    assert_bad_request(&r, "max_tokens");
    assert_eq!(h.fake.load_count(), 2, "only the valid requests loaded anything");
}
