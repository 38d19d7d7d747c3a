//! Route tests through `warp::test` with the fake backend: every route, every error code, SSE
//! framing, `Retry-After`, the admin routes and the pool state after each.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use modelpool::backend::fake::FakeBackend;
use modelpool::backend::{Backend, BackendError, Embeddings, GenerateRequest, GenerateStream, ModelHandle};
use modelpool::{GB, ModelSpec, Phase};
use serde_json::{Value, json};

use super::*;

#[tokio::test]
async fn chat_completion_loads_model_and_answers_in_openai_shape() {
    let h = Harness::new(10 * GB, 4);
    assert_eq!(h.model("chat-a").phase, Phase::Absent);
    let r = h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    assert_eq!(r.status(), 200, "{:?}", r.body());
    let v = json(&r);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "chat-a");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    // The fake model emits 8 words unless limited.
    assert_eq!(content.split_whitespace().count(), 8, "{content}");
    assert_eq!(choice["finish_reason"], "stop");
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 8);
    assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + 8);
    // Pool state: resident, no lease left, one load, one hit-free request.
    let m = h.model("chat-a");
    assert_eq!(m.phase, Phase::Resident);
    assert_eq!(m.leases, 0);
    assert_eq!(h.pool.status().stats.loads, 1);
    assert_eq!(h.fake.load_count(), 1);

    // Same request again: a hit, same deterministic answer, no new load.
    let r2 = h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    assert_eq!(json(&r2)["choices"][0]["message"]["content"], content);
    assert_eq!(h.pool.status().stats.hits, 1);
    assert_eq!(h.fake.load_count(), 1);
    h.check_invariants();
}

#[tokio::test]
async fn max_tokens_limits_and_reports_length() {
    let h = Harness::new(10 * GB, 4);
    let mut b = chat_body("chat-a", false);
    b["max_tokens"] = json!(3);
    let v = json(&h.post("/v1/chat/completions", b).await);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let mut b = chat_body("chat-a", false);
    b["max_completion_tokens"] = json!(2);
    b["max_tokens"] = json!(5);
    let v = json(&h.post("/v1/chat/completions", b).await);
    assert_eq!(v["usage"]["completion_tokens"], 2, "max_completion_tokens wins");
}

/// Parse a chat SSE body; checks the framing and returns (chunks as JSON, content).
fn chat_stream(body: &[u8]) -> (Vec<Value>, String) {
    let data = sse_data(body);
    let done = data.iter().filter(|d| *d == "[DONE]").count();
    assert_eq!(done, 1, "exactly one [DONE]: {data:?}");
    assert_eq!(data.last().unwrap(), "[DONE]", "[DONE] is last");
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let id = chunks[0]["id"].clone();
    let mut content = String::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id, "one id per stream");
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            content.push_str(t);
        }
    }
    (chunks, content)
}

