//! JSON replies. Every successful JSON answer goes through [`json_response`], so each carries
//! `content-type: application/json`.

use serde::Serialize;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use super::error::ApiError;

/// `v` as a JSON body with `status`. Serializing our own reply types cannot fail; if it ever
/// did, the body would be empty rather than the server panicking.
pub(crate) fn json_response<T: Serialize>(v: &T, status: StatusCode) -> Response {
    let mut r = Response::new(serde_json::to_vec(v).unwrap_or_default().into());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `v` as a 200 JSON reply.
pub(crate) fn ok_json<T: Serialize>(v: &T) -> Result<Response, ApiError> {
    Ok(json_response(v, StatusCode::OK))
}
