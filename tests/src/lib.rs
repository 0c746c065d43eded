//! `outpost-tests`: end-to-end tests of Outpost as a user meets it.
//!
//! Everything lives in the `e2e` test binary (`tests/e2e/`): the real `outpost` binary run as
//! a process against temp data directories, real GGUF files (built in code, and the demo
//! models fetched by `scripts/fetch-models.py`), real mounts for full and read-only disks,
//! and `kill -9` at random instants. Build the binaries first (`scripts/test` does).
