//! One layer's whole state, and the step machine that moves it through a forward.
//!
//! A [`LayerState`] owns the layer's stores — full precision ([`LayerStore`], uniform or
//! ragged rows), quantized ([`QuantizedStore`]) with its low-bit part, or a retrieval /
//! streaming head split ([`heads::HeadSplit`]) — its counts (tokens seen, stored, and
//! per batch row the hidden slots of a padded batch), its decoding state
//! ([`DecodingState`]: query buffer, previous scores, online statistics) and its pending
//! step (a prompt's compression waiting for the layer's queries; scores waiting for a
//! cross-layer budget; evicted tokens waiting to be quantized at low bits).
//!
//! A transformers cache layer only adapts the calls: [`append`](LayerState::append) when
//! the model updates the cache, the model's own attention over what it returned (or a
//! kernel of this layer: [`route`](LayerState::route)),
//! [`after_attention`](LayerState::after_attention) with the layer's queries, and — once
//! every layer has run — the cross-layer steps of [`group::LayerGroup`].

pub mod decoding;
pub mod group;
pub mod heads;
pub mod mask;

pub use decoding::DecodingState;
pub use group::LayerGroup;
pub use heads::{HeadPart, HeadSplit};

use crate::error::{KvError, Result};
use crate::press::{LayerScores, Plan, Press};
use crate::quant::{QuantConfig, QuantizedStore};
use crate::rope::table::SharedAngleTable;
use crate::rope::Rope;
use crate::store::{KeptPositions, LayerStore};
use crate::tensor::check_kv_pair;
use decoding::Rows;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// How a cache quantizes: the kept tokens' config, the evicted ones' with mixed precision
/// (low bits), and the model's RoPE with a cos/sin table shared by the layers (pre-RoPE keys).
#[derive(Debug, Clone)]
pub struct Quantization {
    pub config: QuantConfig,
    pub low: Option<QuantConfig>,
    pub rope: Option<Rope>,
    pub table: Option<SharedAngleTable>,
}

impl Quantization {
    fn store(&self) -> Result<QuantizedStore> {
        QuantizedStore::with_rope_table(self.config, self.rope.as_ref(), self.table.clone())
    }
}

// One per layer, never moved in a loop: the size gap between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Storage {
    Full(LayerStore),
    Quantized {
        store: QuantizedStore,
        /// Mixed precision: the tokens the press set aside, at low bits.
        low: Option<QuantizedStore>,
        /// Per batch row, hidden slots at the front of the low-bit store.
        low_hidden: Vec<usize>,
        /// Tokens seen (the store holds `seen − evicted`).
        seen: usize,
    },
    Heads(Box<HeadSplit>),
}

/// What kind of layer a state was built as (what `reset` returns it to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind_ {
    /// Full precision until the press has compressed the prompt; quantized after, with a
    /// quantization.
    Compressed,
    /// Quantized from the first token (no press).
    Quantized,
    Heads,
}

/// Where the model's attention over this layer runs in the current forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The model's own attention function over what `append` returned, with
    /// [`LayerState::model_mask`].
    Model,
    /// Row by row in Rust ([`LayerState::attend_rows`]): rows of different lengths.
    Rows,
    /// The quantized kernel ([`LayerState::attend_kernel`]).
    Kernel,
    /// Retrieval and streaming heads apart ([`LayerState::head_parts`]).
    Heads,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Model => "model",
            Route::Rows => "rows",
            Route::Kernel => "kernel",
            Route::Heads => "heads",
        }
    }
}

/// One layer's state (see the module documentation).
///
/// ```
/// use kvpress_rs::layer::{LayerState, Route};
/// use kvpress_rs::{policies::Knorm, Budget, Press};
/// use std::sync::Arc;
/// let press = Arc::new(Press::new(Box::new(Knorm), Budget::ratio(0.5).unwrap()));
/// let mut layer = LayerState::compressed(0, Some(press), None, None);
/// let k = tch::Tensor::randn([1, 2, 8, 4], (tch::Kind::Float, tch::Device::Cpu));
/// let (keys, _) = layer.append(&k, &k, true).unwrap(); // this forward attends over all 8
/// assert_eq!((keys.size()[2], layer.route()), (8, Route::Model));
/// let q = tch::Tensor::randn([1, 4, 8, 4], (tch::Kind::Float, tch::Device::Cpu));
/// layer.after_attention(&q).unwrap(); // the prompt's compression, with its queries
/// assert_eq!((layer.seen(), layer.stored()), (8, 4));
/// ```
#[derive(Debug)]
pub struct LayerState {
    layer_idx: usize,
    kind: Kind_,
    press: Option<Arc<Press>>,
    quantization: Option<Arc<Quantization>>,
    decoding: Option<DecodingState>,
    storage: Storage,
    /// Per batch row: hidden slots at the front of the stored tokens (padding), and
    /// hidden tokens seen (the row's pads). Empty: none.
    hidden: Vec<usize>,
    hidden_seen: Vec<usize>,
    /// The visibility (batch, ≥ q) of the next append's tokens (the forward's 2-D mask).
    incoming: Option<Tensor>,
    /// Which of this forward's q new tokens are real (batch, q), when the forward had
    /// padding.
    new_visible: Option<Tensor>,
    route: Route,
    new_tokens: usize,
    /// The prompt's compression waits for this forward's attention (and its queries).
    pending: bool,
    /// Scores waiting for a cross-layer budget (CAKE).
    scored: Option<LayerScores>,
    /// Tokens set aside by the press (low bits) and their hidden slots per row, quantized
    /// once the forward ends.
    set_aside: Option<(Tensor, Tensor, Vec<usize>)>,
    /// A decoding-time eviction of a quantized store in this forward (re-rotation).
    evicted_now: bool,
}

