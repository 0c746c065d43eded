//! End-to-end tests: one binary, one `support` harness. See the crate docs.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod architecture;
mod brokers;
mod cli;
mod daemon;
mod durability;
mod faults;
mod fleet;
mod golden;
mod inference;
mod models;
mod package;
mod policy;
mod scale;
mod support;
mod sync;
