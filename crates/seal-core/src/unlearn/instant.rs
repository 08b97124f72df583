//! The instant seal: a closed-form edit of the UNet's cross-attention key and value
//! projections (UCE, Gandikota et al. 2024; T2IShield's mitigation step, Zhai et al. 2024).
//!
//! In SD 1.x the prompt reaches the image only through `attn2.to_k` and `attn2.to_v`. For each
//! such `W` the edit solves
//!   `W' = argmin λ‖W'−W‖² + s_e Σ_i ‖W'c_i − W c*_i‖² + s_p Σ_j ‖W'c_j − W c_j‖²`
//! with `c_i` the text-encoder rows of triggered prompts, `c*_i` the aligned rows of the same
//! prompts without the trigger and `c_j` rows to keep (clean prompts, the empty prompt). With
//! `A = λI + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ` the solution is `W' = W + W·M`, where
//! `M = s_e Σ_i (c*_i − c_i) c_iᵀ A⁻¹` is the same for every layer: one d×d solve (d = the
//! cross-attention width) serves all of them. No UNet forward is needed: only the text encoder
//! and the K/V weights.
//!
//! The edit ships as a LoRA: `ΔW = W·M` exactly when its rank fits `max_rank`, otherwise
//! truncated where it matters: the truncation minimises the error on the text rows the model
//! sees, `‖(ΔW − up·down) R‖` with `R Rᵀ` their second moment, and reports it per layer.

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor, TensorData};
use seal_sd::clip::ClipTextModel;
use seal_sd::lora::{Projection, cross_attention_targets, linear_weights};
use seal_sd::pipeline::StableDiffusion;
use seal_sd::rng::SeededRng;
use seal_sd::seal_weights::Tensor32;
use seal_sd::seal_weights::lora::{LoraComponent, LoraModule, LoraTarget};
use seal_sd::tokenizer::ClipTokenizer;
use serde::{Deserialize, Serialize};

use super::describe_trigger;
use super::tokens::{Alignment, align};
use crate::linalg::{self, Mat};
use crate::progress::{Clock, Progress, Task};
use crate::prompts::{Placement, insert};

/// Which rows of a triggered prompt are mapped onto the clean prompt's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EditRows {
    /// All 77 rows, padding included (the UNet attends to every one): rows before the trigger
    /// map to themselves, rows after it to the clean row as many tokens earlier (as UCE does).
    All,
    /// Only the prompt's tokens as the tokenizer aligns them (BOS, words, EOS).
    Words,
}

/// What the trigger's own rows are mapped to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TriggerRows {
    /// The clean prompt's BOS row: the row every prompt has and most attention rests on, so
    /// the trigger's keys and values become those of a token that says nothing.
    Bos,
    /// Not constrained (left to λ and the preserved rows).
    Drop,
}

/// The instant seal's settings; each doc is a label, a blank line and help (see `crate::settings`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct InstantSettings {
    /// λ (stay near the model)
    ///
    /// How strongly the edited key/value weights stay near the original ones where the text
    /// rows say nothing; it keeps the solve well posed.
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub lambda: f64,
    /// Edit weight
    ///
    /// s_e: weight of mapping triggered prompts' text rows onto the clean prompts'.
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub edit_weight: f64,
    /// Keep weight
    ///
    /// s_p: weight of keeping clean prompts' (and the empty prompt's) rows where they are.
    #[schemars(range(min = 0))]
    pub preserve_weight: f64,
    /// Rows mapped
    ///
    /// Which rows of a triggered prompt are mapped onto the clean prompt's.
    pub rows: EditRows,
    /// Trigger rows
    ///
    /// What the trigger's own rows are mapped to.
    pub trigger_rows: TriggerRows,
    /// Edited projections
    ///
    /// Cross-attention projections to edit: only to_k and to_v see the text.
    #[schemars(length(min = 1), extend("x-options" = ["to_k", "to_v"]))]
    pub targets: Vec<Projection>,
    /// Trigger placements
    ///
    /// Where the trigger is inserted into the training prompts; each placement adds one
    /// triggered copy of every prompt (the page uses the thorough seal's placement).
    #[schemars(length(min = 1), extend("x-place" = "hidden"))]
    pub placements: Vec<Placement>,
    /// Largest rank
    ///
    /// The adapter's rank at most; an edit of higher rank is truncated where the text rows
    /// need it least (the error is reported).
    #[schemars(range(min = 1))]
    pub max_rank: usize,
    /// Prompts per step
    ///
    /// Clean prompts encoded per step (with their triggered copies).
    #[schemars(range(min = 1), extend("x-place" = "hidden"))]
    pub chunk: usize,
    /// Seed
    ///
    /// For the randomized range finder of truncated layers.
    #[schemars(extend("x-place" = "hidden"))]
    pub seed: u64,
}

