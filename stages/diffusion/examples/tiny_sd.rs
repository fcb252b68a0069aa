//! Write the default tiny SD pipeline into a folder, for `tests/parity/diffusion.py`:
//! `cargo run -p sdpipe-diffusion --example tiny_sd -- <dir> [seed]`.

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: tiny_sd <dir> [seed]");
        std::process::exit(2);
    };
    let seed = match args.next().map(|s| s.parse::<u64>()) {
        None => 0,
        Some(Ok(seed)) => seed,
        Some(Err(e)) => {
            eprintln!("seed: {e}");
            std::process::exit(2);
        }
    };
    let spec = sdpipe_diffusion::TinySpec { seed, ..Default::default() };
    if let Err(e) = sdpipe_diffusion::write_tiny(&dir, &spec) {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
