//! Request handlers. Each returns a complete reply: application errors are JSON bodies with
//! their status (never warp rejections), built by [`ApiError`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use warp::http::StatusCode;
use warp::reply::Response;

use super::AppState;
use super::api::*;
use super::error::ApiError;
use super::metrics::Metrics;
use super::stream::{ChunkFormat, frame, sse_response};
use crate::backend::{
    ChatMessage, FinishReason, GenerateEvent, GenerateRequest, GenerateStream, Prompt, Usage,
};
use crate::limit::MemoryLimit;
use crate::pool::Lease;
use crate::types::ModelType;

/// Tokens generated when a chat request sets no limit.
pub const DEFAULT_CHAT_MAX_TOKENS: u32 = 512;
/// Tokens generated when a completion request sets no limit (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;
/// Most inputs one embeddings request may carry (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// Times one request, and on finish records its latency and status and writes its log line.
/// Dropped unfinished (a client that went away mid-stream), it records status 499.
pub struct ReqTimer {
    metrics: Arc<Metrics>,
    route: &'static str,
    start: Instant,
    model: Option<String>,
    stream: bool,
    /// Time spent getting the model (0 for a hit, the load time for a cold start).
    acquire_micros: u64,
    finished: bool,
}

impl ReqTimer {
    pub(crate) fn start(state: &AppState, route: &'static str) -> Self {
        ReqTimer {
            metrics: state.metrics.clone(),
            route,
            start: Instant::now(),
            model: None,
            stream: false,
            acquire_micros: 0,
            finished: false,
        }
    }

    /// Record the outcome and log the request line.
    pub(crate) fn finish(mut self, status: u16, code: Option<&'static str>) {
        self.finished = true;
        self.record(status, code);
    }

    fn record(&self, status: u16, code: Option<&'static str>) {
        let elapsed = self.start.elapsed();
        self.metrics.record(self.route, status, elapsed);
        let model = self.model.as_deref().unwrap_or("-");
        let micros = elapsed.as_micros() as u64;
        if status == 499 {
            tracing::info!(
                route = self.route,
                model,
                status,
                micros,
                acquire_micros = self.acquire_micros,
                stream = self.stream,
                "request ended: client disconnected"
            );
        } else if status >= 500 {
            tracing::warn!(
                route = self.route,
                model,
                status,
                code = code.unwrap_or("-"),
                micros,
                acquire_micros = self.acquire_micros,
                stream = self.stream,
                "request"
            );
        } else {
            tracing::info!(
                route = self.route,
                model,
                status,
                code = code.unwrap_or("-"),
                micros,
                acquire_micros = self.acquire_micros,
                stream = self.stream,
                "request"
            );
        }
    }
}

impl Drop for ReqTimer {
    fn drop(&mut self) {
        if !self.finished {
            self.record(499, None);
        }
    }
}

/// Finish `timer` (if the handler did not hand it to a stream) and build the reply.
fn respond(timer: Option<ReqTimer>, res: Result<Response, ApiError>) -> Response {
    let (resp, code) = match res {
        Ok(r) => (r, None),
        Err(e) => {
            let code = e.code;
            (e.into_response(), code)
        }
    };
    if let Some(t) = timer {
        t.finish(resp.status().as_u16(), code);
    }
    resp
}

fn json_response<T: Serialize>(v: &T, status: StatusCode) -> Response {
    let mut r = Response::new(serde_json::to_vec(v).unwrap_or_default().into());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(warp::http::header::CONTENT_TYPE, warp::http::HeaderValue::from_static("application/json"));
    r
}

fn ok_json<T: Serialize>(v: &T) -> Result<Response, ApiError> {
    Ok(json_response(v, StatusCode::OK))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn new_id(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let salt = unix_now().wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{prefix}-{:016x}", salt ^ n)
}

/// Parse a JSON body; a failure is a 400 naming the field at fault.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("body", "the request body is empty; send a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        let syntax = matches!(
            inner.classify(),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof
        );
        let param = if syntax {
            None
        } else if path != "." {
            Some(path)
        } else {
            // "missing field `model` at line 1 column 2": name the field.
            msg.split('`').nth(1).filter(|_| msg.starts_with("missing field")).map(str::to_string)
        };
        let text = match (&param, inner.classify()) {
            (_, serde_json::error::Category::Syntax | serde_json::error::Category::Eof) => {
                format!("malformed JSON body: {msg}")
            }
            (Some(p), _) => format!("invalid field '{p}': {msg}"),
            (None, _) => format!("invalid request body: {msg}"),
        };
        ApiError { param: param.or_else(|| Some("body".into())), ..ApiError::bad_request("", text) }
    })
}

