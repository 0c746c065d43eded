#!/usr/bin/env python3
"""Verify an Outpost audit export on your own, with Python's standard library only.

Usage:
    python3 verify_audit.py EXPORT.jsonl [--public-key DEVICE.pub.pem | --public-key HEX]

Checks, as docs/audit-format.md describes:
  1. every record's hash is SHA-256 over the RFC 8785 (JCS) form of the record without "hash";
  2. seqs are contiguous and each prev_hash is the previous record's hash (64 zeros at seq 1);
  3. every checkpoint's Ed25519 signature over JCS({device_id, hash, seq, ts}) holds under
     the key in use, and its hash is the hash of the record it names, which the export holds
     (none lies beyond the last record or before the first);
  4. with --public-key, at least one checkpoint covers the records.
Without --public-key the key in the export's header is trusted, and the output says so.
Records after the last checkpoint are not signed: the output says how far signatures reach.
Exit status: 0 when everything holds, 1 naming the first bad seq, 2 for unusable input.
"""

import base64
import hashlib
import json
import math
import sys

GENESIS = "0" * 64

# ---------------------------------------------------------------- RFC 8785 (JCS)


def jcs(value):
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return es_number(value)
    if isinstance(value, str):
        return jcs_string(value)
    if isinstance(value, list):
        return "[" + ",".join(jcs(v) for v in value) + "]"
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: k.encode("utf-16-be"))
        return "{" + ",".join(jcs_string(k) + ":" + jcs(value[k]) for k in keys) + "}"
    raise ValueError(f"not JSON: {value!r}")


def jcs_string(s):
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\f":
            out.append("\\f")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20:
            out.append("\\u%04x" % code)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def es_number(x):
    """ECMAScript Number.prototype.toString, as RFC 8785 requires for numbers."""
    if math.isnan(x) or math.isinf(x):
        raise ValueError("NaN and Infinity are not JSON")
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    mantissa, _, exp = repr(abs(x)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    # n: position of the decimal point relative to the first significant digit
    n = len(whole.lstrip("0")) if whole.strip("0") else -(len(frac) - len(frac.lstrip("0")))
    n += int(exp or 0)
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        body = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        body = digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if e > 0 else "-") + str(abs(e))
    return sign + body


# ---------------------------------------------------------------- Ed25519 (RFC 8032)

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)


