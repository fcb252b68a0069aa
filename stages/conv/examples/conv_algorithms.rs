//! Times both forward algorithms on 3×3 convolutions at stride 1 (padding 1, batch 2, c → c
//! channels) and prints the table `winograd::pays_off` was chosen from: Winograd's time over
//! the unfolded product's, each the best of at least 0.6 s of calls.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p sdpipe-conv --example conv_algorithms
//! ```

use std::time::Instant;

use sdpipe_conv::{Activation, Algorithm, ConvShape};

const CHANNELS: [usize; 5] = [32, 64, 128, 256, 512];
const SIDES: [usize; 4] = [8, 16, 32, 64];
const BATCH: usize = 2;

/// The best time of at least 0.6 s (and 5 calls) of one forward, in ms.
fn best_ms(algorithm: Algorithm, c: usize, side: usize) -> f64 {
    let shape = ConvShape::new([c, c, 3, 3], 1, (1, 1)).expect("a valid shape");
    let x: Vec<f32> = (0..BATCH * c * side * side).map(|i| (i as f32 * 0.731).sin()).collect();
    let k: Vec<f32> = (0..c * c * 9).map(|i| (i as f32 * 0.37).sin() * 0.05).collect();
    let bias = vec![0.1f32; c];
    let (start, mut best, mut calls) = (Instant::now(), f64::INFINITY, 0);
    while start.elapsed().as_secs_f64() < 0.6 || calls < 5 {
        let t = Instant::now();
        let y = shape
            .forward_with(algorithm, BATCH, (side, side), &x, &k, Some(&bias), Activation::Identity)
            .expect("a 3×3 convolution at stride 1");
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(y);
        calls += 1;
    }
    best
}

fn main() {
    println!("threads {}, batch {BATCH}; Winograd / unfolded (ms)\n", rayon::current_num_threads());
    let header: Vec<String> = CHANNELS.iter().map(|c| format!("c = {c}")).collect();
    println!("| output side | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(CHANNELS.len()));
    for side in SIDES {
        let cells: Vec<String> = CHANNELS
            .iter()
            .map(|&c| {
                let winograd = best_ms(Algorithm::Winograd, c, side);
                let unfolded = best_ms(Algorithm::Unfolded, c, side);
                format!("{:.2} ({winograd:.2} / {unfolded:.2})", winograd / unfolded)
            })
            .collect();
        println!("| {side} | {} |", cells.join(" | "));
    }
}
