//! GGUF header reading and validation: the only place that parses the container format.
//!
//! A GGUF file is untrusted input. [`inspect`] reads the header (magic, version, metadata
//! key/values, tensor infos) with a buffered reader, never allocating from a count or a length
//! read from the file before checking it against a cap *and* against the bytes that remain in
//! the file, then checks that every tensor's data lies inside the file, aligned and without
//! overlapping another. It returns what the registry records (architecture, quantization,
//! parameter count, context length) and keeps small scalar and string metadata for callers.
//!
//! Layout (little-endian, versions 2 and 3): `"GGUF"`, `u32 version`, `u64 n_tensors`,
//! `u64 n_kv`, then `n_kv` × (string key, `u32` type, value), then `n_tensors` × (string name,
//! `u32 n_dims`, `n_dims` × `u64`, `u32` ggml type, `u64` offset); tensor data starts at the
//! next multiple of `general.alignment` (default 32) after the header, offsets are relative
//! to that start. A string is `u64` length + UTF-8 bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// Caps on what a header may declare. Real models stay far below them (SmolLM2: 272 tensors,
/// ~30 keys; Gemma 3: a 262,144-token vocabulary); anything above is refused before reading on.
pub mod caps {
    /// Tensors in one file (the largest published models have a few thousand).
    pub const MAX_TENSORS: u64 = 1 << 16;
    /// Metadata key/value pairs.
    pub const MAX_KV: u64 = 1 << 16;
    /// Length of a metadata key or tensor name.
    pub const MAX_NAME_LEN: u64 = 1 << 16;
    /// Length of one metadata string value (chat templates are a few KiB).
    pub const MAX_STRING_LEN: u64 = 1 << 24;
    /// Elements of one metadata array (vocabularies, merges, scores).
    pub const MAX_ARRAY_LEN: u64 = 1 << 24;
    /// Nesting of arrays inside arrays.
    pub const MAX_ARRAY_DEPTH: u32 = 2;
    /// Dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
    pub const MAX_DIMS: u32 = 4;
    /// Largest `general.alignment`.
    pub const MAX_ALIGNMENT: u64 = 1 << 16;
    /// Strings kept in [`super::GgufInfo::metadata`]; longer ones are skipped, not stored.
    pub const MAX_KEPT_STRING: u64 = 1 << 16;
}

/// Why a file is not an acceptable GGUF model.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("reading the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file (magic bytes are {0:?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("truncated GGUF: the file ends inside the {0}")]
    Truncated(String),
    #[error("{what} is {value}, above the cap of {cap}")]
    OverCap { what: String, value: u64, cap: u64 },
    #[error("malformed GGUF: {0}")]
    Malformed(String),
    #[error("tensor '{name}' lies outside the file (data ends at byte {end}, the file has {len})")]
    TensorOutOfBounds { name: String, end: u64, len: u64 },
    #[error("unknown ggml tensor type {type_id} for tensor '{name}'")]
    UnknownTensorType { name: String, type_id: u32 },
}

type Result<T> = std::result::Result<T, GgufError>;

/// A ggml tensor element type: the subset with a fixed block layout that GGUF files use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(u32);

