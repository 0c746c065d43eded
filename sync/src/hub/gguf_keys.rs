//! The two GGUF header keys a manifest names: `general.architecture` and
//! `general.file_type` (as llama.cpp's quantization name).
//!
//! Why not `outpost_engine::gguf`: sync must not depend on the engine (DESIGN.md's dependency
//! direction, held by `tests/tests/e2e/architecture.rs`). This reader does much less than
//! the engine's: it walks the metadata key/value pairs (skipping values it does not need,
//! with the same kind of caps before anything is allocated) and stops at the two keys. It
//! does not validate tensors; the device's registry does that when it installs the file.

use std::io::{BufRead, BufReader, Read, Seek};
use std::path::Path;

/// Most metadata pairs read.
const MAX_KV: u64 = 1 << 16;
/// Longest key or kept string.
const MAX_STRING: u64 = 1 << 16;
/// Longest string skipped.
const MAX_SKIPPED_STRING: u64 = 1 << 24;
/// Most array elements.
const MAX_ARRAY: u64 = 1 << 24;

/// What the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderKeys {
    pub architecture: String,
    /// llama.cpp's name for `general.file_type` (`q8_0`, `q4_k_m`, …); `file_type_N` for a
    /// number this reader does not name, `unknown` when the key is absent.
    pub quantization: String,
}

/// Reads the header of the GGUF file at `path`.
pub fn read(path: &Path) -> Result<HeaderKeys, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    read_from(BufReader::with_capacity(1 << 16, file))
}

fn read_from<R: BufRead + Seek>(mut r: R) -> Result<HeaderKeys, String> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)
        .map_err(|_| "too short for a GGUF header".to_string())?;
    if &magic != b"GGUF" {
        return Err("not a GGUF file (no GGUF magic)".into());
    }
    let version = u32_le(&mut r)?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2 or 3)"));
    }
    let _tensors = u64_le(&mut r)?;
    let n_kv = u64_le(&mut r)?;
    if n_kv > MAX_KV {
        return Err(format!(
            "{n_kv} metadata pairs is over the limit of {MAX_KV}"
        ));
    }
    let (mut arch, mut ftype) = (None, None);
    for _ in 0..n_kv {
        let key = string(&mut r, MAX_STRING)?;
        let ty = u32_le(&mut r)?;
        match key.as_str() {
            "general.architecture" if ty == 8 => arch = Some(string(&mut r, MAX_STRING)?),
            "general.file_type" if matches!(ty, 4 | 5) => ftype = Some(u64::from(u32_le(&mut r)?)),
            _ => skip(&mut r, ty, 0)?,
        }
        if arch.is_some() && ftype.is_some() {
            break;
        }
    }
    let architecture = arch.ok_or("no general.architecture in the GGUF header")?;
    let quantization = match ftype {
        None => "unknown".into(),
        Some(n) => file_type_name(n).map_or_else(|| format!("file_type_{n}"), str::to_string),
    };
    Ok(HeaderKeys {
        architecture,
        quantization,
    })
}

fn u32_le(r: &mut impl Read) -> Result<u32, String> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)
        .map_err(|_| "the GGUF header ends early".to_string())?;
    Ok(u32::from_le_bytes(b))
}

fn u64_le(r: &mut impl Read) -> Result<u64, String> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)
        .map_err(|_| "the GGUF header ends early".to_string())?;
    Ok(u64::from_le_bytes(b))
}

fn string(r: &mut impl Read, max: u64) -> Result<String, String> {
    let n = u64_le(r)?;
    if n > max {
        return Err(format!(
            "a GGUF string of {n} bytes is over the limit of {max}"
        ));
    }
    let mut b = vec![0u8; n as usize];
    r.read_exact(&mut b)
        .map_err(|_| "the GGUF header ends early".to_string())?;
    String::from_utf8(b).map_err(|_| "a GGUF string is not UTF-8".to_string())
}

/// Skips a value of type `ty`.
fn skip<R: Read + Seek>(r: &mut R, ty: u32, depth: u32) -> Result<(), String> {
    let fixed = |ty| match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    };
    let seek = |r: &mut R, n: u64| {
        let n = i64::try_from(n).map_err(|_| "a GGUF value is too long".to_string())?;
        r.seek_relative(n)
            .map_err(|_| "the GGUF header ends early".to_string())
    };
    if let Some(size) = fixed(ty) {
        return seek(r, size);
    }
    match ty {
        8 => {
            let n = u64_le(r)?;
            if n > MAX_SKIPPED_STRING {
                return Err(format!("a GGUF string of {n} bytes is too long"));
            }
            seek(r, n)
        }
        9 if depth < 2 => {
            let elem = u32_le(r)?;
            let count = u64_le(r)?;
            if count > MAX_ARRAY {
                return Err(format!("a GGUF array of {count} elements is too long"));
            }
            match fixed(elem) {
                Some(size) => seek(r, size * count),
                None => (0..count).try_for_each(|_| skip(r, elem, depth + 1)),
            }
        }
        9 => Err("GGUF arrays nest too deep".into()),
        t => Err(format!("unknown GGUF value type {t}")),
    }
}

