//! Which implementation an op runs: a hand-written CPU kernel (sdpipe-unet's convolution,
//! activations and blocked attention; sdpipe-metrics' convolution, pooling and LPIPS heads), or
//! the generic path built from candle's tensor ops, which every candle device (CUDA included)
//! can run.
//!
//! The CPU kernels read host slices, so they serve CPU tensors only; every other tensor takes
//! the generic path, with the same forward and gradients up to float rounding.
//! [`use_cpu_kernels`] is the one place that decides, for every crate. [`force_generic_path`]
//! makes the CPU take the generic path too, so that tests and verification on a machine without
//! a GPU run the code a GPU would.

use std::cell::Cell;
use std::marker::PhantomData;

use candle_core::{Device, Tensor};

thread_local! {
    /// Set while a [`GenericPathGuard`] of this thread is alive.
    static FORCED_GENERIC: Cell<bool> = const { Cell::new(false) };
}

/// Whether an op on `t` runs its CPU kernel: `t` is on the CPU and the generic path is not
/// forced on this thread. (Each op also checks the dtypes its kernel takes.) The flag is per
/// thread: call this on the calling thread before work is split across rayon's pool.
pub fn use_cpu_kernels(t: &Tensor) -> bool {
    t.device().is_cpu() && !forced_generic()
}

/// Whether this thread is inside [`force_generic_path`].
pub fn forced_generic() -> bool {
    FORCED_GENERIC.with(Cell::get)
}

/// Makes ops on this thread take the generic path even for CPU tensors until the returned guard
/// is dropped: a switch for tests and verification, not for production (the CPU kernels are
/// faster). The choice is made when an op's forward runs, and its backward follows the same
/// path whenever it runs. Guards nest; dropping one restores the previous setting.
pub fn force_generic_path() -> GenericPathGuard {
    let previous = FORCED_GENERIC.with(|f| f.replace(true));
    GenericPathGuard { previous, _not_send: PhantomData }
}

/// Keeps [`force_generic_path`] in effect while alive. Not `Send`: the flag is per thread.
#[must_use = "the generic path is forced only while the guard is alive"]
pub struct GenericPathGuard {
    previous: bool,
    _not_send: PhantomData<*const ()>,
}

impl Drop for GenericPathGuard {
    fn drop(&mut self) {
        FORCED_GENERIC.with(|f| f.set(self.previous));
    }
}

/// The devices a test should run on: the CPU, plus CUDA device 0 when this build has candle's
/// CUDA backend (`--features cuda`) and a GPU opens. For tests that check the generic path on
/// real hardware where there is some.
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

    #[test]
    fn the_guard_forces_the_generic_path_on_its_thread_until_dropped() {
        let x = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(use_cpu_kernels(&x));
        {
            let _outer = force_generic_path();
            assert!(!use_cpu_kernels(&x));
            {
                let _inner = force_generic_path();
                assert!(!use_cpu_kernels(&x));
            }
            // The inner guard restores the outer one's setting, not the default.
            assert!(!use_cpu_kernels(&x));
            let other_thread = std::thread::spawn(move || use_cpu_kernels(&x)).join().unwrap();
            assert!(other_thread);
        }
        let x = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(use_cpu_kernels(&x));
    }

    #[test]
    fn the_test_devices_start_with_the_cpu() {
        assert!(test_devices()[0].is_cpu());
    }
}
