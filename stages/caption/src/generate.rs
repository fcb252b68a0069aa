//! Decoding: greedy search and beam search, following transformers' `generate()` (5.x) step for
//! step, so the same model gives the same token ids.
//!
//! What transformers does, and so what is done here:
//! - scores are log-softmaxed logits in f32; `min_length` masks the end token to `-inf` while the
//!   sequence (prompt included) is shorter than `min_length`; `max_length` counts the prompt;
//! - beam search keeps, per step, the top `2 * num_beams` continuations over all beams (beam 0
//!   alone at the first step: the other beams start at `-1e9`); a continuation ending with the end
//!   token, or reaching `max_length`, is finished, and is kept as a hypothesis only if it ranks
//!   among the top `num_beams`, scored by its sum of log-probabilities divided by
//!   `generated_length ^ length_penalty` (generated tokens, end token included);
//! - the running beams are the best `num_beams` unfinished continuations;
//! - with `early_stopping = false` (BLIP's default, and the only mode implemented), an image is done once all `num_beams`
//!   hypotheses slots are filled and the best running beam, normalised by the current generated
//!   length, cannot beat the worst hypothesis; the whole batch stops when every image is done,
//!   or at `max_length`;
//! - the `-1e9` penalties are added in f32 exactly as transformers adds them, so even the
//!   ordering of penalised candidates matches.
//!
//! The model is behind [`NextToken`], so the search is tested on its own with scripted scores.

use crate::error::CaptionError;

/// Decoding settings (transformers' names).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_length: usize,
    pub min_length: usize,
    /// The end token (BLIP: `[SEP]`).
    pub eos: u32,
    pub num_beams: usize,
    pub length_penalty: f32,
}

/// A decoder holding the state of every running row.
pub trait NextToken {
    /// Next-token logits for every row (`rows * vocab` values, row-major). The first call gives
    /// them after the prompt, one row per sequence the decoder was started with. Later calls
    /// first rebuild the rows: new row `r` continues old row `parents[r]` extended by
    /// `tokens[r]` (rows may be dropped or repeated).
    fn next_logits(&mut self, extend: Option<(&[usize], &[u32])>)
        -> Result<Vec<f32>, CaptionError>;
    fn vocab_size(&self) -> usize;
}

/// Transformers' "impossible" score, added in f32 as it does.
const PENALTY: f32 = -1.0e9;

fn log_softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    let log_sum = sum.ln();
    for x in row.iter_mut() {
        *x = *x - max - log_sum;
    }
}

/// Indices of the `k` largest values, largest first (ties: lower index first, as a stable sort).
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let by_value = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, by_value);
        idx.truncate(k);
    }
    idx.sort_by(by_value);
    idx
}

/// Greedy decoding of `items` sequences that all start with `prompt`; returns the generated
/// tokens of each (end token included when produced).
pub fn greedy(
    model: &mut dyn NextToken,
    items: usize,
    prompt_len: usize,
    cfg: &GenerationConfig,
) -> Result<Vec<Vec<u32>>, CaptionError> {
    let vocab = model.vocab_size();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); items];
    // Rows still running, as indices into `out`, in the decoder's row order.
    let mut running: Vec<usize> = (0..items).collect();
    let mut logits = model.next_logits(None)?;
    let mut cur_len = prompt_len;
    while cur_len < cfg.max_length && !running.is_empty() {
        let mut parents = Vec::new();
        let mut tokens = Vec::new();
        for (row, &item) in running.iter().enumerate() {
            let scores = &mut logits[row * vocab..(row + 1) * vocab];
            if cur_len < cfg.min_length {
                scores[cfg.eos as usize] = f32::NEG_INFINITY;
            }
            // argmax, first index on ties (as torch.argmax).
            let token = top_k(scores, 1)[0] as u32;
            out[item].push(token);
            if token != cfg.eos {
                parents.push(row);
                tokens.push(token);
            }
        }
        cur_len += 1;
        running = parents.iter().map(|&row| running[row]).collect();
        if running.is_empty() || cur_len >= cfg.max_length {
            break;
        }
        logits = model.next_logits(Some((&parents, &tokens)))?;
    }
    Ok(out)
}