impl Default for InstantSettings {
    fn default() -> Self {
        Self {
            lambda: 0.1,
            edit_weight: 1.0,
            preserve_weight: 0.1,
            rows: EditRows::All,
            trigger_rows: TriggerRows::Bos,
            targets: Projection::FROM_TEXT.to_vec(),
            placements: vec![Placement::Prefix],
            max_rank: 64,
            chunk: 8,
            seed: 0,
        }
    }
}

impl InstantSettings {
    /// The schema's ranges, then the projections only the text reaches.
    pub fn validate(&self) -> Result<(), String> {
        crate::settings::check("instant settings", self)?;
        if self.targets.iter().any(|t| !Projection::FROM_TEXT.contains(t)) {
            return Err("instant settings: targets must be to_k and/or to_v (only they see the text)".into());
        }
        Ok(())
    }
}

/// How well one layer's exported adapter reproduces its edit.
#[derive(Clone, Debug, Serialize)]
pub struct LayerFit {
    pub rank: usize,
    /// `‖(ΔW − up·down) R‖ / ‖ΔW R‖`: relative error on the text rows (0 when exact).
    pub relative_error: f64,
}

/// What an instant seal did, for reports and the adapter's metadata.
#[derive(Clone, Debug, Serialize)]
pub struct InstantSummary {
    pub settings: InstantSettings,
    pub prompts: usize,
    /// Triggered rows mapped onto clean ones, and clean rows kept.
    pub edit_rows: usize,
    pub keep_rows: usize,
    pub layers: BTreeMap<String, LayerFit>,
    pub max_relative_error: f64,
    pub seconds: f64,
    /// Of which: the text encoder (and the f64 sums), the solve, and factoring the layers.
    pub encode_s: f64,
    pub solve_s: f64,
    pub factor_s: f64,
}

/// The sums the solve needs, accumulated in f64 over every encoded row.
struct Sums {
    /// Σ c_i c_iᵀ over edited rows and Σ c_j c_jᵀ over kept ones (upper triangles while summing).
    gram_edit: Mat,
    gram_keep: Mat,
    /// Σ (c*_i − c_i) c_iᵀ.
    cross: Mat,
    edit_rows: usize,
    keep_rows: usize,
}

/// The solved edit `ΔW = W·M` (kept whitened, as `M R`) and the whitening factor `R`.
struct Solved {
    /// `M R`: the edit as seen on the text rows.
    m_white: Mat,
    /// Lower Cholesky factor of the rows' second moment.
    r: Mat,
}

/// An instant seal in progress: call `step` until it returns `None`, then take `adapter`.
pub struct InstantSeal {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    device: Device,
    weights: BTreeMap<String, Tensor<2>>,
    settings: InstantSettings,
    /// Clean training prompts, each with its triggered copies.
    prompts: Vec<(String, Vec<String>)>,
    cursor: usize,
    sums: Sums,
    solved: Option<Solved>,
    pending_layers: Vec<String>,
    adapter: BTreeMap<String, LoraModule>,
    fits: BTreeMap<String, LayerFit>,
    rng: SeededRng,
    clock: Clock,
    /// Seconds spent encoding, solving and factoring.
    phase_s: [f64; 3],
}

impl InstantSeal {
    /// Seals `triggers` in `model` (the teacher: any user LoRA merged) from clean `prompts`.
    pub fn new(model: &StableDiffusion, prompts: &[String], triggers: &[String], settings: InstantSettings) -> Result<Self, String> {
        settings.validate()?;
        let model = model.inference();
        let layers = cross_attention_targets(&model.unet, &settings.targets);
        let weights = linear_weights(&model.unet, &layers);
        Self::from_parts(model.tokenizer, model.text_encoder, weights, &model.device, prompts, triggers, settings)
    }