fn check_sampling(
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<u32>,
) -> Result<(f32, f32), ApiError> {
    let t = temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&t) || t.is_nan() {
        return Err(ApiError::bad_request(
            "temperature",
            format!("temperature must be between 0 and 2, got {t}"),
        ));
    }
    let p = top_p.unwrap_or(1.0);
    if !(p > 0.0 && p <= 1.0) {
        return Err(ApiError::bad_request("top_p", format!("top_p must be in (0, 1], got {p}")));
    }
    if let Some(n) = n
        && n != 1
    {
        return Err(ApiError::bad_request("n", format!("only n = 1 is supported, got {n}")));
    }
    Ok((t, p))
}

fn check_stop(stop: Option<StopSeq>) -> Result<Vec<String>, ApiError> {
    let stop = stop.map(StopSeq::into_vec).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::bad_request("stop", format!("at most 4 stop sequences, got {}", stop.len())));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("stop", "stop sequences must not be empty"));
    }
    Ok(stop)
}

fn check_max_tokens(param: &str, v: Option<u32>, default: u32) -> Result<u32, ApiError> {
    match v {
        Some(0) => Err(ApiError::bad_request(param, format!("{param} must be at least 1"))),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

/// Sampling and streaming settings shared by chat and text completions.
struct Generation {
    temperature: f32,
    top_p: f32,
    stream: bool,
    include_usage: bool,
}

/// The checks chat and text completions share: sampling and streaming fields, recorded on the
/// request's timer (model and stream) for its log line and metrics.
fn check_generation(
    timer: &mut Option<ReqTimer>,
    model: &str,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<u32>,
    stream: Option<bool>,
    stream_options: &Option<StreamOptions>,
) -> Result<Generation, ApiError> {
    if let Some(t) = timer.as_mut() {
        t.model = Some(model.to_string());
    }
    let (temperature, top_p) = check_sampling(temperature, top_p, n)?;
    let (stream, include_usage) = check_stream(stream, stream_options)?;
    if let Some(t) = timer.as_mut() {
        t.stream = stream;
    }
    Ok(Generation { temperature, top_p, stream, include_usage })
}

fn check_stream(stream: Option<bool>, opts: &Option<StreamOptions>) -> Result<(bool, bool), ApiError> {
    let stream = stream.unwrap_or(false);
    if opts.is_some() && !stream {
        return Err(ApiError::bad_request(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    Ok((stream, opts.as_ref().is_some_and(|o| o.include_usage)))
}

/// Run a generation to its end: text, finish reason, usage.
async fn collect(mut generation: GenerateStream) -> Result<(String, FinishReason, Usage), ApiError> {
    let mut text = String::new();
    while let Some(ev) = generation.next().await {
        match ev? {
            GenerateEvent::Delta(t) => text.push_str(&t),
            GenerateEvent::Done { finish_reason, usage } => return Ok((text, finish_reason, usage)),
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "inference_failed",
        "the backend ended the generation without a finish reason",
    ))
}

/// Get a lease on `model` (loading it if needed), noting in the request line how long it took.
async fn acquire(
    state: &AppState,
    model: &str,
    types: &[ModelType],
    timer: &mut Option<ReqTimer>,
) -> Result<Lease, ApiError> {
    let t = Instant::now();
    let r = state.pool.acquire_as(model, types).await;
    if let Some(timer) = timer.as_mut() {
        timer.acquire_micros = t.elapsed().as_micros() as u64;
    }
    Ok(r?)
}

// ---------------------------------------------------------------- chat

fn chat_prompt(messages: Vec<ChatMessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages", "messages must contain at least one message"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(ApiError::bad_request(
                format!("messages[{i}].role"),
                format!("unknown role '{}': expected system, developer, user, assistant or tool", m.role),
            ));
        }
        let content = match m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t,
            Some(MessageContent::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, p) in parts.into_iter().enumerate() {
                    match p {
                        ContentPart::Text { text } => texts.push(text),
                        ContentPart::ImageUrl { .. } => {
                            return Err(ApiError::bad_request(
                                format!("messages[{i}].content[{j}]"),
                                "image inputs are not supported by this server's backends yet",
                            ));
                        }
                        ContentPart::Unsupported => {
                            return Err(ApiError::bad_request(
                                format!("messages[{i}].content[{j}].type"),
                                "unsupported content part type: only text is accepted",
                            ));
                        }
                    }
                }
                texts.join("\n")
            }
        };
        let role = if m.role == "developer" { "system".to_string() } else { m.role };
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

struct ChatFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl ChatFormat {
    fn chunk(&self, delta: ChatDelta, finish: Option<&'static str>) -> Bytes {
        frame(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChunkChoice { index: 0, delta, finish_reason: finish, logprobs: None }],
            usage: self.include_usage.then_some(None),
        })
    }
}

