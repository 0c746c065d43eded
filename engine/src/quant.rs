//! GGML block dequantization and quantization, without candle.
//!
//! Block layouts (all little endian; `d`, `m`, `dmin` are f16 unless noted; 32 or 256 values a block):
//! - `f32` / `f16` / `bf16`: one value, 4 / 2 / 2 bytes.
//! - `q4_0` (18 B, 32): `d`, 16 bytes of nibbles; value j is the low nibble of byte j, value j+16
//!   its high nibble; x = (q - 8)·d.
//! - `q4_1` (20 B, 32): `d`, `m`, nibbles as q4_0; x = q·d + m.
//! - `q5_0` (22 B, 32): `d`, `qh` (u32: bit j is the 5th bit of value j), nibbles; x = (q - 16)·d.
//! - `q5_1` (24 B, 32): `d`, `m`, `qh`, nibbles; x = q·d + m.
//! - `q8_0` (34 B, 32): `d`, 32 × i8; x = q·d.
//! - `q8_1` (36 B, 32): `d`, `s` (= d·Σq, unused when decoding), 32 × i8; x = q·d.
//! - `q2_k` (84 B, 256): 16 scale bytes (low nibble scale, high nibble min, one per 16 values),
//!   64 bytes of 2-bit values, `d`, `dmin`; x = d·sc·q - dmin·m.
//! - `q3_k` (110 B, 256): `hmask` (32 B, the 3rd bit), 64 bytes of 2-bit values, 12 bytes of sixteen
//!   6-bit scales (offset 32), `d`; x = d·(sc - 32)·(q - 4 if the hmask bit is clear).
//! - `q4_k` (144 B, 256): `d`, `dmin`, 12 bytes of eight 6-bit scales and mins (one per 32 values,
//!   packed as ggml's `get_scale_min_k4`), 128 bytes of nibbles; x = d·sc·q - dmin·m.
//! - `q5_k` (176 B, 256): as q4_k plus `qh` (32 B of 5th bits) before the nibbles.
//! - `q6_k` (210 B, 256): `ql` (128 B low nibbles), `qh` (64 B, 2 high bits each), 16 × i8 scales
//!   (one per 16 values), `d`; x = d·sc·(q - 32).
//! - `q8_k` (292 B, 256): `d` as **f32**, 256 × i8, 16 × i16 block sums (unused when decoding).
//!
//! Decoding follows ggml's `dequantize_row_*` (same arithmetic order, so results are bit-equal to
//! ggml's and candle's). Encoding follows ggml's reference quantizers: `quantize_row_q4_0_ref` …
//! `quantize_row_q8_0_ref` (deterministic formulas: the bytes equal ggml's and candle's), and for the
//! K-quants `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref` (`make_qkx2_quants` on each 32-value
//! sub-block with weights `av_x + |x|`) and `quantize_row_q6_K_ref` (`make_qx_quants` with weights
//! `x²` on each 16-value sub-block), with rounding to nearest, ties to even, as ggml's `nearest_int`.
//! The K-quant searches add their sums in 8 interleaved lanes so they vectorize; ggml adds in order,
//! so a K-quant block can (rarely) differ from ggml's in a choice the last float bits decide.
//! candle 0.11 quantizes q4_k/q5_k with the older `make_qkx1_quants` and q6_k with an older
//! `make_qx_quants`, so its K-quant bytes differ from these (and its error is slightly higher).
//! q2_k, q3_k, q8_1 and q8_k are read but not written.

use half::{bf16, f16};

/// A GGML tensor element type.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

impl QType {
    /// The type for a ggml type id as stored in GGUF tensor infos; `None` for types not handled here.
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// ggml's id of this type.
    pub fn ggml_id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Q8K => 15,
            Self::BF16 => 30,
        }
    }

    /// Lower-case name, as the CLI takes it ("q4_k"; ggml itself spells the K-quants "q4_K").
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q8_1 => "q8_1",
            Self::Q2K => "q2_k",
            Self::Q3K => "q3_k",
            Self::Q4K => "q4_k",
            Self::Q5K => "q5_k",
            Self::Q6K => "q6_k",
            Self::Q8K => "q8_k",
        }
    }

    /// Values per block.
    pub const fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => QK,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K | Self::Q8K => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Q8K => 292,
        }
    }

    /// Whether [`quantize`] can write this type.
    pub fn can_quantize(self) -> bool {
        matches!(
            self,
            Self::F32
                | Self::F16
                | Self::BF16
                | Self::Q4_0
                | Self::Q4_1
                | Self::Q5_0
                | Self::Q5_1
                | Self::Q8_0
                | Self::Q4K
                | Self::Q5K
                | Self::Q6K
        )
    }
}

