#![no_main]
//! See `ivrguard_fuzz::props::pipeline_prepare` for the properties checked.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ivrguard_fuzz::props::pipeline_prepare(data));
