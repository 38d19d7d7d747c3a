//! Over a real socket: a client that disconnects mid-stream releases its lease at once; graceful
//! shutdown answers 503 while draining and lets in-flight streams finish; the binary serves and
//! exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use modelpool::backend::fake::FakeBackend;
use modelpool::{GB, Phase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

async fn start(h: &Harness) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<u32>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(modelpool::http::serve(
        listener,
        h.state.clone(),
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(5),
    ));
    (addr, tx, server)
}

fn request(method: &str, path: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// One request with `connection: close`; returns (status, whole response text).
async fn roundtrip(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request(method, path, body).as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_releases_the_lease() {
    // 8 tokens x 1 s: the generation would run 8 s if nobody noticed the client left.
    let fake = FakeBackend::new().with_token_delay(Duration::from_secs(1));
    let h = Harness::with_backend(10 * GB, 4, fake, catalogue());
    let (addr, stop, server) = start(&h).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = serde_json::to_string(&chat_body("chat-a", true)).unwrap();
    s.write_all(request("POST", "/v1/chat/completions", &body).as_bytes()).await.unwrap();
    // Read until the role chunk has arrived: the request holds its lease.
    let mut buf = vec![0u8; 4096];
    let mut got = String::new();
    while !got.contains("\"role\":\"assistant\"") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "server closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(h.model("chat-a").leases, 1);
    let t = Instant::now();
    drop(s);
    assert!(
        eventually(Duration::from_secs(4), || h.model("chat-a").leases == 0).await,
        "lease still held after the client left"
    );
    assert!(t.elapsed() < Duration::from_secs(4), "released before the generation would have ended");
    // The model is evictable again: an unforced unload succeeds.
    let (status, text) = roundtrip(addr, "POST", "/admin/models/chat-a/unload", "").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(h.model("chat-a").phase, Phase::Absent);
    assert_eq!(h.state.metrics.responses("chat_completions", 499), 1, "recorded as client-closed");
    let _ = stop.send(());
    assert_eq!(server.await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_flight_and_refuses_new_requests() {
    let fake = FakeBackend::new().with_token_delay(Duration::from_millis(100));
    let h = Harness::with_backend(10 * GB, 4, fake, catalogue());
    let (addr, stop, server) = start(&h).await;
    let body = serde_json::to_string(&chat_body("chat-a", true)).unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request("POST", "/v1/chat/completions", &body).as_bytes()).await.unwrap();
    let mut first = vec![0u8; 1024];
    let n = s.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    // In flight: begin shutdown.
    let _ = stop.send(());
    assert!(eventually(Duration::from_secs(2), || h.pool.is_shutting_down()).await);
    // New requests are refused with 503 + Retry-After while the stream drains.
    let (status, text) = roundtrip(
        addr,
        "POST",
        "/v1/chat/completions",
        &serde_json::to_string(&chat_body("chat-b", false)).unwrap(),
    )
    .await;
    assert_eq!(status, 503, "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after:"), "{text}");
    assert!(text.contains("shutting_down"));
    // The in-flight stream completes normally.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&first[..n]), String::from_utf8_lossy(&rest));
    assert_eq!(all.matches("data: [DONE]").count(), 1, "{all}");
    assert_eq!(server.await.unwrap(), 0, "nothing left in flight");
    assert_eq!(h.model("chat-a").phase, Phase::Absent, "unloaded at shutdown");
    assert_eq!(h.fake.unload_count(), 1);
}

#[test]
fn binary_serves_and_exits_cleanly_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelpool"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--fake-load-time",
            "0s",
            "--preload",
            "qwen2.5-0.5b-instruct",
        ])
        .env("MODELPOOL_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("modelpool listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .parse()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, text) = rt.block_on(roundtrip(addr, "GET", "/admin/pool", ""));
    assert_eq!(status, 200);
    assert!(text.contains("\"pinned\":true"), "preloaded model is pinned: {text}");
    let body = serde_json::to_string(&chat_body("qwen2.5-0.5b-instruct", false)).unwrap();
    let (status, _) = rt.block_on(roundtrip(addr, "POST", "/v1/chat/completions", &body));
    assert_eq!(status, 200);
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "exit status {st:?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn binary_idle_ttl_evicts_idle_unpinned_models() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelpool"))
        .args(["serve", "--listen", "127.0.0.1:0", "--fake-load-time", "0s", "--idle-ttl", "1s"])
        .args(["--preload", "nomic-embed-text-v1.5"])
        .env("MODELPOOL_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr: SocketAddr = line.trim().trim_start_matches("modelpool listening on http://").parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = serde_json::to_string(&chat_body("qwen2.5-0.5b-instruct", false)).unwrap();
    assert_eq!(rt.block_on(roundtrip(addr, "POST", "/v1/chat/completions", &body)).0, 200);
    let phase = |id: &str| -> String {
        let (_, text) = rt.block_on(roundtrip(addr, "GET", &format!("/admin/models/{id}"), ""));
        let json_start = text.find("\r\n\r\n").unwrap() + 4;
        let v: serde_json::Value = serde_json::from_str(&text[json_start..]).unwrap();
        v["phase"].as_str().unwrap().to_string()
    };
    assert_eq!(phase("qwen2.5-0.5b-instruct"), "resident");
    let t = Instant::now();
    while phase("qwen2.5-0.5b-instruct") != "absent" {
        assert!(t.elapsed() < Duration::from_secs(6), "idle model not evicted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(t.elapsed() >= Duration::from_millis(500), "not evicted before its TTL");
    assert_eq!(phase("nomic-embed-text-v1.5"), "resident", "pinned models do not expire");
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_are_read_and_capped_without_content_length() {
    let h = Harness::new(10 * GB, 4); // 64 KiB body cap
    let (addr, stop, server) = start(&h).await;
    let send_chunked = |body: String| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
        s.write_all(head.as_bytes()).await.unwrap();
        // The server may answer 413 and stop reading before the body ends: ignore write errors.
        for piece in body.as_bytes().chunks(1000) {
            let frame = [format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat();
            if s.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).to_string()
    };
    let ok = send_chunked(serde_json::to_string(&chat_body("chat-a", false)).unwrap()).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let mut big = chat_body("chat-a", false);
    big["messages"][0]["content"] = serde_json::json!("x".repeat(100_000));
    let r = send_chunked(serde_json::to_string(&big).unwrap()).await;
    assert!(r.starts_with("HTTP/1.1 413"), "{}", &r[..r.len().min(300)]);
    assert!(r.contains("payload_too_large"));
    let _ = stop.send(());
    server.await.unwrap();
}
