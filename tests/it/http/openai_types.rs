//! Our responses parse as `async-openai`'s response types: what a real OpenAI client expects.

use async_openai::types::chat::{CreateChatCompletionResponse, CreateChatCompletionStreamResponse};
use async_openai::types::completions::CreateCompletionResponse;
use async_openai::types::embeddings::{CreateBase64EmbeddingResponse, CreateEmbeddingResponse};
use async_openai::types::models::{ListModelResponse, Model};
use modelpool::GB;
use serde_json::json;

use super::*;

#[tokio::test]
async fn chat_response_and_stream_chunks_parse_as_async_openai_types() {
    let h = Harness::new(10 * GB, 4);
    let r = h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    let c: CreateChatCompletionResponse = serde_json::from_slice(r.body()).expect("chat response");
    assert_eq!(c.object, "chat.completion");
    assert_eq!(c.choices.len(), 1);
    let text = c.choices[0].message.content.clone().expect("content");
    assert_eq!(text.split_whitespace().count(), 8);
    assert_eq!(c.usage.expect("usage").completion_tokens, 8);

    let mut b = chat_body("chat-a", true);
    b["stream_options"] = json!({"include_usage": true});
    let r = h.post("/v1/chat/completions", b).await;
    let data = sse_data(r.body());
    let mut streamed = String::new();
    let mut usage = None;
    let mut finish = None;
    for d in &data[..data.len() - 1] {
        let chunk: CreateChatCompletionStreamResponse =
            serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk {d}: {e}"));
        for ch in &chunk.choices {
            if let Some(t) = &ch.delta.content {
                streamed.push_str(t);
            }
            if ch.finish_reason.is_some() {
                finish = ch.finish_reason;
            }
        }
        if let Some(u) = chunk.usage {
            usage = Some(u);
        }
    }
    assert_eq!(streamed, text);
    assert!(finish.is_some());
    assert_eq!(usage.expect("usage chunk").completion_tokens, 8);
}

#[tokio::test]
async fn completion_embeddings_and_models_parse_as_async_openai_types() {
    let h = Harness::new(10 * GB, 4);
    let r = h.post("/v1/completions", json!({"model": "chat-a", "prompt": "hi", "max_tokens": 5})).await;
    let c: CreateCompletionResponse = serde_json::from_slice(r.body()).expect("completion");
    assert_eq!(c.choices[0].text.split_whitespace().count(), 5);

    let r = h.post("/v1/completions", json!({"model": "chat-a", "prompt": "hi", "stream": true})).await;
    let data = sse_data(r.body());
    for d in &data[..data.len() - 1] {
        let _: CreateCompletionResponse =
            serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk {d}: {e}"));
    }

    let r = h.post("/v1/embeddings", json!({"model": "embed", "input": ["a", "b"]})).await;
    let e: CreateEmbeddingResponse = serde_json::from_slice(r.body()).expect("embeddings");
    assert_eq!(e.data.len(), 2);
    assert_eq!(e.data[1].index, 1);
    assert_eq!(e.data[0].embedding.len(), 384);

    let r =
        h.post("/v1/embeddings", json!({"model": "embed", "input": "a", "encoding_format": "base64"})).await;
    let e: CreateBase64EmbeddingResponse = serde_json::from_slice(r.body()).expect("base64 embeddings");
    assert_eq!(e.data.len(), 1);

    let r = h.req("GET", "/v1/models").await;
    let l: ListModelResponse = serde_json::from_slice(r.body()).expect("model list");
    assert_eq!(l.data.len(), catalogue().len());
    let r = h.req("GET", "/v1/models/embed").await;
    let m: Model = serde_json::from_slice(r.body()).expect("model");
    assert_eq!(m.id, "embed");
}
