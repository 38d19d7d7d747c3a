//! Integration tests of the simulator (one binary, one link of the crate).

mod alloc;
mod behaviour;
mod cli;
mod common;
mod crosscheck;
mod determinism;
mod drive;
mod fleet;
mod fuzz;
mod instant;
mod predictive;
mod snapshots;
