//! Our own quantized matrix kernels: weights stay in their GGUF blocks, activations are
//! quantized to 8 bits once per matmul, and the dot products are integer, with the SIMD path
//! chosen at run time from the CPU's features (so the portable x86-64 release binary still
//! gets AVX2, and an aarch64 build gets NEON) and a scalar fallback that is also the reference
//! the SIMD paths are tested against.
//!
//! This is the only module of the workspace allowed `unsafe` (SIMD intrinsics, unaligned
//! block reads, and disjoint writes into one output from several threads); each unsafe block
//! says why it is sound.
//!
//! Weight types (GGUF block layouts, little-endian, f16 scales):
//! - `Q4_0` (18 B / 32): `d`, 16 bytes of nibbles; value = d·(q − 8). Low nibbles are values
//!   0..16, high nibbles 16..32.
//! - `Q4_1` (20 B / 32): `d`, `m`, nibbles; value = d·q + m.
//! - `Q5_0` (22 B / 32): `d`, 32 high bits `qh`, nibbles; value = d·(q | hᵢ<<4 − 16).
//! - `Q8_0` (34 B / 32): `d`, 32 × i8; value = d·q.
//! - `Q4_K` (144 B / 256): `d`, `dmin`, 12 bytes of 6-bit sub-block scales and mins, 128
//!   bytes of nibbles; value = d·scⱼ·q − dmin·mⱼ over eight sub-blocks of 32.
//! - `Q6_K` (210 B / 256): 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 × i8 scales,
//!   `d`; value = d·scₛ·(q − 32) over sixteen sub-blocks of 16.
//!
//! Activations (our own in-memory layouts, never written anywhere): [`Q8Block`] (32 values,
//! f32 scale rounded through f16 as llama.cpp does, and the scaled sum `s` that Q4_1's minimum
//! term needs) for the 32-blocks, [`Q8KBlock`] (256 values, f32 scale, sums per 16) for the
//! K-quants.
//!
//! Packed weights (x86 only, where they pay): at load, Q4_0, Q4_1, Q5_0 and Q8_0 matrices
//! whose row count is a multiple of 8 are copied once into groups of 8 interleaved rows
//! ([`pack_groups`]). Per block of the group: the 8 rows' `d` (16 bytes); Q4_1's 8 `m` (16 bytes)
//! or Q5_0's fifth bits (32 bytes); then the quants in 4-byte slices, slice j of rows 0..8
//! side by side (32 bytes: one vector whose i32 lane r is row r's bytes 4j..4j+4). For the
//! 4-bit types, vector j's low nibbles are values 4j..4j+4 of each row and its high nibbles
//! values 16+4j..; call those nibble vectors j and 4+j. Q5_0's fifth bits are stored so that
//! bit k of each byte belongs to nibble vector k (one shift and one mask put it in place).
//! One vector load then serves 8 rows, the 8 scales convert in one instruction, and the 8
//! results land in the lanes of one register (no horizontal sums); each activation slice is
//! broadcast to all lanes. Offsets (Q4_0's −8, Q5_0's −16, the +128 that makes Q8_0 unsigned
//! for `vpdpbusd`) come off the integer sums exactly, with the activation block's `sum`. Up
//! to four tokens share each unpacked weight vector.
//!
//! Threads: the matmul splits output rows in chunks over rayon's global pool, whose size the
//! agent sets from `--threads` (`RAYON_NUM_THREADS`); the activation scratch is a per-thread
//! buffer reused across calls, so steady-state decoding allocates nothing here. Forward
//! passes run on the pool's workers, so several (two models, two requests) can nest on one
//! thread: nothing here stays borrowed across a parallel section.
//! `OUTPOST_KERNELS=scalar` forces the scalar path, `plain` keeps every matrix in its GGUF
//! layout (both for comparisons).

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::fs::File;
use std::sync::OnceLock;

use rayon::prelude::*;

#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Quantized weight types these kernels multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q6K,
}

