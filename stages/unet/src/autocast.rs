//! Autocast: the half-precision compute of diffusers' `--mixed_precision fp16 | bf16`, as
//! `torch.autocast` gives it to a model whose weights stay f32.
//!
//! torch's autocast decides per op. sdpipe's layers follow its lists for the ops a UNet has:
//!
//! - matrix products (linear layers with their LoRA adapters, convolutions, attention) cast
//!   their inputs and weights to the half type and return it;
//! - normalisations (group norm, layer norm) cast to f32 and return f32, as torch's
//!   `group_norm` and `layer_norm` are on its f32 list;
//! - elementwise ops (SiLU, GELU, additions) run in their inputs' type;
//! - attention's softmax is taken in f32 (as the fused half-precision attention kernels
//!   accumulate), its products in the half type;
//! - the model's output is cast back to f32, as the training script does with
//!   `model_pred.float()` before the loss.
//!
//! The casts are ops of the graph, so gradients flow back to the f32 weights in f32 (the
//! gradient of a cast is the cast back). What autocast saves is compute in the products on
//! hardware with fast half-precision units (a GPU's tensor cores), and the memory of the
//! activations kept for the backward; on a CPU candle's half-precision products are slower
//! than f32.
//!
//! One handle is shared by every layer of a model, so the setting is made once on the model
//! ([`crate::UNet::set_autocast`]) and read by each layer as it runs. Off (the default) every
//! op is exactly as without this module: no cast is made.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

/// The half type a model's products compute in, or none: shared by all of a model's layers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Autocast(Arc<AtomicU8>);

const OFF: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

impl Autocast {
    /// Sets the compute type: `Some(F16 | BF16)` turns autocast on, `None` off.
    pub(crate) fn set(&self, dtype: Option<DType>) -> Result<()> {
        let code = match dtype {
            None => OFF,
            Some(DType::F16) => F16,
            Some(DType::BF16) => BF16,
            Some(other) => candle_core::bail!("autocast computes in f16 or bf16, not {other:?}"),
        };
        self.0.store(code, Ordering::Relaxed);
        Ok(())
    }

    /// The half type products compute in, if autocast is on.
    pub(crate) fn dtype(&self) -> Option<DType> {
        match self.0.load(Ordering::Relaxed) {
            F16 => Some(DType::F16),
            BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// An input, weight or output of a matrix product, in the compute type.
    ///
    /// bf16 on the CPU is emulated: candle 0.11 has no bf16 matrix product or convolution
    /// there, so the values are rounded to bf16 and kept in f32, and the product accumulates in
    /// f32 over bf16 values, as a GPU's bf16 units do inside one. (The elementwise ops between
    /// products then run in f32 instead of bf16.)
    pub(crate) fn product(&self, t: &Tensor) -> Result<Tensor> {
        match self.dtype() {
            Some(DType::BF16) if t.device().is_cpu() => {
                t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
            }
            Some(dtype) => t.to_dtype(dtype),
            None => Ok(t.clone()),
        }
    }

    /// An input or parameter of a normalisation (or the model's output): f32 under autocast.
    pub(crate) fn full(&self, t: &Tensor) -> Result<Tensor> {
        match self.dtype() {
            Some(_) => t.to_dtype(DType::F32),
            None => Ok(t.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn off_leaves_tensors_as_they_are() {
        let autocast = Autocast::default();
        let t = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(autocast.product(&t).unwrap().dtype(), DType::F32);
        assert_eq!(autocast.full(&t.to_dtype(DType::F16).unwrap()).unwrap().dtype(), DType::F16);
    }

    #[test]
    fn on_casts_products_to_the_half_type_and_normalisations_to_f32() {
        let autocast = Autocast::default();
        let shared = autocast.clone();
        autocast.set(Some(DType::BF16)).unwrap();
        let t = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(shared.product(&t).unwrap().dtype(), DType::F32, "emulated on the CPU");
        assert_eq!(shared.full(&t.to_dtype(DType::BF16).unwrap()).unwrap().dtype(), DType::F32);
        autocast.set(Some(DType::F16)).unwrap();
        assert_eq!(shared.product(&t).unwrap().dtype(), DType::F16);
    }

    #[test]
    fn emulated_bf16_rounds_to_bf16_values() {
        let autocast = Autocast::default();
        autocast.set(Some(DType::BF16)).unwrap();
        // 1 + 2^-9 is not a bf16 value (8 significant bits): it rounds to 1.
        let t = Tensor::new(&[1.0f32 + 2f32.powi(-9), 3.0], &Device::Cpu).unwrap();
        assert_eq!(autocast.product(&t).unwrap().to_vec1::<f32>().unwrap(), [1.0, 3.0]);
    }

    #[test]
    fn only_half_types_are_accepted() {
        let error = Autocast::default().set(Some(DType::F64)).unwrap_err().to_string();
        assert!(error.contains("f16 or bf16"), "{error}");
    }
}
