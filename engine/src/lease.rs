//! A model loaded from the registry, holding its blob.
//!
//! [`ModelLease::load`] takes a shared `flock` on the blob *before* reading it and keeps it
//! for as long as the lease lives, so `remove` and `gc` (which delete only a blob they can
//! lock exclusively) never delete a file a loaded model came from. Dropping the lease frees
//! the model and releases the lock. Every caller that runs a registered model (the daemon,
//! `outpost generate`, `outpost bench`) loads it this way.

use std::fs::File;

use crate::registry::{BlobStore, ModelRecord};
use crate::{EngineError, LoadOptions, LoadedModel};

/// A loaded model, the registry entry it came from, and the shared lock on its blob.
#[derive(Debug)]
pub struct ModelLease {
    pub model: LoadedModel,
    pub record: ModelRecord,
    /// The blob, opened with a shared lock: released when the lease is dropped.
    _lock: File,
}

impl ModelLease {
    /// Locks `record`'s blob in `blobs` (shared), then loads it with `opts`.
    pub fn load(
        blobs: &BlobStore,
        record: ModelRecord,
        opts: &LoadOptions,
    ) -> Result<Self, EngineError> {
        let lock = blobs.open_shared(&record.sha256)?;
        let model = LoadedModel::load(&blobs.path_of(&record.sha256), opts)?;
        Ok(Self {
            model,
            record,
            _lock: lock,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn a_leased_blob_is_not_deleted_until_the_lease_ends() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("tiny.gguf");
        std::fs::write(&src, crate::testing::GgufBuilder::tiny_llama().build()).unwrap();
        let mut reg = Registry::open(&dir.path().join("data")).unwrap();
        let record = reg
            .import(&src, "tiny", None, &mut |_| {})
            .unwrap()
            .record()
            .clone();
        let lease = ModelLease::load(reg.blobs(), record.clone(), &LoadOptions::default()).unwrap();
        assert_eq!(lease.record.sha256, record.sha256);
        reg.remove(&"tiny".parse().unwrap(), true).unwrap();
        let gc = reg.gc().unwrap();
        assert_eq!(
            gc.blobs_in_use,
            std::slice::from_ref(&record.sha256),
            "held by the lease"
        );
        assert!(reg.blobs().contains(&record.sha256));
        drop(lease);
        let gc = reg.gc().unwrap();
        assert_eq!(gc.blobs_removed, std::slice::from_ref(&record.sha256));
        // A blob that is gone cannot be leased.
        let err = ModelLease::load(reg.blobs(), record, &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, EngineError::Registry(_)), "{err}");
    }
}
