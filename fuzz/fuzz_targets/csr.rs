//! PKCS#10 parsing and signature checking on untrusted CSRs (DER or PEM): never panics, and a
//! CSR that parses yields a key of an accepted type.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ephemera::ca::x509::parse_csr(data);
});
