//! The kernels against two references, on random blocks of every type with odd row counts,
//! token counts and block counts:
//! - the scalar reference against the f32 dot product of candle's dequantized weights with
//!   the unquantized activations, within the error the 8-bit activations allow
//!   (Σ|wᵢ|·amax/254 per block, plus float slack) — this checks our reading of the blocks;
//! - every SIMD path this CPU has against the scalar reference, within 1e-5 relative to the
//!   magnitude Σ|wᵢ·xᵢ| (both compute the same integer sums; only the float
//!   accumulation order differs);
//! - the threaded matmul against row-by-row scalar dots.

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::ggml_file::qtensor_from_ggml;

use super::*;

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 56) as u8
    }
}

const TYPES: [WType; 6] = [
    WType::Q4_0,
    WType::Q4_1,
    WType::Q5_0,
    WType::Q8_0,
    WType::Q4K,
    WType::Q6K,
];

fn ggml(wt: WType) -> GgmlDType {
    match wt {
        WType::Q4_0 => GgmlDType::Q4_0,
        WType::Q4_1 => GgmlDType::Q4_1,
        WType::Q5_0 => GgmlDType::Q5_0,
        WType::Q8_0 => GgmlDType::Q8_0,
        WType::Q4K => GgmlDType::Q4K,
        WType::Q6K => GgmlDType::Q6K,
    }
}

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

/// `rows` random rows of `blocks` blocks: random quant bytes, sane f16 scales.
fn random_rows(rng: &mut Rng, wt: WType, rows: usize, blocks: usize) -> Vec<u8> {
    let bb = wt.block_bytes();
    let mut w: Vec<u8> = (0..rows * blocks * bb).map(|_| rng.byte()).collect();
    for blk in w.chunks_exact_mut(bb) {
        match wt {
            WType::Q4_0 | WType::Q5_0 | WType::Q8_0 => put_f16(blk, 0, rng.f32() * 0.05),
            WType::Q4_1 => {
                put_f16(blk, 0, rng.f32().abs() * 0.05);
                put_f16(blk, 2, rng.f32() * 0.1);
            }
            WType::Q4K => {
                put_f16(blk, 0, rng.f32().abs() * 0.01);
                put_f16(blk, 2, rng.f32().abs() * 0.01);
            }
            WType::Q6K => put_f16(blk, 208, rng.f32() * 0.01),
        }
    }
    w
}

fn dequantize(wt: WType, w: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    qtensor_from_ggml(ggml(wt), w, vec![rows, cols], &Device::Cpu)
        .and_then(|t| t.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("candle dequantizes the random blocks")
}

/// ISAs this CPU can run besides the scalar one.
fn simd_isas() -> Vec<Isa> {
    let mut v = Vec::new();
    let d = detect();
    if d != Isa::Scalar {
        v.push(d);
    }
    if d == Isa::NeonDot {
        v.push(Isa::Neon);
    }
    if d == Isa::Avx512Vnni {
        v.push(Isa::Avx2);
    }
    v
}

/// SIMD outputs `got` (token-major, `rows` per token) against the scalar `want`, within 1e-5
/// of each output's magnitude Σ|wᵢ·xᵢ| (`dense`: the decoded rows; `x`: the tokens).
fn assert_near_scalar(
    label: &str,
    got: &[f32],
    want: &[f32],
    dense: &[f32],
    x: &[f32],
    rows: usize,
) {
    let k = dense.len() / rows;
    for (i, (g, s)) in got.iter().zip(want).enumerate() {
        let (t, r) = (i / rows, i % rows);
        let mag: f32 = dense[r * k..(r + 1) * k]
            .iter()
            .zip(&x[t * k..(t + 1) * k])
            .map(|(a, b)| (a * b).abs())
            .sum();
        assert!(
            (g - s).abs() <= 1e-5 * mag.max(1e-3),
            "{label} token {t} row {r}: {g} vs scalar {s}"
        );
    }
}

#[test]
fn scalar_reference_matches_dequantized_f32_within_activation_error() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for wt in TYPES {
        for blocks in [1, 3, 18] {
            let k = blocks * wt.block_len();
            let rows = 5;
            let w = random_rows(&mut rng, wt, rows, blocks);
            // candle's decoding, which `quant`'s tests hold ours equal to.
            let dense = dequantize(wt, &w, rows, k);
            let x: Vec<f32> = (0..k).map(|_| rng.f32() * 3.0).collect();
            let mut acts = Acts::default();
            acts.quantize(wt, &x, k);
            let rb = blocks * wt.block_bytes();
            for r in 0..rows {
                let row = &dense[r * k..(r + 1) * k];
                let exact: f64 = row.iter().zip(&x).map(|(a, b)| f64::from(a * b)).sum();
                let mut bound = 0f64;
                for (wb, xb) in row.chunks(32).zip(x.chunks(32)) {
                    // Q8_K quantizes per 256; its step is at most that of the 256-block.
                    let amax = if wt.k_quant() {
                        let i = (xb.as_ptr() as usize - x.as_ptr() as usize) / 4 / 256;
                        x[i * 256..(i + 1) * 256]
                            .iter()
                            .fold(0f32, |m, v| m.max(v.abs()))
                    } else {
                        xb.iter().fold(0f32, |m, v| m.max(v.abs()))
                    };
                    let wsum: f32 = wb.iter().map(|v| v.abs()).sum();
                    // Half a quantization step per activation, plus the f16 rounding of the
                    // scale (2⁻¹¹ relative) on the whole product.
                    bound += f64::from(wsum * amax / 254.0);
                    bound += f64::from(wsum * amax) * 1e-3;
                }
                let got = scalar::dot(wt, &w[r * rb..(r + 1) * rb], acts.token(wt, 0));
                assert!(
                    (f64::from(got) - exact).abs() <= bound + 1e-4,
                    "{wt:?} k={k} row {r}: {got} vs exact {exact} (bound {bound})"
                );
            }
        }
    }
}

