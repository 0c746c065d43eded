//! RFC 8785 JSON canonicalization (JCS): the only module that knows the canonicalizer crate.

use serde::Serialize;

/// The canonical JSON text of `value`.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, serde_json::Error> {
    serde_json_canonicalizer::to_string(value)
}

/// Appends `s` as a JCS string literal (quotes included) to `out`.
pub fn push_str(out: &mut String, s: &str) {
    out.push('"');
    // Most strings need no escaping: copy them whole.
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{0c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_escape_as_the_canonicalizer_does() {
        for s in [
            "plain",
            "quote\" back\\",
            "ctl \u{1} \u{1f} \n\t\r\u{8}\u{c}",
            "é ü 💡 \u{2028}",
        ] {
            let mut ours = String::new();
            push_str(&mut ours, s);
            assert_eq!(ours, to_string(&s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn keys_sort_and_numbers_print_as_rfc_8785_says() {
        let v = serde_json::json!({"b": 1, "a": [1.5, 1e21, 0.000001, -0.0], "é": null, "A": true});
        assert_eq!(
            to_string(&v).unwrap(),
            r#"{"A":true,"a":[1.5,1e+21,0.000001,0],"b":1,"é":null}"#
        );
    }
}
