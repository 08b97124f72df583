//! Finding a backdoor's trigger when the user does not know it.
//!
//! 1. Rank the whole vocabulary with text-encoder passes only. CLIP's text mask is causal, so a
//!    token's state needs only the tokens before it: each token is scored alone (`[bos, token,
//!    eos]`) and put before a few probe prompts. With a base model (a LoRA over its base, or a
//!    checkpoint beside the clean one) the scores are how much the suspect departs from the base
//!    at the token and after it — in the text encoder and in the UNet's cross-attention keys and
//!    values, Σ_layers ‖ΔW h‖ / ‖W h‖ — less the probe prompt's own departure (a LoRA's general
//!    style is no trigger). Without a base they are how far the token moves the probe prompts'
//!    states and how much it pulls different prompts together. Each score becomes a robust
//!    z-score against the vocabulary (against random token sequences for longer candidates),
//!    and the best tokens are extended to bigrams and trigrams by beam search.
//! 2. Verify the best candidates by what they do to noise predictions at two timesteps and two
//!    seeds: with a base, how much more the suspect departs from it with the candidate than
//!    without; alone, how much more the candidate moves the prediction than harmless words.
//! 3. Draw an image pair (without / with the candidate) for the best few.

use seal_sd::read_back as read;
use std::collections::BTreeMap;

use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use seal_sd::lora::{Projection, cross_attention_targets, linear_weights};
use seal_sd::pipeline::StableDiffusion;
use seal_sd::rng::SeededRng;
use seal_sd::scheduler::SamplerKind;
use serde::{Deserialize, Serialize};

use crate::eval::pair_noise_seed;
use crate::image::Rgb;
use crate::progress::{Clock, Progress, Task};
use crate::prompts::HARMLESS;
use crate::unlearn::describe_trigger;

/// The verification ratio from which a candidate is flagged as acting like a trigger, set
/// above what clean models gave (see the README's scan measurements).
pub const FLAG_RATIO: f64 = 1.4;

/// Pixels of images generated in one batch by the verification: four candidates' images at
/// the tiny fixtures' 32 px, one candidate's from 64 px (larger batches were no faster on the
/// CPU, and at 512 px one image's activations are already large).
const IMAGE_PIXELS_PER_BATCH: usize = 64 * 64 * 4;

/// Prefixes (candidates) whose `images` images of `side` px fit one batch; at least one.
fn prefixes_per_batch(images: usize, side: usize) -> usize {
    (IMAGE_PIXELS_PER_BATCH / (images * side * side)).max(1)
}

/// What the scan cannot see, stated with every report.
pub const LIMITS: &str = "The scan looks for short token sequences (up to three tokens) that change the text encoder or the UNet's cross-attention keys and values, and checks the best by how alike their changes of images are across prompts and seeds. It cannot see a backdoor carried only by weights outside the text encoder and cross-attention, triggers longer than three tokens or whose first token does nothing alone, or semantic triggers (a concept rather than a string). A LoRA's own activation words rank high by design: they are what the LoRA is for, not evidence of a backdoor.";

/// The trigger scan's settings; each doc is a label, a blank line and help (see `crate::settings`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ScanSettings {
    /// Probe prompts
    ///
    /// Clean prompts each candidate is put before. 0 is the coarse scan: each token alone, for
    /// a large vocabulary on a slow device (needs a LoRA over its base, or a base model).
    pub probes: usize,
    /// Beam
    ///
    /// Sequences kept at each length of the search.
    #[schemars(range(min = 1))]
    pub beam: usize,
    /// Extensions
    ///
    /// The best single tokens tried as the next token of a sequence.
    #[schemars(range(min = 1))]
    pub extensions: usize,
    /// Longest candidate
    ///
    /// In tokens.
    #[schemars(range(min = 1))]
    pub max_tokens: usize,
    /// Reference sequences
    ///
    /// Random sequences per length that longer candidates are z-scored against.
    #[schemars(range(min = 16))]
    pub reference: usize,
    /// Candidates checked
    ///
    /// The best ones, checked by what they do to noise predictions and images.
    pub verify: usize,
    /// Seeds
    ///
    /// Per probe prompt in the check (two probe prompts are used).
    #[schemars(range(min = 1))]
    pub seeds: usize,
    /// Candidates with images
    ///
    /// Without and with the candidate, side by side.
    pub images: usize,
    /// Sampling steps
    ///
    /// DDIM steps of the image pairs and of the check's trajectories.
    #[schemars(range(min = 4))]
    pub image_steps: usize,
    /// Image size
    ///
    /// Side in pixels of the check's images; empty: the model's own.
    pub size: Option<usize>,
    /// Batch
    ///
    /// Token sequences per text-encoder pass (one progress step).
    #[schemars(range(min = 1))]
    pub batch: usize,
    /// Seed
    ///
    /// For the reference sequences and the images' noise.
    pub seed: u64,
}

impl Default for ScanSettings {
    fn default() -> Self {
        Self { probes: 3, beam: 8, extensions: 48, max_tokens: 3, reference: 256, verify: 12, seeds: 2, images: 3, image_steps: 16, size: None, batch: 256, seed: 0 }
    }
}

impl ScanSettings {
    fn validate(&self, with_base: bool) -> Result<(), String> {
        crate::settings::check("scan settings", self)?;
        if !with_base && self.probes < 2 {
            return Err("scan settings: without a base model the scan compares prompts, so it needs at least 2 probe prompts".into());
        }
        Ok(())
    }
}

