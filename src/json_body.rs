//! Encrypting sensitive fields inside JSON webhook bodies (the `bodySHA256`
//! scheme).
//!
//! A JSON body is forwarded byte for byte unless it contains a configured
//! field name as an object key, at any depth. Then every string and number
//! in that key's value (the value itself, or each one inside an array or
//! object under it) becomes its ciphertext (a JSON string), the body is
//! re-serialised (key order kept, whitespace compacted, numbers with the
//! digits they were sent with), and the pipeline
//! replaces `bodySHA256` in the query with the new body's hash before
//! re-signing, so an app using `validateRequestWithBody` still accepts it.
//!
//! A body with the same key twice in one object (after unescaping: `"Digits"`
//! and `"Dig\u0069ts"` are one key) is refused as not inspectable.
//! `serde_json` keeps the last value, other parsers the first, so what the
//! app reads is not what ivrguard would have looked at: with
//! `{"Digits":"1234","Digits":null}` nothing was left to encrypt, the body
//! went through as sent, and the app's parser read `1234` in plaintext
//! (found in review). Twilio never sends a key twice.

use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::form::FieldSet;

/// The body is not JSON, or not JSON whose meaning every parser agrees on
/// (a key twice in one object), so it cannot be inspected.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[error("body is not JSON that can be inspected")]
pub struct NotJson;

/// A rewritten JSON body.
#[derive(Debug)]
pub struct Rewritten {
    pub bytes: Vec<u8>,
    /// Distinct field names encrypted, in order of first appearance.
    pub fields: Vec<String>,
    /// Number of values encrypted.
    pub count: usize,
}

/// Maximum nesting ivrguard walks; deeper bodies are refused as not
/// inspectable rather than risking the stack (serde_json itself stops at 128).
const MAX_DEPTH: usize = 64;

/// Encrypts configured fields; `Ok(None)` when there are none.
pub fn rewrite(
    body: &[u8],
    fields: &FieldSet,
    mut encrypt: impl FnMut(&[u8]) -> String,
) -> Result<Option<Rewritten>, NotJson> {
    let mut value: Value = serde_json::from_slice(body).map_err(|_| NotJson)?;
    if has_duplicate_key(body) {
        return Err(NotJson);
    }
    let mut out = Rewritten {
        bytes: Vec::new(),
        fields: Vec::new(),
        count: 0,
    };
    walk(&mut value, fields, None, &mut encrypt, &mut out, 0)?;
    if out.count == 0 {
        return Ok(None);
    }
    out.bytes = serde_json::to_vec(&value).map_err(|_| NotJson)?;
    Ok(Some(out))
}

