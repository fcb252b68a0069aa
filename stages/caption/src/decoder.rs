//! BLIP's text decoder (a BERT with causal self-attention and cross-attention to the image),
//! loaded from the same weights as candle-transformers' `blip_text::TextLMHeadModel`, with the
//! two caches beam search needs and that model lacks:
//!
//! - the cross-attention keys and values of the image are computed once per image, not at every
//!   step (for BLIP-large that projection is most of the decoder's work: 577 image tokens × 1024
//!   → 768, twice per layer);
//! - the self-attention cache can be reordered between steps (beams are reshuffled by the
//!   search); candle's cache is private to its layers.
//!
//! The arithmetic is transformers' `BlipTextLMHeadModel`: embeddings + absolute positions →
//! LayerNorm; per layer self-attention, cross-attention, feed-forward, each with a residual
//! LayerNorm after it; the prediction head (dense, activation, LayerNorm, tied vocabulary
//! projection plus bias). A test checks the logits against candle's model.

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{
    embedding, layer_norm, linear, Activation, Embedding, LayerNorm, Linear, VarBuilder,
};

use crate::model::TextConfig;

struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    norm: LayerNorm,
}

impl Attention {
    fn load(cfg: &TextConfig, kv_size: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Attention {
            query: linear(h, h, vb.pp("self.query"))?,
            key: linear(kv_size, h, vb.pp("self.key"))?,
            value: linear(kv_size, h, vb.pp("self.value"))?,
            output: linear(h, h, vb.pp("output.dense"))?,
            norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
        })
    }
}

