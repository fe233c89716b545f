//! A quantized store as named plain tensors ([`export`]), and one store assembled from the
//! parts of several stores placed at offsets ([`assemble`]): how quantized chunk caches are
//! written to disk and placed in a later prompt without re-quantizing anything.
//!
//! Only stores with pre-RoPE keys (`pre_rope_keys`) have parts: their codes hold keys
//! before RoPE and each block remembers its tokens' positions, so moving a block by `d`
//! positions is `positions + d` — codes, scales/zeros and outliers are reused byte for
//! byte. Values carry no position. Full-precision tokens (sinks, residual window) are kept
//! rotated, so they move with one delta rotation ([`Rope::shift`]).
//!
//! Names (every tensor on one device):
//!
//! ```text
//! front.k, front.v                 full precision (batch, heads, n, dim), rotated (the sinks region)
//! block.<i>.pos                    int32 (batch, heads, tokens): each token's position
//! block.<i>.<k|v>.codes            uint8 (batch, heads, groups · group_bytes)
//! block.<i>.<k|v>.params           float16 (batch, heads, groups, 2): scale, zero
//! block.<i>.<k|v>.outlier_pos      uint8 (batch, heads, groups, outliers), when outliers are kept
//! block.<i>.<k|v>.outlier_val      cache dtype (batch, heads, groups, outliers), likewise
//! residual.k, residual.v           full precision (batch, heads, n, dim), rotated
//! residual.pos                     int32 (batch, heads, n)
//! ```
//!
//! The assembled store holds every part's full-precision tokens (front and residual),
//! shifted to their global positions, in its front (sinks) region, then every part's
//! blocks with positions + offset, and an empty residual window for the tokens that come
//! next. Attention does not depend on the order of stored tokens except through the
//! causal mask among the newest `q_len` ones, which stay last (see
//! [`QuantizedStore::attend`]); every reused token precedes every later query.

use super::config::QuantConfig;
use super::layout::TensorLayout;
use super::qtensor::QuantizedTensor;
use super::store::{Block, BlockPositions, QuantizedStore, StoreShape};
use crate::error::{KvError, Result};
use crate::rope::Rope;
use crate::tensor::{device_name, kind_name, TOKEN_AXIS};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// The parts of one store and the token count its part of the sequence spans (the next
/// part starts this far after it; more than the tokens held when some were evicted).
#[derive(Debug)]
pub struct NamedParts {
    pub tensors: HashMap<String, Tensor>,
    pub tokens: usize,
}

/// `store`'s parts by name (copies; see the module documentation). Refused for stores
/// without pre-RoPE keys (their blocks cannot move) and for empty ones.
pub fn export(store: &QuantizedStore) -> Result<Vec<(String, Tensor)>> {
    if !store.config().pre_rope_keys {
        return Err(KvError::invalid(
            "pre_rope_keys",
            "a store exports its parts only with pre_rope_keys=True (blocks must hold keys \
             before RoPE to be placed at other positions)",
        ));
    }
    if store.shape().is_none() {
        return Err(super::store::empty_store());
    }
    let mut out = Vec::new();
    let copy = |t: &Tensor| -> Result<Tensor> { Ok(t.f_contiguous()?.f_detach_copy()?) };
    if let Some(s) = store.sinks().filter(|s| s.len > 0) {
        let (k, v) = s.view()?;
        out.push(("front.k".to_owned(), copy(&k)?));
        out.push(("front.v".to_owned(), copy(&v)?));
    }
    for (i, block) in store.blocks().iter().enumerate() {
        let p = block
            .positions
            .as_ref()
            .ok_or_else(|| KvError::State("internal: a pre-RoPE block has no positions".into()))?;
        out.push((
            format!("block.{i}.pos"),
            copy(&p.tensor(block.keys.codes().device())?)?,
        ));
        for (x, q) in [("k", &block.keys), ("v", &block.values)] {
            out.push((format!("block.{i}.{x}.codes"), copy(q.codes())?));
            out.push((format!("block.{i}.{x}.params"), copy(q.params())?));
            if let Some((pos, val)) = q.outliers() {
                out.push((format!("block.{i}.{x}.outlier_pos"), copy(pos)?));
                out.push((format!("block.{i}.{x}.outlier_val"), copy(val)?));
            }
        }
    }
    if let Some(r) = store.residual().filter(|r| r.len > 0) {
        let (k, v) = r.view()?;
        out.push(("residual.k".to_owned(), copy(&k)?));
        out.push(("residual.v".to_owned(), copy(&v)?));
        let p = r.positions_view()?.ok_or_else(|| {
            KvError::State("internal: a pre-RoPE residual has no positions".into())
        })?;
        out.push(("residual.pos".to_owned(), copy(&p)?));
    }
    Ok(out)
}

