//! The vocabulary: every token's text in one buffer (the GGUF reader's [`StrList`]), found by
//! text through an open-addressing hash table of ids: no heap allocation per token, where a
//! map of owned strings took one each.

use super::TokenizerError;
use crate::gguf::StrList;

const EMPTY: u32 = u32::MAX;

/// Longest probe an insert may take. At most half full, a probe is a few slots long; a
/// vocabulary made to collide (the file comes from outside) is refused instead of taking
/// quadratic time to index.
const MAX_PROBE: usize = 4096;

/// FNV-1a over the parts as if concatenated, from a per-vocabulary random `seed` (so that
/// colliding tokens cannot be chosen in advance), then a final mix so that the low bits the
/// table indexes with depend on every byte.
fn hash(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Whether `token` is the concatenation of `parts`.
fn equals(token: &[u8], parts: &[&[u8]]) -> bool {
    let mut rest = token;
    for p in parts {
        match rest.strip_prefix(*p) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

pub(super) struct Vocab {
    /// Token `i`'s text is the `i`-th string.
    tokens: StrList,
    /// Token ids by hash; a power of two long, at most half full.
    slots: Vec<u32>,
    seed: u64,
}

impl Vocab {
    /// The vocabulary of `tokens`, token `i` being the `i`-th. Where two tokens have the same
    /// text, the text finds the later one.
    pub fn new(tokens: StrList) -> Result<Self, TokenizerError> {
        let n = tokens.len();
        if n >= EMPTY as usize {
            return Err(TokenizerError::TooLarge);
        }
        let mut v = Self {
            tokens,
            slots: vec![EMPTY; (n * 2).next_power_of_two().max(16)],
            seed: std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                n,
            ),
        };
        for id in 0..n as u32 {
            v.insert(id)?;
        }
        Ok(v)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Bytes of the longest token's text.
    pub fn longest(&self) -> usize {
        self.tokens.iter().map(str::len).max().unwrap_or(0)
    }

    /// The text of token `id`.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize)
    }

    fn bytes(&self, id: u32) -> &[u8] {
        self.token(id).map(str::as_bytes).unwrap_or_default()
    }

    fn insert(&mut self, id: u32) -> Result<(), TokenizerError> {
        let mask = self.slots.len() - 1;
        let key = self.bytes(id);
        let mut i = hash(self.seed, &[key]) as usize & mask;
        for _ in 0..MAX_PROBE {
            let there = self.slots[i];
            if there == EMPTY || self.bytes(there) == key {
                self.slots[i] = id;
                return Ok(());
            }
            i = (i + 1) & mask;
        }
        Err(TokenizerError::Colliding)
    }

    fn find(&self, parts: &[&[u8]]) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = hash(self.seed, parts) as usize & mask;
        // Every token sits within `MAX_PROBE` slots of its hash's (`insert`).
        for _ in 0..MAX_PROBE {
            let id = self.slots[i];
            if id == EMPTY {
                return None;
            }
            if equals(self.bytes(id), parts) {
                return Some(id);
            }
            i = (i + 1) & mask;
        }
        None
    }

    /// The token whose text is `s`.
    pub fn id(&self, s: &str) -> Option<u32> {
        self.find(&[s.as_bytes()])
    }

    /// The token whose text is `a` followed by `b` (without building the string).
    pub fn id2(&self, a: &str, b: &str) -> Option<u32> {
        self.find(&[a.as_bytes(), b.as_bytes()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_token_by_its_text_and_later_duplicates_win() {
        let words: Vec<String> = (0..5000).map(|i| format!("w{i}")).collect();
        let mut all: Vec<&str> = words.iter().map(String::as_str).collect();
        all.extend(["", "é", "w7"]);
        let v = Vocab::new(all.iter().copied().collect()).unwrap();
        assert_eq!(v.len(), 5003);
        for (i, w) in words.iter().enumerate() {
            assert_eq!(v.token(i as u32), Some(w.as_str()));
            if w != "w7" {
                assert_eq!(v.id(w), Some(i as u32), "{w}");
            }
        }
        assert_eq!(v.id("w7"), Some(5002), "the later duplicate");
        assert_eq!(v.id(""), Some(5000));
        assert_eq!(v.id("é"), Some(5001));
        assert_eq!(v.id2("w4", "99"), Some(499));
        assert_eq!(v.id2("w", "499"), Some(499));
        assert_eq!(v.id2("w49", "9x"), None);
        assert_eq!(v.id("w5000"), None);
        assert_eq!(v.token(5003), None);
    }
}
