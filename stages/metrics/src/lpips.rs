//! LPIPS v0.1 as the `lpips` package computes it: a scaling layer, an ImageNet trunk (AlexNet,
//! or VGG16 as an option) tapped after five ReLUs, channel-wise unit normalisation of each tap,
//! squared difference, a learned non-negative 1×1 "linear" layer per tap, spatial mean, and the
//! sum over taps.
//!
//! Tensor names: the trunk keeps torchvision's names (`features.0.weight`, ...), the linear
//! layers lpips' (`lin0.model.1.weight`, ...), so converted published files load unchanged.
//!
//! The network runs on the device it was loaded on ([`Lpips::on_device`]). On the CPU the
//! scaling layer and the heads run on slices, the pairs split across the rayon pool; elsewhere
//! (or with the generic path forced, see [`crate::device_path`]) the same arithmetic runs as
//! candle's ops.

use candle_core::{DType, Device, Tensor, D};
use rayon::iter::{IndexedParallelIterator, IntoParallelIterator, ParallelIterator};
use rayon::slice::{ParallelSlice, ParallelSliceMut};

use crate::conv::ConvRelu;
use crate::device_path::use_cpu_kernels;
use crate::pool::max_pool2d;
use crate::recipe::Init;
use crate::weights::{TensorSpec, Weights};
use sdpipe_stages::host_slice::with_slice;

/// The trunk network (the `lpips` kind's `net` parameter, by [`Net::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Net {
    #[serde(rename = "alex")]
    Alex,
    #[serde(rename = "vgg")]
    Vgg16,
}

impl Net {
    /// Every [`Net::name`].
    pub const NAMES: &'static [&'static str] = &["alex", "vgg"];

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
    Conv { conv: ConvRelu, tap: bool },
    MaxPool { k: usize, stride: usize },
}

/// lpips' ScalingLayer constants (f32, as `torch.Tensor([...])` holds them).
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// The LPIPS network.
pub struct Lpips {
    pub net: Net,
    ops: Vec<Op>,
    /// The five linear layers' weights `[C]` f32, one per tap channel, on the network's device.
    lins: Vec<Tensor>,
    device: Device,
}

impl Lpips {
    /// The network on the CPU (see [`Lpips::on_device`]).
    pub fn new(net: Net, weights: &Weights) -> candle_core::Result<Lpips> {
        Lpips::on_device(net, weights, &Device::Cpu)
    }

    /// The network with its weights on `device`, where it then runs (inputs are moved there);
    /// `weights` holds both [`trunk_specs`] and [`lin_specs`] tensors.
    pub fn on_device(net: Net, weights: &Weights, device: &Device) -> candle_core::Result<Lpips> {
        let get = |name: String| weights.get(&name)?.to_device(device);
        let mut ops = Vec::new();
        for layer in net.layers() {
            ops.push(match layer {
                Layer::Conv { index, stride, pad, tap, .. } => Op::Conv {
                    conv: ConvRelu::new(
                        &get(format!("features.{index}.weight"))?,
                        &get(format!("features.{index}.bias"))?,
                        stride,
                        (pad, pad),
                    )?,
                    tap,
                },
                Layer::MaxPool { k, stride } => Op::MaxPool { k, stride },
            });
        }
        let lins = (0..5)
            .map(|i| get(format!("lin{i}.model.1.weight"))?.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Lpips { net, ops, lins, device: device.clone() })
    }

    /// The device the network runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The five tapped activations of a batch after the [`scaling_layer`].
    fn taps(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let mut x = x.clone();
        let mut taps = Vec::with_capacity(5);
        for op in &self.ops {
            match op {
                Op::Conv { conv, tap } => {
                    x = conv.forward(&x)?;
                    if *tap {
                        taps.push(x.clone());
                    }
                }
                Op::MaxPool { k, stride } => x = max_pool2d(&x, *k, *stride)?,
            }
        }
        Ok(taps)
    }

