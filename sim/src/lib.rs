//! modelpool-sim: replays request traces through modelpool's own decision core
//! ([`modelpool::PoolState`]) with virtual time, to choose a memory limit and an eviction policy
//! before deploying.
//!
//! - [`trace`]: the CSV/JSONL trace format and its fast parser.
//! - [`generate`]: the seeded synthetic trace generator.
//! - [`replay`]: the discrete-event replay and its configuration.
//! - [`oracle`]: offline baselines (Belady, size-and-cost-aware Belady).
//! - [`report`]: the report (text and JSON).
//! - [`sweep`]: memory limits x policies, CSV and SVG output, recommendation.
#![warn(missing_docs)]

pub mod generate;
pub mod oracle;
pub mod replay;
pub mod report;
pub mod sweep;
pub mod trace;

pub use replay::{Outcome, PolicyChoice, SimConfig, run};
pub use report::Report;
pub use trace::{Trace, TraceError};
