//! `POST /v1/chat/completions`: a chat turn, as one JSON reply or an SSE stream of
//! `chat.completion.chunk`s.

use std::collections::VecDeque;

use bytes::Bytes;
use warp::reply::Response;
use warp::sse::Event;

use super::{acquire, collect, context_tokens, new_id, ready_future, stream_when_ready, unix_now};
use crate::backend::{ChatMessage, ContentPiece, FinishReason, GenerateRequest, Prompt, Usage};
use crate::http::api::*;
use crate::http::app::AppState;
use crate::http::error::ApiError;
use crate::http::images::{self, ImageRef};
use crate::http::reply::ok_json;
use crate::http::stream::{ChunkFormat, json_event};
use crate::http::timer::{ReqTimer, respond};
use crate::http::validate::{Generation, check_generation, check_max_tokens, check_stop, parse_body};
use crate::types::ModelType;

/// Tokens generated when a chat request sets neither `max_completion_tokens` nor `max_tokens`.
pub const DEFAULT_CHAT_MAX_TOKENS: u32 = 512;

/// One message as validated, its images not yet read: the text parts joined by newlines, and
/// the parts in order when it has an image (an image is an index into the request's
/// [`ImageRef`]s).
struct Draft {
    role: String,
    content: String,
    parts: Vec<Result<String, usize>>,
    has_image: bool,
}

/// The backend's conversation from the request's messages, images not yet read: roles checked
/// (`developer` becomes `system`), text parts joined by newlines, image parts' URLs collected in
/// order (`image_url` is `{"url": ..., "detail": ...}`, `detail` ignored, or the URL as a
/// string); other part types are refused.
fn chat_prompt(messages: Vec<ChatMessageIn>) -> Result<(Vec<Draft>, Vec<ImageRef>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages", "messages must contain at least one message"));
    }
    let mut out = Vec::with_capacity(messages.len());
    let mut images = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(ApiError::bad_request(
                format!("messages[{i}].role"),
                format!("unknown role '{}': expected system, developer, user, assistant or tool", m.role),
            ));
        }
        let mut parts = Vec::new();
        let mut has_image = false;
        let content = match m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t,
            Some(MessageContent::Parts(ps)) => {
                let mut texts = Vec::with_capacity(ps.len());
                for (j, p) in ps.into_iter().enumerate() {
                    match p {
                        ContentPart::Text { text } => {
                            texts.push(text.clone());
                            parts.push(Ok(text));
                        }
                        ContentPart::ImageUrl { image_url } => {
                            let param = format!("messages[{i}].content[{j}].image_url");
                            let url = match &image_url {
                                serde_json::Value::String(u) => Some(u.clone()),
                                v => v.get("url").and_then(|u| u.as_str()).map(str::to_string),
                            };
                            let Some(url) = url else {
                                return Err(ApiError::bad_request(
                                    param,
                                    "image_url must be an object with a string url ({\"url\": \"data:image/png;base64,...\"})",
                                ));
                            };
                            has_image = true;
                            parts.push(Err(images.len()));
                            images.push(ImageRef { param, url });
                        }
                        ContentPart::Unsupported => {
                            return Err(ApiError::bad_request(
                                format!("messages[{i}].content[{j}].type"),
                                "unsupported content part type: only text and image_url are accepted",
                            ));
                        }
                    }
                }
                texts.join("\n")
            }
        };
        let role = if m.role == "developer" { "system".to_string() } else { m.role };
        out.push(Draft { role, content, parts, has_image });
    }
    Ok((out, images))
}

/// Prompt tokens reserved per image, before the backend counts them, for a vision model whose
/// catalog entry gives no bound ([`crate::types::ModelSpec::image_tokens`]): 1536, above the
/// Idefics3 bound of SmolVLM-Instruct's default processor (17 tiles x (81 + 3) + 4 = 1432) and
/// SmolVLM-256M's (1143).
pub const DEFAULT_IMAGE_TOKENS: u32 = 1536;

