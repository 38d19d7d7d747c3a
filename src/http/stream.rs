//! Server-sent event streams of generations, framed by `warp::sse`.
//!
//! Framing (what OpenAI clients expect): an optional first chunk, one chunk per text piece, the
//! final chunk(s), then exactly one `data: [DONE]`. Every event is one `data: {json}` line and a
//! blank line. An error after the stream started is sent as one `data: {"error": ...}` event
//! and the stream ends without `[DONE]`, which OpenAI clients raise as an API error. After 15 s
//! without an event (a long prompt being read), a keep-alive comment line `:` is sent so
//! proxies do not time the connection out; SSE clients ignore comments.
//!
//! The stream owns the request's [`Lease`]: when the client disconnects, hyper drops the body,
//! which drops the generation first and then the lease, so the model is released at once.
//!
//! A streaming request that is still waiting for its model after
//! [`AppState::stream_wait_notice`](super::app::AppState) (queued for memory, or a load in
//! progress) gets its response at once ([`sse_waiting`]): status 200,
//! `x-modelpool-admission: waiting`, and a comment `: waiting for the model (N s)` every
//! notice period until it is admitted, then a comment `: admitted: <how>, waited <ms> ms` and the
//! chunks as usual. A refusal after that point (`queue_timeout`, a failed load) arrives as the
//! stream's error event, with the error's status recorded in the metrics. Dropping the stream
//! while it waits drops the pending acquire, which leaves the queue (cancel safe).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use futures::{Stream, TryStreamExt};
use serde::Serialize;
use warp::Reply;
use warp::http::HeaderValue;
use warp::reply::Response;
use warp::sse::Event;

use super::error::ApiError;
use super::timer::ReqTimer;
use crate::backend::{FinishReason, GenerateEvent, GenerateStream, Usage};
use crate::pool::Lease;

/// The bytes of the terminating event, sent exactly once per successful stream.
pub const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

/// An event whose data is `payload`, written `data: {payload}`.
///
/// warp writes `data:` with no space before the value. The SSE parser drops one leading space
/// from a value, so sending it with one gives the same event to every SSE client, and the
/// `data: ` lines OpenAI's API sends, which line-based client parsers match on.
fn data_event(payload: &str) -> Event {
    Event::default().data(format!(" {payload}"))
}

/// An event whose data is `v` as one line of JSON.
pub(crate) fn json_event<T: Serialize>(v: &T) -> Event {
    // Serializing our own plain structs cannot fail; compact JSON has no newline.
    data_event(&serde_json::to_string(v).unwrap_or_default())
}

/// Turns generation events into SSE events for one API shape (chat or completions).
pub(crate) trait ChunkFormat: Send + 'static {
    /// Events sent before the first piece (the chat role chunk, an echoed prompt).
    fn start(&mut self, out: &mut VecDeque<Event>);
    /// The event for one piece of text (never called with an empty piece).
    fn delta(&mut self, text: String) -> Event;
    /// The events after the last piece (finish reason, usage), without `[DONE]`.
    fn finish(&mut self, reason: FinishReason, usage: Usage, out: &mut VecDeque<Event>);
}

/// What a streaming request waits for before its first chunk: its generation and lease.
pub(crate) type Ready = Pin<Box<dyn Future<Output = Result<(GenerateStream, Lease), ApiError>> + Send>>;

/// A generation as a stream of SSE events. Field order matters: the generation is dropped
/// before the lease.
struct GenFrames<F: ChunkFormat> {
    /// While waiting for the model: the pending acquire, the notice timer, when it began.
    pending: Option<(Ready, tokio::time::Interval, Instant)>,
    generation: Option<GenerateStream>,
    queue: VecDeque<Event>,
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
        self.queue.push_back(data_event(&e.body()));
        self.done = true;
    }
}

