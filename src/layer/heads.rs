//! A layer whose KV heads are split in two (RazorAttention, DuoAttention): retrieval heads
//! keep every token (in a quantized store, or in full precision), streaming heads keep the
//! first `sinks` tokens, `heavy` tokens of the prompt chosen by SnapKV at its end, and the
//! `window` most recent tokens — a [`LayerStore`] whose evicted tokens are freed.
//!
//! Padded batches: a row's pads are hidden slots at the front of both stores; the streaming
//! heads choose their sinks, heavy hitters and window among the row's visible tokens, as
//! the row alone would, and rows that keep fewer tokens are padded with filler slots.

use super::mask;
use super::Quantization;
use crate::error::{KvError, Result};
use crate::policies::{score_layer, ParamValue, Params, ScoreContext};
use crate::quant::QuantizedStore;
use crate::store::{KeptPositions, LayerStore};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

// One per layer, never moved in a loop: the size gap between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum RetrievalPart {
    Empty,
    Full(LayerStore),
    Quantized(QuantizedStore),
}

/// One part of a retrieval-heads layer's attention: the query heads it serves, and either
/// the keys, values and 4-D mask for the model's attention function, or (`kernel`) the
/// quantized kernel's mask ([`super::LayerState::attend_retrieval`]).
#[derive(Debug)]
pub struct HeadPart {
    /// int64 query-head indices (grouped-query heads of the part's KV heads).
    pub query_heads: Tensor,
    pub keys: Option<Tensor>,
    pub values: Option<Tensor>,
    pub mask: Option<Tensor>,
    pub kernel: bool,
}

/// The two head sets of a layer and their stores (see the module documentation).
#[derive(Debug)]
pub struct HeadSplit {
    retrieval: Vec<i64>,
    streaming: Vec<i64>,
    window: usize,
    sinks: usize,
    heavy: usize,
    observation_window: usize,
    quantization: Option<Arc<Quantization>>,
    retrieval_part: RetrievalPart,
    streaming_store: LayerStore,
    seen: usize,
    /// Per batch row: streaming slots at the front never dropped (hidden slots, sinks,
    /// heavy hitters).
    fixed: Vec<usize>,
    /// Per batch row: hidden slots at the front of the streaming store.
    streaming_hidden: Vec<usize>,
    selected: bool,
    prompt_queries: Option<Tensor>,
    dropped: usize,
}

impl HeadSplit {
    /// `retrieval[h]`: whether KV head h keeps every token.
    pub fn new(
        retrieval: &[bool],
        window: usize,
        sinks: usize,
        heavy: usize,
        observation_window: usize,
        quantization: Option<Arc<Quantization>>,
    ) -> Result<Self> {
        if window == 0 {
            return Err(KvError::invalid("window", "got 0, expected at least 1"));
        }
        if observation_window == 0 {
            return Err(KvError::invalid(
                "observation_window",
                "got 0, expected at least 1",
            ));
        }
        let pick = |want: bool| -> Vec<i64> {
            (0..retrieval.len() as i64)
                .filter(|&h| retrieval[h as usize] == want)
                .collect()
        };
        let mut split = HeadSplit {
            retrieval: pick(true),
            streaming: pick(false),
            window,
            sinks,
            heavy,
            observation_window,
            quantization,
            retrieval_part: RetrievalPart::Empty,
            streaming_store: LayerStore::new(),
            seen: 0,
            fixed: vec![],
            streaming_hidden: vec![],
            selected: false,
            prompt_queries: None,
            dropped: 0,
        };
        split.retrieval_part = split.new_retrieval_part()?;
        Ok(split)
    }

    fn new_retrieval_part(&self) -> Result<RetrievalPart> {
        Ok(match (&self.quantization, self.retrieval.is_empty()) {
            (_, true) => RetrievalPart::Empty,
            (Some(q), false) => RetrievalPart::Quantized(q.store()?),
            (None, false) => RetrievalPart::Full(LayerStore::new()),
        })
    }

    /// The same split, empty.
    pub fn emptied(&self) -> Result<Self> {
        let mut flags = vec![false; self.retrieval.len() + self.streaming.len()];
        for &h in &self.retrieval {
            flags[h as usize] = true;
        }
        Self::new(
            &flags,
            self.window,
            self.sinks,
            self.heavy,
            self.observation_window,
            self.quantization.clone(),
        )
    }

    pub fn seen(&self) -> usize {
        self.seen
    }

    pub fn retrieval_heads(&self) -> &[i64] {
        &self.retrieval
    }

    pub fn streaming_heads(&self) -> &[i64] {
        &self.streaming
    }