impl LayerState {
    fn with(layer_idx: usize, kind: Kind_, storage: Storage) -> Self {
        LayerState {
            layer_idx,
            kind,
            press: None,
            quantization: None,
            decoding: None,
            storage,
            hidden: vec![],
            hidden_seen: vec![],
            incoming: None,
            new_visible: None,
            route: Route::Model,
            new_tokens: 0,
            pending: false,
            scored: None,
            set_aside: None,
            evicted_now: false,
        }
    }

    /// A layer of a compressing cache: `press` compresses the prompt right after its
    /// attention (None: append only); with `quantization` the kept tokens are then
    /// quantized once; with `decoding`, it keeps compressing as it grows.
    pub fn compressed(
        layer_idx: usize,
        press: Option<Arc<Press>>,
        quantization: Option<Arc<Quantization>>,
        decoding: Option<DecodingState>,
    ) -> Self {
        LayerState {
            press,
            quantization,
            decoding,
            ..Self::with(
                layer_idx,
                Kind_::Compressed,
                Storage::Full(LayerStore::new()),
            )
        }
    }

    /// A layer quantized from its first token (no press).
    pub fn quantized(layer_idx: usize, quantization: Arc<Quantization>) -> Result<Self> {
        let store = quantization.store()?;
        Ok(LayerState {
            quantization: Some(quantization),
            ..Self::with(
                layer_idx,
                Kind_::Quantized,
                Storage::Quantized {
                    store,
                    low: None,
                    low_hidden: vec![],
                    seen: 0,
                },
            )
        })
    }

    /// A layer whose KV heads are split into retrieval and streaming heads.
    pub fn heads(layer_idx: usize, split: HeadSplit) -> Self {
        Self::with(layer_idx, Kind_::Heads, Storage::Heads(Box::new(split)))
    }

    /// A layer holding `store` as it is (an assembled cache of reused chunks): it appends
    /// without compressing.
    pub fn from_store(layer_idx: usize, store: LayerStore) -> Self {
        Self::with(layer_idx, Kind_::Compressed, Storage::Full(store))
    }

    /// A layer holding quantized `store` after `seen` tokens (the others were evicted):
    /// exactly the state of a quantizing cache's layer after its prompt.
    pub fn from_quantized(
        layer_idx: usize,
        store: QuantizedStore,
        seen: usize,
        quantization: Arc<Quantization>,
    ) -> Result<Self> {
        if seen < store.seen() {
            return Err(KvError::invalid(
                "seen",
                format!("{seen} tokens seen but {} stored", store.seen()),
            ));
        }
        Ok(LayerState {
            quantization: Some(quantization),
            ..Self::with(
                layer_idx,
                Kind_::Compressed,
                Storage::Quantized {
                    store,
                    low: None,
                    low_hidden: vec![],
                    seen,
                },
            )
        })
    }

    pub fn layer_idx(&self) -> usize {
        self.layer_idx
    }

    pub fn press(&self) -> Option<&Press> {
        self.press.as_deref()
    }

    /// Tokens seen (the position of the next token).
    pub fn seen(&self) -> usize {
        match &self.storage {
            Storage::Full(s) => s.seen(),
            Storage::Quantized { seen, .. } => *seen,
            Storage::Heads(h) => h.seen(),
        }
    }

    /// Tokens stored per (batch, head) row (the longest row).
    pub fn stored(&self) -> usize {
        match &self.storage {
            Storage::Full(s) => s.len(),
            Storage::Quantized { store, low, .. } => {
                store.seen() + low.as_ref().map_or(0, QuantizedStore::seen)
            }
            Storage::Heads(h) => h.seen(),
        }
    }

    /// Tokens stored in every (batch, kv head) row, row-major.
    pub fn lengths(&self) -> Vec<usize> {
        match &self.storage {
            Storage::Full(s) => s.lengths(),
            Storage::Quantized { store, .. } => {
                let rows = store.shape().map_or(0, |s| s.batch * s.heads);
                vec![self.stored(); rows]
            }
            Storage::Heads(h) => h.lengths(),
        }
    }

    /// Bytes held: every store's tensors and positions (a shared cos/sin table excluded).
    pub fn nbytes(&self) -> usize {
        match &self.storage {
            Storage::Full(s) => s.nbytes(),
            Storage::Quantized { store, low, .. } => {
                store.nbytes() + low.as_ref().map_or(0, QuantizedStore::nbytes)
            }
            Storage::Heads(h) => h.nbytes(),
        }
    }

    /// Per batch row, the hidden slots at the front of the stored tokens (padding).
    pub fn hidden(&self) -> &[usize] {
        &self.hidden
    }