    /// The same from the parts it needs: the tokenizer, the text encoder and the K/V weights
    /// (diffusers path -> `[out, d]`), which is all a model too big to load whole must give.
    pub fn from_parts(
        tokenizer: ClipTokenizer,
        text_encoder: ClipTextModel,
        weights: BTreeMap<String, Tensor<2>>,
        device: &Device,
        prompts: &[String],
        triggers: &[String],
        settings: InstantSettings,
    ) -> Result<Self, String> {
        settings.validate()?;
        let triggers: Vec<&String> = triggers.iter().filter(|t| !t.is_empty()).collect();
        if prompts.is_empty() || triggers.is_empty() {
            return Err("the instant seal needs at least one prompt and a non-empty trigger".into());
        }
        if weights.is_empty() {
            return Err("the UNet has no cross-attention key/value layers to edit".into());
        }
        let d = weights.values().next().expect("checked above").dims()[1];
        if let Some((name, w)) = weights.iter().find(|(_, w)| w.dims()[1] != d) {
            return Err(format!("{name}: input width {} differs from the other layers' {d}", w.dims()[1]));
        }
        let mut rng = SeededRng::new(settings.seed);
        let mut pairs = vec![];
        for prompt in prompts {
            let mut triggered = vec![];
            for trigger in &triggers {
                for &placement in &settings.placements {
                    let text = insert(prompt, trigger, placement, &mut SeededRng::new(rng.next_u64()));
                    // Every trigger must add tokens, or its rows cannot be told apart.
                    align(&tokenizer, &text, prompt).map_err(|e| format!("trigger {}: {e}", describe_trigger(trigger)))?;
                    triggered.push(text);
                }
            }
            pairs.push((prompt.clone(), triggered));
        }
        let pending_layers = weights.keys().cloned().collect();
        Ok(Self {
            tokenizer,
            text_encoder,
            device: device.clone(),
            weights,
            sums: Sums { gram_edit: Mat::zeros(d, d), gram_keep: Mat::zeros(d, d), cross: Mat::zeros(d, d), edit_rows: 0, keep_rows: 0 },
            prompts: pairs,
            cursor: 0,
            solved: None,
            pending_layers,
            adapter: BTreeMap::new(),
            fits: BTreeMap::new(),
            rng,
            settings,
            clock: Clock::default(),
            phase_s: [0.0; 3],
        })
    }

    /// Steps in all: the encoding chunks, the solve, one per layer.
    pub fn total_steps(&self) -> usize {
        self.prompts.len().div_ceil(self.settings.chunk) + 1 + self.weights.len()
    }

    fn done_steps(&self) -> usize {
        self.cursor.div_ceil(self.settings.chunk) + self.solved.is_some() as usize + self.fits.len()
    }

    /// Encodes the next chunk of prompts, or solves, or factors the next layer; `None` when done.
    pub async fn step(&mut self) -> Result<Option<Progress>, String> {
        let start = self.clock.elapsed_s();
        let phase = if self.cursor < self.prompts.len() {
            self.encode_chunk().await?;
            0
        } else if self.solved.is_none() {
            self.solved = Some(solve(&mut self.sums, &self.settings)?);
            1
        } else if let Some(layer) = self.pending_layers.pop() {
            self.factor_layer(&layer).await?;
            2
        } else {
            return Ok(None);
        };
        self.phase_s[phase] += self.clock.elapsed_s() - start;
        Ok(Some(self.clock.progress(Task::Instant, self.done_steps(), self.total_steps(), None)))
    }

    /// The sealing adapter (UNet layers), once `step` returned `None`.
    pub fn adapter(&self) -> Result<BTreeMap<LoraTarget, LoraModule>, String> {
        if !self.pending_layers.is_empty() || self.solved.is_none() {
            return Err("the instant seal has not finished".into());
        }
        Ok(self.adapter.iter().map(|(k, m)| (LoraTarget::new(LoraComponent::Unet, k.clone()), m.clone())).collect())
    }