#[test]
fn simd_kernels_match_the_scalar_reference_on_odd_sizes() {
    let isas = simd_isas();
    if isas.is_empty() {
        eprintln!("no SIMD kernels on this CPU: only the scalar path exists here");
    }
    let mut rng = Rng(0x0dd5_12e5_0dd5_12e5);
    for wt in TYPES {
        for blocks in [1, 2, 3, 7, 18] {
            for rows in [1, 3, 4, 5, 9, 13] {
                let k = blocks * wt.block_len();
                let w = random_rows(&mut rng, wt, rows, blocks);
                let dense = dequantize(wt, &w, rows, k);
                // Three tokens: a pair and a single one through the multi-token kernels.
                let tokens = 3;
                let x: Vec<f32> = (0..k * tokens).map(|_| rng.f32()).collect();
                let mut acts = Acts::default();
                acts.quantize(wt, &x, k);
                let a: Vec<ActRef<'_>> = (0..tokens).map(|t| acts.token(wt, t)).collect();
                let mut want = vec![0f32; rows * tokens];
                dot_rows(Isa::Scalar, wt, &w, &a, &mut want);
                for &isa in &isas {
                    let mut got = vec![f32::NAN; rows * tokens];
                    dot_rows(isa, wt, &w, &a, &mut got);
                    let label = format!("{isa:?} {wt:?} k={k} rows={rows}");
                    assert_near_scalar(&label, &got, &want, &dense, &x, rows);
                }
            }
        }
    }
}