#[tokio::test]
async fn streaming_chat_has_role_chunk_content_chunks_finish_and_one_done() {
    let h = Harness::new(10 * GB, 4);
    let plain = json(&h.post("/v1/chat/completions", chat_body("chat-a", false)).await);
    let r = h.post("/v1/chat/completions", chat_body("chat-a", true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let (chunks, content) = chat_stream(r.body());
    // First: the role; then 8 content chunks; last: empty delta with finish_reason.
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks.len(), 1 + 8 + 1);
    for c in &chunks[..chunks.len() - 1] {
        assert!(c["choices"][0]["finish_reason"].is_null());
        assert!(c.get("usage").is_none(), "no usage key unless asked");
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(content, plain["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(h.model("chat-a").leases, 0, "lease released at stream end");
}

#[tokio::test(start_paused = true)]
async fn a_stream_quiet_for_15s_gets_keep_alive_comments_and_the_same_events() {
    // 20 s before each token (paused clock): the keep-alive fires first, every time.
    let fake = FakeBackend::new().with_token_delay(Duration::from_secs(20));
    let h = Harness::with_backend(10 * GB, 4, fake, catalogue());
    let mut b = chat_body("chat-a", true);
    b["max_tokens"] = json!(2);
    let r = h.post("/v1/chat/completions", b).await;
    assert_eq!(r.status(), 200);
    let text = std::str::from_utf8(r.body()).unwrap();
    assert_eq!(text.matches("\n\n:\n\n").count(), 2, "one keep-alive per quiet 20 s: {text:?}");
    let (chunks, content) = chat_stream(r.body());
    assert_eq!(chunks.len(), 4, "role, two pieces, finish: {chunks:?}");
    assert_eq!(content.split_whitespace().count(), 2, "{content}");
}

#[tokio::test]
async fn streaming_chat_with_include_usage_ends_with_usage_chunk() {
    let h = Harness::new(10 * GB, 4);
    let mut b = chat_body("chat-a", true);
    b["stream_options"] = json!({"include_usage": true});
    let r = h.post("/v1/chat/completions", b).await;
    let (chunks, _) = chat_stream(r.body());
    let (usage_chunk, rest) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 8);
    for c in rest {
        assert!(c["usage"].is_null() && c.get("usage").is_some(), "usage: null before the last: {c}");
    }
    assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "stop");

    // stream_options without stream is refused, naming the field.
    let mut b = chat_body("chat-a", false);
    b["stream_options"] = json!({"include_usage": true});
    assert_bad_request(&h.post("/v1/chat/completions", b).await, "stream_options");
}

#[tokio::test]
async fn completions_plain_batch_echo_and_stream() {
    let h = Harness::new(10 * GB, 4);
    let v = json(&h.post("/v1/completions", json!({"model": "chat-a", "prompt": "once upon"})).await);
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(text.split_whitespace().count(), 8);
    assert_eq!(v["usage"]["completion_tokens"], 8);

    // Two prompts: two choices, indexed, usage summed.
    let v = json(
        &h.post(
            "/v1/completions",
            json!({"model": "chat-a", "prompt": ["once upon", "a time"], "max_tokens": 4}),
        )
        .await,
    );
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 8);

    // echo prepends the prompt.
    let v = json(
        &h.post("/v1/completions", json!({"model": "chat-a", "prompt": "once upon", "echo": true})).await,
    );
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), format!("once upon{text}"));

    // Streaming: text chunks, a finish chunk, usage chunk, one [DONE]; same text.
    let r = h
        .post(
            "/v1/completions",
            json!({"model": "chat-a", "prompt": "once upon", "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let data = sse_data(r.body());
    assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(streamed, text);
    let n = chunks.len();
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"]["completion_tokens"], 8);

    // A batch cannot stream.
    let r = h.post("/v1/completions", json!({"model": "chat-a", "prompt": ["a", "b"], "stream": true})).await;
    assert_bad_request(&r, "prompt");
    // Completions need a text-gen model: vision is refused.
    let r = h.post("/v1/completions", json!({"model": "vis", "prompt": "x"})).await;
    assert_error(&r, 400, "wrong_model_type");
}

#[tokio::test]
async fn embeddings_string_list_and_base64() {
    let h = Harness::new(10 * GB, 4);
    let v = json(&h.post("/v1/embeddings", json!({"model": "embed", "input": "hello"})).await);
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "embed");
    let one: Vec<f32> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(one.len(), 384);
    let norm: f32 = one.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "unit vector, got norm {norm}");

    let v = json(&h.post("/v1/embeddings", json!({"model": "embed", "input": ["hello", "world"]})).await);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["object"], "embedding");
    let first: Vec<f32> = serde_json::from_value(data[0]["embedding"].clone()).unwrap();
    assert_eq!(first, one, "same text, same vector");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() >= 2);

    let v = json(
        &h.post("/v1/embeddings", json!({"model": "embed", "input": "hello", "encoding_format": "base64"}))
            .await,
    );
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(decoded, one);

    assert_bad_request(
        &h.post("/v1/embeddings", json!({"model": "embed", "input": [1, 2, 3]})).await,
        "input",
    );
    assert_bad_request(&h.post("/v1/embeddings", json!({"model": "embed", "input": []})).await, "input");
    assert_bad_request(
        &h.post("/v1/embeddings", json!({"model": "embed", "input": ["a", ""]})).await,
        "input[1]",
    );
    assert_bad_request(
        &h.post("/v1/embeddings", json!({"model": "embed", "input": "a", "encoding_format": "hex"})).await,
        "encoding_format",
    );
    assert_bad_request(
        &h.post("/v1/embeddings", json!({"model": "embed", "input": "a", "dimensions": 12})).await,
        "dimensions",
    );
    // A chat model cannot embed; nothing is loaded for the refused request.
    let r = h.post("/v1/embeddings", json!({"model": "chat-a", "input": "x"})).await;
    let e = assert_error(&r, 400, "wrong_model_type");
    assert_eq!(e["param"], "model");
    assert_eq!(h.model("chat-a").phase, Phase::Absent);
}

#[tokio::test]
async fn models_list_and_get() {
    let h = Harness::new(10 * GB, 4);
    let v = json(&h.req("GET", "/v1/models").await);
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), catalogue().len());
    assert!(ids.contains(&"embed"));
    let m = &v["data"][0];
    assert_eq!(m["object"], "model");
    assert_eq!(m["owned_by"], "modelpool");
    assert_eq!(m["state"], "absent");

    h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    let v = json(&h.req("GET", "/v1/models/chat-a").await);
    assert_eq!(v["id"], "chat-a");
    assert_eq!(v["state"], "resident");
    assert_eq!(v["model_type"], "text-gen");
    // Ids with slashes work, raw or percent-encoded.
    let v = json(&h.req("GET", "/v1/models/mlx-community/Llama-3.2-3B-Instruct-4bit").await);
    assert_eq!(v["id"], "mlx-community/Llama-3.2-3B-Instruct-4bit");
    let v = json(&h.req("GET", "/v1/models/mlx-community%2FLlama-3.2-3B-Instruct-4bit").await);
    assert_eq!(v["id"], "mlx-community/Llama-3.2-3B-Instruct-4bit");
    assert_error(&h.req("GET", "/v1/models/nope").await, 404, "model_not_found");
}