    /// Whether the layer's tokens are quantized now.
    pub fn is_quantized(&self) -> bool {
        matches!(self.storage, Storage::Quantized { .. })
    }

    /// Whether rows hold different numbers of tokens (a head budget).
    pub fn is_ragged(&self) -> bool {
        matches!(&self.storage, Storage::Full(s) if s.is_ragged())
    }

    /// The full-precision store, while the layer has one.
    pub fn store(&self) -> Option<&LayerStore> {
        match &self.storage {
            Storage::Full(s) => Some(s),
            _ => None,
        }
    }

    /// The quantized store, once the layer has one.
    pub fn quantized_store(&self) -> Option<&QuantizedStore> {
        match &self.storage {
            Storage::Quantized { store, .. } => Some(store),
            _ => None,
        }
    }

    /// The low-bit store of mixed precision, if any.
    pub fn low_store(&self) -> Option<&QuantizedStore> {
        match &self.storage {
            Storage::Quantized { low, .. } => low.as_ref(),
            _ => None,
        }
    }

    /// The head split, for a retrieval-heads layer.
    pub fn head_split(&self) -> Option<&HeadSplit> {
        match &self.storage {
            Storage::Heads(h) => Some(h),
            _ => None,
        }
    }

    pub fn decoding(&self) -> Option<&DecodingState> {
        self.decoding.as_ref()
    }

    /// Where this forward's attention runs (set by [`append`](Self::append)).
    pub fn route(&self) -> Route {
        self.route
    }

    /// Whether the running forward waits for this layer's queries (a prompt's compression).
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Whether the layer holds scores waiting for a cross-layer budget.
    pub fn scored(&self) -> Option<&LayerScores> {
        self.scored.as_ref()
    }

    fn batch(&self) -> usize {
        match &self.storage {
            Storage::Full(s) => s.batch_heads().map_or(0, |(b, _)| b),
            Storage::Quantized { store, .. } => store.shape().map_or(0, |s| s.batch),
            Storage::Heads(h) => h.batch(),
        }
    }

    fn hidden_of(&self, b: usize) -> usize {
        self.hidden.get(b).copied().unwrap_or(0)
    }

    /// Visible tokens stored per batch row (uniform rows).
    fn visible_stored(&self) -> Vec<usize> {
        let stored = match &self.storage {
            Storage::Quantized { store, .. } => store.seen(),
            _ => self.stored(),
        };
        (0..self.batch())
            .map(|b| stored.saturating_sub(self.hidden_of(b)))
            .collect()
    }

    /// Visible tokens seen per batch row.
    fn visible_seen(&self) -> Vec<usize> {
        let seen = self.seen();
        (0..self.batch())
            .map(|b| seen.saturating_sub(self.hidden_seen.get(b).copied().unwrap_or(0)))
            .collect()
    }

    /// (kv_length, kv_offset) of the mask for a forward of `query_length` tokens: the keys
    /// this layer will hold, offset so that their indices end at the query positions.
    pub fn mask_sizes(&self, query_length: usize) -> (usize, usize) {
        let (stored, seen) = (self.stored(), self.seen());
        (stored + query_length, seen.saturating_sub(stored))
    }

    /// The visibility (batch, q) of the next forward's tokens (its 2-D attention mask's
    /// last q columns); None: every token visible.
    pub fn begin_forward(&mut self, visible: Option<&Tensor>) {
        self.incoming = visible.map(Tensor::shallow_clone);
        self.pending = false;
        self.scored = None;
        self.evicted_now = false;
        self.route = Route::Model;
    }

    /// Counts the hidden (padding) tokens among `q` new ones of a `batch`-row forward, row
    /// by row: they must precede every visible token of their row (left padding).
    fn take_visibility(&mut self, batch: usize, q: usize) -> Result<()> {
        self.new_visible = None;
        let Some(visible) = self.incoming.take() else {
            self.grow_hidden(batch);
            return Ok(());
        };
        let size = visible.size();
        if size.len() != 2 || size[0] != batch as i64 || size[1] < q as i64 {
            return Err(KvError::shape(
                "attention_mask",
                &size,
                format!("({batch}, at least the {q} new tokens)"),
            ));
        }
        let new = visible
            .f_narrow(1, size[1] - q as i64, q as i64)?
            .f_to_kind(Kind::Bool)?;
        self.new_visible = Some(new.shallow_clone());
        let new = new.f_to(Device::Cpu)?;
        let rows: Vec<Vec<bool>> = (0..batch)
            .map(|b| Vec::<bool>::try_from(new.f_get(b as i64)?).map_err(Into::into))
            .collect::<Result<_>>()?;
        self.grow_hidden(batch);
        let visible_before = self.visible_stored();
        for (b, row) in rows.iter().enumerate() {
            let pads = row.iter().take_while(|&&v| !v).count();
            if row[pads..].iter().any(|&v| !v)
                || (pads > 0 && visible_before.get(b).copied().unwrap_or(0) > 0)
            {
                return Err(KvError::invalid(
                    "attention_mask",
                    format!(
                        "row {b} masks a token after a visible one; kvpress_rs caches take left-padded \
                         batches (in every row the masked tokens come first, as generate pads them)"
                    ),
                ));
            }
            self.hidden[b] += pads;
            self.hidden_seen[b] += pads;
        }
        if self.hidden.iter().all(|&h| h == 0) && self.hidden_seen.iter().all(|&h| h == 0) {
            self.hidden.clear();
            self.hidden_seen.clear();
        }
        Ok(())
    }

