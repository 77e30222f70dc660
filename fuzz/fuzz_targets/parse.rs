//! The data plane's packet parser (the same source the kernel runs) on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header; so does the kernel.
    if data.len() >= 14 {
        lb_tests::parser::check(data);
    }
});
