//! What ivrguard's own code leaves in memory it frees: a caller's digits
//! after a request, and the encryption key after a cipher is dropped (a
//! reload with a new key). The test binary's allocator looks for a needle
//! in every block freed while one is set (found in review: the AES key
//! schedule and the plaintext of a refused form were left there).
//!
//! Out of reach and not tested: the request body as hyper read it (its
//! buffers hold the form as sent), and the copies serde_json makes while
//! parsing an escaped JSON string.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use ivrguard::cipher::{FieldCipher, FieldKey};
use ivrguard::config::{self, Settings};
use ivrguard::form::{self, FieldSet};
use ivrguard::json_body;

const MAX_NEEDLE: usize = 64;
static NEEDLE: [AtomicU8; MAX_NEEDLE] = [const { AtomicU8::new(0) }; MAX_NEEDLE];
static NEEDLE_LEN: AtomicUsize = AtomicUsize::new(0);
static SEEN: AtomicBool = AtomicBool::new(false);
/// One watch at a time: the needle is global.
static WATCH: Mutex<()> = Mutex::new(());

/// The system allocator, looking for the needle in each block it frees.
struct Watching;

#[global_allocator]
static ALLOCATOR: Watching = Watching;

// SAFETY: every call is passed on to `System` unchanged; `dealloc` only
// reads the block first, while it is still allocated.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let len = NEEDLE_LEN.load(SeqCst);
        if len > 0 && layout.size() >= len {
            // SAFETY: `ptr` is a live block of `layout.size()` bytes until
            // `System.dealloc` below. Bytes never written (spare capacity)
            // are read as they are: this is a test's probe, and a needle
            // found there was written there.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            let found = block.windows(len).any(|window| {
                window
                    .iter()
                    .zip(&NEEDLE)
                    .all(|(byte, needle)| *byte == needle.load(SeqCst))
            });
            if found {
                SEEN.store(true, SeqCst);
            }
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Whether `needle` is in any block freed while `run` runs.
fn left_in_freed_memory(needle: &[u8], run: impl FnOnce()) -> bool {
    assert!((1..=MAX_NEEDLE).contains(&needle.len()));
    let _one_at_a_time = WATCH
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for (slot, byte) in NEEDLE.iter().zip(needle) {
        slot.store(*byte, SeqCst);
    }
    SEEN.store(false, SeqCst);
    NEEDLE_LEN.store(needle.len(), SeqCst);
    run();
    NEEDLE_LEN.store(0, SeqCst);
    SEEN.load(SeqCst)
}

const KEY_HEX: &str = "a154eb4c759711bc2538a7cc021e9e9f17dd8aa63151c62ca28a82a4a404203d";

fn cipher() -> FieldCipher {
    FieldCipher::new(&FieldKey::from_hex(KEY_HEX).expect("a valid key"))
}

/// Escaped as Twilio sends a PIN with a `+`: only the decoded copy, which
/// ivrguard makes, spells the needle.
const BODY: &[u8] = b"CallSid=CA1&Digits=73%2B19%2B4428&To=%2B15550100";
const DECODED: &[u8] = b"73+19+4428";

#[test]
fn the_watch_sees_a_copy_that_is_not_wiped() {
    // The probe itself: without this, every other test passes vacuously.
    assert!(left_in_freed_memory(DECODED, || {
        drop(String::from_utf8(DECODED.to_vec()).unwrap())
    }));
    assert!(!left_in_freed_memory(DECODED, || {
        drop(zeroize::Zeroizing::new(DECODED.to_vec()))
    }));
}

#[test]
fn a_form_refused_after_parsing_leaves_no_plaintext() {
    // What a request with a wrong signature does: parsed, then dropped.
    let fields = FieldSet::new(["Digits"]);
    assert!(!left_in_freed_memory(DECODED, || {
        let mut arena = form::Arena::default();
        let pairs = form::parse_in(BODY, &mut arena, &fields).unwrap();
        assert_eq!(pairs[1].value.as_bytes(), DECODED);
        drop(pairs);
    }));
}

#[test]
fn a_rewritten_form_leaves_no_plaintext() {
    let fields = FieldSet::new(["Digits"]);
    let cipher = cipher();
    assert!(!left_in_freed_memory(DECODED, || {
        let mut arena = form::Arena::default();
        let mut pairs = form::parse_in(BODY, &mut arena, &fields).unwrap();
        let out = form::rewrite(BODY, &mut pairs, &fields, |plain, out| {
            cipher.encrypt_hex_into(plain, out)
        });
        assert!(out.is_some());
    }));
}

#[test]
fn a_rewritten_json_body_leaves_no_plaintext() {
    let fields = FieldSet::new(["Digits"]);
    let cipher = cipher();
    let body = br#"{"CallSid":"CA1","Digits":"7319004428"}"#;
    assert!(!left_in_freed_memory(b"7319004428", || {
        let out = json_body::rewrite(body, &fields, |plain| cipher.encrypt_hex(plain)).unwrap();
        assert!(out.is_some());
    }));
}

#[test]
fn a_dropped_cipher_leaves_no_key() {
    let key = hex::decode(KEY_HEX).unwrap();
    let cipher = Arc::new(cipher());
    assert!(!left_in_freed_memory(&key, || drop(cipher)));
}

#[test]
fn loading_the_config_leaves_no_secret_from_the_environment() {
    // What every reload poll does: copy the environment, load, drop both.
    let token = "freed-memory-canary-auth-token-4f1e";
    std::env::set_var("FREED_MEMORY_TEST_TOKEN", token);
    std::env::set_var("FREED_MEMORY_TEST_KEY", KEY_HEX);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ivrguard.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://127.0.0.1:9\"\n\
         [twilio]\nauth_token_env = \"FREED_MEMORY_TEST_TOKEN\"\n\
         [encryption]\nkey_env = \"FREED_MEMORY_TEST_KEY\"\n",
    )
    .expect("write config");
    assert!(!left_in_freed_memory(token.as_bytes(), || {
        let env = config::process_env();
        let settings = Settings::load(&path, &env).expect("loads");
        assert_eq!(settings.twilio.auth_token.expose(), token.as_bytes());
        drop((settings, env));
    }));
}
