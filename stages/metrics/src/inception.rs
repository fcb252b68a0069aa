//! The InceptionV3 variant FID is defined with (pytorch-fid's `fid_inception_v3`: torchvision's
//! Inception3 with the TensorFlow graph's blocks), from the input image to the 2048-d pool3
//! features.
//!
//! What differs from a textbook InceptionV3 — and so what must be exact for FID to be FID:
//! - Mixed_5b/c/d (A), Mixed_6b–e (C) and Mixed_7b (E_1) average-pool their pool branch with
//!   `count_include_pad=False`: border windows divide by the number of real pixels.
//! - Mixed_7c (E_2) *max*-pools its pool branch (a quirk of the TensorFlow graph).
//! - Every conv unit is conv (no bias) → BatchNorm (eps 0.001, running statistics) → ReLU. The
//!   BatchNorm is folded into the conv's weights and a bias at load time (the same affine map;
//!   only f32 rounding differs).
//! - Input: RGB in [0, 1], bilinear resize to 299×299 (align_corners=False, no antialiasing),
//!   then 2x − 1.
//!
//! Tensor names are pytorch-fid's state-dict names (`Mixed_5b.branch1x1.conv.weight`, ...).
//!
//! The network runs on the device it was loaded on ([`FidInception::on_device`]); its convs and
//! max pools pick their CPU or generic path themselves ([`crate::device_path`]), the rest is
//! candle's ops on the input's device.

use candle_core::{DType, Device, Module, Tensor, D};

use crate::conv::ConvRelu;
use crate::pool::{avg_pool_3x3_exclude_pad, max_pool2d, max_pool_3x3_same};
use crate::recipe::Init;
use crate::weights::{TensorSpec, Weights};

/// BatchNorm epsilon of every conv unit.
const BN_EPS: f64 = 1e-3;
/// Side of the square input the network is defined on.
pub const INPUT_SIZE: usize = 299;
/// Dimension of the pool3 features.
pub const FEATURE_DIM: usize = 2048;

/// Shape of one conv unit: `name.conv.weight` + `name.bn.*`.
#[derive(Debug, Clone)]
struct ConvSpec {
    name: String,
    c_in: usize,
    c_out: usize,
    kernel: (usize, usize),
    stride: usize,
    padding: (usize, usize),
}

fn conv(name: &str, c_in: usize, c_out: usize, kernel: (usize, usize)) -> ConvSpec {
    // torchvision pads (1,7) kernels by (0,3), 3×3 "same" convs by 1, etc.: the callers say so.
    ConvSpec { name: name.into(), c_in, c_out, kernel, stride: 1, padding: (0, 0) }
}

impl ConvSpec {
    fn pad(mut self, ph: usize, pw: usize) -> Self {
        self.padding = (ph, pw);
        self
    }
    fn stride(mut self, s: usize) -> Self {
        self.stride = s;
        self
    }
}

/// Every conv unit of the network, in state-dict order.
fn conv_specs() -> Vec<ConvSpec> {
    let mut v = vec![
        conv("Conv2d_1a_3x3", 3, 32, (3, 3)).stride(2),
        conv("Conv2d_2a_3x3", 32, 32, (3, 3)),
        conv("Conv2d_2b_3x3", 32, 64, (3, 3)).pad(1, 1),
        conv("Conv2d_3b_1x1", 64, 80, (1, 1)),
        conv("Conv2d_4a_3x3", 80, 192, (3, 3)),
    ];
    for (name, c_in, pool) in [("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)]
    {
        v.extend(block_a(name, c_in, pool));
    }
    v.extend(block_b("Mixed_6a", 288));
    for (name, c7) in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)] {
        v.extend(block_c(name, 768, c7));
    }
    v.extend(block_d("Mixed_7a", 768));
    v.extend(block_e("Mixed_7b", 1280));
    v.extend(block_e("Mixed_7c", 2048));
    v
}

fn block_a(p: &str, c_in: usize, pool: usize) -> Vec<ConvSpec> {
    vec![
        conv(&format!("{p}.branch1x1"), c_in, 64, (1, 1)),
        conv(&format!("{p}.branch5x5_1"), c_in, 48, (1, 1)),
        conv(&format!("{p}.branch5x5_2"), 48, 64, (5, 5)).pad(2, 2),
        conv(&format!("{p}.branch3x3dbl_1"), c_in, 64, (1, 1)),
        conv(&format!("{p}.branch3x3dbl_2"), 64, 96, (3, 3)).pad(1, 1),
        conv(&format!("{p}.branch3x3dbl_3"), 96, 96, (3, 3)).pad(1, 1),
        conv(&format!("{p}.branch_pool"), c_in, pool, (1, 1)),
    ]
}