impl ChunkFormat for ChatFormat {
    fn start(&mut self, out: &mut VecDeque<Bytes>) {
        out.push_back(self.chunk(ChatDelta { role: Some("assistant"), content: Some(String::new()) }, None));
    }
    fn delta(&mut self, text: String) -> Bytes {
        self.chunk(ChatDelta { role: None, content: Some(text) }, None)
    }
    fn finish(&mut self, reason: FinishReason, usage: Usage, out: &mut VecDeque<Bytes>) {
        out.push_back(self.chunk(ChatDelta::default(), Some(finish_str(reason))));
        if self.include_usage {
            out.push_back(frame(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage.into())),
            }));
        }
    }
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(state: AppState, body: Result<Bytes, ApiError>) -> Response {
    let mut timer = Some(ReqTimer::start(&state, "chat_completions"));
    let res = chat_inner(&state, body, &mut timer).await;
    respond(timer, res)
}

async fn chat_inner(
    state: &AppState,
    body: Result<Bytes, ApiError>,
    timer: &mut Option<ReqTimer>,
) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse_body(&body?)?;
    let Generation { temperature, top_p, stream, include_usage } = check_generation(
        timer,
        &req.model,
        req.temperature,
        req.top_p,
        req.n,
        req.stream,
        &req.stream_options,
    )?;
    let max_tokens = match req.max_completion_tokens {
        Some(_) => {
            check_max_tokens("max_completion_tokens", req.max_completion_tokens, DEFAULT_CHAT_MAX_TOKENS)?
        }
        None => check_max_tokens("max_tokens", req.max_tokens, DEFAULT_CHAT_MAX_TOKENS)?,
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
    let messages = chat_prompt(req.messages)?;
    let lease = acquire(state, &req.model, &[ModelType::TextGen, ModelType::Vision], timer).await?;
    let greq = GenerateRequest {
        prompt: Prompt::Chat(messages),
        max_tokens,
        temperature,
        top_p,
        seed: req.seed,
        stop,
    };
    let generation = lease.handle().generate(greq).await?;
    let id = new_id("chatcmpl");
    let created = unix_now();
    let model = lease.model().to_string();
    if stream {
        let fmt = ChatFormat { id, created, model, include_usage };
        return Ok(sse_response(generation, lease, fmt, timer.take()));
    }
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

// ---------------------------------------------------------------- completions

struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    echo: Option<String>,
}

impl CompletionFormat {
    fn chunk(&self, text: String, finish: Option<&'static str>) -> Bytes {
        frame(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![CompletionChoice { index: 0, text, logprobs: None, finish_reason: finish }],
            usage: self.include_usage.then_some(None),
        })
    }
}

impl ChunkFormat for CompletionFormat {
    fn start(&mut self, out: &mut VecDeque<Bytes>) {
        if let Some(p) = self.echo.take() {
            out.push_back(self.chunk(p, None));
        }
    }
    fn delta(&mut self, text: String) -> Bytes {
        self.chunk(text, None)
    }
    fn finish(&mut self, reason: FinishReason, usage: Usage, out: &mut VecDeque<Bytes>) {
        out.push_back(self.chunk(String::new(), Some(finish_str(reason))));
        if self.include_usage {
            out.push_back(frame(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage.into())),
            }));
        }
    }
}

/// `POST /v1/completions`.
pub(crate) async fn completions(state: AppState, body: Result<Bytes, ApiError>) -> Response {
    let mut timer = Some(ReqTimer::start(&state, "completions"));
    let res = completions_inner(&state, body, &mut timer).await;
    respond(timer, res)
}