    /// LPIPS distance per pair of two batches `[B, 3, H, W]` in [-1, 1] of equal shape: `[B]`,
    /// on the network's device (the batches are moved there first).
    ///
    /// Both batches go through the trunk together (on the CPU the convolutions run the images
    /// in parallel on the current rayon pool), then the pairs' heads (on the CPU in parallel);
    /// each pair's distance is computed the same way whatever batch it is in.
    pub fn distance(&self, x0: &Tensor, x1: &Tensor) -> candle_core::Result<Tensor> {
        if x0.dims() != x1.dims() {
            candle_core::bail!(
                "LPIPS compares batches of one shape: {:?} vs {:?}",
                x0.dims(),
                x1.dims()
            )
        }
        let (x0, x1) = (x0.to_device(&self.device)?, x1.to_device(&self.device)?);
        let b = x0.dim(0)?;
        let taps = self.taps(&scaling_layer(&[&x0, &x1])?)?;
        for (tap, lin) in taps.iter().zip(&self.lins) {
            let c = tap.dim(1)?;
            if lin.dim(0)? != c {
                candle_core::bail!(
                    "LPIPS linear layer has {} weights for {c} channels",
                    lin.dim(0)?
                )
            }
        }
        // Decided here, on the calling thread, before the pairs are split across threads.
        if !use_cpu_kernels(&x0) {
            return heads_generic(&taps, &self.lins, b);
        }
        let mut total = vec![0f64; b];
        for (tap, lin) in taps.iter().zip(&self.lins) {
            let (_, c, h, w) = tap.dims4()?;
            let per_pair: Vec<f64> = with_slice::<f32, _>(lin, |lin| {
                with_slice::<f32, _>(tap, |f| {
                    let (f0, f1) = f.split_at(b * c * h * w);
                    (0..b)
                        .into_par_iter()
                        .map(|i| {
                            let image = i * c * h * w..(i + 1) * c * h * w;
                            tap_distance(&f0[image.clone()], &f1[image], lin, h * w)
                        })
                        .collect()
                })
            })??;
            for (t, d) in total.iter_mut().zip(per_pair) {
                *t += d;
            }
        }
        Tensor::from_vec(total.into_iter().map(|d| d as f32).collect(), b, x0.device())
    }
}

/// The heads of [`Lpips::distance`] from candle's ops (any device): [`tap_distance`]'s
/// arithmetic on whole taps `[2B, C, H, W]` (the first `B` images against the last `B`), the
/// spatial mean and the sum over taps in f64 as there. `lins`: `[C]` per tap.
fn heads_generic(taps: &[Tensor], lins: &[Tensor], b: usize) -> candle_core::Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (tap, lin) in taps.iter().zip(lins) {
        let (_, c, h, w) = tap.dims4()?;
        // normalize_tensor: each feature vector times 1/(‖f‖₂ + 1e-10) over the channels.
        let unit = |f: Tensor| -> candle_core::Result<Tensor> {
            let inverse_norm = (f.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-10)?.recip()?;
            f.broadcast_mul(&inverse_norm)
        };
        let d = (unit(tap.narrow(0, 0, b)?)? - unit(tap.narrow(0, b, b)?)?)?;
        // The 1×1 linear layer without bias: a weighted sum over channels, `[B, H, W]`.
        let weighted = d.sqr()?.broadcast_mul(&lin.reshape((1, c, 1, 1))?)?.sum(1)?;
        let mean =
            (weighted.to_dtype(DType::F64)?.flatten_from(1)?.sum(D::Minus1)? / (h * w) as f64)?;
        total = Some(match total {
            None => mean,
            Some(t) => (t + mean)?,
        });
    }
    match total {
        Some(t) => t.to_dtype(DType::F32),
        None => candle_core::bail!("LPIPS has no taps"),
    }
}

/// lpips' ScalingLayer, `(x − shift) / scale` per channel, of batches `[B, 3, H, W]` in
/// [-1, 1], concatenated into one batch (so the trunk runs them together, without copying them
/// into one first).
fn scaling_layer(batches: &[&Tensor]) -> candle_core::Result<Tensor> {
    let mut images = 0;
    for x in batches {
        let (b, c, _, _) = x.dims4()?;
        if c != 3 {
            candle_core::bail!("LPIPS takes 3-channel images, got {c} channels")
        }
        images += b;
    }
    let Some(first) = batches.first() else {
        candle_core::bail!("LPIPS scaling layer without a batch")
    };
    let (_, _, h, w) = first.dims4()?;
    let device = first.device();
    if use_cpu_kernels(first) {
        return scaling_layer_on_cpu(batches, images, (h, w), device);
    }
    // The same f32 arithmetic as candle's ops, on the batches' device.
    let shift = Tensor::from_slice(&SHIFT, (1, 3, 1, 1), device)?;
    let scale = Tensor::from_slice(&SCALE, (1, 3, 1, 1), device)?;
    let scaled = batches
        .iter()
        .map(|x| x.broadcast_sub(&shift)?.broadcast_div(&scale))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&scaled, 0)
}

