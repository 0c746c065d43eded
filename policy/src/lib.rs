//! `outpost-policy`: who may do what, and the record of every decision.
//!
//! Owns (as the policy issue lands): JWT identities and pinned key sets, roles and
//! permissions (deny by default), the hash-chained audit log in `audit.db` with signed
//! checkpoints, and Ed25519 signatures of manifests and policy documents.
//!
//! Invariant: this crate knows nothing of HTTP or MQTT and depends on no network crate
//! (`outpost-tests` checks it with `cargo metadata`).