const QK: usize = 32;
const QK_K: usize = 256;
/// ggml's GROUP_MAX_EPS: a sub-block whose largest magnitude is below this is all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Decodes `out.len() / t.block_len()` whole blocks from the start of `bytes` into `out`.
/// Panics (assert) if out.len() is not a multiple of block_len or bytes is too short: callers check
/// shapes first.
pub fn dequantize(t: QType, bytes: &[u8], out: &mut [f32]) {
    let n_blocks = out.len() / t.block_len();
    assert!(
        out.len().is_multiple_of(t.block_len()),
        "dequantize {}: {} values is not a whole number of {}-value blocks",
        t.name(),
        out.len(),
        t.block_len()
    );
    assert!(
        bytes.len() >= n_blocks * t.block_bytes(),
        "dequantize {}: {} values need {} bytes, got {}",
        t.name(),
        out.len(),
        n_blocks * t.block_bytes(),
        bytes.len()
    );
    match t {
        QType::F32 => each_block::<4, 1>(bytes, out, |b, y| y[0] = f32::from_le_bytes(*b)),
        QType::F16 => each_block::<2, 1>(bytes, out, |b, y| y[0] = f16::from_le_bytes(*b).to_f32()),
        QType::BF16 => {
            each_block::<2, 1>(bytes, out, |b, y| y[0] = bf16::from_le_bytes(*b).to_f32())
        }
        QType::Q4_0 => each_block(bytes, out, dequant_q4_0),
        QType::Q4_1 => each_block(bytes, out, dequant_q4_1),
        QType::Q5_0 => each_block(bytes, out, dequant_q5_0),
        QType::Q5_1 => each_block(bytes, out, dequant_q5_1),
        QType::Q8_0 => each_block(bytes, out, dequant_q8_0),
        QType::Q8_1 => each_block(bytes, out, dequant_q8_1),
        QType::Q2K => each_block(bytes, out, dequant_q2k),
        QType::Q3K => each_block(bytes, out, dequant_q3k),
        QType::Q4K => each_block(bytes, out, dequant_q4k),
        QType::Q5K => each_block(bytes, out, dequant_q5k),
        QType::Q6K => each_block(bytes, out, dequant_q6k),
        QType::Q8K => each_block(bytes, out, dequant_q8k),
    }
}

/// Encodes `x` (a multiple of t.block_len() values) as blocks of `t`, appended to `out`.
/// Returns Err(String) with a clear message for a type it cannot write or a length that is not
/// whole blocks.
pub fn quantize(t: QType, x: &[f32], out: &mut Vec<u8>) -> Result<(), String> {
    if !t.can_quantize() {
        return Err(unwritable(t));
    }
    if !x.len().is_multiple_of(t.block_len()) {
        return Err(format!(
            "cannot quantize {} values to {}: not a whole number of {}-value blocks",
            x.len(),
            t.name(),
            t.block_len()
        ));
    }
    let n_blocks = x.len() / t.block_len();
    let start = out.len();
    out.resize(start + n_blocks * t.block_bytes(), 0);
    let dst = &mut out[start..];
    match t {
        QType::F32 => encode_each::<4, 1>(x, dst, |x, b| *b = x[0].to_le_bytes()),
        QType::F16 => encode_each::<2, 1>(x, dst, |x, b| *b = f16::from_f32(x[0]).to_le_bytes()),
        QType::BF16 => encode_each::<2, 1>(x, dst, |x, b| *b = bf16::from_f32(x[0]).to_le_bytes()),
        QType::Q4_0 => encode_each(x, dst, quant_q4_0),
        QType::Q4_1 => encode_each(x, dst, quant_q4_1),
        QType::Q5_0 => encode_each(x, dst, quant_q5_0),
        QType::Q5_1 => encode_each(x, dst, quant_q5_1),
        QType::Q8_0 => encode_each(x, dst, quant_q8_0),
        QType::Q4K => encode_each(x, dst, quant_q4k),
        QType::Q5K => encode_each(x, dst, quant_q5k),
        QType::Q6K => encode_each(x, dst, quant_q6k),
        QType::Q8_1 | QType::Q2K | QType::Q3K | QType::Q8K => {
            out.truncate(start);
            return Err(unwritable(t));
        }
    }
    Ok(())
}