impl<F: ChunkFormat + Unpin> Stream for GenFrames<F> {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(ev) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(ev)));
            }
            if let Some((ready, notice, since)) = this.pending.as_mut() {
                match ready.as_mut().poll(cx) {
                    Poll::Pending => {
                        if notice.poll_tick(cx).is_ready() {
                            let secs = since.elapsed().as_secs();
                            let ev = Event::default().comment(format!("waiting for the model ({secs} s)"));
                            return Poll::Ready(Some(Ok(ev)));
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok((generation, lease))) => {
                        this.pending = None;
                        let (how, ms) = (lease.admitted().as_str(), lease.waited().as_millis());
                        if let (Some(t), crate::pool::Admitted::Queued) = (&this.timer, lease.admitted()) {
                            t.observe_queue_wait(lease.waited());
                        }
                        this.queue
                            .push_back(Event::default().comment(format!("admitted: {how}, waited {ms} ms")));
                        this.fmt.start(&mut this.queue);
                        this.generation = Some(generation);
                        this.lease = Some(lease);
                    }
                    Poll::Ready(Err(e)) => {
                        this.pending = None;
                        this.fail(e);
                    }
                }
                continue;
            }
            if this.done {
                // Release the model as soon as the last event is out.
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
                        let ev = this.fmt.delta(t);
                        this.queue.push_back(ev);
                    }
                }
                Poll::Ready(Some(Ok(GenerateEvent::Done { finish_reason, usage }))) => {
                    this.fmt.finish(finish_reason, usage, &mut this.queue);
                    this.queue.push_back(data_event("[DONE]"));
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

/// The SSE reply for `generation`, holding `lease` until the stream ends or is dropped, and
/// finishing `timer` when it ends (a stream dropped early leaves it to record 499).
pub(crate) fn sse_response<F: ChunkFormat + Unpin>(
    generation: GenerateStream,
    lease: Lease,
    mut fmt: F,
    timer: ReqTimer,
) -> Response {
    let mut queue = VecDeque::with_capacity(4);
    fmt.start(&mut queue);
    let frames = GenFrames {
        pending: None,
        generation: Some(generation),
        queue,
        fmt,
        done: false,
        outcome: (200, None),
        timer: Some(timer),
        lease: Some(lease),
    };
    reply(frames)
}

/// The SSE reply for a request still waiting for its model (see the module docs): a comment
/// every `notice` until `ready` gives the generation and lease, then the chunks; an error from
/// `ready` is the stream's error event.
pub(crate) fn sse_waiting<F: ChunkFormat + Unpin>(
    ready: Ready,
    fmt: F,
    timer: ReqTimer,
    notice: Duration,
    waited: Duration,
) -> Response {
    let notice = notice.max(Duration::from_millis(10));
    let mut every = tokio::time::interval_at(Instant::now() + notice, notice);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let since = Instant::now() - waited;
    let frames = GenFrames {
        pending: Some((ready, every, since)),
        generation: None,
        queue: VecDeque::from([
            Event::default().comment(format!("waiting for the model ({} s)", waited.as_secs()))
        ]),
        fmt,
        done: false,
        outcome: (200, None),
        timer: Some(timer),
        lease: None,
    };
    let mut res = reply(frames);
    res.headers_mut().insert("x-modelpool-admission", HeaderValue::from_static("waiting"));
    res
}

fn reply<F: ChunkFormat + Unpin>(frames: GenFrames<F>) -> Response {
    // warp::sse::reply wants a Sync stream; the generation is only Send.
    let events = sync_wrapper::SyncStream::new(warp::sse::keep_alive().stream(frames).into_stream());
    let mut res = warp::sse::reply(events).into_response();
    // Tell nginx-style proxies not to buffer the stream (warp sets content-type and no-cache).
    res.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_data_line_as_openai_sends_them() {
        assert_eq!(data_event("[DONE]").to_string().as_bytes(), DONE_FRAME);
        let ev = json_event(&serde_json::json!({"text": "two\nlines"}));
        assert_eq!(ev.to_string(), "data: {\"text\":\"two\\nlines\"}\n\n");
    }
}
