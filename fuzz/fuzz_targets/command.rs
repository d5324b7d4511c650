#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| reddino_fuzz::command(data));
