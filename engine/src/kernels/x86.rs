//! AVX2 + FMA + F16C kernels (x86-64), used only when the CPU reports all three.
//!
//! 32-value blocks: the weight block is unpacked to 32 bytes in one register (nibbles, plus
//! the fifth bit for Q5_0), multiplied with the activation's 32 bytes by `maddubs` (u8 × i8 →
//! i16 pairs; signed weights go through the usual sign trick) and `madd` (→ i32), then one
//! float FMA with the two scales per block. Four rows share each activation block load.
//! K-quants: per 32 (Q4_K) or 16 (Q6_K) values, the integer products are weighted by the
//! sub-block scales in `madd`; Q4_K's minimums use the activation block sums. A second copy
//! of the same kernels is compiled for CPUs with AVX-512 VNNI (`vpdpbusd`).

use std::arch::x86_64::*;

const T_Q4_0: u8 = 0;
const T_Q4_1: u8 = 1;
const T_Q5_0: u8 = 2;
const T_Q8_0: u8 = 3;

/// The 32-block and K-quant kernels, stamped out once per feature set: `$vnni` swaps
/// `maddubs`+`madd` for AVX-512 VNNI's `vpdpbusd` (256-bit, needs AVX512VL).
macro_rules! kernels {
    ($name:ident, $features:literal, $vnni:literal) => {
        pub(super) mod $name {
            use std::arch::x86_64::*;

            use super::super::scalar::scale_min_k4;
            use super::super::{ActRef, Q8Block, Q8KBlock, WType};
            use super::{T_Q4_0, T_Q4_1, T_Q5_0, T_Q8_0, hsum};

            /// `out[t·n + r]` = row r · token t's activations, for the `n = out.len() / acts.len()`
            /// rows `row_bytes` apart in `w`. Tokens go two at a time through the 32-block kernels (each
            /// unpacked weight block serves both) and four at a time through the K-quant ones, rows four at
            /// a time in the 32-block kernels (each activation load serves four).
            ///
            /// # Safety
            /// The CPU must support `$features`; `w` must hold `n` rows of `row_bytes`, and
            /// `row_bytes` must be every activation's block count times the type's block size.
            #[target_feature(enable = $features)]
            pub(in crate::kernels) unsafe fn dot_rows(
                wt: WType,
                w: &[u8],
                row_bytes: usize,
                acts: &[ActRef<'_>],
                out: &mut [f32],
            ) {
                let n = out.len() / acts.len();
                let p = w.as_ptr();
                let t = match wt {
                    WType::Q4_0 => T_Q4_0,
                    WType::Q4_1 => T_Q4_1,
                    WType::Q5_0 => T_Q5_0,
                    WType::Q8_0 => T_Q8_0,
                    WType::Q4K | WType::Q6K => {
                        let kb = |i: usize| match acts[i] {
                            ActRef::K(a) => a,
                            ActRef::B(_) => unreachable!("K-quants take Q8_K activations"),
                        };
                        // Up to four tokens per pass: each unpacked weight vector serves all.
                        let mut ti = 0;
                        while ti < acts.len() {
                            let tn = (acts.len() - ti).min(4);
                            let a: [&[Q8KBlock]; 4] =
                                std::array::from_fn(|j| kb(ti + j.min(tn - 1)));
                            for r in 0..n {
                                let mut o = [0f32; 4];
                                // SAFETY: row r lies within `w` (the caller's contract).
                                unsafe {
                                    let q = p.add(r * row_bytes);
                                    macro_rules! go {
                                        ($f:ident) => {
                                            match tn {
                                                1 => $f::<1>(q, a, &mut o),
                                                2 => $f::<2>(q, a, &mut o),
                                                3 => $f::<3>(q, a, &mut o),
                                                _ => $f::<4>(q, a, &mut o),
                                            }
                                        };
                                    }
                                    if wt == WType::Q4K {
                                        go!(row_q4k)
                                    } else {
                                        go!(row_q6k)
                                    }
                                }
                                for (j, v) in o.iter().enumerate().take(tn) {
                                    out[(ti + j) * n + r] = *v;
                                }
                            }
                            ti += tn;
                        }
                        return;
                    }
                };
                let blocks = |i: usize| match acts[i] {
                    ActRef::B(a) => a,
                    ActRef::K(_) => unreachable!("32-blocks take Q8 activations"),
                };
                let mut ti = 0;
                while ti < acts.len() {
                    let pair = ti + 1 < acts.len();
                    let a = [blocks(ti), blocks(if pair { ti + 1 } else { ti })];
                    let mut r = 0;
                    while r < n {
                        let rows = if r + 4 <= n { 4 } else { 1 };
                        let mut o = [[0f32; 4]; 2];
                        // SAFETY: rows r..r+rows lie within `w` (the caller's contract), and the
                        // features are enabled in this function.
                        unsafe {
                            let q = p.add(r * row_bytes);
                            macro_rules! go {
                                ($ty:expr) => {
                                    match (rows, pair) {
                                        (4, true) => {
                                            rows32::<4, 2, { $ty }>(q, row_bytes, a, &mut o)
                                        }
                                        (4, false) => {
                                            rows32::<4, 1, { $ty }>(q, row_bytes, a, &mut o)
                                        }
                                        (_, true) => {
                                            rows32::<1, 2, { $ty }>(q, row_bytes, a, &mut o)
                                        }
                                        (_, false) => {
                                            rows32::<1, 1, { $ty }>(q, row_bytes, a, &mut o)
                                        }
                                    }
                                };
                            }
                            match t {
                                T_Q4_0 => go!(T_Q4_0),
                                T_Q4_1 => go!(T_Q4_1),
                                T_Q5_0 => go!(T_Q5_0),
                                _ => go!(T_Q8_0),
                            }
                        }
                        out[ti * n + r..ti * n + r + rows].copy_from_slice(&o[0][..rows]);
                        if pair {
                            out[(ti + 1) * n + r..(ti + 1) * n + r + rows]
                                .copy_from_slice(&o[1][..rows]);
                        }
                        r += rows;
                    }
                    ti += if pair { 2 } else { 1 };
                }
            }

            /// [`dot_rows`] over packed weights (the module docs of `kernels`): groups of 8
            /// rows, up to four tokens per pass.
            ///
            /// # Safety
            /// The CPU must support `$features`; `wt` must be Q4_0, Q4_1, Q5_0 or Q8_0, `w` must hold
            /// `n` packed rows (n a multiple of 8) of `row_bytes`, and every activation must be
            /// Q8 blocks, `row_bytes` / the type's block size of them.
            #[target_feature(enable = $features)]
            pub(in crate::kernels) unsafe fn dot_rows_packed(
                wt: WType,
                w: &[u8],
                row_bytes: usize,
                acts: &[ActRef<'_>],
                out: &mut [f32],
            ) {
                let n = out.len() / acts.len();
                let blocks = |i: usize| match acts[i] {
                    ActRef::B(a) => a,
                    ActRef::K(_) => unreachable!("32-blocks take Q8 activations"),
                };
                let nb = row_bytes / wt.block_bytes();
                let mut ti = 0;
                while ti < acts.len() {
                    let tn = (acts.len() - ti).min(4);
                    let a: [&[Q8Block]; 4] = std::array::from_fn(|j| blocks(ti + j.min(tn - 1)));
                    for g in 0..n / 8 {
                        let mut o = [[0f32; 8]; 4];
                        // SAFETY: group g (8 rows) lies within `w` (the caller's contract); the
                        // features are enabled in this function.
                        unsafe {
                            let q = w.as_ptr().add(g * 8 * row_bytes);
                            macro_rules! go {
                                ($ty:expr) => {
                                    match tn {
                                        1 => packed8::<1, { $ty }>(q, nb, a, &mut o),
                                        2 => packed8::<2, { $ty }>(q, nb, a, &mut o),
                                        3 => packed8::<3, { $ty }>(q, nb, a, &mut o),
                                        _ => packed8::<4, { $ty }>(q, nb, a, &mut o),
                                    }
                                };
                            }
                            match wt {
                                WType::Q4_0 => go!(T_Q4_0),
                                WType::Q4_1 => go!(T_Q4_1),
                                WType::Q5_0 => go!(T_Q5_0),
                                _ => go!(T_Q8_0),
                            }
                        }
                        for (j, o) in o.iter().enumerate().take(tn) {
                            out[(ti + j) * n + 8 * g..(ti + j) * n + 8 * g + 8].copy_from_slice(o);
                        }
                    }
                    ti += tn;
                }
            }

            /// Activation bytes 4j..4j+4 (j < 8) in every i32 lane.
            #[target_feature(enable = $features)]
            #[inline]
            fn bcast4(a: &Q8Block, j: usize) -> __m256i {
                assert!(j < 8);
                // SAFETY: bytes 4j..4j+4 lie inside the 32 of `qs`.
                _mm256_set1_epi32(unsafe {
                    a.qs.as_ptr().add(4 * j).cast::<i32>().read_unaligned()
                })
            }

            /// 0x10 in each byte whose bit k of `h` is set (k < 8): Q5_0's fifth bits of
            /// nibble vector k. 16-bit shifts are exact here: a byte's bit k reaches bit 4
            /// of the same byte for every k < 8, and the mask drops what crossed bytes.
            #[target_feature(enable = $features)]
            #[inline]
            fn fifth_bit(h: __m256i, k: usize) -> __m256i {
                let moved = match k {
                    0 => _mm256_slli_epi16(h, 4),
                    1 => _mm256_slli_epi16(h, 3),
                    2 => _mm256_slli_epi16(h, 2),
                    3 => _mm256_slli_epi16(h, 1),
                    4 => h,
                    5 => _mm256_srli_epi16(h, 1),
                    6 => _mm256_srli_epi16(h, 2),
                    _ => _mm256_srli_epi16(h, 3),
                };
                _mm256_and_si256(moved, _mm256_set1_epi8(0x10))
            }

            /// u8 × i8 products of `x` and `y` summed by four into the i32 lanes of `acc`.
            #[target_feature(enable = $features)]
            #[inline]
            fn dp_add(acc: __m256i, x: __m256i, y: __m256i) -> __m256i {
                if $vnni {
                    #[allow(unused_unsafe)]
                    // SAFETY: only compiled into the copy whose functions enable avx512vnni and
                    // avx512vl, which `detect` checked before choosing it.
                    unsafe {
                        _mm256_dpbusd_epi32(acc, x, y)
                    }
                } else {
                    _mm256_add_epi32(acc, dot_u8(x, y))
                }
            }

            /// One packed group of 8 rows of type `TY` (`nb` blocks) · the first `T` tokens of
            /// `a`, into `out[t]`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn packed8<const T: usize, const TY: u8>(
                w: *const u8,
                nb: usize,
                a: [&[Q8Block]; 4],
                out: &mut [[f32; 8]; 4],
            ) {
                let (bb, hdr) = match TY {
                    T_Q4_0 => (8 * 18, 16),
                    T_Q4_1 => (8 * 20, 32),
                    T_Q5_0 => (8 * 22, 48),
                    _ => (8 * 34, 16),
                };
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); T];
                for b in 0..nb {
                    // SAFETY: block b of the group (`bb` bytes: header, then quants) is inside
                    // the rows the caller vouched for.
                    unsafe {
                        let p = w.add(b * bb);
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                        let q = p.add(hdr);
                        let mut s = [_mm256_setzero_si256(); T];
                        if TY == T_Q8_0 {
                            for j in 0..8 {
                                let c = _mm256_loadu_si256(q.add(32 * j).cast());
                                if $vnni {
                                    // Unsigned as w + 128; the 128·Σa comes off below.
                                    let cu = _mm256_xor_si256(c, _mm256_set1_epi8(-128));
                                    for t in 0..T {
                                        s[t] = dp_add(s[t], cu, bcast4(&a[t][b], j));
                                    }
                                } else {
                                    let ac = _mm256_sign_epi8(c, c);
                                    for t in 0..T {
                                        let sa = _mm256_sign_epi8(bcast4(&a[t][b], j), c);
                                        s[t] = dp_add(s[t], ac, sa);
                                    }
                                }
                            }
                        } else {
                            // Q5_0's fifth bits (bit k of each byte for nibble vector k).
                            let h = if TY == T_Q5_0 {
                                _mm256_loadu_si256(p.add(16).cast())
                            } else {
                                _mm256_setzero_si256()
                            };
                            for j in 0..4 {
                                let c = _mm256_loadu_si256(q.add(32 * j).cast());
                                let mut lo = _mm256_and_si256(c, m4);
                                let mut hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), m4);
                                if TY == T_Q5_0 {
                                    lo = _mm256_or_si256(lo, fifth_bit(h, j));
                                    hi = _mm256_or_si256(hi, fifth_bit(h, 4 + j));
                                }
                                for t in 0..T {
                                    let ab = &a[t][b];
                                    if $vnni {
                                        s[t] = dp_add(s[t], lo, bcast4(ab, j));
                                        s[t] = dp_add(s[t], hi, bcast4(ab, 4 + j));
                                    } else {
                                        // Two pairs of 5-bit·i8 products stay below i16's
                                        // limit (2·2·31·127), so two `maddubs` add as i16.
                                        let x = _mm256_add_epi16(
                                            _mm256_maddubs_epi16(lo, bcast4(ab, j)),
                                            _mm256_maddubs_epi16(hi, bcast4(ab, 4 + j)),
                                        );
                                        s[t] = _mm256_add_epi32(
                                            s[t],
                                            _mm256_madd_epi16(x, _mm256_set1_epi16(1)),
                                        );
                                    }
                                }
                            }
                        }
                        for t in 0..T {
                            let ab = &a[t][b];
                            let off = match TY {
                                T_Q4_0 => 8 * ab.sum,
                                T_Q5_0 => 16 * ab.sum,
                                T_Q8_0 if $vnni => 128 * ab.sum,
                                _ => 0,
                            };
                            let si = _mm256_sub_epi32(s[t], _mm256_set1_epi32(off));
                            let dd = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                            acc[t] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(si), acc[t]);
                            if TY == T_Q4_1 {
                                let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast()));
                                acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(ab.s), acc[t]);
                            }
                        }
                    }
                }
                for t in 0..T {
                    // SAFETY: `out[t]` is 8 floats.
                    unsafe { _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]) };
                }
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn f16_at(p: *const u8) -> f32 {
                // SAFETY: the caller points at two readable bytes.
                let h = unsafe { p.cast::<u16>().read_unaligned() };
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
            }

            /// 16 bytes of nibbles → 32 bytes: low nibbles in the low lane, high nibbles in the high.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn nibbles(p: *const u8) -> __m256i {
                // SAFETY: the caller points at 16 readable bytes.
                let t = unsafe { _mm_loadu_si128(p.cast()) };
                let both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
                _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
            }

            /// Byte i = 0xFF where bit i of `x` is set, else 0.
            #[target_feature(enable = $features)]
            #[inline]
            fn bits_to_bytes(x: u32) -> __m256i {
                let shuf = _mm256_set_epi64x(
                    0x0303_0303_0303_0303,
                    0x0202_0202_0202_0202,
                    0x0101_0101_0101_0101,
                    0,
                );
                let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
                let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
                _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi64x(-1))
            }

            /// Σ |x|·(y·sign x) over 32 bytes, as 8 f32 lanes: Σ x·y for signed x and y by the sign
            /// trick (`maddubs` takes one unsigned operand). Exact because activations never hold −128
            /// (they are clamped to ±127) and |x|·|y| pairs stay below i16's limit (2·128·127).
            #[target_feature(enable = $features)]
            #[inline]
            fn dot_abs(ax: __m256i, sy: __m256i) -> __m256 {
                _mm256_cvtepi32_ps(dot_u8(ax, sy))
            }

            /// Σ x·y with x unsigned (≤ 63), y signed, as 8 i32 lanes.
            #[target_feature(enable = $features)]
            #[inline]
            fn dot_u8(x: __m256i, y: __m256i) -> __m256i {
                if $vnni {
                    // `vpdpbusd`: the same u8 × i8 products summed by four, straight into i32 (no
                    // intermediate i16 saturation). Only compiled into the AVX-512 VNNI copy.
                    #[allow(unused_unsafe)]
                    // SAFETY: this branch only exists in the copy whose functions enable avx512vnni
                    // and avx512vl, which `detect` checked before choosing it.
                    unsafe {
                        _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y)
                    }
                } else {
                    _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
                }
            }

            /// R rows of a 32-block type `TY` · the first `T` of two tokens, into `out[t][r]`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn rows32<const R: usize, const T: usize, const TY: u8>(
                w: *const u8,
                row_bytes: usize,
                a: [&[Q8Block]; 2],
                out: &mut [[f32; 4]; 2],
            ) {
                let bb = match TY {
                    T_Q4_0 => 18,
                    T_Q4_1 => 20,
                    T_Q5_0 => 22,
                    _ => 34,
                };
                let mut acc = [[_mm256_setzero_ps(); R]; T];
                let mut mins = [[0f32; R]; T];
                for b in 0..a[0].len() {
                    let mut av = [_mm256_setzero_si256(); T];
                    let mut ad = [0f32; T];
                    for t in 0..T {
                        let ab = &a[t][b];
                        // SAFETY: `Q8Block::qs` is 32 bytes.
                        av[t] = unsafe { _mm256_loadu_si256(ab.qs.as_ptr().cast()) };
                        ad[t] = ab.d;
                    }
                    for r in 0..R {
                        // SAFETY: block b of row r is inside the rows the caller vouched for.
                        unsafe {
                            let p = w.add(r * row_bytes + b * bb);
                            let dw = f16_at(p);
                            match TY {
                                T_Q4_1 => {
                                    let q = nibbles(p.add(4));
                                    let m = f16_at(p.add(2));
                                    for t in 0..T {
                                        let s = _mm256_cvtepi32_ps(dot_u8(q, av[t]));
                                        acc[t][r] = _mm256_fmadd_ps(
                                            _mm256_set1_ps(dw * ad[t]),
                                            s,
                                            acc[t][r],
                                        );
                                        mins[t][r] += m * a[t][b].s;
                                    }
                                }
                                _ => {
                                    let q = match TY {
                                        T_Q4_0 => {
                                            _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8))
                                        }
                                        T_Q5_0 => {
                                            let qh = p.add(2).cast::<u32>().read_unaligned();
                                            let hi = _mm256_andnot_si256(
                                                bits_to_bytes(qh),
                                                _mm256_set1_epi8(-16),
                                            );
                                            _mm256_or_si256(nibbles(p.add(6)), hi)
                                        }
                                        _ => _mm256_loadu_si256(p.add(2).cast()),
                                    };
                                    let aq = _mm256_sign_epi8(q, q);
                                    for t in 0..T {
                                        let s = dot_abs(aq, _mm256_sign_epi8(av[t], q));
                                        acc[t][r] = _mm256_fmadd_ps(
                                            _mm256_set1_ps(dw * ad[t]),
                                            s,
                                            acc[t][r],
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
                for t in 0..T {
                    for r in 0..R {
                        out[t][r] = hsum(acc[t][r]) + mins[t][r];
                    }
                }
            }

            /// One Q4_K row · the first `T` tokens of `a`, into `out[t]`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn row_q4k<const T: usize>(
                w: *const u8,
                a: [&[Q8KBlock]; 4],
                out: &mut [f32; 4],
            ) {
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); T];
                let mut mins = [0f32; T];
                for b in 0..a[0].len() {
                    // SAFETY: block b (144 bytes) of this row is readable (the caller's contract);
                    // activation loads stay inside `qs` (256 bytes).
                    unsafe {
                        let p = w.add(b * 144);
                        let d = f16_at(p);
                        let dmin = f16_at(p.add(2));
                        let scales = std::slice::from_raw_parts(p.add(4), 12);
                        let mut acci = [_mm256_setzero_si256(); T];
                        let mut summ = [0i32; T];
                        for j in 0..4 {
                            let (sc1, m1) = scale_min_k4(2 * j, scales);
                            let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                            let q = _mm256_loadu_si256(p.add(16 + 32 * j).cast());
                            let lo = _mm256_and_si256(q, m4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                            let (s1, s2) = (
                                _mm256_set1_epi16(i16::from(sc1)),
                                _mm256_set1_epi16(i16::from(sc2)),
                            );
                            for t in 0..T {
                                let ab = &a[t][b];
                                let bs = &ab.bsums;
                                summ[t] += i32::from(m1)
                                    * (i32::from(bs[4 * j]) + i32::from(bs[4 * j + 1]))
                                    + i32::from(m2)
                                        * (i32::from(bs[4 * j + 2]) + i32::from(bs[4 * j + 3]));
                                let alo = _mm256_loadu_si256(ab.qs.as_ptr().add(64 * j).cast());
                                let ahi =
                                    _mm256_loadu_si256(ab.qs.as_ptr().add(64 * j + 32).cast());
                                let plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, alo), s1);
                                let phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, ahi), s2);
                                acci[t] = _mm256_add_epi32(acci[t], _mm256_add_epi32(plo, phi));
                            }
                        }
                        for t in 0..T {
                            let ad = a[t][b].d;
                            acc[t] = _mm256_fmadd_ps(
                                _mm256_set1_ps(d * ad),
                                _mm256_cvtepi32_ps(acci[t]),
                                acc[t],
                            );
                            mins[t] += dmin * ad * summ[t] as f32;
                        }
                    }
                }
                for t in 0..T {
                    out[t] = hsum(acc[t]) - mins[t];
                }
            }

            /// One Q6_K row · the first `T` tokens of `a`, into `out[t]`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn row_q6k<const T: usize>(
                w: *const u8,
                a: [&[Q8KBlock]; 4],
                out: &mut [f32; 4],
            ) {
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); T];
                for b in 0..a[0].len() {
                    // SAFETY: block b (210 bytes) of this row is readable (the caller's contract);
                    // activation loads stay inside `qs` (256 bytes).
                    unsafe {
                        let p = w.add(b * 210);
                        let d = f16_at(p.add(208));
                        let sc = std::slice::from_raw_parts(p.add(192).cast::<i8>(), 16);
                        let mut acci = [_mm256_setzero_si256(); T];
                        for n in 0..2 {
                            let ql0 = _mm256_loadu_si256(p.add(64 * n).cast());
                            let ql1 = _mm256_loadu_si256(p.add(64 * n + 32).cast());
                            let qh = _mm256_loadu_si256(p.add(128 + 32 * n).cast());
                            let q1 = _mm256_or_si256(
                                _mm256_and_si256(ql0, m4),
                                _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4),
                            );
                            let q2 = _mm256_or_si256(
                                _mm256_and_si256(ql1, m4),
                                _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2),
                            );
                            let q3 = _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                                _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
                            );
                            let q4 = _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(-64)), 2),
                            );
                            for (i, q) in [q1, q2, q3, q4].into_iter().enumerate() {
                                let s0 = i16::from(sc[8 * n + 2 * i]);
                                let s1 = i16::from(sc[8 * n + 2 * i + 1]);
                                let scv = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                                for t in 0..T {
                                    let av = _mm256_loadu_si256(
                                        a[t][b].qs.as_ptr().add(128 * n + 32 * i).cast(),
                                    );
                                    acci[t] = _mm256_add_epi32(
                                        acci[t],
                                        _mm256_madd_epi16(_mm256_maddubs_epi16(q, av), scv),
                                    );
                                }
                            }
                        }
                        for t in 0..T {
                            let ab = &a[t][b];
                            // The −32 offset: Σₛ scₛ·32·bsumₛ.
                            let mut off = 0i32;
                            for s in 0..16 {
                                off += i32::from(sc[s]) * i32::from(ab.bsums[s]);
                            }
                            let total = _mm256_sub_epi32(
                                acci[t],
                                _mm256_setr_epi32(32 * off, 0, 0, 0, 0, 0, 0, 0),
                            );
                            acc[t] = _mm256_fmadd_ps(
                                _mm256_set1_ps(d * ab.d),
                                _mm256_cvtepi32_ps(total),
                                acc[t],
                            );
                        }
                    }
                }
                for t in 0..T {
                    out[t] = hsum(acc[t]);
                }
            }
        }
    };
}

kernels!(avx2, "avx2,fma,f16c", false);
kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true
);

/// Σ a·b over f32 (the lengths must be equal).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY: every load reads 8 floats starting below n - 7 (or n - 15), inside both slices.
    unsafe {
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                s1,
            );
            i += 16;
        }
        while i + 8 <= n {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                s0,
            );
            i += 8;
        }
    }
    let mut s = hsum(_mm256_add_ps(s0, s1));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// y ← y + a·x (the lengths must be equal).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    // SAFETY: every load and store touches 8 floats starting below n - 7, inside both slices.
    unsafe {
        while i + 8 <= n {
            let yp = y.as_mut_ptr().add(i);
            let v = _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp));
            _mm256_storeu_ps(yp, v);
            i += 8;
        }
    }
    while i < n {
        y[i] += a * x[i];
        i += 1;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