async fn completions_inner(
    state: &AppState,
    body: Result<Bytes, ApiError>,
    timer: &mut Option<ReqTimer>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(&body?)?;
    let Generation { temperature, top_p, stream, include_usage } = check_generation(
        timer,
        &req.model,
        req.temperature,
        req.top_p,
        req.n,
        req.stream,
        &req.stream_options,
    )?;
    let max_tokens = check_max_tokens("max_tokens", req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS)?;
    let stop = check_stop(req.stop)?;
    if req.suffix.is_some() {
        return Err(ApiError::bad_request("suffix", "suffix is not supported"));
    }
    if req.logprobs.is_some_and(|l| l > 0) {
        return Err(ApiError::bad_request("logprobs", "logprobs are not supported"));
    }
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::bad_request("best_of", "only best_of = 1 is supported"));
    }
    let prompts = match req.prompt {
        PromptInput::One(p) => vec![p],
        PromptInput::Many(v) if v.is_empty() => {
            return Err(ApiError::bad_request("prompt", "prompt must not be an empty list"));
        }
        PromptInput::Many(v) => v,
    };
    if stream && prompts.len() > 1 {
        return Err(ApiError::bad_request("prompt", "streaming takes a single prompt"));
    }
    let echo = req.echo.unwrap_or(false);
    let lease = acquire(state, &req.model, &[ModelType::TextGen], timer).await?;
    let id = new_id("cmpl");
    let created = unix_now();
    let model = lease.model().to_string();
    let make = |p: String| GenerateRequest {
        prompt: Prompt::Text(p),
        max_tokens,
        temperature,
        top_p,
        seed: req.seed,
        stop: stop.clone(),
    };
    if stream {
        let prompt = prompts.into_iter().next().unwrap_or_default();
        let echo = echo.then(|| prompt.clone());
        let generation = lease.handle().generate(make(prompt)).await?;
        let fmt = CompletionFormat { id, created, model, include_usage, echo };
        return Ok(sse_response(generation, lease, fmt, timer.take()));
    }
    let mut choices = Vec::with_capacity(prompts.len());
    let mut total = Usage::default();
    for (i, p) in prompts.into_iter().enumerate() {
        let prefix = if echo { p.clone() } else { String::new() };
        let generation = lease.handle().generate(make(p)).await?;
        let (text, finish, usage) = collect(generation).await?;
        total.prompt_tokens += usage.prompt_tokens;
        total.completion_tokens += usage.completion_tokens;
        choices.push(CompletionChoice {
            index: i as u32,
            text: prefix + &text,
            logprobs: None,
            finish_reason: Some(finish_str(finish)),
        });
    }
    drop(lease);
    ok_json(&CompletionResponse {
        id,
        object: "text_completion",
        created,
        model,
        choices,
        usage: Some(Some(total.into())),
    })
}

// ---------------------------------------------------------------- embeddings

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(state: AppState, body: Result<Bytes, ApiError>) -> Response {
    let mut timer = Some(ReqTimer::start(&state, "embeddings"));
    let res = embeddings_inner(&state, body, &mut timer).await;
    respond(timer, res)
}

async fn embeddings_inner(
    state: &AppState,
    body: Result<Bytes, ApiError>,
    timer: &mut Option<ReqTimer>,
) -> Result<Response, ApiError> {
    let req: EmbeddingRequest = parse_body(&body?)?;
    if let Some(t) = timer.as_mut() {
        t.model = Some(req.model.clone());
    }
    let inputs = match req.input {
        EmbeddingInput::One(s) => vec![s],
        EmbeddingInput::Many(v) => v,
        EmbeddingInput::Tokens(_) => {
            return Err(ApiError::bad_request(
                "input",
                "input must be a string or a list of strings (token-id input is not supported)",
            ));
        }
    };
    if inputs.is_empty() {
        return Err(ApiError::bad_request("input", "input must not be an empty list"));
    }
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(ApiError::bad_request(
            "input",
            format!("at most {MAX_EMBEDDING_INPUTS} inputs per request, got {}", inputs.len()),
        ));
    }
    if let Some(i) = inputs.iter().position(String::is_empty) {
        return Err(ApiError::bad_request(format!("input[{i}]"), "inputs must not be empty strings"));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "encoding_format",
                format!("unknown encoding_format '{other}': expected float or base64"),
            ));
        }
    };
    if req.dimensions == Some(0) {
        return Err(ApiError::bad_request("dimensions", "dimensions must be at least 1"));
    }
    let lease = acquire(state, &req.model, &[ModelType::Embeddings], timer).await?;
    let model = lease.model().to_string();
    let out = lease.handle().embed(inputs).await?;
    drop(lease);
    if let (Some(d), Some(v)) = (req.dimensions, out.vectors.first())
        && d as usize != v.len()
    {
        return Err(ApiError::bad_request(
            "dimensions",
            format!("model '{model}' produces {} dimensions; dimensions={d} is not supported", v.len()),
        ));
    }
    let data = out
        .vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| EmbeddingData {
            object: "embedding",
            index: i as u32,
            embedding: if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                EmbeddingVector::Float(v)
            },
        })
        .collect();
    ok_json(&EmbeddingResponse {
        object: "list",
        data,
        model,
        usage: EmbeddingUsage { prompt_tokens: out.prompt_tokens, total_tokens: out.prompt_tokens },
    })
}

