//! Who runs CPU work: the threads the scheduler grants each stage, and nothing else.
//!
//! candle 0.11's CPU backend runs its elementwise ops of 64 Ki elements or more on a worker pool
//! of its own, sized by `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`, else the physical core
//! count) whatever a stage was granted, and each worker spins for about 25 000 pauses after
//! every op before it sleeps. Beside a stage's rayon pool those workers take cores the scheduler
//! gave to that pool or to another stage: on 2 cores a mid-size UNet sampling step took 0.436 s
//! with candle's pool and 0.377 s without it (medians of 8, alternated; `bench_sample time`,
//! 2026-12-07). Without the pool the ops run on the calling thread; their results are the same
//! either way (each element is computed alone).

/// Turns candle's own CPU worker pool off (`CANDLE_NUM_THREADS=1`) unless the user set that
/// variable. Call at the start of `main`, before any thread exists (it sets an environment
/// variable, which candle reads once, and which stage processes inherit).
pub fn keep_candle_within_granted_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
