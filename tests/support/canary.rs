//! Canaries and the leak grep (notes/perf-reliability.md §B6).
//!
//! Each run draws fresh sensitive values — a 16-digit Luhn-valid card
//! number starting `4111`, a 4-digit PIN and `canary-<random hex>` speech —
//! and [`find_leaks`] looks for them, and for every secret, in every
//! encoding a careless log line, error or metric could carry: raw,
//! form/URL-encoded (`+` and `%20`, upper- and lower-case escapes),
//! JSON-escaped, Rust-`Debug`-escaped, with separators removed or added,
//! hex and base64 of the bytes (in all three base64 alignments, so the value
//! is found inside a longer base64 blob too).

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::Rng;

use super::proxy::Secrets;
use super::twilio::{form_encode, url_encode};

/// One run's sensitive caller input.
#[derive(Debug, Clone)]
pub struct Canaries {
    /// 16 digits, `4111` + 11 random digits + a Luhn check digit.
    pub card: String,
    /// 4 random digits (never a plausible year, 1900–2199, which every
    /// timestamp in the haystack contains).
    pub pin: String,
    /// `canary-` + 32 random hex digits.
    pub speech: String,
}

impl Canaries {
    pub fn generate() -> Self {
        let mut rng = rand::thread_rng();
        let mut card: Vec<u8> = b"4111".to_vec();
        for _ in 0..11 {
            card.push(b'0' + rng.gen_range(0..10u8));
        }
        card.push(luhn_check_digit(&card));
        let pin = loop {
            let pin: u16 = rng.gen_range(1000..10000);
            if !(1900..2200).contains(&pin) {
                break pin.to_string();
            }
        };
        let speech = format!("canary-{}", hex::encode(rng.gen::<[u8; 16]>()));
        Canaries {
            card: String::from_utf8(card).expect("ASCII digits"),
            pin,
            speech,
        }
    }

    /// Every encoding of every canary.
    pub fn needles(&self) -> Vec<Needle> {
        let mut needles = text_needles("card", &self.card);
        // A card number reformatted for display is still the card number.
        let groups: Vec<&str> = (0..4).map(|i| &self.card[i * 4..i * 4 + 4]).collect();
        needles.extend(text_needles("card (spaced)", &groups.join(" ")));
        needles.extend(text_needles("card (dashed)", &groups.join("-")));
        needles.extend(text_needles("pin", &self.pin));
        needles.extend(text_needles("speech", &self.speech));
        dedup(needles)
    }
}

/// The digit that makes `payload ‖ digit` pass the Luhn check.
pub fn luhn_check_digit(payload: &[u8]) -> u8 {
    let sum: u32 = payload
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let v = u32::from(d - b'0');
            // The check digit will sit at position 0, so the payload's last
            // digit is at position 1: doubled.
            if i % 2 == 0 {
                let doubled = v * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                v
            }
        })
        .sum();
    b'0' + ((10 - sum % 10) % 10) as u8
}

/// The Luhn check over ASCII digits.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let (payload, check) = digits.split_at(digits.len() - 1);
    luhn_check_digit(payload) == check[0]
}

/// One byte string to look for, and what it is.
#[derive(Debug, Clone)]
pub struct Needle {
    pub label: String,
    pub bytes: Vec<u8>,
    /// Short all-digit needles (the PIN) only count where they stand alone:
    /// not inside a longer run of digits, letters (hex) or a decimal
    /// fraction (`latency_ms":0.1234`), which would be noise, not a leak.
    pub standalone: bool,
}

fn needle(label: String, bytes: Vec<u8>) -> Needle {
    let standalone = bytes.len() <= 6 && bytes.iter().all(u8::is_ascii_digit);
    Needle {
        label,
        bytes,
        standalone,
    }
}