def _x_from_y(y, sign):
    if y >= P:
        return None
    xx = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    if xx == 0:
        return None if sign else 0
    x = pow(xx, (P + 3) // 8, P)
    if (x * x - xx) % P:
        x = x * SQRT_M1 % P
    if (x * x - xx) % P:
        return None
    if x & 1 != sign:
        x = P - x
    return x


def _decode_point(b):
    if len(b) != 32:
        return None
    y = int.from_bytes(b, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _x_from_y(y, sign)
    return None if x is None else (x, y, 1, x * y % P)


def _add(a, b):
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % P
    bb = (y1 + x1) * (y2 + x2) % P
    cc = 2 * t1 * t2 * D % P
    dd = 2 * z1 * z2 % P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _mul(s, point):
    acc = (0, 1, 1, 0)
    while s:
        if s & 1:
            acc = _add(acc, point)
        point = _add(point, point)
        s >>= 1
    return acc


def _same(a, b):
    return (a[0] * b[2] - b[0] * a[2]) % P == 0 and (a[1] * b[2] - b[1] * a[2]) % P == 0


_BY = 4 * pow(5, P - 2, P) % P
BASE = (_x_from_y(_BY, 0), _BY, 1, _x_from_y(_BY, 0) * _BY % P)


def ed25519_verify(public, message, signature):
    if len(public) != 32 or len(signature) != 64:
        return False
    a = _decode_point(public)
    r = _decode_point(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % L
    return _same(_mul(s, BASE), _add(r, _mul(h, a)))


def load_public_key(arg):
    if len(arg) == 64 and all(c in "0123456789abcdefABCDEF" for c in arg):
        return bytes.fromhex(arg)
    with open(arg, encoding="ascii") as f:
        body = "".join(line.strip() for line in f if not line.startswith("-----"))
    der = base64.b64decode(body)
    prefix = bytes.fromhex("302a300506032b6570032100")  # SPKI header of an Ed25519 key
    if len(der) != 44 or not der.startswith(prefix):
        raise SystemExit(f"error: {arg} is not an Ed25519 public key (SPKI PEM)")
    return der[len(prefix):]


# ---------------------------------------------------------------- the checks


def verify(path, pinned):
    records, checkpoints, header = [], [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if "record" in obj:
                records.append(obj["record"])
            elif "checkpoint" in obj:
                checkpoints.append(obj["checkpoint"])
            elif "device" in obj:
                header = obj["device"]
            else:
                raise SystemExit(f"error: line {n} is not a record, checkpoint or header")
    key = pinned
    key_source = "the pinned key"
    if key is None:
        key = bytes.fromhex(header["public_key"]) if header.get("public_key") else None
        key_source = "the export's own header (pass --public-key to pin one)"

    hashes = {}
    prev, expected = None, None
    for r in records:
        seq = r["seq"]
        if expected is None:
            # An export of a time range starts anywhere; seq 1 links to the genesis hash.
            expected, prev = (seq, r["prev_hash"]) if seq > 1 else (1, GENESIS)
        if seq != expected:
            return expected, f"record {expected} is missing (deleted)" if seq > expected else f"record {seq} is out of order"
        if r["prev_hash"] != prev:
            return seq, f"record {seq} does not link to record {seq - 1}"
        body = {k: v for k, v in r.items() if k != "hash"}
        digest = hashlib.sha256(jcs(body).encode("utf-8")).hexdigest()
        if digest != r["hash"]:
            return seq, f"record {seq} does not match its hash (edited)"
        hashes[seq] = r["hash"]
        prev, expected = r["hash"], seq + 1
    first = records[0]["seq"] if records else None
    last = expected - 1 if expected else 0
    signed_through = None
    for c in sorted(checkpoints, key=lambda c: c["seq"]):
        seq = c["seq"]
        if seq > last:
            return last + 1, f"records end at seq {last}, but checkpoint {seq} was signed over more (truncated)"
        signer = bytes.fromhex(c["public_key"])
        if key is not None and signer != key:
            return seq, f"checkpoint {seq} is signed by another key"
        message = jcs({"device_id": c["device_id"], "hash": c["hash"], "seq": seq, "ts": c["ts"]})
        if key is None or not ed25519_verify(key, message.encode("utf-8"), bytes.fromhex(c["signature"])):
            return seq, f"checkpoint {seq} has a bad signature (forged)"
        if seq not in hashes:
            # An export carries only the checkpoints inside its range: records were cut.
            return seq, f"record {seq} is missing (deleted): checkpoint {seq} signs it, but the records start at seq {first}"
        if hashes[seq] != c["hash"]:
            return seq, f"record {seq} differs from its signed checkpoint (rewritten)"
        signed_through = seq
    if pinned is not None and records and signed_through is None:
        return first, ("no checkpoint covers these records, so nothing here is signed by the "
                       "pinned key (checkpoints removed?)")
    if signed_through is None:
        reach = "no record is covered by a checkpoint"
    elif signed_through < last:
        reach = f"signed through seq {signed_through}; records after it are not covered by a checkpoint yet"
    else:
        reach = f"signed through seq {signed_through}"
    print(f"OK: {len(records)} records (seq {first} to {last}), {len(checkpoints)} checkpoints, "
          f"{reach}; signatures checked against {key_source}.")
    return None


def main(argv):
    args = argv[1:]
    pinned = None
    if "--public-key" in args:
        i = args.index("--public-key")
        if i + 1 >= len(args):
            raise SystemExit("error: --public-key needs a value")
        pinned = load_public_key(args[i + 1])
        del args[i:i + 2]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        bad = verify(args[0], pinned)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: cannot read {args[0]}: {e}", file=sys.stderr)
        return 2
    if bad:
        print(f"FAILED at seq {bad[0]}: {bad[1]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
