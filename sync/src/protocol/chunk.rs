//! Blob transfer on the wire: the chunk request (JSON, device → hub on
//! `devices/{id}/blobs/get`) and the binary chunk frame (hub → device on `devices/{id}/blobs`).
//! Pure data, no I/O.
//!
//! Chunk frame, version 1 (all integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `OPCF` |
//! | 1 | frame version, 1 |
//! | 1 | kind: 0 = chunk, 1 = refusal |
//! | 8 | request id (the [`ChunkRequest`]'s `id`) |
//! | 32 | SHA-256 of the whole blob, raw |
//! | 8 | offset in the blob |
//! | 4 | body length |
//! | n | body: the chunk's bytes, or for a refusal a UTF-8 reason (at most [`MAX_REFUSAL_LEN`]) |
//!
//! [`ChunkFrame::parse`] refuses, before it allocates: a frame shorter than the header or
//! longer than [`MAX_FRAME_BYTES`], another magic or version, an unknown kind, a body length
//! that disagrees with the bytes present or exceeds [`MAX_CHUNK_BYTES`] (a refusal's, its own
//! cap), a refusal whose reason is not UTF-8. The body is borrowed, never copied.

use serde::{Deserialize, Serialize};

use super::{Message, ProtocolError, V1};

/// The frame's first four bytes.
pub const FRAME_MAGIC: &[u8; 4] = b"OPCF";
/// This frame version.
pub const FRAME_VERSION: u8 = 1;
/// Header length in bytes.
pub const FRAME_HEADER: usize = 4 + 1 + 1 + 8 + 32 + 8 + 4;
/// Largest chunk a frame carries: the links' 256 KiB packet limit, less room for the topic
/// and the header. A manifest's `chunk_size` must not exceed it.
pub const MAX_CHUNK_BYTES: usize = 255 * 1024;
/// Largest whole frame.
pub const MAX_FRAME_BYTES: usize = FRAME_HEADER + MAX_CHUNK_BYTES;
/// Longest refusal reason.
pub const MAX_REFUSAL_LEN: usize = 512;
/// Largest chunk request payload.
pub const MAX_CHUNK_REQUEST_BYTES: usize = 512;

/// `devices/{id}/blobs/get`: one chunk of a published blob. The hub answers on
/// `devices/{id}/blobs` with a frame carrying the same `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRequest {
    pub v: V1,
    /// Chosen by the device; echoed in the answer.
    pub id: u64,
    /// Lowercase hex SHA-256 of the whole blob.
    pub sha256: String,
    pub offset: u64,
    pub length: u64,
}

impl Message for ChunkRequest {
    const KIND: &'static str = "chunk request";
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameBody<'a> {
    /// The bytes at `offset`.
    Chunk(&'a [u8]),
    /// The hub will not serve this request (unknown blob, bad range): why.
    Refused(&'a str),
}

/// One chunk frame, read from or to be written to the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkFrame<'a> {
    pub request_id: u64,
    pub sha256: [u8; 32],
    pub offset: u64,
    pub body: FrameBody<'a>,
}

fn bad(reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        kind: "chunk frame",
        reason: reason.into(),
    }
}

