//! AES-256-GCM field cipher: the wire format of every encrypted value.
//!
//! A value becomes lowercase hex of `nonce (12) || ciphertext || tag (16)`,
//! exactly what the seed's Node `encrypt` produces (`seeds/001_…`), so
//! `crypto.createDecipheriv('aes-256-gcm', Buffer.from(key, 'hex'), nonce)`
//! decrypts it. No associated data.
//!
//! Nonces are 96 random bits from `rand::thread_rng()`, a ChaCha12 CSPRNG
//! seeded from the OS (no syscall per value). With random nonces NIST SP
//! 800-38D §8.3 bounds one key to 2^32 encryptions; [`FieldCipher`] counts
//! them so operators can watch the figure in `/metrics` and rotate long
//! before it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

use crate::secret::REDACTED;

/// Key length in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// Nonce length in bytes (96 bits, the GCM default).
pub const NONCE_LEN: usize = 12;
/// Authentication tag length in bytes (128 bits).
pub const TAG_LEN: usize = 16;

/// Why a key could not be read. Never carries the key's characters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("must be 64 hex characters (a 32-byte key), found {0} characters")]
    WrongLength(usize),
    #[error("must be 64 hex characters (a 32-byte key), found a non-hex character")]
    NotHex,
}

/// Why a ciphertext could not be decrypted. Never carries any of its bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecryptError {
    #[error("ciphertext is not lowercase/uppercase hex")]
    NotHex,
    #[error("ciphertext is shorter than nonce and tag")]
    TooShort,
    #[error("ciphertext failed authentication (wrong key or tampered)")]
    Authentication,
}

/// A 32-byte AES-256 key; zeroized on drop, redacted in `Debug`.
#[derive(Clone)]
pub struct FieldKey(Zeroizing<[u8; KEY_LEN]>);

impl FieldKey {
    /// Parses 64 hex characters (either case).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        if text.len() != 2 * KEY_LEN {
            // Counted in characters, as the message says: 64 of them with
            // one not ASCII is a wrong character, not a wrong length (found
            // in review: "must be 64 …, found 64 characters").
            return Err(match text.chars().count() {
                n if n == 2 * KEY_LEN => KeyError::NotHex,
                n => KeyError::WrongLength(n),
            });
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(text, key.as_mut()).map_err(|_| KeyError::NotHex)?;
        Ok(FieldKey(key))
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        FieldKey(key)
    }

    /// Whether two keys are the same, compared in constant time.
    pub fn same_as(&self, other: &FieldKey) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_ref().ct_eq(other.0.as_ref()).into()
    }

    /// The key as 64 lowercase hex characters (for `keygen`).
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.as_ref()))
    }
}

impl fmt::Debug for FieldKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Encrypts and decrypts field values with one key. The AES key schedule is
/// computed once, here, not per request.
pub struct FieldCipher {
    aead: Aes256Gcm,
    encryptions: AtomicU64,
}

impl FieldCipher {
    pub fn new(key: &FieldKey) -> Self {
        FieldCipher {
            aead: Aes256Gcm::new_from_slice(key.0.as_ref()).expect("key is exactly 32 bytes"),
            encryptions: AtomicU64::new(0),
        }
    }

    /// Encrypts `plaintext` and appends the lowercase hex wire format to `out`.
    ///
    /// The plaintext is copied once, into `out`, where the ciphertext then
    /// overwrites it and is spelt out in hex in place. `out` has room for the
    /// whole value before that copy, so it never moves with plaintext in it
    /// (a move would leave a copy in the freed block), and no scratch copy
    /// needs wiping.
    pub fn encrypt_hex_into(&self, plaintext: &[u8], out: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let len = plaintext.len();
        out.reserve(2 * (NONCE_LEN + len + TAG_LEN));
        push_hex(out, &nonce);
        let at = out.len();
        out.extend_from_slice(plaintext);
        let value = out.get_mut(at..).unwrap_or_default();
        let tag = match self
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), b"", value)
        {
            Ok(tag) => tag,
            Err(_) => {
                value.zeroize();
                panic!("AES-GCM encryption cannot fail for inputs under 64 GiB");
            }
        };
        let count = self.encryptions.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(share) = nonce_budget_milestone(count) {
            // Exactly one thread sees each count, so each milestone logs once.
            tracing::warn!(
                encryptions = count,
                share_of_limit = share,
                "this key is approaching the AES-GCM random-nonce limit of 2^32 encryptions \
                 (NIST SP 800-38D 8.3); rotate the encryption key"
            );
        }
        out.resize(at + 2 * len, 0);
        hex_in_place(out.get_mut(at..).unwrap_or_default());
        push_hex(out, tag.as_slice());
    }

    /// Encrypts `plaintext` into a new lowercase hex string.
    pub fn encrypt_hex(&self, plaintext: &[u8]) -> String {
        let mut out = Vec::new();
        self.encrypt_hex_into(plaintext, &mut out);
        String::from_utf8(out).expect("hex is ASCII")
    }

    /// Decrypts the hex wire format (either case) back to the plaintext bytes.
    pub fn decrypt_hex(&self, text: &[u8]) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
        let text = text.trim_ascii();
        if !text.len().is_multiple_of(2) {
            return Err(DecryptError::NotHex);
        }
        let mut raw = Zeroizing::new(vec![0u8; text.len() / 2]);
        hex::decode_to_slice(text, raw.as_mut_slice()).map_err(|_| DecryptError::NotHex)?;
        if raw.len() < NONCE_LEN + TAG_LEN {
            return Err(DecryptError::TooShort);
        }
        let body_end = raw.len() - TAG_LEN;
        let nonce = *Nonce::from_slice(&raw[..NONCE_LEN]);
        let tag = *Tag::from_slice(&raw[body_end..]);
        let mut plain = Zeroizing::new(raw[NONCE_LEN..body_end].to_vec());
        self.aead
            .decrypt_in_place_detached(&nonce, b"", plain.as_mut_slice(), &tag)
            .map_err(|_| DecryptError::Authentication)?;
        Ok(plain)
    }

    /// How many values this cipher has encrypted since start-up.
    pub fn encryptions(&self) -> u64 {
        self.encryptions.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for FieldCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FieldCipher")
            .field("key", &REDACTED)
            .finish()
    }
}