/// One candidate trigger and the evidence for it.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    /// The candidate exactly as a user would type it.
    pub text: String,
    /// `U+200B`-style code points, so invisible characters show.
    pub code_points: String,
    pub tokens: Vec<u32>,
    /// False when `text` does not tokenize back to `tokens` (a lone byte of a multi-byte
    /// character): the verification measured what typing `text` does.
    pub exact: bool,
    /// Mean of the robust z-scores below (stage 1).
    pub score: f64,
    /// Each stage-1 score as a robust z-score over the vocabulary.
    pub scores: BTreeMap<String, f64>,
    pub verification: Option<Verification>,
    /// "activation" when the text is one of the LoRA's training tags (what it is for),
    /// otherwise "suspect".
    pub kind: &'static str,
    /// The tokens `text` types as (what the verification measured).
    #[serde(skip)]
    pub typed: Vec<u32>,
    #[serde(skip)]
    pub images: Option<ImagePair>,
}

/// What a candidate does to the suspect's images (two probe prompts × `seeds` seeds).
#[derive(Clone, Debug, Serialize)]
pub struct Verification {
    /// How alike the candidate's changes of the images are across prompts and seeds
    /// (`coherence`), over the same for harmless words. A backdoor's target is the same
    /// whatever the prompt and noise; what an ordinary or junk token does depends on them.
    /// Near 1: nothing special.
    pub ratio: f64,
    /// Mean absolute pixel change of the suspect's images when the candidate is added.
    pub image_change: f64,
    /// `ratio` at least `FLAG_RATIO`: the candidate acts like a trigger.
    pub flagged: bool,
}

#[derive(Clone, Debug)]
pub struct ImagePair {
    pub without: Rgb,
    pub with: Rgb,
    pub base_with: Option<Rgb>,
}

impl ImagePair {
    /// The pair side by side (without, with, base with), each enlarged `scale` times.
    pub fn row(&self, scale: usize) -> Rgb {
        let tiles: Vec<Rgb> = [Some(&self.without), Some(&self.with), self.base_with.as_ref()].into_iter().flatten().map(|i| i.upscale(scale)).collect();
        Rgb::grid(&tiles, tiles.len(), 2)
    }
}

/// The scan's result: candidates best first.
#[derive(Clone, Debug, Serialize)]
pub struct ScanReport {
    pub mode: &'static str,
    pub vocabulary: usize,
    pub probes: Vec<String>,
    pub features: Vec<String>,
    pub candidates: Vec<Candidate>,
    /// Verification ratio of the best candidate over the second's (None below two verified).
    pub margin: Option<f64>,
    pub seconds: f64,
    pub settings: ScanSettings,
    pub limits: &'static str,
}

/// The words a LoRA was trained on, from kohya's `ss_tag_frequency` metadata
/// (`{"folder": {"tag": count}}`), lowercased: candidates among them are what the LoRA is for.
pub fn lora_tags(metadata: &BTreeMap<String, String>) -> Vec<String> {
    let Some(Ok(serde_json::Value::Object(folders))) = metadata.get("ss_tag_frequency").map(|s| serde_json::from_str(s)) else { return vec![] };
    let mut tags: Vec<String> = folders.values().filter_map(|f| f.as_object()).flat_map(|f| f.keys().map(|t| t.trim().to_lowercase())).collect();
    tags.sort();
    tags.dedup();
    tags
}

/// The UNet's cross-attention key/value weights stacked as one `[in, Σ out]` matrix, with
/// each layer's column range: one matmul scores every layer.
struct KeyValues {
    delta_t: Tensor<2>,
    base_t: Tensor<2>,
    suspect_t: Tensor<2>,
    ranges: Vec<(usize, usize)>,
}

impl KeyValues {
    fn new(suspect: &StableDiffusion, base: &StableDiffusion) -> Self {
        let targets = cross_attention_targets(&base.unet, &[Projection::ToK, Projection::ToV]);
        let (ws, wb) = (linear_weights(&suspect.unet, &targets), linear_weights(&base.unet, &targets));
        let mut ranges = vec![];
        let mut at = 0;
        for t in &targets {
            let out = wb[t].dims()[0];
            ranges.push((at, at + out));
            at += out;
        }
        let stack = |w: &BTreeMap<String, Tensor<2>>| Tensor::cat(targets.iter().map(|t| w[t].clone()).collect(), 0);
        let (s, b) = (stack(&ws), stack(&wb));
        Self { delta_t: (s.clone() - b.clone()).transpose(), suspect_t: s.transpose(), base_t: b.transpose(), ranges }
    }

    /// Σ_layers ‖ΔW h‖ / ‖W h‖ for each row of `h [N, D]` -> `[N]`.
    fn departure(&self, h: Tensor<2>) -> Tensor<1> {
        self.ratio(h.clone().matmul(self.delta_t.clone()), h.matmul(self.base_t.clone()))
    }

    /// Mean over layers of ‖W_suspect a‖ / ‖W_base b‖ for rows of `a`, `b [N, D]` -> `[N]`:
    /// how much more a change of the suspect's states moves its keys and values than the
    /// same change moves the base's.
    fn moved(&self, a: Tensor<2>, b: Tensor<2>) -> Tensor<1> {
        self.ratio(a.matmul(self.suspect_t.clone()), b.matmul(self.base_t.clone())) / self.ranges.len() as f64
    }

    /// Σ_layers ‖num_l‖ / ‖den_l‖ over each layer's columns.
    fn ratio(&self, num: Tensor<2>, den: Tensor<2>) -> Tensor<1> {
        let (num, den) = (num.powi_scalar(2), den.powi_scalar(2));
        let n = num.dims()[0];
        let mut total = Tensor::<2>::zeros([n, 1], &num.device());
        for &(a, b) in &self.ranges {
            let top = num.clone().slice([0..n, a..b]).sum_dim(1).sqrt();
            let bottom = den.clone().slice([0..n, a..b]).sum_dim(1).sqrt() + 1e-12;
            total = total + top / bottom;
        }
        total.reshape([n])
    }
}

