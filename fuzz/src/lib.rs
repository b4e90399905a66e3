//! What the fuzz targets share: the schema corpus, fixed keys, and the check that an error never echoes input.
//!
//! Every seed corpus (written by `cargo run --example seeds` in this directory) puts [`CANARY`] inside the
//! values a target reads; libFuzzer mutates around it, and a target fails when the canary shows up in an error
//! message, which is how an echoed value would show.

use std::sync::{Arc, OnceLock};

use piiwall::crypto::{Dek, KeyId};
use piiwall::policy::{CompiledSchema, PolicySettings, compile};
use piiwall::sanitize::RecordKeys;
use piiwall::transcode::Transcoder;

/// Marks input values; never part of a schema, a config key or a message piiwall writes.
pub const CANARY: &str = "Zq9Xv";

/// The schemas a record is read with: the repository's examples and one with every Avro type.
pub const SCHEMAS: [&str; 5] = [
    include_str!("../../schemas/customer_profile.avsc"),
    include_str!("../../schemas/payment.avsc"),
    include_str!("../../schemas/clickstream.avsc"),
    include_str!("../../schemas/event.avsc"),
    include_str!("../schemas/all_types.avsc"),
];

/// A compiled schema of the corpus with its transcoder.
pub struct Compiled {
    pub schema: CompiledSchema,
    pub transcoder: Transcoder,
}

/// The corpus, compiled once per process.
pub fn schemas() -> &'static [Compiled] {
    static COMPILED: OnceLock<Vec<Compiled>> = OnceLock::new();
    COMPILED.get_or_init(|| {
        SCHEMAS
            .iter()
            .map(|text| {
                let schema = compile(text, &PolicySettings::default()).expect("corpus schema compiles");
                let transcoder = Transcoder::new(&schema).expect("corpus schema has a transcoder");
                Compiled { schema, transcoder }
            })
            .collect()
    })
}

/// The schema a fuzz input's selector byte picks.
pub fn pick(selector: u8) -> &'static Compiled {
    let all = schemas();
    &all[usize::from(selector) % all.len()]
}

/// Fixed keys (the transcoder does no I/O; the keyring is tested elsewhere), or those of a forgotten subject.
pub fn keys(forgotten: bool) -> RecordKeys {
    let dek = Arc::new(Dek::new(KeyId([7; 12]), 1, &[7; 32]));
    RecordKeys {
        record: (!forgotten).then(|| dek.clone()),
        domain: Some(dek),
        forgotten,
    }
}

/// Fails when `message` repeats the canary: an error that echoes input.
pub fn assert_no_echo(what: &str, message: &str) {
    assert!(
        !message.contains(CANARY),
        "{what} echoes its input in an error message: {message:?}"
    );
}

/// A sanitizer over a real keyring (SQLite in a scratch directory, one per process), for reveal.
pub fn sanitizer() -> &'static piiwall::sanitize::Sanitizer {
    use piiwall::crypto::LocalKek;
    use piiwall::keys::{KeyCacheSettings, Keyring, SqliteStore};
    static SANITIZER: OnceLock<piiwall::sanitize::Sanitizer> = OnceLock::new();
    SANITIZER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("piiwall-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let store = Arc::new(SqliteStore::open(&dir.join("keys.db")).expect("key store"));
        let kek = Arc::new(LocalKek::from_bytes(&[7; 32]).expect("KEK"));
        let keyring = Keyring::open(store, kek, KeyCacheSettings::default()).expect("keyring");
        piiwall::sanitize::Sanitizer::new(Arc::new(keyring), "default")
    })
}

/// A secret of a config file: the key that holds it and the secret text.
pub struct Secret {
    pub key: String,
    pub text: String,
    /// The canary stands once in the whole value, inside this secret: showing the canary at all shows part of it.
    pub canary_alone: bool,
}