#[tokio::test]
async fn unknown_model_is_404_model_not_found() {
    let h = Harness::new(10 * GB, 4);
    for (path, body) in [
        ("/v1/chat/completions", chat_body("nope", false)),
        ("/v1/chat/completions", chat_body("nope", true)),
        ("/v1/completions", json!({"model": "nope", "prompt": "x"})),
        ("/v1/embeddings", json!({"model": "nope", "input": "x"})),
    ] {
        let e = assert_error(&h.post(path, body).await, 404, "model_not_found");
        assert_eq!(e["param"], "model");
        assert!(e["message"].as_str().unwrap().contains("nope"));
    }
    assert_eq!(h.pool.status().stats.loads, 0);
}

#[tokio::test]
async fn wrong_model_type_is_400_and_loads_nothing() {
    let h = Harness::new(10 * GB, 4);
    let e = assert_error(
        &h.post("/v1/chat/completions", chat_body("embed", false)).await,
        400,
        "wrong_model_type",
    );
    assert!(e["message"].as_str().unwrap().contains("embeddings"), "{e}");
    assert_eq!(h.model("embed").phase, Phase::Absent);
    // A vision model serves chat.
    let r = h.post("/v1/chat/completions", chat_body("vis", false)).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn malformed_json_and_bad_fields_name_the_field() {
    let h = Harness::new(10 * GB, 4);
    let e = assert_bad_request(&h.post_raw("/v1/chat/completions", b"{not json").await, "body");
    assert!(e["message"].as_str().unwrap().contains("malformed JSON"), "{e}");
    assert_bad_request(&h.post_raw("/v1/chat/completions", b"").await, "body");
    let e = assert_bad_request(&h.post("/v1/chat/completions", json!({"model": "chat-a"})).await, "messages");
    assert!(e["message"].as_str().unwrap().contains("messages"), "{e}");
    assert_bad_request(&h.post("/v1/chat/completions", json!({"messages": []})).await, "model");
    let cases = [
        (json!({"max_tokens": "many"}), "max_tokens"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"temperature": 5}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"n": 2}), "n"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"tools": [{"type": "function"}]}), "tools"),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"response_format": {"type": "json_object"}}), "response_format"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}), "messages[0].role"),
        (json!({"messages": [{"role": "user", "content": 7}]}), "messages[0].content"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages[0].content[0].image_url",
        ),
    ];
    for (patch, param) in cases {
        let mut b = chat_body("chat-a", false);
        for (k, v) in patch.as_object().unwrap() {
            b[k] = v.clone();
        }
        assert_bad_request(&h.post("/v1/chat/completions", b).await, param);
    }
    // Text content parts are joined and accepted.
    let mut b = chat_body("chat-a", false);
    b["messages"] =
        json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
    assert_eq!(h.post("/v1/chat/completions", b).await.status(), 200);
    assert_bad_request(
        &h.post("/v1/completions", json!({"model": "chat-a", "prompt": "x", "suffix": "y"})).await,
        "suffix",
    );
    // Nothing was loaded for a refused request except the one that passed.
    assert_eq!(h.pool.status().stats.loads, 1);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let h = Harness::new(10 * GB, 4); // 64 KiB cap
    let mut b = chat_body("chat-a", false);
    b["messages"][0]["content"] = json!("x".repeat(100_000));
    let e = assert_error(&h.post("/v1/chat/completions", b).await, 413, "payload_too_large");
    assert!(e["message"].as_str().unwrap().contains("65536"));
    assert_eq!(h.pool.status().stats.loads, 0);
}