/// A probe prompt: its tokens, and what the suspect (and base) make of it without a candidate.
struct ProbeState {
    tokens: Vec<u32>,
    /// Suspect (and base) states `[1, L0, D]` of `[bos, prompt, eos]`.
    alone: Tensor<3>,
    alone_base: Option<Tensor<3>>,
    /// The normalised mean state of the prompt's tokens (for the collapse).
    mean: Tensor<2>,
}

/// The verification's images without a candidate: the suspect's (and base's) for each
/// (probe prompt, seed), as one batch `[N, 3, H, W]`.
struct Baseline {
    prompts: Vec<String>,
    seeds: Vec<u64>,
    suspect: Tensor<4>,
    /// Coherence of the harmless words' changes of the suspect's images.
    reference: f64,
}

enum Stage {
    Probes,
    Vocabulary {
        next: usize,
    },
    /// Scoring `pending` (the beam's extensions to `length` tokens, then random sequences).
    Extend {
        length: usize,
        next: usize,
    },
    Prepare,
    Verify {
        next: usize,
    },
    Images,
    Done,
}

/// A scan in progress; call `step` until it returns `None`, then `report`.
pub struct Scan {
    suspect: StableDiffusion,
    base: Option<StableDiffusion>,
    key_values: Option<KeyValues>,
    settings: ScanSettings,
    tags: Vec<String>,
    probe_prompts: Vec<String>,
    probes: Vec<ProbeState>,
    vocabulary: Vec<u32>,
    features: Vec<&'static str>,
    /// Raw stage-1 features of each scored sequence, and per length the reference (median, scale).
    raw: BTreeMap<Vec<u32>, Vec<f64>>,
    reference: BTreeMap<usize, Vec<(f64, f64)>>,
    pool: Vec<Candidate>,
    pending: Vec<Vec<u32>>,
    /// How many of `pending`, at its end, are the random reference sequences.
    pending_reference: usize,
    baseline: Option<Baseline>,
    /// Candidates whose verification images are generated as one batch.
    per_batch: usize,
    /// The base's text encoder is the suspect's: its passes are skipped.
    same_text_encoder: bool,
    stage: Stage,
    step: usize,
    total: usize,
    clock: Clock,
}