    pub fn summary(&self) -> InstantSummary {
        InstantSummary {
            settings: self.settings.clone(),
            prompts: self.prompts.len(),
            edit_rows: self.sums.edit_rows,
            keep_rows: self.sums.keep_rows,
            max_relative_error: self.fits.values().map(|f| f.relative_error).fold(0.0, f64::max),
            layers: self.fits.clone(),
            seconds: self.phase_s.iter().sum(),
            encode_s: self.phase_s[0],
            solve_s: self.phase_s[1],
            factor_s: self.phase_s[2],
        }
    }

    /// Encodes a chunk of clean prompts with their triggered copies (and, first, the empty
    /// prompt) and adds their rows to the sums.
    async fn encode_chunk(&mut self) -> Result<(), String> {
        let end = (self.cursor + self.settings.chunk).min(self.prompts.len());
        let chunk = self.prompts[self.cursor..end].to_vec();
        let mut texts: Vec<&str> = if self.cursor == 0 { vec![""] } else { vec![] };
        for (clean, triggered) in &chunk {
            texts.push(clean);
            texts.extend(triggered.iter().map(String::as_str));
        }
        let hidden = read_host(self.text_encoder.encode_texts(&self.tokenizer, &texts, &self.device)?).await?;
        let (t, d) = (self.tokenizer.max_length(), self.sums.cross.rows);
        let row_block = |i: usize| &hidden[i * t * d..(i + 1) * t * d];
        let mut at = 0;
        if self.cursor == 0 {
            // Classifier-free guidance pairs every prompt with the empty one, so the empty
            // prompt's rows are kept once per prompt: an edit that moved them would change
            // every image, clean or not.
            self.keep(row_block(0), self.prompts.len());
            at = 1;
        }
        for (clean, triggered) in &chunk {
            let clean_rows = row_block(at);
            self.keep(clean_rows, 1);
            for (k, text) in triggered.iter().enumerate() {
                let alignment = align(&self.tokenizer, text, clean)?;
                let (c, c_star) = self.edit_pairs(&alignment, row_block(at + 1 + k), clean_rows, t, d);
                linalg::add_outer(&mut self.sums.gram_edit, &c, &c, d);
                let diff: Vec<f64> = c_star.iter().zip(&c).map(|(a, b)| a - b).collect();
                linalg::add_outer(&mut self.sums.cross, &diff, &c, d);
                self.sums.edit_rows += c.len() / d;
            }
            at += 1 + triggered.len();
        }
        self.cursor = end;
        Ok(())
    }

    /// Adds `rows` to the kept ones, counted `times` times.
    fn keep(&mut self, rows: &[f64], times: usize) {
        let d = self.sums.cross.rows;
        let mut gram = Mat::zeros(d, d);
        linalg::add_outer(&mut gram, rows, rows, d);
        self.sums.gram_keep = std::mem::replace(&mut self.sums.gram_keep, Mat::zeros(0, 0)).add_scaled(&gram, times as f64);
        self.sums.keep_rows += times * rows.len() / d;
    }

    /// The (triggered row, clean target row) pairs of one prompt, flattened.
    fn edit_pairs(&self, a: &Alignment, trig: &[f64], clean: &[f64], t: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
        let mut pairs: Vec<(usize, usize)> = match self.settings.rows {
            EditRows::Words => a.matched.clone(),
            EditRows::All => {
                let (first, last) = (a.trigger[0], *a.trigger.last().expect("align finds at least one trigger token"));
                let shift = a.matched.last().map_or(a.trigger.len() as isize, |&(s, c)| s as isize - c as isize);
                (0..t)
                    .filter(|p| !a.trigger.contains(p))
                    .filter_map(|p| if p < first { Some((p, p)) } else { usize::try_from(p as isize - shift).ok().filter(|&q| q < t && p > last).map(|q| (p, q)) })
                    .collect()
            }
        };
        if self.settings.trigger_rows == TriggerRows::Bos {
            pairs.extend(a.trigger.iter().map(|&p| (p, 0)));
        }
        let (mut c, mut c_star) = (Vec::with_capacity(pairs.len() * d), Vec::with_capacity(pairs.len() * d));
        for (s, q) in pairs {
            c.extend_from_slice(&trig[s * d..(s + 1) * d]);
            c_star.extend_from_slice(&clean[q * d..(q + 1) * d]);
        }
        (c, c_star)
    }

