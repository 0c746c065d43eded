//! `outpost-sync`: the device's link to the cloud over MQTT.
//!
//! Owns (as the sync issue lands): the versioned protocol (`protocol`, the only place topic
//! strings are built), the connection (only `conn.rs` knows rumqttc), the durable outbox in
//! `outbox.db`, chunked blob transfer with resume, the device sync loop and the `outpost-hub`.
//!
//! Built so far: [`protocol`] (topics, messages, the size-capped decoder, audit batches),
//! [`outbox`] (`outbox.db`: the audit upload cursor, the telemetry queue, the link's status)
//! [`conn`] (the broker link: rumqttc over rustls, reconnects, size checks, events) and the
//! first slice of [`hub`] (PKI, enrollment, broker configuration, `hub.db`) behind the
//! `outpost-hub` binary, and [`device`], the daemon's sync loop (audit upload with acks,
//! reported state, telemetry, verified desired states), and [`release`]: signed model
//! manifests and desired states (sync part 2; `hub::rollout` publishes and signs them), and
//! [`apply`]: the device's state in the rollout it follows and its health-gated activation, and
//! [`transfer`]: the resumable chunked download of a model blob, handed to the agent's
//! installer (`device::DeviceSource::install`).
//!
//! Invariant: this crate never depends on `outpost-engine`; it installs models through a
//! small trait that the agent implements over the registry.

pub mod apply;
pub mod conn;
pub mod device;
pub mod hub;
pub mod outbox;
pub mod protocol;
pub mod release;
pub mod transfer;

pub use conn::ConnError;
pub use outbox::{Outbox, OutboxError, OutboxStatus};
pub use protocol::ProtocolError;

/// Any error of this crate, for the sync loop that meets them all.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Conn(#[from] ConnError),
}
