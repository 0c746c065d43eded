//! The f32 pieces of our own forward passes, on plain slices: RMSNorm, rotary embeddings
//! computed per position (no table of every position), the SiLU and GELU gates, and
//! attention over a preallocated KV cache.
//!
//! KV cache layout: per layer, `cap` slots of `kv_heads × head_dim` f32 for K and the same
//! for V; position p lives in slot `p % cap`. Global layers get `cap` = the context window;
//! sliding-window layers `window + MAX_CHUNK`, which is enough because a forward pass writes
//! at most `MAX_CHUNK` new positions before attending (the oldest key its first query needs
//! is `window − 1` behind it). The buffers are allocated zeroed at load, so the kernel maps
//! pages only as positions are written. Grouped-query attention reads each KV head in place
//! for all the query heads that share it; nothing is copied per head.

use rayon::prelude::*;

use crate::kernels;

/// Most positions one forward pass processes at once (longer prompts go in chunks).
pub const MAX_CHUNK: usize = 512;

/// `x` ← RMSNorm(`x`)·`w`, row by row (`w.len()` values each).
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let one = |row: &mut [f32]| {
        let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let scale = 1.0 / (ss + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = *v * scale * g;
        }
    };
    if x.len() >= PAR_MIN {
        x.par_chunks_exact_mut(w.len()).for_each(one);
    } else {
        x.chunks_exact_mut(w.len()).for_each(one);
    }
}

/// Elementwise work at least this large (a prompt's, not a decoded token's) is split over
/// the pool: unsplit, Gemma 3's GELU alone kept one of two threads busy for a fifth of a
/// 512-token prefill.
const PAR_MIN: usize = 1 << 14;

/// `f` over `a` and `b` in step, split over the pool where they are long.
fn zip_apply(a: &mut [f32], b: &[f32], f: impl Fn(&mut f32, f32) + Sync) {
    let one = |(a, b): (&mut [f32], &[f32])| {
        for (x, y) in a.iter_mut().zip(b) {
            f(x, *y);
        }
    };
    if a.len() >= PAR_MIN {
        a.par_chunks_mut(4096).zip(b.par_chunks(4096)).for_each(one);
    } else {
        one((a, b));
    }
}

/// `out` ← RMSNorm(`x`)·`w` (same shapes).
pub fn rms_norm_into(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    out.clear();
    out.extend_from_slice(x);
    rms_norm(out, w, eps);
}

/// Rotary embeddings for heads of `head_dim` values with base `base`.
pub struct Rope {
    inv: Vec<f32>,
    /// NEOX (Gemma): i pairs with i + d/2; otherwise interleaved (Llama): 2i with 2i + 1.
    neox: bool,
}

impl Rope {
    pub fn new(head_dim: usize, base: f32, neox: bool) -> Self {
        let inv = (0..head_dim)
            .step_by(2)
            .map(|i| base.powf(-(i as f32) / head_dim as f32))
            .collect();
        Self { inv, neox }
    }

    /// Each frequency divided by `factors[i]` where given (llama.cpp's per-frequency
    /// `rope_freqs` of Llama 3.1 and later), and all of them by `linear` (a
    /// `rope.scaling.type` of `linear`: positions stretched by that factor).
    pub fn scaled(mut self, factors: Option<&[f32]>, linear: f32) -> Self {
        for (i, f) in self.inv.iter_mut().enumerate() {
            *f /= linear * factors.map_or(1.0, |fs| fs[i]);
        }
        self
    }

    /// The (cos, sin) of every rotation angle for positions `pos..pos + len`, row by row.
    pub fn table(&self, pos: usize, len: usize, cs: &mut Vec<(f32, f32)>) {
        cs.clear();
        for p in pos..pos + len {
            cs.extend(self.inv.iter().map(|f| {
                let a = p as f32 * f;
                (a.cos(), a.sin())
            }));
        }
    }

