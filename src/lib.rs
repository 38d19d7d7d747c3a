//! modelpool: keeps several ML models hot in one process, evicts by a pluggable policy under a
//! memory limit, and serves them over an OpenAI-compatible API.
//!
//! Layers, from the inside out:
//! - [`PoolState`]: the synchronous decision core (ledger, admission, policy, estimator, log).
//!   The simulator (`sim/`) drives it with virtual time.
//! - [`ModelPool`]: the async pool over a [`backend::Backend`], with leases and single-flight
//!   loads. No lock is held across a backend call.
//! - `http`: the warp server (OpenAI API + admin), the only place HTTP types live.
#![warn(missing_docs)]

pub mod backend;
pub mod catalog;
pub mod config;
pub mod error;
pub mod estimate;
pub mod http;
pub mod limit;
pub mod log;
pub mod names;
pub mod policy;
pub mod pool;
pub mod state;
pub mod timing;
pub mod types;

pub use error::PoolError;
pub use estimate::{Estimate, EstimateSource, FileEstimator, Learned, NameEstimator, SizeEstimator};
pub use limit::{ByteSize, FixedMemory, MemoryLimit, SysinfoMemory, SystemMemory};
pub use log::{DecisionLog, Event, EvictReason, LogMode, RejectCode};
pub use policy::{EvictionPolicy, Gdsf, Lfu, Lru, PolicyKind, Predictive, Slot};
pub use pool::{Lease, ModelPool};
pub use state::{
    Admission, AdmissionView, Decision, Evicted, Intent, Ledger, LoadPlan, ModelStatus, Phase, PoolConfig,
    PoolState, Rejection, Served, Stats, Ticket, Wake,
};
pub use timing::TimingModel;
pub use types::{GB, ModelId, ModelSpec, ModelType, Nanos};
