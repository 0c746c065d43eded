//! The scalar kernels: activation quantization (used on every path) and the reference dot
//! products the SIMD paths are tested against. Plain safe Rust, one block at a time.

use half::f16;

use super::{ActRef, Q8Block, Q8KBlock, WType};

/// The block layouts' own readers, shared with `quant` (one decoder of the GGUF blocks).
pub(super) use crate::quant::{get_f16 as f16_at, scale_min_k4};

/// Rounds to the nearest f16 and back (llama.cpp stores Q8_0/Q8_1 activation scales as f16).
fn via_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Rounds to the nearest integer, ties to even, for |x| < 2²²: adding and subtracting
/// 1.5·2²³ leaves no fraction bits. Vectorizes on baseline x86-64 (SSE2), where `round()`
/// would be a library call; ties to even is also what llama.cpp's SIMD quantizers do.
#[inline(always)]
fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// 32 values → i8 with one scale; `s` = d·Σq for Q4_1's minimum term, `sum` = Σq.
pub(super) fn quantize_q8(x: &[f32], out: &mut Q8Block) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in out.qs.iter_mut().zip(x) {
        // |v·id| ≤ 127 (+ rounding), so the cast cannot wrap.
        let r = round_even(v * id).clamp(-127.0, 127.0) as i8;
        *q = r;
        sum += i32::from(r);
    }
    out.d = via_f16(d);
    out.s = via_f16(d * sum as f32);
    out.sum = sum;
}

/// 256 values → i8 with one f32 scale and the sums of each 16 (llama.cpp's Q8_K).
pub(super) fn quantize_q8k(x: &[f32], out: &mut Q8KBlock) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        *out = Q8KBlock::default();
        return;
    }
    let iscale = -127.0 / max;
    for (q, &v) in out.qs.iter_mut().zip(x) {
        *q = round_even(iscale * v).clamp(-127.0, 127.0) as i8;
    }
    for (s, qs) in out.bsums.iter_mut().zip(out.qs.chunks_exact(16)) {
        *s = qs.iter().map(|&q| i16::from(q)).sum();
    }
    out.d = 1.0 / iscale;
}

/// One row of type `wt` (whole blocks) · one token's activations.
pub(super) fn dot(wt: WType, w: &[u8], act: ActRef<'_>) -> f32 {
    match (wt, act) {
        (WType::Q4K, ActRef::K(a)) => dot_q4k(w, a),
        (WType::Q6K, ActRef::K(a)) => dot_q6k(w, a),
        (WType::Q4K | WType::Q6K, ActRef::B(_)) | (_, ActRef::K(_)) => {
            unreachable!("activations quantized for another weight type")
        }
        (_, ActRef::B(a)) => dot_32(wt, w, a),
    }
}

fn dot_32(wt: WType, w: &[u8], a: &[Q8Block]) -> f32 {
    let bb = wt.block_bytes();
    let mut acc = 0f32;
    for (blk, ab) in w.chunks_exact(bb).zip(a) {
        let d = f16_at(blk, 0);
        let mut sumi = 0i32;
        match wt {
            WType::Q4_0 => {
                for j in 0..16 {
                    let q = blk[2 + j];
                    sumi += (i32::from(q & 0xF) - 8) * i32::from(ab.qs[j]);
                    sumi += (i32::from(q >> 4) - 8) * i32::from(ab.qs[j + 16]);
                }
                acc += d * ab.d * sumi as f32;
            }
            WType::Q4_1 => {
                let m = f16_at(blk, 2);
                for j in 0..16 {
                    let q = blk[4 + j];
                    sumi += i32::from(q & 0xF) * i32::from(ab.qs[j]);
                    sumi += i32::from(q >> 4) * i32::from(ab.qs[j + 16]);
                }
                acc += d * ab.d * sumi as f32 + m * ab.s;
            }
            WType::Q5_0 => {
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                for j in 0..16 {
                    let q = blk[6 + j];
                    let lo = i32::from(q & 0xF) | (((qh >> j) & 1) << 4) as i32;
                    let hi = i32::from(q >> 4) | (((qh >> (j + 16)) & 1) << 4) as i32;
                    sumi += (lo - 16) * i32::from(ab.qs[j]);
                    sumi += (hi - 16) * i32::from(ab.qs[j + 16]);
                }
                acc += d * ab.d * sumi as f32;
            }
            WType::Q8_0 => {
                for j in 0..32 {
                    sumi += i32::from(blk[2 + j] as i8) * i32::from(ab.qs[j]);
                }
                acc += d * ab.d * sumi as f32;
            }
            WType::Q4K | WType::Q6K => unreachable!("K-quants take Q8_K activations"),
        }
    }
    acc
}

fn dot_q4k(w: &[u8], a: &[Q8KBlock]) -> f32 {
    let mut acc = 0f32;
    for (blk, ab) in w.chunks_exact(144).zip(a) {
        let d = f16_at(blk, 0) * ab.d;
        let dmin = f16_at(blk, 2) * ab.d;
        let scales = &blk[4..16];
        let qs = &blk[16..144];
        let (mut sumi, mut summ) = (0i32, 0i32);
        for j in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * j, scales);
            let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let q = qs[32 * j + l];
                lo += i32::from(q & 0xF) * i32::from(ab.qs[64 * j + l]);
                hi += i32::from(q >> 4) * i32::from(ab.qs[64 * j + 32 + l]);
            }
            sumi += i32::from(sc1) * lo + i32::from(sc2) * hi;
            let b = &ab.bsums;
            summ += i32::from(m1) * (i32::from(b[4 * j]) + i32::from(b[4 * j + 1]));
            summ += i32::from(m2) * (i32::from(b[4 * j + 2]) + i32::from(b[4 * j + 3]));
        }
        acc += d * sumi as f32 - dmin * summ as f32;
    }
    acc
}

fn dot_q6k(w: &[u8], a: &[Q8KBlock]) -> f32 {
    let mut acc = 0f32;
    for (blk, ab) in w.chunks_exact(210).zip(a) {
        let d = f16_at(blk, 208) * ab.d;
        let sumi = q6k_block_sum(blk, &ab.qs);
        acc += d * sumi as f32;
    }
    acc
}

/// Σ scₛ·(q − 32)·a over one Q6_K block.
fn q6k_block_sum(blk: &[u8], a: &[i8; 256]) -> i32 {
    let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
    let mut sumi = 0i32;
    for n in 0..2 {
        let (ql, qh, sc, a) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..], &a[128 * n..]);
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |i: usize| i32::from(sc[i] as i8);
            sumi += s(is) * q1 * i32::from(a[l]);
            sumi += s(is + 2) * q2 * i32::from(a[l + 32]);
            sumi += s(is + 4) * q3 * i32::from(a[l + 64]);
            sumi += s(is + 6) * q4 * i32::from(a[l + 96]);
        }
    }
    sumi
}
