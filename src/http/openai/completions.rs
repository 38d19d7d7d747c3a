//! `POST /v1/completions`: text completion of one prompt or several (one choice each), as one
//! JSON reply or, for a single prompt, an SSE stream of `text_completion` chunks.

use std::collections::VecDeque;

use bytes::Bytes;
use warp::reply::Response;
use warp::sse::Event;

use super::{acquire, collect, context_tokens, new_id, ready_future, stream_when_ready, unix_now};
use crate::backend::{FinishReason, GenerateRequest, Prompt, Usage};
use crate::http::api::*;
use crate::http::app::AppState;
use crate::http::error::ApiError;
use crate::http::reply::ok_json;
use crate::http::stream::{ChunkFormat, json_event};
use crate::http::timer::{ReqTimer, respond};
use crate::http::validate::{Generation, check_generation, check_max_tokens, check_stop, parse_body};
use crate::types::ModelType;

/// Tokens generated when a completion request sets no `max_tokens` (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;

/// The chunks of one streamed completion: the echoed prompt if asked for, one chunk per text
/// piece, a finish chunk, and a usage chunk when asked for.
struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    echo: Option<String>,
}

impl CompletionFormat {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Option<UsageOut>>) -> Event {
        json_event(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn text_chunk(&self, text: String, finish: Option<&'static str>) -> Event {
        let choice = CompletionChoice { index: 0, text, logprobs: None, finish_reason: finish };
        self.chunk(vec![choice], self.include_usage.then_some(None))
    }
}

impl ChunkFormat for CompletionFormat {
    fn start(&mut self, out: &mut VecDeque<Event>) {
        if let Some(p) = self.echo.take() {
            out.push_back(self.text_chunk(p, None));
        }
    }
    fn delta(&mut self, text: String) -> Event {
        self.text_chunk(text, None)
    }
    fn finish(&mut self, reason: FinishReason, usage: Usage, out: &mut VecDeque<Event>) {
        out.push_back(self.text_chunk(String::new(), Some(finish_str(reason))));
        if self.include_usage {
            out.push_back(self.chunk(Vec::new(), Some(Some(usage.into()))));
        }
    }
}

/// `POST /v1/completions`.
pub(crate) async fn completions(state: AppState, body: Result<Bytes, ApiError>) -> Response {
    let mut timer = ReqTimer::start(&state, "completions");
    let res = completions_inner(&state, body, &mut timer).await;
    respond(timer, res)
}

async fn completions_inner(
    state: &AppState,
    body: Result<Bytes, ApiError>,
    timer: &mut ReqTimer,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(&body?)?;
    timer.set_model(&req.model);
    let Generation { temperature, top_p, stream, include_usage } =
        check_generation(req.temperature, req.top_p, req.n, req.stream, &req.stream_options)?;
    timer.set_stream(stream);
    let max_tokens = check_max_tokens(
        "max_tokens",
        req.max_tokens,
        DEFAULT_COMPLETION_MAX_TOKENS,
        state.context_of(&req.model),
    )?;
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
    // The prompts run one after another on the lease: the longest bounds the cache.
    let tokens = context_tokens(prompts.iter().map(String::len).max().unwrap_or(0), 0, max_tokens);
    let id = new_id("cmpl");
    let created = unix_now();
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
        let greq = make(prompt);
        let fmt = CompletionFormat { id, created, model: req.model.clone(), include_usage, echo };
        let ready = ready_future(state, req.model, &[ModelType::TextGen], tokens, greq);
        return stream_when_ready(state, timer, fmt, ready).await;
    }
    let lease = acquire(state, &req.model, &[ModelType::TextGen], tokens, timer).await?;
    let model = lease.model().to_string();
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