// ---------------------------------------------------------------- models

fn model_object(state: &AppState, m: &crate::state::ModelStatus) -> ModelObject {
    ModelObject {
        id: m.id.to_string(),
        object: "model",
        created: state.started_unix,
        owned_by: "modelpool",
        model_type: m.model_type.as_str(),
        state: phase_str(m.phase),
    }
}

fn phase_str(p: crate::state::Phase) -> &'static str {
    use crate::state::Phase;
    match p {
        Phase::Absent => "absent",
        Phase::Loading => "loading",
        Phase::Resident => "resident",
        Phase::Draining => "draining",
    }
}

/// `GET /v1/models`.
pub(crate) async fn list_models(state: AppState) -> Response {
    let timer = ReqTimer::start(&state, "models");
    let status = state.pool.status();
    let data = status.models.iter().map(|m| model_object(&state, m)).collect();
    respond(Some(timer), ok_json(&ModelList { object: "list", data }))
}

/// `GET /v1/models/{id}`.
pub(crate) async fn get_model(state: AppState, id: String) -> Response {
    let mut timer = ReqTimer::start(&state, "models");
    timer.model = Some(id.clone());
    let status = state.pool.status();
    let res = match status.models.iter().find(|m| *m.id == *id) {
        Some(m) => ok_json(&model_object(&state, m)),
        None => Err(crate::error::PoolError::ModelNotFound(id).into()),
    };
    respond(Some(timer), res)
}

// ---------------------------------------------------------------- admin

/// What an admin route asks for.
#[derive(Debug, Clone)]
pub(crate) enum AdminOp {
    Status,
    Events(BTreeMap<String, String>),
    Model(String),
    Preload(String),
    Pin(String),
    Unpin(String),
    Unload(String, BTreeMap<String, String>),
    DryRun(String),
    Limits(Result<Bytes, ApiError>),
}

/// Every `/admin` route.
pub(crate) async fn admin(state: AppState, op: AdminOp) -> Response {
    let mut timer = ReqTimer::start(&state, "admin");
    let res = admin_inner(&state, op, &mut timer).await;
    respond(Some(timer), res)
}

fn model_status(state: &AppState, id: &str) -> Result<crate::state::ModelStatus, ApiError> {
    state
        .pool
        .status()
        .models
        .into_iter()
        .find(|m| *m.id == *id)
        .ok_or_else(|| crate::error::PoolError::ModelNotFound(id.to_string()).into())
}

fn bool_query(q: &BTreeMap<String, String>, key: &str) -> Result<bool, ApiError> {
    match q.get(key).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(v) => Err(ApiError::bad_request(key, format!("{key} must be true or false, got '{v}'"))),
    }
}

