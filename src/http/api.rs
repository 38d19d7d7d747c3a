//! OpenAI-compatible request and response shapes, hand-written (as TGI does) so that we control
//! exactly what is accepted and emitted. Responses are checked against `async-openai`'s types in
//! the integration tests.
//!
//! Requests ignore unknown fields (clients send many we do not use), but fields that would change
//! the answer and that we cannot honour (`n > 1`, `tools`, `logprobs`, ...) are refused with a
//! 400 naming the field, rather than silently ignored.
//!
//! Fields mean what OpenAI's API reference says; their docs here say only what this server
//! accepts, defaults or always sends.

use serde::{Deserialize, Serialize};

use crate::backend::{FinishReason, Usage};
use crate::state::Phase;
use crate::types::ModelType;

/// Reads `seed` as any JSON integer from `i64::MIN` to `u64::MAX`. OpenAI types it as a signed
/// 64-bit integer and some clients send `-1`; a negative seed maps to the sampler's `u64` seed
/// by two's complement (`-1` -> `u64::MAX`), so each integer names one fixed sampling stream
/// and non-negative seeds keep their value.
pub fn de_seed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct SeedVisitor;
    impl serde::de::Visitor<'_> for SeedVisitor {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer seed (from -2^63 to 2^64 - 1) or null")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v as u64))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(SeedVisitor)
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopSeq {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl StopSeq {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSeq::One(s) => vec![s],
            StopSeq::Many(v) => v,
        }
    }
}

/// `stream_options`: accepted only with `"stream": true`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and empty `choices`) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// One content part of a chat message.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// `{"type": "text", "text": ...}`; the text parts of a message are joined by newlines.
    #[allow(missing_docs)]
    Text { text: String },
    /// An image, for vision models only (see `http::images`): a `data:` URL, or `http(s)`
    /// with `--remote-images`.
    ImageUrl {
        /// `{"url": ..., "detail": ...}` (`detail` is accepted and ignored), or the URL as a
        /// string.
        image_url: serde_json::Value,
    },
    /// Anything else (`input_audio`, `file`, ...): refused by validation.
    #[serde(other)]
    Unsupported,
}

/// Message content: a string, a list of parts, or null (assistant turns with tool calls).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// A string.
    Text(String),
    /// A list of parts: text, and images for vision models.
    Parts(Vec<ContentPart>),
}

/// One input chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Content; may be null for an assistant turn.
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Optional participant name (ignored).
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// A registered model id of type `text-gen` or `vision`; loaded if not resident.
    pub model: String,
    /// The conversation so far, at least one message.
    pub messages: Vec<ChatMessageIn>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Only with `stream: true`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Upper bound on generated tokens, at least 1 (default 512; legacy name).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Upper bound on generated tokens, at least 1 (current name; wins over `max_tokens`).
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature in [0, 2] (default 1; 0 is greedy).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1] (default 1).
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Sampling seed: any integer OpenAI accepts (a signed 64-bit integer, so `-1` too) or an
    /// unsigned 64-bit one; see [`de_seed`] for how it maps to the sampler's seed.
    #[serde(default, deserialize_with = "de_seed")]
    pub seed: Option<u64>,
    /// At most 4 non-empty stop strings.
    #[serde(default)]
    pub stop: Option<StopSeq>,
    /// Number of choices; only 1 is supported.
    #[serde(default)]
    pub n: Option<u32>,
    /// Tool definitions; not supported (refused when non-empty).
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// Log probabilities; not supported (refused when true).
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// `{"type": "text"}` only.
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
}

/// `prompt` of a completion: a string or a list of strings (token arrays are refused).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One prompt.
    One(String),
    /// Several prompts, answered as several choices.
    Many(Vec<String>),
}

/// `POST /v1/completions` body.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// A registered model id of type `text-gen`; loaded if not resident.
    pub model: String,
    /// One prompt, or several (one choice each, not streamed).
    pub prompt: PromptInput,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Only with `stream: true`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Upper bound on generated tokens, at least 1 (default 16, as OpenAI's).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature in [0, 2] (default 1; 0 is greedy).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1] (default 1).
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Sampling seed: any integer OpenAI accepts (a signed 64-bit integer, so `-1` too) or an
    /// unsigned 64-bit one; see [`de_seed`] for how it maps to the sampler's seed.
    #[serde(default, deserialize_with = "de_seed")]
    pub seed: Option<u64>,
    /// At most 4 non-empty stop strings.
    #[serde(default)]
    pub stop: Option<StopSeq>,
    /// Number of choices per prompt; only 1 is supported.
    #[serde(default)]
    pub n: Option<u32>,
    /// Prepend the prompt to the completion.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Not supported (refused when set).
    #[serde(default)]
    pub suffix: Option<String>,
    /// Not supported (refused when set and non-zero).
    #[serde(default)]
    pub logprobs: Option<u32>,
    /// Not supported (refused when > 1).
    #[serde(default)]
    pub best_of: Option<u32>,
}