fn block_b(p: &str, c_in: usize) -> Vec<ConvSpec> {
    vec![
        conv(&format!("{p}.branch3x3"), c_in, 384, (3, 3)).stride(2),
        conv(&format!("{p}.branch3x3dbl_1"), c_in, 64, (1, 1)),
        conv(&format!("{p}.branch3x3dbl_2"), 64, 96, (3, 3)).pad(1, 1),
        conv(&format!("{p}.branch3x3dbl_3"), 96, 96, (3, 3)).stride(2),
    ]
}

fn block_c(p: &str, c_in: usize, c7: usize) -> Vec<ConvSpec> {
    vec![
        conv(&format!("{p}.branch1x1"), c_in, 192, (1, 1)),
        conv(&format!("{p}.branch7x7_1"), c_in, c7, (1, 1)),
        conv(&format!("{p}.branch7x7_2"), c7, c7, (1, 7)).pad(0, 3),
        conv(&format!("{p}.branch7x7_3"), c7, 192, (7, 1)).pad(3, 0),
        conv(&format!("{p}.branch7x7dbl_1"), c_in, c7, (1, 1)),
        conv(&format!("{p}.branch7x7dbl_2"), c7, c7, (7, 1)).pad(3, 0),
        conv(&format!("{p}.branch7x7dbl_3"), c7, c7, (1, 7)).pad(0, 3),
        conv(&format!("{p}.branch7x7dbl_4"), c7, c7, (7, 1)).pad(3, 0),
        conv(&format!("{p}.branch7x7dbl_5"), c7, 192, (1, 7)).pad(0, 3),
        conv(&format!("{p}.branch_pool"), c_in, 192, (1, 1)),
    ]
}

fn block_d(p: &str, c_in: usize) -> Vec<ConvSpec> {
    vec![
        conv(&format!("{p}.branch3x3_1"), c_in, 192, (1, 1)),
        conv(&format!("{p}.branch3x3_2"), 192, 320, (3, 3)).stride(2),
        conv(&format!("{p}.branch7x7x3_1"), c_in, 192, (1, 1)),
        conv(&format!("{p}.branch7x7x3_2"), 192, 192, (1, 7)).pad(0, 3),
        conv(&format!("{p}.branch7x7x3_3"), 192, 192, (7, 1)).pad(3, 0),
        conv(&format!("{p}.branch7x7x3_4"), 192, 192, (3, 3)).stride(2),
    ]
}

fn block_e(p: &str, c_in: usize) -> Vec<ConvSpec> {
    vec![
        conv(&format!("{p}.branch1x1"), c_in, 320, (1, 1)),
        conv(&format!("{p}.branch3x3_1"), c_in, 384, (1, 1)),
        conv(&format!("{p}.branch3x3_2a"), 384, 384, (1, 3)).pad(0, 1),
        conv(&format!("{p}.branch3x3_2b"), 384, 384, (3, 1)).pad(1, 0),
        conv(&format!("{p}.branch3x3dbl_1"), c_in, 448, (1, 1)),
        conv(&format!("{p}.branch3x3dbl_2"), 448, 384, (3, 3)).pad(1, 1),
        conv(&format!("{p}.branch3x3dbl_3a"), 384, 384, (1, 3)).pad(0, 1),
        conv(&format!("{p}.branch3x3dbl_3b"), 384, 384, (3, 1)).pad(1, 0),
        conv(&format!("{p}.branch_pool"), c_in, 192, (1, 1)),
    ]
}

/// Every tensor the network reads (pytorch-fid's names; `fc.*` and `num_batches_tracked` are
/// in the published file but unused for pool3 features).
pub fn tensor_specs() -> Vec<TensorSpec> {
    let mut specs = Vec::new();
    for c in conv_specs() {
        let (kh, kw) = c.kernel;
        let n = &c.name;
        let fan_in = c.c_in * kh * kw;
        specs.push(TensorSpec::new(
            format!("{n}.conv.weight"),
            &[c.c_out, c.c_in, kh, kw],
            Init::Conv { fan_in },
        ));
        specs.push(TensorSpec::new(format!("{n}.bn.weight"), &[c.c_out], Init::BnWeight));
        specs.push(TensorSpec::new(format!("{n}.bn.bias"), &[c.c_out], Init::BnBias));
        specs.push(TensorSpec::new(format!("{n}.bn.running_mean"), &[c.c_out], Init::BnMean));
        specs.push(TensorSpec::new(format!("{n}.bn.running_var"), &[c.c_out], Init::BnVar));
    }
    specs
}