/// One running beam or finished hypothesis of one image.
#[derive(Debug, Clone)]
struct Beam {
    /// Generated tokens (the prompt is not repeated here).
    tokens: Vec<u32>,
    score: f32,
    /// For a running beam: the previous running beam it extends, and the token it added.
    last_step: Option<(usize, u32)>,
}

/// The search state of one image.
struct ImageBeams {
    running: Vec<Beam>,
    /// `num_beams` slots, best first; placeholders have score -1e9 and `finished == false`.
    hypotheses: Vec<(Beam, bool)>,
    improvable: bool,
}

/// A candidate continuation: which running beam it extends, with which token, at what score.
struct Candidate {
    parent: usize,
    token: u32,
    score: f32,
    hits_stop: bool,
}

/// Beam search over `items` images whose decoder rows were started as `num_beams` identical
/// rows per image (image-major); returns the best hypothesis' generated tokens per image.
pub fn beam_search(
    model: &mut dyn NextToken,
    items: usize,
    prompt_len: usize,
    cfg: &GenerationConfig,
) -> Result<Vec<Vec<u32>>, CaptionError> {
    let nb = cfg.num_beams;
    let k = 2 * nb;
    let vocab = model.vocab_size();
    if vocab < k {
        return Err(CaptionError::Model(format!(
            "a vocabulary of {vocab} tokens is too small for {nb} beams"
        )));
    }
    let start = |score| Beam { tokens: Vec::new(), score, last_step: None };
    let mut images: Vec<ImageBeams> = (0..items)
        .map(|_| ImageBeams {
            running: (0..nb).map(|b| start(if b == 0 { 0.0 } else { PENALTY })).collect(),
            hypotheses: (0..nb).map(|_| (start(PENALTY), false)).collect(),
            improvable: true,
        })
        .collect();
    // The images whose rows the decoder holds, in row order (`nb` rows each).
    let mut active: Vec<usize> = (0..items).collect();
    let mut logits = model.next_logits(None)?;
    let mut cur_len = prompt_len;
    loop {
        let mut all_hit_stop = true;
        for (slot, &item) in active.iter().enumerate() {
            let image = &mut images[item];
            let rows = &mut logits[slot * nb * vocab..(slot + 1) * nb * vocab];
            for (b, row) in rows.chunks_exact_mut(vocab).enumerate() {
                log_softmax(row);
                if cur_len < cfg.min_length {
                    row[cfg.eos as usize] = f32::NEG_INFINITY;
                }
                let running_score = image.running[b].score;
                row.iter_mut().for_each(|x| *x += running_score);
            }
            let candidates: Vec<Candidate> = top_k(rows, k)
                .into_iter()
                .map(|i| {
                    let token = (i % vocab) as u32;
                    Candidate {
                        parent: i / vocab,
                        token,
                        score: rows[i],
                        hits_stop: token == cfg.eos || cur_len + 1 >= cfg.max_length,
                    }
                })
                .collect();
            all_hit_stop &= candidates.iter().all(|c| c.hits_stop);
            update_image(image, &candidates, cur_len + 1 - prompt_len, cfg);
        }
        cur_len += 1;
        for &item in &active {
            let image = &mut images[item];
            let best_running =
                image.running[0].score / ((cur_len - prompt_len) as f32).powf(cfg.length_penalty);
            let worst = image.hypotheses.iter().map(|(h, _)| h.score).fold(f32::INFINITY, f32::min);
            let beatable = image
                .hypotheses
                .iter()
                .any(|(_, finished)| best_running > if *finished { worst } else { PENALTY });
            image.improvable &= beatable;
        }
        if all_hit_stop || active.iter().all(|&i| !images[i].improvable) {
            break;
        }
        // Rows of images that are done are dropped: their hypotheses can no longer change.
        let mut parents = Vec::new();
        let mut tokens = Vec::new();
        let mut still = Vec::new();
        for (slot, &item) in active.iter().enumerate() {
            if !images[item].improvable {
                continue;
            }
            still.push(item);
            for beam in &images[item].running {
                let (parent, token) = beam.last_step.expect("running beams were just extended");
                parents.push(slot * nb + parent);
                tokens.push(token);
            }
        }
        active = still;
        logits = model.next_logits(Some((&parents, &tokens)))?;
    }
    Ok(images.into_iter().map(|image| image.hypotheses[0].0.tokens.clone()).collect())
}

