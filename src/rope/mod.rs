//! Rotary position embedding math (inverse rotation, delta re-rotation of kept keys,
//! placement of reused chunks; see `docs/ARCHITECTURE.md`).
//!
//! Not implemented yet: the policies here keep keys with their original rotation and the
//! cache reports tokens seen as the next position, which needs no RoPE math.