struct Layer {
    self_attention: Attention,
    cross_attention: Attention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// The decoder's per-row state: cached keys and values, per layer, `(rows, heads, len, dim)`.
pub struct DecoderCache {
    cross: Vec<(Tensor, Tensor)>,
    past: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl DecoderCache {
    /// The cache for rows `rows` of this one (rows may repeat: one image's rows become its
    /// beams).
    pub fn select(&self, rows: &[usize]) -> candle_core::Result<DecoderCache> {
        let device = self.cross.first().map(|(k, _)| k.device().clone()).unwrap_or(Device::Cpu);
        let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect(), rows.len(), &device)?;
        let pick = |t: &Tensor| t.index_select(&idx, 0);
        Ok(DecoderCache {
            cross: self
                .cross
                .iter()
                .map(|(k, v)| Ok((pick(k)?, pick(v)?)))
                .collect::<candle_core::Result<_>>()?,
            past: self
                .past
                .iter()
                .map(|kv| kv.as_ref().map(|(k, v)| Ok((pick(k)?, pick(v)?))).transpose())
                .collect::<candle_core::Result<_>>()?,
            len: self.len,
        })
    }
}

pub struct TextDecoder {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    head_dense: Linear,
    head_norm: LayerNorm,
    vocabulary: Linear,
    activation: Activation,
    heads: usize,
    max_positions: usize,
}

impl TextDecoder {
    /// Load from `vb` at `text_decoder` (the `bert.` and `cls.` weights under it).
    pub fn load(cfg: &TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let bert = vb.pp("bert");
        let emb = bert.pp("embeddings");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = bert.pp("encoder.layer").pp(i);
            layers.push(Layer {
                self_attention: Attention::load(cfg, h, l.pp("attention"))?,
                cross_attention: Attention::load(
                    cfg,
                    cfg.encoder_hidden_size,
                    l.pp("crossattention"),
                )?,
                intermediate: linear(h, cfg.intermediate_size, l.pp("intermediate.dense"))?,
                output: linear(cfg.intermediate_size, h, l.pp("output.dense"))?,
                output_norm: layer_norm(h, cfg.layer_norm_eps, l.pp("output.LayerNorm"))?,
            });
        }
        let head = vb.pp("cls.predictions");
        let vocabulary = Linear::new(
            head.get((cfg.vocab_size, h), "decoder.weight")?,
            Some(head.get(cfg.vocab_size, "bias")?),
        );
        Ok(TextDecoder {
            word_embeddings: embedding(cfg.vocab_size, h, emb.pp("word_embeddings"))?,
            position_embeddings: embedding(
                cfg.max_position_embeddings,
                h,
                emb.pp("position_embeddings"),
            )?,
            embeddings_norm: layer_norm(h, cfg.layer_norm_eps, emb.pp("LayerNorm"))?,
            layers,
            head_dense: linear(h, h, head.pp("transform.dense"))?,
            head_norm: layer_norm(h, cfg.layer_norm_eps, head.pp("transform.LayerNorm"))?,
            vocabulary,
            activation: cfg.hidden_act,
            heads: cfg.num_attention_heads,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// A cache for one row per image: the image tokens' cross-attention keys and values.
    pub fn start(&self, image_embeds: &Tensor) -> candle_core::Result<DecoderCache> {
        let cross = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.cross_attention;
                Ok((
                    self.split_heads(&a.key.forward(image_embeds)?)?,
                    self.split_heads(&a.value.forward(image_embeds)?)?,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(DecoderCache { cross, past: vec![None; self.layers.len()], len: 0 })
    }

    /// Logits `(rows, tokens, vocab)` for `ids` `(rows, tokens)` following the cached tokens.
    pub fn forward(&self, ids: &Tensor, cache: &mut DecoderCache) -> candle_core::Result<Tensor> {
        let (_rows, t) = ids.dims2()?;
        if cache.len + t > self.max_positions {
            candle_core::bail!("sequence longer than the model's {} positions", self.max_positions);
        }
        let positions = Tensor::arange(cache.len as u32, (cache.len + t) as u32, ids.device())?;
        let mut xs = self
            .word_embeddings
            .forward(ids)?
            .broadcast_add(&self.position_embeddings.forward(&positions)?)?
            .apply(&self.embeddings_norm)?;
        let mask = causal_mask(t, cache.len, ids.device())?;
        for (i, layer) in self.layers.iter().enumerate() {
            // Causal self-attention over the cached and new tokens.
            let a = &layer.self_attention;
            let q = self.split_heads(&a.query.forward(&xs)?)?;
            let mut k = self.split_heads(&a.key.forward(&xs)?)?;
            let mut v = self.split_heads(&a.value.forward(&xs)?)?;
            if let Some((pk, pv)) = &cache.past[i] {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            cache.past[i] = Some((k.clone(), v.clone()));
            let attended = self.attend(&q, &k, &v, mask.as_ref())?;
            xs = (a.output.forward(&attended)? + &xs)?.apply(&a.norm)?;
            // Cross-attention to every image token.
            let c = &layer.cross_attention;
            let q = self.split_heads(&c.query.forward(&xs)?)?;
            let (k, v) = &cache.cross[i];
            let attended = self.attend(&q, k, v, None)?;
            xs = (c.output.forward(&attended)? + &xs)?.apply(&c.norm)?;
            // Feed-forward.
            let hidden = layer.intermediate.forward(&xs)?.apply(&self.activation)?;
            xs = (layer.output.forward(&hidden)? + &xs)?.apply(&layer.output_norm)?;
        }
        cache.len += t;
        let transformed =
            self.head_dense.forward(&xs)?.apply(&self.activation)?.apply(&self.head_norm)?;
        self.vocabulary.forward(&transformed)
    }

    /// Logits of the last position only, `(rows, vocab)`.
    pub fn forward_last(
        &self,
        ids: &Tensor,
        cache: &mut DecoderCache,
    ) -> candle_core::Result<Tensor> {
        let logits = self.forward(ids, cache)?;
        let t = logits.dim(1)?;
        logits.i((.., t - 1, ..))?.contiguous()
    }

    /// `(rows, len, hidden)` → `(rows, heads, len, head_dim)`.
    fn split_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        xs.reshape((b, t, self.heads, h / self.heads))?.transpose(1, 2)?.contiguous()
    }

    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let head_dim = q.dim(D::Minus1)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (head_dim as f64).sqrt()))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let (b, _, t, _) = q.dims4()?;
        probs.matmul(v)?.transpose(1, 2)?.reshape((b, t, ()))
    }
}

/// `-inf` above the diagonal of the new tokens against the cached + new ones; none for a single
/// new token (it may see everything).
fn causal_mask(t: usize, past: usize, device: &Device) -> candle_core::Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..past + t).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Tensor::from_vec(mask, (t, past + t), device)?.to_dtype(DType::F32).map(Some)
}