    fn grow_hidden(&mut self, batch: usize) {
        if self.hidden.len() != batch {
            self.hidden.resize(batch, 0);
            self.hidden_seen.resize(batch, 0);
        }
    }

    /// Appends the keys/values (batch, kv_heads, q, head_dim) the model just computed, and
    /// returns what the model's attention should see when [`route`](Self::route) is
    /// [`Route::Model`] (otherwise the new tokens themselves, unused). `served`: whether the
    /// model's attention goes through this crate (so `after_attention` follows); without
    /// it a prompt's compression happens here, without queries.
    pub fn append(
        &mut self,
        keys: &Tensor,
        values: &Tensor,
        served: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (shape, _) = check_kv_pair(keys, values)?;
        self.quantize_kept()?; // without model hooks, the first forward after the prompt
        self.take_visibility(shape.batch, shape.tokens)?;
        self.new_tokens = shape.tokens;
        let q = shape.tokens;
        let stored_before = self.visible_stored();
        let (out, first) = match &mut self.storage {
            Storage::Quantized { store, seen, .. } => {
                let first = store.seen() == 0;
                let mut positions = Tensor::f_arange_start(
                    *seen as i64,
                    (*seen + q) as i64,
                    (Kind::Int64, Device::Cpu),
                )?;
                if self.hidden_seen.iter().any(|&p| p > 0) {
                    // rows of a padded batch count positions from their first real token
                    let pads = Tensor::f_from_slice(
                        &self
                            .hidden_seen
                            .iter()
                            .map(|&p| p as i64)
                            .collect::<Vec<_>>(),
                    )?
                    .f_view([-1, 1, 1])?;
                    positions = positions
                        .f_view([1, 1, q as i64])?
                        .f_sub(&pads)?
                        .f_clamp_min(0)?
                        .f_expand([shape.batch as i64, shape.heads as i64, q as i64], false)?
                        .f_contiguous()?;
                }
                store.append_at(keys, values, Some(&positions))?;
                *seen += q;
                self.route = if first { Route::Model } else { Route::Kernel };
                (attended(keys, values, first)?, first)
            }
            Storage::Full(store) => {
                let first = store.seen() == 0;
                let out = store.append(keys, values)?;
                self.route = if store.is_ragged() {
                    Route::Rows
                } else {
                    Route::Model
                };
                (out, first)
            }
            Storage::Heads(split) => {
                let first = split.seen() == 0;
                split.append(keys, values, &self.hidden)?;
                self.route = if first { Route::Model } else { Route::Heads };
                (attended(keys, values, first)?, first)
            }
        };
        if let Some(d) = &mut self.decoding {
            d.appended(&stored_before, q);
        }
        match (&self.storage, served) {
            (Storage::Heads(_), false) if !first => {
                return Err(KvError::Unsupported(
                    "RetrievalHeadsCache needs its attention hook (build it with the model, not a \
                     config): its heads hold different numbers of tokens"
                        .into(),
                ))
            }
            (Storage::Quantized { .. }, false) if !first => {
                // no kernel call follows: the model attends over dequantized copies
                let out = self.dequantized()?;
                if self.decoding.is_some() {
                    self.compress_while_decoding(q)?;
                }
                self.route = Route::Model;
                return Ok(out);
            }
            _ => {}
        }
        if first && self.press.is_some() && matches!(self.storage, Storage::Full(_)) {
            // This forward's attention still sees every token (returned above); the store
            // keeps only what the press selects, right after that attention.
            if served {
                self.pending = true;
            } else {
                self.compress_prompt(None)?;
            }
        }
        if self.decoding.is_some() && !served && matches!(self.storage, Storage::Full(_)) {
            // no queries here; the returned keys/values keep the storage before compression
            self.compress_while_decoding(q)?;
        }
        Ok(out)
    }

    /// After this layer's attention in the forward: the prompt's compression (or its
    /// scoring, for a cross-layer budget) with the layer's post-RoPE `query` (batch,
    /// q_heads, q, head_dim), then the decoding-time schedule.
    pub fn after_attention(&mut self, query: &Tensor) -> Result<()> {
        if let Storage::Heads(split) = &mut self.storage {
            if self.route == Route::Model {
                split.observe_prompt(query)?;
            }
            return Ok(());
        }
        if let Some(d) = &mut self.decoding {
            d.observe(query);
        }
        if self.pending {
            let press = self.press.clone().ok_or_else(no_press)?;
            if press.needs_all_layers() {
                self.pending = false;
                let plan = Plan::score(self.layer_idx)
                    .with_queries(Some(query))
                    .with_hidden(self.hidden.clone());
                let store = self.full_store_mut()?;
                self.scored = press.compress(store, plan)?.scored;
            } else {
                self.compress_prompt(Some(query))?;
            }
        }
        if self.decoding.is_some() && self.scored.is_none() {
            // After this forward's attention (which saw every token): back to the budget if
            // the schedule says so, scored with the queries since the last compression.
            self.compress_while_decoding(self.new_tokens)?;
        }
        Ok(())
    }