impl GgmlType {
    /// `(id, name, elements per block, bytes per block)`, from ggml's `type_traits`.
    const TABLE: &'static [(u32, &'static str, u64, u64)] = &[
        (0, "f32", 1, 4),
        (1, "f16", 1, 2),
        (2, "q4_0", 32, 18),
        (3, "q4_1", 32, 20),
        (6, "q5_0", 32, 22),
        (7, "q5_1", 32, 24),
        (8, "q8_0", 32, 34),
        (9, "q8_1", 32, 36),
        (10, "q2_k", 256, 84),
        (11, "q3_k", 256, 110),
        (12, "q4_k", 256, 144),
        (13, "q5_k", 256, 176),
        (14, "q6_k", 256, 210),
        (15, "q8_k", 256, 292),
        (16, "iq2_xxs", 256, 66),
        (17, "iq2_xs", 256, 74),
        (18, "iq3_xxs", 256, 98),
        (19, "iq1_s", 256, 50),
        (20, "iq4_nl", 32, 18),
        (21, "iq3_s", 256, 110),
        (22, "iq2_s", 256, 82),
        (23, "iq4_xs", 256, 136),
        (24, "i8", 1, 1),
        (25, "i16", 1, 2),
        (26, "i32", 1, 4),
        (27, "i64", 1, 8),
        (28, "f64", 1, 8),
        (29, "iq1_m", 256, 56),
        (30, "bf16", 1, 2),
        (34, "tq1_0", 256, 54),
        (35, "tq2_0", 256, 66),
        (39, "mxfp4", 32, 17),
    ];

    fn entry(self) -> &'static (u32, &'static str, u64, u64) {
        // Constructed only through `from_id`, so the id is in the table.
        Self::TABLE
            .iter()
            .find(|e| e.0 == self.0)
            .unwrap_or(&Self::TABLE[0])
    }

    pub fn from_id(id: u32) -> Option<Self> {
        Self::TABLE.iter().any(|e| e.0 == id).then_some(Self(id))
    }

    pub fn id(self) -> u32 {
        self.0
    }

    /// Lower-case name as llama.cpp prints it (`q4_1`, `q6_k`, `f16`).
    pub fn name(self) -> &'static str {
        self.entry().1
    }

    pub fn block_size(self) -> u64 {
        self.entry().2
    }

    pub fn block_bytes(self) -> u64 {
        self.entry().3
    }

    /// Whether this is a quantized (block) type rather than a plain float or integer.
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value kept after parsing. [`inspect`] keeps scalars and short strings; arrays
/// are validated and skipped, only their length is kept. [`read_model`] keeps the tokenizer's
/// arrays whole, compactly: strings as one [`StrList`], numbers as a vector of one type
/// (Gemma 3's 262k-token vocabulary took 33 MiB as a list of values, 8 MiB this way).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    UInt(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array {
        len: u64,
    },
    /// A kept array of strings.
    Strings(StrList),
    /// A kept array of integers (of any width that fits an `i64`).
    Ints(Vec<i64>),
    /// A kept array of `f32` or `f64`.
    Floats(Vec<f64>),
    /// A kept array of anything else (booleans, arrays).
    List(Vec<MetaValue>),
}

/// Strings in one buffer: string `i` ends at `ends[i]` and starts where string `i - 1` ends.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StrList {
    text: String,
    ends: Vec<usize>,
}

impl StrList {
    pub const fn new() -> Self {
        Self {
            text: String::new(),
            ends: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = match i {
            0 => 0,
            _ => self.ends[i - 1],
        };
        self.text.get(start..end)
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> {
        (0..self.len()).map(|i| self.get(i).unwrap_or_default())
    }

    fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }
}

impl<'a> FromIterator<&'a str> for StrList {
    fn from_iter<I: IntoIterator<Item = &'a str>>(strings: I) -> Self {
        let mut list = Self::new();
        for s in strings {
            list.push(s);
        }
        list
    }
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::UInt(v) => Some(v),
            MetaValue::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u32(&self) -> Option<u32> {
        self.as_u64().and_then(|v| u32::try_from(v).ok())
    }

    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::Float(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A kept array of anything but strings and numbers ([`read_model`]).
    pub fn as_list(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::List(v) => Some(v),
            _ => None,
        }
    }

    /// A kept array of strings ([`read_model`]).
    pub fn as_strings(&self) -> Option<&StrList> {
        match self {
            MetaValue::Strings(v) => Some(v),
            _ => None,
        }
    }

    /// A kept array of numbers as `f64`s (integers beyond 2^53 rounded).
    pub fn to_floats(&self) -> Option<Vec<f64>> {
        match self {
            MetaValue::Floats(v) => Some(v.clone()),
            MetaValue::Ints(v) => Some(v.iter().map(|&x| x as f64).collect()),
            _ => None,
        }
    }

    /// A kept array of integers.
    pub fn as_ints(&self) -> Option<&[i64]> {
        match self {
            MetaValue::Ints(v) => Some(v),
            _ => None,
        }
    }