#[tokio::test]
async fn insufficient_memory_is_503_with_retry_after_and_evicts_nothing() {
    // 6 GB: chat-big (5 GB) busy, chat-a (2 GB) cannot fit until it is released.
    let h = Harness::new(6 * GB, 4);
    let lease = h.pool.acquire("chat-big").await.unwrap();
    let r = h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    let e = assert_error(&r, 503, "insufficient_memory");
    // The classic text, with the request's KV cache (its context at the rule's rate) beside the weights.
    let msg = e["message"].as_str().unwrap();
    assert!(msg.starts_with("Insufficient memory: need 2.0GB (2.0GB of weights + "), "{msg}");
    assert!(
        msg.ends_with("MB of KV cache for this request's context), only 1.0GB available after eviction"),
        "{msg}"
    );
    assert!(retry_after(&r).is_some_and(|s| s >= 1), "Retry-After present");
    // Nothing was evicted for the refused request.
    assert_eq!(h.model("chat-big").phase, Phase::Resident);
    assert_eq!(h.model("chat-a").phase, Phase::Absent);
    assert_eq!(h.pool.status().stats.total_evictions(), 0);
    // Streaming requests get the same error as a plain reply (nothing was streamed yet).
    let r = h.post("/v1/chat/completions", chat_body("chat-a", true)).await;
    assert_error(&r, 503, "insufficient_memory");
    drop(lease);
    // Once released, chat-big is evicted for chat-a.
    let r = h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.model("chat-big").phase, Phase::Absent);
    h.check_invariants();
}

#[tokio::test]
async fn model_too_large_is_503_without_retry_after() {
    let h = Harness::new(10 * GB, 4);
    let r = h.post("/v1/chat/completions", chat_body("huge", false)).await;
    let e = assert_error(&r, 503, "model_too_large");
    assert!(e["message"].as_str().unwrap().contains("50.0GB"), "{e}");
    assert_eq!(retry_after(&r), None, "waiting cannot help");
}

#[tokio::test]
async fn max_models_reached_is_503_with_retry_after() {
    let h = Harness::new(10 * GB, 1);
    let lease = h.pool.acquire("chat-a").await.unwrap();
    let r = h.post("/v1/chat/completions", chat_body("chat-b", false)).await;
    assert_error(&r, 503, "max_models_reached");
    assert!(retry_after(&r).is_some_and(|s| s >= 1));
    assert_eq!(h.model("chat-a").phase, Phase::Resident);
    drop(lease);
    assert_eq!(h.post("/v1/chat/completions", chat_body("chat-b", false)).await.status(), 200);
}

/// Issue 14.2: with every model slot held by a pinned model, no eviction can free one: the
/// refusal says so and carries no `Retry-After` (clients would retry forever).
#[tokio::test]
async fn max_models_reached_with_every_slot_pinned_has_no_retry_after() {
    let h = Harness::new(10 * GB, 1);
    assert_eq!(h.req("POST", "/admin/models/chat-a/preload").await.status(), 200);
    let r = h.post("/v1/chat/completions", chat_body("chat-b", false)).await;
    let e = assert_error(&r, 503, "max_models_reached");
    assert!(e["message"].as_str().unwrap().contains("pinned"), "{e}");
    assert_eq!(retry_after(&r), None, "waiting cannot help");
    assert_eq!(h.model("chat-a").phase, Phase::Resident);
}

/// Issue 14.4: OpenAI's `seed` is a signed 64-bit integer; `-1` is accepted and, like any
/// seed, gives the same answer every time.
#[tokio::test]
async fn negative_seed_is_accepted_and_deterministic() {
    let h = Harness::new(10 * GB, 4);
    let ask = |path: &str, seed: Value| {
        let mut b = if path.ends_with("chat/completions") {
            chat_body("chat-a", false)
        } else {
            json!({"model": "chat-a", "prompt": "hello"})
        };
        b["seed"] = seed;
        b["temperature"] = json!(1.0);
        b["max_tokens"] = json!(8);
        (path.to_string(), b)
    };
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let (p, body) = ask(path, json!(-1));
        let r1 = h.post(&p, body.clone()).await;
        assert_eq!(r1.status(), 200, "{path}: {}", String::from_utf8_lossy(r1.body()));
        let r2 = h.post(&p, body).await;
        let text = |r: &warp::http::Response<Bytes>| json(r)["choices"][0].clone();
        assert_eq!(text(&r1)["finish_reason"], text(&r2)["finish_reason"]);
        assert_eq!(json(&r1)["choices"], json(&r2)["choices"], "{path}: same seed, same answer");
        for seed in [json!(i64::MIN), json!(u64::MAX), json!(null)] {
            let (p, body) = ask(path, seed.clone());
            assert_eq!(h.post(&p, body).await.status(), 200, "{path}: seed {seed}");
        }
        for seed in [json!(1.5), json!("7")] {
            let (p, body) = ask(path, seed.clone());
            assert_bad_request(&h.post(&p, body).await, "seed");
        }
    }
}

