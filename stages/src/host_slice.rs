//! Borrowing a CPU tensor's elements as a plain slice, for the hand-written CPU kernels of the
//! computing crates (sdpipe-unet's and sdpipe-conv's, the metric networks', the optimiser's),
//! which run on slices; [`crate::device_path`] decides when they run.

use candle_core::{Result, Storage, Tensor, WithDType};

/// Runs `f` on the elements of a CPU tensor of element type `T`, in row-major order (copied
/// only if the tensor is not contiguous). Another dtype or device is an error.
pub fn with_slice<T: WithDType, R>(x: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    if x.dtype() != T::DTYPE {
        candle_core::bail!("expected an {:?} tensor, got {:?}", T::DTYPE, x.dtype())
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { candle_core::bail!("expected a CPU tensor") };
    let data = cpu.as_slice::<T>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("tensor not contiguous".into()))?;
    Ok(f(&data[start..end]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_transposed_tensor_is_read_in_row_major_order() {
        let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap().t().unwrap();
        assert_eq!(with_slice::<f32, _>(&x, |s| s.to_vec()).unwrap(), vec![1.0, 3.0, 2.0, 4.0]);
    }

    #[test]
    fn another_dtype_is_an_error_naming_both() {
        let x = Tensor::new(&[1f64], &Device::Cpu).unwrap();
        let err = with_slice::<f32, _>(&x, |_| ()).unwrap_err().to_string();
        assert!(err.contains("F32") && err.contains("F64"), "{err}");
    }
}