/// One store from `parts` placed one after the other (part i starts at the sum of the
/// `tokens` of the parts before it): blocks moved by their offset (positions only), the
/// full-precision tokens shifted to their global positions with one rotation per part and
/// held in front. `shape` gives batch, heads, head dims and the cache dtype (the device is
/// the parts'). The config must have `pre_rope_keys` and no `sink_tokens` (the front region
/// holds the parts' full-precision tokens instead). Every tensor is checked; an
/// inconsistent one is an error naming it (`parts[i]["block.0.k.codes"]`).
pub fn assemble(
    config: QuantConfig,
    rope: &Rope,
    shape: StoreShape,
    parts: &[NamedParts],
) -> Result<QuantizedStore> {
    let config = config.validated()?;
    if !config.pre_rope_keys {
        return Err(KvError::invalid(
            "config",
            "pre_rope_keys=False: only blocks of pre-RoPE keys can be placed at other positions",
        ));
    }
    if config.sink_tokens != 0 {
        return Err(KvError::invalid(
            "config",
            format!(
                "sink_tokens={}: an assembled store holds the parts' full-precision tokens in \
                 the sinks region; expected 0",
                config.sink_tokens
            ),
        ));
    }
    if parts.is_empty() {
        return Err(KvError::empty("parts", "at least one part is needed"));
    }
    config.check_head_dim(shape.key_dim, config.key_grouping, "keys")?;
    config.check_head_dim(shape.value_dim, config.value_grouping, "values")?;
    let layouts = (
        TensorLayout::new(&config, config.key_grouping, shape.key_dim),
        TensorLayout::new(&config, config.value_grouping, shape.value_dim),
    );
    let device = parts
        .iter()
        .flat_map(|p| p.tensors.values())
        .next()
        .map(Tensor::device)
        .ok_or_else(|| KvError::empty("parts", "every part is empty"))?;
    let shape = StoreShape { device, ..shape };
    let (mut front_k, mut front_v, mut blocks) = (Vec::new(), Vec::new(), Vec::new());
    let mut offset = 0usize;
    for (i, part) in parts.iter().enumerate() {
        let reader = Reader {
            i,
            part,
            shape,
            layouts,
        };
        reader.check_names()?;
        let mut fp_k = Vec::new();
        let mut fp_v = Vec::new();
        for region in ["front", "residual"] {
            if let Some((k, v)) = reader.full_precision(region)? {
                fp_k.push(k);
                fp_v.push(v);
            }
        }
        if !fp_k.is_empty() {
            let k = Tensor::f_cat(&fp_k, TOKEN_AXIS)?;
            front_k.push(if offset == 0 {
                k
            } else {
                rope.shift(&k, &Tensor::from(offset as i64), None)?
            });
            front_v.push(Tensor::f_cat(&fp_v, TOKEN_AXIS)?);
        }
        let mut b = 0;
        while part.tensors.contains_key(&format!("block.{b}.pos")) {
            let mut block = reader.block(b)?;
            block.positions = Some(
                block
                    .positions
                    .ok_or_else(|| KvError::State("internal: block without positions".into()))?
                    .shifted(offset as i64)?,
            );
            blocks.push(block);
            b += 1;
        }
        offset += part.tokens;
    }
    let front = if front_k.is_empty() {
        None
    } else {
        Some((
            Tensor::f_cat(&front_k, TOKEN_AXIS)?,
            Tensor::f_cat(&front_v, TOKEN_AXIS)?,
        ))
    };
    QuantizedStore::from_pieces(config, rope, shape, front, blocks)
}