/// Encrypts every string and number under a configured key, at any depth:
/// the key's value itself, or each one inside an array or object under it
/// (a repeated `Digits`, a structured `TranscriptionData`), which keeps its
/// shape and its keys. `null` and booleans are left as they are. `under`
/// is the configured key the value sits under, if any.
fn walk(
    value: &mut Value,
    fields: &FieldSet,
    under: Option<&str>,
    encrypt: &mut impl FnMut(&[u8]) -> String,
    out: &mut Rewritten,
    depth: usize,
) -> Result<(), NotJson> {
    if depth > MAX_DEPTH {
        return Err(NotJson);
    }
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                let under = under.or_else(|| fields.contains(key).then_some(key.as_str()));
                walk(v, fields, under, encrypt, out, depth + 1)?;
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, fields, under, encrypt, out, depth + 1)?;
            }
        }
        Value::String(_) | Value::Number(_) => {
            if let Some(name) = under {
                // Wiped once encrypted: the caller's input.
                let plain = Zeroizing::new(match std::mem::take(value) {
                    Value::String(s) => s.into_bytes(),
                    // A number's text as it was sent (`arbitrary_precision`).
                    number => number.to_string().into_bytes(),
                });
                *value = Value::String(encrypt(&plain));
                out.count += 1;
                if !out.fields.iter().any(|f| f == name) {
                    out.fields.push(name.to_owned());
                }
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
    Ok(())
}

/// Whether an object in `body` (JSON that parses) has a key twice. A
/// second pass over the body, keeping only each object's keys: JSON bodies
/// are rare (the `bodySHA256` scheme), form bodies never come here.
fn has_duplicate_key(body: &[u8]) -> bool {
    let mut de = serde_json::Deserializer::from_slice(body);
    UniqueKeys.deserialize(&mut de).is_err()
}

/// Walks any JSON value, failing on an object with a repeated key.
#[derive(Clone, Copy)]
struct UniqueKeys;

impl<'de> DeserializeSeed<'de> for UniqueKeys {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON without a repeated key")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        while items.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    /// Also sees a number, as a one-key map (`arbitrary_precision`).
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key) {
                return Err(serde::de::Error::custom("a key is repeated"));
            }
            map.next_value_seed(self)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> FieldSet {
        FieldSet::new(["Digits", "SpeechResult"])
    }

    fn fake(plain: &[u8]) -> String {
        format!("enc({})", String::from_utf8_lossy(plain))
    }

    #[test]
    fn leaves_bodies_without_sensitive_keys_alone() {
        assert!(rewrite(
            br#"{"CallSid":"CA1","nested":{"x":[1,2]}}"#,
            &fields(),
            fake
        )
        .unwrap()
        .is_none());
    }

    #[test]
    fn encrypts_sensitive_keys_at_any_depth_and_keeps_key_order() {
        let body = br#"{"z":1,"Digits":"1234","a":{"SpeechResult":"hello","k":[{"Digits":5678}]}}"#;
        let out = rewrite(body, &fields(), fake).unwrap().unwrap();
        assert_eq!(
            String::from_utf8(out.bytes).unwrap(),
            r#"{"z":1,"Digits":"enc(1234)","a":{"SpeechResult":"enc(hello)","k":[{"Digits":"enc(5678)"}]}}"#
        );
        assert_eq!(out.fields, ["Digits", "SpeechResult"]);
        assert_eq!(out.count, 3);
    }

    #[test]
    fn encrypts_every_string_and_number_inside_an_array_or_object_under_a_configured_key() {
        // Found in review: these reached the app in plaintext.
        let body = br#"{"Digits":["1234",5678,null,true,[["90"]]],"SpeechResult":{"text":"my pin","confidence":0.9,"words":[{"w":"pin"}]},"other":["1234"]}"#;
        let out = rewrite(body, &fields(), fake).unwrap().unwrap();
        assert_eq!(
            String::from_utf8(out.bytes).unwrap(),
            r#"{"Digits":["enc(1234)","enc(5678)",null,true,[["enc(90)"]]],"SpeechResult":{"text":"enc(my pin)","confidence":"enc(0.9)","words":[{"w":"enc(pin)"}]},"other":["1234"]}"#
        );
        assert_eq!(out.fields, ["Digits", "SpeechResult"]);
        assert_eq!(out.count, 6);
        // An empty array or object under a configured key has nothing to hide.
        assert!(
            rewrite(br#"{"Digits":[],"SpeechResult":{}}"#, &fields(), fake)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn refuses_a_configured_key_whose_value_nests_too_deep() {
        let deep = format!(r#"{{"Digits":{}"1"{}}}"#, "[".repeat(70), "]".repeat(70));
        assert_eq!(
            rewrite(deep.as_bytes(), &fields(), fake).unwrap_err(),
            NotJson
        );
    }

    #[test]
    fn encrypts_a_sensitive_number_as_the_text_that_was_sent() {
        // Found by fuzzing (json_rewrite): `2.5e3` was encrypted as "2500.0"
        // and a 23-digit number as "1.2345678901234568e22", so the app
        // decrypted digits the caller never sent. Other numbers keep their
        // digits too. Only an exponent's spelling is normalised (`E3` is
        // `e+3`), by serde_json.
        let body = br#"{"Digits":12345678901234567890123,"SpeechResult":2.50E3,"x":[1.50,-0]}"#;
        let out = rewrite(body, &fields(), fake).unwrap().unwrap();
        assert_eq!(
            String::from_utf8(out.bytes).unwrap(),
            r#"{"Digits":"enc(12345678901234567890123)","SpeechResult":"enc(2.50e+3)","x":[1.50,-0]}"#
        );
    }

    #[test]
    fn refuses_a_key_repeated_in_one_object() {
        // Found in review: serde_json keeps the last value, so with `null`
        // last nothing was encrypted and the body, `1234` in it, went to
        // the app as sent; with a string last, the first value was dropped.
        for body in [
            r#"{"CallSid":"CA1","Digits":"1234","Digits":null}"#,
            r#"{"Digits":"4111111111111111","Digits":[]}"#,
            r#"{"Digits":"1234","Digits":"5678"}"#,
            r#"{"Digits":"1234","Dig\u0069ts":true}"#,
            r#"{"a":[{"x":1},{"k":{"n":1,"n":2}}]}"#,
            r#"{"a":1,"a":1}"#,
        ] {
            assert_eq!(
                rewrite(body.as_bytes(), &fields(), fake).unwrap_err(),
                NotJson,
                "{body}"
            );
        }
        // The same key in different objects is fine, numbers included.
        let body = br#"{"Digits":"1","n":{"Digits":2,"x":1.5},"m":[{"x":1},{"x":2}]}"#;
        let out = rewrite(body, &fields(), fake).unwrap().unwrap();
        assert_eq!(out.count, 2);
    }

    #[test]
    fn refuses_non_json_and_too_deep_bodies() {
        assert_eq!(
            rewrite(b"Digits=1234", &fields(), fake).unwrap_err(),
            NotJson
        );
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(
            rewrite(deep.as_bytes(), &fields(), fake).unwrap_err(),
            NotJson
        );
    }
}
