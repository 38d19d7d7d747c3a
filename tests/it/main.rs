//! One integration-test binary (links the crate once). Each module is a group of behaviours.

mod classic;
mod common;
mod engine;
mod estimate;
mod fuzz;
mod hints;
mod http;
mod invariants;
mod kv;
mod pool;
mod preload;
mod queue;
mod snapshots;
mod soak;