/// [`scaling_layer`] on the CPU: the planes split across the rayon pool.
fn scaling_layer_on_cpu(
    batches: &[&Tensor],
    images: usize,
    (h, w): (usize, usize),
    device: &Device,
) -> candle_core::Result<Tensor> {
    let plane = h * w;
    let mut out = vec![0f32; images * 3 * plane];
    let mut rest = &mut out[..];
    for x in batches {
        let (part, tail) = rest.split_at_mut(x.elem_count());
        rest = tail;
        with_slice::<f32, _>(x, |input| {
            let planes = part.par_chunks_mut(plane.max(1)).zip(input.par_chunks(plane.max(1)));
            planes.enumerate().for_each(|(i, (out, input))| {
                let (shift, scale) = (SHIFT[i % 3], SCALE[i % 3]);
                for (o, v) in out.iter_mut().zip(input) {
                    *o = (v - shift) / scale;
                }
            })
        })?;
    }
    Tensor::from_vec(out, (images, 3, h, w), device)
}

/// One tap's term of one pair, as lpips computes it: each feature vector divided by its
/// channel-wise L2 norm (+1e-10, `normalize_tensor`), the squared difference weighted by the
/// linear layer (a 1×1 conv without bias), averaged over the `plane` positions. `f0`, `f1`
/// `[C, plane]`.
fn tap_distance(f0: &[f32], f1: &[f32], lin: &[f32], plane: usize) -> f64 {
    let inverse_norms = |f: &[f32]| {
        let mut sq = vec![0f32; plane];
        for channel in f.chunks_exact(plane) {
            for (s, v) in sq.iter_mut().zip(channel) {
                *s += v * v;
            }
        }
        sq.iter().map(|s| 1.0 / (s.sqrt() + 1e-10)).collect::<Vec<f32>>()
    };
    let (n0, n1) = (inverse_norms(f0), inverse_norms(f1));
    let mut weighted = vec![0f32; plane];
    for ((c0, c1), l) in f0.chunks_exact(plane).zip(f1.chunks_exact(plane)).zip(lin) {
        for (((acc, a), b), (m0, m1)) in weighted.iter_mut().zip(c0).zip(c1).zip(n0.iter().zip(&n1))
        {
            let d = a * m0 - b * m1;
            *acc += l * d * d;
        }
    }
    weighted.iter().map(|&v| v as f64).sum::<f64>() / plane as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn every_net_name_is_read_as_that_net() {
        for &name in Net::NAMES {
            let net: Net = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(net.name(), name);
        }
    }

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

    /// Reproducible metrics: a pair's distance is the same bits whether it is computed alone
    /// (its two images then split each product across the threads) or in a batch (the images
    /// then run on their own threads), on any number of threads.
    #[test]
    fn a_pairs_distance_does_not_depend_on_its_batch_or_the_thread_count() {
        let model = random_alex();
        let (x0, x1) = (batch(5, 1), batch(5, 2));
        let on = |threads: usize, x0: &Tensor, x1: &Tensor| -> Vec<f32> {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| model.distance(x0, x1)).unwrap().to_vec1().unwrap()
        };
        let together = on(3, &x0, &x1);
        assert_eq!(together.len(), 5);
        for (i, &d) in together.iter().enumerate() {
            let one = |x: &Tensor| x.narrow(0, i, 1).unwrap();
            for threads in [1, 3] {
                let alone = on(threads, &one(&x0), &one(&x1));
                assert_eq!(d, alone[0], "pair {i}, alone on {threads} threads");
            }
        }
    }

    #[test]
    fn batches_of_different_shapes_are_an_error() {
        let err = random_alex().distance(&batch(2, 1), &batch(3, 1));
        assert!(err.unwrap_err().to_string().contains("one shape"));
    }
}
