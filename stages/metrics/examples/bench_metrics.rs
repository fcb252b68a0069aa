//! Throughput of the metric networks (not a test): FID Inception features in images/s and LPIPS
//! pairs/s, on synthetic 512×512 images (the samples' size) with the random stand-in weights
//! (same architecture, so the same cost as the published weights). Decoding is not timed; the
//! 299 resize and everything after it is.
//!
//! `cargo run --release -p sdpipe-metrics --example bench_metrics -- [threads] [images] [pairs]
//! [profile]` (bench/metrics.sh runs it next to pytorch-fid and lpips with the same thread
//! count). With `profile`, it first prints the time of each AlexNet trunk layer on one LPIPS
//! batch, to see where the time goes: each convolution (+ bias + ReLU) both as sdpipe runs it
//! ([`ConvRelu`]) and as candle's conv2d would.

use std::time::Instant;

use candle_core::{Device, Tensor};
use sdpipe_metrics::conv::ConvRelu;
use sdpipe_metrics::inception::{self, FidInception};
use sdpipe_metrics::lpips::{lin_specs, trunk_specs, Lpips, Net};
use sdpipe_metrics::pool::max_pool2d;
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

/// A trunk layer: `features.{index}` conv with (stride, padding), or max-pool (None).
type TrunkLayer = (&'static str, Option<(usize, usize, usize)>);

/// Seconds per layer of the AlexNet trunk (conv + bias + ReLU, or max-pool) on `x`, median of
/// three runs each; convolutions as [`ConvRelu`] and as candle's conv2d + bias + ReLU.
fn profile_alexnet(w: &Weights, x: &Tensor) -> candle_core::Result<()> {
    let mut x = x.clone();
    let layers: [TrunkLayer; 7] = [
        ("features.0", Some((0, 4, 2))),
        ("pool", None),
        ("features.3", Some((3, 1, 2))),
        ("pool", None),
        ("features.6", Some((6, 1, 1))),
        ("features.8", Some((8, 1, 1))),
        ("features.10", Some((10, 1, 1))),
    ];
    // (output, wall s, CPU s), each time the least of three runs: the least disturbed by load.
    let least = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<_> {
        let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
        let mut out = None;
        for _ in 0..3 {
            let (start, cpu_start) = (Instant::now(), cpu_seconds());
            out = Some(f()?);
            wall = wall.min(start.elapsed().as_secs_f64());
            cpu = cpu.min(cpu_seconds() - cpu_start);
        }
        Ok((out.expect("three runs"), wall, cpu))
    };
    let (mut trunk_wall, mut trunk_cpu) = (0.0, 0.0);
    for (name, conv) in layers {
        let (out, wall, cpu, candle) = match conv {
            Some((index, stride, pad)) => {
                let weight = w.get(&format!("features.{index}.weight"))?;
                let bias = w.get(&format!("features.{index}.bias"))?;
                let ours = ConvRelu::new(weight, bias, stride, (pad, pad))?;
                let (out, wall, cpu) = least(&|| ours.forward(&x))?;
                let c = bias.dim(0)?;
                let (_, candle_wall, candle_cpu) = least(&|| {
                    x.conv2d(weight, pad, stride, 1, 1)?
                        .broadcast_add(&bias.reshape((1, c, 1, 1))?)?
                        .relu()
                })?;
                (
                    out,
                    wall,
                    cpu,
                    format!("; candle conv2d {candle_wall:.4} s, CPU {candle_cpu:.4} s"),
                )
            }
            None => {
                let (out, wall, cpu) = least(&|| max_pool2d(&x, 3, 2))?;
                let (_, candle_wall, candle_cpu) = least(&|| x.max_pool2d_with_stride(3, 2))?;
                (out, wall, cpu, format!("; candle {candle_wall:.4} s, CPU {candle_cpu:.4} s"))
            }
        };
        eprintln!(
            "{name:>12} {:?} -> {:?}: {wall:.4} s, CPU {cpu:.4} s{candle}",
            x.dims(),
            out.dims()
        );
        (trunk_wall, trunk_cpu) = (trunk_wall + wall, trunk_cpu + cpu);
        x = out;
    }
    eprintln!("{:>12} {trunk_wall:.4} s, CPU {trunk_cpu:.4} s", "trunk");
    Ok(())
}

/// CPU seconds this process's threads have used so far (the sum of their
/// `/proc/self/task/*/schedstat` run times, in ns): unlike wall time, hardly changed by other
/// processes competing for the cores, so it compares two implementations on a loaded machine.
fn cpu_seconds() -> f64 {
    let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten();
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

fn main() -> candle_core::Result<()> {
    // As sdpipe runs the stage (src/main.rs).
    sdpipe_stages::process::set_up();
    let threads = arg(1, 2);
    let n_images = arg(2, 32);
    let n_pairs = arg(3, 32);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    pool.install(|| -> candle_core::Result<()> {
        let inception = FidInception::new(&Weights::random(&inception::tensor_specs(), 0))?;
        let batch = images(FID_BATCH, 0.0)?;
        let run_fid = |batch: &Tensor| -> candle_core::Result<Tensor> {
            let resized =
                batch.upsample_bilinear2d(inception::INPUT_SIZE, inception::INPUT_SIZE, false)?;
            inception.features(&resized)
        };
        run_fid(&batch.narrow(0, 0, 1)?)?; // warm-up
        let (start, cpu_start) = (Instant::now(), cpu_seconds());
        let mut done = 0;
        while done < n_images {
            let f = run_fid(&batch)?;
            assert_eq!(f.dims(), &[FID_BATCH, inception::FEATURE_DIM]);
            done += FID_BATCH;
        }
        let fid_rate = done as f64 / start.elapsed().as_secs_f64();
        let fid_cpu = (cpu_seconds() - cpu_start) / done as f64;

        let w = Weights::random(&trunk_specs(Net::Alex), 0)
            .merged(Weights::random(&lin_specs(Net::Alex), 0));
        let lpips = Lpips::new(Net::Alex, &w)?;
        let a = images(LPIPS_BATCH, 0.0)?.affine(2.0, -1.0)?;
        let b = images(LPIPS_BATCH, 0.5)?.affine(2.0, -1.0)?;
        if std::env::args().nth(4).as_deref() == Some("profile") {
            profile_alexnet(&w, &Tensor::cat(&[&a, &b], 0)?)?;
            let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
            for _ in 0..3 {
                let (start, cpu_start) = (Instant::now(), cpu_seconds());
                lpips.distance(&a, &b)?;
                wall = wall.min(start.elapsed().as_secs_f64());
                cpu = cpu.min(cpu_seconds() - cpu_start);
            }
            eprintln!("LPIPS distance, whole batch: {wall:.4} s, CPU {cpu:.4} s");
        }
        lpips.distance(&a.narrow(0, 0, 1)?, &b.narrow(0, 0, 1)?)?; // warm-up

        let (start, cpu_start) = (Instant::now(), cpu_seconds());
        let mut done = 0;
        while done < n_pairs {
            lpips.distance(&a, &b)?;
            done += LPIPS_BATCH;
        }
        let lpips_rate = done as f64 / start.elapsed().as_secs_f64();
        let lpips_cpu = (cpu_seconds() - cpu_start) / done as f64;
        println!(
            "{{\"impl\": \"sdpipe (Rust CPU)\", \"threads\": {threads}, \"size\": {SIZE}, \
             \"inception_images_per_s\": {fid_rate:.3}, \
             \"inception_cpu_s_per_image\": {fid_cpu:.3}, \
             \"lpips_alex_pairs_per_s\": {lpips_rate:.3}, \
             \"lpips_alex_cpu_s_per_pair\": {lpips_cpu:.3}}}"
        );
        Ok(())
    })
}
