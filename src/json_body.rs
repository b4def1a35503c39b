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

use serde_json::Value;

use crate::form::FieldSet;

/// The body is not JSON, so it cannot be inspected.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[error("body is not valid JSON")]
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
                let plain = match std::mem::take(value) {
                    Value::String(s) => s.into_bytes(),
                    // A number's text as it was sent (`arbitrary_precision`).
                    number => number.to_string().into_bytes(),
                };
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
