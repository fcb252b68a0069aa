//! What sdpipe sets for its whole process before any thread exists, in one call, so that the
//! benchmark binaries run a stage's code exactly as `sdpipe run` does: candle kept within the
//! threads the scheduler grants ([`crate::cpu_threads`]) and freed memory kept for reuse
//! ([`crate::heap`]).

/// Call first thing in `main` (it sets environment variables and the allocator's parameters,
/// which only hold for threads and allocations that come after).
pub fn set_up() {
    crate::cpu_threads::keep_candle_within_granted_threads();
    crate::heap::reuse_freed_memory();
}
