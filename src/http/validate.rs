//! Request validation shared by the endpoints: the JSON body parser and the checks of the
//! sampling, streaming, stop and token-limit fields, and of admin query flags. Every failure
//! is a 400 [`ApiError`] naming the field at fault (`param`), with a message saying what is
//! accepted; nothing here touches the pool.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

use super::api::{StopSeq, StreamOptions};
use super::error::ApiError;

/// Parse a JSON body into `T`. An empty body, malformed JSON or a field of the wrong shape is a
/// 400 whose `param` names the field (`messages[0].role`), or `body` when no field is at fault.
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
        let text = match (&param, syntax) {
            (_, true) => format!("malformed JSON body: {msg}"),
            (Some(p), false) => format!("invalid field '{p}': {msg}"),
            (None, false) => format!("invalid request body: {msg}"),
        };
        ApiError { param: param.or_else(|| Some("body".into())), ..ApiError::bad_request("", text) }
    })
}

/// Sampling and streaming settings shared by chat and text completions, checked.
pub(crate) struct Generation {
    /// In [0, 2]; 1 when not given.
    pub temperature: f32,
    /// In (0, 1]; 1 when not given.
    pub top_p: f32,
    pub stream: bool,
    /// Send a usage chunk before `[DONE]` (only ever true when streaming).
    pub include_usage: bool,
}

/// The checks chat and text completions share: sampling (`temperature`, `top_p`, `n` = 1) and
/// streaming (`stream_options` only with `stream: true`).
pub(crate) fn check_generation(
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<u32>,
    stream: Option<bool>,
    stream_options: &Option<StreamOptions>,
) -> Result<Generation, ApiError> {
    let (temperature, top_p) = check_sampling(temperature, top_p, n)?;
    let (stream, include_usage) = check_stream(stream, stream_options)?;
    Ok(Generation { temperature, top_p, stream, include_usage })
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

/// At most 4 stop sequences, none empty; none given is an empty list.
pub(crate) fn check_stop(stop: Option<StopSeq>) -> Result<Vec<String>, ApiError> {
    let stop = stop.map(StopSeq::into_vec).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::bad_request("stop", format!("at most 4 stop sequences, got {}", stop.len())));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("stop", "stop sequences must not be empty"));
    }
    Ok(stop)
}

/// A token limit named `param`: at least 1 and at most the model's `context` (a 400 naming
/// both otherwise); `default` (capped at `context`) when not given.
pub(crate) fn check_max_tokens(
    param: &str,
    v: Option<u32>,
    default: u32,
    context: u32,
) -> Result<u32, ApiError> {
    match v {
        Some(0) => Err(ApiError::bad_request(param, format!("{param} must be at least 1"))),
        Some(v) if v > context => Err(ApiError::bad_request(
            param,
            format!(
                "{param} is {v}, more than the model's context of {context} tokens; ask for at most {context}"
            ),
        )),
        Some(v) => Ok(v),
        None => Ok(default.min(context)),
    }
}

/// A boolean query flag: absent, `false` or `0` is false; `true`, `1` or empty (`?force`) true.
pub(crate) fn bool_query(q: &BTreeMap<String, String>, key: &str) -> Result<bool, ApiError> {
    match q.get(key).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(v) => Err(ApiError::bad_request(key, format!("{key} must be true or false, got '{v}'"))),
    }
}
