#![no_main]
// See docs/fuzzing.md; the target itself is halyard::fuzzing::sasl, which the test suite replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| halyard::fuzzing::sasl(data));