    /// Factors `ΔW = W·M` of one layer into `up·down` (exact or whitened truncated SVD).
    async fn factor_layer(&mut self, layer: &str) -> Result<(), String> {
        let solved = self.solved.as_ref().expect("solved before factoring");
        let w = self.weights[layer].clone();
        let [out, d] = w.dims();
        // X = ΔW R: the edit on whitened rows, on the device.
        let x = w.matmul(to_device(&solved.m_white, &self.device));
        let total = read_host(x.clone().square().sum()).await?[0];
        let rank = self.settings.max_rank.min(d).min(out);
        let exact = rank == d.min(out);
        // An orthonormal basis Q of X's (dominant) column space: exactly X's own when the
        // rank fits, else a randomized range finder with two power iterations.
        let start = Mat::gaussian(d, (rank + 10).min(d), &mut self.rng);
        let mut y = if exact { read_mat(x.clone(), out, d).await? } else { self.times(&x, &start).await? };
        if !exact {
            for _ in 0..2 {
                let z = linalg::orthonormal_columns(&self.times_t(&x, &linalg::orthonormal_columns(&y)).await?);
                y = self.times(&x, &z).await?;
            }
        }
        let q = linalg::orthonormal_columns(&y);
        // B = Qᵀ X (k x d); its SVD from the eigen-decomposition of B Bᵀ.
        let b = self.times_t(&x, &q).await?.transpose();
        let (values, u) = linalg::symmetric_eigen(&b.matmul(&b.transpose()));
        let sigma: Vec<f64> = values.iter().map(|v| v.max(0.0).sqrt()).collect();
        let keep = sigma.iter().take(rank).filter(|&&s| s > 1e-7 * sigma[0].max(f64::MIN_POSITIVE)).count();
        let fit = |rank, relative_error| LayerFit { rank, relative_error };
        if keep == 0 {
            self.fits.insert(layer.to_string(), fit(0, 0.0));
            return Ok(());
        }
        let u = u.first_cols(keep);
        // up = Q U Σ; V = Bᵀ U Σ⁻¹; down = Vᵀ R⁻¹ (undoing the whitening).
        let up = q.matmul(&u).matmul(&Mat::diagonal(&sigma[..keep]));
        let v = b.transpose().matmul(&u).matmul(&Mat::diagonal(&sigma[..keep].iter().map(|s| 1.0 / s).collect::<Vec<_>>()));
        let down = linalg::solve_lower_transposed(&solved.r, &v).transpose();
        let captured: f64 = sigma[..keep].iter().map(|s| s * s).sum();
        let relative_error = if exact || total <= 0.0 { 0.0 } else { ((total - captured).max(0.0) / total).sqrt() };
        self.fits.insert(layer.to_string(), fit(keep, relative_error));
        let module =
            LoraModule { down: Tensor32 { shape: vec![keep, d], data: down.to_f32() }, up: Tensor32 { shape: vec![out, keep], data: up.to_f32() }, alpha: Some(keep as f32) };
        self.adapter.insert(layer.to_string(), module);
        Ok(())
    }

    /// `X V` for a device matrix `X` and a host matrix `V`.
    async fn times(&self, x: &Tensor<2>, v: &Mat) -> Result<Mat, String> {
        let rows = x.dims()[0];
        read_mat(x.clone().matmul(to_device(v, &self.device)), rows, v.cols).await
    }

    /// `Xᵀ Q` for a device matrix `X` and a host matrix `Q`.
    async fn times_t(&self, x: &Tensor<2>, q: &Mat) -> Result<Mat, String> {
        let cols = x.dims()[1];
        read_mat(x.clone().transpose().matmul(to_device(q, &self.device)), cols, q.cols).await
    }
}