/// Lowercase hex of 32 bytes, or `None` when `s` is not exactly that.
pub fn digest_bytes(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

impl<'a> ChunkFrame<'a> {
    /// Reads a frame from untrusted bytes (see the module header for what is refused).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ProtocolError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(ProtocolError::TooLarge {
                kind: "chunk frame",
                len: bytes.len(),
                max: MAX_FRAME_BYTES,
            });
        }
        if bytes.len() < FRAME_HEADER {
            return Err(bad(format!(
                "{} bytes is shorter than the {FRAME_HEADER}-byte header",
                bytes.len()
            )));
        }
        let (head, body) = bytes.split_at(FRAME_HEADER);
        if &head[0..4] != FRAME_MAGIC {
            return Err(bad("not a chunk frame (magic)"));
        }
        if head[4] != FRAME_VERSION {
            return Err(ProtocolError::UnknownVersion {
                kind: "chunk frame",
                found: u64::from(head[4]),
            });
        }
        let kind = head[5];
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let request_id = u64_at(6);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&head[14..46]);
        let offset = u64_at(46);
        let mut len = [0u8; 4];
        len.copy_from_slice(&head[54..58]);
        let len = u32::from_be_bytes(len) as usize;
        if len != body.len() {
            return Err(bad(format!(
                "the header says {len} body bytes, {} follow",
                body.len()
            )));
        }
        let body = match kind {
            0 => FrameBody::Chunk(body),
            1 if len > MAX_REFUSAL_LEN => {
                return Err(bad(format!("a refusal of {len} bytes")));
            }
            1 => FrameBody::Refused(
                std::str::from_utf8(body).map_err(|_| bad("a refusal that is not UTF-8"))?,
            ),
            k => return Err(bad(format!("unknown kind {k}"))),
        };
        if offset.checked_add(len as u64).is_none() {
            return Err(bad("offset + length overflows"));
        }
        Ok(Self {
            request_id,
            sha256,
            offset,
            body,
        })
    }

    /// The frame's bytes; a body over its cap is refused (a refusal's reason is cut to
    /// [`MAX_REFUSAL_LEN`] at a character boundary instead).
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let (kind, body): (u8, &[u8]) = match self.body {
            FrameBody::Chunk(b) => {
                if b.len() > MAX_CHUNK_BYTES {
                    return Err(ProtocolError::TooLarge {
                        kind: "chunk frame",
                        len: b.len(),
                        max: MAX_CHUNK_BYTES,
                    });
                }
                (0, b)
            }
            FrameBody::Refused(r) => {
                let mut end = r.len().min(MAX_REFUSAL_LEN);
                while !r.is_char_boundary(end) {
                    end -= 1;
                }
                (1, &r.as_bytes()[..end])
            }
        };
        let mut out = Vec::with_capacity(FRAME_HEADER + body.len());
        out.extend_from_slice(FRAME_MAGIC);
        out.push(FRAME_VERSION);
        out.push(kind);
        out.extend_from_slice(&self.request_id.to_be_bytes());
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        Ok(out)
    }
}