/// Reads and checks the tensors of part `i`.
struct Reader<'a> {
    i: usize,
    part: &'a NamedParts,
    shape: StoreShape,
    layouts: (TensorLayout, TensorLayout),
}

impl Reader<'_> {
    fn argument(&self, name: &str) -> String {
        format!("parts[{}][{name:?}]", self.i)
    }

    /// Every name is one this module writes, and blocks are numbered 0, 1, ...
    fn check_names(&self) -> Result<()> {
        let n_blocks = (0..)
            .take_while(|b| self.part.tensors.contains_key(&format!("block.{b}.pos")))
            .count();
        for name in self.part.tensors.keys() {
            let known = matches!(
                name.as_str(),
                "front.k" | "front.v" | "residual.k" | "residual.v" | "residual.pos"
            ) || name
                .strip_prefix("block.")
                .and_then(|rest| rest.split_once('.'))
                .is_some_and(|(b, field)| {
                    b.parse::<usize>().is_ok_and(|b| b < n_blocks)
                        && matches!(
                            field,
                            "pos"
                                | "k.codes"
                                | "k.params"
                                | "k.outlier_pos"
                                | "k.outlier_val"
                                | "v.codes"
                                | "v.params"
                                | "v.outlier_pos"
                                | "v.outlier_val"
                        )
                });
            if !known {
                return Err(KvError::invalid(
                    format!("parts[{}]", self.i),
                    format!(
                        "unknown part {name:?} (blocks are numbered from 0 without gaps; see \
                         kvpress_rs.quant.parts for the names)"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.part.tensors.get(name).ok_or_else(|| {
            KvError::invalid(
                format!("parts[{}]", self.i),
                format!("the part {name:?} is missing"),
            )
        })
    }

    /// `name` has exactly `size`, `kind` and the store's device.
    fn check(&self, name: &str, t: &Tensor, size: &[i64], kind: Kind) -> Result<()> {
        if t.size() != size {
            return Err(KvError::shape(
                self.argument(name),
                &t.size(),
                format!("{size:?}"),
            ));
        }
        if t.kind() != kind {
            return Err(KvError::dtype(
                self.argument(name),
                kind_name(t.kind()),
                kind_name(kind),
            ));
        }
        if t.device() != self.shape.device {
            return Err(KvError::device(
                self.argument(name),
                device_name(t.device()),
                format!("{} like the other parts", device_name(self.shape.device)),
            ));
        }
        Ok(())
    }

    fn bh(&self) -> [i64; 2] {
        [self.shape.batch as i64, self.shape.heads as i64]
    }

    /// Positions `name`: int32 (batch, heads, n) — or (1, 1, n), one row shared by every
    /// (batch, head) — within [0, tokens).
    fn positions(&self, name: &str, t: &Tensor, n: i64) -> Result<()> {
        let [b, h] = self.bh();
        let shared = t.dim() == 3 && t.size()[..2] == [1, 1];
        let rows = if shared { [1, 1] } else { [b, h] };
        self.check(name, t, &[rows[0], rows[1], n], Kind::Int)?;
        if t.numel() > 0 {
            let (min, max) = (
                t.f_min()?.f_int64_value(&[])?,
                t.f_max()?.f_int64_value(&[])?,
            );
            if min < 0 || max >= self.part.tokens as i64 {
                return Err(KvError::invalid(
                    self.argument(name),
                    format!(
                        "positions span [{min}, {max}], expected positions in [0, {}) (the part's tokens)",
                        self.part.tokens
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The full-precision keys/values of `region` ("front" or "residual"), checked.
    fn full_precision(&self, region: &str) -> Result<Option<(Tensor, Tensor)>> {
        let (kn, vn) = (format!("{region}.k"), format!("{region}.v"));
        let (k, v) = match (self.part.tensors.get(&kn), self.part.tensors.get(&vn)) {
            (None, None) => return Ok(None),
            (Some(k), Some(v)) => (k, v),
            (None, Some(_)) => return Err(self.get(&kn).unwrap_err()),
            (Some(_), None) => return Err(self.get(&vn).unwrap_err()),
        };
        let [b, h] = self.bh();
        let n = k.size().get(2).copied().unwrap_or(-1);
        let s = &self.shape;
        self.check(&kn, k, &[b, h, n, s.key_dim as i64], s.kind)?;
        self.check(&vn, v, &[b, h, n, s.value_dim as i64], s.kind)?;
        if region == "residual" {
            self.positions("residual.pos", self.get("residual.pos")?, n)?;
        }
        if n as usize > self.part.tokens {
            return Err(KvError::invalid(
                self.argument(&kn),
                format!("{n} tokens, more than the part's {}", self.part.tokens),
            ));
        }
        Ok(Some((k.shallow_clone(), v.shallow_clone())))
    }

    /// Block `b`, checked (positions as stored, before any offset).
    fn block(&self, b: usize) -> Result<Block> {
        let pos_name = format!("block.{b}.pos");
        let pos = self.get(&pos_name)?;
        let tokens = pos.size().get(2).copied().unwrap_or(-1);
        let g = self.layouts.0.group_size as i64;
        if pos.dim() != 3 || tokens <= 0 || tokens % g != 0 {
            return Err(KvError::shape(
                self.argument(&pos_name),
                &pos.size(),
                format!(
                    "(batch, heads, tokens) with tokens a positive multiple of group_size ({g})"
                ),
            ));
        }
        self.positions(&pos_name, pos, tokens)?;
        let keys = self.tensor(b, "k", self.layouts.0, tokens as usize)?;
        let values = self.tensor(b, "v", self.layouts.1, tokens as usize)?;
        Ok(Block {
            keys,
            values,
            positions: Some(BlockPositions::from_tensor(pos)?),
        })
    }

    fn tensor(
        &self,
        b: usize,
        x: &str,
        layout: TensorLayout,
        tokens: usize,
    ) -> Result<QuantizedTensor> {
        let name = |f: &str| format!("block.{b}.{x}.{f}");
        let [bs, h] = self.bh();
        let groups = layout.groups(tokens) as i64;
        let codes = self.get(&name("codes"))?;
        self.check(
            &name("codes"),
            codes,
            &[bs, h, groups * layout.group_bytes() as i64],
            Kind::Uint8,
        )?;
        let params = self.get(&name("params"))?;
        self.check(&name("params"), params, &[bs, h, groups, 2], Kind::Half)?;
        let n_out = layout.outliers as i64;
        let outliers = match (
            self.part.tensors.get(&name("outlier_pos")),
            self.part.tensors.get(&name("outlier_val")),
        ) {
            (Some(pos), Some(val)) if n_out > 0 => {
                self.check(
                    &name("outlier_pos"),
                    pos,
                    &[bs, h, groups, n_out],
                    Kind::Uint8,
                )?;
                self.check(
                    &name("outlier_val"),
                    val,
                    &[bs, h, groups, n_out],
                    self.shape.kind,
                )?;
                let max = if pos.numel() > 0 {
                    pos.f_max()?.f_int64_value(&[])?
                } else {
                    0
                };
                if max >= layout.group_size as i64 {
                    return Err(KvError::invalid(
                        self.argument(&name("outlier_pos")),
                        format!("position {max} in a group of {}", layout.group_size),
                    ));
                }
                Some((pos.f_contiguous()?, val.f_contiguous()?))
            }
            (None, None) if n_out == 0 => None,
            _ => {
                return Err(KvError::invalid(
                    format!("parts[{}]", self.i),
                    format!(
                    "{} and {}: expected both with {n_out} outliers per group (outlier_fraction), \
                         neither without",
                    name("outlier_pos"),
                    name("outlier_val")
                ),
                ))
            }
        };
        Ok(QuantizedTensor {
            layout,
            batch: self.shape.batch,
            heads: self.shape.heads,
            tokens,
            kind: self.shape.kind,
            codes: codes.f_contiguous()?,
            params: params.f_contiguous()?,
            outliers,
        })
    }
}

/// A floating dtype from its name ("float32", "torch.bfloat16", ...).
pub fn float_kind(name: &str) -> Result<Kind> {
    Ok(match name.trim_start_matches("torch.") {
        "float32" | "float" => Kind::Float,
        "float16" | "half" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "float64" | "double" => Kind::Double,
        other => {
            return Err(KvError::invalid(
                "dtype",
                format!("got {other:?}, expected float32, float16, bfloat16 or float64"),
            ))
        }
    })
}
