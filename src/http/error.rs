//! The one mapping from engine errors to HTTP: status, OpenAI error object, `Retry-After`.
//!
//! [`ApiError::from`] a [`PoolError`] is the only place a status is chosen for an engine error;
//! [`ApiError::into_response`] renders it as a reply, and the SSE stream sends its
//! [`ApiError::body`] as the last event when the error comes after the stream started.

use serde::Serialize;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;

use crate::backend::BackendError;
use crate::error::PoolError;

/// An error reply: status, OpenAI error object and an optional retry hint.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The reply's status (for engine errors, chosen only by [`ApiError::from`]).
    pub status: StatusCode,
    /// Human-readable message (the engine's text for engine errors).
    pub message: String,
    /// OpenAI error `type` (`invalid_request_error`, `server_error`, ...).
    pub kind: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// Machine-readable code (`model_not_found`, `insufficient_memory`, ...).
    pub code: Option<&'static str>,
    /// Seconds for the `Retry-After` header, when waiting can help.
    pub retry_after: Option<u32>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

impl ApiError {
    /// A 400 `invalid_request_error` naming `param` and no code, as OpenAI reports bad fields.
    pub fn bad_request(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
            retry_after: None,
        }
    }

    /// `status` with an error `kind`, a machine-readable `code` and no param.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: Some(code), retry_after: None }
    }

    /// 401 `invalid_api_key` for a request refused by the key check, with OpenAI's wording
    /// (the presented key is never echoed).
    pub fn unauthorized(why: super::auth::AuthFailure) -> Self {
        use super::auth::AuthFailure;
        let message = match why {
            AuthFailure::Missing => {
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            }
            AuthFailure::Wrong => "Incorrect API key provided.",
            AuthFailure::NoAdminKey => {
                "The admin API is closed: this server has API keys but no admin key (start it with --admin-key)."
            }
        };
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", message)
    }

    /// 503 `server_busy` with `Retry-After: 1`: the server already has `limit` requests (or
    /// connections, `what`) in progress.
    pub fn busy(what: &str, limit: usize) -> Self {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "server_busy",
                format!("the server is at its limit of {limit} {what}; retry shortly"),
            )
        }
    }

    /// 408 `request_timeout`: the request body did not arrive within `secs` seconds.
    pub fn body_timeout(secs: f64) -> Self {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            format!("the request body did not arrive within {secs}s"),
        )
    }

    /// Builder: set the code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body `{"error": {"message", "type", "param", "code"}}`, on one line.
    pub fn body(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_default()
    }

    /// Whether a retry of the same request can never succeed here: `model_too_large`, and
    /// `max_models_reached` without a retry hint (every model slot held by a pinned model).
    /// Such replies carry `x-should-retry: false`, which the official OpenAI clients honour.
    pub fn never_succeeds(&self) -> bool {
        match self.code {
            Some("model_too_large") => true,
            Some("max_models_reached") => self.retry_after.is_none(),
            _ => false,
        }
    }

    /// Whether this is a refusal that waiting cures (busy memory or slots, a full or timed-out
    /// queue, a draining model): a router may send the request to another node, and with
    /// `--busy-status 429` it is a 429 instead of a 503.
    pub fn is_busy(&self) -> bool {
        self.status == StatusCode::SERVICE_UNAVAILABLE
            && self.retry_after.is_some()
            && matches!(
                self.code,
                Some(
                    "insufficient_memory"
                        | "max_models_reached"
                        | "model_draining"
                        | "queue_full"
                        | "queue_timeout"
                )
            )
    }

    /// The reply: status, JSON body, `Retry-After` when set, `x-should-retry: false` when a
    /// retry [never succeeds](Self::never_succeeds); a [busy](Self::is_busy) reply is marked
    /// with the [`Busy`] extension for the server's `--busy-status`.
    pub fn into_response(self) -> Response {
        let mut res = Response::new(self.body().into());
        *res.status_mut() = self.status;
        if self.is_busy() {
            res.extensions_mut().insert(Busy);
        }
        let never = self.never_succeeds();
        let h = res.headers_mut();
        h.insert(warp::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if never {
            h.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if let Some(secs) = self.retry_after.filter(|_| !never) {
            h.insert(warp::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(warp::http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The body is half read: the connection cannot carry another request.
            h.insert(warp::http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        res
    }
}

/// Marks a response as a [busy refusal](ApiError::is_busy) (a response extension, never sent).
#[derive(Debug, Clone, Copy)]
pub struct Busy;

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        ApiError::from(PoolError::Backend(e))
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        use StatusCode as S;
        let message = e.to_string();
        let retry_after = e.retry_after_secs();
        let (status, kind, code, param) = match &e {
            PoolError::ModelNotFound(_) => {
                (S::NOT_FOUND, "invalid_request_error", "model_not_found", Some("model"))
            }
            PoolError::WrongModelType { .. } => {
                (S::BAD_REQUEST, "invalid_request_error", "wrong_model_type", Some("model"))
            }
            PoolError::InsufficientMemory { .. }
            | PoolError::ModelTooLarge { .. }
            | PoolError::MaxModelsReached { .. }
            | PoolError::Draining { .. }
            | PoolError::QueueFull { .. }
            | PoolError::QueueTimeout { .. } => (
                S::SERVICE_UNAVAILABLE,
                "server_error",
                e.reject_code().map_or("unavailable", |c| c.as_str()),
                None,
            ),
            PoolError::ShuttingDown { .. } => (S::SERVICE_UNAVAILABLE, "server_error", "shutting_down", None),
            PoolError::LoadFailed { .. } => {
                (S::INTERNAL_SERVER_ERROR, "server_error", "model_load_failed", None)
            }
            PoolError::Backend(b) => match b {
                BackendError::InvalidRequest(_) => {
                    (S::BAD_REQUEST, "invalid_request_error", "invalid_request", None)
                }
                BackendError::Unsupported(_) => {
                    (S::BAD_REQUEST, "invalid_request_error", "unsupported", None)
                }
                BackendError::Overloaded(_) => {
                    // As TGI's `Overloaded`: the server is up and the model loaded, but its
                    // queue is full; a retry soon will likely be served.
                    return ApiError {
                        status: S::TOO_MANY_REQUESTS,
                        message,
                        kind: "server_error",
                        param: None,
                        code: Some("model_overloaded"),
                        retry_after: Some(1),
                    };
                }
                BackendError::Gone | BackendError::Cancelled => {
                    // The model went away under the call (or its load was given up: nobody
                    // waits on a cancelled load, so this is defensive); a retry loads it again.
                    return ApiError {
                        status: S::SERVICE_UNAVAILABLE,
                        message,
                        kind: "server_error",
                        param: None,
                        code: Some("model_unloaded"),
                        retry_after: Some(1),
                    };
                }
                BackendError::Load(_) | BackendError::Inference(_) => {
                    (S::INTERNAL_SERVER_ERROR, "server_error", "inference_failed", None)
                }
            },
            PoolError::UnloadRefused { .. } => (S::CONFLICT, "invalid_request_error", "unload_refused", None),
            PoolError::InvalidConfig(_) => (S::BAD_REQUEST, "invalid_request_error", "invalid_config", None),
        };
        ApiError { status, message, kind, param: param.map(str::to_string), code: Some(code), retry_after }
    }
}
