//! modelpool-sim: replays request traces through modelpool's own decision core
//! ([`modelpool::PoolState`]) with virtual time, to choose a memory limit and an eviction policy
//! before deploying.
//!
//! - [`trace`]: the CSV/JSONL trace format and its fast parser.
//! - [`generate`]: the seeded synthetic trace generator.
//! - [`config`]: what a replay is configured with (policy choice, timing model, limits).
//! - [`replay`]: the discrete-event replay.
//! - [`oracle`]: offline baselines (Belady, size-and-cost-aware Belady).
//! - [`report`]: the report (text and JSON).
//! - [`sweep`]: memory limits x policies, CSV and SVG output, recommendation.
//! - [`drive`]: replay a trace against a running server over HTTP and compare with the
//!   simulator's prediction.
//! - [`space`]: keep a trace's events apart in time, so a server decides what was predicted.
#![warn(missing_docs)]

mod chart;
pub mod config;
pub mod drive;
pub mod fleet;
pub mod generate;
pub mod oracle;
pub mod replay;
pub mod report;
pub mod space;
pub mod sweep;
pub mod trace;

pub use config::{Calibration, ModelTiming, PolicyChoice, SimConfig};
pub use replay::{Mark, Outcome, Recording, RequestOutcome, run, run_recorded};
pub use report::Report;
pub use trace::{Trace, TraceError};