/// Issue 8: with the admission queue, a request for a model that cannot load while another is
/// busy waits and is served; beyond `max_queue` it is a 503 `queue_full`, and one that waits the
/// whole timeout a 503 `queue_timeout`, both with `Retry-After`.
#[tokio::test(start_paused = true)]
async fn queued_requests_are_served_or_get_well_formed_queue_503s() {
    let h = Harness::queued(6 * GB, Duration::from_secs(10), 1, FakeBackend::new());
    let lease = h.pool.acquire("chat-big").await.unwrap(); // 5 GB busy: chat-a (2 GB) cannot load
    let waiting = {
        let routes = h.routes.clone();
        tokio::spawn(async move {
            warp::test::request()
                .method("POST")
                .path("/v1/chat/completions")
                .json(&chat_body("chat-a", false))
                .reply(&routes)
                .await
        })
    };
    assert!(eventually(Duration::from_secs(1), || h.pool.with_state(|s| s.queue_len()) == 1).await);
    let r = h.post("/v1/chat/completions", chat_body("chat-b", false)).await;
    let e = assert_error(&r, 503, "queue_full");
    assert!(e["message"].as_str().unwrap().contains("queue is full"), "{e}");
    assert!(retry_after(&r).is_some_and(|s| s >= 1));
    // The busy request ends: the waiting one is served.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(lease);
    let r = waiting.await.unwrap();
    assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(r.body()));
    let header = |r: &warp::http::Response<Bytes>, h: &str| r.headers()[h].to_str().unwrap().to_string();
    assert_eq!(header(&r, "x-modelpool-admission"), "queued");
    assert!(header(&r, "x-modelpool-wait-ms").parse::<u64>().unwrap() >= 2000, "it waited 2 s");
    // The model is resident now: a hit, no wait.
    let r = h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    assert_eq!(
        (header(&r, "x-modelpool-admission"), header(&r, "x-modelpool-wait-ms")),
        ("hit".into(), "0".into())
    );
    // Now one that waits the whole 10 s.
    let lease = h.pool.acquire("chat-big").await.unwrap();
    let r = h.post("/v1/chat/completions", chat_body("chat-b", false)).await;
    let e = assert_error(&r, 503, "queue_timeout");
    assert!(e["message"].as_str().unwrap().contains("waited 10.0s"), "{e}");
    assert!(retry_after(&r).is_some_and(|s| s >= 1));
    drop(lease);
    h.check_invariants();
    let text = String::from_utf8(h.req("GET", "/metrics").await.body().to_vec()).unwrap();
    for line in [
        "modelpool_queued_total 2",
        "modelpool_dequeued_total 1",
        "modelpool_queue_length 0",
        "modelpool_queue_peak_length 1",
        "modelpool_rejections_total{code=\"queue_full\"} 1",
        "modelpool_rejections_total{code=\"queue_timeout\"} 1",
        // The one admitted from the queue waited 2 s (le 2.5); nothing holds KV any more.
        "modelpool_queue_wait_seconds_bucket{le=\"1\"} 0",
        "modelpool_queue_wait_seconds_bucket{le=\"2.5\"} 1",
        "modelpool_queue_wait_seconds_count 1",
        "modelpool_kv_bytes 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
}

#[tokio::test]
async fn draining_model_is_503_with_retry_after() {
    let h = Harness::new(10 * GB, 4);
    let lease = h.pool.acquire("chat-a").await.unwrap();
    let r = h.req("POST", "/admin/models/chat-a/unload?force=true").await;
    assert_eq!(r.status(), 200);
    let v = json(&r);
    assert_eq!(v["report"]["unloaded_now"], false, "busy: drains instead");
    assert_eq!(h.model("chat-a").phase, Phase::Draining);
    let r = h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    assert_error(&r, 503, "model_draining");
    assert!(retry_after(&r).is_some_and(|s| s >= 1));
    drop(lease);
    assert!(eventually(Duration::from_secs(2), || h.model("chat-a").phase == Phase::Absent).await);
    assert_eq!(h.fake.unload_count(), 1);
}

#[tokio::test]
async fn load_failure_is_500_with_the_cause() {
    let h = Harness::new(10 * GB, 4);
    h.fake.fail_next_loads("chat-a", 1);
    let r = h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    let e = assert_error(&r, 500, "model_load_failed");
    assert!(e["message"].as_str().unwrap().contains("injected failure"), "{e}");
    assert_eq!(retry_after(&r), None);
    assert_eq!(h.model("chat-a").phase, Phase::Absent);
    assert_eq!(h.pool.ledger().reserved, 0, "reservation returned");
    // The next try loads.
    assert_eq!(h.post("/v1/chat/completions", chat_body("chat-a", false)).await.status(), 200);
}

#[tokio::test]
async fn shutting_down_is_503_with_retry_after_and_health_says_so() {
    let h = Harness::new(10 * GB, 4);
    assert_eq!(h.req("GET", "/health").await.status(), 200);
    h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    let live = h.pool.shutdown(Duration::from_millis(10)).await;
    assert_eq!(live, 0);
    let r = h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    assert_error(&r, 503, "shutting_down");
    assert!(retry_after(&r).is_some_and(|s| s >= 1));
    let r = h.req("GET", "/health").await;
    assert_error(&r, 503, "shutting_down");
    assert!(retry_after(&r).is_some());
    assert_error(&h.req("POST", "/admin/models/chat-b/preload").await, 503, "shutting_down");
    assert_eq!(h.model("chat-a").phase, Phase::Absent, "unloaded at shutdown");
}

