//! aarch64 kernels: NEON (`smull`/`sadalp` widening products), and `sdot` where the CPU
//! reports the dot-product extension (Cortex-A55/A76 and later: Raspberry Pi 5, Jetson Orin;
//! the Pi 4's Cortex-A72 has NEON only). `sdot` goes through inline assembly because its
//! intrinsic is not stable in Rust yet.
//!
//! Blocks are unpacked to signed bytes in two 16-byte registers, multiplied with the
//! activation's bytes into i32 lanes, and scaled in f32 once per block (per sub-block for the
//! K-quants, whose sub-block sums are weighted in integers first).

use std::arch::aarch64::*;
use std::arch::asm;

use super::scalar::scale_min_k4;
use super::{ActRef, Q8Block, Q8KBlock, WType};

/// Byte i of entry b is 0x10 where bit i of b is set: Q5_0's fifth bit, 8 values at a time.
static BIT4: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut v = 0u64;
        let mut i = 0;
        while i < 8 {
            if b & (1 << i) != 0 {
                v |= 0x10 << (8 * i);
            }
            i += 1;
        }
        t[b] = v;
        b += 1;
    }
    t
};

/// `out[r]` = row r · act, rows `row_bytes` apart in `w`.
///
/// # Safety
/// NEON must be present (and dotprod when `dot` is true); `w` must hold `out.len()` rows of
/// `row_bytes`, `row_bytes` being the activation's block count times the type's block size.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot_rows(
    dot: bool,
    wt: WType,
    w: &[u8],
    row_bytes: usize,
    act: ActRef<'_>,
    out: &mut [f32],
) {
    for (r, o) in out.iter_mut().enumerate() {
        // SAFETY: row r lies within `w` (the caller's contract); dotprod is only enabled
        // when the caller says the CPU has it.
        unsafe {
            let p = w.as_ptr().add(r * row_bytes);
            *o = match (dot, act) {
                (true, ActRef::B(a)) => row32_dot(wt, p, a),
                (false, ActRef::B(a)) => row32::<false>(wt, p, a),
                (true, ActRef::K(a)) => rowk_dot(wt, p, a),
                (false, ActRef::K(a)) => rowk::<false>(wt, p, a),
            };
        }
    }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn row32_dot(wt: WType, p: *const u8, a: &[Q8Block]) -> f32 {
    // SAFETY: forwarded contract; dotprod is enabled here.
    unsafe { row32::<true>(wt, p, a) }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn rowk_dot(wt: WType, p: *const u8, a: &[Q8KBlock]) -> f32 {
    // SAFETY: forwarded contract; dotprod is enabled here.
    unsafe { rowk::<true>(wt, p, a) }
}

/// acc + Σ (w·a) per group of four bytes.
#[inline(always)]
unsafe fn dot16<const DOT: bool>(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    if DOT {
        let mut acc = acc;
        // SAFETY: only instantiated with DOT from functions compiled with dotprod enabled,
        // which the caller checked the CPU has; `sdot` reads and writes registers only.
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {w:v}.16b, {a:v}.16b",
                acc = inout(vreg) acc,
                w = in(vreg) w,
                a = in(vreg) a,
                options(pure, nomem, nostack)
            );
        }
        acc
    } else {
        // SAFETY: NEON is enabled in every caller.
        unsafe {
            let lo = vmull_s8(vget_low_s8(w), vget_low_s8(a));
            let hi = vmull_s8(vget_high_s8(w), vget_high_s8(a));
            vpadalq_s16(vpadalq_s16(acc, lo), hi)
        }
    }
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller points at two readable bytes.
    let h = unsafe { p.cast::<u16>().read_unaligned() };
    half::f16::from_bits(h).to_f32()
}

#[inline(always)]
unsafe fn row32<const DOT: bool>(wt: WType, w: *const u8, a: &[Q8Block]) -> f32 {
    let bb = wt.block_bytes();
    let mut acc = 0f32;
    for (b, ab) in a.iter().enumerate() {
        // SAFETY: block b of this row is readable (the caller's contract); the activation
        // loads read `qs` (32 bytes).
        unsafe {
            let p = w.add(b * bb);
            let a0 = vld1q_s8(ab.qs.as_ptr());
            let a1 = vld1q_s8(ab.qs.as_ptr().add(16));
            let (w0, w1, mins) = match wt {
                WType::Q4_0 | WType::Q4_1 => {
                    let off = if wt == WType::Q4_0 { 2 } else { 4 };
                    let q = vld1q_u8(p.add(off));
                    let lo = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F)));
                    let hi = vreinterpretq_s8_u8(vshrq_n_u8(q, 4));
                    if wt == WType::Q4_0 {
                        let eight = vdupq_n_s8(8);
                        (vsubq_s8(lo, eight), vsubq_s8(hi, eight), 0.0)
                    } else {
                        (lo, hi, f16_at(p.add(2)) * ab.s)
                    }
                }
                WType::Q5_0 => {
                    let qh = p.add(2).cast::<u32>().read_unaligned();
                    let bits = |i: u32| BIT4[((qh >> (8 * i)) & 0xFF) as usize];
                    let h0 = vcombine_u8(vcreate_u8(bits(0)), vcreate_u8(bits(1)));
                    let h1 = vcombine_u8(vcreate_u8(bits(2)), vcreate_u8(bits(3)));
                    let q = vld1q_u8(p.add(6));
                    let lo = vorrq_u8(vandq_u8(q, vdupq_n_u8(0x0F)), h0);
                    let hi = vorrq_u8(vshrq_n_u8(q, 4), h1);
                    let sixteen = vdupq_n_s8(16);
                    (
                        vsubq_s8(vreinterpretq_s8_u8(lo), sixteen),
                        vsubq_s8(vreinterpretq_s8_u8(hi), sixteen),
                        0.0,
                    )
                }
                WType::Q8_0 => (vld1q_s8(p.add(2).cast()), vld1q_s8(p.add(18).cast()), 0.0),
                WType::Q4K | WType::Q6K => unreachable!("K-quants take Q8_K activations"),
            };
            let s = dot16::<DOT>(dot16::<DOT>(vdupq_n_s32(0), w0, a0), w1, a1);
            acc += f16_at(p) * ab.d * vaddvq_s32(s) as f32 + mins;
        }
    }
    acc
}

