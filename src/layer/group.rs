//! The steps that need every layer of a cache at once, after a forward: a cross-layer
//! budget's allocation (CAKE), re-rotation to one shared next position, and quantizing
//! the kept tokens. A [`LayerGroup`] holds the layers (each behind its own lock, so that a
//! transformers layer can call its own state) and runs those steps once the model's
//! forward is done.

use super::LayerState;
use crate::error::{KvError, Result};
use crate::rope::Rope;
use std::sync::{Arc, Mutex, MutexGuard};
use tch::Tensor;

/// One shared handle to a layer's state.
pub type SharedLayer = Arc<Mutex<LayerState>>;

/// Locks a layer; a poisoned lock (an earlier call panicked mid-update) is an error.
pub fn lock(layer: &SharedLayer) -> Result<MutexGuard<'_, LayerState>> {
    layer.lock().map_err(|_| {
        KvError::State(
            "the layer state is poisoned by an earlier internal error; reset the cache".into(),
        )
    })
}

/// The layers of one cache (see the module documentation).
#[derive(Debug)]
pub struct LayerGroup {
    layers: Vec<SharedLayer>,
    /// Re-rotate kept keys to compact positions after each compression.
    rerotate: Option<Rope>,
}

impl LayerGroup {
    pub fn new(layers: Vec<LayerState>, rerotate: Option<Rope>) -> Self {
        Self::from_shared(
            layers
                .into_iter()
                .map(|l| Arc::new(Mutex::new(l)))
                .collect(),
            rerotate,
        )
    }

    /// A group of layers shared with their transformers adapters.
    pub fn from_shared(layers: Vec<SharedLayer>, rerotate: Option<Rope>) -> Self {
        LayerGroup { layers, rerotate }
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Layer `i`'s state.
    pub fn layer(&self, i: usize) -> Result<SharedLayer> {
        self.layers.get(i).cloned().ok_or_else(|| {
            KvError::invalid(
                "layer_idx",
                format!("{i} is out of range for {} layers", self.layers.len()),
            )
        })
    }

    pub fn rerotates(&self) -> bool {
        self.rerotate.is_some()
    }

    /// A forward starts: `visible` (batch, q) is its 2-D attention mask's last q columns
    /// (which new tokens are real), or None.
    pub fn begin_forward(&self, visible: Option<&Tensor>) -> Result<()> {
        for l in &self.layers {
            lock(l)?.begin_forward(visible);
        }
        Ok(())
    }

    /// The forward is done: each layer's own end, then the cross-layer steps.
    pub fn finish_forward(&self) -> Result<()> {
        let mut first_error = None;
        for l in &self.layers {
            if let Err(e) = lock(l)?.finish_forward() {
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        self.allocate()?;
        if let Some(rope) = &self.rerotate {
            self.rerotate_full(rope)?;
            self.rerotate_quantized(rope)?;
        }
        for l in &self.layers {
            lock(l)?.quantize_kept()?;
        }
        Ok(())
    }

    /// A cross-layer budget (CAKE): the total split across the scored layers by their
    /// preferences — per batch row in a padded batch — then each layer keeps its share.
    fn allocate(&self) -> Result<()> {
        let mut scored = vec![];
        for l in &self.layers {
            let g = lock(l)?;
            if let (Some(s), Some(press)) = (g.scored(), g.press()) {
                let _ = press;
                scored.push((
                    Arc::clone(l),
                    g.stored(),
                    g.hidden().to_vec(),
                    s.preferences.clone(),
                ));
            }
        }
        if scored.is_empty() {
            return Ok(());
        }
        let press = {
            let g = lock(&scored[0].0)?;
            g.press
                .clone()
                .ok_or_else(|| KvError::State("a scored layer without a press".into()))?
        };
        let rows = scored.iter().map(|s| s.3.len()).max().unwrap_or(1);
        // each row's split of its tokens across layers, then each layer's counts per row
        let per_row = (0..rows)
            .map(|b| {
                let tokens: Vec<usize> = scored
                    .iter()
                    .map(|(_, stored, hidden, _)| stored - hidden.get(b).copied().unwrap_or(0))
                    .collect();
                let preferences: Vec<f64> = scored
                    .iter()
                    .map(|s| s.3.get(b).copied().unwrap_or(s.3[0]))
                    .collect();
                press.allocate(&tokens, &preferences)
            })
            .collect::<Result<Vec<Vec<usize>>>>()?;
        for (l, (layer, ..)) in scored.iter().enumerate() {
            lock(layer)?.select_scored(per_row.iter().map(|row| row[l]).collect())?;
        }
        Ok(())
    }

    /// Full-precision layers that evicted: every one compacted to end right before one
    /// shared next position (the longest layer's count).
    fn rerotate_full(&self, rope: &Rope) -> Result<()> {
        let mut candidates = vec![];
        for l in &self.layers {
            let g = lock(l)?;
            if g.store().is_some_and(|s| s.seen() > 0) {
                candidates.push((Arc::clone(l), g.has_evicted(), g.stored(), g.seen()));
            }
        }
        if !candidates.iter().any(|c| c.1) {
            return Ok(());
        }
        let next = candidates.iter().map(|c| c.2).max().unwrap_or(0);
        if candidates.iter().all(|c| c.3 == next) {
            return Ok(()); // already compact (a later forward)
        }
        for (l, ..) in &candidates {
            lock(l)?.rerotate(rope, next)?;
        }
        Ok(())
    }

    /// Quantized layers after a decoding-time eviction (pre-RoPE keys): positions only,
    /// codes untouched.
    fn rerotate_quantized(&self, rope: &Rope) -> Result<()> {
        let mut candidates = vec![];
        for l in &self.layers {
            let g = lock(l)?;
            if g.is_quantized() {
                candidates.push((Arc::clone(l), g.evicted_now(), g.stored(), g.seen()));
            }
        }
        if !candidates.iter().any(|c| c.1) {
            return Ok(());
        }
        let next = candidates.iter().map(|c| c.2).max().unwrap_or(0);
        for (l, _, _, seen) in &candidates {
            if *seen != next {
                lock(l)?.rerotate(rope, next)?;
            }
        }
        Ok(())
    }
}
