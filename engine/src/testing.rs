//! Test support: GGUF files built in code, valid or deliberately hostile.
//!
//! Used by this crate's unit tests and by the end-to-end tests in `outpost-tests`; nothing in
//! the product calls it. Tensor data is a deterministic byte pattern, so two builds with the
//! same settings give the same bytes (and the same SHA-256).

/// Builds a GGUF file in memory. Fields left public are the knobs hostile tests turn.
#[derive(Clone, Debug)]
pub struct GgufBuilder {
    pub version: u32,
    /// Drop this many bytes from the end of the finished file.
    pub truncate_data_by: usize,
    /// Write tensor `index` with this data offset instead of the computed one.
    pub offset_override: Option<(usize, u64)>,
    /// Added to every byte of tensor data, so builds can differ in content only.
    pub salt: u8,
    kvs: Vec<(String, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32)>,
}

const ALIGN: u64 = 32;

impl GgufBuilder {
    /// An empty model of architecture `arch` (GGUF v3, no tensors).
    pub fn new(arch: &str) -> Self {
        let mut b = Self {
            version: 3,
            truncate_data_by: 0,
            offset_override: None,
            salt: 0,
            kvs: Vec::new(),
            tensors: Vec::new(),
        };
        b.kv_str("general.architecture", arch);
        b
    }

    /// A tiny llama-shaped model: q4_1 matrices, a q8_0 embedding, an f32 norm, a context
    /// length of 2048 and a three-token vocabulary.
    pub fn llama_like() -> Self {
        let mut b = Self::new("llama");
        b.kv_str("general.name", "tiny-llama");
        b.kv_u32("llama.context_length", 2048);
        b.kv_u32("llama.embedding_length", 64);
        b.kv_string_array("tokenizer.ggml.tokens", &["<s>", "</s>", "hello"]);
        b.tensor("token_embd.weight", &[64, 16], 8);
        b.tensor("blk.0.attn_q.weight", &[64, 64], 3);
        b.tensor("blk.0.ffn_down.weight", &[64, 128], 3);
        b.tensor("output_norm.weight", &[64], 0);
        b
    }

    fn set_kv(&mut self, key: &str, encoded: Vec<u8>) {
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = encoded,
            None => self.kvs.push((key.to_string(), encoded)),
        }
    }

    pub fn kv_u32(&mut self, key: &str, value: u32) -> &mut Self {
        let mut v = 4u32.to_le_bytes().to_vec();
        v.extend_from_slice(&value.to_le_bytes());
        self.set_kv(key, v);
        self
    }

    pub fn kv_str(&mut self, key: &str, value: &str) -> &mut Self {
        let mut v = 8u32.to_le_bytes().to_vec();
        put_str(&mut v, value);
        self.set_kv(key, v);
        self
    }

    pub fn kv_string_array(&mut self, key: &str, values: &[&str]) -> &mut Self {
        let mut v = 9u32.to_le_bytes().to_vec();
        v.extend_from_slice(&8u32.to_le_bytes());
        v.extend_from_slice(&(values.len() as u64).to_le_bytes());
        for s in values {
            put_str(&mut v, s);
        }
        self.set_kv(key, v);
        self
    }

    /// A string value whose declared length is `len` but whose bytes are missing.
    pub fn raw_kv_string_len(&mut self, key: &str, len: u64) -> &mut Self {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend_from_slice(&len.to_le_bytes());
        self.set_kv(key, v);
        self
    }

    /// An array of `len` elements of type `elem` whose contents are missing.
    pub fn raw_kv_array(&mut self, key: &str, elem: u32, len: u64) -> &mut Self {
        let mut v = 9u32.to_le_bytes().to_vec();
        v.extend_from_slice(&elem.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        self.set_kv(key, v);
        self
    }

    /// Arrays nested `depth` deep, each holding one array.
    pub fn raw_nested_arrays(&mut self, key: &str, depth: u32) -> &mut Self {
        let mut v = 9u32.to_le_bytes().to_vec();
        for _ in 1..depth {
            v.extend_from_slice(&9u32.to_le_bytes());
            v.extend_from_slice(&1u64.to_le_bytes());
        }
        v.extend_from_slice(&4u32.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes());
        self.set_kv(key, v);
        self
    }

    /// A tensor of ggml type `type_id` (0 = f32, 3 = q4_1, 8 = q8_0, 12 = q4_k, …).
    pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), type_id));
        self
    }

    /// The file's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            out.extend_from_slice(v);
        }
        let mut offset = 0u64;
        let mut data_len = 0u64;
        for (i, (name, dims, ty)) in self.tensors.iter().enumerate() {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            let at = match self.offset_override {
                Some((j, o)) if j == i => o,
                _ => offset,
            };
            out.extend_from_slice(&at.to_le_bytes());
            let bytes = tensor_bytes(dims, *ty);
            data_len = offset + bytes;
            offset = (offset + bytes).div_ceil(ALIGN) * ALIGN;
        }
        let data_start = (out.len() as u64).div_ceil(ALIGN) * ALIGN;
        out.resize(data_start as usize, 0);
        let salt = self.salt;
        out.extend((0..data_len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)));
        out.truncate(out.len().saturating_sub(self.truncate_data_by));
        out
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Bytes of a tensor's data; 0 for shapes the parser refuses anyway.
fn tensor_bytes(dims: &[u64], ty: u32) -> u64 {
    let Some(t) = crate::gguf::GgmlType::from_id(ty) else {
        return 0;
    };
    dims.iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|n| *n <= 1 << 32)
        .map_or(0, |n| n / t.block_size() * t.block_bytes())
}