    /// An array's length, kept or not.
    pub fn array_len(&self) -> Option<u64> {
        Some(match self {
            MetaValue::Array { len } => *len,
            MetaValue::Strings(v) => v.len() as u64,
            MetaValue::Ints(v) => v.len() as u64,
            MetaValue::Floats(v) => v.len() as u64,
            MetaValue::List(v) => v.len() as u64,
            _ => return None,
        })
    }
}

/// A file's metadata by key.
pub type Metadata = BTreeMap<String, MetaValue>;

/// One tensor as the header describes it.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub elements: u64,
    pub bytes: u64,
}

/// What a validated GGUF file declares.
#[derive(Clone, Debug)]
pub struct GgufInfo {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    pub file_len: u64,
    /// Each metadata key/value's bytes in the file (key, type and value), in file order:
    /// what `quantize` copies unchanged into the file it writes.
    pub kv_spans: Vec<(String, std::ops::Range<u64>)>,
}

impl GgufInfo {
    /// `general.architecture`, which every model file must carry.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata
            .get("general.architecture")
            .and_then(MetaValue::as_str)
    }

    /// `<arch>.context_length`, the training context.
    pub fn context_length(&self) -> Option<u64> {
        let arch = self.architecture()?;
        self.metadata
            .get(&format!("{arch}.context_length"))
            .and_then(MetaValue::as_u64)
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Total parameters: the elements of every tensor.
    pub fn parameters(&self) -> u64 {
        self.tensors.iter().map(|t| t.elements).sum()
    }

    /// The model's quantization as llama.cpp names it: the file's declared
    /// `general.file_type` (`q4_1`, `q4_k_m`, …) when the type it names is really among the
    /// tensors; otherwise the type holding most elements of the layers' matrices (the
    /// embedding is often kept wider, and norms are f32 in every file).
    pub fn quantization(&self) -> String {
        let present = |name: &str| self.tensors.iter().any(|t| t.ggml_type.name() == name);
        let declared = self
            .metadata
            .get("general.file_type")
            .and_then(MetaValue::as_u64)
            .and_then(file_type_name);
        if let Some(mix) = declared {
            let base = mix
                .strip_suffix("_s")
                .or_else(|| mix.strip_suffix("_m"))
                .or_else(|| mix.strip_suffix("_l"))
                .unwrap_or(mix);
            if present(base) {
                return mix.to_string();
            }
        }
        let in_blocks = self.tensors.iter().any(|t| t.name.starts_with("blk."));
        let mut by_type: BTreeMap<GgmlType, u64> = BTreeMap::new();
        for t in &self.tensors {
            if t.dims.len() >= 2 && (!in_blocks || t.name.starts_with("blk.")) {
                *by_type.entry(t.ggml_type).or_default() += t.elements;
            }
        }
        by_type
            .iter()
            .max_by_key(|(ty, n)| (**n, std::cmp::Reverse(**ty)))
            .map(|(ty, _)| *ty)
            .or_else(|| self.tensors.first().map(|t| t.ggml_type))
            .map_or_else(|| "none".to_string(), |t| t.name().to_string())
    }
}

/// llama.cpp's `llama_ftype` names for `general.file_type`.
fn file_type_name(ftype: u64) -> Option<&'static str> {
    Some(match ftype {
        0 => "f32",
        1 => "f16",
        2 => "q4_0",
        3 => "q4_1",
        7 => "q8_0",
        8 => "q5_0",
        9 => "q5_1",
        10 => "q2_k",
        11 => "q3_k_s",
        12 => "q3_k_m",
        13 => "q3_k_l",
        14 => "q4_k_s",
        15 => "q4_k_m",
        16 => "q5_k_s",
        17 => "q5_k_m",
        18 => "q6_k",
        32 => "bf16",
        _ => return None,
    })
}

/// Reads and validates the GGUF header of the file at `path`.
pub fn inspect(path: &Path) -> Result<GgufInfo> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    inspect_reader(BufReader::with_capacity(1 << 16, file), len)
}

/// Reads and validates a GGUF header from `reader`, which holds a file of `len` bytes.
pub fn inspect_reader<R: Read + Seek>(reader: R, len: u64) -> Result<GgufInfo> {
    read_header(reader, len, false)
}