#[tokio::test]
async fn health_metrics_and_routing_errors() {
    let h = Harness::new(6 * GB, 4);
    let v = json(&h.req("GET", "/health").await);
    assert_eq!(v["status"], "ok");
    h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    h.post("/v1/chat/completions", chat_body("huge", false)).await;
    let lease = h.pool.acquire("chat-big").await; // 2 + 5 > 6: evicts chat-a
    assert!(lease.is_ok());
    h.post("/v1/chat/completions", chat_body("chat-b", false)).await; // insufficient memory
    let r = h.req("GET", "/metrics").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = String::from_utf8(r.body().to_vec()).unwrap();
    let metric = |name: &str| metric_value(&text, name);
    assert_eq!(metric("modelpool_hits_total"), 1.0);
    assert_eq!(metric("modelpool_loads_total"), 2.0);
    assert_eq!(metric("modelpool_evictions_total{reason=\"capacity\"}"), 1.0);
    assert_eq!(metric("modelpool_rejections_total{code=\"model_too_large\"}"), 1.0);
    assert_eq!(metric("modelpool_rejections_total{code=\"insufficient_memory\"}"), 1.0);
    assert_eq!(metric("modelpool_load_seconds_count"), 2.0);
    assert_eq!(metric("modelpool_preloads_cancelled_total"), 0.0, "no predictive preload here");
    assert_eq!(metric("modelpool_resident_bytes"), (5 * GB) as f64);
    assert_eq!(metric("modelpool_reserved_bytes"), 0.0);
    assert_eq!(metric("modelpool_pinned_bytes"), 0.0);
    assert_eq!(metric("modelpool_memory_limit_bytes"), (6 * GB) as f64);
    assert_eq!(metric("modelpool_model_leases{model=\"chat-big\"}"), 1.0);
    assert_eq!(metric("modelpool_request_duration_seconds_count{route=\"chat_completions\"}"), 4.0);
    assert_eq!(metric("modelpool_http_responses_total{route=\"chat_completions\",status=\"200\"}"), 2.0);
    assert_eq!(metric("modelpool_http_responses_total{route=\"chat_completions\",status=\"503\"}"), 2.0);
    drop(lease);
    let v = json(&h.req("GET", "/admin/pool").await);
    assert_eq!(v["stats"]["rejections_by_code"]["insufficient_memory"], 1);
    assert_eq!(v["stats"]["rejections_by_code"]["model_too_large"], 1);
    assert_eq!(v["stats"]["evictions_by_reason"]["capacity"], 1);

    assert_error(&h.req("GET", "/nope").await, 404, "not_found");
    assert_error(&h.req("GET", "/v1/chat/completions").await, 405, "method_not_allowed");
    assert_error(&h.req("DELETE", "/v1/models").await, 405, "method_not_allowed");
}

/// A backend whose generations fail after two pieces: for the mid-stream error path.
struct BreaksMidStream {
    inner: FakeBackend,
}

struct BreakingHandle(Arc<dyn ModelHandle>);

#[async_trait]
impl ModelHandle for BreakingHandle {
    fn measured_bytes(&self) -> u64 {
        self.0.measured_bytes()
    }
    async fn generate(&self, req: GenerateRequest) -> Result<GenerateStream, BackendError> {
        let s = self.0.generate(req).await?;
        let broken = futures::StreamExt::take(s, 2)
            .chain(futures::stream::iter([Err(BackendError::Inference("device lost".into()))]));
        Ok(Box::pin(broken))
    }
    async fn embed(&self, inputs: Vec<String>) -> Result<Embeddings, BackendError> {
        self.0.embed(inputs).await
    }
    async fn unload(&self) -> Result<u64, BackendError> {
        self.0.unload().await
    }
}

use futures::StreamExt as _;

#[async_trait]
impl Backend for BreaksMidStream {
    fn name(&self) -> &'static str {
        "breaks"
    }
    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn ModelHandle>, BackendError> {
        Ok(Arc::new(BreakingHandle(self.inner.load(spec).await?)))
    }
}