/// Every textual and byte-level encoding of `value`.
pub fn text_needles(label: &str, value: &str) -> Vec<Needle> {
    let mut out = vec![needle(format!("{label} raw"), value.as_bytes().to_vec())];
    let form = form_encode(value);
    out.push(needle(
        format!("{label} form-encoded"),
        form.clone().into_bytes(),
    ));
    out.push(needle(
        format!("{label} form-encoded, lower-case escapes"),
        lower_escapes(&form).into_bytes(),
    ));
    let url = url_encode(value);
    out.push(needle(
        format!("{label} URL-encoded"),
        url.clone().into_bytes(),
    ));
    out.push(needle(
        format!("{label} URL-encoded, lower-case escapes"),
        lower_escapes(&url).into_bytes(),
    ));
    let json = serde_json::to_string(value).expect("a string serialises");
    out.push(needle(
        format!("{label} JSON-escaped"),
        json.as_bytes()[1..json.len() - 1].to_vec(),
    ));
    out.push(needle(
        format!("{label} JSON-escaped (ASCII only)"),
        json_ascii(value).into_bytes(),
    ));
    let debug = format!("{value:?}");
    out.push(needle(
        format!("{label} Debug-escaped"),
        debug.as_bytes()[1..debug.len() - 1].to_vec(),
    ));
    let compact: String = value
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '_' | '/'))
        .collect();
    if compact.len() >= 6 {
        out.push(needle(
            format!("{label} without separators"),
            compact.into_bytes(),
        ));
    }
    out.extend(byte_needles(label, value.as_bytes()));
    dedup(out)
}

/// Hex and base64 of `bytes` (and the raw bytes themselves).
pub fn byte_needles(label: &str, bytes: &[u8]) -> Vec<Needle> {
    let mut out = vec![
        needle(format!("{label} bytes"), bytes.to_vec()),
        needle(format!("{label} hex"), hex::encode(bytes).into_bytes()),
        needle(
            format!("{label} HEX"),
            hex::encode_upper(bytes).into_bytes(),
        ),
        needle(
            format!("{label} base64"),
            STANDARD.encode(bytes).into_bytes(),
        ),
        needle(
            format!("{label} base64url"),
            URL_SAFE.encode(bytes).into_bytes(),
        ),
    ];
    // Inside a longer base64 text the value starts at any of three bit
    // offsets; the characters that depend only on the value are the core.
    for offset in 0..3 {
        let mut shifted = vec![0u8; offset];
        shifted.extend_from_slice(bytes);
        let start = (8 * offset).div_ceil(6);
        let end = 8 * (offset + bytes.len()) / 6;
        if end >= start + 5 {
            for (name, engine) in [
                ("base64", &STANDARD_NO_PAD),
                ("base64url", &URL_SAFE_NO_PAD),
            ] {
                let text = engine.encode(&shifted);
                out.push(needle(
                    format!("{label} {name} (offset {offset})"),
                    text.as_bytes()[start..end].to_vec(),
                ));
            }
        }
    }
    out
}

fn lower_escapes(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut rest = encoded;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        out.push('%');
        out.push_str(&rest[i + 1..i + 3].to_ascii_lowercase());
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    out
}

fn json_ascii(value: &str) -> String {
    let json = serde_json::to_string(value).expect("a string serialises");
    let mut out = String::new();
    for c in json[1..json.len() - 1].chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

fn dedup(needles: Vec<Needle>) -> Vec<Needle> {
    let mut out: Vec<Needle> = Vec::with_capacity(needles.len());
    for n in needles {
        if !n.bytes.is_empty() && !out.iter().any(|o| o.bytes == n.bytes) {
            out.push(n);
        }
    }
    out
}

/// Every occurrence of every needle in `haystack`, as `label @ offset: context`.
pub fn find_leaks(haystack: &[u8], needles: &[Needle]) -> Vec<String> {
    let mut found = Vec::new();
    for n in needles {
        let len = n.bytes.len();
        if len == 0 || len > haystack.len() {
            continue;
        }
        for at in 0..=haystack.len() - len {
            if haystack[at..at + len] != n.bytes[..] {
                continue;
            }
            if n.standalone {
                let glued =
                    |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'.');
                if glued(at.checked_sub(1).and_then(|i| haystack.get(i)))
                    || glued(haystack.get(at + len))
                {
                    continue;
                }
            }
            let from = at.saturating_sub(60);
            let to = (at + len + 60).min(haystack.len());
            found.push(format!(
                "{} @ {at}: …{}…",
                n.label,
                String::from_utf8_lossy(&haystack[from..to]).escape_debug()
            ));
        }
    }
    found
}

/// Fails the test if any canary or secret appears in `haystack` in any
/// encoding. `surface` names where the bytes came from.
pub fn assert_no_leak(surface: &str, haystack: &[u8], canaries: &Canaries, secrets: &Secrets) {
    let mut needles = canaries.needles();
    needles.extend(secrets.needles());
    let leaks = find_leaks(haystack, &needles);
    assert!(
        leaks.is_empty(),
        "{} leak(s) in {surface} ({} bytes):\n{}",
        leaks.len(),
        haystack.len(),
        leaks.join("\n")
    );
}