/// Read the request's images (see [`crate::http::images`]) before the pool is asked for the
/// model: refused unless `model` is a registered vision model and there are at most
/// `--max-images`; then fetched or decoded, all at once. The messages come back with their
/// images in place, and the prompt tokens the images may become (each image its model's
/// bound, else [`DEFAULT_IMAGE_TOKENS`]) for the request's KV reservation.
async fn with_images(
    state: &AppState,
    model: &str,
    drafts: Vec<Draft>,
    refs: Vec<ImageRef>,
) -> Result<(Vec<ChatMessage>, u64), ApiError> {
    let mut decoded = Vec::new();
    let mut image_tokens = 0;
    if let Some(first) = refs.first() {
        let spec = state.pool.spec(model)?;
        if spec.model_type != ModelType::Vision {
            return Err(ApiError::bad_request(
                &first.param,
                format!(
                    "model '{model}' is not a vision model (its type is {}): it takes no images",
                    spec.model_type
                ),
            ));
        }
        let cfg = &state.images;
        if let Some(extra) = refs.get(cfg.max_images) {
            return Err(ApiError::bad_request(
                &extra.param,
                format!("the request has {} images, more than --max-images {}", refs.len(), cfg.max_images),
            ));
        }
        decoded = images::load_all(cfg, &state.image_memory, &refs).await?;
        image_tokens = refs.len() as u64 * u64::from(spec.image_tokens.unwrap_or(DEFAULT_IMAGE_TOKENS));
    }
    let messages = drafts
        .into_iter()
        .map(|d| {
            let pieces = if d.has_image {
                d.parts
                    .into_iter()
                    .map(|p| match p {
                        Ok(t) => ContentPiece::Text(t),
                        Err(k) => ContentPiece::Image(decoded[k].clone()),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            ChatMessage { role: d.role, content: d.content, pieces }
        })
        .collect();
    Ok((messages, image_tokens))
}

/// The chunks of one streamed chat completion: a role chunk, one chunk per text piece, a
/// finish chunk, and a usage chunk when asked for.
struct ChatFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl ChatFormat {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Option<UsageOut>>) -> Event {
        json_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn choice_chunk(&self, delta: ChatDelta, finish: Option<&'static str>) -> Event {
        let choice = ChatChunkChoice { index: 0, delta, finish_reason: finish, logprobs: None };
        self.chunk(vec![choice], self.include_usage.then_some(None))
    }
}

impl ChunkFormat for ChatFormat {
    fn start(&mut self, out: &mut VecDeque<Event>) {
        out.push_back(
            self.choice_chunk(ChatDelta { role: Some("assistant"), content: Some(String::new()) }, None),
        );
    }
    fn delta(&mut self, text: String) -> Event {
        self.choice_chunk(ChatDelta { role: None, content: Some(text) }, None)
    }
    fn finish(&mut self, reason: FinishReason, usage: Usage, out: &mut VecDeque<Event>) {
        out.push_back(self.choice_chunk(ChatDelta::default(), Some(finish_str(reason))));
        if self.include_usage {
            out.push_back(self.chunk(Vec::new(), Some(Some(usage.into()))));
        }
    }
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(state: AppState, body: Result<Bytes, ApiError>) -> Response {
    let mut timer = ReqTimer::start(&state, "chat_completions");
    let res = chat_inner(&state, body, &mut timer).await;
    respond(timer, res)
}

async fn chat_inner(
    state: &AppState,
    body: Result<Bytes, ApiError>,
    timer: &mut ReqTimer,
) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse_body(&body?)?;
    timer.set_model(&req.model);
    let Generation { temperature, top_p, stream, include_usage } =
        check_generation(req.temperature, req.top_p, req.n, req.stream, &req.stream_options)?;
    timer.set_stream(stream);
    let context = state.context_of(&req.model);
    let max_tokens = match req.max_completion_tokens {
        Some(_) => check_max_tokens(
            "max_completion_tokens",
            req.max_completion_tokens,
            DEFAULT_CHAT_MAX_TOKENS,
            context,
        )?,
        None => check_max_tokens("max_tokens", req.max_tokens, DEFAULT_CHAT_MAX_TOKENS, context)?,
    };
    let stop = check_stop(req.stop)?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::bad_request("tools", "tool calling is not supported"));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::bad_request("logprobs", "logprobs are not supported"));
    }
    if let Some(rf) = &req.response_format
        && rf.get("type").and_then(|t| t.as_str()) != Some("text")
    {
        return Err(ApiError::bad_request(
            "response_format",
            "only response_format {\"type\": \"text\"} is supported",
        ));
    }
    let (drafts, refs) = chat_prompt(req.messages)?;
    let (messages, image_tokens) = with_images(state, &req.model, drafts, refs).await?;
    let prompt_bytes = messages.iter().map(|m| m.content.len()).sum();
    let tokens = context_tokens(prompt_bytes, messages.len(), max_tokens) + image_tokens;
    let greq = GenerateRequest {
        prompt: Prompt::Chat(messages),
        max_tokens,
        temperature,
        top_p,
        seed: req.seed,
        stop,
    };
    const TYPES: &[ModelType] = &[ModelType::TextGen, ModelType::Vision];
    let id = new_id("chatcmpl");
    let created = unix_now();
    if stream {
        let fmt = ChatFormat { id, created, model: req.model.clone(), include_usage };
        let ready = ready_future(state, req.model, TYPES, tokens, greq);
        return stream_when_ready(state, timer, fmt, ready).await;
    }
    let lease = acquire(state, &req.model, TYPES, tokens, timer).await?;
    let generation = lease.handle().generate(greq).await?;
    let model = lease.model().to_string();
    let (content, finish, usage) = collect(generation).await?;
    drop(lease);
    ok_json(&ChatCompletionResponse {
        id,
        object: "chat.completion",
        created,
        model,
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage { role: "assistant", content },
            finish_reason: finish_str(finish),
            logprobs: None,
        }],
        usage: usage.into(),
    })
}