/// One step of one image: the new running beams, and the hypotheses merged with the candidates
/// that just finished among the top `num_beams`.
fn update_image(
    image: &mut ImageBeams,
    candidates: &[Candidate],
    generated_len: usize,
    cfg: &GenerationConfig,
) {
    let nb = cfg.num_beams;
    let extend = |c: &Candidate| {
        let mut tokens = image.running[c.parent].tokens.clone();
        tokens.push(c.token);
        tokens
    };
    let penalised: Vec<f32> =
        candidates.iter().map(|c| c.score + if c.hits_stop { PENALTY } else { 0.0 }).collect();
    let running: Vec<Beam> = top_k(&penalised, nb)
        .into_iter()
        .map(|i| Beam {
            tokens: extend(&candidates[i]),
            score: penalised[i],
            last_step: Some((candidates[i].parent, candidates[i].token)),
        })
        .collect();

    let norm = (generated_len as f32).powf(cfg.length_penalty);
    let mut merged = image.hypotheses.clone();
    for (rank, c) in candidates.iter().enumerate() {
        let just_finished = c.hits_stop && rank < nb;
        // The penalties one after the other, as transformers adds them (f32 rounding included).
        let mut score = c.score / norm;
        if !image.improvable {
            score += PENALTY;
        }
        if !just_finished {
            score += PENALTY;
        }
        merged.push((Beam { tokens: extend(c), score, last_step: None }, just_finished));
    }
    let scores: Vec<f32> = merged.iter().map(|(b, _)| b.score).collect();
    image.hypotheses = top_k(&scores, nb).into_iter().map(|i| merged[i].clone()).collect();
    image.running = running;
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 0;
    const A: u32 = 1;
    const B: u32 = 2;
    const V: usize = 8;

    /// A Markov "decoder": each row's next-token log-probabilities depend on its last token only.
    struct Markov {
        rows: Vec<u32>,
        table: fn(Option<u32>) -> [f32; V],
        calls: usize,
    }

    impl NextToken for Markov {
        fn next_logits(
            &mut self,
            extend: Option<(&[usize], &[u32])>,
        ) -> Result<Vec<f32>, CaptionError> {
            self.calls += 1;
            let last: Vec<Option<u32>> = match extend {
                None => self.rows.iter().map(|_| None).collect(),
                Some((parents, tokens)) => {
                    assert_eq!(parents.len(), tokens.len());
                    self.rows = tokens.to_vec();
                    tokens.iter().map(|&t| Some(t)).collect()
                }
            };
            Ok(last.into_iter().flat_map(|t| (self.table)(t)).collect())
        }
        fn vocab_size(&self) -> usize {
            V
        }
    }

    fn ln(p: [f32; V]) -> [f32; V] {
        p.map(|x| if x > 0.0 { x.ln() } else { -30.0 })
    }

    /// Greedy takes A (0.5) and then wanders; B (0.4) is followed by the end token with 0.9.
    fn trap(last: Option<u32>) -> [f32; V] {
        match last {
            None => ln([0.0, 0.5, 0.4, 0.025, 0.025, 0.025, 0.025, 0.0]),
            Some(B) => ln([0.9, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0]),
            Some(_) => ln([0.01, 0.0, 0.0, 0.3, 0.25, 0.2, 0.14, 0.1]),
        }
    }

    fn cfg(num_beams: usize, min_length: usize, max_length: usize) -> GenerationConfig {
        GenerationConfig { max_length, min_length, eos: EOS, num_beams, length_penalty: 1.0 }
    }

    #[test]
    fn greedy_takes_the_likeliest_token_until_max_length() {
        let mut m = Markov { rows: vec![0], table: trap, calls: 0 };
        let out = greedy(&mut m, 1, 1, &cfg(1, 0, 6)).unwrap();
        assert_eq!(out, vec![vec![A, 3, 3, 3, 3]]);
    }

    #[test]
    fn beam_search_finds_the_likelier_sequence_greedy_misses() {
        let mut m = Markov { rows: vec![0; 2], table: trap, calls: 0 };
        let out = beam_search(&mut m, 1, 1, &cfg(2, 0, 6)).unwrap();
        assert_eq!(out, vec![vec![B, EOS]]);
    }

    #[test]
    fn min_length_forbids_the_end_token_while_the_sequence_is_short() {
        // The end token is the likeliest after B, but not allowed until 4 tokens ([DEC] B x x).
        let mut m = Markov { rows: vec![0; 2], table: trap, calls: 0 };
        let out = beam_search(&mut m, 1, 1, &cfg(2, 4, 8)).unwrap();
        assert!(out[0].len() >= 4 && !out[0][..3].contains(&EOS), "{out:?}");
        let mut m = Markov { rows: vec![0], table: trap, calls: 0 };
        let out = greedy(&mut m, 1, 1, &cfg(1, 4, 8)).unwrap();
        assert!(!out[0][..3].contains(&EOS), "{out:?}");
    }

    /// A sequence that can never end: the end token is impossible everywhere.
    fn endless(_: Option<u32>) -> [f32; V] {
        ln([0.0, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1])
    }

    #[test]
    fn max_length_counts_the_prompt() {
        let mut m = Markov { rows: vec![0; 3], table: endless, calls: 0 };
        let out = beam_search(&mut m, 1, 3, &cfg(3, 0, 10)).unwrap();
        assert_eq!(out[0].len(), 7);
        assert_eq!(m.calls, 7);
    }

    #[test]
    fn finished_hypotheses_are_ranked_by_mean_log_probability() {
        // Ending at once costs ln 0.3 over 1 token; going on costs ln 0.7 + ln 0.55 over 2; any
        // longer sequence adds at best ln 0.3 per token.
        fn table(last: Option<u32>) -> [f32; V] {
            match last {
                None => ln([0.3, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
                Some(A) => ln([0.55, 0.0, 0.45, 0.0, 0.0, 0.0, 0.0, 0.0]),
                Some(_) => ln([0.1, 0.0, 0.0, 0.3, 0.2, 0.2, 0.2, 0.0]),
            }
        }
        let mut m = Markov { rows: vec![0; 2], table, calls: 0 };
        let out = beam_search(&mut m, 1, 1, &cfg(2, 0, 5)).unwrap();
        // mean(ln .7, ln .55) = -0.477 beats ln .3 = -1.20 (a raw sum would too, so also check
        // the case where only the mean prefers the longer one).
        assert_eq!(out, vec![vec![A, EOS]]);
        fn table2(last: Option<u32>) -> [f32; V] {
            match last {
                None => ln([0.45, 0.55, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
                Some(A) => ln([0.6, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0]),
                Some(_) => ln([0.1, 0.0, 0.0, 0.3, 0.2, 0.2, 0.2, 0.0]),
            }
        }
        // Sums: ln .45 = -0.80 beats ln .55 + ln .6 = -1.11; means: -0.80 loses to -0.55.
        let mut m = Markov { rows: vec![0; 2], table: table2, calls: 0 };
        assert_eq!(beam_search(&mut m, 1, 1, &cfg(2, 0, 5)).unwrap(), vec![vec![A, EOS]]);
    }

    #[test]
    fn images_of_a_batch_are_searched_independently() {
        let mut one = Markov { rows: vec![0; 2], table: trap, calls: 0 };
        let single = beam_search(&mut one, 1, 1, &cfg(2, 3, 8)).unwrap();
        let mut three = Markov { rows: vec![0; 6], table: trap, calls: 0 };
        let batch = beam_search(&mut three, 3, 1, &cfg(2, 3, 8)).unwrap();
        assert_eq!(batch, vec![single[0].clone(); 3]);
    }

    #[test]
    fn top_k_orders_by_value_then_index() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
    }
}
