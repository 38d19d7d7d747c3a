//! The decision log: every admission outcome and every change of a model's state, as data.
//! Tests snapshot it, the simulator aggregates it, `/admin/pool/events` shows it.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::estimate::EstimateSource;
pub use crate::types::{EvictReason, RejectCode};
use crate::types::{ModelId, Nanos};

/// One decision or state change, as data.
///
/// Every variant carries `at`, the driver's clock when it happened (see [`Nanos`]), and all but
/// `LimitChanged` carry `model`, the model it concerns; the other fields are documented on the
/// variant. Wire form: a JSON object tagged by `"event"` (snake case), as the admin API and
/// snapshots show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)] // `at` and `model` are documented once, above.
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A request found the model resident.
    Hit { at: Nanos, model: ModelId },
    /// A request joined a load already in progress.
    Join { at: Nanos, model: ModelId },
    /// A load was admitted with this reservation.
    Load {
        at: Nanos,
        model: ModelId,
        /// Bytes reserved.
        estimate: u64,
        /// How the estimate was derived.
        source: EstimateSource,
        /// `Some(s)`: a predictive preload no request asked for
        /// ([`crate::PoolState::predictive_preload`]), because the policy expects the model's
        /// next request in `s` seconds. Absent for loads a request or an operator asked for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        predicted_in_secs: Option<f64>,
    },
    /// A load finished; the ledger now counts the measured size.
    Loaded {
        at: Nanos,
        model: ModelId,
        /// Bytes measured by the backend.
        measured: u64,
        /// Load duration in seconds.
        secs: f64,
    },
    /// A load failed; its reservation was released.
    LoadFailed {
        at: Nanos,
        model: ModelId,
        /// The backend's error.
        error: String,
    },
    /// A model was chosen to leave memory.
    Evict {
        at: Nanos,
        model: ModelId,
        /// Why it had to leave.
        reason: EvictReason,
        /// Bytes it held.
        bytes: u64,
        /// The policy's score for it, if the policy has one.
        score: Option<f64>,
        /// The model whose load needed the room, if any.
        for_model: Option<ModelId>,
    },
    /// A predictive preload still loading was cancelled because a real request needed its
    /// room (nobody waited on it); its reservation returns with its `unload` event.
    PreloadCancelled {
        at: Nanos,
        model: ModelId,
        /// Bytes its reservation held.
        bytes: u64,
        /// The model whose request needed the room.
        for_model: ModelId,
    },
    /// An admission was refused; nothing was evicted for it.
    Reject {
        at: Nanos,
        model: ModelId,
        /// Why it was refused (the HTTP error `code`).
        code: RejectCode,
        /// Bytes it needs.
        need: u64,
        /// Bytes that could be made available by evicting everything evictable.
        available: u64,
        /// Seconds after which a retry may succeed; `None` when waiting cannot help
        /// (`model_too_large`, every model slot pinned).
        retry_after_secs: Option<u32>,
    },
    /// A request entered the admission queue (waiting can help; see `state/queue.rs`). What it
    /// is admitted as later shows as its `hit`, `join`, `load` or `reject` event.
    Queued {
        at: Nanos,
        model: ModelId,
        /// Its ticket.
        ticket: u64,
    },
    /// A model's memory came back (after eviction or unload).
    Unload {
        at: Nanos,
        model: ModelId,
        /// Bytes released from the ledger.
        bytes: u64,
    },
    /// A model was pinned (never evicted).
    Pin { at: Nanos, model: ModelId },
    /// A model was unpinned.
    Unpin { at: Nanos, model: ModelId },
    /// The limits changed at run time.
    LimitChanged {
        at: Nanos,
        /// New memory limit in bytes.
        limit: u64,
        /// New maximum number of models.
        max_models: usize,
    },
}

impl Event {
    /// The model the event is about, if any.
    pub fn model(&self) -> Option<&ModelId> {
        match self {
            Event::Hit { model, .. }
            | Event::Join { model, .. }
            | Event::Load { model, .. }
            | Event::Loaded { model, .. }
            | Event::LoadFailed { model, .. }
            | Event::Evict { model, .. }
            | Event::PreloadCancelled { model, .. }
            | Event::Reject { model, .. }
            | Event::Unload { model, .. }
            | Event::Pin { model, .. }
            | Event::Unpin { model, .. }
            | Event::Queued { model, .. } => Some(model),
            Event::LimitChanged { .. } => None,
        }
    }
}

/// How much of the log to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogMode {
    /// Keep nothing (fastest; counters in [`crate::Stats`] are still kept).
    Off,
    /// Keep the last N events (the server's default).
    Ring(usize),
    /// Keep every event (tests, small simulations).
    Full,
    /// Keep every event except hits and joins (long simulations that need the decisions).
    Decisions,
}

/// The event store. Sequence numbers count every event recorded, kept or not.
#[derive(Debug, Clone)]
pub struct DecisionLog {
    mode: LogMode,
    events: VecDeque<Event>,
    total: u64,
}

impl DecisionLog {
    /// An empty log in `mode`.
    pub fn new(mode: LogMode) -> Self {
        DecisionLog { mode, events: VecDeque::new(), total: 0 }
    }

    /// Whether hit/join events are kept (callers skip building them otherwise).
    #[inline]
    pub fn wants_hits(&self) -> bool {
        matches!(self.mode, LogMode::Ring(_) | LogMode::Full)
    }

    /// Whether decisions (anything but hits and joins) are kept: when not, callers may skip
    /// work done only for the log.
    #[inline]
    pub fn keeps_decisions(&self) -> bool {
        self.mode != LogMode::Off
    }

    /// Record the event `make` builds, building it only if the mode keeps events (so a pool
    /// running with [`LogMode::Off`] pays nothing for its log). Counts it either way.
    #[inline(always)]
    pub fn push_with(&mut self, make: impl FnOnce() -> Event) {
        if self.mode == LogMode::Off {
            self.total += 1;
        } else {
            self.push_made(make);
        }
    }

    /// [`DecisionLog::push_with`]'s branch for a mode that keeps events, out of line so that
    /// the check alone is inlined into the engine's hot paths (building the event clones ids).
    #[inline(never)]
    fn push_made(&mut self, make: impl FnOnce() -> Event) {
        self.push(make());
    }

    /// Record `e` according to the mode.
    pub fn push(&mut self, e: Event) {
        self.total += 1;
        match self.mode {
            LogMode::Off => {}
            LogMode::Full | LogMode::Decisions => self.events.push_back(e),
            LogMode::Ring(cap) => {
                if cap == 0 {
                    return;
                }
                if self.events.len() == cap {
                    self.events.pop_front();
                }
                self.events.push_back(e);
            }
        }
    }

    /// Events kept, oldest first.
    pub fn events(&self) -> impl DoubleEndedIterator<Item = &Event> + ExactSizeIterator {
        self.events.iter()
    }

    /// The last `n` kept events, oldest first.
    pub fn last(&self, n: usize) -> Vec<Event> {
        let skip = self.events.len().saturating_sub(n);
        self.events.iter().skip(skip).cloned().collect()
    }

    /// The newest kept event, to complete it in place (the engine adds detail a generic call
    /// could not know).
    pub(crate) fn newest_mut(&mut self) -> Option<&mut Event> {
        self.events.back_mut()
    }

    /// Remove and return every kept event.
    pub fn drain(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Events recorded since creation, including those not kept.
    pub fn total(&self) -> u64 {
        self.total
    }
}
