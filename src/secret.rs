//! `Secret`: bytes that must never be printed.
//!
//! Auth tokens, shared-key secrets and encryption keys live in this type from
//! the moment they are read from the environment or a file. Its `Debug` and
//! `Display` print one fixed marker (no length, no first character), and the
//! bytes are zeroed when it is dropped. Code that needs the value calls
//! [`Secret::expose`], which makes every use easy to find in review.

use std::fmt;
use zeroize::Zeroizing;

/// The one marker ivrguard prints wherever a sensitive value was.
pub const REDACTED: &str = "*REDACTED*";

/// Secret bytes with redacting `Debug`/`Display`, zeroized on drop.
#[derive(Clone)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Wraps bytes that must not be printed.
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(Zeroizing::new(bytes))
    }

    /// The secret bytes. Every call site is a place where the value is used.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// True when the secret holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether both hold the same bytes, compared in constant time (a
    /// reload names a secret whose value changed, never the value).
    pub fn same_as(&self, other: &Secret) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_slice().ct_eq(other.0.as_slice()).into()
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret::new(s.into_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_print_only_the_marker() {
        let s = Secret::from("hunter2-canary".to_string());
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(format!("{:?}", Some(&s)), format!("Some({REDACTED})"));
        assert_eq!(s.expose(), b"hunter2-canary");
    }
}
