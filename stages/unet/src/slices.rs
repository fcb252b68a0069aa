//! Borrowing a CPU tensor's elements as a slice, for the kernels that run on plain slices
//! (`sdpipe-conv`, the pointwise ops).

use candle_core::{Result, Storage, Tensor, WithDType};

/// Runs `f` on the elements of a CPU tensor of element type `T`, in row-major order (copied
/// only if the tensor is not contiguous).
pub fn with_slice<T: WithDType, R>(x: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { candle_core::bail!("expected a CPU tensor") };
    let data = cpu.as_slice::<T>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("tensor not contiguous".into()))?;
    Ok(f(&data[start..end]))
}
