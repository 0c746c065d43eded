//! The process-level calls that need `unsafe`, each justified here and nowhere else in the
//! workspace: the compute thread count, and giving freed heap memory back to the system.

/// Sets the number of threads inference will use (call before any thread exists).
///
/// The engine's kernels run on rayon's global pool, sized once from `RAYON_NUM_THREADS` the
/// first time a kernel runs. The only way to choose the count is to set that variable before then. `main` calls this
/// before any thread is spawned, so no other thread can be reading the environment.
#[allow(unsafe_code)]
pub fn set_compute_threads(n: usize) {
    // SAFETY: called from `main` before any thread is spawned (single-threaded process), so
    // nothing reads or writes the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string()) }
}

/// Returns the heap's free pages to the system (glibc's `malloc_trim`).
///
/// Loading a model frees megabytes of parsing scratch (the GGUF metadata, the vocabulary as
/// strings) that glibc keeps mapped between the long-lived tensors; on SmolLM2 that is
/// 7.5 MB of a daemon's resident memory. The daemon calls this after a model is loaded or
/// retired. Elsewhere (musl, other systems) it does nothing.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes a plain integer, is thread-safe (it takes each arena's
        // lock) and only releases pages no allocation uses.
        unsafe {
            malloc_trim(0);
        }
    }
}