fn unwritable(t: QType) -> String {
    format!(
        "cannot quantize to {}: only f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k and \
         q6_k are written",
        t.name()
    )
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Runs `f` on each (block bytes, block values) pair; the caller has checked the lengths.
#[inline]
fn each_block<const B: usize, const N: usize>(
    bytes: &[u8],
    out: &mut [f32],
    f: impl Fn(&[u8; B], &mut [f32; N]),
) {
    let (blocks, _) = bytes.as_chunks::<B>();
    let (ys, _) = out.as_chunks_mut::<N>();
    for (b, y) in blocks.iter().zip(ys) {
        f(b, y);
    }
}

/// Runs `f` on each (block values, zeroed block bytes) pair; the caller has checked the lengths.
#[inline]
fn encode_each<const B: usize, const N: usize>(
    x: &[f32],
    dst: &mut [u8],
    f: impl Fn(&[f32; N], &mut [u8; B]),
) {
    let (xs, _) = x.as_chunks::<N>();
    let (blocks, _) = dst.as_chunks_mut::<B>();
    for (x, b) in xs.iter().zip(blocks) {
        f(x, b);
    }
}

/// The f16 at byte `at` of a block, as f32.
#[inline]
pub(crate) fn get_f16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

#[inline]
fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The f32 value an f16 field will hold.
#[inline]
fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// ggml's `nearest_int`: round to nearest, ties to even, by adding 1.5·2²³ so that the rounded
/// integer lands in the low mantissa bits (ggml's trick: branch-free, vectorizes, no libm call on
/// baseline x86_64). Saturates at ±4194303 (ggml asserts that range); NaN gives 0.
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let v = v.clamp(-4_194_303.0, 4_194_303.0);
    ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Largest magnitude and the signed value that has it (the first, on ties), as ggml scans.
#[inline]
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

#[inline]
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::INFINITY;
    let mut max = f32::NEG_INFINITY;
    for &v in x {
        min = v.min(min);
        max = v.max(max);
    }
    (min, max)
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` of a q4_k/q5_k block.
#[inline]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The inverse of [`scale_min_k4`] for all eight sub-blocks.
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8], s: &mut [u8]) {
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding (ggml's dequantize_row_*)

fn dequant_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = get_f16(b, 0);
    for (j, &q) in b[2..].iter().enumerate() {
        y[j] = ((q & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn dequant_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = get_f16(b, 0);
    let m = get_f16(b, 2);
    for (j, &q) in b[4..].iter().enumerate() {
        y[j] = (q & 0xF) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

fn dequant_q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = get_f16(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..].iter().enumerate() {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        y[j] = (((q & 0xF) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

fn dequant_q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = get_f16(b, 0);
    let m = get_f16(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, &q) in b[8..].iter().enumerate() {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        y[j] = ((q & 0xF) | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) | h1) as f32 * d + m;
    }
}

fn dequant_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = get_f16(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..]) {
        *y = q as i8 as f32 * d;
    }
}

fn dequant_q8_1(b: &[u8; 36], y: &mut [f32; 32]) {
    let d = get_f16(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[4..]) {
        *y = q as i8 as f32 * d;
    }
}

fn dequant_q2k(b: &[u8; 84], y: &mut [f32; 256]) {
    let scales = &b[0..16];
    let d = get_f16(b, 80);
    let dmin = get_f16(b, 82);
    // Two halves of 128 values, each from 32 bytes of 2-bit values read at four shifts; every
    // 16 values have their own scale byte.
    for half in 0..2 {
        let qs = &b[16 + 32 * half..16 + 32 * half + 32];
        for shift_i in 0..4 {
            let shift = 2 * shift_i;
            for part in 0..2 {
                let sc = scales[8 * half + 2 * shift_i + part];
                let dl = d * (sc & 0xF) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let base = 128 * half + 32 * shift_i + 16 * part;
                for (l, &q) in qs[16 * part..16 * part + 16].iter().enumerate() {
                    y[base + l] = dl * ((q >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// The sixteen 6-bit scales of a q3_k block, offset by -32.
fn q3k_scales(s: &[u8]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (low | (high << 4)) as i32 - 32;
    }
    out
}

fn dequant_q3k(b: &[u8; 110], y: &mut [f32; 256]) {
    let hmask = &b[0..32];
    let scales = q3k_scales(&b[96..108]);
    let d = get_f16(b, 108);
    for half in 0..2 {
        let qs = &b[32 + 32 * half..32 + 32 * half + 32];
        for shift_i in 0..4 {
            let shift = 2 * shift_i;
            let m = 1u8 << (4 * half + shift_i);
            for part in 0..2 {
                let dl = d * scales[8 * half + 2 * shift_i + part] as f32;
                let base = 128 * half + 32 * shift_i + 16 * part;
                for l in 16 * part..16 * part + 16 {
                    let q = ((qs[l] >> shift) & 3) as i32 - if hmask[l] & m == 0 { 4 } else { 0 };
                    y[base + l - 16 * part] = dl * q as f32;
                }
            }
        }
    }
}

fn dequant_q4k(b: &[u8; 144], y: &mut [f32; 256]) {
    let d = get_f16(b, 0);
    let dmin = get_f16(b, 2);
    let scales = &b[4..16];
    for chunk in 0..4 {
        let qs = &b[16 + 32 * chunk..16 + 32 * chunk + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let y = &mut y[64 * chunk..64 * chunk + 64];
        for (l, &q) in qs.iter().enumerate() {
            y[l] = d1 * (q & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

fn dequant_q5k(b: &[u8; 176], y: &mut [f32; 256]) {
    let d = get_f16(b, 0);
    let dmin = get_f16(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    for chunk in 0..4 {
        let ql = &b[48 + 32 * chunk..48 + 32 * chunk + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let u1 = 1u8 << (2 * chunk);
        let u2 = 2u8 << (2 * chunk);
        let y = &mut y[64 * chunk..64 * chunk + 64];
        for (l, (&q, &h)) in ql.iter().zip(qh).enumerate() {
            let hi1 = if h & u1 != 0 { 16 } else { 0 };
            let hi2 = if h & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q & 0xF) + hi1) as f32 - m1;
            y[l + 32] = d2 * ((q >> 4) + hi2) as f32 - m2;
        }
    }
}

fn dequant_q6k(b: &[u8; 210], y: &mut [f32; 256]) {
    let d = get_f16(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

fn dequant_q8k(b: &[u8; 292], y: &mut [f32; 256]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (y, &q) in y.iter_mut().zip(&b[4..260]) {
        *y = d * q as i8 as f32;
    }
}

// ---------------------------------------------------------------------------------------------
// Legacy encoders (ggml's quantize_row_q*_ref; deterministic)

fn quant_q4_0(x: &[f32; 32], b: &mut [u8; 18]) {
    let (_, max) = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5) as i32).clamp(0, 15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
        b[2 + j] = q0 | (q1 << 4);
    }
}

fn quant_q4_1(x: &[f32; 32], b: &mut [u8; 20]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        b[4 + j] = q0 | (q1 << 4);
    }
}

fn quant_q5_0(x: &[f32; 32], b: &mut [u8; 22]) {
    let (_, max) = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = ((x[j] * id + 16.5) as i32).clamp(0, 31) as u32;
        let q1 = ((x[j + 16] * id + 16.5) as i32).clamp(0, 31) as u32;
        b[6 + j] = ((q0 & 0xF) | ((q1 & 0xF) << 4)) as u8;
        qh |= ((q0 >> 4) & 1) << j;
        qh |= ((q1 >> 4) & 1) << (j + 16);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

fn quant_q5_1(x: &[f32; 32], b: &mut [u8; 24]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    let mut qh = 0u32;
    for j in 0..16 {
        // ggml does not clamp here: (max - min)·id + 0.5 stays below 32.
        let q0 = ((x[j] - min) * id + 0.5) as u8 as u32;
        let q1 = ((x[j + 16] - min) * id + 0.5) as u8 as u32;
        b[8 + j] = ((q0 & 0xF) | ((q1 & 0xF) << 4)) as u8;
        qh |= ((q0 >> 4) & 1) << j;
        qh |= ((q1 >> 4) & 1) << (j + 16);
    }
    b[4..8].copy_from_slice(&qh.to_le_bytes());
}

fn quant_q8_0(x: &[f32; 32], b: &mut [u8; 34]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    for (q, &v) in b[2..].iter_mut().zip(x) {
        // roundf: half away from zero, as ggml.
        *q = ((v * id).round() as i8) as u8;
    }
}

// ---------------------------------------------------------------------------------------------
// K-quant encoders (ggml's quantize_row_q{4,5,6}_K_ref)

/// Interleaved partial sums: the K-quant searches add their 16 or 32 terms in this many lanes so
/// that the loops vectorize (ggml adds them in order; the two differ only in the last bits, as
/// ggml's own builds do with and without FMA contraction).
const LANES: usize = 8;

/// The levels `nearest_int(iscale·(x - min))` clamped to 0..=nmax, as floats. Clamping before
/// rounding gives the same integers (the bounds are integers) and keeps it all in float lanes;
/// `(v + 1.5·2²³) - 1.5·2²³` rounds to nearest, ties to even, as `nearest_int`.
#[inline(always)]
fn levels_with_min(x: &[f32; 32], iscale: f32, min: f32, nmax: i32, out: &mut [f32; 32]) {
    const MAGIC: f32 = 12_582_912.0;
    let top = nmax as f32;
    for (q, &v) in out.iter_mut().zip(x) {
        *q = ((iscale * (v - min)).clamp(0.0, top) + MAGIC) - MAGIC;
    }
}

/// Σ w·(scale·l + min - x)² over the 32 values.
#[inline(always)]
fn weighted_error(x: &[f32; 32], w: &[f32; 32], l: &[f32; 32], scale: f32, min: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (xs, _) = x.as_chunks::<LANES>();
    let (ws, _) = w.as_chunks::<LANES>();
    let (ls, _) = l.as_chunks::<LANES>();
    for ((x, w), l) in xs.iter().zip(ws).zip(ls) {
        for k in 0..LANES {
            let diff = scale * l[k] + min - x[k];
            acc[k] += w[k] * diff * diff;
        }
    }
    acc.iter().sum()
}

/// ggml's `make_qkx2_quants` for one 32-value sub-block: the scale and the (non-negative) min that
/// minimise the weighted squared error of `x ≈ scale·l - min` with `l` in 0..=nmax, searching
/// `nstep + 1` candidate scales `(nmax + rmin + rdelta·is) / (max - min)`. Fills `l`.
fn make_qkx2_quants(
    x: &[f32; 32],
    w: &[f32; 32],
    nmax: i32,
    (rmin, rdelta, nstep): (f32, f32, i32),
    l: &mut [u8],
) -> (f32, f32) {
    let mut min = x.iter().fold(x[0], |m, &v| if v < m { v } else { m });
    let max = x.iter().fold(x[0], |m, &v| if v > m { v } else { m });
    let mut sum_w_lanes = [0f32; LANES];
    let mut sum_x_lanes = [0f32; LANES];
    let (xs, _) = x.as_chunks::<LANES>();
    let (ws, _) = w.as_chunks::<LANES>();
    for (x, w) in xs.iter().zip(ws) {
        for k in 0..LANES {
            sum_w_lanes[k] += w[k];
            sum_x_lanes[k] += w[k] * x[k];
        }
    }
    let sum_w: f32 = sum_w_lanes.iter().sum();
    let sum_x: f32 = sum_x_lanes.iter().sum();
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..32].fill(0);
        return (0.0, -min);
    }
    let mut best = [0f32; 32];
    let iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    levels_with_min(x, iscale, min, nmax, &mut best);
    let mut best_error = weighted_error(x, w, &best, scale, min);
    let mut laux = [0f32; 32];
    for is in 0..=nstep {
        // As in ggml, `min` is the best one so far: later candidates start from it.
        let iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        levels_with_min(x, iscale, min, nmax, &mut laux);
        let mut sum_l = [0f32; LANES];
        let mut sum_l2 = [0f32; LANES];
        let mut sum_xl = [0f32; LANES];
        let (ls, _) = laux.as_chunks::<LANES>();
        for ((x, w), l) in xs.iter().zip(ws).zip(ls) {
            for k in 0..LANES {
                let wl = w[k] * l[k];
                sum_l[k] += wl;
                sum_l2[k] += wl * l[k];
                sum_xl[k] += wl * x[k];
            }
        }
        let sum_l: f32 = sum_l.iter().sum();
        let sum_l2: f32 = sum_l2.iter().sum();
        let sum_xl: f32 = sum_xl.iter().sum();
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur_error = weighted_error(x, w, &laux, this_scale, this_min);
            if cur_error < best_error {
                best = laux;
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    for (li, &q) in l.iter_mut().zip(&best) {
        *li = q as u8;
    }
    (scale, -min)
}

/// The shared part of q4_k and q5_k: per-sub-block scales and mins by `make_qkx2_quants`, packed
/// as 6-bit values under the block's `d` and `dmin` (written to bytes 0..16), and the final
/// levels in `l` (0..=nmax) computed against the stored scales.
fn quant_k_scale_min(
    x: &[f32; 256],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    head: &mut [u8],
    l: &mut [u8; 256],
) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [0f32; 32];
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    let (subs, _) = x.as_chunks::<32>();
    for (j, sub) in subs.iter().enumerate() {
        let sum_x2: f32 = sub.iter().map(|v| v * v).sum();
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(sub) {
            *w = av_x + v.abs();
        }
        let (scale, min) = make_qkx2_quants(
            sub,
            &weights,
            nmax,
            (rmin, 0.1, nstep),
            &mut l[32 * j..32 * j + 32],
        );
        scales[j] = scale;
        mins[j] = min;
        max_scale = max_scale.max(scale);
        max_min = max_min.max(min);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = nearest_int(inv_scale * scales[j]).clamp(0, 63) as u8;
        lm[j] = nearest_int(inv_min * mins[j]).clamp(0, 63) as u8;
    }
    put_f16(head, 0, max_scale / 63.0);
    put_f16(head, 2, max_min / 63.0);
    pack_scale_min_k4(&ls, &lm, &mut head[4..16]);
    let d_all = f16_round(max_scale / 63.0);
    let dmin_all = f16_round(max_min / 63.0);
    for (j, sub) in subs.iter().enumerate() {
        let d = d_all * ls[j] as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * lm[j] as f32;
        for (li, &v) in l[32 * j..32 * j + 32].iter_mut().zip(sub) {
            *li = nearest_int((v + dm) / d).clamp(0, nmax) as u8;
        }
    }
}

fn quant_q4k(x: &[f32; 256], b: &mut [u8; 144]) {
    let mut l = [0u8; 256];
    quant_k_scale_min(x, 15, -1.0, 20, &mut b[..16], &mut l);
    for chunk in 0..4 {
        let base = 64 * chunk;
        for i in 0..32 {
            b[16 + 32 * chunk + i] = l[base + i] | (l[base + i + 32] << 4);
        }
    }
}

fn quant_q5k(x: &[f32; 256], b: &mut [u8; 176]) {
    let mut l = [0u8; 256];
    quant_k_scale_min(x, 31, -0.5, 15, &mut b[..16], &mut l);
    let (qh, ql) = b[16..].split_at_mut(32);
    for chunk in 0..4 {
        let base = 64 * chunk;
        let m1 = 1u8 << (2 * chunk);
        let m2 = 2u8 << (2 * chunk);
        for i in 0..32 {
            let mut l1 = l[base + i];
            if l1 > 15 {
                l1 -= 16;
                qh[i] |= m1;
            }
            let mut l2 = l[base + i + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[i] |= m2;
            }
            ql[32 * chunk + i] = l1 | (l2 << 4);
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type` 1 (weights x²) and no importance matrix, for one
/// 16-value sub-block: the signed scale for `x ≈ scale·(l - nmax)`, with levels `l` in 0..2·nmax.
fn make_qx_quants(x: &[f32; 16], nmax: i32, l: &mut [u8]) -> f32 {
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l[..16].fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let mut sumlx = [0f32; LANES];
        let mut suml2 = [0f32; LANES];
        let (xs, _) = x.as_chunks::<LANES>();
        for x in xs {
            for k in 0..LANES {
                let v = x[k];
                let q = level(iscale, v) as f32;
                let w = v * v;
                sumlx[k] += w * v * q;
                suml2[k] += w * q * q;
            }
        }
        (sumlx.iter().sum::<f32>(), suml2.iter().sum::<f32>())
    };
    let mut iscale = -(nmax as f32) / max;
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let candidate = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(candidate);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            iscale = candidate;
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    for (li, &v) in l.iter_mut().zip(x) {
        *li = (nmax + level(iscale, v)) as u8;
    }
    scale
}