    /// Rotates `x` (rows of heads × head_dim, row i at the position of row i of `cs`, a
    /// [`table`](Self::table)).
    pub fn apply(&self, x: &mut [f32], heads: usize, cs: &[(f32, f32)]) {
        let half = self.inv.len();
        let hd = 2 * half;
        for (row, cs) in x.chunks_exact_mut(heads * hd).zip(cs.chunks_exact(half)) {
            for h in row.chunks_exact_mut(hd) {
                for (j, &(c, s)) in cs.iter().enumerate() {
                    let (a, b) = if self.neox {
                        (j, j + half)
                    } else {
                        (2 * j, 2 * j + 1)
                    };
                    let (x0, x1) = (h[a], h[b]);
                    h[a] = x0 * c - x1 * s;
                    h[b] = x0 * s + x1 * c;
                }
            }
        }
    }
}

/// `gate` ← SiLU(`gate`)·`up`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    zip_apply(gate, up, |g, u| *g = *g / (1.0 + (-*g).exp()) * u);
}

/// `gate` ← GELU(`gate`)·`up`, tanh approximation (as Gemma and llama.cpp use).
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    const C: f32 = 0.797_884_6; // √(2/π)
    // ½·(1 + tanh z) = 1 / (1 + e^(−2z)): one `exp` instead of `tanh` (whose `expm1` took a
    // tenth of Gemma 3's prefill). Where e^(−2z) overflows, x / ∞ is the −0 GELU tends to.
    zip_apply(gate, up, |g, u| {
        let x = *g;
        let z = C * (x + 0.044_715 * x * x * x);
        *g = x / (1.0 + (-2.0 * z).exp()) * u;
    });
}

/// One layer's keys and values.
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    cap: usize,
    width: usize,
    /// `Some(w)`: a query sees only the last `w` positions.
    window: Option<usize>,
}

impl KvCache {
    /// `context` positions, each `kv_heads × head_dim` wide.
    pub fn new(context: usize, width: usize, window: Option<usize>) -> Self {
        let cap = match window {
            Some(w) => (w + MAX_CHUNK).min(context),
            None => context,
        }
        .max(1);
        Self {
            k: vec![0.0; cap * width],
            v: vec![0.0; cap * width],
            cap,
            width,
            window,
        }
    }

    /// Gives the memory back (fresh zeroed buffers: pages are mapped again only when
    /// written).
    pub fn reset(&mut self) {
        self.k = vec![0.0; self.cap * self.width];
        self.v = vec![0.0; self.cap * self.width];
    }

    /// Stores `len` rows of keys and values for positions `pos..pos + len`.
    pub fn store(&mut self, k: &[f32], v: &[f32], pos: usize) {
        for (i, (kr, vr)) in k
            .chunks_exact(self.width)
            .zip(v.chunks_exact(self.width))
            .enumerate()
        {
            let s = (pos + i) % self.cap * self.width;
            self.k[s..s + self.width].copy_from_slice(kr);
            self.v[s..s + self.width].copy_from_slice(vr);
        }
    }