/// The arrays [`read_model`] keeps whole: what the tokenizer reads. Any other array is
/// validated and skipped as [`inspect`] does, so that a file cannot make the reader hold
/// 30 bytes of values for each byte of an array nobody reads.
const KEPT_ARRAYS: [&str; 4] = [
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
];

/// [`inspect`], keeping what loading a model needs whole: long strings (the chat template)
/// and the tokenizer's arrays ([`KEPT_ARRAYS`]). The same caps apply.
pub fn read_model(file: &File) -> Result<GgufInfo> {
    let len = file.metadata()?.len();
    read_header(BufReader::with_capacity(1 << 16, file), len, true)
}

fn read_header<R: Read + Seek>(reader: R, len: u64, full: bool) -> Result<GgufInfo> {
    let mut r = Reader {
        inner: reader,
        pos: 0,
        len,
        full,
    };
    let mut magic = [0u8; 4];
    r.exact(&mut magic, "magic")?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic(magic));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = r.u64("tensor count")?;
    capped("tensor count", n_tensors, caps::MAX_TENSORS)?;
    let n_kv = r.u64("metadata count")?;
    capped("metadata count", n_kv, caps::MAX_KV)?;
    // Every key/value takes at least 12 bytes and every tensor info at least 24: a count that
    // cannot fit in the file is refused before any loop runs.
    r.fits(n_kv.saturating_mul(12), "metadata")?;
    r.fits(n_tensors.saturating_mul(24), "tensor infos")?;

    let mut metadata = BTreeMap::new();
    let mut kv_spans = Vec::with_capacity(n_kv as usize);
    for _ in 0..n_kv {
        let start = r.pos;
        let key = r.string("metadata key", caps::MAX_NAME_LEN)?;
        let ty = r.u32("metadata type")?;
        let value = r.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(GgufError::Malformed(format!(
                "duplicate metadata key '{key}'"
            )));
        }
        kv_spans.push((key, start..r.pos));
    }

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        tensors.push(r.tensor_info()?);
    }

    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => {
            let a = v.as_u64().ok_or_else(|| {
                GgufError::Malformed("general.alignment is not an integer".into())
            })?;
            if a == 0 || !a.is_power_of_two() || a > caps::MAX_ALIGNMENT {
                return Err(GgufError::Malformed(format!(
                    "general.alignment {a} is not a power of two up to {}",
                    caps::MAX_ALIGNMENT
                )));
            }
            a
        }
    };
    let data_offset = r.pos.div_ceil(alignment) * alignment;
    check_tensor_layout(&mut tensors, data_offset, alignment, len)?;
    Ok(GgufInfo {
        version,
        metadata,
        tensors,
        data_offset,
        file_len: len,
        kv_spans,
    })
}

/// [`capped`] for the length of `what`, the message made only when it is over.
fn capped_length(what: &str, value: u64, cap: u64) -> Result<()> {
    if value > cap {
        return capped(&format!("length of {what}"), value, cap);
    }
    Ok(())
}

fn capped(what: &str, value: u64, cap: u64) -> Result<()> {
    if value > cap {
        return Err(GgufError::OverCap {
            what: what.to_string(),
            value,
            cap,
        });
    }
    Ok(())
}

/// Every tensor aligned, inside the file, and not overlapping the next one.
fn check_tensor_layout(
    tensors: &mut [TensorInfo],
    data_offset: u64,
    alignment: u64,
    len: u64,
) -> Result<()> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    let mut prev_end = 0u64;
    let mut prev_name = "";
    for &i in &order {
        let t = &tensors[i];
        if !t.offset.is_multiple_of(alignment) {
            return Err(GgufError::Malformed(format!(
                "tensor '{}' offset {} is not a multiple of the alignment {alignment}",
                t.name, t.offset
            )));
        }
        if t.offset < prev_end {
            return Err(GgufError::Malformed(format!(
                "tensor '{}' overlaps tensor '{prev_name}'",
                t.name
            )));
        }
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.bytes))
            .unwrap_or(u64::MAX);
        if end > len {
            return Err(GgufError::TensorOutOfBounds {
                name: t.name.clone(),
                end,
                len,
            });
        }
        prev_end = t.offset + t.bytes;
        prev_name = &t.name;
    }
    Ok(())
}

struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
    /// Keep arrays and long strings ([`read_model`]).
    full: bool,
}

impl<R: Read + Seek> Reader<R> {
    fn fits(&self, n: u64, what: &str) -> Result<()> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(GgufError::Truncated(what.to_string()));
        }
        Ok(())
    }

    fn exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.fits(buf.len() as u64, what)?;
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => GgufError::Truncated(what.to_string()),
            _ => GgufError::Io(e),
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        self.fits(n, what)?;
        let offset = i64::try_from(n).map_err(|_| GgufError::Truncated(what.to_string()))?;
        self.inner.seek(SeekFrom::Current(offset))?;
        self.pos += n;
        Ok(())
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let mut b = [0u8; 4];
        self.exact(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.exact(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self, what: &str, cap: u64) -> Result<String> {
        let n = self.u64(what)?;
        capped_length(what, n, cap)?;
        self.fits(n, what)?;
        let mut buf = vec![0u8; n as usize];
        self.exact(&mut buf, what)?;
        String::from_utf8(buf).map_err(|_| GgufError::Malformed(format!("{what} is not UTF-8")))
    }

    /// The `n` elements of type `elem` of a kept array, in its compact form.
    fn kept_array(
        &mut self,
        elem: u32,
        n: u64,
        key: &str,
        what: &str,
        depth: u32,
    ) -> Result<MetaValue> {
        let n = n as usize;
        Ok(match elem {
            8 => {
                let mut list = StrList {
                    text: String::new(),
                    ends: Vec::with_capacity(n),
                };
                for _ in 0..n {
                    match self.value_as(8, key, what, depth + 1)? {
                        MetaValue::Str(s) => list.push(&s),
                        _ => return Err(GgufError::Malformed(format!("{what}: not a string"))),
                    }
                }
                list.text.shrink_to_fit();
                MetaValue::Strings(list)
            }
            6 | 12 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    match self.value_as(elem, key, what, depth + 1)? {
                        MetaValue::Float(x) => v.push(x),
                        _ => return Err(GgufError::Malformed(format!("{what}: not a float"))),
                    }
                }
                MetaValue::Floats(v)
            }
            0..=5 | 10 | 11 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let x = match self.value_as(elem, key, what, depth + 1)? {
                        MetaValue::Int(x) => Some(x),
                        MetaValue::UInt(x) => i64::try_from(x).ok(),
                        _ => None,
                    };
                    v.push(x.ok_or_else(|| {
                        GgufError::Malformed(format!("{what}: an element beyond 2^63"))
                    })?);
                }
                MetaValue::Ints(v)
            }
            _ => {
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value_as(elem, key, what, depth + 1)?);
                }
                MetaValue::List(items)
            }
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
        let what = format!("value of '{key}'");
        self.value_as(ty, key, &what, depth)
    }

    fn value_as(&mut self, ty: u32, key: &str, what: &str, depth: u32) -> Result<MetaValue> {
        let mut fixed = |n: usize| -> Result<u64> {
            let mut b = [0u8; 8];
            self.exact(&mut b[..n], what)?;
            Ok(u64::from_le_bytes(b))
        };
        Ok(match ty {
            0 => MetaValue::UInt(fixed(1)?),
            1 => MetaValue::Int(fixed(1)? as u8 as i8 as i64),
            2 => MetaValue::UInt(fixed(2)?),
            3 => MetaValue::Int(fixed(2)? as u16 as i16 as i64),
            4 => MetaValue::UInt(fixed(4)?),
            5 => MetaValue::Int(fixed(4)? as u32 as i32 as i64),
            6 => MetaValue::Float(f32::from_bits(fixed(4)? as u32) as f64),
            7 => match fixed(1)? {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(GgufError::Malformed(format!("{what}: bool byte {b}"))),
            },
            8 => {
                let n = self.u64(what)?;
                capped_length(what, n, caps::MAX_STRING_LEN)?;
                if n > caps::MAX_KEPT_STRING && !self.full {
                    self.skip(n, what)?;
                    MetaValue::Str(String::new())
                } else {
                    self.fits(n, what)?;
                    let mut buf = vec![0u8; n as usize];
                    self.exact(&mut buf, what)?;
                    let s = String::from_utf8(buf)
                        .map_err(|_| GgufError::Malformed(format!("{what} is not UTF-8")))?;
                    MetaValue::Str(s)
                }
            }
            9 => {
                if depth >= caps::MAX_ARRAY_DEPTH {
                    return Err(GgufError::OverCap {
                        what: format!("array nesting of '{key}'"),
                        value: u64::from(depth + 1),
                        cap: u64::from(caps::MAX_ARRAY_DEPTH),
                    });
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                capped(&format!("length of array '{key}'"), n, caps::MAX_ARRAY_LEN)?;
                if self.full && KEPT_ARRAYS.contains(&key) {
                    // Every element takes at least a byte (a string its 8-byte length):
                    // a count the file cannot hold is refused before allocating for it.
                    let least = fixed_size(elem).unwrap_or(8);
                    self.fits(n.saturating_mul(least), what)?;
                    return self.kept_array(elem, n, key, what, depth);
                }
                match fixed_size(elem) {
                    Some(size) => self.skip(n.saturating_mul(size), what)?,
                    None if elem == 8 => {
                        self.fits(n.saturating_mul(8), what)?;
                        for _ in 0..n {
                            let len = self.u64(what)?;
                            capped_length(what, len, caps::MAX_STRING_LEN)?;
                            self.skip(len, what)?;
                        }
                    }
                    None if elem == 9 => {
                        for _ in 0..n {
                            self.value(9, key, depth + 1)?;
                        }
                    }
                    None => {
                        return Err(GgufError::Malformed(format!(
                            "{what}: unknown array element type {elem}"
                        )));
                    }
                }
                MetaValue::Array { len: n }
            }
            10 => MetaValue::UInt(fixed(8)?),
            11 => MetaValue::Int(fixed(8)? as i64),
            12 => MetaValue::Float(f64::from_bits(fixed(8)?)),
            other => {
                return Err(GgufError::Malformed(format!(
                    "{what}: unknown metadata type {other}"
                )));
            }
        })
    }

    fn tensor_info(&mut self) -> Result<TensorInfo> {
        let name = self.string("tensor name", caps::MAX_NAME_LEN)?;
        let n_dims = self.u32("tensor dimensions")?;
        if n_dims == 0 || n_dims > caps::MAX_DIMS {
            return Err(GgufError::Malformed(format!(
                "tensor '{name}' has {n_dims} dimensions (1 to {} allowed)",
                caps::MAX_DIMS
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut elements: u64 = 1;
        for _ in 0..n_dims {
            let d = self.u64("tensor dimensions")?;
            if d == 0 {
                return Err(GgufError::Malformed(format!(
                    "tensor '{name}' has a zero dimension"
                )));
            }
            elements = elements.checked_mul(d).ok_or_else(|| {
                GgufError::Malformed(format!("tensor '{name}' element count overflows"))
            })?;
            dims.push(d);
        }
        let type_id = self.u32("tensor type")?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            name: name.clone(),
            type_id,
        })?;
        if !dims[0].is_multiple_of(ggml_type.block_size()) {
            return Err(GgufError::Malformed(format!(
                "tensor '{name}' row of {} is not a multiple of the {ggml_type} block of {}",
                dims[0],
                ggml_type.block_size()
            )));
        }
        let bytes = (elements / ggml_type.block_size())
            .checked_mul(ggml_type.block_bytes())
            .ok_or_else(|| GgufError::Malformed(format!("tensor '{name}' size overflows")))?;
        let offset = self.u64("tensor offset")?;
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            elements,
            bytes,
        })
    }
}

