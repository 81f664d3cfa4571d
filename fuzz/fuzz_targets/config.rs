//! Config parsing and validation on arbitrary TOML: never panics; errors name their keys.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(ephemera::config::ConfigError::Invalid(problems)) =
        ephemera::config::Config::from_toml(text, std::path::Path::new("/"))
    {
        assert!(
            problems
                .iter()
                .all(|p| !p.key.is_empty() || !p.message.is_empty())
        );
    }
});
