//! Property checks shared by the fuzz targets (`fuzz_targets/`) and the
//! corpus replay in the main crate's `tests/fuzz_corpus.rs`.

pub mod props;