impl WType {
    /// From a GGML type id (as in GGUF tensor infos).
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        Some(match id {
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            14 => Self::Q6K,
            _ => return None,
        })
    }

    /// Values per block.
    pub const fn block_len(self) -> usize {
        match self {
            Self::Q4K | Self::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    /// Whether activations go in Q8_K blocks (else Q8 blocks of 32).
    pub const fn k_quant(self) -> bool {
        matches!(self, Self::Q4K | Self::Q6K)
    }
}

/// 32 activations quantized to i8: value ≈ d·q; `s` = d·Σq rounded through f16 (as
/// llama.cpp's Q8_1 keeps it, for Q4_1's minimum term); `sum` = Σq exactly (for the packed
/// kernels' integer offsets).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(8))]
pub struct Q8Block {
    pub d: f32,
    pub s: f32,
    pub sum: i32,
    pub qs: [i8; 32],
}

/// 256 activations quantized to i8 with the sums of each 16.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(4))]
pub struct Q8KBlock {
    pub d: f32,
    pub qs: [i8; 256],
    pub bsums: [i16; 16],
}

impl Default for Q8KBlock {
    fn default() -> Self {
        Self {
            d: 0.0,
            qs: [0; 256],
            bsums: [0; 16],
        }
    }
}

/// The instruction set the kernels use, chosen once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX2's kernels with AVX-512 VNNI's `vpdpbusd` (256-bit, so AVX512VL; and BW, F).
    Avx512Vnni,
    /// aarch64 Advanced SIMD.
    Neon,
    /// NEON with the dot-product extension (`sdot`).
    NeonDot,
}

/// The kernels' instruction set on this CPU, chosen once. `OUTPOST_KERNELS=scalar` forces
/// the fallback, `OUTPOST_KERNELS=avx2` caps x86 at AVX2 (to compare like with like).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("OUTPOST_KERNELS").unwrap_or_default();
        match (cap.as_str(), detect()) {
            ("scalar", _) => Isa::Scalar,
            ("avx2", Isa::Avx512Vnni) => Isa::Avx2,
            (_, isa) => isa,
        }
    })
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512Vnni;
            }
            return Isa::Avx2;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                return Isa::NeonDot;
            }
            return Isa::Neon;
        }
    }
    Isa::Scalar
}

/// Activations of `n` tokens quantized for one weight type.
#[derive(Default)]
pub struct Acts {
    q8: Vec<Q8Block>,
    q8k: Vec<Q8KBlock>,
    /// Blocks per token.
    per_token: usize,
}

impl Acts {
    /// Quantizes `x` (`n` rows of `k`) for multiplying with weights of type `wt`.
    pub fn quantize(&mut self, wt: WType, x: &[f32], k: usize) {
        let n = x.len() / k;
        self.per_token = k / wt.block_len();
        // Many tokens (a prompt): spread over the pool, a token per item.
        let parallel = n >= 4 && rayon::current_num_threads() > 1;
        let len = n * self.per_token;
        if wt.k_quant() {
            self.q8k.resize(len, Q8KBlock::default());
            quantize_rows(x, k, &mut self.q8k, 256, parallel, scalar::quantize_q8k);
        } else {
            self.q8.resize(len, Q8Block::default());
            quantize_rows(x, k, &mut self.q8, 32, parallel, scalar::quantize_q8);
        }
    }

    fn token(&self, wt: WType, t: usize) -> ActRef<'_> {
        let r = t * self.per_token..(t + 1) * self.per_token;
        if wt.k_quant() {
            ActRef::K(&self.q8k[r])
        } else {
            ActRef::B(&self.q8[r])
        }
    }
}

/// Rows of `k` values of `x` into blocks of `block` values each, a row per work item.
fn quantize_rows<B: Send>(
    x: &[f32],
    k: usize,
    out: &mut [B],
    block: usize,
    parallel: bool,
    f: fn(&[f32], &mut B),
) {
    let per_row = k / block;
    let one = |(xs, bs): (&[f32], &mut [B])| {
        for (x, b) in xs.chunks_exact(block).zip(bs) {
            f(x, b);
        }
    };
    if parallel {
        x.par_chunks(k)
            .zip(out.par_chunks_mut(per_row))
            .for_each(one);
    } else {
        x.chunks(k).zip(out.chunks_mut(per_row)).for_each(one);
    }
}