    fn full_store_mut(&mut self) -> Result<&mut LayerStore> {
        match &mut self.storage {
            Storage::Full(s) => Ok(s),
            _ => Err(KvError::State(
                "the layer's tokens are no longer in a full-precision store".into(),
            )),
        }
    }

    /// The prompt's compression (with the queries of its last tokens when given).
    fn compress_prompt(&mut self, query: Option<&Tensor>) -> Result<()> {
        self.pending = false;
        let press = self.press.clone().ok_or_else(no_press)?;
        let queries = query.filter(|_| press.query_window() != crate::policies::QueryWindow::None);
        let plan = Plan::prefill(self.layer_idx)
            .with_queries(queries)
            .with_hidden(self.hidden.clone());
        self.apply_compression(&press, plan)
    }

    /// Runs a prompt compression or a cross-layer selection on the full-precision store, and
    /// keeps what it implies: hidden slots, tokens set aside, the decoding state.
    fn apply_compression(&mut self, press: &Press, plan: Plan) -> Result<()> {
        let hidden_before = self.hidden.clone();
        let store = self.full_store_mut()?;
        let stored = store.len();
        let outcome = press.compress(store, plan)?;
        let shrank = store.len() < stored || store.is_ragged();
        if let Some(h) = outcome.hidden {
            self.hidden = h;
        }
        if let Some((k, v)) = outcome.set_aside {
            let low_hidden = (0..hidden_before.len())
                .map(|b| hidden_before[b].saturating_sub(self.hidden_of(b)))
                .collect();
            self.set_aside = Some((k, v, low_hidden));
        }
        if shrank {
            let seen = self.visible_seen();
            if let Some(d) = &mut self.decoding {
                d.evicted_elsewhere(press.rope(), &seen)?;
            }
        }
        Ok(())
    }

    /// The decoding-time schedule after a forward of `new_tokens` tokens.
    fn compress_while_decoding(&mut self, new_tokens: usize) -> Result<()> {
        let Some(press) = self.press.clone() else {
            return Ok(());
        };
        let (stored, seen) = (self.visible_stored(), self.visible_seen());
        let hidden = self.hidden.clone();
        let layer_idx = self.layer_idx;
        let Some(decoding) = self.decoding.as_mut() else {
            return Ok(());
        };
        let rows = Rows {
            stored: &stored,
            seen: &seen,
            hidden: &hidden,
        };
        let outcome = match &mut self.storage {
            Storage::Full(s) => decoding.maybe_compress(&press, s, layer_idx, rows, new_tokens)?,
            Storage::Quantized { store, .. } => {
                let done = decoding.maybe_compress(&press, store, layer_idx, rows, new_tokens)?;
                self.evicted_now |= done.is_some();
                done
            }
            Storage::Heads(_) => None,
        };
        if let Some(h) = outcome.and_then(|o| o.hidden) {
            self.hidden = h;
        }
        Ok(())
    }

    /// Once every layer has run the forward: a prompt compression that waited for queries
    /// that never came (the model's attention did not go through this crate) happens now,
    /// without queries — or fails, for a press that needs them.
    pub fn finish_forward(&mut self) -> Result<()> {
        if let Storage::Heads(split) = &mut self.storage {
            return split.finish_forward(&self.hidden);
        }
        if self.pending {
            let press = self.press.clone().ok_or_else(no_press)?;
            if press.query_window() != crate::policies::QueryWindow::None {
                self.pending = false;
                return Err(KvError::UnsupportedModel(format!(
                    "policy {:?} scores tokens with the model's queries, but layer {}'s attention \
                     did not go through kvpress_rs (transformers' attention interface)",
                    press.scorer().name(),
                    self.layer_idx
                )));
            }
            self.compress_prompt(None)?;
        }
        Ok(())
    }

    /// The second half of a cross-layer budget: keeps `n_kept` (one count, or one per
    /// batch row) of the scores this layer computed.
    pub fn select_scored(&mut self, n_kept: Vec<usize>) -> Result<()> {
        let Some(scored) = self.scored.take() else {
            return Ok(());
        };
        let press = self.press.clone().ok_or_else(no_press)?;
        let plan =
            Plan::select(self.layer_idx, &scored.scores, n_kept).with_hidden(self.hidden.clone());
        self.apply_compression(&press, plan)?;
        // the schedule could not act before every layer's budget was known
        self.compress_while_decoding(self.new_tokens)
    }

    /// Moves the kept tokens into a quantized store, once, after the prompt's compression
    /// (and any re-rotation); a no-op otherwise.
    pub fn quantize_kept(&mut self) -> Result<()> {
        let Some(q) = self.quantization.clone() else {
            return Ok(());
        };
        let Storage::Full(full) = &self.storage else {
            return Ok(());
        };
        if full.seen() == 0
            || self.pending
            || self.scored.is_some()
            || self.kind != Kind_::Compressed
        {
            return Ok(());
        }
        if full.is_ragged() {
            return Err(KvError::Unsupported(
                "quantization of ragged rows (head_budget='adakv') is not supported".into(),
            ));
        }
        let mut store = q.store()?;
        // where each kept key is rotated now (its position, less its row's pads; or where
        // re-rotation put it): pre-RoPE quantization rotates them back from there; filler
        // slots sit at 0
        let positions = self.rope_positions(full.key_positions()?.into_uniform()?)?;
        store.append_at(&full.keys_view()?, &full.values_view()?, Some(&positions))?;
        let seen = full.seen();
        let (low, low_hidden) = match (self.set_aside.take(), &q.low) {
            (Some((k, v, hidden)), Some(config)) if k.size()[2] > 0 => {
                let mut low = QuantizedStore::new(*config)?;
                low.append(&k, &v)?;
                (Some(low), hidden)
            }
            _ => (None, vec![]),
        };
        self.storage = Storage::Quantized {
            store,
            low,
            low_hidden,
            seen,
        };
        Ok(())
    }