#[inline(always)]
unsafe fn rowk<const DOT: bool>(wt: WType, w: *const u8, a: &[Q8KBlock]) -> f32 {
    let mut acc = 0f32;
    for (b, ab) in a.iter().enumerate() {
        // SAFETY: block b of this row is readable (the caller's contract); activation
        // loads stay inside `qs` (256 bytes).
        unsafe {
            let aq = |i: usize| vld1q_s8(ab.qs.as_ptr().add(16 * i));
            let zero = vdupq_n_s32(0);
            match wt {
                WType::Q4K => {
                    let p = w.add(b * 144);
                    let scales = std::slice::from_raw_parts(p.add(4), 12);
                    let m4 = vdupq_n_u8(0x0F);
                    let (mut sumi, mut summ) = (0i32, 0i32);
                    for j in 0..4 {
                        let q0 = vld1q_u8(p.add(16 + 32 * j));
                        let q1 = vld1q_u8(p.add(32 + 32 * j));
                        let lo = dot16::<DOT>(
                            dot16::<DOT>(zero, vreinterpretq_s8_u8(vandq_u8(q0, m4)), aq(4 * j)),
                            vreinterpretq_s8_u8(vandq_u8(q1, m4)),
                            aq(4 * j + 1),
                        );
                        let hi = dot16::<DOT>(
                            dot16::<DOT>(
                                zero,
                                vreinterpretq_s8_u8(vshrq_n_u8(q0, 4)),
                                aq(4 * j + 2),
                            ),
                            vreinterpretq_s8_u8(vshrq_n_u8(q1, 4)),
                            aq(4 * j + 3),
                        );
                        let (sc1, m1) = scale_min_k4(2 * j, scales);
                        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                        sumi += i32::from(sc1) * vaddvq_s32(lo) + i32::from(sc2) * vaddvq_s32(hi);
                        let bs = &ab.bsums;
                        summ += i32::from(m1) * (i32::from(bs[4 * j]) + i32::from(bs[4 * j + 1]));
                        summ +=
                            i32::from(m2) * (i32::from(bs[4 * j + 2]) + i32::from(bs[4 * j + 3]));
                    }
                    acc += f16_at(p) * ab.d * sumi as f32 - f16_at(p.add(2)) * ab.d * summ as f32;
                }
                WType::Q6K => {
                    let p = w.add(b * 210);
                    let sc = std::slice::from_raw_parts(p.add(192).cast::<i8>(), 16);
                    let m4 = vdupq_n_u8(0x0F);
                    let m3 = vdupq_n_u8(0x03);
                    let mut sumi = 0i32;
                    for n in 0..2 {
                        for h in 0..2 {
                            // 16 of the 32 positions l in this 128-half: sub-blocks 8n+h+2i.
                            let ql0 = vld1q_u8(p.add(64 * n + 16 * h));
                            let ql1 = vld1q_u8(p.add(64 * n + 32 + 16 * h));
                            let qh = vld1q_u8(p.add(128 + 32 * n + 16 * h));
                            let qs = [
                                vorrq_u8(vandq_u8(ql0, m4), vshlq_n_u8(vandq_u8(qh, m3), 4)),
                                vorrq_u8(
                                    vandq_u8(ql1, m4),
                                    vshlq_n_u8(vandq_u8(vshrq_n_u8(qh, 2), m3), 4),
                                ),
                                vorrq_u8(
                                    vshrq_n_u8(ql0, 4),
                                    vshlq_n_u8(vandq_u8(vshrq_n_u8(qh, 4), m3), 4),
                                ),
                                vorrq_u8(vshrq_n_u8(ql1, 4), vshlq_n_u8(vshrq_n_u8(qh, 6), 4)),
                            ];
                            for (i, q) in qs.into_iter().enumerate() {
                                let q = vsubq_s8(vreinterpretq_s8_u8(q), vdupq_n_s8(32));
                                let s = dot16::<DOT>(zero, q, aq(8 * n + 2 * i + h));
                                sumi += i32::from(sc[8 * n + 2 * i + h]) * vaddvq_s32(s);
                            }
                        }
                    }
                    acc += f16_at(p.add(208)) * ab.d * sumi as f32;
                }
                _ => unreachable!("32-blocks take Q8 activations"),
            }
        }
    }
    acc
}