#[tokio::test]
async fn error_after_stream_started_is_an_sse_error_event_then_the_end() {
    let fake = Arc::new(FakeBackend::new());
    let h = Harness::with_dyn_backend(
        10 * GB,
        4,
        Arc::new(BreaksMidStream { inner: FakeBackend::new() }),
        fake,
        catalogue(),
    );
    let r = h.post("/v1/chat/completions", chat_body("chat-a", true)).await;
    assert_eq!(r.status(), 200, "headers were sent before the failure");
    let data = sse_data(r.body());
    assert!(!data.iter().any(|d| d == "[DONE]"), "no [DONE] after an error: {data:?}");
    // role chunk, two pieces, then the error.
    assert_eq!(data.len(), 4, "{data:?}");
    let err: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "inference_failed");
    assert!(err["error"]["message"].as_str().unwrap().contains("device lost"));
    assert_eq!(h.model("chat-a").leases, 0, "lease released");
    // The same failure without streaming is a 500 reply.
    let r = h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    assert_error(&r, 500, "inference_failed");
    // And the metrics count the streamed failure as a 500.
    assert_eq!(h.state.metrics.responses("chat_completions", 500), 2);
}

/// Issue 8: a streaming request that waits for its model gets its headers at once
/// (`x-modelpool-admission: waiting`), an SSE comment every notice period while it waits, then
/// the chunks; a timeout after the headers is the stream's error event, without `[DONE]`.
#[tokio::test(start_paused = true)]
async fn a_waiting_stream_sends_comments_then_its_chunks_or_its_error() {
    let h = Harness::queued(6 * GB, Duration::from_secs(30), 4, FakeBackend::new());
    let lease = h.pool.acquire("chat-big").await.unwrap(); // chat-a must wait for it
    let spawn_stream = |model: &'static str| {
        let routes = h.routes.clone();
        tokio::spawn(async move {
            warp::test::request()
                .method("POST")
                .path("/v1/chat/completions")
                .json(&chat_body(model, true))
                .reply(&routes)
                .await
        })
    };
    let waiting = spawn_stream("chat-a");
    assert!(eventually(Duration::from_secs(1), || h.pool.with_state(|s| s.queue_len()) == 1).await);
    tokio::time::sleep(Duration::from_secs(12)).await;
    drop(lease);
    let r = waiting.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-modelpool-admission"], "waiting");
    let body = String::from_utf8(r.body().to_vec()).unwrap();
    let comments: Vec<&str> = body.lines().filter(|l| l.starts_with(':')).collect();
    // Headers after 5 s, then one comment per 5 s until admitted at 12 s.
    assert_eq!(comments[..2], [":waiting for the model (5 s)", ":waiting for the model (10 s)"], "{body}");
    assert!(comments[2].starts_with(":admitted: queued, waited 120"), "{body}");
    let data = sse_data(r.body());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    assert!(data.len() > 2, "the chunks follow: {body}");
    // One that waits past the queue timeout: the 503 arrives in the stream, with no [DONE].
    let lease = h.pool.acquire("chat-big").await.unwrap();
    let waiting = spawn_stream("chat-b");
    assert!(eventually(Duration::from_secs(1), || h.pool.with_state(|s| s.queue_len()) == 1).await);
    tokio::time::sleep(Duration::from_secs(31)).await;
    let r = waiting.await.unwrap();
    assert_eq!(r.status(), 200);
    let data = sse_data(r.body());
    let err: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "queue_timeout", "{data:?}");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    drop(lease);
    h.check_invariants();
    let text = String::from_utf8(h.req("GET", "/metrics").await.body().to_vec()).unwrap();
    assert!(text.lines().any(|l| l == "modelpool_rejections_total{code=\"queue_timeout\"} 1"), "{text}");
    assert!(text.lines().any(|l| l == "modelpool_queue_wait_seconds_count 1"), "{text}");
}

/// Node semantics for routers (issue 18): a refusal that can never succeed here says so
/// (`x-should-retry: false`, no `Retry-After`), a curable one keeps its hint (and becomes a 429
/// with `--busy-status 429`), and every response names the node.
#[tokio::test]
async fn refusals_say_whether_a_retry_can_succeed_and_every_reply_names_its_node() {
    let h = Harness::new(6 * GB, 1).with_state(|s| s.with_node_id("node-7"));
    let should_retry = |r: &warp::http::Response<Bytes>| {
        r.headers().get("x-should-retry").map(|v| v.to_str().unwrap().to_string())
    };
    let node =
        |r: &warp::http::Response<Bytes>| r.headers()["x-modelpool-node"].to_str().unwrap().to_string();
    // model_too_large: never.
    let r = h.post("/v1/chat/completions", chat_body("huge", false)).await;
    assert_error(&r, 503, "model_too_large");
    assert_eq!((should_retry(&r).as_deref(), retry_after(&r)), (Some("false"), None));
    assert_eq!(node(&r), "node-7");
    // max_models_reached behind a busy model: waiting cures it.
    let lease = h.pool.acquire("chat-a").await.unwrap();
    let r = h.post("/v1/chat/completions", chat_body("chat-b", false)).await;
    assert_error(&r, 503, "max_models_reached");
    assert!(retry_after(&r).is_some());
    assert_eq!(should_retry(&r), None);
    drop(lease);
    // The only slot held by a pinned model: never.
    let r = h.req("POST", "/admin/models/chat-a/preload").await;
    assert_eq!(r.status(), 200);
    assert_eq!(node(&r), "node-7", "admin replies too");
    let r = h.post("/v1/chat/completions", chat_body("chat-b", false)).await;
    assert_error(&r, 503, "max_models_reached");
    assert_eq!((should_retry(&r).as_deref(), retry_after(&r)), (Some("false"), None));
    // Success, 404 and /health name the node as well.
    let r = h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    assert_eq!((r.status().as_u16(), node(&r)), (200, "node-7".to_string()));
    assert_eq!(node(&h.req("GET", "/nope").await), "node-7");
    assert_eq!(node(&h.req("GET", "/health").await), "node-7");

    // --busy-status 429: curable refusals are 429 with their hint; the others stay 503.
    let h =
        Harness::new(6 * GB, 4).with_state(|s| s.with_busy_status(warp::http::StatusCode::TOO_MANY_REQUESTS));
    let lease = h.pool.acquire("chat-big").await.unwrap();
    let r = h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    assert_error(&r, 429, "insufficient_memory");
    assert!(retry_after(&r).is_some());
    let r = h.post("/v1/chat/completions", chat_body("huge", false)).await;
    assert_error(&r, 503, "model_too_large");
    drop(lease);
    assert!(!modelpool::http::default_node_id().is_empty());
}

