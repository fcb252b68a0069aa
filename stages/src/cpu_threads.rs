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
//!
//! candle's matrix product also asks how many threads to split over on every call: the value of
//! `RAYON_NUM_THREADS`, else the physical core count, which `num_cpus` finds by reading and
//! parsing `/proc/cpuinfo` — each time. Across the demo's thousands of small products that was
//! 8.7% of all its CPU samples (`perf record` of a shortened demo run, 2026-12-08), most of it
//! system time. So when the user has not set `RAYON_NUM_THREADS`, sdpipe sets it to the count
//! rayon's global pool uses by default (`std::thread::available_parallelism`): that pool stays
//! the same size, and candle's products read one variable instead of a file. The count is only
//! how many pieces `gemm` splits a product's output into on the pool it runs on (a stage's own
//! pool of its granted threads), never its sums, so results are unchanged.

/// Turns candle's own CPU worker pool off (`CANDLE_NUM_THREADS=1`) and gives its products a
/// thread count without reading `/proc/cpuinfo` (`RAYON_NUM_THREADS`, see the module docs),
/// each unless the user set that variable. [`crate::process::set_up`] calls it at the start of
/// `main`, before any thread exists (it sets environment variables, which stage processes
/// inherit).
pub fn keep_candle_within_granted_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}
