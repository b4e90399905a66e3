//! Config files, through the loader `piiwall run` and `config check` use.
//!
//! Properties: nothing panics; a file that is not TOML gets an error that names a position, never the file's
//! text; no error and no `describe()` (what `config check` prints and the audit digests) shows a secret: a
//! password in a URL, or a librdkafka property named for a password, secret, token or credential.

#![no_main]

use libfuzzer_sys::fuzz_target;
use piiwall::config::Config;
use piiwall_fuzz::assert_no_echo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let result = Config::parse(text, std::iter::empty(), "fuzz.toml");
    let Ok(table) = text.parse::<toml::Table>() else {
        if let Err(e) = result {
            assert_no_echo("a TOML syntax error", &e.to_string());
        }
        return;
    };
    let mut secrets = Vec::new();
    piiwall_fuzz::config_secrets(&toml::Value::Table(table), "", &mut secrets);
    let shown = match &result {
        Ok(config) => config.describe(),
        Err(e) => e.to_string(),
    };
    for secret in secrets {
        assert!(!shown.contains(&secret), "the config loader shows a secret: {shown:?}");
    }
});