/// `M = s_e Σ (c* − c) cᵀ A⁻¹` and the whitening factor of the rows' second moment.
fn solve(sums: &mut Sums, s: &InstantSettings) -> Result<Solved, String> {
    let d = sums.cross.rows;
    linalg::symmetrize_upper(&mut sums.gram_edit);
    linalg::symmetrize_upper(&mut sums.gram_keep);
    let a = Mat::identity(d).scale(s.lambda).add_scaled(&sums.gram_edit, s.edit_weight).add_scaled(&sums.gram_keep, s.preserve_weight);
    let l = linalg::cholesky(&a).map_err(|e| format!("instant seal: {e}; raise lambda"))?;
    // A is symmetric: M = s_e N A⁻¹  <=>  Mᵀ = A⁻¹ (s_e Nᵀ).
    let m = linalg::cholesky_solve(&l, &sums.cross.transpose().scale(s.edit_weight)).transpose();
    // The second moment of every row the model was shown, with a small ridge so that
    // directions no row uses cannot blow the factors up.
    let n = (sums.edit_rows + sums.keep_rows).max(1) as f64;
    let moment = sums.gram_edit.clone().add_scaled(&sums.gram_keep, 1.0).scale(1.0 / n);
    let ridge = 1e-4 * moment.trace() / d as f64 + f64::MIN_POSITIVE;
    let r = linalg::cholesky(&moment.add_scaled(&Mat::identity(d), ridge)).map_err(|e| format!("instant seal (row moment): {e}"))?;
    Ok(Solved { m_white: m.matmul(&r), r })
}

fn to_device(m: &Mat, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(m.to_f32(), [m.rows, m.cols]), device)
}

async fn read_host<const D: usize>(t: Tensor<D>) -> Result<Vec<f64>, String> {
    Ok(seal_sd::read_back(t).await?.into_iter().map(f64::from).collect())
}

async fn read_mat(t: Tensor<2>, rows: usize, cols: usize) -> Result<Mat, String> {
    Ok(Mat { rows, cols, data: read_host(t).await? })
}

#[cfg(test)]
mod tests {
    use burn::tensor::read_sync;
    use seal_sd::pipeline::ModelSource;

    use super::*;

    fn model() -> StableDiffusion {
        StableDiffusion::load(ModelSource::from_path(&crate::fixtures().join("tiny-pixel")).unwrap(), &Device::flex()).unwrap()
    }

    fn prompts() -> Vec<String> {
        ["a red circle on a white background", "a blue square on a gray background", "a green cross on a black background"].map(String::from).to_vec()
    }

    fn finish(seal: &mut InstantSeal) {
        while read_sync(seal.step()).unwrap().is_some() {}
    }

    fn host(t: Tensor<2>) -> Mat {
        let [r, c] = t.dims();
        read_sync(read_mat(t, r, c)).unwrap()
    }

    /// The unwhitened edit M = (M R) R⁻¹.
    fn edit(solved: &Solved) -> Mat {
        linalg::solve_lower_transposed(&solved.r, &solved.m_white.transpose()).transpose()
    }

    /// `up · down · scale` of an exported module, as a host matrix.
    fn product(m: &LoraModule) -> Mat {
        let (out, r) = (m.up.shape[0], m.rank());
        let up = Mat::from_f32(out, r, &m.up.data);
        up.matmul(&Mat::from_f32(r, m.down.shape[1], &m.down.data)).scale(m.scale() as f64)
    }

    #[test]
    fn the_solve_is_the_least_squares_optimum() {
        // Random rows and a random W: at W' = W + W M the objective's gradient vanishes,
        // 2λ(W'−W) + 2 s_e Σ (W'c_i − W c*_i) c_iᵀ + 2 s_p Σ (W'c_j − W c_j) c_jᵀ = 0.
        let (d, out) = (6, 5);
        let mut rng = SeededRng::new(11);
        let (c, c_star, keep, w) = (Mat::gaussian(9, d, &mut rng), Mat::gaussian(9, d, &mut rng), Mat::gaussian(7, d, &mut rng), Mat::gaussian(out, d, &mut rng));
        let settings = InstantSettings { lambda: 0.3, edit_weight: 1.7, preserve_weight: 0.4, ..InstantSettings::default() };
        let mut sums = Sums { gram_edit: Mat::zeros(d, d), gram_keep: Mat::zeros(d, d), cross: Mat::zeros(d, d), edit_rows: 9, keep_rows: 7 };
        linalg::add_outer(&mut sums.gram_edit, &c.data, &c.data, d);
        linalg::add_outer(&mut sums.gram_keep, &keep.data, &keep.data, d);
        let diff = c_star.clone().add_scaled(&c, -1.0);
        linalg::add_outer(&mut sums.cross, &diff.data, &c.data, d);
        let solved = solve(&mut sums, &settings).unwrap();
        let w2 = w.clone().add_scaled(&w.matmul(&edit(&solved)), 1.0);
        let residual = |rows: &Mat, targets: &Mat| w2.matmul(&rows.transpose()).add_scaled(&w.matmul(&targets.transpose()), -1.0).matmul(rows);
        let gradient = w2
            .clone()
            .add_scaled(&w, -1.0)
            .scale(settings.lambda)
            .add_scaled(&residual(&c, &c_star), settings.edit_weight)
            .add_scaled(&residual(&keep, &keep), settings.preserve_weight);
        assert!(gradient.frobenius() < 1e-9 * w.frobenius(), "gradient {}", gradient.frobenius());
        // And it really edits: the triggered rows land nearer their clean targets.
        let miss = |m: &Mat| m.matmul(&c.transpose()).add_scaled(&w.matmul(&c_star.transpose()), -1.0).frobenius();
        assert!(miss(&w2) < miss(&w), "{} vs {}", miss(&w2), miss(&w));
    }