/// `input` of an embeddings request.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// A string.
    One(String),
    /// Up to 2048 strings, none empty.
    Many(Vec<String>),
    /// Token ids (one list or a list of lists): refused, we take text only.
    Tokens(serde_json::Value),
}

/// `POST /v1/embeddings` body.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    /// A registered model id of type `embeddings`; loaded if not resident.
    pub model: String,
    /// The text or texts to embed.
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian f32).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Output dimensions; must equal the model's when given.
    #[serde(default)]
    pub dimensions: Option<u32>,
}

/// Token counts of a response, as the backend counted them; `total_tokens` is always
/// `prompt_tokens + completion_tokens`.
#[derive(Debug, Clone, Copy, Serialize)]
#[allow(missing_docs)]
pub struct UsageOut {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl From<Usage> for UsageOut {
    fn from(u: Usage) -> Self {
        UsageOut {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// The wire name of a finish reason: `stop` (end of text or a stop string) or `length`
/// (the token limit).
pub fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// An assistant message in a response.
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The whole generated text.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Position (always 0: `n` is 1).
    pub index: u32,
    /// The generated answer.
    pub message: AssistantMessage,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// Always null.
    pub logprobs: Option<()>,
}

/// A chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionResponse {
    /// `chatcmpl-` and 16 hex digits, unique within the server's run.
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds once the model was ready (after any load).
    pub created: u64,
    /// The model id as registered.
    pub model: String,
    /// Exactly one choice (`n` is 1).
    pub choices: Vec<ChatChoice>,
    #[allow(missing_docs)]
    pub usage: UsageOut,
}

/// The `delta` of a streamed chat chunk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    /// `assistant` on the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// A piece of text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a streamed chat chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    /// Always 0.
    pub index: u32,
    /// The role (first chunk), a piece of text, or nothing (finish chunk).
    pub delta: ChatDelta,
    /// Set on the last content chunk only.
    pub finish_reason: Option<&'static str>,
    /// Always null.
    pub logprobs: Option<()>,
}

/// One streamed chat chunk (`chat.completion.chunk`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    /// Same id on every chunk of a response.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds once the model was ready (after any load), the same on every chunk.
    pub created: u64,
    /// The model id as registered.
    pub model: String,
    /// Zero (usage chunk) or one choice.
    pub choices: Vec<ChatChunkChoice>,
    /// Null on every chunk but the last when `include_usage` is set; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

/// One choice of a text completion (also used for streamed chunks).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// The position of this choice's prompt in the request.
    pub index: u32,
    /// Generated text (or a piece of it when streaming).
    pub text: String,
    /// Always null.
    pub logprobs: Option<()>,
    /// `stop` or `length` on the last piece; null before.
    pub finish_reason: Option<&'static str>,
}

/// A text completion or one streamed chunk of it (`text_completion`).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    /// `cmpl-` and 16 hex digits, the same on every chunk of a stream.
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix seconds once the model was ready (after any load).
    pub created: u64,
    /// The model id as registered.
    pub model: String,
    /// One choice per prompt.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (absent on streamed chunks unless `include_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

/// An embedding vector as floats or base64.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `encoding_format: float`.
    Float(Vec<f32>),
    /// `encoding_format: base64` (little-endian f32 bytes).
    Base64(String),
}

/// The embedding of one input.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingData {
    /// Always `embedding`.
    pub object: &'static str,
    /// The input's position in the request.
    pub index: u32,
    /// As many dimensions as the model produces.
    pub embedding: EmbeddingVector,
}

/// Token counts of an embeddings response.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EmbeddingUsage {
    /// Tokens over all inputs.
    pub prompt_tokens: u32,
    /// Same as `prompt_tokens`.
    pub total_tokens: u32,
}

/// `POST /v1/embeddings` response.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingResponse {
    /// Always `list`.
    pub object: &'static str,
    /// One per input, in input order.
    pub data: Vec<EmbeddingData>,
    /// The model id as registered.
    pub model: String,
    #[allow(missing_docs)]
    pub usage: EmbeddingUsage,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelObject {
    /// The model id as registered (may contain `/`).
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds of the server's start (models are registered then).
    pub created: u64,
    /// Always `modelpool`.
    pub owned_by: &'static str,
    /// Extension: `text-gen`, `vision` or `embeddings`.
    pub model_type: ModelType,
    /// Extension: `absent`, `loading`, `resident` or `draining` (the [`Phase`] at the time of
    /// the request).
    pub state: Phase,
}

/// `GET /v1/models` response.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// Every registered model, in registration order.
    pub data: Vec<ModelObject>,
}