/// Conv → BatchNorm (folded) → ReLU.
struct ConvUnit(ConvRelu);

impl ConvUnit {
    /// The unit on `device`.
    fn load(w: &Weights, spec: &ConvSpec, device: &Device) -> candle_core::Result<ConvUnit> {
        let n = &spec.name;
        let kernel = w.get(&format!("{n}.conv.weight"))?;
        let gamma = w.get(&format!("{n}.bn.weight"))?;
        let beta = w.get(&format!("{n}.bn.bias"))?;
        let mean = w.get(&format!("{n}.bn.running_mean"))?;
        let var = w.get(&format!("{n}.bn.running_var"))?;
        // y = (conv(x) − mean)/√(var + eps)·γ + β = conv_{k·s}(x) + (β − mean·s), s = γ/√(var+eps)
        let scale = gamma.broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
        let weight = kernel.broadcast_mul(&scale.reshape((spec.c_out, 1, 1, 1))?)?;
        let bias = (beta - mean.mul(&scale)?)?;
        // Folded where the weights were read (the CPU), then moved: every device runs the same
        // folded f32 weights.
        let (weight, bias) = (weight.to_device(device)?, bias.to_device(device)?);
        Ok(ConvUnit(ConvRelu::new(&weight, &bias, spec.stride, spec.padding)?))
    }
}

impl Module for ConvUnit {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(x)
    }
}

/// Which pooling a block's pool branch uses.
#[derive(Clone, Copy)]
enum Pool {
    AvgExcludePad,
    Max,
}

/// A mixed block: its conv units by name suffix.
struct Block {
    name: String,
    kind: BlockKind,
    units: std::collections::HashMap<String, ConvUnit>,
}

#[derive(Clone, Copy)]
enum BlockKind {
    A,
    B,
    C,
    D,
    E(Pool),
}