    /// Tokens each streaming head keeps (the longest row).
    pub fn streaming_kept(&self) -> usize {
        self.streaming_store.len()
    }

    /// Tokens streaming heads dropped (first batch row).
    pub fn streaming_dropped(&self) -> usize {
        self.dropped
    }

    pub(crate) fn batch(&self) -> usize {
        self.streaming_store
            .batch_heads()
            .or(match &self.retrieval_part {
                RetrievalPart::Full(s) => s.batch_heads(),
                RetrievalPart::Quantized(s) => s.shape().map(|s| (s.batch, s.heads)),
                RetrievalPart::Empty => None,
            })
            .map_or(0, |(b, _)| b)
    }

    pub(crate) fn device(&self) -> Device {
        self.streaming_store
            .layout_device()
            .or(match &self.retrieval_part {
                RetrievalPart::Full(s) => s.layout_device(),
                RetrievalPart::Quantized(s) => s.shape().map(|s| s.device),
                RetrievalPart::Empty => None,
            })
            .unwrap_or(Device::Cpu)
    }

    /// Tokens stored in every (batch, kv head) row, row-major.
    pub fn lengths(&self) -> Vec<usize> {
        let heads = self.retrieval.len() + self.streaming.len();
        let streaming = self.streaming_store.len();
        let mut out = vec![];
        for _ in 0..self.batch() {
            for h in 0..heads as i64 {
                out.push(if self.retrieval.contains(&h) {
                    self.seen
                } else {
                    streaming
                });
            }
        }
        out
    }

    /// Bytes held by both parts (the streaming heads' positions included).
    pub fn nbytes(&self) -> usize {
        let retrieval = match &self.retrieval_part {
            RetrievalPart::Full(s) => s.nbytes(),
            RetrievalPart::Quantized(s) => s.nbytes(),
            RetrievalPart::Empty => 0,
        };
        retrieval + self.streaming_store.nbytes()
    }

    fn heads_of(&self, keys: &Tensor, heads: &[i64]) -> Result<Tensor> {
        let index = Tensor::f_from_slice(heads)?.f_to(keys.device())?;
        Ok(keys.f_index_select(1, &index)?)
    }

    /// Appends (batch, kv_heads, q, head_dim) keys/values to both parts; `hidden`: the
    /// layer's hidden slots per row (its pads).
    pub(crate) fn append(
        &mut self,
        keys: &Tensor,
        values: &Tensor,
        hidden: &[usize],
    ) -> Result<()> {
        if !self.retrieval.is_empty() {
            let (rk, rv) = (
                self.heads_of(keys, &self.retrieval)?,
                self.heads_of(values, &self.retrieval)?,
            );
            match &mut self.retrieval_part {
                RetrievalPart::Full(s) => {
                    let _ = s.append(&rk, &rv)?;
                }
                RetrievalPart::Quantized(s) => s.append(&rk, &rv)?,
                RetrievalPart::Empty => {}
            }
        }
        if !self.streaming.is_empty() {
            let (sk, sv) = (
                self.heads_of(keys, &self.streaming)?,
                self.heads_of(values, &self.streaming)?,
            );
            let _ = self.streaming_store.append(&sk, &sv)?;
        }
        self.seen += keys.size()[2] as usize;
        if !self.selected {
            self.streaming_hidden = hidden.to_vec();
        }
        Ok(())
    }

    fn query_heads(&self, kv: &[i64], group: i64, device: Device) -> Result<Tensor> {
        let heads: Vec<i64> = kv
            .iter()
            .flat_map(|&h| (0..group).map(move |g| h * group + g))
            .collect();
        Ok(Tensor::f_from_slice(&heads)?.f_to(device)?)
    }

    /// The prompt's forward: the streaming heads' last queries choose the heavy hitters at
    /// its end.
    pub(crate) fn observe_prompt(&mut self, query: &Tensor) -> Result<()> {
        if self.heavy == 0 || self.streaming.is_empty() || self.selected {
            return Ok(());
        }
        let n_kv = (self.retrieval.len() + self.streaming.len()) as i64;
        let group = query.size()[1] / n_kv;
        let heads = self.query_heads(&self.streaming, group, query.device())?;
        let q = query.size()[2];
        let w = (self.observation_window as i64).min(q);
        self.prompt_queries = Some(
            query
                .f_index_select(1, &heads)?
                .f_narrow(2, q - w, w)?
                .f_detach()?,
        );
        Ok(())
    }