/// llama.cpp's `llama_ftype` names (the common ones).
fn file_type_name(ftype: u64) -> Option<&'static str> {
    const NAMES: &[(u64, &str)] = &[
        (0, "f32"),
        (1, "f16"),
        (2, "q4_0"),
        (3, "q4_1"),
        (7, "q8_0"),
        (8, "q5_0"),
        (9, "q5_1"),
        (10, "q2_k"),
        (11, "q3_k_s"),
        (12, "q3_k_m"),
        (13, "q3_k_l"),
        (14, "q4_k_s"),
        (15, "q4_k_m"),
        (16, "q5_k_s"),
        (17, "q5_k_m"),
        (18, "q6_k"),
        (32, "bf16"),
    ];
    NAMES.iter().find(|(n, _)| *n == ftype).map(|(_, s)| *s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn kv_string(out: &mut Vec<u8>, key: &str, value: &str) {
        out.extend((key.len() as u64).to_le_bytes());
        out.extend(key.as_bytes());
        out.extend(8u32.to_le_bytes());
        out.extend((value.len() as u64).to_le_bytes());
        out.extend(value.as_bytes());
    }

    type Kv<'a> = &'a dyn Fn(&mut Vec<u8>);

    fn header(kvs: &[Kv<'_>]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend((kvs.len() as u64).to_le_bytes());
        for kv in kvs {
            kv(&mut out);
        }
        out
    }

    fn parse(bytes: Vec<u8>) -> Result<HeaderKeys, String> {
        read_from(std::io::Cursor::new(bytes))
    }

    #[test]
    fn keys_are_found_after_values_of_every_kind() {
        let tokens = |o: &mut Vec<u8>| {
            let key = "tokenizer.ggml.tokens";
            o.extend((key.len() as u64).to_le_bytes());
            o.extend(key.as_bytes());
            o.extend(9u32.to_le_bytes());
            o.extend(8u32.to_le_bytes());
            o.extend(2u64.to_le_bytes());
            for t in ["<s>", "hello"] {
                o.extend((t.len() as u64).to_le_bytes());
                o.extend(t.as_bytes());
            }
        };
        let scores = |o: &mut Vec<u8>| {
            let key = "tokenizer.ggml.scores";
            o.extend((key.len() as u64).to_le_bytes());
            o.extend(key.as_bytes());
            o.extend(9u32.to_le_bytes());
            o.extend(6u32.to_le_bytes());
            o.extend(2u64.to_le_bytes());
            o.extend([0u8; 8]);
        };
        let ftype = |o: &mut Vec<u8>| {
            let key = "general.file_type";
            o.extend((key.len() as u64).to_le_bytes());
            o.extend(key.as_bytes());
            o.extend(4u32.to_le_bytes());
            o.extend(7u32.to_le_bytes());
        };
        let bytes = header(&[
            &|o: &mut Vec<u8>| kv_string(o, "general.name", "x"),
            &tokens,
            &scores,
            &ftype,
            &|o: &mut Vec<u8>| kv_string(o, "general.architecture", "llama"),
        ]);
        assert_eq!(
            parse(bytes).unwrap(),
            HeaderKeys {
                architecture: "llama".into(),
                quantization: "q8_0".into()
            }
        );
        let only_arch = header(&[&|o: &mut Vec<u8>| kv_string(o, "general.architecture", "qwen2")]);
        assert_eq!(parse(only_arch).unwrap().quantization, "unknown");
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(
            parse(b"GGU".to_vec()).unwrap_err(),
            "too short for a GGUF header"
        );
        assert_eq!(
            parse(b"GGML\x03\0\0\0".to_vec()).unwrap_err(),
            "not a GGUF file (no GGUF magic)"
        );
        let mut v1 = header(&[]);
        v1[4] = 1;
        assert_eq!(
            parse(v1).unwrap_err(),
            "GGUF version 1 is not supported (2 or 3)"
        );
        assert_eq!(
            parse(header(&[])).unwrap_err(),
            "no general.architecture in the GGUF header"
        );
        let mut truncated =
            header(&[&|o: &mut Vec<u8>| kv_string(o, "general.architecture", "llama")]);
        truncated.truncate(truncated.len() - 2);
        assert_eq!(parse(truncated).unwrap_err(), "the GGUF header ends early");
        let mut huge = header(&[]);
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(huge).unwrap_err().contains("over the limit"));
    }
}