/// Bytes per element of the fixed-size metadata types.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::GgufBuilder;
    use std::io::Cursor;

    /// The one helper: parse `bytes`, and compare the outcome's debug text with `expect`
    /// (`Ok(summary)` or the error message).
    fn check(bytes: Vec<u8>, expect: &str) {
        let len = bytes.len() as u64;
        let got = match inspect_reader(Cursor::new(bytes), len) {
            Ok(info) => format!(
                "ok arch={} quant={} params={} ctx={:?} tensors={}",
                info.architecture().unwrap_or("-"),
                info.quantization(),
                info.parameters(),
                info.context_length(),
                info.tensors.len()
            ),
            Err(e) => e.to_string(),
        };
        assert!(got.contains(expect), "expected {expect:?} in {got:?}");
    }

    #[test]
    fn valid_files_are_summarized() {
        check(
            GgufBuilder::llama_like().build(),
            "ok arch=llama quant=q4_1 params=",
        );
        check(
            GgufBuilder::llama_like().build(),
            "ctx=Some(2048) tensors=4",
        );
        let mut v2 = GgufBuilder::llama_like();
        v2.version = 2;
        check(v2.build(), "ok arch=llama");
    }

    #[test]
    fn quantization_is_the_declared_mix_or_the_dominant_layer_type() {
        let mut b = GgufBuilder::new("llama");
        b.tensor("token_embd.weight", &[256, 4096], 8);
        b.tensor("blk.0.norm", &[4096], 0);
        b.tensor("blk.0.big", &[256, 64], 12);
        b.tensor("blk.0.small", &[256, 8], 14);
        check(b.build(), "quant=q4_k ");
        b.kv_u32("general.file_type", 15);
        check(b.build(), "quant=q4_k_m ");
        b.kv_u32("general.file_type", 3); // a file type that contradicts the tensors is ignored
        check(b.build(), "quant=q4_k ");
    }

    #[test]
    fn a_model_read_whole_keeps_its_arrays_and_where_each_value_lies() {
        let bytes = GgufBuilder::tiny_llama()
            .kv_string_array("general.tags", &["a", "b"])
            .build();
        let path = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(path.path(), &bytes).unwrap();
        let info = read_model(&File::open(path.path()).unwrap()).unwrap();
        // Arrays the tokenizer does not read are skipped, as `inspect` does.
        assert_eq!(info.metadata["general.tags"], MetaValue::Array { len: 2 });
        let tokens = info.metadata["tokenizer.ggml.tokens"].as_strings().unwrap();
        assert_eq!(tokens.len(), 260);
        assert_eq!(tokens.get(257), Some("<|im_end|>"));
        assert_eq!(tokens.iter().nth(3), Some("\u{103}"));
        let types = info.metadata["tokenizer.ggml.token_type"]
            .as_ints()
            .unwrap();
        assert_eq!(types[256], 3);
        assert_eq!(types[0], 1);
        // The light read keeps only the length; both agree on it.
        let light = inspect(path.path()).unwrap();
        assert_eq!(
            light.metadata["tokenizer.ggml.tokens"],
            MetaValue::Array { len: 260 }
        );
        // Each span starts with its key, as a GGUF string.
        for (key, span) in &info.kv_spans {
            let at = span.start as usize;
            assert_eq!(
                &bytes[at..at + 8],
                (key.len() as u64).to_le_bytes(),
                "{key}"
            );
            assert_eq!(&bytes[at + 8..at + 8 + key.len()], key.as_bytes());
        }
        assert_eq!(info.kv_spans.len(), info.metadata.len());
    }

    #[test]
    fn hostile_arrays_are_refused_when_read_whole_too() {
        for (b, expect) in [
            (
                GgufBuilder::llama_like()
                    .raw_kv_array("tokenizer.ggml.scores", 6, u64::MAX)
                    .clone(),
                "above the cap",
            ),
            (
                GgufBuilder::llama_like()
                    .raw_kv_array("tokenizer.ggml.tokens", 8, 1 << 20)
                    .clone(),
                "truncated",
            ),
            (
                GgufBuilder::llama_like()
                    .raw_nested_arrays("tokenizer.ggml.merges", 3)
                    .clone(),
                "nesting",
            ),
        ] {
            let path = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(path.path(), b.build()).unwrap();
            let e = read_model(&File::open(path.path()).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect), "expected {expect:?} in {e:?}");
        }
    }

    #[test]
    fn non_gguf_is_refused() {
        check(b"PK\x03\x04 a zip file".to_vec(), "not a GGUF file");
        check(Vec::new(), "truncated GGUF: the file ends inside the magic");
    }

    #[test]
    fn unsupported_version_is_refused() {
        let mut b = GgufBuilder::llama_like();
        b.version = 1;
        check(b.build(), "unsupported GGUF version 1");
        b.version = 99;
        check(b.build(), "unsupported GGUF version 99");
    }

    #[test]
    fn truncation_anywhere_is_refused() {
        let bytes = GgufBuilder::llama_like().build();
        for cut in [3, 7, 15, 23, 40, 100, bytes.len() / 2, bytes.len() - 1] {
            let got = inspect_reader(Cursor::new(bytes[..cut].to_vec()), cut as u64);
            let err = got
                .expect_err("a truncated file must be refused")
                .to_string();
            assert!(
                err.contains("truncated") || err.contains("outside the file"),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn absurd_counts_are_refused_before_allocating() {
        let mut bytes = GgufBuilder::llama_like().build();
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        check(
            bytes.clone(),
            "tensor count is 18446744073709551615, above the cap",
        );
        let mut bytes = GgufBuilder::llama_like().build();
        bytes[16..24].copy_from_slice(&(caps::MAX_KV + 1).to_le_bytes());
        check(bytes, "metadata count is 65537, above the cap");
        // Within the cap but more than the file could hold.
        let mut bytes = GgufBuilder::llama_like().build();
        bytes[8..16].copy_from_slice(&60_000u64.to_le_bytes());
        check(
            bytes,
            "truncated GGUF: the file ends inside the tensor infos",
        );
    }

    #[test]
    fn absurd_lengths_are_refused() {
        let mut b = GgufBuilder::new("llama");
        b.raw_kv_string_len("general.name", u64::MAX);
        check(b.build(), "above the cap");
        let mut b = GgufBuilder::new("llama");
        b.raw_kv_string_len("general.name", 1 << 20);
        check(b.build(), "truncated GGUF");
        let mut b = GgufBuilder::new("llama");
        b.raw_kv_array("tokenizer.ggml.tokens", 8, u64::MAX);
        check(
            b.build(),
            "length of array 'tokenizer.ggml.tokens' is 18446744073709551615",
        );
        let mut b = GgufBuilder::new("llama");
        b.raw_kv_array("tokenizer.ggml.scores", 6, 1 << 20);
        check(b.build(), "truncated GGUF");
    }

    #[test]
    fn bad_tensors_are_refused() {
        let mut b = GgufBuilder::new("llama");
        b.tensor("t", &[32, 4], 77);
        check(b.build(), "unknown ggml tensor type 77 for tensor 't'");
        let mut b = GgufBuilder::new("llama");
        b.tensor("t", &[33, 4], 3);
        check(b.build(), "not a multiple of the q4_1 block");
        let mut b = GgufBuilder::new("llama");
        b.tensor("t", &[u64::MAX, u64::MAX], 0);
        check(b.build(), "element count overflows");
        let mut b = GgufBuilder::new("llama");
        b.tensor("t", &[1, 1, 1, 1, 1], 0);
        check(b.build(), "has 5 dimensions");
    }

    #[test]
    fn tensor_past_the_end_is_refused() {
        let mut b = GgufBuilder::llama_like();
        b.truncate_data_by = 1;
        check(b.build(), "lies outside the file");
        let mut b = GgufBuilder::llama_like();
        b.offset_override = Some((1, 1 << 40));
        check(b.build(), "lies outside the file");
    }

    #[test]
    fn misaligned_or_overlapping_tensors_are_refused() {
        let mut b = GgufBuilder::llama_like();
        b.offset_override = Some((1, 8));
        check(b.build(), "is not a multiple of the alignment 32");
        let mut b = GgufBuilder::llama_like();
        b.offset_override = Some((1, 0));
        check(b.build(), "overlaps tensor");
    }

    #[test]
    fn bad_alignment_is_refused() {
        let mut b = GgufBuilder::llama_like();
        b.kv_u32("general.alignment", 3);
        check(b.build(), "general.alignment 3 is not a power of two");
    }

    #[test]
    fn nested_arrays_are_capped() {
        let mut b = GgufBuilder::new("llama");
        b.raw_nested_arrays("deep", 5);
        check(b.build(), "array nesting of 'deep'");
    }
}