    /// Causal attention for `len` queries at `pos..` (rows of heads × head_dim in `q`),
    /// written to `out` (same shape); keys scaled by `scale`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        q: &[f32],
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        pos: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let rep = heads / kv_heads;
        let row = heads * head_dim;
        let one = |(i, (qr, or)): (usize, (&[f32], &mut [f32]))| {
            let qp = pos + i;
            let first = self.window.map_or(0, |w| (qp + 1).saturating_sub(w));
            let mut scores = Vec::with_capacity(qp + 1 - first);
            for h in 0..heads {
                let kvh = h / rep;
                let qh = &qr[h * head_dim..(h + 1) * head_dim];
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for kp in first..=qp {
                    let s = kp % self.cap * self.width + kvh * head_dim;
                    let d = kernels::dot_f32(qh, &self.k[s..s + head_dim]) * scale;
                    max = max.max(d);
                    scores.push(d);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let oh = &mut or[h * head_dim..(h + 1) * head_dim];
                oh.fill(0.0);
                for (kp, &p) in (first..=qp).zip(&scores) {
                    let s = kp % self.cap * self.width + kvh * head_dim;
                    kernels::axpy(p / sum, &self.v[s..s + head_dim], oh);
                }
            }
        };
        if q.len() / row > 1 {
            q.par_chunks_exact(row)
                .zip(out.par_chunks_exact_mut(row))
                .enumerate()
                .for_each(one);
        } else {
            q.chunks_exact(row)
                .zip(out.chunks_exact_mut(row))
                .enumerate()
                .for_each(one);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_equal_their_textbook_forms_on_long_and_extreme_inputs() {
        // Long enough to be split over the pool, with extremes where exp overflows.
        let n = PAR_MIN + 37;
        let x: Vec<f32> = (0..n)
            .map(|i| match i % 7 {
                0 => -120.0,
                1 => 95.0,
                _ => (i as f32 * 0.618).sin() * 8.0,
            })
            .collect();
        let up: Vec<f32> = (0..n).map(|i| 1.0 + (i % 5) as f32 * 0.25).collect();
        let (mut gelu, mut silu) = (x.clone(), x.clone());
        gelu_mul(&mut gelu, &up);
        silu_mul(&mut silu, &up);
        for i in 0..n {
            let (v, u) = (x[i], up[i]);
            let want = 0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044_715 * v * v * v)).tanh()) * u;
            assert!(
                (gelu[i] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "GELU at {v}: {} vs {want}",
                gelu[i]
            );
            let want = v / (1.0 + (-v).exp()) * u;
            assert!(
                (silu[i] - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "SiLU at {v}"
            );
        }
        let mut rows = x.clone();
        let w: Vec<f32> = (0..64).map(|i| 0.5 + i as f32 / 64.0).collect();
        rms_norm(&mut rows[..PAR_MIN], &w, 1e-6);
        let mut one = x[..64].to_vec();
        rms_norm(&mut one, &w, 1e-6);
        assert_eq!(&rows[..64], &one[..], "a row normed alone or among many");
    }

    #[test]
    fn scaled_rotations_turn_slower_by_their_factors() {
        let plain = Rope::new(8, 10_000.0, false);
        let scaled = Rope::new(8, 10_000.0, false).scaled(Some(&[1.0, 2.0, 4.0, 8.0]), 2.0);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        plain.table(16, 1, &mut a);
        scaled.table(16, 1, &mut b);
        // At position 16, pair i of the scaled table turns as pair i of the plain one at
        // position 16 / (2·factor).
        for (i, div) in [2.0f32, 4.0, 8.0, 16.0].iter().enumerate() {
            let want = (16.0 / div) * plain.inv[i];
            assert!((b[i].0 - want.cos()).abs() < 1e-6 && (b[i].1 - want.sin()).abs() < 1e-6);
        }
        assert_ne!(a, b);
    }

    #[test]
    fn sliding_cache_keeps_the_window_across_chunks() {
        // One head of width 1, window 3: query at p sees keys p-2..=p. Keys = positions,
        // values = positions; with all scores equal (q = 0) the output is their mean.
        let mut c = KvCache::new(10_000, 1, Some(3));
        let mut pos = 0;
        for len in [MAX_CHUNK, 7, 1, MAX_CHUNK] {
            let k: Vec<f32> = (pos..pos + len).map(|p| p as f32).collect();
            c.store(&k, &k, pos);
            let q = vec![0f32; len];
            let mut out = vec![0f32; len];
            c.attend(&q, 1, 1, 1, pos, 1.0, &mut out);
            for (i, o) in out.iter().enumerate() {
                let p = pos + i;
                let seen: Vec<f32> = (p.saturating_sub(2)..=p).map(|x| x as f32).collect();
                let mean = seen.iter().sum::<f32>() / seen.len() as f32;
                assert!((o - mean).abs() < 1e-3, "position {p}: {o} vs {mean}");
            }
            pos += len;
        }
    }

    #[test]
    fn grouped_heads_read_their_shared_kv_head() {
        // 2 query heads share 1 KV head of dim 2; both must see the same values.
        let mut c = KvCache::new(8, 2, None);
        c.store(&[1.0, 0.0, 0.0, 1.0], &[10.0, 20.0, 30.0, 40.0], 0);
        let q = [50.0, 0.0, 0.0, 50.0]; // head 0 favours key 0, head 1 key 1 (position 1)
        let mut out = [0f32; 4];
        c.attend(&q, 2, 1, 2, 1, 1.0, &mut out);
        assert!((out[0] - 10.0).abs() < 1e-3 && (out[1] - 20.0).abs() < 1e-3);
        assert!((out[2] - 30.0).abs() < 1e-3 && (out[3] - 40.0).abs() < 1e-3);
    }
}
