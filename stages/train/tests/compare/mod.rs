//! Reading reference tensors and comparing with them: what the parity tests share.

use candle_core::{DType, Tensor};
use sdpipe_train::objective::{NoiseSchedule, ScheduleConfig};

pub fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

pub fn scalar(t: &Tensor) -> f64 {
    values(t)[0] as f64
}

/// Integral timesteps stored as a tensor.
pub fn timesteps(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// Largest |a − b| over the elements, after checking the shapes agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    values(a).iter().zip(values(b)).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max)
}

pub fn assert_close(name: &str, got: f64, want: f64, relative: f64) {
    let tolerance = relative * want.abs().max(1e-6 / relative);
    assert!((got - want).abs() <= tolerance, "{name}: {got} vs {want}");
}

/// The reference scripts' SD 1.x `DDPMScheduler`.
pub fn sd15_schedule() -> NoiseSchedule {
    NoiseSchedule::new(&ScheduleConfig::sd15()).unwrap()
}
