//! SPIFFE ID and trust domain parsing: never panics; what parses prints back to itself.
#![no_main]

use ephemera::id::{SpiffeId, TrustDomain};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = s.parse::<SpiffeId>() {
        assert_eq!(id.to_string().parse::<SpiffeId>().ok(), Some(id));
    }
    if let Ok(td) = s.parse::<TrustDomain>() {
        assert_eq!(td.to_string().parse::<TrustDomain>().ok(), Some(td));
    }
});