/// The endpoint picker's model-server protocol in `/metrics` (issue 18): waiting and running
/// requests, memory that cannot be freed now, resident and loading models as adapter labels.
#[tokio::test]
async fn metrics_speak_the_endpoint_pickers_protocol() {
    let h = Harness::with_backend(
        10 * GB,
        3,
        FakeBackend::new().with_load_time(Duration::from_secs(3600)),
        catalogue(),
    );
    let scrape = |h: &Harness| {
        let h = h.routes.clone();
        async move {
            let r = warp::test::request().method("GET").path("/metrics").reply(&h).await;
            String::from_utf8(r.body().to_vec()).unwrap()
        }
    };
    let value = metric_value;
    let t = scrape(&h).await;
    assert_eq!(value(&t, "modelpool_num_requests_waiting"), 0.0);
    assert_eq!(value(&t, "modelpool_num_requests_running"), 0.0);
    assert_eq!(value(&t, "modelpool_memory_usage_perc"), 0.0);
    assert!(
        t.contains(
            "modelpool_models_info{running_lora_adapters=\"\",waiting_lora_adapters=\"\",max_lora=\"3\"}"
        ),
        "{t}"
    );

    // chat-a resident and pinned (2 GB), chat-b resident and busy (2 GB), chat-big idle would
    // be freeable; a load of vis (1 GB) in progress with two requests waiting for it.
    h.fake.configure(
        "chat-a",
        modelpool::backend::fake::FakeModelConfig { load_time: Some(Duration::ZERO), ..Default::default() },
    );
    h.fake.configure(
        "chat-b",
        modelpool::backend::fake::FakeModelConfig { load_time: Some(Duration::ZERO), ..Default::default() },
    );
    assert_eq!(h.req("POST", "/admin/models/chat-a/preload").await.status(), 200);
    let lease = h.pool.acquire("chat-b").await.unwrap();
    let p1 = h.pool.clone();
    let p2 = h.pool.clone();
    let w1 = tokio::spawn(async move { p1.acquire("vis").await.map(|_| ()) });
    let w2 = tokio::spawn(async move { p2.acquire("vis").await.map(|_| ()) });
    while h.model("vis").waiters < 2 {
        tokio::task::yield_now().await;
    }
    let t = scrape(&h).await;
    assert_eq!(value(&t, "modelpool_num_requests_waiting"), 2.0);
    assert_eq!(value(&t, "modelpool_num_requests_running"), 1.0);
    let fixed = (2 * GB + 2 * GB + GB) as f64 + h.pool.ledger().kv as f64;
    assert!((value(&t, "modelpool_memory_usage_perc") - fixed / (10 * GB) as f64).abs() < 1e-9, "{t}");
    let info = t.lines().find(|l| l.starts_with("modelpool_models_info{")).unwrap();
    assert!(info.starts_with("modelpool_models_info{running_lora_adapters=\"chat-a,chat-b\",waiting_lora_adapters=\"vis\",max_lora=\"3\"} "), "{info}");
    assert!(value(&t, "modelpool_models_info") > 1.7e9, "a Unix timestamp");
    drop(lease);
    w1.abort();
    w2.abort();
}

/// The value of the first sample of `name` in Prometheus text (`name` may carry its labels; a
/// bare name also matches a labelled sample).
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && matches!(l[name.len()..].chars().next(), Some(' ' | '{')))
        .unwrap_or_else(|| panic!("metric {name} missing in\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