    /// The RoPE positions of stored keys at `positions` (batch, heads, n): a left-padded row
    /// counts its positions from its first real token, so its pads are subtracted; hidden
    /// slots and pads take position 0.
    fn rope_positions(&self, positions: Tensor) -> Result<Tensor> {
        if self.hidden_seen.iter().all(|&p| p == 0) {
            return Ok(positions.f_clamp_min(0)?);
        }
        let pads = Tensor::f_from_slice(
            &self
                .hidden_seen
                .iter()
                .map(|&p| p as i64)
                .collect::<Vec<_>>(),
        )?
        .f_view([-1, 1, 1])?
        .f_to(positions.device())?;
        Ok(positions
            .f_to_kind(Kind::Int64)?
            .f_sub(&pads)?
            .f_clamp_min(0)?)
    }

    /// Every stored token dequantized (mixed precision: the low-precision ones first).
    pub fn dequantized(&self) -> Result<(Tensor, Tensor)> {
        match &self.storage {
            Storage::Quantized { store, low, .. } => {
                let (k, v) = store.dequantize()?;
                match low {
                    Some(l) if l.seen() > 0 => {
                        let (lk, lv) = l.dequantize()?;
                        Ok((Tensor::f_cat(&[lk, k], 2)?, Tensor::f_cat(&[lv, v], 2)?))
                    }
                    _ => Ok((k, v)),
                }
            }
            Storage::Full(s) => Ok((s.keys_view()?, s.values_view()?)),
            Storage::Heads(_) => Err(KvError::State(
                "a retrieval-heads layer holds its heads apart: no single tensor holds them".into(),
            )),
        }
    }

    /// Whether the model's mask describes exactly the `total` stored tokens (nothing
    /// evicted, sized for this layer).
    fn mask_is_exact(&self, mask: Option<&Tensor>, total: usize) -> bool {
        let evicted = match &self.storage {
            Storage::Full(s) => s.has_evicted(),
            Storage::Quantized {
                seen, store, low, ..
            } => *seen != store.seen() || low.is_some(),
            Storage::Heads(_) => false,
        };
        !evicted && mask.is_none_or(|m| m.size().last() == Some(&(total as i64)))
    }

    /// The 4-D mask for the model's attention over what [`append`](Self::append) returned
    /// (`q` new tokens last): the model's `mask` when it describes this layer's tokens,
    /// otherwise rebuilt from the stored tokens (hidden slots masked; see [`mask`]).
    pub fn model_mask(&self, mask: Option<&Tensor>, q: usize) -> Result<Option<Tensor>> {
        let total = match &self.storage {
            Storage::Quantized { store, .. } => store.seen(),
            _ => self.stored(),
        };
        let padded = self.hidden.iter().any(|&h| h > 0);
        if self.mask_is_exact(mask, total) || (mask.is_none() && !padded && q == 1) {
            return Ok(mask.map(Tensor::shallow_clone));
        }
        let device = mask.map_or(self.device(), Tensor::device);
        mask::refit(
            mask,
            &self.hidden,
            self.new_visible.as_ref(),
            total,
            q,
            device,
        )
        .map(Some)
    }

    fn device(&self) -> Device {
        match &self.storage {
            Storage::Full(s) => s.layout_device().unwrap_or(Device::Cpu),
            Storage::Quantized { store, .. } => store.shape().map_or(Device::Cpu, |s| s.device),
            Storage::Heads(h) => h.device(),
        }
    }

    /// The quantized kernel's bool (b or 1, q, stored) mask of visible keys for `q` new
    /// tokens; None when causality among the new tokens is all it restricts.
    pub fn kernel_mask(&self, mask: Option<&Tensor>, q: usize) -> Result<Option<Tensor>> {
        let Some(full) = self.model_mask(mask, q)? else {
            return Ok(None);
        };
        let visible = mask::visible_keys(&full)?;
        if q == 1 && visible.f_all()?.f_int64_value(&[])? != 0 {
            return Ok(None);
        }
        Ok(Some(visible))
    }

