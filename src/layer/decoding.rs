//! One layer's decoding-time compression state between compressions: the post-RoPE queries
//! since the previous compression (the scorers' window during generation), TriAttention's
//! query statistics (calibrated, or folded in from every query the layer has seen), the
//! protected prompt, and — for a scorer that remembers (SnapKV's rank pooling) — the scores
//! the kept tokens had at the previous compression, kept aligned with the store's first
//! tokens through crop, beam reordering and batch selection.
//!
//! No scoring happens per step: a decoding step only appends its query (for the policies
//! that read queries) and asks the schedule one integer question per row.

use crate::decoding::DecodingSchedule;
use crate::error::Result;
use crate::policies::{query_stats, QueryStats, QueryWindow};
use crate::press::{Decoding, Outcome, Plan, Press, Target};
use crate::rope::Rope;
use tch::Tensor;

/// The decoding-time compression state of one layer (see the module documentation).
#[derive(Debug)]
pub struct DecodingState {
    schedule: DecodingSchedule,
    calibrated: Option<QueryStats>,
    /// TriAttention without a calibration file: statistics of every query the layer has
    /// seen, folded in at each compression.
    online: bool,
    online_stats: Option<QueryStats>,
    window: Option<usize>,
    needs_queries: bool,
    queries: Vec<Tensor>,
    n_queries: usize,
    /// Per batch row, the visible prompt tokens protected from eviction (set when
    /// generation starts, with protect_prompt).
    protected: Vec<usize>,
    generating: bool,
    /// (batch, kv_heads, m): the scores of the first m stored tokens when the previous
    /// compression kept them, for a press that remembers; None before the first.
    kept_scores: Option<Tensor>,
}

/// What a layer knows of its rows when it asks the schedule.
pub(crate) struct Rows<'a> {
    /// Per batch row: visible tokens stored, and visible tokens seen.
    pub stored: &'a [usize],
    pub seen: &'a [usize],
    /// Per batch row: hidden slots at the front of the stored tokens.
    pub hidden: &'a [usize],
}

impl DecodingState {
    pub fn new(schedule: DecodingSchedule, press: &Press, calibrated: Option<QueryStats>) -> Self {
        let window = press.query_window();
        DecodingState {
            schedule,
            online: press.scorer().uses_query_stats() && calibrated.is_none(),
            calibrated,
            online_stats: None,
            window: match window {
                QueryWindow::Last(n) => Some(n),
                _ => None,
            },
            needs_queries: window != QueryWindow::None,
            queries: vec![],
            n_queries: 0,
            protected: vec![],
            generating: false,
            kept_scores: None,
        }
    }

    pub fn schedule(&self) -> &DecodingSchedule {
        &self.schedule
    }

    pub fn kept_scores(&self) -> Option<&Tensor> {
        self.kept_scores.as_ref()
    }

    pub fn reset(&mut self) {
        self.queries.clear();
        self.n_queries = 0;
        self.online_stats = None;
        self.protected.clear();
        self.generating = false;
        self.kept_scores = None;
    }

    /// Beam search / batch selection reorders the rows: the buffered queries, the kept
    /// scores and the protected counts follow.
    pub fn select_rows(&mut self, order: &Tensor, rows: &[usize]) -> Result<()> {
        for q in &mut self.queries {
            *q = q.f_index_select(0, &order.f_to(q.device())?)?;
        }
        if let Some(s) = &self.kept_scores {
            self.kept_scores = Some(s.f_index_select(0, &order.f_to(s.device())?)?);
        }
        if !self.protected.is_empty() {
            self.protected = rows.iter().map(|&b| self.protected[b]).collect();
        }
        if let Some(s) = &self.online_stats {
            self.online_stats = Some(select_stats(s, order)?);
        }
        Ok(())
    }

    /// The store was cut back to `stored` tokens (assisted decoding's rollback): the
    /// buffered queries may belong to removed tokens, and kept scores past it go.
    pub fn cropped(&mut self, stored: usize) -> Result<()> {
        self.queries.clear();
        self.n_queries = 0;
        if let Some(s) = &self.kept_scores {
            let m = s.size()[2];
            if m > stored as i64 {
                self.kept_scores = Some(s.f_narrow(2, 0, stored as i64)?);
            }
        }
        Ok(())
    }

