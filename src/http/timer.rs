//! Per-request timing: every handler starts a [`ReqTimer`], which records the request's latency
//! and status in [`Metrics`] and writes its log line exactly once, when finished or dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use warp::reply::Response;

use super::app::AppState;
use super::error::ApiError;
use super::metrics::Metrics;

/// Times one request. [`ReqTimer::finish`] records the outcome and writes the log line; a timer
/// dropped unfinished (a client that went away mid-stream) records status 499 instead. Either
/// way the request is counted once: a streaming handler [hands the timer over](Self::hand_over)
/// to its stream, and the handler's own copy then records nothing.
pub(crate) struct ReqTimer {
    metrics: Arc<Metrics>,
    route: &'static str,
    start: Instant,
    model: Option<String>,
    stream: bool,
    /// Time spent getting the model (0 for a hit, the load time for a cold start).
    acquire: Duration,
    /// How the pool admitted the request and how long it waited, for `x-modelpool-admission`.
    admitted: Option<(&'static str, Duration)>,
    finished: bool,
}

impl ReqTimer {
    /// Start timing a request to `route` (the metrics label).
    pub(crate) fn start(state: &AppState, route: &'static str) -> Self {
        ReqTimer {
            metrics: state.metrics.clone(),
            route,
            start: Instant::now(),
            model: None,
            stream: false,
            acquire: Duration::ZERO,
            admitted: None,
            finished: false,
        }
    }

    /// Name the model in the log line.
    pub(crate) fn set_model(&mut self, model: &str) {
        self.model = Some(model.to_string());
    }

    /// Mark the request as streaming in the log line.
    pub(crate) fn set_stream(&mut self, stream: bool) {
        self.stream = stream;
    }

    /// Note how long getting the model took.
    pub(crate) fn set_acquire(&mut self, took: Duration) {
        self.acquire = took;
    }

    /// Note how the pool admitted the request (`hit`, `join`, `load`, `queued`) and its wait:
    /// the reply carries them as `x-modelpool-admission` and `x-modelpool-wait-ms`.
    pub(crate) fn set_admitted(&mut self, how: &'static str, waited: Duration) {
        self.admitted = Some((how, waited));
        if how == "queued" {
            self.metrics.observe_queue_wait(waited);
        }
    }

    /// Record a queue wait learnt after the timer was handed to a stream.
    pub(crate) fn observe_queue_wait(&self, waited: Duration) {
        self.metrics.observe_queue_wait(waited);
    }

    /// Move the timing into a new timer (for a stream to finish when it ends); this one is then
    /// done and records nothing.
    pub(crate) fn hand_over(&mut self) -> ReqTimer {
        self.finished = true;
        ReqTimer { model: self.model.take(), metrics: self.metrics.clone(), finished: false, ..*self }
    }

    /// Record the outcome and log the request line (nothing if the timer was handed over).
    pub(crate) fn finish(mut self, status: u16, code: Option<&'static str>) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.record(status, code);
    }

    fn record(&self, status: u16, code: Option<&'static str>) {
        let elapsed = self.start.elapsed();
        self.metrics.record(self.route, status, elapsed);
        let (route, model, stream) = (self.route, self.model.as_deref().unwrap_or("-"), self.stream);
        let micros = elapsed.as_micros() as u64;
        let acquire_micros = self.acquire.as_micros() as u64;
        let code = code.unwrap_or("-");
        if status == 499 {
            tracing::info!(
                route,
                model,
                status,
                micros,
                acquire_micros,
                stream,
                "request ended: client disconnected"
            );
        } else if status >= 500 {
            tracing::warn!(route, model, status, code, micros, acquire_micros, stream, "request");
        } else {
            tracing::info!(route, model, status, code, micros, acquire_micros, stream, "request");
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

/// Build the reply for `res` and finish `timer` with its status (unless the handler handed the
/// timer to a stream, which finishes it when the stream ends).
pub(crate) fn respond(timer: ReqTimer, res: Result<Response, ApiError>) -> Response {
    let (resp, code) = match res {
        Ok(mut r) => {
            if let Some((how, waited)) = timer.admitted {
                let h = r.headers_mut();
                h.insert("x-modelpool-admission", warp::http::HeaderValue::from_static(how));
                h.insert("x-modelpool-wait-ms", warp::http::HeaderValue::from(waited.as_millis() as u64));
            }
            (r, None)
        }
        Err(e) => {
            let code = e.code;
            (e.into_response(), code)
        }
    };
    timer.finish(resp.status().as_u16(), code);
    resp
}
