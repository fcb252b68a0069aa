//! How freed tensor memory goes back to the C heap: kept for the next step rather than handed
//! to the kernel and faulted in again.
//!
//! A network step allocates and frees the same few hundred buffers every time (activations,
//! unfolded convolution tiles, gradients), many of them megabytes. glibc's malloc serves a
//! request above its mmap threshold (128 KiB, raised dynamically to the largest freed mmapped
//! block, at most 32 MiB) with a fresh `mmap` and returns it with `munmap`, and gives the top of
//! its heap back to the kernel whenever more than its trim threshold (twice the mmap threshold)
//! is free there. Either way the next step's buffers are new pages, which the kernel zeroes on
//! first touch. Measured on 2 cores (AMD EPYC, 2026-12-08, alternated runs): a mid-size UNet
//! sampling step (`bench_sample time <mid> 10`, six runs each) took a median 0.468 s with
//! glibc's defaults and 0.433 s with both thresholds fixed, its system time 1.3–1.5 s per run
//! against 0.45 s (page faults were 7% of its `perf` samples). A mid training step
//! (`train_bench mid plain 3 2`, three runs each) stayed within the noise, 0.43–0.50 s either
//! way, peak RSS 494–509 MiB with the defaults and 492–493 MiB fixed. Peak memory does not
//! grow: what is retained is what the step had in use at its peak anyway.
//!
//! The thresholds are fixed high enough for every per-step buffer of the networks sdpipe runs
//! (at SD1.5's size the largest are about 100 MiB: the Winograd-transformed kernels of its
//! 1280-channel convolutions; their weight gradients are 59 MiB), and low enough that a freed
//! heap larger than [`TRIM_THRESHOLD`] still shrinks.

/// Requests at least this large still get their own `mmap`: model weights loaded whole.
pub const MMAP_THRESHOLD: usize = 256 << 20;

/// Free memory at the top of the heap kept for reuse before it is given back to the kernel.
pub const TRIM_THRESHOLD: usize = 1 << 30;

/// The variables through which a user sets glibc's malloc parameters themselves; any of them set
/// leaves the allocator as the user configured it.
const USER_SETTINGS: [&str; 3] =
    ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"];

/// Fixes glibc's mmap and trim thresholds (see the module docs) unless the user set malloc
/// parameters through the environment; [`crate::process::set_up`] calls it at the start of
/// `main`, before other threads allocate. Returns whether the thresholds were set; elsewhere
/// than glibc it does nothing.
pub fn reuse_freed_memory() -> bool {
    if USER_SETTINGS.iter().any(|name| std::env::var_os(name).is_some()) {
        return false;
    }
    set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> bool {
    let to_int = |bytes: usize| libc::c_int::try_from(bytes).expect("threshold fits a C int");
    // SAFETY: mallopt only changes the allocator's parameters; glibc takes its own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, to_int(MMAP_THRESHOLD)) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, to_int(TRIM_THRESHOLD)) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn glibc_accepts_both_thresholds() {
        assert!(set_thresholds());
    }
}