    /// A compression other than this schedule's (a prompt's) evicted tokens: the buffered
    /// queries and the kept scores no longer match the stored tokens. `seen`: tokens seen
    /// per row (online statistics absorb the buffered queries first).
    pub fn evicted_elsewhere(&mut self, rope: Option<&Rope>, seen: &[usize]) -> Result<()> {
        if self.online && !self.queries.is_empty() {
            self.fold(rope, seen)?;
        }
        self.queries.clear();
        self.n_queries = 0;
        self.kept_scores = None;
        Ok(())
    }

    /// Called on every append: the first one-token forward starts the generation, and with
    /// protect_prompt every visible token stored then is protected from now on.
    pub fn appended(&mut self, stored_before: &[usize], new_tokens: usize) {
        if new_tokens == 1 && !self.generating {
            self.generating = true;
            if self.schedule.protect_prompt() {
                self.protected = stored_before.to_vec();
            }
        }
    }

    /// Keeps this forward's queries (batch, q_heads, q, head_dim) for the next compression:
    /// the last `window` of them for windowed scorers, all since the previous one otherwise.
    pub fn observe(&mut self, query: &Tensor) {
        if !self.needs_queries || self.calibrated.is_some() {
            return;
        }
        self.n_queries += query.size()[2] as usize;
        self.queries.push(query.shallow_clone());
        if let Some(w) = self.window {
            while self.queries.len() > 1 && self.n_queries - self.queries[0].size()[2] as usize >= w
            {
                self.n_queries -= self.queries.remove(0).size()[2] as usize;
            }
        }
    }

    fn buffered(&self) -> Result<Option<Tensor>> {
        Ok(match self.queries.len() {
            0 => None,
            1 => Some(self.queries[0].shallow_clone()),
            _ => Some(Tensor::f_cat(&self.queries, 2)?),
        })
    }