async fn admin_inner(state: &AppState, op: AdminOp, timer: &mut ReqTimer) -> Result<Response, ApiError> {
    let pool = &state.pool;
    match op {
        AdminOp::Status => {
            let status = pool.status();
            let mut v = serde_json::to_value(&status).unwrap_or_default();
            // Counters by name, next to the engine's positional arrays.
            let evictions: BTreeMap<&str, u64> = crate::log::EvictReason::ALL
                .iter()
                .map(|r| (r.as_str(), status.stats.evictions_for(*r)))
                .collect();
            let rejections: BTreeMap<&str, u64> = crate::log::RejectCode::ALL
                .iter()
                .map(|c| (c.as_str(), status.stats.rejections_for(*c)))
                .collect();
            v["stats"]["evictions_by_reason"] = serde_json::json!(evictions);
            v["stats"]["rejections_by_code"] = serde_json::json!(rejections);
            ok_json(&v)
        }
        AdminOp::Events(q) => {
            let n = match q.get("limit") {
                None => 100,
                Some(v) => {
                    v.parse::<usize>().ok().filter(|n| (1..=100_000).contains(n)).ok_or_else(|| {
                        ApiError::bad_request(
                            "limit",
                            format!("limit must be an integer between 1 and 100000, got '{v}'"),
                        )
                    })?
                }
            };
            let events = pool.events(n);
            ok_json(&serde_json::json!({ "events": events }))
        }
        AdminOp::Model(id) => {
            timer.model = Some(id.clone());
            ok_json(&model_status(state, &id)?)
        }
        AdminOp::Preload(id) => {
            timer.model = Some(id.clone());
            pool.preload(&id).await?;
            tracing::info!(model = %id, "preloaded and pinned");
            ok_json(&serde_json::json!({ "model": id, "pinned": true, "status": model_status(state, &id)? }))
        }
        AdminOp::Pin(id) => {
            timer.model = Some(id.clone());
            pool.pin(&id)?;
            ok_json(&serde_json::json!({ "model": id, "pinned": true, "status": model_status(state, &id)? }))
        }
        AdminOp::Unpin(id) => {
            timer.model = Some(id.clone());
            let was = pool.unpin(&id).await?;
            ok_json(
                &serde_json::json!({ "model": id, "was_pinned": was, "status": model_status(state, &id)? }),
            )
        }
        AdminOp::Unload(id, q) => {
            timer.model = Some(id.clone());
            let force = bool_query(&q, "force")?;
            let report = pool.unload(&id, force).await?;
            tracing::info!(model = %id, force, unloaded_now = report.unloaded_now, "unload");
            ok_json(&serde_json::json!({ "report": report, "status": model_status(state, &id)? }))
        }
        AdminOp::DryRun(id) => {
            timer.model = Some(id.clone());
            ok_json(&pool.dry_run(&id)?)
        }
        AdminOp::Limits(body) => {
            let req: LimitsRequest = parse_body(&body?)?;
            if req.memory_limit.is_none() && req.max_models.is_none() {
                return Err(ApiError::bad_request("body", "give memory_limit and/or max_models"));
            }
            let limit = match &req.memory_limit {
                Some(s) => {
                    let l: MemoryLimit = s.parse().map_err(|e: crate::limit::LimitError| {
                        ApiError::bad_request("memory_limit", e.to_string())
                    })?;
                    Some(l.resolve(state.system_memory.as_ref()))
                }
                None => None,
            };
            if req.max_models == Some(0) {
                return Err(ApiError::bad_request("max_models", "max_models must be at least 1"));
            }
            let evicted = pool.set_limits(limit, req.max_models).await?;
            tracing::info!(limit = ?limit, max_models = ?req.max_models, evicted = evicted.len(), "limits changed");
            ok_json(&serde_json::json!({ "ledger": pool.ledger(), "evicted": evicted }))
        }
    }
}

// ---------------------------------------------------------------- health, metrics

/// `GET /health`: 200 while serving, 503 (with `Retry-After`) once shutdown began.
pub(crate) async fn health(state: AppState) -> Response {
    let timer = ReqTimer::start(&state, "health");
    let l = state.pool.ledger();
    let res = if state.pool.is_shutting_down() {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting_down",
            "server is shutting down",
        );
        e.retry_after = Some(5);
        Err(e)
    } else {
        ok_json(&serde_json::json!({
            "status": "ok",
            "models_loaded": l.models,
            "used_bytes": l.used(),
            "limit_bytes": l.limit,
        }))
    };
    respond(Some(timer), res)
}

/// `GET /metrics`: Prometheus text format.
pub(crate) async fn metrics(state: AppState) -> Response {
    let timer = ReqTimer::start(&state, "metrics");
    let text = state.metrics.render(&state.pool.status());
    let mut r = Response::new(text.into());
    r.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    respond(Some(timer), Ok(r))
}
