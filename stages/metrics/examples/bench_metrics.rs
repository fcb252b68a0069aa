//! Throughput of the metric networks (not a test): FID Inception features in images/s and LPIPS
//! pairs/s, on synthetic 512×512 images (the samples' size) with the random stand-in weights
//! (same architecture, so the same cost as the published weights). Decoding is not timed; the
//! 299 resize and everything after it is.
//!
//! `cargo run --release -p sdpipe-metrics --example bench_metrics -- [threads] [images] [pairs]`
//! (bench/metrics.sh runs it next to pytorch-fid and lpips with the same thread count).

use std::time::Instant;

use candle_core::{Device, Tensor};
use sdpipe_metrics::inception::{self, FidInception};
use sdpipe_metrics::lpips::{lin_specs, trunk_specs, Lpips, Net};
use sdpipe_metrics::weights::Weights;

const SIZE: usize = 512;
const FID_BATCH: usize = 8;
const LPIPS_BATCH: usize = 4;

fn arg(i: usize, default: usize) -> usize {
    std::env::args().nth(i).and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// A deterministic smooth image batch `[n, 3, SIZE, SIZE]` in [0, 1].
fn images(n: usize, phase: f32) -> candle_core::Result<Tensor> {
    let mut v = Vec::with_capacity(n * 3 * SIZE * SIZE);
    for b in 0..n {
        for c in 0..3 {
            for y in 0..SIZE {
                for x in 0..SIZE {
                    let t =
                        (x as f32 * 0.031 + y as f32 * 0.017 * (c + 1) as f32 + b as f32 + phase)
                            .sin();
                    v.push(0.5 + 0.5 * t);
                }
            }
        }
    }
    Tensor::from_vec(v, (n, 3, SIZE, SIZE), &Device::Cpu)
}

fn main() -> candle_core::Result<()> {
    let threads = arg(1, 2);
    let n_images = arg(2, 32);
    let n_pairs = arg(3, 32);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    pool.install(|| -> candle_core::Result<()> {
        let inception = FidInception::new(&Weights::random(&inception::tensor_specs(), 0))?;
        let batch = images(FID_BATCH, 0.0)?;
        let run_fid = |batch: &Tensor| -> candle_core::Result<Tensor> {
            let resized = batch.upsample_bilinear2d(inception::INPUT_SIZE, inception::INPUT_SIZE, false)?;
            inception.features(&resized)
        };
        run_fid(&batch.narrow(0, 0, 1)?)?; // warm-up
        let start = Instant::now();
        let mut done = 0;
        while done < n_images {
            let f = run_fid(&batch)?;
            assert_eq!(f.dims(), &[FID_BATCH, inception::FEATURE_DIM]);
            done += FID_BATCH;
        }
        let fid_rate = done as f64 / start.elapsed().as_secs_f64();

        let w = Weights::random(&trunk_specs(Net::Alex), 0)
            .merged(Weights::random(&lin_specs(Net::Alex), 0));
        let lpips = Lpips::new(Net::Alex, &w)?;
        let a = images(LPIPS_BATCH, 0.0)?.affine(2.0, -1.0)?;
        let b = images(LPIPS_BATCH, 0.5)?.affine(2.0, -1.0)?;
        lpips.distance(&a.narrow(0, 0, 1)?, &b.narrow(0, 0, 1)?)?; // warm-up
        let start = Instant::now();
        let mut done = 0;
        while done < n_pairs {
            lpips.distance(&a, &b)?;
            done += LPIPS_BATCH;
        }
        let lpips_rate = done as f64 / start.elapsed().as_secs_f64();
        println!(
            "{{\"impl\": \"sdpipe (candle CPU)\", \"threads\": {threads}, \"size\": {SIZE}, \
             \"inception_images_per_s\": {fid_rate:.3}, \"lpips_alex_pairs_per_s\": {lpips_rate:.3}}}"
        );
        Ok(())
    })
}
