//! LPIPS v0.1 as the `lpips` package computes it: a scaling layer, an ImageNet trunk (AlexNet,
//! or VGG16 as an option) tapped after five ReLUs, channel-wise unit normalisation of each tap,
//! squared difference, a learned non-negative 1×1 "linear" layer per tap, spatial mean, and the
//! sum over taps.
//!
//! Tensor names: the trunk keeps torchvision's names (`features.0.weight`, ...), the linear
//! layers lpips' (`lin0.model.1.weight`, ...), so converted published files load unchanged.

use candle_core::{Tensor, D};
use rayon::iter::{IntoParallelIterator, ParallelIterator};

use crate::recipe::Init;
use crate::weights::{TensorSpec, Weights};

/// The trunk network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    Alex,
    Vgg16,
}

impl Net {
    pub fn name(self) -> &'static str {
        match self {
            Net::Alex => "alex",
            Net::Vgg16 => "vgg",
        }
    }

    /// Channels of the five taps (the linear layers' widths).
    pub fn tap_channels(self) -> [usize; 5] {
        match self {
            Net::Alex => [64, 192, 384, 256, 256],
            Net::Vgg16 => [64, 128, 256, 512, 512],
        }
    }

    /// The trunk as a sequence of torchvision `features` layers, up to the last tap.
    fn layers(self) -> Vec<Layer> {
        use Layer::*;
        match self {
            // features: 0 conv 1 relu* 2 pool 3 conv 4 relu* 5 pool 6 conv 7 relu* 8 conv 9 relu*
            // 10 conv 11 relu*
            Net::Alex => vec![
                Conv { index: 0, c_in: 3, c_out: 64, k: 11, stride: 4, pad: 2, tap: true },
                MaxPool { k: 3, stride: 2 },
                Conv { index: 3, c_in: 64, c_out: 192, k: 5, stride: 1, pad: 2, tap: true },
                MaxPool { k: 3, stride: 2 },
                Conv { index: 6, c_in: 192, c_out: 384, k: 3, stride: 1, pad: 1, tap: true },
                Conv { index: 8, c_in: 384, c_out: 256, k: 3, stride: 1, pad: 1, tap: true },
                Conv { index: 10, c_in: 256, c_out: 256, k: 3, stride: 1, pad: 1, tap: true },
            ],
            // Taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (features 3, 8, 15, 22, 29).
            Net::Vgg16 => {
                let mut v = Vec::new();
                let stages: [(&[usize], usize, usize); 5] = [
                    (&[0, 2], 3, 64),
                    (&[5, 7], 64, 128),
                    (&[10, 12, 14], 128, 256),
                    (&[17, 19, 21], 256, 512),
                    (&[24, 26, 28], 512, 512),
                ];
                for (s, (indices, c_in, c_out)) in stages.into_iter().enumerate() {
                    if s > 0 {
                        v.push(MaxPool { k: 2, stride: 2 });
                    }
                    for (j, &index) in indices.iter().enumerate() {
                        let c_in = if j == 0 { c_in } else { c_out };
                        let tap = j == indices.len() - 1;
                        v.push(Conv { index, c_in, c_out, k: 3, stride: 1, pad: 1, tap });
                    }
                }
                v
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Layer {
    /// `features.{index}` conv with bias, followed by ReLU; `tap`: its output is a feature.
    Conv {
        index: usize,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        tap: bool,
    },
    MaxPool {
        k: usize,
        stride: usize,
    },
}

/// The trunk's tensors (torchvision names).
pub fn trunk_specs(net: Net) -> Vec<TensorSpec> {
    let mut specs = Vec::new();
    for layer in net.layers() {
        if let Layer::Conv { index, c_in, c_out, k, .. } = layer {
            specs.push(TensorSpec::new(
                format!("features.{index}.weight"),
                &[c_out, c_in, k, k],
                Init::Conv { fan_in: c_in * k * k },
            ));
            specs.push(TensorSpec::new(format!("features.{index}.bias"), &[c_out], Init::Bias));
        }
    }
    specs
}

/// The five linear layers' tensors (lpips names).
pub fn lin_specs(net: Net) -> Vec<TensorSpec> {
    net.tap_channels()
        .iter()
        .enumerate()
        .map(|(i, &c)| TensorSpec::new(format!("lin{i}.model.1.weight"), &[1, c, 1, 1], Init::Lin))
        .collect()
}

enum Op {
    Conv { weight: Tensor, bias: Tensor, stride: usize, pad: usize, tap: bool },
    MaxPool { k: usize, stride: usize },
}

/// The LPIPS network.
pub struct Lpips {
    pub net: Net,
    ops: Vec<Op>,
    lins: Vec<Tensor>,
    shift: Tensor,
    scale: Tensor,
}

impl Lpips {
    /// `weights` holds both [`trunk_specs`] and [`lin_specs`] tensors.
    pub fn new(net: Net, weights: &Weights) -> candle_core::Result<Lpips> {
        let mut ops = Vec::new();
        for layer in net.layers() {
            ops.push(match layer {
                Layer::Conv { index, c_out, stride, pad, tap, .. } => Op::Conv {
                    weight: weights.get(&format!("features.{index}.weight"))?.clone(),
                    bias: weights
                        .get(&format!("features.{index}.bias"))?
                        .reshape((1, c_out, 1, 1))?,
                    stride,
                    pad,
                    tap,
                },
                Layer::MaxPool { k, stride } => Op::MaxPool { k, stride },
            });
        }
        let lins = (0..5)
            .map(|i| weights.get(&format!("lin{i}.model.1.weight")).cloned())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let device = candle_core::Device::Cpu;
        // lpips' ScalingLayer constants, as f32 like torch.Tensor([...]).
        let shift = Tensor::new(&[-0.030f32, -0.088, -0.188], &device)?.reshape((1, 3, 1, 1))?;
        let scale = Tensor::new(&[0.458f32, 0.448, 0.450], &device)?.reshape((1, 3, 1, 1))?;
        Ok(Lpips { net, ops, lins, shift, scale })
    }

    /// The five tapped activations of a batch already in [-1, 1].
    fn taps(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let mut x = x.broadcast_sub(&self.shift)?.broadcast_div(&self.scale)?;
        let mut taps = Vec::with_capacity(5);
        for op in &self.ops {
            match op {
                Op::Conv { weight, bias, stride, pad, tap } => {
                    x = x.conv2d(weight, *pad, *stride, 1, 1)?.broadcast_add(bias)?.relu()?;
                    if *tap {
                        taps.push(x.clone());
                    }
                }
                Op::MaxPool { k, stride } => x = x.max_pool2d_with_stride(*k, *stride)?,
            }
        }
        Ok(taps)
    }

    /// LPIPS distance per pair of two batches `[B, 3, H, W]` in [-1, 1] of equal shape: `[B]`.
    ///
    /// The pairs are split into one share per thread of the current rayon pool, each share run
    /// on its own thread. candle parallelises its convolutions and matrix products but runs
    /// element-wise ops and reductions (bias, ReLU, pooling, the heads' normalisation and
    /// differences) on one thread; splitting by pairs keeps every thread busy through those
    /// too. Each pair's distance is computed the same way whatever share it lands in.
    pub fn distance(&self, x0: &Tensor, x1: &Tensor) -> candle_core::Result<Tensor> {
        self.distance_in_shares(x0, x1, rayon::current_num_threads())
    }

    /// [`Lpips::distance`] with the pairs split into (at most) `shares` shares run in parallel;
    /// 1 runs the whole batch as one (candle still parallelises its convolutions).
    pub fn distance_in_shares(
        &self,
        x0: &Tensor,
        x1: &Tensor,
        shares: usize,
    ) -> candle_core::Result<Tensor> {
        if x0.dims() != x1.dims() {
            candle_core::bail!(
                "LPIPS compares batches of one shape: {:?} vs {:?}",
                x0.dims(),
                x1.dims()
            )
        }
        let b = x0.dim(0)?;
        let shares = shares.min(b).max(1);
        if shares == 1 {
            return self.distance_one_thread(x0, x1);
        }
        let size = b.div_ceil(shares);
        let starts: Vec<usize> = (0..b).step_by(size).collect();
        let parts = starts
            .into_par_iter()
            .map(|start| {
                let len = size.min(b - start);
                self.distance_one_thread(&x0.narrow(0, start, len)?, &x1.narrow(0, start, len)?)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    /// [`Lpips::distance`] for one share of pairs.
    fn distance_one_thread(&self, x0: &Tensor, x1: &Tensor) -> candle_core::Result<Tensor> {
        let b = x0.dim(0)?;
        // One trunk pass over both halves.
        let taps = self.taps(&Tensor::cat(&[x0, x1], 0)?)?;
        let mut total: Option<Tensor> = None;
        for (tap, lin) in taps.iter().zip(&self.lins) {
            let f0 = normalize(&tap.narrow(0, 0, b)?)?;
            let f1 = normalize(&tap.narrow(0, b, b)?)?;
            let diff = (f0 - f1)?.sqr()?;
            let weighted = diff.conv2d(lin, 0, 1, 1, 1)?; // [B, 1, h, w]
            let layer = weighted.flatten_from(1)?.mean(D::Minus1)?;
            total = Some(match total {
                None => layer,
                Some(t) => (t + layer)?,
            });
        }
        total.ok_or_else(|| candle_core::Error::Msg("no taps".into()))
    }
}

/// lpips' `normalize_tensor`: f / (‖f‖₂ over channels + 1e-10).
fn normalize(f: &Tensor) -> candle_core::Result<Tensor> {
    let norm = f.sqr()?.sum_keepdim(1)?.sqrt()?;
    f.broadcast_div(&(norm + 1e-10)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random_alex() -> Lpips {
        let w = Weights::random(&trunk_specs(Net::Alex), 1)
            .merged(Weights::random(&lin_specs(Net::Alex), 2));
        Lpips::new(Net::Alex, &w).unwrap()
    }

    /// `n` deterministic 64×64 images in [-1, 1].
    fn batch(n: usize, seed: u64) -> Tensor {
        let values: Vec<f32> = (0..n * 3 * 64 * 64)
            .map(|i| (i as f32 * 0.37 + seed as f32 * 1.3).sin() * 0.9)
            .collect();
        Tensor::from_vec(values, (n, 3, 64, 64), &Device::Cpu).unwrap()
    }

    #[test]
    fn a_batch_split_across_threads_gives_each_pair_its_own_distance() {
        let model = random_alex();
        let (x0, x1) = (batch(5, 1), batch(5, 2));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let together: Vec<f32> =
            pool.install(|| model.distance(&x0, &x1)).unwrap().to_vec1().unwrap();
        assert_eq!(together.len(), 5);
        for (i, &d) in together.iter().enumerate() {
            let one = |x: &Tensor| x.narrow(0, i, 1).unwrap();
            let alone: Vec<f32> = model.distance(&one(&x0), &one(&x1)).unwrap().to_vec1().unwrap();
            assert!((d - alone[0]).abs() <= 1e-6 * alone[0].abs(), "pair {i}: {d} vs {}", alone[0]);
        }
    }

    #[test]
    fn batches_of_different_shapes_are_an_error() {
        let err = random_alex().distance(&batch(2, 1), &batch(3, 1));
        assert!(err.unwrap_err().to_string().contains("one shape"));
    }
}