/// NIST SP 800-38D §8.3: at most 2^32 encryptions per key with random
/// 96-bit nonces.
pub const RANDOM_NONCE_LIMIT: u64 = 1 << 32;

/// The share of [`RANDOM_NONCE_LIMIT`] reached when `count` is a milestone
/// worth a warning: 1/16, then every further 1/8 of the limit, and at the
/// limit itself. `None` otherwise.
pub fn nonce_budget_milestone(count: u64) -> Option<&'static str> {
    const SIXTEENTH: u64 = RANDOM_NONCE_LIMIT / 16;
    const EIGHTH: u64 = RANDOM_NONCE_LIMIT / 8;
    match count {
        SIXTEENTH => Some("1/16"),
        c if c >= EIGHTH && c % EIGHTH == 0 => match c / EIGHTH {
            1 => Some("1/8"),
            2 => Some("2/8"),
            3 => Some("3/8"),
            4 => Some("4/8"),
            5 => Some("5/8"),
            6 => Some("6/8"),
            7 => Some("7/8"),
            _ => Some("over the limit"),
        },
        _ => None,
    }
}

/// Every byte's two lowercase hex digits, so a byte costs one lookup.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut b = 0;
    while b < 256 {
        pairs[b] = [DIGITS[b >> 4], DIGITS[b & 0x0f]];
        b += 1;
    }
    pairs
};

fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        out.extend_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
}