    /// Attention of `query` (batch, q_heads, q, head_dim) over the quantized tokens (and
    /// the low-bit ones with mixed precision), through the fused kernel; `mask` is the
    /// model's 4-D mask. Returns (batch, q, q_heads, head_dim).
    pub fn attend_kernel(
        &self,
        query: &Tensor,
        mask: Option<&Tensor>,
        scaling: f64,
    ) -> Result<Tensor> {
        let q = query.size()[2] as usize;
        let Storage::Quantized {
            store,
            low,
            low_hidden,
            ..
        } = &self.storage
        else {
            return Err(KvError::State(
                "this layer's tokens are not quantized".into(),
            ));
        };
        let kernel_mask = self.kernel_mask(mask, q)?;
        match low {
            Some(low) if low.seen() > 0 => {
                let low_mask = if low_hidden.iter().any(|&h| h > 0) {
                    let visible =
                        mask::refit(None, low_hidden, None, low.seen() + q, q, query.device())?;
                    Some(
                        mask::visible_keys(&visible.f_narrow(3, 0, low.seen() as i64)?)?.f_expand(
                            [low_hidden.len() as i64, q as i64, low.seen() as i64],
                            false,
                        )?,
                    )
                } else {
                    None
                };
                crate::quant::union::attend_union(
                    store,
                    &[(low, low_mask.as_ref())],
                    query,
                    kernel_mask.as_ref(),
                    scaling,
                )
            }
            _ => store.attend(query, kernel_mask.as_ref(), scaling),
        }
    }

    /// Attention over rows of different lengths, row by row.
    pub fn attend_rows(&self, query: &Tensor, scaling: f64) -> Result<Tensor> {
        match &self.storage {
            Storage::Full(s) => s.attend_rows(query, scaling),
            _ => Err(KvError::State(
                "this layer has no rows of their own lengths".into(),
            )),
        }
    }

    /// The parts of a retrieval-heads layer's attention (see [`HeadPart`]).
    pub fn head_parts(
        &self,
        mask: Option<&Tensor>,
        q: usize,
        q_heads: usize,
    ) -> Result<Vec<HeadPart>> {
        match &self.storage {
            Storage::Heads(h) => h.parts(mask, q, q_heads),
            _ => Err(KvError::State("this layer does not split its heads".into())),
        }
    }

    /// Kernel attention of the retrieval heads' queries over their quantized store.
    pub fn attend_retrieval(
        &self,
        query: &Tensor,
        mask: Option<&Tensor>,
        scaling: f64,
    ) -> Result<Tensor> {
        match &self.storage {
            Storage::Heads(h) => h.attend_retrieval(query, mask, scaling),
            _ => Err(KvError::State("this layer does not split its heads".into())),
        }
    }

    /// Original positions of the kept tokens: int64 (batch, kv_heads, n), −1 at hidden
    /// slots (padding); per row for rows of their own lengths.
    pub fn kept_positions(&self) -> Result<KeptPositions> {
        self.positions(true)
    }

    /// The positions the kept keys are rotated at now (after re-rotation, compact ones).
    pub fn key_positions(&self) -> Result<KeptPositions> {
        self.positions(false)
    }

    fn positions(&self, original: bool) -> Result<KeptPositions> {
        let store = match &self.storage {
            Storage::Full(s) => s,
            Storage::Quantized { .. } => {
                return Err(KvError::State(format!(
                    "layer {} is quantized: positions are not kept after quantization",
                    self.layer_idx
                )))
            }
            Storage::Heads(h) => return h.kept_positions(original),
        };
        let positions = if original {
            store.kept_positions()?
        } else {
            store.key_positions()?
        };
        Ok(match positions {
            KeptPositions::Uniform(p) if self.hidden.iter().any(|&h| h > 0) => {
                let n = p.size()[2];
                let hidden = mask::refit(None, &self.hidden, None, n as usize + 1, 1, Device::Cpu)?
                    .f_narrow(3, 0, n)?
                    .f_view([self.hidden.len() as i64, 1, n])?;
                KeptPositions::Uniform(p.f_masked_fill(&hidden.f_logical_not()?, -1)?)
            }
            other => other,
        })
    }

    /// Forgets the last `n` tokens seen (assisted decoding's rollback).
    pub fn crop(&mut self, n: usize) -> Result<()> {
        match &mut self.storage {
            Storage::Full(s) => s.crop(n)?,
            Storage::Quantized { store, seen, .. } => {
                store.crop(n)?;
                *seen -= n;
            }
            Storage::Heads(h) => h.crop(n)?,
        }
        let (stored, seen) = (self.stored(), self.seen());
        for h in &mut self.hidden {
            *h = (*h).min(stored);
        }
        for h in &mut self.hidden_seen {
            *h = (*h).min(seen);
        }
        let stored = match &self.storage {
            Storage::Quantized { store, .. } => store.seen(),
            _ => stored,
        };
        if let Some(d) = &mut self.decoding {
            d.cropped(stored)?;
        }
        Ok(())
    }

    /// Keeps and reorders batch rows (beam search, batch selection): `indices` int64 rows.
    pub fn index_batch(&mut self, indices: &Tensor) -> Result<()> {
        let batch = self.batch();
        if batch == 0 {
            return Ok(());
        }
        let order = crate::store::check_batch_indices(indices, batch)?;
        self.select_rows(&order)
    }

    /// Repeats every batch row `repeats` times.
    pub fn repeat_interleave_batch(&mut self, repeats: i64) -> Result<()> {
        if repeats < 1 {
            return Err(KvError::invalid(
                "repeats",
                format!("got {repeats}, expected >= 1"),
            ));
        }
        let order: Vec<usize> = (0..self.batch())
            .flat_map(|b| std::iter::repeat_n(b, repeats as usize))
            .collect();
        self.select_rows(&order)
    }