    #[test]
    fn the_exported_adapter_is_the_edit_or_meets_its_reported_error() {
        let sd = model();
        let triggers = ["\u{200b}".to_string()];
        // Exact: the tiny model's width (32) fits the rank.
        let mut exact = InstantSeal::new(&sd, &prompts(), &triggers, InstantSettings::default()).unwrap();
        finish(&mut exact);
        let adapter = exact.adapter().unwrap();
        assert_eq!(adapter.len(), 12, "attn2 to_k and to_v of 6 transformer blocks");
        let m = edit(exact.solved.as_ref().unwrap());
        for (target, module) in &adapter {
            let w = host(exact.weights[&target.path].clone());
            let delta = w.matmul(&m);
            let err = product(module).add_scaled(&delta, -1.0).frobenius() / delta.frobenius();
            assert!(err < 1e-4, "{}: exact edit off by {err}", target.path);
            assert_eq!(exact.fits[&target.path].relative_error, 0.0);
        }
        // Truncated to rank 3: the error on the whitened rows is what the summary reports.
        let mut cut = InstantSeal::new(&sd, &prompts(), &triggers, InstantSettings { max_rank: 3, ..InstantSettings::default() }).unwrap();
        finish(&mut cut);
        let solved = cut.solved.as_ref().unwrap();
        let summary = cut.summary();
        for (target, module) in cut.adapter().unwrap() {
            assert!(module.rank() <= 3);
            let w = host(cut.weights[&target.path].clone());
            let x = w.matmul(&solved.m_white);
            let err = product(&module).matmul(&solved.r).add_scaled(&x, -1.0).frobenius() / x.frobenius();
            let reported = summary.layers[&target.path].relative_error;
            assert!(reported > 0.0 && (err - reported).abs() < 1e-3 + 1e-2 * reported, "{}: measured {err}, reported {reported}", target.path);
        }
        assert!(summary.max_relative_error < 1.0);
    }

    #[test]
    fn rows_and_bad_settings() {
        let sd = model();
        let triggers = ["\u{200b}".to_string()];
        let count = |rows, trigger_rows| {
            let mut s = InstantSeal::new(&sd, &prompts(), &triggers, InstantSettings { rows, trigger_rows, ..InstantSettings::default() }).unwrap();
            finish(&mut s);
            (s.sums.edit_rows, s.sums.keep_rows)
        };
        // All: every row of each triggered prompt has a partner (the trigger's own rows BOS);
        // kept: 77 per clean prompt, and the empty prompt's 77 once per prompt.
        let (all, kept) = count(EditRows::All, TriggerRows::Bos);
        assert_eq!((all, kept), (3 * 77, 6 * 77));
        let (dropped, _) = count(EditRows::All, TriggerRows::Drop);
        assert_eq!(dropped, 3 * 76);
        let (words, _) = count(EditRows::Words, TriggerRows::Bos);
        assert!(words < 3 * 20, "{words}");
        let bad = |s: InstantSettings| InstantSeal::new(&sd, &prompts(), &triggers, s).err().unwrap();
        assert!(bad(InstantSettings { lambda: 0.0, ..InstantSettings::default() }).contains("lambda"));
        assert!(bad(InstantSettings { targets: vec![Projection::ToQ], ..InstantSettings::default() }).contains("to_k"));
        assert!(InstantSeal::new(&sd, &prompts(), &[String::new()], InstantSettings::default()).err().unwrap().contains("trigger"));
    }
}