/// Spells out in lowercase hex, in place, the bytes in the first half of
/// `buf` (whose length is even): back to front, 8 bytes at a time, so that
/// bytes `8k..8k + 8` are read before their digits overwrite positions
/// `16k..16k + 16`, which hold only bytes already read.
fn hex_in_place(buf: &mut [u8]) {
    let len = buf.len() / 2;
    let whole = len - len % 8;
    for i in (whole..len).rev() {
        let pair = HEX_PAIRS[usize::from(buf[i])];
        buf[2 * i..2 * i + 2].copy_from_slice(&pair);
    }
    for at in (0..whole).step_by(8).rev() {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&buf[at..at + 8]);
        let mut digits = [0u8; 16];
        for (pair, b) in digits.chunks_exact_mut(2).zip(bytes) {
            pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
        }
        buf[2 * at..2 * at + 16].copy_from_slice(&digits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test key published in the seed document (seeds/001_…).
    const SEED_KEY: &str = "a154eb4c759711bc2538a7cc021e9e9f17dd8aa63151c62ca28a82a4a404203d";

    fn cipher() -> FieldCipher {
        FieldCipher::new(&FieldKey::from_hex(SEED_KEY).unwrap())
    }

    #[test]
    fn round_trips_and_has_the_seed_layout() {
        let c = cipher();
        let ct = c.encrypt_hex(b"1234");
        assert_eq!(ct.len(), 2 * (NONCE_LEN + 4 + TAG_LEN));
        assert!(ct
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(c.decrypt_hex(ct.as_bytes()).unwrap().as_slice(), b"1234");
        assert_eq!(c.encryptions(), 1);
    }

    #[test]
    fn matches_an_independent_aes_gcm_encryption_with_the_same_nonce() {
        // Re-encrypt with the nonce the cipher chose, through the aead API
        // directly, and compare ciphertext+tag byte for byte.
        let c = cipher();
        let ct = hex::decode(c.encrypt_hex(b"4321")).unwrap();
        let aead = Aes256Gcm::new_from_slice(&hex::decode(SEED_KEY).unwrap()).unwrap();
        let expected =
            aes_gcm::aead::Aead::encrypt(&aead, Nonce::from_slice(&ct[..12]), &b"4321"[..])
                .unwrap();
        assert_eq!(&ct[12..], expected.as_slice());
    }

    #[test]
    fn hex_in_place_spells_every_byte_as_hex_encode_does() {
        // Every byte value, at every length around the 8-byte steps.
        let bytes: Vec<u8> = (0..=255).chain((0..=255).rev()).collect();
        for len in (0..=33).chain([255, 256, 511, 512]) {
            let mut buf = bytes[..len].to_vec();
            buf.resize(2 * len, 0);
            hex_in_place(&mut buf);
            assert_eq!(buf, hex::encode(&bytes[..len]).into_bytes(), "len {len}");
        }
    }

    #[test]
    fn appends_after_what_out_holds_for_values_of_every_length() {
        let c = cipher();
        let aead = Aes256Gcm::new_from_slice(&hex::decode(SEED_KEY).unwrap()).unwrap();
        for len in [0, 1, 4, 16, 17, 100] {
            let plain: Vec<u8> = (0..len).map(|i| b'0' + (i % 10) as u8).collect();
            let mut out = b"Caller=%2B1555&Digits=".to_vec();
            let prefix = out.clone();
            c.encrypt_hex_into(&plain, &mut out);
            assert_eq!(out[..prefix.len()], prefix[..], "len {len}");
            let wire = hex::decode(&out[prefix.len()..]).unwrap();
            assert_eq!(wire.len(), NONCE_LEN + len + TAG_LEN, "len {len}");
            let expected =
                aes_gcm::aead::Aead::encrypt(&aead, Nonce::from_slice(&wire[..12]), &plain[..])
                    .unwrap();
            assert_eq!(wire[12..], expected[..], "len {len}");
        }
    }

    #[test]
    fn nonces_differ_between_encryptions_of_the_same_value() {
        let c = cipher();
        let a = c.encrypt_hex(b"1234");
        let b = c.encrypt_hex(b"1234");
        assert_ne!(a[..24], b[..24]);
    }

    #[test]
    fn rejects_tampering_wrong_key_and_garbage() {
        let c = cipher();
        let mut ct = c.encrypt_hex(b"1234").into_bytes();
        let last = ct.len() - 1;
        ct[last] = if ct[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(c.decrypt_hex(&ct), Err(DecryptError::Authentication));
        let other = FieldCipher::new(&FieldKey::generate());
        assert_eq!(
            other.decrypt_hex(c.encrypt_hex(b"1").as_bytes()),
            Err(DecryptError::Authentication)
        );
        assert_eq!(c.decrypt_hex(b"zz"), Err(DecryptError::NotHex));
        assert_eq!(c.decrypt_hex(b"abc"), Err(DecryptError::NotHex));
        assert_eq!(c.decrypt_hex(b"00"), Err(DecryptError::TooShort));
    }

    #[test]
    fn nonce_budget_warns_early_and_at_each_eighth() {
        assert_eq!(nonce_budget_milestone(1), None);
        assert_eq!(nonce_budget_milestone(RANDOM_NONCE_LIMIT / 16 - 1), None);
        assert_eq!(
            nonce_budget_milestone(RANDOM_NONCE_LIMIT / 16),
            Some("1/16")
        );
        assert_eq!(nonce_budget_milestone(RANDOM_NONCE_LIMIT / 8), Some("1/8"));
        assert_eq!(nonce_budget_milestone(RANDOM_NONCE_LIMIT / 8 + 1), None);
        assert_eq!(nonce_budget_milestone(RANDOM_NONCE_LIMIT / 2), Some("4/8"));
        assert_eq!(
            nonce_budget_milestone(RANDOM_NONCE_LIMIT),
            Some("over the limit")
        );
        assert_eq!(
            nonce_budget_milestone(2 * RANDOM_NONCE_LIMIT),
            Some("over the limit")
        );
    }

    #[test]
    fn key_errors_name_the_problem_not_the_value() {
        assert_eq!(
            FieldKey::from_hex("abc").unwrap_err(),
            KeyError::WrongLength(3)
        );
        let bad = "g".repeat(64);
        let err = FieldKey::from_hex(&bad).unwrap_err();
        assert_eq!(err, KeyError::NotHex);
        assert!(!err.to_string().contains("gg"));
        assert!(FieldKey::from_hex(&SEED_KEY.to_uppercase()).is_ok());
        assert_eq!(format!("{:?}", FieldKey::generate()), REDACTED);
    }
}