    fn select_rows(&mut self, order: &[usize]) -> Result<()> {
        if self.batch() == 0 {
            return Ok(());
        }
        let index = Tensor::f_from_slice(&order.iter().map(|&b| b as i64).collect::<Vec<_>>())?;
        match &mut self.storage {
            Storage::Full(s) => s.index_batch(&index)?,
            Storage::Quantized {
                store,
                low,
                low_hidden,
                ..
            } => {
                store.index_batch(&index)?;
                if let Some(l) = low {
                    l.index_batch(&index)?;
                }
                if !low_hidden.is_empty() {
                    *low_hidden = order.iter().map(|&b| low_hidden[b]).collect();
                }
            }
            Storage::Heads(h) => h.select_rows(order, &index)?,
        }
        let pick = |v: &Vec<usize>| -> Vec<usize> {
            if v.is_empty() {
                vec![]
            } else {
                order.iter().map(|&b| v[b]).collect()
            }
        };
        self.hidden = pick(&self.hidden);
        self.hidden_seen = pick(&self.hidden_seen);
        if let Some(d) = &mut self.decoding {
            d.select_rows(&index, order)?;
        }
        Ok(())
    }

    /// Drops everything: the layer is as new.
    pub fn reset(&mut self) -> Result<()> {
        self.storage = match (&self.storage, self.kind) {
            (Storage::Heads(h), _) => Storage::Heads(Box::new(h.emptied()?)),
            (_, Kind_::Quantized) => Storage::Quantized {
                store: self
                    .quantization
                    .as_ref()
                    .ok_or_else(|| KvError::State("a quantized layer without its config".into()))?
                    .store()?,
                low: None,
                low_hidden: vec![],
                seen: 0,
            },
            _ => Storage::Full(LayerStore::new()),
        };
        if let Some(d) = &mut self.decoding {
            d.reset();
        }
        self.hidden.clear();
        self.hidden_seen.clear();
        self.incoming = None;
        self.new_visible = None;
        self.pending = false;
        self.scored = None;
        self.set_aside = None;
        self.evicted_now = false;
        self.route = Route::Model;
        Ok(())
    }

    /// Replaces the stored tokens at `indices` by `keys`/`values` (recomputed tokens of an
    /// assembled cache).
    pub fn overwrite_tokens(
        &mut self,
        indices: &Tensor,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<()> {
        self.full_store_mut()?
            .overwrite_tokens(indices, keys, values)
    }

    /// Re-rotates the kept keys to compact positions ending right before `next_position`
    /// (hidden slots take none); the layer continues there.
    pub fn rerotate(&mut self, rope: &Rope, next_position: usize) -> Result<()> {
        let hidden = self.hidden.clone();
        match &mut self.storage {
            Storage::Full(s) => s.rerotate(rope, next_position, &hidden, &self.hidden_seen)?,
            Storage::Quantized { store, seen, .. } => {
                store.rerotate(next_position)?;
                *seen = next_position;
            }
            Storage::Heads(_) => {
                return Err(KvError::Unsupported(
                    "re-rotation of a retrieval-heads layer".into(),
                ))
            }
        }
        // every row continues at next_position (queries are shifted there): its pads no
        // longer count among its tokens seen
        for h in &mut self.hidden_seen {
            *h = 0;
        }
        Ok(())
    }

    /// Whether the full-precision store ever evicted (re-rotation has work to do).
    pub fn has_evicted(&self) -> bool {
        match &self.storage {
            Storage::Full(s) => s.has_evicted(),
            Storage::Quantized { .. } => self.evicted_now,
            Storage::Heads(_) => false,
        }
    }

    /// Whether a decoding-time compression of the quantized store evicted in this forward.
    pub fn evicted_now(&self) -> bool {
        self.evicted_now
    }

    /// TriAttention's query statistics of every query this layer has seen (calibration).
    pub fn query_statistics(&mut self) -> Result<Option<crate::policies::QueryStats>> {
        let seen = self.visible_seen();
        let rope = self.press.as_ref().and_then(|p| p.rope().cloned());
        let Some(d) = &mut self.decoding else {
            return Ok(None);
        };
        Ok(d.statistics(rope.as_ref(), &seen)?
            .map(crate::policies::QueryStats::shallow))
    }

    /// The quantized store's parts (a chunk entry's layer).
    pub fn quantized_parts(&self) -> Result<Vec<(String, Tensor)>> {
        match &self.storage {
            Storage::Quantized { store, .. } => crate::quant::parts::export(store),
            _ => Err(KvError::State(format!(
                "layer {} is not quantized",
                self.layer_idx
            ))),
        }
    }
}

/// What the model's attention sees of a forward's own keys/values: the prompt's, contiguous
/// (see `LayerStore::append`); later ones are not attended by the model (a kernel is).
fn attended(keys: &Tensor, values: &Tensor, first: bool) -> Result<(Tensor, Tensor)> {
    Ok(if first {
        (keys.f_contiguous()?, values.f_contiguous()?)
    } else {
        (keys.shallow_clone(), values.shallow_clone())
    })
}

fn no_press() -> KvError {
    KvError::State("this layer has no press".into())
}
