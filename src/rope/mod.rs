//! Rotary position embedding (RoPE) math for the cache: apply, invert and shift the
//! rotation of keys (or queries) without the model.
//!
//! A key cached at position p is k_p = s·R(p)·k, where R(p) rotates each channel pair f by
//! the angle p·θ_f and s is the rope type's attention scaling (1 except yarn/longrope).
//! Rotations compose, R(a)·R(b) = R(a+b), which gives the three operations:
//!
//! - [`Rope::apply`]: k ↦ s·R(p)·k (what the model does to pre-RoPE keys);
//! - [`Rope::invert`]: k_p ↦ R(−p)·k_p / s, back to pre-RoPE space (scorers, quantizers);
//! - [`Rope::shift`]: k_p ↦ R(δ)·k_p, moves a cached key to position p + δ (re-rotation of
//!   kept keys after eviction with δ = i − p_i per key and head; placement of a reused chunk
//!   at a new offset with one δ). The scaling is not applied again.
//!
//! The module is split by concept: [`frequencies`] (θ_f and scaling of each rope type),
//! [`angles`] (p·θ_f in f64, reduced modulo 2π), [`positions`] (shapes of positions and
//! deltas), [`rotate`] (CPU kernel and libtorch path), [`table`] (cos/sin for re-applying RoPE
//! inside a kernel), [`bounds`] (feasible RoPE bases).
//!
//! ```
//! use kvpress_rs::rope::{Rope, RopeSpec};
//! use tch::{Kind, Tensor};
//! let rope = Rope::new(RopeSpec::new(8, 10_000.0)).unwrap();
//! let keys = Tensor::randn([1, 2, 5, 8], (Kind::Float, tch::Device::Cpu));
//! let positions = Tensor::arange(5, (Kind::Int64, tch::Device::Cpu));
//! let rotated = rope.apply(&keys, &positions, None).unwrap();
//! let back = rope.invert(&rotated, &positions, None).unwrap();
//! assert!(back.allclose(&keys, 1e-6, 1e-6, false));
//! ```

pub mod angles;
pub mod bounds;
pub mod frequencies;
pub mod positions;
pub mod rotate;
pub mod table;

pub use bounds::{base_bounds, BaseBounds, Precision};
pub use frequencies::{Scaling, ScalingParams, ROPE_TYPES};

use crate::error::{KvError, Result};
use crate::tensor::{check_kv, uses_cpu_kernels};
use rotate::Rotation;
use tch::{Device, Tensor};

/// How the channels of a head pair up for rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layout {
    /// GPT-NeoX / Llama (`rotate_half`): channel f pairs with f + rotary_dim/2.
    #[default]
    RotateHalf,
    /// GPT-J (`rotate_every_two`): channels 2f and 2f+1 pair.
    Interleaved,
}

/// The RoPE parameters of a model as plain values (what the Python adapter reads from a
/// transformers config). [`Rope::new`] validates them.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeSpec {
    /// transformers' `rope_type`: one of [`ROPE_TYPES`].
    pub rope_type: String,
    /// Channels per attention head.
    pub head_dim: usize,
    /// The RoPE base (`rope_theta`).
    pub theta: f64,
    /// Fraction of each head that rotates; rotary_dim = ⌊head_dim · factor⌋.
    pub partial_rotary_factor: f64,
    /// Rotated channels, overriding `partial_rotary_factor` (GPT-J's `rotary_dim`).
    pub rotary_dim: Option<usize>,
    pub layout: Layout,
    /// The type-specific parameters (`factor`, `original_max_position_embeddings`, ...).
    pub params: ScalingParams,
}

impl RopeSpec {
    /// Plain (`default`) RoPE over the whole head, rotate-half layout.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        RopeSpec {
            rope_type: "default".to_owned(),
            head_dim,
            theta,
            partial_rotary_factor: 1.0,
            rotary_dim: None,
            layout: Layout::RotateHalf,
            params: ScalingParams::default(),
        }
    }
}

/// A validated RoPE: frequencies, scaling and layout, and the operations on tensors.
/// Immutable and `Send + Sync`: one instance may serve every layer and thread.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    spec: RopeSpec,
    rotary_dim: usize,
    scaling: Scaling,
}

/// What a rotation does with the attention scaling s and the angle's sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Apply,
    Invert,
    Shift,
}