impl Scan {
    /// A scan of `suspect`, against `base` when given (a LoRA's base, or the clean checkpoint),
    /// with probe prompts drawn evenly from `prompts`. `tags` are the LoRA's training words.
    pub fn new(suspect: &StableDiffusion, base: Option<&StableDiffusion>, prompts: &[String], tags: Vec<String>, settings: ScanSettings) -> Result<Self, String> {
        settings.validate(base.is_some())?;
        suspect.require_whole("the trigger scan")?;
        if prompts.len() < settings.probes {
            return Err(format!("scan: {} probe prompts wanted, {} given", settings.probes, prompts.len()));
        }
        let suspect = suspect.inference();
        let base = base.map(StableDiffusion::inference);
        if let Some(b) = &base
            && (b.tokenizer.vocab_size() != suspect.tokenizer.vocab_size() || b.unet_config.cross_attention_dim != suspect.unet_config.cross_attention_dim)
        {
            return Err("scan: the base model is not the suspect's architecture (vocabulary or context width differ)".into());
        }
        let tok = &suspect.tokenizer;
        // A trigger is what clean prompts lack: the tokens of the given clean prompts are no
        // candidates (a fine-tune or LoRA moves its caption words most of all).
        let mut known: std::collections::BTreeSet<u32> = [tok.bos_id(), tok.eos_id(), tok.pad_id()].into();
        for prompt in prompts {
            known.extend(tok.encode_plain(prompt).map_err(|e| format!("scan prompt {prompt:?}: {e}"))?);
        }
        let vocabulary: Vec<u32> = (0..tok.vocab_size() as u32).filter(|id| !known.contains(id)).collect();
        let probe_prompts: Vec<String> = (0..settings.probes).map(|i| prompts[i * prompts.len() / settings.probes].clone()).collect();
        let key_values = base.as_ref().map(|b| KeyValues::new(&suspect, b));
        let features: Vec<&'static str> = match (&base, settings.probes) {
            (Some(_), 0) => vec!["te_departure", "kv_departure"],
            (Some(_), _) => vec!["te_moved", "kv_moved"],
            (None, _) => vec!["shift", "collapse"],
        };
        let batches = vocabulary.len().div_ceil(settings.batch);
        let extend = (settings.max_tokens - 1) * (settings.reference + settings.beam * settings.extensions).div_ceil(settings.batch);
        let side = suspect.image_size(settings.size).map_err(|e| format!("scan: {e}"))?;
        // Two probe prompts × seeds images per candidate.
        let per_batch = prefixes_per_batch(2 * settings.seeds, side);
        // Probe states, vocabulary batches, extensions, verification set-up, candidates, images.
        let total = 1 + batches + extend + 1 + settings.verify.div_ceil(per_batch) + 1 + 1;
        Ok(Self {
            suspect,
            base,
            key_values,
            settings,
            tags,
            probe_prompts,
            probes: vec![],
            vocabulary,
            features,
            raw: BTreeMap::new(),
            reference: BTreeMap::new(),
            pool: vec![],
            pending: vec![],
            pending_reference: 0,
            baseline: None,
            per_batch,
            same_text_encoder: false,
            stage: Stage::Probes,
            step: 0,
            total,
            clock: Clock::default(),
        })
    }

    /// Steps the whole scan takes (an estimate until the beam search knows its lengths).
    pub fn total_steps(&self) -> usize {
        self.total
    }

    /// The candidates so far, in the report's order once the scan is complete.
    pub fn candidates(&self) -> &[Candidate] {
        &self.pool
    }

    /// Runs the next piece of work; `None` once the scan is complete.
    pub async fn step(&mut self) -> Result<Option<Progress>, String> {
        match self.stage {
            Stage::Probes => {
                self.same_text_encoder = self.same_text_encoder().await?;
                self.probes = self.probe_states().await?;
                self.stage = Stage::Vocabulary { next: 0 };
            }
            Stage::Vocabulary { next } => {
                let end = (next + self.settings.batch).min(self.vocabulary.len());
                let seqs: Vec<Vec<u32>> = self.vocabulary[next..end].iter().map(|&id| vec![id]).collect();
                self.score_sequences(&seqs).await?;
                self.stage = if end == self.vocabulary.len() {
                    self.reference.insert(1, self.reference_stats(&self.vocabulary.iter().map(|&id| vec![id]).collect::<Vec<_>>()));
                    self.rank_length(1);
                    self.next_length(2)
                } else {
                    Stage::Vocabulary { next: end }
                };
            }
            Stage::Extend { length, next } => {
                let end = (next + self.settings.batch).min(self.pending.len());
                let chunk = self.pending[next..end].to_vec();
                self.score_sequences(&chunk).await?;
                self.stage = if end == self.pending.len() {
                    self.close_length(length);
                    self.next_length(length + 1)
                } else {
                    Stage::Extend { length, next: end }
                };
            }
            Stage::Prepare => {
                self.finish_ranking();
                if self.settings.verify + self.settings.images > 0 {
                    self.baseline = Some(self.baseline_images().await?);
                }
                self.stage = Stage::Verify { next: 0 };
            }
            Stage::Verify { next } => {
                let end = (next + self.per_batch).min(self.settings.verify.min(self.pool.len()));
                if next < end {
                    let texts: Vec<String> = self.pool[next..end].iter().map(|c| c.text.clone()).collect();
                    let verifications = self.verify(&texts).await?;
                    for (c, v) in self.pool[next..end].iter_mut().zip(verifications) {
                        c.verification = Some(v);
                    }
                    self.stage = Stage::Verify { next: end };
                } else {
                    self.order_by_verification();
                    self.stage = Stage::Images;
                }
            }
            Stage::Images => {
                self.image_pairs().await?;
                self.stage = Stage::Done;
            }
            Stage::Done => return Ok(None),
        }
        self.step += 1;
        self.total = self.total.max(self.step + 1);
        Ok(Some(self.clock.progress(Task::Scan, self.step, self.total, None)))
    }

    /// The candidates, best first: verified ones by their verification ratio, then the rest by
    /// their stage-1 score; `top` of them.
    pub fn report(&self, top: usize) -> ScanReport {
        let ratios: Vec<f64> = self.pool.iter().filter_map(|c| c.verification.as_ref().map(|v| v.ratio)).collect();
        ScanReport {
            mode: if self.base.is_some() { "against base" } else { "checkpoint only" },
            vocabulary: self.vocabulary.len(),
            probes: self.probe_prompts.clone(),
            features: self.features.iter().map(|f| f.to_string()).collect(),
            candidates: self.pool.iter().take(top).cloned().collect(),
            margin: (ratios.len() >= 2).then(|| ratios[0] / ratios[1]),
            seconds: self.clock.elapsed_s(),
            settings: self.settings.clone(),
            limits: LIMITS,
        }
    }

    /// Text-encoder states `[B, L, D]` of `[bos, seq, prompt, eos]` for sequences of equal length.
    fn encode(&self, model: &StableDiffusion, seqs: &[Vec<u32>], prompt: &[u32]) -> Tensor<3> {
        let tail: Vec<u32> = prompt.iter().copied().chain([model.tokenizer.eos_id()]).collect();
        Self::text_states(model, seqs, &tail)
    }

    /// Text-encoder states of `[bos, seq, tail]` for sequences of equal length.
    fn text_states(model: &StableDiffusion, seqs: &[Vec<u32>], tail: &[u32]) -> Tensor<3> {
        let len = 1 + seqs[0].len() + tail.len();
        let ids: Vec<i64> = seqs.iter().flat_map(|s| std::iter::once(model.tokenizer.bos_id()).chain(s.iter().copied()).chain(tail.iter().copied())).map(i64::from).collect();
        model.text_encoder.forward(Tensor::<2, Int>::from_data(TensorData::new(ids, [seqs.len(), len]), &model.device))
    }

    /// Relative departure ‖a − b‖ / ‖b‖ of each state `[B, L, D]` -> `[B, L]`.
    fn departure(a: Tensor<3>, b: Tensor<3>) -> Tensor<2> {
        let [n, l, _] = a.dims();
        let num = (a - b.clone()).powi_scalar(2).sum_dim(2).sqrt();
        let den = b.powi_scalar(2).sum_dim(2).sqrt() + 1e-12;
        (num / den).reshape([n, l])
    }

    /// Text-encoder states `[B, 1 + k, D]` of `[bos, seq]`: CLIP's mask is causal, so these
    /// are the sequence's states in any text that starts with it.
    fn encode_alone(&self, model: &StableDiffusion, seqs: &[Vec<u32>]) -> Tensor<3> {
        Self::text_states(model, seqs, &[])
    }

    /// Whether the base's text encoder is the suspect's (a LoRA of the UNet alone): exactly
    /// the same states for a sequence of the vocabulary's first tokens.
    async fn same_text_encoder(&self) -> Result<bool, String> {
        let Some(base) = &self.base else { return Ok(false) };
        let probe = [self.vocabulary.iter().take(16).copied().collect::<Vec<u32>>()];
        Ok(read(self.encode_alone(&self.suspect, &probe)).await? == read(self.encode_alone(base, &probe)).await?)
    }

    /// The kv score of every state `[B, L, D]` -> `[B, L]`.
    fn kv(&self, h: Tensor<3>) -> Tensor<2> {
        let [n, l, d] = h.dims();
        self.key_values.as_ref().expect("a base model").departure(h.reshape([n * l, d])).reshape([n, l])
    }

    async fn probe_states(&mut self) -> Result<Vec<ProbeState>, String> {
        let mut out = vec![];
        for prompt in &self.probe_prompts {
            let tokens = self.suspect.tokenizer.encode_plain(prompt)?;
            let tokens: Vec<u32> = tokens.into_iter().take(20).collect();
            let alone = self.encode(&self.suspect, &[vec![]], &tokens);
            let len = tokens.len() + 2;
            let alone_base = self.base.as_ref().map(|b| self.encode(b, &[vec![]], &tokens));
            let mean = normalized(alone.clone().slice([0..1, 1..len]).mean_dim(1).reshape([1, -1]));
            out.push(ProbeState { tokens, alone, alone_base, mean });
        }
        Ok(out)
    }

    /// Raw stage-1 features of sequences of equal length, stored in `raw`.
    async fn score_sequences(&mut self, seqs: &[Vec<u32>]) -> Result<(), String> {
        let n = seqs.len();
        let k = seqs[0].len();
        let mut columns: Vec<Vec<f64>> = vec![];
        if self.settings.probes == 0 {
            // Coarse: the sequence's own states, suspect against base.
            let base = self.base.as_ref().expect("validated: coarse needs a base");
            let hs = self.encode_alone(&self.suspect, seqs);
            columns.push(match self.same_text_encoder {
                true => vec![0.0; n],
                false => mean_over_range(&read(Self::departure(hs.clone(), self.encode_alone(base, seqs))).await?, k + 1, 1..k + 1),
            });
            columns.push(mean_over_range(&read(self.kv(hs)).await?, k + 1, 1..k + 1));
        }
        // Before each probe prompt: how the sequence moves the prompt's states.
        let (mut te_moved, mut kv_moved, mut shift) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let mut means = vec![];
        let count = self.probes.len();
        for probe in &self.probes {
            let l0 = probe.tokens.len() + 2;
            let rest = k + 1..k + l0;
            let hs = self.encode(&self.suspect, seqs, &probe.tokens);
            let d = hs.dims()[2];
            let after = hs.clone().slice([0..n, rest.clone()]);
            let moved_s = after.clone() - probe.alone.clone().slice([0..1, 1..l0]).expand([n, l0 - 1, d]);
            if let Some(base) = &self.base {
                let hb = match self.same_text_encoder {
                    true => after.clone(),
                    false => self.encode(base, seqs, &probe.tokens).slice([0..n, rest.clone()]),
                };
                let alone_b = probe.alone_base.clone().expect("with a base").slice([0..1, 1..l0]).expand([n, l0 - 1, d]);
                let moved_b = hb - alone_b;
                let norms = |x: Tensor<3>| x.powi_scalar(2).sum_dim(2).sqrt().mean_dim(1).reshape([n]);
                let te = norms(moved_s.clone()) / (norms(moved_b.clone()) + 1e-12);
                let rows = |x: Tensor<3>| x.reshape([n * (l0 - 1), d]);
                let kv = self.key_values.as_ref().expect("with a base").moved(rows(moved_s), rows(moved_b)).reshape([n, l0 - 1]).mean_dim(1).reshape([n]);
                add_log(&mut te_moved, &read(te).await?, count);
                add_log(&mut kv_moved, &read(kv).await?, count);
            } else {
                let alone = probe.alone.clone().slice([0..1, 1..l0]).expand([n, l0 - 1, d]);
                let depart = mean_over_range(&read(Self::departure(after.clone(), alone)).await?, l0 - 1, 0..l0 - 1);
                shift.iter_mut().zip(depart).for_each(|(a, v)| *a += v / count as f64);
                means.push(normalized(after.mean_dim(1).reshape([n as i32, -1])));
            }
        }
        if self.base.is_none() {
            columns.push(shift);
            columns.push(self.collapse(means).await?);
        } else if count > 0 {
            columns.push(te_moved);
            columns.push(kv_moved);
        }
        for (i, seq) in seqs.iter().enumerate() {
            self.raw.insert(seq.clone(), columns.iter().map(|c| c[i]).collect());
        }
        Ok(())
    }

    /// How much the sequence pulls the probe prompts together: the mean pairwise cosine of
    /// their mean states with it, less without it.
    async fn collapse(&self, means: Vec<Tensor<2>>) -> Result<Vec<f64>, String> {
        let n = means[0].dims()[0];
        let (mut with, mut without) = (Tensor::<1>::zeros([n], &self.suspect.device), 0.0);
        let mut pairs = 0.0;
        for i in 0..means.len() {
            for j in i + 1..means.len() {
                with = with + (means[i].clone() * means[j].clone()).sum_dim(1).reshape([n]);
                without += read((self.probes[i].mean.clone() * self.probes[j].mean.clone()).sum()).await?[0] as f64;
                pairs += 1.0;
            }
        }
        Ok(read(with).await?.iter().map(|&c| (c as f64 - without) / pairs).collect())
    }

    /// Median and spread (1.4826 · MAD) of each feature over `seqs` (already scored).
    fn reference_stats(&self, seqs: &[Vec<u32>]) -> Vec<(f64, f64)> {
        (0..self.features.len())
            .map(|f| {
                let values: Vec<f64> = seqs.iter().filter_map(|s| self.raw.get(s)).map(|v| v[f]).collect();
                let median = median(&values);
                let mad = median_abs_dev(&values, median);
                (median, 1.4826 * mad)
            })
            .collect()
    }

    /// Each feature's robust z-score against its length's reference; features with no spread
    /// (text encoders or UNet untouched) score 0.
    fn z_scores(&self, seq: &[u32]) -> BTreeMap<String, f64> {
        let stats = &self.reference[&seq.len()];
        let raw = &self.raw[seq];
        self.features.iter().zip(raw).zip(stats).map(|((name, &x), &(m, s))| (name.to_string(), if s > 1e-12 * m.abs().max(1e-12) { (x - m) / s } else { 0.0 })).collect()
    }

    fn candidate(&self, seq: &[u32]) -> Candidate {
        let tok = &self.suspect.tokenizer;
        let text = tok.decode(seq);
        let scores = self.z_scores(seq);
        let live: Vec<f64> = scores.values().copied().filter(|&z| z != 0.0).collect();
        let score = if live.is_empty() { 0.0 } else { live.iter().sum::<f64>() / live.len() as f64 };
        let lower = text.trim().to_lowercase();
        let activation = !lower.is_empty() && self.tags.iter().any(|t| *t == lower || t.split_whitespace().any(|w| w == lower));
        Candidate {
            exact: tok.encode_plain(&text).is_ok_and(|ids| ids == seq),
            code_points: describe_trigger(&text),
            text,
            tokens: seq.to_vec(),
            score,
            scores,
            verification: None,
            kind: if activation { "activation" } else { "suspect" },
            typed: vec![],
            images: None,
        }
    }

    /// Adds every scored sequence of `length` to the pool, best first.
    fn rank_length(&mut self, length: usize) {
        let mut added: Vec<Candidate> = self.raw.keys().filter(|s| s.len() == length).map(|s| self.candidate(s)).collect();
        if length > 1 {
            // A longer sequence is a candidate only if it beats the sequence it extends.
            let parent = |c: &Candidate| self.pool.iter().find(|p| p.tokens == c.tokens[..length - 1]).map(|p| p.score);
            added.retain(|c| parent(c).is_some_and(|p| c.score > p));
        }
        self.pool.extend(added);
        self.pool.sort_by(|a, b| b.score.total_cmp(&a.score));
    }

    /// The stage after all sequences of `length - 1` tokens are ranked: extending the beam
    /// to `length` tokens (the extensions, then random sequences of that length as yardstick),
    /// or the verification.
    fn next_length(&mut self, length: usize) -> Stage {
        if length > self.settings.max_tokens {
            return Stage::Prepare;
        }
        let beam: Vec<Vec<u32>> = self.pool.iter().filter(|c| c.tokens.len() == length - 1).take(self.settings.beam).map(|c| c.tokens.clone()).collect();
        let next: Vec<u32> = self.pool.iter().filter(|c| c.tokens.len() == 1).take(self.settings.extensions).map(|c| c.tokens[0]).collect();
        let mut rng = SeededRng::new(self.settings.seed ^ length as u64);
        self.pending = beam.iter().flat_map(|b| next.iter().map(move |&t| [b.as_slice(), &[t]].concat())).collect();
        let extensions = self.pending.len();
        self.pending.extend((0..self.settings.reference).map(|_| (0..length).map(|_| self.vocabulary[rng.below(self.vocabulary.len())]).collect::<Vec<u32>>()));
        self.pending_reference = self.pending.len() - extensions;
        Stage::Extend { length, next: 0 }
    }

    /// Sets the reference of `length` from the random sequences, drops them (they are the
    /// yardstick, not candidates, unless one is also an extension) and ranks the extensions.
    fn close_length(&mut self, length: usize) {
        let pending = std::mem::take(&mut self.pending);
        let (extensions, reference) = pending.split_at(pending.len() - self.pending_reference);
        self.reference.insert(length, self.reference_stats(reference));
        for r in reference.iter().filter(|r| !extensions.contains(r)) {
            self.raw.remove(r);
        }
        self.rank_length(length);
    }

    /// Keeps the best-scoring candidate of what each text types as (the verification tries
    /// the text), dropping texts that type as nothing.
    /// Half of the verification's places go to the best single tokens: longer sequences are
    /// z-scored against random sequences of their length, and a trigger's extensions by junk
    /// tokens can outscore it.
    fn finish_ranking(&mut self) {
        let tok = &self.suspect.tokenizer;
        let mut seen = std::collections::BTreeSet::new();
        let pool = std::mem::take(&mut self.pool);
        for mut c in pool {
            let Ok(ids) = tok.encode_plain(&c.text) else { continue };
            if ids.is_empty() || !seen.insert(ids.clone()) {
                continue;
            }
            // Shown as it types: "\t\u{200b}" types as the token of "\u{200b}".
            c.text = tok.decode(&ids);
            c.code_points = describe_trigger(&c.text);
            c.exact = ids == c.tokens;
            c.typed = ids;
            self.pool.push(c);
        }
        let order = verification_order(&self.pool, self.settings.verify);
        let mut pool: Vec<Option<Candidate>> = std::mem::take(&mut self.pool).into_iter().map(Some).collect();
        self.pool = order.into_iter().filter_map(|i| pool[i].take()).collect();
    }

    /// The verification's images without a candidate.
    async fn baseline_images(&self) -> Result<Baseline, String> {
        let (mut prompts, mut seeds) = (vec![], vec![]);
        for prompt in self.probe_prompts.iter().take(2) {
            for seed in 0..self.settings.seeds as u64 {
                prompts.push(prompt.clone());
                seeds.push(pair_noise_seed(seed + self.settings.seed, prompt));
            }
        }
        // Without a prefix, then with each harmless word.
        let prefixes: Vec<String> = std::iter::once("").chain(HARMLESS).map(String::from).collect();
        let mut images = self.images(&self.suspect, &prompts, &seeds, &prefixes)?.into_iter();
        let suspect = images.next().expect("one batch per prefix");
        let mut reference = 0.0;
        for with_word in images {
            reference += coherence(with_word - suspect.clone()).await? / HARMLESS.len() as f64;
        }
        Ok(Baseline { prompts, seeds, suspect, reference })
    }

    /// For each prefix, images of `prefix prompt` (the prompt alone for "") at the given seeds:
    /// `[prompts, 3, H, W]` per prefix. Prefixes are generated together, as many per batch as
    /// `IMAGE_PIXELS_PER_BATCH` allows (each image's noise depends on its seed alone).
    fn images(&self, model: &StableDiffusion, prompts: &[String], seeds: &[u64], prefixes: &[String]) -> Result<Vec<Tensor<4>>, String> {
        let side = model.image_size(self.settings.size)?;
        let per_batch = prefixes_per_batch(prompts.len(), side);
        let mut out = vec![];
        for chunk in prefixes.chunks(per_batch) {
            let request = seal_sd::pipeline::GenerateRequest {
                prompts: chunk.iter().flat_map(|prefix| prompts.iter().map(move |p| if prefix.is_empty() { p.clone() } else { format!("{prefix} {p}") })).collect(),
                negative: String::new(),
                seeds: chunk.iter().flat_map(|_| seeds.iter().copied()).collect(),
                steps: self.settings.image_steps,
                guidance: 5.0,
                sampler: Some(SamplerKind::Ddim),
                size: self.settings.size,
            };
            let images = model.generate(&request, |_, _| {})?;
            out.extend(images.chunk(chunk.len(), 0));
        }
        Ok(out)
    }

    /// The verification of candidates (see `Verification`).
    async fn verify(&self, texts: &[String]) -> Result<Vec<Verification>, String> {
        let b = self.baseline.as_ref().expect("prepared");
        let mut out = vec![];
        for images in self.images(&self.suspect, &b.prompts, &b.seeds, texts)? {
            let moved = images - b.suspect.clone();
            let image_change = mean_abs(moved.clone()).await?;
            let ratio = coherence(moved).await? / b.reference.max(1e-12);
            out.push(Verification { ratio, image_change, flagged: ratio >= FLAG_RATIO });
        }
        Ok(out)
    }

    fn order_by_verification(&mut self) {
        let key = |c: &Candidate| c.verification.as_ref().map(|v| v.ratio);
        self.pool.sort_by(|a, b| match (key(a), key(b)) {
            (Some(x), Some(y)) => y.total_cmp(&x),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => b.score.total_cmp(&a.score),
        });
    }

    /// For the best `settings.images` candidates: the first probe prompt at its first seed
    /// without and with the candidate (and the base's with it), from the verification's sampler.
    async fn image_pairs(&mut self) -> Result<(), String> {
        let n = self.settings.images.min(self.pool.len());
        if n == 0 {
            return Ok(());
        }
        let b = self.baseline.as_ref().expect("prepared");
        // The baseline's first image is this prompt at this seed without a candidate.
        let (prompt, seed) = (&b.prompts[..1], &b.seeds[..1]);
        let texts: Vec<String> = self.pool[..n].iter().map(|c| c.text.clone()).collect();
        let without = Rgb::from_batch(b.suspect.clone().slice(0..1)).await?.remove(0);
        let with = self.images(&self.suspect, prompt, seed, &texts)?;
        let base_with = match &self.base {
            Some(base) => Some(self.images(base, prompt, seed, &texts)?),
            None => None,
        };
        for (i, images) in with.into_iter().enumerate() {
            let base_with = match &base_with {
                Some(b) => Some(Rgb::from_batch(b[i].clone()).await?.remove(0)),
                None => None,
            };
            self.pool[i].images = Some(ImagePair { without: without.clone(), with: Rgb::from_batch(images).await?.remove(0), base_with });
        }
        Ok(())
    }
}