/// The secrets of a parsed config file that carry the canary: passwords in the key store's and the registry's
/// URLs (`scheme://user:PASSWORD@host`, `password=PASSWORD`), and librdkafka properties named for a password,
/// secret, token or credential. A password whose text also stands elsewhere in its value (a user name that is the
/// same text) is left out: showing that other part is right.
pub fn config_secrets(value: &toml::Value, path: &str, out: &mut Vec<Secret>) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                config_secrets(value, &path, out);
            }
        }
        toml::Value::Array(items) => items.iter().for_each(|item| config_secrets(item, path, out)),
        toml::Value::String(text) => {
            let lower = path.to_ascii_lowercase();
            let mut found = Vec::new();
            if is_secret_line(&lower) && lower.starts_with("kafka.properties.") {
                found.push(text.clone());
            }
            // A SQLite store's location is a file path, shown as it is: whatever it looks like, it holds no password.
            let sqlite = lower == "keys.store" && text.starts_with("sqlite:");
            if (lower == "keys.store" || lower == "schemas.registry") && !sqlite {
                // The readers' own view: the password the postgres crate connects with, and the one the url crate
                // (the registry client's) finds in the user info; only one they read as written (one they decoded
                // stands in the text in another form, and the same text elsewhere, a user name, would look like it).
                let mut read = Vec::new();
                if let Ok(config) = text.parse::<postgres::Config>()
                    && let Some(password) = config.get_password()
                {
                    read.push(String::from_utf8_lossy(password).into_owned());
                }
                if let Ok(url) = url::Url::parse(text)
                    && let Some(password) = url.password()
                {
                    read.push(password.to_owned());
                }
                found.extend(read.into_iter().filter(|password| decoded(password) == *password));
                // And a simpler model of the same, which also covers texts the readers reject (their errors show
                // the text masked).
                if let Some((_, rest)) = text.split_once("://") {
                    if let Some((credentials, _)) = rest.rsplit_once('@') {
                        if let Some((_, password)) = credentials.split_once(':') {
                            found.push(password.to_owned());
                        }
                    }
                }
                // A URL's query value runs to the next `&`; a `key=value` string's to the next whitespace (any
                // Unicode whitespace; backslash escapes are not modelled, which only shortens the secret).
                let url = text.split_once("://").is_some_and(|(scheme, _)| {
                    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                });
                let lowered = text.to_ascii_lowercase();
                for (at, _) in lowered.match_indices("password=") {
                    let value = text[at + "password=".len()..].trim_start_matches(char::is_whitespace);
                    let end = if url {
                        value.find('&')
                    } else {
                        value.find(char::is_whitespace)
                    };
                    found.push(value[..end.unwrap_or(value.len())].to_owned());
                }
            }
            out.extend(
                found
                    .into_iter()
                    // A secret that also stands elsewhere in the value, as written or as the readers decode it (a
                    // user name of the same text), is left out: showing that other part is right.
                    .filter(|secret| {
                        // (A secret with a `*` could be completed by the mask's own `***`.)
                        secret.contains(CANARY)
                            && !secret.contains('*')
                            && text.matches(secret.as_str()).count() <= 1
                            && decoded(text).matches(decoded(secret).as_str()).count() <= 1
                    })
                    .map(|secret| Secret {
                        key: lower.clone(),
                        canary_alone: text.matches(CANARY).count() == 1 && decoded(text).matches(CANARY).count() == 1,
                        text: secret,
                    }),
            );
        }
        _ => {}
    }
}

/// `text` as the URL readers see it: `%XX` decoded (lossily), tabs and line breaks dropped (the url crate does).
fn decoded(text: &str) -> String {
    let bytes: Vec<u8> = text.bytes().filter(|b| !b"\t\r\n".contains(b)).collect();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = bytes.get(at + 1..at + 3).and_then(|h| std::str::from_utf8(h).ok());
        match hex.filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit())) {
            Some(h) if bytes[at] == b'%' => {
                out.push(u8::from_str_radix(h, 16).expect("two hex digits"));
                at += 3;
            }
            _ => {
                out.push(bytes[at]);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a `describe()` line (or an error) is about a key that holds a secret: the key store's and the
/// registry's URLs, and librdkafka properties named for a password, secret, token or credential.
pub fn is_secret_line(line: &str) -> bool {
    let key = line_key(line);
    key == "keys.store"
        || key == "schemas.registry"
        || (key.starts_with("kafka.properties.")
            && ["password", "secret", "token", "credential"]
                .iter()
                .any(|w| key.contains(w)))
}

/// The config key a `describe()` line (or an error) is about: its text up to the first space, `:` or `=`.
pub fn line_key(line: &str) -> String {
    line.split([' ', ':', '=']).next().unwrap_or("").to_ascii_lowercase()
}
