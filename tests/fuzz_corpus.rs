//! Replays the committed fuzz inputs through the same property checks the
//! `cargo fuzz` targets run, on stable Rust: the minimised corpus the fuzzer
//! built (`fuzz/corpus/<target>/`) and the hand-written seeds
//! (`fuzz/seeds/<target>/`: real webhook bodies, settings headers, URLs, the
//! shipped config, past crashes). Every input stays a regression test where
//! no nightly toolchain exists (Envoy's practice: "the corpus also acts as a
//! quick regression test").

#[path = "../fuzz/src/props.rs"]
mod props;

use std::path::{Path, PathBuf};

/// Every file in `fuzz/<kind>/<target>/`, sorted; at least one must exist,
/// so a moved or emptied directory fails instead of passing vacuously.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no inputs", dir.display());
    files
}

/// Runs `check` on every seed and corpus input of `target`, naming the file
/// that fails.
fn replay(target: &str, check: fn(&[u8])) {
    let mut files = inputs("seeds", target);
    files.extend(inputs("corpus", target));
    for path in files {
        let data = std::fs::read(&path).expect("a readable corpus file");
        let outcome = std::panic::catch_unwind(|| check(&data));
        if let Err(panic) = outcome {
            eprintln!("property violated by {}", path.display());
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn form_rewrite_corpus_keeps_its_properties() {
    replay("form_rewrite", props::form_rewrite);
}

#[test]
fn signature_settings_corpus_keeps_its_properties() {
    replay("signature_settings", props::signature_settings);
}

#[test]
fn url_candidates_corpus_keeps_its_properties() {
    replay("url_candidates", props::url_candidates);
}

#[test]
fn config_load_corpus_keeps_its_properties() {
    replay("config_load", props::config_load);
}

#[test]
fn json_rewrite_corpus_keeps_its_properties() {
    replay("json_rewrite", props::json_rewrite);
}

#[test]
fn pipeline_prepare_corpus_keeps_its_properties() {
    replay("pipeline_prepare", props::pipeline_prepare);
}