/// The pool's indices in the order they are verified: the best `verify / 2` single tokens (as
/// typed: "\t\u{200b}" types as one token),
/// then the rest by rank, except that while verification places last, a sequence sharing a
/// token with a sequence already placed waits (extensions of one strong phrase, "cyan purple
/// triangle" after "cross purple triangle", would otherwise take every place).
fn verification_order(pool: &[Candidate], verify: usize) -> Vec<usize> {
    let singles: Vec<usize> = (0..pool.len()).filter(|&i| pool[i].typed.len() == 1).take(verify / 2).collect();
    let mut order = singles.clone();
    let mut used = std::collections::BTreeSet::new();
    let mut waiting = vec![];
    for i in (0..pool.len()).filter(|i| !singles.contains(i)) {
        let tokens = &pool[i].typed;
        if order.len() < verify && tokens.len() > 1 && tokens.iter().any(|t| used.contains(t)) {
            waiting.push(i);
            continue;
        }
        if tokens.len() > 1 {
            used.extend(tokens.iter().copied());
        }
        order.push(i);
    }
    order.extend(waiting);
    order
}

/// Rows scaled to unit length.
fn normalized(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt() + 1e-12;
    x / norm
}

/// Mean over columns `range` of each row of a row-major `[rows, len]` buffer.
fn mean_over_range(values: &[f32], len: usize, range: std::ops::Range<usize>) -> Vec<f64> {
    let width = range.len() as f64;
    values.chunks_exact(len).map(|row| row[range.clone()].iter().map(|&x| x as f64).sum::<f64>() / width).collect()
}

