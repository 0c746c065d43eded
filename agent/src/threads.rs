//! The compute thread count, and the one justified use of `unsafe` in the workspace.
//!
//! candle sizes its thread pool once, from `RAYON_NUM_THREADS`, the first time a kernel runs.
//! The only way to choose the count is to set that variable before then. `main` calls this
//! before any thread is spawned, so no other thread can be reading the environment.

/// Sets the number of threads inference will use (call before any thread exists).
#[allow(unsafe_code)]
pub fn set_compute_threads(n: usize) {
    // SAFETY: called from `main` before any thread is spawned (single-threaded process), so
    // nothing reads or writes the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string()) }
}