    /// Folds the buffered queries into the online statistics (`seen`: tokens seen per row,
    /// the position after the last buffered query of that row).
    fn fold(&mut self, rope: Option<&Rope>, seen: &[usize]) -> Result<()> {
        let (Some(queries), Some(rope)) = (self.buffered()?, rope) else {
            return Ok(());
        };
        let q = queries.size()[2] as usize;
        let fresh = if seen.iter().all(|&s| s == seen[0]) {
            query_stats(&queries, rope, seen[0].saturating_sub(q))?
        } else {
            // rows of a padded batch sit at their own positions
            let rows = seen
                .iter()
                .enumerate()
                .map(|(b, &s)| {
                    query_stats(
                        &queries.f_narrow(0, b as i64, 1)?,
                        rope,
                        s.saturating_sub(q),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            cat_stats(&rows)?
        };
        self.online_stats = Some(match &self.online_stats {
            None => fresh,
            Some(old) => old.merge(&fresh)?,
        });
        self.queries.clear();
        self.n_queries = 0;
        Ok(())
    }

    /// Compresses `target` if the schedule says so after a forward of `new_tokens` tokens.
    /// Returns the press's outcome when it evicted.
    pub(crate) fn maybe_compress(
        &mut self,
        press: &Press,
        target: &mut (dyn Target + Send),
        layer_idx: usize,
        rows: Rows<'_>,
        new_tokens: usize,
    ) -> Result<Option<Outcome>> {
        let batch = rows.stored.len();
        let mut steps = Vec::with_capacity(batch);
        for b in 0..batch {
            let protected = self.protected.get(b).copied().unwrap_or(0);
            steps.push(
                self.schedule
                    .plan(rows.stored[b], rows.seen[b], new_tokens, protected)?
                    .map(|n_kept| Decoding {
                        n_kept,
                        next_position: rows.seen[b],
                        protect_first: protected,
                        protect_last: self.schedule.interval(),
                    }),
            );
        }
        if steps.iter().all(Option::is_none) {
            return Ok(None);
        }
        let uniform = rows.hidden.iter().all(|&h| h == 0) && steps.iter().all(|s| *s == steps[0]);
        let stats = if self.online {
            self.fold(press.rope(), rows.seen)?;
            self.online_stats.as_ref()
        } else {
            self.calibrated.as_ref()
        };
        let queries = if self.needs_queries && self.calibrated.is_none() && !self.online {
            self.buffered()?
        } else {
            None
        };
        let plan = if uniform {
            Plan::decoding(layer_idx, steps[0].unwrap_or_default())
        } else {
            Plan::decoding_rows(layer_idx, steps).with_hidden(rows.hidden.to_vec())
        }
        .with_queries(queries.as_ref())
        .with_query_stats(stats)
        .with_previous_scores(self.kept_scores.as_ref());
        let outcome = press.compress(target, plan)?;
        if outcome.evicted {
            self.kept_scores = outcome.kept_scores.as_ref().map(Tensor::shallow_clone);
        }
        // The last `interval` stored tokens are never evicted, so their queries still are
        // the queries of the last stored tokens: keep them (a short last prompt block then
        // still has a full window).
        self.keep_last(self.schedule.interval())?;
        Ok(outcome.evicted.then_some(outcome))
    }

    fn keep_last(&mut self, n: usize) -> Result<()> {
        let Some(queries) = self.buffered()? else {
            return Ok(());
        };
        let q = queries.size()[2];
        let queries = if q > n as i64 {
            queries.f_narrow(2, q - n as i64, n as i64)?
        } else {
            queries
        };
        self.n_queries = queries.size()[2] as usize;
        self.queries = vec![queries];
        Ok(())
    }

    /// TriAttention's online statistics with the buffered queries folded in (`seen`: tokens
    /// seen per row); the calibration's statistics when there is a calibration.
    pub fn statistics(
        &mut self,
        rope: Option<&Rope>,
        seen: &[usize],
    ) -> Result<Option<&QueryStats>> {
        if self.calibrated.is_some() {
            return Ok(self.calibrated.as_ref());
        }
        if self.online && !self.queries.is_empty() {
            self.fold(rope, seen)?;
        }
        Ok(self.online_stats.as_ref())
    }

    /// Rows repeated `repeats` times (beam search's expansion).
    pub fn repeat_rows(&mut self, repeats: i64) -> Result<()> {
        for q in &mut self.queries {
            *q = q.f_repeat_interleave_self_int(repeats, 0, None)?;
        }
        if let Some(s) = &self.kept_scores {
            self.kept_scores = Some(s.f_repeat_interleave_self_int(repeats, 0, None)?);
        }
        self.protected = self
            .protected
            .iter()
            .flat_map(|&p| std::iter::repeat_n(p, repeats as usize))
            .collect();
        if let Some(s) = &self.online_stats {
            let order =
                Tensor::f_arange(s.center_re.size()[0], (tch::Kind::Int64, tch::Device::Cpu))?
                    .f_repeat_interleave_self_int(repeats, 0, None)?;
            self.online_stats = Some(select_stats(s, &order)?);
        }
        Ok(())
    }
}

fn select_stats(s: &QueryStats, order: &Tensor) -> Result<QueryStats> {
    let pick = |t: &Tensor| -> Result<Tensor> {
        Ok(if t.size()[0] == 1 {
            t.shallow_clone()
        } else {
            t.f_index_select(0, &order.f_to(t.device())?)?
        })
    };
    Ok(QueryStats {
        center_re: pick(&s.center_re)?,
        center_im: pick(&s.center_im)?,
        magnitude: pick(&s.magnitude)?,
        rest_mean: pick(&s.rest_mean)?,
        rest_magnitude: pick(&s.rest_magnitude)?,
        count: s.count,
    })
}

fn cat_stats(rows: &[QueryStats]) -> Result<QueryStats> {
    let cat = |f: &dyn Fn(&QueryStats) -> &Tensor| -> Result<Tensor> {
        Ok(Tensor::f_cat(&rows.iter().map(f).collect::<Vec<_>>(), 0)?)
    };
    Ok(QueryStats {
        center_re: cat(&|s| &s.center_re)?,
        center_im: cat(&|s| &s.center_im)?,
        magnitude: cat(&|s| &s.magnitude)?,
        rest_mean: cat(&|s| &s.rest_mean)?,
        rest_magnitude: cat(&|s| &s.rest_magnitude)?,
        count: rows.first().map_or(0, |s| s.count),
    })
}