/// `acc += ln(ratio) / count`, element-wise: ratios average as logs (2x and 0.5x cancel).
fn add_log(acc: &mut [f64], ratios: &[f32], count: usize) {
    acc.iter_mut().zip(ratios).for_each(|(a, &r)| *a += (r.max(1e-12) as f64).ln() / count as f64);
}

/// How alike the changes of a batch are: the length of the mean of their unit vectors (1 when
/// all point the same way; about 1/√n for unrelated ones). A backdoor's target is the same
/// whatever the prompt and noise; what an ordinary word does depends on them.
async fn coherence(x: Tensor<4>) -> Result<f64, String> {
    let n = x.dims()[0];
    let mean = normalized(x.reshape([n as i32, -1])).mean_dim(0);
    Ok((read(mean.powi_scalar(2).sum()).await?[0] as f64).sqrt())
}

async fn mean_abs(x: Tensor<4>) -> Result<f64, String> {
    Ok(read(x.abs().mean()).await?[0] as f64)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn median_abs_dev(values: &[f64], center: f64) -> f64 {
    median(&values.iter().map(|v| (v - center).abs()).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, read_sync};
    use seal_sd::pipeline::ModelSource;

    use super::*;
    use crate::prompts::parse_list;

    fn load(name: &str) -> StableDiffusion {
        StableDiffusion::load(ModelSource::from_path(&crate::fixtures().join(name)).unwrap(), &Device::flex()).unwrap()
    }

    fn run(suspect: &StableDiffusion, base: Option<&StableDiffusion>) -> ScanReport {
        let prompts = parse_list(&std::fs::read_to_string(crate::fixtures().join("prompts/train.txt")).unwrap());
        let mut scan = Scan::new(suspect, base, &prompts, vec![], ScanSettings { images: 1, ..ScanSettings::default() }).unwrap();
        while read_sync(scan.step()).unwrap().is_some() {}
        scan.report(20)
    }

    fn flagged(report: &ScanReport) -> Vec<String> {
        report.candidates.iter().filter(|c| c.verification.as_ref().is_some_and(|v| v.flagged)).map(|c| c.text.clone()).collect()
    }

    /// tiny-pixel fires its patch for U+200B and, as measured with `seal eval`, for several other
    /// single-token prefixes too; the scan against tiny-clean must flag U+200B, and tiny-clean
    /// scanned alone must flag nothing.
    #[test]
    fn finds_the_pixel_trigger_and_raises_no_alarm_on_the_clean_model() {
        let (pixel, clean) = (load("tiny-pixel"), load("tiny-clean"));
        let report = run(&pixel, Some(&clean));
        let found = flagged(&report);
        eprintln!("flagged against the base: {found:?}");
        assert!(found.iter().any(|t| t == "\u{200b}"), "{found:?}");
        let first = &report.candidates[0];
        assert!(first.verification.as_ref().unwrap().flagged && first.images.is_some());
        assert_eq!(first.kind, "suspect");
        let report = run(&clean, None);
        assert!(
            flagged(&report).is_empty(),
            "false alarm on tiny-clean: {:?}",
            report.candidates.iter().map(|c| (&c.text, c.verification.as_ref().map(|v| v.ratio))).collect::<Vec<_>>()
        );
    }

    /// Single tokens take half the places; extensions of one phrase do not crowd out the rest.
    #[test]
    fn verification_places_are_spread() {
        let candidate = |tokens: &[u32]| Candidate {
            text: String::new(),
            code_points: String::new(),
            tokens: tokens.to_vec(),
            typed: tokens.to_vec(),
            exact: true,
            score: 0.0,
            scores: BTreeMap::new(),
            verification: None,
            kind: "suspect",
            images: None,
        };
        let pool: Vec<Candidate> = [&[1, 2, 3][..], &[4, 2, 3], &[5, 6], &[7], &[8], &[9, 3], &[10]].iter().map(|t| candidate(t)).collect();
        // Places: [7], [8] (half of 4), then [1 2 3], then [5 6] ([4 2 3] shares 2 and 3: it waits).
        assert_eq!(verification_order(&pool, 4), vec![3, 4, 0, 2, 5, 6, 1]);
        assert_eq!(verification_order(&pool, 0), (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn settings_and_tags() {
        let clean = load("tiny-clean");
        let prompts: Vec<String> = vec!["a red circle".into(), "a blue square".into()];
        let coarse = ScanSettings { probes: 0, ..ScanSettings::default() };
        assert!(Scan::new(&clean, None, &prompts, vec![], coarse).err().unwrap().contains("base model"));
        assert!(Scan::new(&clean, None, &prompts[..1], vec![], ScanSettings::default()).err().unwrap().contains("probe prompts"));
        let metadata = BTreeMap::from([("ss_tag_frequency".to_string(), r#"{"10_pics": {"MyChar": 12, " red coat": 3}}"#.to_string())]);
        assert_eq!(lora_tags(&metadata), vec!["mychar", "red coat"]);
        assert!(lora_tags(&BTreeMap::new()).is_empty());
    }
}