/// One token's quantized activations.
#[derive(Clone, Copy)]
pub enum ActRef<'a> {
    B(&'a [Q8Block]),
    K(&'a [Q8KBlock]),
}

/// `out[t·n + r]` = row r of `w` · `acts[t]`, for the `n = out.len() / acts.len()` rows
/// stored back to back in `w`, all activations having the same block count.
pub fn dot_rows(isa: Isa, wt: WType, w: &[u8], acts: &[ActRef<'_>], out: &mut [f32]) {
    let nb = |a: &ActRef<'_>| match a {
        ActRef::B(a) => a.len(),
        ActRef::K(a) => a.len(),
    };
    let Some(first) = acts.first() else { return };
    let blocks = nb(first);
    assert!(
        acts.iter()
            .all(|a| nb(a) == blocks && matches!(a, ActRef::K(_)) == wt.k_quant()),
        "activations quantized for another shape or type"
    );
    let row_bytes = blocks * wt.block_bytes();
    let n = out.len() / acts.len();
    assert!(
        w.len() >= row_bytes * n && out.len() == n * acts.len(),
        "weight rows or outputs out of range"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if matches!(detect(), Isa::Avx2 | Isa::Avx512Vnni) => {
            // SAFETY: the guard checked avx2, fma and f16c on this CPU (std caches the
            // answer); the lengths and activation types were checked above.
            unsafe { x86::avx2::dot_rows(wt, w, row_bytes, acts, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if detect() == Isa::Avx512Vnni => {
            // SAFETY: the guard checked AVX2's features and avx512f/bw/vl/vnni on this CPU;
            // the lengths and activation types were checked above.
            unsafe { x86::vnni::dot_rows(wt, w, row_bytes, acts, out) }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot if detect() == Isa::NeonDot || isa == Isa::Neon => {
            for (t, act) in acts.iter().enumerate() {
                // SAFETY: NEON is part of every aarch64 Linux target; dotprod only runs when
                // the guard saw this CPU report it; lengths and types were checked above.
                unsafe {
                    neon::dot_rows(
                        isa == Isa::NeonDot,
                        wt,
                        w,
                        row_bytes,
                        *act,
                        &mut out[t * n..(t + 1) * n],
                    )
                }
            }
        }
        _ => {
            for (t, act) in acts.iter().enumerate() {
                for r in 0..n {
                    out[t * n + r] = scalar::dot(wt, &w[r * row_bytes..(r + 1) * row_bytes], *act);
                }
            }
        }
    }
}

/// Σ a·b over f32 slices of equal length (attention scores).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot product of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx2 | Isa::Avx512Vnni) {
        // SAFETY: `isa()` is one of these only when `detect` saw avx2, fma and f16c.
        return unsafe { x86::dot_f32(a, b) };
    }
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + ar.iter().zip(br).map(|(x, y)| x * y).sum::<f32>()
}

/// y ← y + a·x over f32 slices of equal length (attention's weighted sum of values).
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx2 | Isa::Avx512Vnni) {
        // SAFETY: `isa()` is one of these only when `detect` saw avx2, fma and f16c.
        return unsafe { x86::axpy(a, x, y) };
    }
    for (v, u) in y.iter_mut().zip(x) {
        *v += a * u;
    }
}

/// A file mapped read-only: model weights used in place, shared with the page cache, read
/// from disk as they are first touched.
pub struct MappedFile(memmap2::Mmap);

impl MappedFile {
    pub fn map(file: &File) -> std::io::Result<Self> {
        // SAFETY: the mapping is read-only and private to this process; what a mapping
        // cannot rule out is the file changing underneath it. Models are registry blobs:
        // content-addressed, written once under a temporary name and renamed, never
        // modified in place, and held by a lease (a lock that keeps `gc` away) while loaded.
        // Files loaded straight from a path get the same promise from the caller as
        // llama.cpp asks of its users (it maps too).
        unsafe { memmap2::Mmap::map(file) }.map(Self)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Anonymous memory for a copy of weights: zeroed, populated in one call, written once,
/// then sealed read-only ([`AnonBytes::seal`]).
pub struct AnonBytes(memmap2::MmapMut);

impl AnonBytes {
    pub fn new(len: usize) -> std::io::Result<Self> {
        memmap2::MmapOptions::new()
            .len(len)
            .populate()
            .map_anon()
            .map(Self)
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// Read-only from here on, offered to khugepaged for huge pages (only advice: where huge
    /// pages are off, nothing changes).
    pub fn seal(self) -> std::io::Result<SealedBytes> {
        let _ = self.0.advise(memmap2::Advice::HugePage);
        self.0.make_read_only().map(SealedBytes)
    }
}

/// [`AnonBytes`] once written.
pub struct SealedBytes(memmap2::Mmap);

impl SealedBytes {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A weight matrix: `rows` rows of `cols` values, in its GGUF blocks or, where `packed`,
/// in the interleaved layout [`pack_groups`] makes of them.
#[derive(Clone, Copy)]
pub struct QMatrix<'a> {
    pub wt: WType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
    pub packed: bool,
}

impl QMatrix<'_> {
    pub fn row_bytes(&self) -> usize {
        self.cols / self.wt.block_len() * self.wt.block_bytes()
    }
}

/// Rows per group of the packed layout.
pub const PACK_ROWS: usize = 8;

/// Whether matrices of `wt` with `rows` rows are worth packing on this CPU: the types
/// the packed kernels take, on x86 with AVX2 (elsewhere the plain kernels run).
/// `OUTPOST_KERNELS=plain` packs nothing (for comparisons).
pub fn packs(wt: WType, rows: usize) -> bool {
    copies() && packable(wt, rows)
}

/// Whether the weights these kernels multiply are worth a copy of their own in memory (read
/// at load, packed where [`packs`]): on x86 with AVX2, unless `OUTPOST_KERNELS=plain` keeps
/// everything in the mapped file (for comparisons).
pub fn copies() -> bool {
    static PLAIN: OnceLock<bool> = OnceLock::new();
    let plain = *PLAIN.get_or_init(|| std::env::var("OUTPOST_KERNELS").is_ok_and(|v| v == "plain"));
    !plain && matches!(isa(), Isa::Avx2 | Isa::Avx512Vnni)
}

fn packable(wt: WType, rows: usize) -> bool {
    matches!(wt, WType::Q4_0 | WType::Q4_1 | WType::Q5_0 | WType::Q8_0)
        && rows.is_multiple_of(PACK_ROWS)
}

/// Bytes of a packed block's header: the 8 rows' `d`, then Q4_1's 8 `m` or Q5_0's high
/// bits (32 bytes, laid out as the module docs say).
const fn pack_header(wt: WType) -> usize {
    match wt {
        WType::Q4_1 => 32,
        WType::Q5_0 => 48,
        _ => 16,
    }
}

/// `data` (`rows` rows of `cols` values in GGUF blocks) in the packed layout (module docs),
/// the same size; `None` where the type, the row count or the length does not fit. (Loading
/// packs chunk by chunk with [`pack_groups`]; this whole-matrix form is for tests.)
#[cfg(test)]
pub fn repack(wt: WType, rows: usize, cols: usize, data: &[u8]) -> Option<Vec<u8>> {
    if !packable(wt, rows) || !cols.is_multiple_of(wt.block_len()) {
        return None;
    }
    let rb = cols / wt.block_len() * wt.block_bytes();
    let total = rows.checked_mul(rb)?;
    let src = data.get(..total)?;
    let mut out = vec![0u8; total];
    pack_groups(wt, cols, src, &mut out);
    Some(out)
}

/// Whole groups of 8 rows of `cols` values, `src` in GGUF blocks, packed into `dst` (of the
/// same length). The caller checks the type packs and the lengths are whole groups.
pub fn pack_groups(wt: WType, cols: usize, src: &[u8], dst: &mut [u8]) {
    let rb = cols / wt.block_len() * wt.block_bytes();
    assert!(
        packable(wt, PACK_ROWS)
            && src.len() == dst.len()
            && src.len().is_multiple_of(PACK_ROWS * rb),
        "packing other than whole groups of a packed type"
    );
    let bb = wt.block_bytes();
    let hdr = pack_header(wt);
    let (scales, quants) = gguf_block_parts(wt);
    for (src, dst) in src
        .chunks(PACK_ROWS * rb)
        .zip(dst.chunks_mut(PACK_ROWS * rb))
    {
        // The inverse of `unpack_group_row`; the round-trip tests hold the two to each other.
        for (blk, out) in dst.chunks_exact_mut(PACK_ROWS * bb).enumerate() {
            let (head, qs) = out.split_at_mut(hdr);
            for r in 0..PACK_ROWS {
                let row = &src[r * rb + blk * bb..r * rb + (blk + 1) * bb];
                for h in 0..scales {
                    head[16 * h + 2 * r..16 * h + 2 * r + 2]
                        .copy_from_slice(&row[2 * h..2 * h + 2]);
                }
                for (j, four) in row[quants..].chunks_exact(4).enumerate() {
                    qs[32 * j + 4 * r..32 * j + 4 * r + 4].copy_from_slice(four);
                }
                if wt == WType::Q5_0 {
                    let qh = u32::from_le_bytes([row[2], row[3], row[4], row[5]]);
                    for i in 0..4 {
                        head[16 + 4 * r + i] = fifth_bits_byte(qh, i);
                    }
                }
            }
        }
    }
}

/// Two-byte scales per row of a GGUF block (`d`, and Q4_1's `m`), and where its nibbles or
/// bytes start.
const fn gguf_block_parts(wt: WType) -> (usize, usize) {
    match wt {
        WType::Q4_1 => (2, 4),
        WType::Q5_0 => (1, 6),
        _ => (1, 2),
    }
}

/// Byte i of a row's packed Q5_0 fifth bits: bit k is bit 4k+i of its `qh`.
fn fifth_bits_byte(qh: u32, i: usize) -> u8 {
    (0..8).fold(0u8, |acc, k| acc | (((qh >> (4 * k + i)) & 1) as u8) << k)
}

/// Row `r` of a packed matrix (`packed`, rows of `cols` values) in its GGUF blocks, into
/// `out` (one row's bytes).
pub fn unpack_row(wt: WType, cols: usize, packed: &[u8], r: usize, out: &mut [u8]) {
    let rb = cols / wt.block_len() * wt.block_bytes();
    let g = r / PACK_ROWS;
    let group = &packed[g * PACK_ROWS * rb..(g + 1) * PACK_ROWS * rb];
    unpack_group_row(wt, group, r % PACK_ROWS, out);
}

/// Row `r` (< 8) of a packed group, in its GGUF blocks, into `out` (one row's bytes): the
/// inverse of [`pack_groups`]' moves.
fn unpack_group_row(wt: WType, group: &[u8], r: usize, out: &mut [u8]) {
    let bb = wt.block_bytes();
    let hdr = pack_header(wt);
    let (scales, quants) = gguf_block_parts(wt);
    for (row, packed) in out
        .chunks_exact_mut(bb)
        .zip(group.chunks_exact(PACK_ROWS * bb))
    {
        for h in 0..scales {
            row[2 * h..2 * h + 2].copy_from_slice(&packed[16 * h + 2 * r..16 * h + 2 * r + 2]);
        }
        for (j, four) in row[quants..].chunks_exact_mut(4).enumerate() {
            four.copy_from_slice(&packed[hdr + 32 * j + 4 * r..hdr + 32 * j + 4 * r + 4]);
        }
        if wt == WType::Q5_0 {
            // Bit k of byte 4r+i of the fifth bits is bit 4k+i of the row's `qh`.
            let bits = &packed[16 + 4 * r..16 + 4 * r + 4];
            let mut qh = 0u32;
            for (i, byte) in bits.iter().enumerate() {
                for k in 0..8 {
                    qh |= u32::from((byte >> k) & 1) << (4 * k + i);
                }
            }
            row[2..6].copy_from_slice(&qh.to_le_bytes());
        }
    }
}

/// A packed group of 8 rows (`rb` bytes each) back in its GGUF blocks, into `plain`.
fn unpack_group(wt: WType, rb: usize, group: &[u8], plain: &mut [u8]) {
    for (r, row) in plain.chunks_exact_mut(rb).enumerate() {
        unpack_group_row(wt, group, r, row);
    }
}

/// [`dot_rows`] over packed weights: `out[t·n + r]` = row r · `acts[t]` for the `n` rows
/// (a multiple of 8) packed in `w`.
pub fn dot_rows_packed(isa: Isa, wt: WType, w: &[u8], acts: &[ActRef<'_>], out: &mut [f32]) {
    let Some(ActRef::B(first)) = acts.first() else {
        return;
    };
    let blocks = first.len();
    assert!(
        acts.iter()
            .all(|a| matches!(a, ActRef::B(b) if b.len() == blocks)),
        "activations quantized for another shape or type"
    );
    let row_bytes = blocks * wt.block_bytes();
    let n = out.len() / acts.len();
    assert!(
        packable(wt, n) && w.len() >= row_bytes * n && out.len() == n * acts.len(),
        "packed weight rows or outputs out of range"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if matches!(detect(), Isa::Avx2 | Isa::Avx512Vnni) => {
            // SAFETY: the guard checked avx2, fma and f16c on this CPU; the type, lengths
            // and activations were checked above.
            unsafe { x86::avx2::dot_rows_packed(wt, w, row_bytes, acts, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if detect() == Isa::Avx512Vnni => {
            // SAFETY: as above, and the guard checked avx512f/bw/vl/vnni.
            unsafe { x86::vnni::dot_rows_packed(wt, w, row_bytes, acts, out) }
        }
        _ => {
            // The reference: each group unpacked, then the scalar dots.
            let group = PACK_ROWS * row_bytes;
            let mut plain = vec![0u8; group];
            for g in 0..n / PACK_ROWS {
                unpack_group(wt, row_bytes, &w[g * group..(g + 1) * group], &mut plain);
                for (t, act) in acts.iter().enumerate() {
                    for r in 0..PACK_ROWS {
                        out[t * n + g * PACK_ROWS + r] =
                            scalar::dot(wt, &plain[r * row_bytes..(r + 1) * row_bytes], *act);
                    }
                }
            }
        }
    }
}

/// Why a matrix cannot go through these kernels.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ShapeError(String);

thread_local! {
    static SCRATCH: RefCell<Acts> = RefCell::new(Acts::default());
}

/// Output rows per work item (several per activation block in the row kernels).
const ROW_CHUNK_MIN: usize = 16;
/// Rows per `dot_rows` call inside a work item.
const TILE: usize = 64;

/// Most matrices one [`matmul_group`] takes.
pub const GROUP_MAX: usize = 4;

/// `out` (`n` × `w.rows`) = `x` (`n` × `w.cols`) · `wᵀ`, on rayon's pool.
pub fn matmul(w: QMatrix<'_>, x: &[f32], out: &mut [f32]) -> Result<(), ShapeError> {
    matmul_group(&[w], x, &mut [out])
}

/// [`matmul`] for up to [`GROUP_MAX`] matrices of the same width over the same `x` (a
/// layer's Q, K and V; gate and up): the activations are quantized once and all rows share
/// one parallel section. The matrices must all be K-quants or all not.
pub fn matmul_group(
    ws: &[QMatrix<'_>],
    x: &[f32],
    outs: &mut [&mut [f32]],
) -> Result<(), ShapeError> {
    let Some(first) = ws.first() else {
        return Err(ShapeError("no matrix to multiply".into()));
    };
    if ws.len() != outs.len() || ws.len() > GROUP_MAX {
        return Err(ShapeError(format!(
            "{} matrices for {} outputs (at most {GROUP_MAX})",
            ws.len(),
            outs.len()
        )));
    }
    let k = first.cols;
    if k == 0 || !x.len().is_multiple_of(k) {
        return Err(ShapeError(format!(
            "{} activations in rows of {k}",
            x.len()
        )));
    }
    let n = x.len() / k;
    for (w, out) in ws.iter().zip(outs.iter()) {
        if w.cols != k || w.wt.k_quant() != first.wt.k_quant() {
            return Err(ShapeError(format!(
                "a {:?} matrix of width {} grouped with a {:?} one of width {k}",
                w.wt, w.cols, first.wt
            )));
        }
        if !k.is_multiple_of(w.wt.block_len()) {
            return Err(ShapeError(format!(
                "rows of {k} are not whole {:?} blocks",
                w.wt
            )));
        }
        if w.packed && !packable(w.wt, w.rows) {
            return Err(ShapeError(format!(
                "a packed {:?} matrix of {} rows",
                w.wt, w.rows
            )));
        }
        if w.data.len() < w.rows * w.row_bytes() || out.len() != n * w.rows {
            return Err(ShapeError(format!(
                "{}×{k} {:?} matrix: {} bytes of weights, {} outputs for {n} tokens",
                w.rows,
                w.wt,
                w.data.len(),
                out.len()
            )));
        }
    }
    // Taken out of the thread's slot, not borrowed in it, for the parallel section: while
    // this thread waits in it, rayon may run another forward pass's matmul here (a second
    // model or request on the same pool), which then takes an empty scratch of its own
    // instead of finding this one borrowed.
    let mut acts = SCRATCH.with(RefCell::take);
    acts.quantize(first.wt, x, k);
    run(ws, &acts, n, outs);
    SCRATCH.with(|s| s.replace(acts));
    Ok(())
}

/// Shares the outputs between workers that write disjoint elements.
struct OutPtrs([*mut f32; GROUP_MAX]);

impl OutPtrs {
    /// (A method, so closures capture the whole `Sync` wrapper, not its raw fields.)
    fn get(&self, i: usize) -> *mut f32 {
        self.0[i]
    }
}
// SAFETY: workers write disjoint index sets (distinct row ranges of every token), and the
// pointers do not outlive the `outs` borrow held by `run` for the whole parallel section.
unsafe impl Sync for OutPtrs {}
unsafe impl Send for OutPtrs {}

fn run(ws: &[QMatrix<'_>], acts: &Acts, n: usize, outs: &mut [&mut [f32]]) {
    let isa = isa();
    let total: usize = ws.iter().map(|w| w.rows).sum();
    let threads = rayon::current_num_threads().max(1);
    // A few chunks per thread for balance, each whole packed groups.
    let chunk = total
        .div_ceil(threads * 4)
        .max(ROW_CHUNK_MIN)
        .next_multiple_of(PACK_ROWS);
    let chunks: usize = ws.iter().map(|w| w.rows.div_ceil(chunk)).sum();
    let mut ptrs = [std::ptr::null_mut(); GROUP_MAX];
    for (p, o) in ptrs.iter_mut().zip(outs.iter_mut()) {
        *p = o.as_mut_ptr();
    }
    let ptrs = OutPtrs(ptrs);
    let work = |mut c: usize| {
        // Global chunk c → matrix i, local chunk c.
        let mut i = 0;
        while c >= ws[i].rows.div_ceil(chunk) {
            c -= ws[i].rows.div_ceil(chunk);
            i += 1;
        }
        let w = &ws[i];
        let (rows, rb) = (w.rows, w.row_bytes());
        let r0 = c * chunk;
        let r1 = (r0 + chunk).min(rows);
        // Tokens per pass: each unpacked weight vector serves all of them.
        let step = if w.packed || w.wt.k_quant() { 4 } else { 2 };
        let mut tmp = [0f32; 4 * TILE];
        let wslice = &w.data[r0 * rb..r1 * rb];
        let mut t = 0;
        while t < n {
            let tn = (n - t).min(step);
            let acts: [ActRef<'_>; 4] =
                std::array::from_fn(|j| acts.token(w.wt, t + j.min(tn - 1)));
            let mut r = r0;
            while r < r1 {
                let m = (r1 - r).min(TILE);
                let tile = &wslice[(r - r0) * rb..(r - r0 + m) * rb];
                let res = &mut tmp[..tn * m];
                if w.packed {
                    dot_rows_packed(isa, w.wt, tile, &acts[..tn], res);
                } else {
                    dot_rows(isa, w.wt, tile, &acts[..tn], res);
                }
                for j in 0..tn {
                    // SAFETY: t + j < n and r + m <= rows, so the range lies in output i
                    // (n × rows, checked by `matmul_group`); rows r0..r1 of matrix i belong
                    // to this chunk alone, so no two workers write the same element, and
                    // nobody reads the outputs until the parallel section ends.
                    unsafe {
                        let dst = ptrs.get(i).add((t + j) * rows + r);
                        std::ptr::copy_nonoverlapping(tmp.as_ptr().add(j * m), dst, m);
                    }
                }
                r += m;
            }
            t += tn;
        }
    };
    if threads == 1 || chunks == 1 {
        (0..chunks).for_each(work);
    } else {
        (0..chunks).into_par_iter().for_each(work);
    }
}