/// How one download stands, as the device reports it in `state/reported` (`transfer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferReport {
    pub rollout: u64,
    /// `name:version`.
    pub model: String,
    pub sha256: String,
    /// `downloading`, `staged` (verified whole and installed in the registry) or `failed`.
    pub state: String,
    pub chunks_done: u64,
    pub chunks_total: u64,
    /// Why it failed (or waits: no disk space, the hub refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::protocol::decode;

    /// Parses `bytes` and describes the outcome in one line.
    fn check(bytes: &[u8], expect: &str) {
        let got = match ChunkFrame::parse(bytes) {
            Ok(f) => {
                let body = match f.body {
                    FrameBody::Chunk(b) => format!("chunk {} bytes", b.len()),
                    FrameBody::Refused(r) => format!("refused {r:?}"),
                };
                format!(
                    "ok: id {} sha {:02x}.. offset {} {body}",
                    f.request_id, f.sha256[0], f.offset
                )
            }
            Err(e) => format!("err: {e}"),
        };
        assert_eq!(got, expect);
    }

    fn frame(body: FrameBody<'_>) -> Vec<u8> {
        ChunkFrame {
            request_id: 7,
            sha256: [0xab; 32],
            offset: 65536,
            body,
        }
        .encode()
        .unwrap()
    }

    #[test]
    fn frames_round_trip() {
        let data = vec![5u8; 1000];
        let bytes = frame(FrameBody::Chunk(&data));
        assert_eq!(bytes.len(), FRAME_HEADER + 1000);
        check(&bytes, "ok: id 7 sha ab.. offset 65536 chunk 1000 bytes");
        assert_eq!(
            ChunkFrame::parse(&bytes).unwrap().body,
            FrameBody::Chunk(&data[..])
        );
        check(
            &frame(FrameBody::Refused("no such blob")),
            "ok: id 7 sha ab.. offset 65536 refused \"no such blob\"",
        );
        check(
            &frame(FrameBody::Chunk(&[])),
            "ok: id 7 sha ab.. offset 65536 chunk 0 bytes",
        );
        let max = vec![0u8; MAX_CHUNK_BYTES];
        check(
            &frame(FrameBody::Chunk(&max)),
            &format!("ok: id 7 sha ab.. offset 65536 chunk {MAX_CHUNK_BYTES} bytes"),
        );
        // A long refusal is cut at a character boundary.
        let long = "é".repeat(MAX_REFUSAL_LEN);
        let f = frame(FrameBody::Refused(&long));
        assert_eq!(f.len(), FRAME_HEADER + MAX_REFUSAL_LEN);
        assert!(ChunkFrame::parse(&f).is_ok());
    }

    #[test]
    fn hostile_frames_are_refused() {
        let good = frame(FrameBody::Chunk(&[1, 2, 3]));
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            b
        };
        check(
            &[],
            "err: chunk frame message is malformed: 0 bytes is shorter than the 58-byte header",
        );
        check(
            &good[..FRAME_HEADER - 1],
            "err: chunk frame message is malformed: 57 bytes is shorter than the 58-byte header",
        );
        check(
            &with(&|b| b[0] = b'X'),
            "err: chunk frame message is malformed: not a chunk frame (magic)",
        );
        check(
            &with(&|b| b[4] = 2),
            "err: chunk frame message has schema version 2; this outpost knows version 1",
        );
        check(
            &with(&|b| b[5] = 9),
            "err: chunk frame message is malformed: unknown kind 9",
        );
        // Length fields that lie, both ways, and one claiming 4 GiB.
        check(
            &with(&|b| b[57] = 4),
            "err: chunk frame message is malformed: the header says 4 body bytes, 3 follow",
        );
        check(
            &with(&|b| {
                b.pop();
            }),
            "err: chunk frame message is malformed: the header says 3 body bytes, 2 follow",
        );
        check(
            &with(&|b| b[54..58].copy_from_slice(&[0xff; 4])),
            "err: chunk frame message is malformed: the header says 4294967295 body bytes, 3 follow",
        );
        check(
            &with(&|b| b[46..54].copy_from_slice(&[0xff; 8])),
            "err: chunk frame message is malformed: offset + length overflows",
        );
        check(
            &with(&|b| {
                b[5] = 1;
                b[FRAME_HEADER] = 0xff;
            }),
            "err: chunk frame message is malformed: a refusal that is not UTF-8",
        );
        let too_big = vec![0u8; MAX_FRAME_BYTES + 1];
        check(
            &too_big,
            &format!(
                "err: chunk frame message of {} bytes is over the limit of {MAX_FRAME_BYTES} bytes",
                MAX_FRAME_BYTES + 1
            ),
        );
        let mut long_refusal = good[..FRAME_HEADER].to_vec();
        long_refusal[5] = 1;
        long_refusal[54..58].copy_from_slice(&600u32.to_be_bytes());
        long_refusal.extend(std::iter::repeat_n(b'a', 600));
        check(
            &long_refusal,
            "err: chunk frame message is malformed: a refusal of 600 bytes",
        );
        // Too large a chunk is never encoded.
        let big = vec![0u8; MAX_CHUNK_BYTES + 1];
        assert!(
            ChunkFrame {
                request_id: 1,
                sha256: [0; 32],
                offset: 0,
                body: FrameBody::Chunk(&big)
            }
            .encode()
            .is_err()
        );
    }

    #[test]
    fn chunk_requests_decode_strictly() {
        let sha = "a".repeat(64);
        let ok = format!(r#"{{"v":1,"id":3,"sha256":"{sha}","offset":0,"length":10}}"#);
        let r: ChunkRequest = decode(ok.as_bytes(), MAX_CHUNK_REQUEST_BYTES).unwrap();
        assert_eq!((r.id, r.offset, r.length), (3, 0, 10));
        for (bad, why) in [
            (ok.replace("\"v\":1", "\"v\":2"), "schema version 2"),
            (ok.replace("}", ",\"x\":1}"), "unknown field"),
            (ok.replace("\"id\":3", "\"id\":-3"), "invalid value"),
            (format!("{ok}{}", " ".repeat(600)), "over the limit"),
        ] {
            let e = decode::<ChunkRequest>(bad.as_bytes(), MAX_CHUNK_REQUEST_BYTES).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        assert_eq!(digest_bytes(&sha), Some([0xaa; 32]));
        for bad in ["", "AA", &"A".repeat(64), &"a".repeat(63), &"g".repeat(64)] {
            assert_eq!(digest_bytes(bad), None, "{bad}");
        }
    }
}
