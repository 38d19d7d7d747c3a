//! `POST /v1/embeddings`: one vector per input text, as floats or base64.

use base64::Engine as _;
use bytes::Bytes;
use warp::reply::Response;

use super::acquire;
use crate::http::api::*;
use crate::http::app::AppState;
use crate::http::error::ApiError;
use crate::http::reply::ok_json;
use crate::http::timer::{ReqTimer, respond};
use crate::http::validate::parse_body;
use crate::types::ModelType;

/// Most inputs one embeddings request may carry (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(state: AppState, body: Result<Bytes, ApiError>) -> Response {
    let mut timer = ReqTimer::start(&state, "embeddings");
    let res = embeddings_inner(&state, body, &mut timer).await;
    respond(timer, res)
}

async fn embeddings_inner(
    state: &AppState,
    body: Result<Bytes, ApiError>,
    timer: &mut ReqTimer,
) -> Result<Response, ApiError> {
    let req: EmbeddingRequest = parse_body(&body?)?;
    timer.set_model(&req.model);
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
    let lease = acquire(state, &req.model, &[ModelType::Embeddings], 0, timer).await?;
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
