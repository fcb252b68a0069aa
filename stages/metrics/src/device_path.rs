//! Which implementation an op of the metric networks runs: the hand-written CPU kernels (the
//! fast path: [`crate::conv`]'s gemm convolution, [`crate::pool`]'s parallel max pool, LPIPS'
//! scaling layer and heads on slices), or the generic path built from candle's own ops, which
//! have kernels on every device candle supports (CUDA included).
//!
//! Every such choice goes through [`use_cpu_kernels`]. Tests force the generic path on the CPU
//! with [`force_generic_path`] to check it against the fast path on a machine without a GPU, and
//! loop over [`test_devices`] to run it on a GPU where there is one.

use std::cell::Cell;
use std::marker::PhantomData;

use candle_core::{Device, Tensor};

thread_local! {
    /// How many [`GenericPath`] guards are alive on this thread (guards nest).
    static FORCED: Cell<usize> = const { Cell::new(0) };
}

/// Whether an op on `t` runs the CPU fast path: `t` is on the CPU and the generic path is not
/// forced on this thread.
///
/// The flag is per thread, so call this on the thread that called the network, before the work
/// is split across rayon's pool (whose threads do not see the caller's flag).
pub fn use_cpu_kernels(t: &Tensor) -> bool {
    t.device().is_cpu() && !forced_generic()
}

/// Whether the generic path is forced on this thread.
pub fn forced_generic() -> bool {
    FORCED.with(|f| f.get() > 0)
}

/// Forces the generic path on CPU tensors on this thread until the guard is dropped: for tests
/// (and benchmarks) that compare it with the CPU fast path. Under `ThreadPool::install` the
/// closure runs on a pool thread, so take the guard inside the closure.
#[must_use = "the generic path is forced only while the guard lives"]
pub fn force_generic_path() -> GenericPath {
    FORCED.with(|f| f.set(f.get() + 1));
    GenericPath { _this_thread: PhantomData }
}

/// Guard of [`force_generic_path`]; not `Send`, as it must be dropped on the thread whose flag
/// it set.
#[derive(Debug)]
pub struct GenericPath {
    _this_thread: PhantomData<*const ()>,
}

impl Drop for GenericPath {
    fn drop(&mut self) {
        FORCED.with(|f| f.set(f.get().saturating_sub(1)));
    }
}

/// For tests: the devices to run a network on here. The CPU, plus CUDA device 0 when candle
/// was built with CUDA (the `cuda` feature) and a GPU opens; on the CPU, force the generic path
/// with [`force_generic_path`] to test it.
pub fn test_devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    if candle_core::utils::cuda_is_available() {
        if let Ok(cuda) = Device::new_cuda(0) {
            devices.push(cuda);
        }
    }
    devices
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_tensor() -> Tensor {
        Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn the_guard_forces_the_generic_path_until_dropped() {
        let t = cpu_tensor();
        assert!(use_cpu_kernels(&t));
        let outer = force_generic_path();
        let inner = force_generic_path();
        assert!(!use_cpu_kernels(&t));
        drop(inner);
        assert!(!use_cpu_kernels(&t), "the outer guard still forces it");
        drop(outer);
        assert!(use_cpu_kernels(&t));
    }

    #[test]
    fn forcing_is_seen_only_by_the_thread_that_forced_it() {
        let _generic = force_generic_path();
        let elsewhere = std::thread::spawn(|| use_cpu_kernels(&cpu_tensor())).join().unwrap();
        assert!(elsewhere);
        assert!(!use_cpu_kernels(&cpu_tensor()));
    }

    #[test]
    fn the_cpu_is_always_a_test_device() {
        assert!(test_devices()[0].is_cpu());
    }
}