impl Rope {
    /// Validates `spec`: a known rope type with its required parameters, a base > 0, an even
    /// rotary dimension 2 ≤ rotary_dim ≤ head_dim.
    pub fn new(spec: RopeSpec) -> Result<Self> {
        if !(spec.theta.is_finite() && spec.theta > 0.0) {
            return Err(KvError::invalid(
                "theta",
                format!("got {}, expected a finite RoPE base > 0", spec.theta),
            ));
        }
        if spec.head_dim == 0 {
            return Err(KvError::invalid("head_dim", "got 0, expected >= 2"));
        }
        let prf = spec.partial_rotary_factor;
        if !(prf > 0.0 && prf <= 1.0) {
            return Err(KvError::invalid(
                "partial_rotary_factor",
                format!("got {prf}, expected a fraction in (0, 1]"),
            ));
        }
        let rotary_dim = spec
            .rotary_dim
            .unwrap_or((spec.head_dim as f64 * prf) as usize);
        if rotary_dim > spec.head_dim || rotary_dim < 2 || rotary_dim % 2 == 1 {
            let argument = if spec.rotary_dim.is_some() || prf < 1.0 {
                "rotary_dim"
            } else {
                "head_dim"
            };
            return Err(KvError::invalid(
                argument,
                format!(
                    "rotary_dim = {rotary_dim} (head_dim {} × partial_rotary_factor {prf}{}); \
                     it must be even, >= 2 and <= head_dim: channels rotate in pairs",
                    spec.head_dim,
                    if spec.rotary_dim.is_some() {
                        ", overridden by rotary_dim"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let scaling = spec.params.resolve(&spec.rope_type, rotary_dim)?;
        Ok(Rope {
            spec,
            rotary_dim,
            scaling,
        })
    }

    pub fn spec(&self) -> &RopeSpec {
        &self.spec
    }

    pub fn scaling(&self) -> &Scaling {
        &self.scaling
    }

    pub fn rope_type(&self) -> &'static str {
        self.scaling.name()
    }

    pub fn head_dim(&self) -> usize {
        self.spec.head_dim
    }

    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    pub fn theta(&self) -> f64 {
        self.spec.theta
    }

    pub fn layout(&self) -> Layout {
        self.spec.layout
    }

    /// The factor `apply` multiplies the rotated channels by (transformers multiplies cos
    /// and sin by it): yarn's and longrope's attention factor, else 1.
    pub fn attention_scaling(&self) -> f64 {
        self.scaling.attention_scaling()
    }

    /// θ_f for f = 0..rotary_dim/2, in f64. `seq_len` is the length of the sequence being
    /// processed (transformers: max(position_ids) + 1); it changes the frequencies of
    /// `dynamic` (beyond max_position_embeddings) and `longrope` (long factors beyond
    /// original_max_position_embeddings) only. None: the configured frequencies.
    pub fn inv_freq(&self, seq_len: Option<usize>) -> Vec<f64> {
        self.scaling
            .inv_freq(self.spec.theta, self.rotary_dim, seq_len)
    }

    /// cos and sin (times the attention scaling) at `positions` (any integer tensor),
    /// float32 of shape positions.shape + (rotary_dim,), in this rope's channel layout —
    /// what transformers' rotary embedding returns, computed from f64 angles.
    pub fn cos_sin(&self, positions: &Tensor, seq_len: Option<usize>) -> Result<(Tensor, Tensor)> {
        positions::check_integer(positions, "positions")?;
        let on_cpu = positions.device() == Device::Cpu && crate::tensor::cpu_kernels_enabled();
        angles::cos_sin(
            positions,
            &self.inv_freq(seq_len),
            self.attention_scaling(),
            self.layout(),
            on_cpu,
        )
    }

    /// Applies RoPE: x (batch, heads, tokens, head_dim) pre-RoPE → s·R(p)·x. `positions`:
    /// integer, shape (), (tokens,), (batch, tokens) or (batch, heads, tokens) (sizes may be
    /// 1). Returns a new tensor of x's dtype and device.
    pub fn apply(&self, x: &Tensor, positions: &Tensor, seq_len: Option<usize>) -> Result<Tensor> {
        self.rotate(x, positions, "positions", seq_len, Op::Apply, false)
    }

    /// Inverts RoPE exactly: x rotated at `positions` → R(−p)·x / s (pre-RoPE).
    pub fn invert(&self, x: &Tensor, positions: &Tensor, seq_len: Option<usize>) -> Result<Tensor> {
        self.rotate(x, positions, "positions", seq_len, Op::Invert, false)
    }

    /// [`Rope::invert`] with the result in float32: for f16/bf16 input, the rotation's own
    /// float32 values, not rounded back to the input's dtype (statistics of pre-RoPE
    /// queries read them without a second copy or that rounding).
    pub fn invert_to_float(
        &self,
        x: &Tensor,
        positions: &Tensor,
        seq_len: Option<usize>,
    ) -> Result<Tensor> {
        self.rotate(x, positions, "positions", seq_len, Op::Invert, true)
    }

    /// Moves rotated x by `delta` positions: R(δ)·x, so that a key rotated at p becomes the
    /// key rotated at p + δ. `delta` has the shapes `positions` may have; the attention
    /// scaling is not applied again.
    pub fn shift(&self, x: &Tensor, delta: &Tensor, seq_len: Option<usize>) -> Result<Tensor> {
        self.rotate(x, delta, "delta", seq_len, Op::Shift, false)
    }

    /// The rotation `op` of x; the result in x's dtype, or float32 when `float32_out`.
    fn rotate(
        &self,
        x: &Tensor,
        positions: &Tensor,
        argument: &str,
        seq_len: Option<usize>,
        op: Op,
        float32_out: bool,
    ) -> Result<Tensor> {
        let shape = check_kv(x, "x")?;
        if shape.head_dim != self.head_dim() {
            return Err(KvError::shape(
                "x",
                &x.size(),
                format!(
                    "(batch, heads, tokens, {}): this rope's head_dim is {}",
                    self.head_dim(),
                    self.head_dim()
                ),
            ));
        }
        let pos = positions::broadcastable_positions(positions, shape, argument)?;
        let inv_freq = self.inv_freq(seq_len);
        let s = self.attention_scaling();
        let (sign, scale) = match op {
            Op::Apply => (1.0, s),
            Op::Invert => (-1.0, 1.0 / s),
            Op::Shift => (1.0, 1.0),
        };
        let rot = Rotation {
            inv_freq: &inv_freq,
            sign,
            scale,
            layout: self.layout(),
        };
        if uses_cpu_kernels(x) {
            rotate::rotate_cpu(x, &pos, &rot, float32_out)
        } else {
            rotate::rotate_libtorch(x, &pos, &rot, float32_out)
        }
    }
}