fn quant_q6k(x: &[f32; 256], b: &mut [u8; 210]) {
    let mut l = [0u8; 256];
    let mut scales = [0f32; 16];
    let mut max_scale = 0f32;
    let mut max_abs_scale = 0f32;
    let (subs, _) = x.as_chunks::<16>();
    for (ib, sub) in subs.iter().enumerate() {
        let scale = make_qx_quants(sub, 32, &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        // All zero: ggml writes a zeroed block.
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(b, 208, 1.0 / iscale);
    let d_all = f16_round(1.0 / iscale);
    for (ib, sub) in subs.iter().enumerate() {
        let sc = nearest_int(iscale * scales[ib]).clamp(-128, 127) as i8;
        b[192 + ib] = sc as u8;
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        for (li, &v) in l[16 * ib..16 * ib + 16].iter_mut().zip(sub) {
            *li = (nearest_int(v / d).clamp(-32, 31) + 32) as u8;
        }
    }
    let (ql, rest) = b.split_at_mut(128);
    let qh = &mut rest[..64];
    for half in 0..2 {
        let l = &l[128 * half..128 * half + 128];
        let ql = &mut ql[64 * half..64 * half + 64];
        let qh = &mut qh[32 * half..32 * half + 32];
        for i in 0..32 {
            let (a, b2, c, e) = (l[i], l[i + 32], l[i + 64], l[i + 96]);
            ql[i] = (a & 0xF) | ((c & 0xF) << 4);
            ql[i + 32] = (b2 & 0xF) | ((e & 0xF) << 4);
            qh[i] = (a >> 4) | ((b2 >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QStorage, QTensor, ggml_file};
    use candle_core::{Device, Tensor};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::borrow::Cow;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const ALL: [QType; 15] = [
        QType::F32,
        QType::F16,
        QType::BF16,
        QType::Q4_0,
        QType::Q4_1,
        QType::Q5_0,
        QType::Q5_1,
        QType::Q8_0,
        QType::Q8_1,
        QType::Q2K,
        QType::Q3K,
        QType::Q4K,
        QType::Q5K,
        QType::Q6K,
        QType::Q8K,
    ];

    fn candle_type(t: QType) -> GgmlDType {
        match t {
            QType::F32 => GgmlDType::F32,
            QType::F16 => GgmlDType::F16,
            QType::BF16 => GgmlDType::BF16,
            QType::Q4_0 => GgmlDType::Q4_0,
            QType::Q4_1 => GgmlDType::Q4_1,
            QType::Q5_0 => GgmlDType::Q5_0,
            QType::Q5_1 => GgmlDType::Q5_1,
            QType::Q8_0 => GgmlDType::Q8_0,
            QType::Q8_1 => GgmlDType::Q8_1,
            QType::Q2K => GgmlDType::Q2K,
            QType::Q3K => GgmlDType::Q3K,
            QType::Q4K => GgmlDType::Q4K,
            QType::Q5K => GgmlDType::Q5K,
            QType::Q6K => GgmlDType::Q6K,
            QType::Q8K => GgmlDType::Q8K,
        }
    }

    /// candle's decoding of `bytes` as `n` values of `t`. `qtensor_from_ggml` does not take q8_1
    /// or q8_k ("not supported yet"), so those go through `QStorage::from_data`.
    fn candle_dequant(t: QType, bytes: &[u8], n: usize) -> candle_core::Result<Vec<f32>> {
        let q = match t {
            QType::Q8_1 | QType::Q8K => {
                let storage =
                    QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, candle_type(t))?;
                QTensor::new(storage, vec![n])?
            }
            _ => ggml_file::qtensor_from_ggml(candle_type(t), bytes, vec![n], &Device::Cpu)?,
        };
        q.dequantize(&Device::Cpu)?.to_vec1::<f32>()
    }

    fn candle_quant(t: QType, x: &[f32]) -> candle_core::Result<(Vec<u8>, Vec<f32>)> {
        let q = QTensor::quantize(
            &Tensor::from_slice(x, x.len(), &Device::Cpu)?,
            candle_type(t),
        )?;
        let bytes = q.data()?.into_owned();
        let back = q.dequantize(&Device::Cpu)?.to_vec1::<f32>()?;
        Ok((bytes, back))
    }

    fn ours_dequant(t: QType, bytes: &[u8]) -> Vec<f32> {
        let n = bytes.len() / t.block_bytes() * t.block_len();
        let mut out = vec![0f32; n];
        dequantize(t, bytes, &mut out);
        out
    }

    /// A finite f16 of magnitude in [lo, hi], either sign unless `positive`.
    fn rand_f16(rng: &mut StdRng, lo: f32, hi: f32, positive: bool) -> [u8; 2] {
        let mag = rng.random_range(lo..hi);
        let v = if positive || rng.random::<bool>() {
            mag
        } else {
            -mag
        };
        f16::from_f32(v).to_le_bytes()
    }

    /// Random bytes for `n_blocks` blocks of `t`, with the float fields set to sane finite values.
    fn random_blocks(t: QType, n_blocks: usize, rng: &mut StdRng) -> Vec<u8> {
        let bb = t.block_bytes();
        let mut bytes = vec![0u8; n_blocks * bb];
        rng.fill(&mut bytes[..]);
        for blk in bytes.chunks_exact_mut(bb) {
            let mut set = |at: usize, v: [u8; 2]| blk[at..at + 2].copy_from_slice(&v);
            match t {
                QType::F32 => {
                    let v: f32 = rng.random_range(-1000.0..1000.0);
                    blk.copy_from_slice(&v.to_le_bytes());
                }
                QType::F16 => set(0, rand_f16(rng, 1e-4, 6e4, false)),
                QType::BF16 => {
                    let v: f32 = rng.random_range(-1e30..1e30);
                    set(0, bf16::from_f32(v).to_le_bytes());
                }
                QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => set(0, rand_f16(rng, 1e-3, 0.1, false)),
                QType::Q4_1 | QType::Q5_1 | QType::Q8_1 => {
                    set(0, rand_f16(rng, 1e-3, 0.1, true));
                    set(2, rand_f16(rng, 1e-3, 0.1, false));
                }
                QType::Q2K => {
                    set(80, rand_f16(rng, 1e-3, 0.1, true));
                    set(82, rand_f16(rng, 1e-3, 0.1, true));
                }
                QType::Q3K => set(108, rand_f16(rng, 1e-3, 0.1, false)),
                QType::Q4K | QType::Q5K => {
                    set(0, rand_f16(rng, 1e-3, 0.1, true));
                    set(2, rand_f16(rng, 1e-3, 0.1, true));
                }
                QType::Q6K => set(208, rand_f16(rng, 1e-3, 0.1, false)),
                QType::Q8K => {
                    let d: f32 = rng.random_range(1e-4..0.1);
                    blk[0..4].copy_from_slice(&d.to_le_bytes());
                }
            }
        }
        bytes
    }

    /// 1. Every type: random valid blocks decode bit-for-bit as candle decodes them.
    #[test]
    fn dequantize_matches_candle_exactly() -> TestResult {
        let mut rng = StdRng::seed_from_u64(7);
        for t in ALL {
            // Several blocks; the 1-value types get many.
            let n_blocks = if t.block_len() == 1 { 1000 } else { 6 };
            let bytes = random_blocks(t, n_blocks, &mut rng);
            let n = n_blocks * t.block_len();
            let theirs = candle_dequant(t, &bytes, n)?;
            let ours = ours_dequant(t, &bytes);
            assert_eq!(ours.len(), n);
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "{}: value {i} (block {}) ours {a} candle {b}",
                    t.name(),
                    i / t.block_len()
                );
            }
        }
        Ok(())
    }

    /// Test data: 4 blocks of 256 — normal-ish weights, all zeros, one large outlier among
    /// normal-ish values, and a wider spread with a positive offset.
    fn test_data(rng: &mut StdRng) -> Vec<f32> {
        let mut normal = |sigma: f32, mean: f32| -> f32 {
            // Irwin–Hall: a sum of 4 uniforms is close enough to normal for weights.
            let s: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum();
            mean + sigma * s * (3.0f32 / 4.0).sqrt()
        };
        let mut x = Vec::with_capacity(1024);
        x.extend((0..256).map(|_| normal(0.02, 0.0)));
        x.extend(std::iter::repeat_n(0.0, 256));
        x.extend((0..256).map(|_| normal(0.02, 0.0)));
        x[512 + 77] = 1.5;
        x.extend((0..256).map(|_| normal(0.5, 0.3)));
        x
    }

    fn rmse(a: &[f32], b: &[f32]) -> f32 {
        let s: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum();
        (s / a.len() as f64).sqrt() as f32
    }

    const WRITABLE: [QType; 11] = [
        QType::F32,
        QType::F16,
        QType::BF16,
        QType::Q4_0,
        QType::Q4_1,
        QType::Q5_0,
        QType::Q5_1,
        QType::Q8_0,
        QType::Q4K,
        QType::Q5K,
        QType::Q6K,
    ];

    /// 2a. Legacy and float types: our bytes equal candle's exactly, and our decoding of them
    /// equals candle's decoding of its own.
    #[test]
    fn quantize_legacy_matches_candle_bytes() -> TestResult {
        let mut rng = StdRng::seed_from_u64(11);
        let x = test_data(&mut rng);
        for t in WRITABLE.into_iter().filter(|t| t.block_len() != QK_K) {
            assert!(t.can_quantize());
            let mut ours = Vec::new();
            quantize(t, &x, &mut ours)?;
            let (theirs, their_back) = candle_quant(t, &x)?;
            assert_eq!(ours.len(), x.len() / t.block_len() * t.block_bytes());
            if let Some(i) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
                panic!(
                    "{}: byte {i} (block {}) differs: ours {:#04x} candle {:#04x}",
                    t.name(),
                    i / t.block_bytes(),
                    ours[i],
                    theirs[i]
                );
            }
            assert_eq!(ours.len(), theirs.len(), "{}", t.name());
            let back = ours_dequant(t, &ours);
            assert!(
                back.iter()
                    .zip(&their_back)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            // The zero block stays zero and the error is small relative to the data.
            assert!(back[256..512].iter().all(|&v| v == 0.0), "{}", t.name());
            let e = rmse(&x, &back);
            assert!(e < 0.05, "{}: round-trip rmse {e}", t.name());
        }
        Ok(())
    }

    /// 2b. K-quants: round-trip RMSE within 5% of candle's (ours follows newer ggml, so it is
    /// usually lower); both decodings of our bytes agree.
    #[test]
    fn quantize_kquants_rmse_vs_candle() -> TestResult {
        let mut rng = StdRng::seed_from_u64(13);
        let small = test_data(&mut rng);
        // A larger sample of plain normal-ish weights (σ 0.02) for steadier figures.
        let big: Vec<f32> = (0..64 * 256)
            .map(|_| {
                (0..4)
                    .map(|_| rng.random_range(-0.02f32..0.02))
                    .sum::<f32>()
                    * 0.866
            })
            .collect();
        for t in [QType::Q4K, QType::Q5K, QType::Q6K] {
            for (label, x) in [("4 test blocks", &small), ("64 weight blocks", &big)] {
                let mut ours = Vec::new();
                quantize(t, x, &mut ours)?;
                assert_eq!(ours.len(), x.len() / 256 * t.block_bytes());
                let back = ours_dequant(t, &ours);
                assert_eq!(
                    back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    candle_dequant(t, &ours, x.len())?
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "{}: candle decodes our bytes differently",
                    t.name()
                );
                let (_, their_back) = candle_quant(t, x)?;
                let (r_ours, r_theirs) = (rmse(x, &back), rmse(x, &their_back));
                println!(
                    "{} {label}: rmse ours {r_ours:.6e} candle {r_theirs:.6e}",
                    t.name()
                );
                assert!(
                    r_ours <= 1.05 * r_theirs,
                    "{} {label}: rmse ours {r_ours:e} > 1.05 x candle {r_theirs:e}",
                    t.name()
                );
                if x[256..512].iter().all(|&v| v == 0.0) {
                    assert!(back[256..512].iter().all(|&v| v == 0.0), "{}", t.name());
                }
            }
        }
        Ok(())
    }

    /// 3. Bad input: lengths that are not whole blocks, and types we do not write.
    #[test]
    fn quantize_rejects_bad_input() {
        let x = vec![0.5f32; 300];
        for t in [QType::Q4_0, QType::Q8_0, QType::Q4K, QType::Q6K] {
            let mut out = Vec::new();
            let err = quantize(t, &x[..t.block_len() + 1], &mut out)
                .expect_err("partial block must be rejected");
            assert!(err.contains(t.name()), "{err}");
            assert!(out.is_empty());
        }
        for t in [QType::Q2K, QType::Q3K, QType::Q8_1, QType::Q8K] {
            assert!(!t.can_quantize());
            let mut out = Vec::new();
            let err = quantize(t, &x[..256], &mut out).expect_err("unwritable type");
            assert!(err.contains(t.name()), "{err}");
            assert!(out.is_empty());
        }
    }

    /// Non-finite input gives garbage blocks but never a panic.
    #[test]
    fn quantize_non_finite_does_not_panic() -> TestResult {
        let mut x = vec![0.01f32; 512];
        x[3] = f32::NAN;
        x[300] = f32::INFINITY;
        x[301] = f32::NEG_INFINITY;
        x[400] = 3e38;
        for t in WRITABLE {
            let mut out = Vec::new();
            quantize(t, &x, &mut out)?;
            assert_eq!(out.len(), 512 / t.block_len() * t.block_bytes());
            let mut back = vec![0f32; 512];
            dequantize(t, &out, &mut back);
        }
        Ok(())
    }

    #[test]
    fn every_type_agrees_with_the_gguf_readers_table() {
        // `gguf::GgmlType` (validation of every file) and `QType` (decoding) each hold the
        // sizes; they must not drift apart.
        for t in ALL {
            let g = crate::gguf::GgmlType::from_id(t.ggml_id()).unwrap();
            assert_eq!(
                (g.name(), g.block_size(), g.block_bytes()),
                (t.name(), t.block_len() as u64, t.block_bytes() as u64)
            );
        }
    }

    #[test]
    fn type_table() {
        for t in ALL {
            assert_eq!(QType::from_ggml_id(t.ggml_id()), Some(t));
            assert_eq!(t.block_bytes(), candle_type(t).type_size(), "{}", t.name());
            assert_eq!(t.block_len(), candle_type(t).block_size(), "{}", t.name());
        }
        for id in [4, 5, 16, 29, 31] {
            assert_eq!(QType::from_ggml_id(id), None);
        }
        assert_eq!(QType::Q6K.name(), "q6_k");
    }

    #[test]
    #[should_panic(expected = "q4_k")]
    fn dequantize_short_input_panics() {
        let mut out = vec![0f32; 512];
        dequantize(QType::Q4K, &[0u8; 200], &mut out);
    }

    #[test]
    fn quantize_appends() -> TestResult {
        let mut out = vec![1, 2, 3];
        quantize(QType::Q8_0, &[0.25; 64], &mut out)?;
        assert_eq!(out.len(), 3 + 2 * 34);
        assert_eq!(&out[..3], &[1, 2, 3]);
        let mut back = vec![0f32; 64];
        dequantize(QType::Q8_0, &out[3..], &mut back);
        assert!(back.iter().all(|&v| (v - 0.25).abs() < 1e-3));
        Ok(())
    }
}
