//! Server-sent event streams of generations.
//!
//! Framing (what OpenAI clients expect): an optional first chunk, one chunk per text piece, the
//! final chunk(s), then exactly one `data: [DONE]`. An error after the stream started is sent as
//! one `data: {"error": ...}` frame and the stream ends without `[DONE]`.
//!
//! The stream owns the request's [`Lease`]: when the client disconnects, hyper drops the body,
//! which drops the generation first and then the lease, so the model is released at once.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use warp::Reply;
use warp::http::HeaderValue;
use warp::reply::Response;

use super::error::ApiError;
use super::timer::ReqTimer;
use crate::backend::{FinishReason, GenerateEvent, GenerateStream, Usage};
use crate::pool::Lease;

/// The terminating frame, sent exactly once per successful stream.
pub const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

/// Turns generation events into SSE frames for one API shape (chat or completions).
pub(crate) trait ChunkFormat: Send + 'static {
    /// Frames sent before the first piece (the chat role chunk, an echoed prompt).
    fn start(&mut self, out: &mut VecDeque<Bytes>);
    /// The frame for one piece of text.
    fn delta(&mut self, text: String) -> Bytes;
    /// The frames after the last piece (finish reason, usage), without `[DONE]`.
    fn finish(&mut self, reason: FinishReason, usage: Usage, out: &mut VecDeque<Bytes>);
}

/// `data: <json>\n\n`.
pub(crate) fn frame<T: serde::Serialize>(v: &T) -> Bytes {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"data: ");
    // Serializing our own plain structs cannot fail.
    let _ = serde_json::to_writer(&mut buf, v);
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

/// A generation as a stream of SSE frames. Field order matters: the generation is dropped
/// before the lease.
struct GenFrames<F: ChunkFormat> {
    generation: Option<GenerateStream>,
    queue: VecDeque<Bytes>,
    fmt: F,
    done: bool,
    /// Status recorded when the stream ends (200, or the error's status).
    outcome: (u16, Option<&'static str>),
    timer: Option<ReqTimer>,
    lease: Option<Lease>,
}

impl<F: ChunkFormat> GenFrames<F> {
    fn fail(&mut self, e: ApiError) {
        tracing::warn!(error = %e.message, "generation failed after the stream started");
        self.outcome = (e.status.as_u16(), e.code);
        self.queue.push_back(e.sse_frame());
        self.done = true;
    }
}

impl<F: ChunkFormat + Unpin> Stream for GenFrames<F> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(b)));
            }
            if this.done {
                // Release the model as soon as the last frame is out.
                this.generation = None;
                this.lease = None;
                if let Some(t) = this.timer.take() {
                    t.finish(this.outcome.0, this.outcome.1);
                }
                return Poll::Ready(None);
            }
            let Some(generation) = this.generation.as_mut() else {
                this.done = true;
                continue;
            };
            match generation.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(GenerateEvent::Delta(t)))) => {
                    if !t.is_empty() {
                        let b = this.fmt.delta(t);
                        this.queue.push_back(b);
                    }
                }
                Poll::Ready(Some(Ok(GenerateEvent::Done { finish_reason, usage }))) => {
                    this.fmt.finish(finish_reason, usage, &mut this.queue);
                    this.queue.push_back(Bytes::from_static(DONE_FRAME));
                    this.done = true;
                }
                Poll::Ready(Some(Err(e))) => this.fail(ApiError::from(e)),
                Poll::Ready(None) => this.fail(ApiError::new(
                    warp::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "inference_failed",
                    "the backend ended the generation without a finish reason",
                )),
            }
        }
    }
}

/// The SSE reply for `generation`, holding `lease` until the stream ends or is dropped.
pub(crate) fn sse_response<F: ChunkFormat + Unpin>(
    generation: GenerateStream,
    lease: Lease,
    mut fmt: F,
    timer: ReqTimer,
) -> Response {
    let mut queue = VecDeque::with_capacity(4);
    fmt.start(&mut queue);
    let frames = GenFrames {
        generation: Some(generation),
        queue,
        fmt,
        done: false,
        outcome: (200, None),
        timer: Some(timer),
        lease: Some(lease),
    };
    let mut res = warp::reply::stream(sync_wrapper::SyncStream::new(frames)).into_response();
    let h = res.headers_mut();
    h.insert(warp::http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(warp::http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}