    /// The parts of this forward's attention (`q` new tokens, `q_heads` query heads).
    pub(crate) fn parts(
        &self,
        mask: Option<&Tensor>,
        q: usize,
        q_heads: usize,
    ) -> Result<Vec<HeadPart>> {
        let n_kv = (self.retrieval.len() + self.streaming.len()) as i64;
        let group = q_heads as i64 / n_kv;
        let device = self.device();
        let mut parts = vec![];
        match &self.retrieval_part {
            RetrievalPart::Full(s) => parts.push(HeadPart {
                query_heads: self.query_heads(&self.retrieval, group, device)?,
                keys: Some(s.keys_view()?),
                values: Some(s.values_view()?),
                mask: mask.map(Tensor::shallow_clone),
                kernel: false,
            }),
            RetrievalPart::Quantized(_) => {
                let visible = match mask {
                    Some(m) => {
                        let v = mask::visible_keys(m)?;
                        (q > 1 || v.f_all()?.f_int64_value(&[])? == 0).then_some(v)
                    }
                    None => None,
                };
                parts.push(HeadPart {
                    query_heads: self.query_heads(&self.retrieval, group, device)?,
                    keys: None,
                    values: None,
                    mask: visible,
                    kernel: true,
                });
            }
            RetrievalPart::Empty => {}
        }
        if !self.streaming.is_empty() {
            parts.push(HeadPart {
                query_heads: self.query_heads(&self.streaming, group, device)?,
                keys: Some(self.streaming_store.keys_view()?),
                values: Some(self.streaming_store.values_view()?),
                mask: self.kept_mask(mask, q, group)?,
                kernel: false,
            });
        }
        Ok(parts)
    }

    /// The model's mask restricted to each streaming row's kept positions, as (batch,
    /// streaming query heads, q, kept); without one, causality over them. None when
    /// nothing is masked.
    fn kept_mask(&self, mask: Option<&Tensor>, q: usize, group: i64) -> Result<Option<Tensor>> {
        let positions = self
            .streaming_store
            .kept_positions()?
            .into_uniform()?
            .f_to(self.device())?;
        let fillers = positions.f_lt(0)?;
        let any_filler = fillers.f_any()?.f_int64_value(&[])? != 0;
        let s = positions.size();
        let (batch, heads, kept) = (s[0], s[1], s[2]);
        let out = match mask {
            None => {
                if q == 1 && !any_filler {
                    return Ok(None);
                }
                let query_positions = Tensor::f_arange_start(
                    (self.seen - q) as i64,
                    self.seen as i64,
                    (Kind::Int64, self.device()),
                )?;
                positions
                    .f_unsqueeze(2)?
                    .f_le_tensor(&query_positions.f_view([1, 1, q as i64, 1])?)?
                    .f_logical_and(&fillers.f_logical_not()?.f_unsqueeze(2)?)?
            }
            Some(m) => {
                let qm = m.size()[2];
                let index = positions
                    .f_clamp_min(0)?
                    .f_unsqueeze(2)?
                    .f_expand([batch, heads, qm, kept], false)?;
                let source = m.f_expand([batch, heads, qm, m.size()[3]], false)?;
                let gathered = source.f_gather(3, &index, false)?;
                let hide = fillers
                    .f_unsqueeze(2)?
                    .f_expand([batch, heads, qm, kept], false)?;
                if gathered.kind() == Kind::Bool {
                    gathered.f_logical_and(&hide.f_logical_not()?)?
                } else {
                    gathered.f_masked_fill(&hide, mask::finfo_min(gathered.kind()))?
                }
            }
        };
        Ok(Some(out.f_repeat_interleave_self_int(group, 1, None)?))
    }

    /// Kernel attention of the retrieval heads' queries over their quantized store.
    pub(crate) fn attend_retrieval(
        &self,
        query: &Tensor,
        mask: Option<&Tensor>,
        scaling: f64,
    ) -> Result<Tensor> {
        match &self.retrieval_part {
            RetrievalPart::Quantized(s) => s.attend(query, mask, scaling),
            _ => Err(KvError::State(
                "the retrieval heads are not quantized: attend with the model".into(),
            )),
        }
    }

    /// After each forward: streaming heads drop what fell out of the window (after the
    /// forward, so that its tokens all see each other); after the prompt's forward they
    /// first keep their heavy hitters.
    pub(crate) fn finish_forward(&mut self, hidden: &[usize]) -> Result<()> {
        if self.streaming.is_empty() || self.streaming_store.is_empty() {
            return Ok(());
        }
        if !self.selected {
            self.select_fixed(hidden)?;
            self.selected = true;
        }
        self.slide()
    }

    fn hidden_of(&self, b: usize) -> usize {
        self.streaming_hidden.get(b).copied().unwrap_or(0)
    }