impl Block {
    fn unit(&self, name: &str) -> candle_core::Result<&ConvUnit> {
        self.units
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("block lacks unit {name}")))
    }
    fn run(&self, names: &[&str], x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        for name in names {
            y = self.unit(name)?.forward(&y)?;
        }
        Ok(y)
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let branches = match self.kind {
            BlockKind::A => vec![
                self.run(&["branch1x1"], x)?,
                self.run(&["branch5x5_1", "branch5x5_2"], x)?,
                self.run(&["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], x)?,
                self.run(&["branch_pool"], &avg_pool_3x3_exclude_pad(x)?)?,
            ],
            BlockKind::B => vec![
                self.run(&["branch3x3"], x)?,
                self.run(&["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], x)?,
                max_pool2d(x, 3, 2)?,
            ],
            BlockKind::C => vec![
                self.run(&["branch1x1"], x)?,
                self.run(&["branch7x7_1", "branch7x7_2", "branch7x7_3"], x)?,
                self.run(
                    &[
                        "branch7x7dbl_1",
                        "branch7x7dbl_2",
                        "branch7x7dbl_3",
                        "branch7x7dbl_4",
                        "branch7x7dbl_5",
                    ],
                    x,
                )?,
                self.run(&["branch_pool"], &avg_pool_3x3_exclude_pad(x)?)?,
            ],
            BlockKind::D => vec![
                self.run(&["branch3x3_1", "branch3x3_2"], x)?,
                self.run(&["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"], x)?,
                max_pool2d(x, 3, 2)?,
            ],
            BlockKind::E(pool) => {
                let b3 = self.run(&["branch3x3_1"], x)?;
                let b3 = Tensor::cat(
                    &[
                        self.unit("branch3x3_2a")?.forward(&b3)?,
                        self.unit("branch3x3_2b")?.forward(&b3)?,
                    ],
                    1,
                )?;
                let bd = self.run(&["branch3x3dbl_1", "branch3x3dbl_2"], x)?;
                let bd = Tensor::cat(
                    &[
                        self.unit("branch3x3dbl_3a")?.forward(&bd)?,
                        self.unit("branch3x3dbl_3b")?.forward(&bd)?,
                    ],
                    1,
                )?;
                let pooled = match pool {
                    Pool::AvgExcludePad => avg_pool_3x3_exclude_pad(x)?,
                    Pool::Max => max_pool_3x3_same(x)?,
                };
                vec![self.run(&["branch1x1"], x)?, b3, bd, self.run(&["branch_pool"], &pooled)?]
            }
        };
        Tensor::cat(&branches, 1)
    }
}

/// pytorch-fid's InceptionV3 up to the pool3 features.
pub struct FidInception {
    stem: Vec<ConvUnit>,
    blocks: Vec<Block>,
    device: Device,
}

impl FidInception {
    /// The network on the CPU (see [`FidInception::on_device`]).
    pub fn new(weights: &Weights) -> candle_core::Result<FidInception> {
        FidInception::on_device(weights, &Device::Cpu)
    }

    /// The network with its weights on `device`, where it then runs (inputs are moved there).
    pub fn on_device(weights: &Weights, device: &Device) -> candle_core::Result<FidInception> {
        let specs = conv_specs();
        let mut stem = Vec::new();
        let mut blocks: Vec<Block> = Vec::new();
        for spec in &specs {
            let unit = ConvUnit::load(weights, spec, device)?;
            match spec.name.split_once('.') {
                None => stem.push(unit),
                Some((block, unit_name)) => {
                    // Specs come block by block: a new name starts the next block.
                    if blocks.last().map(|b| b.name.as_str()) != Some(block) {
                        blocks.push(Block {
                            name: block.to_string(),
                            kind: block_kind(block)?,
                            units: Default::default(),
                        });
                    }
                    if let Some(b) = blocks.last_mut() {
                        b.units.insert(unit_name.to_string(), unit);
                    }
                }
            }
        }
        Ok(FidInception { stem, blocks, device: device.clone() })
    }

    /// The device the network runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Pool3 features `[B, 2048]` of a batch `[B, 3, 299, 299]` already scaled to [-1, 1], on
    /// the network's device (the batch is moved there first).
    pub fn forward_scaled(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.to_device(&self.device)?;
        for (i, unit) in self.stem.iter().enumerate() {
            x = unit.forward(&x)?;
            // Block 0 ends with a 3/2 max pool after Conv2d_2b; block 1 after Conv2d_4a.
            if i == 2 || i == 4 {
                x = max_pool2d(&x, 3, 2)?;
            }
        }
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        x.mean(D::Minus1)?.mean(D::Minus1)
    }

    /// Pool3 features `[B, 2048]` of images `[B, 3, 299, 299]` in [0, 1] (see [`preprocess`]),
    /// on the network's device (the batch is moved there first).
    pub fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_device(&self.device)?;
        self.forward_scaled(&((x * 2.0)? - 1.0)?)
    }
}

fn block_kind(name: &str) -> candle_core::Result<BlockKind> {
    Ok(match name {
        "Mixed_5b" | "Mixed_5c" | "Mixed_5d" => BlockKind::A,
        "Mixed_6a" => BlockKind::B,
        "Mixed_6b" | "Mixed_6c" | "Mixed_6d" | "Mixed_6e" => BlockKind::C,
        "Mixed_7a" => BlockKind::D,
        "Mixed_7b" => BlockKind::E(Pool::AvgExcludePad),
        "Mixed_7c" => BlockKind::E(Pool::Max),
        other => candle_core::bail!("unknown Inception block {other}"),
    })
}

/// An image `[3, H, W]` in [0, 1] resized to 299×299 as pytorch-fid does: bilinear,
/// align_corners=False, no antialiasing (even when shrinking); on the image's device.
pub fn preprocess(image: &Tensor) -> candle_core::Result<Tensor> {
    let x = image.unsqueeze(0)?.to_dtype(DType::F32)?;
    x.upsample_bilinear2d(INPUT_SIZE, INPUT_SIZE, false)?.squeeze(0)
}

/// A batch `[B, 3, 299, 299]` of preprocessed images.
pub fn stack(images: &[Tensor]) -> candle_core::Result<Tensor> {
    Tensor::stack(images, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(values: &[f32], h: usize, w: usize) -> Tensor {
        Tensor::from_slice(values, (1, 1, h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn average_pool_divides_border_windows_by_their_real_pixels_only() {
        // 3x3 of ones: with count_include_pad=False every window averages to exactly 1
        // (counting the padding would give 4/9 at corners and 6/9 on edges).
        let out = avg_pool_3x3_exclude_pad(&grid(&[1.0; 9], 3, 3)).unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| (x - 1.0).abs() < 1e-6), "{v:?}");
    }

    #[test]
    fn max_pool_padding_never_beats_negative_values() {
        let out = max_pool_3x3_same(&grid(&[-4.0, -3.0, -2.0, -1.0], 2, 2)).unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [-1.0; 4]);
    }

    #[test]
    fn the_network_has_the_published_block_sequence() {
        let names: Vec<String> = conv_specs()
            .iter()
            .filter_map(|c| c.name.split_once('.').map(|(b, _)| b.to_string()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(names.len(), 11); // Mixed_5b..5d, 6a..6e, 7a..7c
        for name in &names {
            assert!(block_kind(name).is_ok(), "{name}");
        }
    }
}
