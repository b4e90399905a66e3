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
    // Only what is shown about a secret's own key counts: the fuzzer may copy the same text into another key (a
    // group id, a user name), where showing it is right.
    let shown: Vec<String> = match &result {
        Ok(config) => config.describe().lines().map(str::to_owned).collect(),
        Err(e) => vec![e.to_string().trim_start_matches("fuzz.toml: ").to_owned()],
    };
    for secret in secrets {
        for line in shown.iter().filter(|line| piiwall_fuzz::line_key(line) == secret.key) {
            // What the line shows after the key's name, which may contain the same text and is no secret.
            let line = &line[secret.key.len()..];
            assert!(
                !line.contains(&secret.text),
                "the config loader shows a secret: {line:?}"
            );
            // Part of it: the canary, which stands nowhere else in the value.
            assert!(
                !(secret.canary_alone && line.contains(piiwall_fuzz::CANARY)),
                "the config loader shows part of a secret: {line:?}"
            );
        }
    }
});