    /// The tokens streaming heads keep for good, chosen once after the prompt: the sinks
    /// and, per (batch row, head), the `heavy` tokens between the sinks and the window
    /// that SnapKV scores highest — in position order, ahead of the window.
    fn select_fixed(&mut self, hidden: &[usize]) -> Result<()> {
        self.streaming_hidden = hidden.to_vec();
        let (keys, values) = (
            self.streaming_store.keys_view()?,
            self.streaming_store.values_view()?,
        );
        let (batch, heads, n) = (
            keys.size()[0] as usize,
            keys.size()[1],
            keys.size()[2] as usize,
        );
        let queries = self.prompt_queries.take();
        let mut rows = vec![];
        let mut fixed_visible = vec![];
        for b in 0..batch {
            let h = self.hidden_of(b);
            let visible = n - h;
            let sinks = self.sinks.min(visible);
            let heavy = self.heavy.min(visible.saturating_sub(sinks + self.window));
            let q = queries
                .as_ref()
                .map(|q| q.f_narrow(0, b as i64, 1))
                .transpose()?;
            match q {
                Some(q) if heavy > 0 => {
                    let row = |t: &Tensor| -> Result<Tensor> {
                        Ok(t.f_narrow(0, b as i64, 1)?
                            .f_narrow(2, h as i64, visible as i64)?)
                    };
                    // SnapKV scores the tokens before its window
                    let w = (q.size()[2] as usize).min(visible - 1);
                    let q = q.f_narrow(2, q.size()[2] - w as i64, w as i64)?;
                    let mut params = Params::new();
                    params.insert("window_size", ParamValue::Int(w as i64));
                    params.insert("kernel_size", ParamValue::Int(5));
                    let scorer = crate::registry::build_scorer("snapkv", params)?;
                    let scores = score_layer(
                        scorer.as_ref(),
                        &row(&keys)?,
                        &row(&values)?,
                        Some(&q),
                        None,
                        &ScoreContext::prefill(0, visible),
                    )?
                    .f_to_kind(Kind::Float)?;
                    let _ = scores
                        .f_narrow(2, 0, sinks as i64)?
                        .f_fill_(f64::NEG_INFINITY)?;
                    let _ = scores
                        .f_narrow(2, (visible - self.window) as i64, self.window as i64)?
                        .f_fill_(f64::NEG_INFINITY)?;
                    let (_, chosen) = scores.f_topk(heavy as i64, -1, true, true)?;
                    let (chosen, _) = chosen.f_sort(-1, false)?;
                    let dev = chosen.device();
                    let front = Tensor::f_arange(sinks as i64, (Kind::Int64, dev))?
                        .f_view([1, 1, -1])?
                        .f_expand([1, heads, sinks as i64], false)?;
                    let back = Tensor::f_arange_start(
                        (visible - self.window) as i64,
                        visible as i64,
                        (Kind::Int64, dev),
                    )?
                    .f_view([1, 1, -1])?
                    .f_expand([1, heads, self.window as i64], false)?;
                    rows.push(Tensor::f_cat(&[front, chosen, back], 2)?.f_add_scalar(h as i64)?);
                    fixed_visible.push(sinks + heavy);
                }
                _ => {
                    // the first tokens, whether or not they have all arrived
                    rows.push(
                        Tensor::f_arange_start(h as i64, n as i64, (Kind::Int64, keys.device()))?
                            .f_view([1, 1, -1])?
                            .f_expand([1, heads, visible as i64], false)?,
                    );
                    fixed_visible.push(self.sinks);
                }
            }
        }
        if rows.iter().all(|r| r.size()[2] as usize == n) {
            self.fixed = fixed_visible;
            return Ok(());
        }
        let kept: Vec<usize> = rows.iter().map(|r| r.size()[2] as usize).collect();
        let width = kept.iter().copied().max().unwrap_or(0);
        let mut joined = vec![];
        self.fixed = vec![];
        let mut new_hidden = vec![];
        for (b, row) in rows.into_iter().enumerate() {
            // the row's pads are not kept: filler slots take their place
            let fill = width - kept[b];
            joined.push(with_fillers(row, fill, heads)?);
            new_hidden.push(fill);
            self.fixed.push(fill + fixed_visible[b]);
        }
        self.dropped += n - kept.first().copied().unwrap_or(n) - self.hidden_of(0);
        self.streaming_hidden = new_hidden;
        self.streaming_store.retain(&Tensor::f_cat(&joined, 0)?)
    }

