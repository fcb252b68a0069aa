use candle_core::{DType, Device, Tensor};
use sdpipe_unet::UNet;
fn m(t: &Tensor) -> f64 { t.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap() }
fn main() {
    for name in ["tiny", "linear"] {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/unet").join(name);
        let unet = UNet::from_pretrained(&dir.join("unet"), &Device::Cpu).unwrap();
        let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
        let out = unet.forward(&io["sample"], &io["timesteps"], &io["encoder_hidden_states"]).unwrap();
        println!("{name}: forward max diff {:e} (max |out| {:e})", m(&(&out - &io["out"]).unwrap()), m(&io["out"]));
        let te = unet.time_proj(&io["timesteps"]).unwrap();
        println!("{name}: t_emb diff {:e}; emb diff {:e}", m(&(&te - &io["t_emb"]).unwrap()), m(&(unet.time_embedding(&io["timesteps"]).unwrap() - &io["emb"]).unwrap()));
        for ck in [false, true] {
            let (loss, g) = unet.loss_and_grads(&io["sample"], &io["timesteps"], &io["encoder_hidden_states"], ck, |p: &Tensor| (p - &io["target"])?.sqr()?.mean_all()).unwrap();
            let mut worst = (0.0, String::new());
            for (k, r) in &io {
                let Some(p) = k.strip_prefix("grad.") else { continue };
                let gg = g.get(unet.vars()[p].as_tensor()).unwrap();
                if m(r) < 1e-6 { println!("  near-zero reference: {p} max {:e}, ours {:e}", m(r), m(gg)); continue; }
                let rel = m(&(gg - r).unwrap()) / m(r);
                if rel > worst.0 { worst = (rel, p.to_string()); }
            }
            println!("{name} ckpt={ck}: loss {} vs {}; worst grad rel diff {:e} at {}", loss.to_scalar::<f32>().unwrap(), io["loss"].to_vec1::<f32>().unwrap()[0], worst.0, worst.1);
        }
    }
}
