#![no_main]
// See docs/fuzzing.md; the target itself is halyard::fuzzing::stream_reader, which the test suite replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| halyard::fuzzing::stream_reader(data));