    /// Drops, in every streaming row, the tokens between its fixed ones and the window.
    fn slide(&mut self) -> Result<()> {
        let n = self.streaming_store.len();
        let (batch, heads) = match self.streaming_store.batch_heads() {
            Some((b, h)) => (b, h as i64),
            None => return Ok(()),
        };
        if self.fixed.len() != batch {
            self.fixed = vec![self.sinks; batch];
        }
        let keeps: Vec<(usize, usize)> = (0..batch)
            .map(|b| {
                let fixed = self.fixed[b].min(n);
                (fixed, n.saturating_sub(self.window).max(fixed))
            })
            .collect();
        if keeps.iter().all(|&(fixed, from)| fixed == from) {
            return Ok(());
        }
        let counts: Vec<usize> = keeps.iter().map(|&(f, from)| f + (n - from)).collect();
        let width = counts.iter().copied().max().unwrap_or(0);
        let mut rows = vec![];
        for (b, &(fixed, from)) in keeps.iter().enumerate() {
            let idx: Vec<i64> = (0..fixed as i64).chain(from as i64..n as i64).collect();
            let row = Tensor::f_from_slice(&idx)?
                .f_view([1, 1, -1])?
                .f_expand([1, heads, idx.len() as i64], false)?;
            let fill = width - counts[b];
            rows.push(with_fillers(row, fill, heads)?);
            self.fixed[b] += fill;
            if b < self.streaming_hidden.len() {
                self.streaming_hidden[b] += fill;
            }
        }
        self.dropped += n - counts[0];
        self.streaming_store.retain(&Tensor::f_cat(&rows, 0)?)
    }

    /// Forgets the last `n` tokens seen.
    pub(crate) fn crop(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if n > self.seen {
            return Err(KvError::invalid(
                "tokens_to_remove",
                format!("{n} exceeds the {} tokens seen", self.seen),
            ));
        }
        match &mut self.retrieval_part {
            RetrievalPart::Full(s) => s.crop(n)?,
            RetrievalPart::Quantized(s) => s.crop(n)?,
            RetrievalPart::Empty => {}
        }
        let new_seen = (self.seen - n) as i64;
        if !self.streaming_store.is_empty() {
            let positions = self.streaming_store.kept_positions()?.into_uniform()?;
            for (b, &fixed) in self.fixed.iter().enumerate() {
                let fixed = fixed.min(positions.size()[2] as usize) as i64;
                if fixed > 0
                    && positions
                        .f_get(b as i64)?
                        .f_narrow(1, 0, fixed)?
                        .f_max()?
                        .f_int64_value(&[])?
                        >= new_seen
                {
                    return Err(KvError::State(format!(
                        "cannot crop to {new_seen} tokens: streaming heads kept tokens beyond that for \
                         good (sinks, heavy hitters)"
                    )));
                }
            }
            self.streaming_store.crop(n).map_err(|_| {
                KvError::State(format!(
                    "cannot crop to {} tokens: streaming heads kept tokens beyond that for good \
                     (sinks, heavy hitters)",
                    self.seen - n
                ))
            })?;
        }
        self.seen -= n;
        Ok(())
    }

    /// Keeps and reorders batch rows.
    pub(crate) fn select_rows(&mut self, order: &[usize], index: &Tensor) -> Result<()> {
        match &mut self.retrieval_part {
            RetrievalPart::Full(s) => s.index_batch(index)?,
            RetrievalPart::Quantized(s) => s.index_batch(index)?,
            RetrievalPart::Empty => {}
        }
        if !self.streaming_store.is_empty() {
            self.streaming_store.index_batch(index)?;
        }
        let pick = |v: &Vec<usize>| -> Vec<usize> {
            if v.is_empty() {
                vec![]
            } else {
                order.iter().map(|&b| v[b]).collect()
            }
        };
        self.fixed = pick(&self.fixed);
        self.streaming_hidden = pick(&self.streaming_hidden);
        if let Some(q) = &self.prompt_queries {
            self.prompt_queries = Some(q.f_index_select(0, &index.f_to(q.device())?)?);
        }
        Ok(())
    }

    /// Original positions of the streaming heads' kept tokens (−1 at hidden slots).
    pub(crate) fn kept_positions(&self, original: bool) -> Result<KeptPositions> {
        if original {
            self.streaming_store.kept_positions()
        } else {
            self.streaming_store.key_positions()
        }
    }
}

/// `row` (1, heads, k) int64 indices with `fill` filler slots (−1) in front.
fn with_fillers(row: Tensor, fill: usize, heads: i64) -> Result<Tensor> {
    if fill == 0 {
        return Ok(row);
    }
    let front = Tensor::f_full([1, heads, fill as i64], -1, (Kind::Int64, row.device()))?;
    Ok(Tensor::f_cat(&[front, row], 2)?)
}