#[test]
fn threaded_matmul_equals_row_by_row_dots() {
    let mut rng = Rng(42);
    for wt in TYPES {
        for (rows, tokens) in [(1, 1), (7, 3), (37, 2), (130, 5)] {
            let blocks = 3;
            let k = blocks * wt.block_len();
            let w = random_rows(&mut rng, wt, rows, blocks);
            let x: Vec<f32> = (0..k * tokens).map(|_| rng.f32()).collect();
            let m = QMatrix {
                wt,
                rows,
                cols: k,
                data: &w,
                packed: false,
            };
            let mut out = vec![f32::NAN; rows * tokens];
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .expect("a pool of 3");
            pool.install(|| matmul(m, &x, &mut out))
                .expect("shapes fit");
            let rb = m.row_bytes();
            for t in 0..tokens {
                let mut acts = Acts::default();
                acts.quantize(wt, &x[t * k..(t + 1) * k], k);
                for r in 0..rows {
                    let mut one = [0f32];
                    dot_rows(
                        isa(),
                        wt,
                        &w[r * rb..(r + 1) * rb],
                        &[acts.token(wt, 0)],
                        &mut one,
                    );
                    assert_eq!(out[t * rows + r], one[0], "{wt:?} token {t} row {r}");
                }
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let w = vec![0u8; 18 * 4];
    let m = QMatrix {
        wt: WType::Q4_0,
        rows: 4,
        cols: 32,
        data: &w,
        packed: false,
    };
    let mut out = vec![0f32; 4];
    assert!(
        matmul(m, &[0.0; 31], &mut out).is_err(),
        "ragged activations"
    );
    assert!(matmul(m, &[0.0; 64], &mut out).is_err(), "output too small");
    let short = QMatrix { rows: 5, ..m };
    assert!(
        matmul(short, &[0.0; 32], &mut [0.0; 5]).is_err(),
        "weights too short"
    );
    let ragged = QMatrix { cols: 48, ..m };
    assert!(
        matmul(ragged, &[0.0; 48], &mut out).is_err(),
        "half a block"
    );
    assert!(matmul(m, &[1.0; 32], &mut out).is_ok());
}

#[test]
fn f32_dot_and_axpy_match_plain_loops_on_odd_lengths() {
    let mut rng = Rng(9);
    for n in [0, 1, 7, 8, 9, 15, 16, 17, 64, 100, 256] {
        let a: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
        let b: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!(
            (dot_f32(&a, &b) - want).abs() <= 1e-5 * n.max(1) as f32,
            "dot, n={n}"
        );
        let mut y = b.clone();
        axpy(0.5, &a, &mut y);
        for i in 0..n {
            assert!(
                (y[i] - (b[i] + 0.5 * a[i])).abs() <= 1e-6,
                "axpy, n={n}, i={i}"
            );
        }
    }
}

#[test]
fn grouped_matmul_equals_separate_ones_and_refuses_mixed_groups() {
    let mut rng = Rng(77);
    let k = 64;
    let (w1, w2, w3) = (
        random_rows(&mut rng, WType::Q4_1, 9, 2),
        random_rows(&mut rng, WType::Q5_0, 20, 2),
        random_rows(&mut rng, WType::Q8_0, 3, 2),
    );
    let ms = [
        QMatrix {
            wt: WType::Q4_1,
            rows: 9,
            cols: k,
            data: &w1,
            packed: false,
        },
        QMatrix {
            wt: WType::Q5_0,
            rows: 20,
            cols: k,
            data: &w2,
            packed: false,
        },
        QMatrix {
            wt: WType::Q8_0,
            rows: 3,
            cols: k,
            data: &w3,
            packed: false,
        },
    ];
    let x: Vec<f32> = (0..k * 5).map(|_| rng.f32()).collect();
    let (mut a, mut b, mut c) = (vec![0f32; 45], vec![0f32; 100], vec![0f32; 15]);
    matmul_group(&ms, &x, &mut [&mut a, &mut b, &mut c]).expect("one group");
    for (m, got) in ms.iter().zip([&a, &b, &c]) {
        let mut want = vec![0f32; m.rows * 5];
        matmul(*m, &x, &mut want).expect("alone");
        assert_eq!(got, &want, "{:?}", m.wt);
    }
    let wk = random_rows(&mut rng, WType::Q4K, 2, 1);
    let mixed = [
        QMatrix {
            wt: WType::Q4K,
            rows: 2,
            cols: 256,
            data: &wk,
            packed: false,
        },
        QMatrix {
            wt: WType::Q8_0,
            rows: 1,
            cols: 256,
            data: &w3,
            packed: false,
        },
    ];
    let x = vec![0f32; 256];
    let (mut o1, mut o2) = (vec![0f32; 2], vec![0f32; 1]);
    assert!(matmul_group(&mixed, &x, &mut [&mut o1, &mut o2]).is_err());
}

const PACKED: [WType; 4] = [WType::Q4_0, WType::Q4_1, WType::Q5_0, WType::Q8_0];

#[test]
fn packing_round_trips_and_packed_kernels_match_the_scalar_reference() {
    let mut rng = Rng(0x9ac_4ed0_0dd5);
    for wt in PACKED {
        for blocks in [1, 2, 3, 18] {
            for rows in [8, 16, 24] {
                let k = blocks * wt.block_len();
                let w = random_rows(&mut rng, wt, rows, blocks);
                let packed = repack(wt, rows, k, &w).expect("whole groups of 8 pack");
                assert_eq!(packed.len(), w.len());
                assert_ne!(packed, w, "{wt:?}: the layout changed");
                let rb = blocks * wt.block_bytes();
                let mut back = vec![0u8; w.len()];
                for (src, dst) in packed
                    .chunks(PACK_ROWS * rb)
                    .zip(back.chunks_mut(PACK_ROWS * rb))
                {
                    unpack_group(wt, rb, src, dst);
                }
                assert_eq!(back, w, "{wt:?} rows={rows} blocks={blocks}: unpacked");
                let dense = dequantize(wt, &w, rows, k);
                // Six tokens: a pass of four and a pass of two.
                for tokens in [1, 2, 3, 6] {
                    let x: Vec<f32> = (0..k * tokens).map(|_| rng.f32() * 2.0).collect();
                    let mut acts = Acts::default();
                    acts.quantize(wt, &x, k);
                    let a: Vec<ActRef<'_>> = (0..tokens).map(|t| acts.token(wt, t)).collect();
                    let mut want = vec![0f32; rows * tokens];
                    dot_rows(Isa::Scalar, wt, &w, &a, &mut want);
                    let mut scalar = vec![f32::NAN; rows * tokens];
                    dot_rows_packed(Isa::Scalar, wt, &packed, &a, &mut scalar);
                    assert_eq!(scalar, want, "{wt:?}: the packed reference");
                    for isa in simd_isas() {
                        let mut got = vec![f32::NAN; rows * tokens];
                        dot_rows_packed(isa, wt, &packed, &a, &mut got);
                        let label = format!("packed {isa:?} {wt:?} k={k} rows={rows}");
                        assert_near_scalar(&label, &got, &want, &dense, &x, rows);
                    }
                }
            }
        }
    }
}

#[test]
fn packed_matmul_on_threads_equals_the_plain_one_and_odd_shapes_do_not_pack() {
    let mut rng = Rng(0x5eed);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .expect("a pool of 3");
    for wt in PACKED {
        for (rows, tokens) in [(8, 1), (136, 7), (520, 2)] {
            let blocks = 5;
            let k = blocks * wt.block_len();
            let w = random_rows(&mut rng, wt, rows, blocks);
            let packed = repack(wt, rows, k, &w).expect("packs");
            let x: Vec<f32> = (0..k * tokens).map(|_| rng.f32()).collect();
            let plain = QMatrix {
                wt,
                rows,
                cols: k,
                data: &w,
                packed: false,
            };
            let mut want = vec![f32::NAN; rows * tokens];
            let mut got = vec![f32::NAN; rows * tokens];
            pool.install(|| {
                matmul(plain, &x, &mut want).expect("plain");
                let m = QMatrix {
                    data: &packed,
                    packed: true,
                    ..plain
                };
                matmul(m, &x, &mut got).expect("packed");
            });
            for (i, (g, p)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - p).abs() <= 1e-4 * (1.0 + p.abs()),
                    "{wt:?} {rows}×{k}, {tokens} tokens, output {i}: {g} vs {p}"
                );
            }
        }
    }
    let w = random_rows(&mut rng, WType::Q4_0, 9, 1);
    assert!(repack(WType::Q4_0, 9, 32, &w).is_none(), "9 rows");
    assert!(
        repack(WType::Q4_0, 8, 32, &w[..8 * 18 - 1]).is_none(),
        "short"
    );
    let q6 = random_rows(&mut rng, WType::Q6K, 8, 1);
    assert!(
        repack(WType::Q6K, 8, 256, &q6).is_none(),
        "Q6_K has no packed kernel"
    );
    assert!(!packs(WType::Q6K, 8) && !packs(WType::Q8_0, 12));
    let bad = QMatrix {
        wt: WType::Q4_0,
        rows: 9,
        cols: 32,
        data: &w,
        packed: true,
    };
    assert!(
        matmul(bad, &[0.0; 32], &mut [0.0; 9]).is_err(),
        "a ragged packed matrix"
    );
}

#[test]
fn matmuls_of_concurrent_passes_nest_on_one_pool_and_give_the_same_results() {
    // Forward passes run on the pool's workers; a worker waiting in one matmul's parallel
    // section may run another pass's matmul on the same thread. That once found the
    // activation scratch still borrowed ("RefCell already borrowed", seen with two golden
    // tests in parallel).
    let mut rng = Rng(0x0e57);
    let (rows, k) = (2048, 32 * 32);
    let w = random_rows(&mut rng, WType::Q8_0, rows, 32);
    let m = QMatrix {
        wt: WType::Q8_0,
        rows,
        cols: k,
        data: &w,
        packed: false,
    };
    let x: Vec<f32> = (0..k * 3).map(|_| rng.f32()).collect();
    let mut want = vec![0f32; rows * 3];
    matmul(m, &x, &mut want).expect("shapes fit");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool of 2");
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                pool.install(|| {
                    for _ in 0..50 {
                        let mut out = vec![0f32; rows * 3];
                        matmul(m, &x, &mut out).expect("shapes fit");
                        assert_eq!(out, want);
                    }
                })
            });
        }
    });
}
