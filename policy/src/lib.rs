//! `outpost-policy`: who may do what, and the record of every decision.
//!
//! - [`identity`]: JWT verification against pinned keys (the only home of `jsonwebtoken`).
//! - [`rbac`]: actions, roles and decisions, deny by default; custom roles from a policy file.
//! - [`audit`]: the hash-chained audit log in `audit.db`, its signed checkpoints,
//!   verification, queries and exports.
//! - [`signing`]: Ed25519 keys and signatures (the only home of `ed25519-dalek`).
//! - [`jcs`]: RFC 8785 canonical JSON, which hashes and signatures are computed over.
//! - [`time`]: the trusted clock (a persisted floor under the system clock).
//! - [`revocation`]: revoked token ids and subjects.
//!
//! Invariant: this crate knows nothing of HTTP or MQTT and depends on no network crate
//! (`outpost-tests` checks it with `cargo metadata`). It is synchronous; the audit log's
//! writer is an OS thread.

pub mod audit;
pub mod identity;
pub mod jcs;
pub mod rbac;
pub mod revocation;
pub mod signing;
pub mod time;
