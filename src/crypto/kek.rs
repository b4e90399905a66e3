//! Key-encryption keys: they wrap every data key before it is stored.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use crate::error::KeyError;

const NONCE_LEN: usize = 12;

/// Wraps and unwraps data keys. The local implementation holds the KEK in memory; a KMS-backed one keeps it
/// out of the process.
pub trait KekProvider: Send + Sync {
    fn wrap(&self, plaintext: &[u8], associated_data: &[u8]) -> Result<Vec<u8>, KeyError>;
    fn unwrap(&self, wrapped: &[u8], associated_data: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError>;
}

/// Where the local KEK comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekSource {
    /// A file holding the base64 of 32 random bytes; `create` makes one on first use (the embedded default).
    File { path: PathBuf, create: bool },
    /// An environment variable holding the base64 of 32 random bytes.
    Env(String),
}

/// A 256-bit KEK held in memory, wrapping with AES-256-GCM (random nonce, associated data bound).
pub struct LocalKek {
    cipher: Aes256Gcm,
}

impl LocalKek {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != 32 {
            return Err(KeyError::KekMalformed(format!(
                "it holds {} bytes, a KEK has 32",
                bytes.len()
            )));
        }
        Ok(Self {
            cipher: Aes256Gcm::new_from_slice(bytes).expect("32 bytes is an AES-256 key"),
        })
    }

    /// Loads the KEK from its source, creating the key file when the source allows it.
    pub fn load(source: &KekSource) -> Result<Self, KeyError> {
        match source {
            KekSource::Env(var) => {
                let text = Zeroizing::new(std::env::var(var).map_err(|_| {
                    KeyError::KekMissing(format!(
                        "environment variable {var} is not set (it should hold the base64 of 32 random bytes)"
                    ))
                })?);
                Self::from_base64(&text, &format!("environment variable {var}"))
            }
            KekSource::File { path, create } => {
                if !path.exists() && *create {
                    create_key_file(path)?;
                    eprintln!(
                        "piiwall: created a new key-encryption key in {} — keep it safe: without it no key in the key store can be read",
                        path.display()
                    );
                }
                let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| {
                    KeyError::KekMissing(format!("cannot read key file {}: {e} (set keys.kek)", path.display()))
                })?);
                Self::from_base64(&text, &format!("key file {}", path.display()))
            }
        }
    }

    fn from_base64(text: &str, what: &str) -> Result<Self, KeyError> {
        let bytes =
            Zeroizing::new(STANDARD.decode(text.trim()).map_err(|_| {
                KeyError::KekMalformed(format!("{what} is not base64 (expected the base64 of 32 bytes)"))
            })?);
        Self::from_bytes(&bytes).map_err(|e| match e {
            KeyError::KekMalformed(why) => KeyError::KekMalformed(format!("{what}: {why}")),
            other => other,
        })
    }
}

impl KekProvider for LocalKek {
    fn wrap(&self, plaintext: &[u8], associated_data: &[u8]) -> Result<Vec<u8>, KeyError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: associated_data,
                },
            )
            .map_err(|_| KeyError::Store("wrapping a key failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8], associated_data: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        if wrapped.len() < NONCE_LEN + 16 {
            return Err(KeyError::CorruptRow);
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: associated_data,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| KeyError::CorruptRow)
    }
}

fn create_key_file(path: &Path) -> Result<(), KeyError> {
    let fail = |e: std::io::Error| KeyError::KekMissing(format!("cannot create key file {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(fail)?;
    }
    let key = Zeroizing::new(rand::random::<[u8; 32]>());
    let text = Zeroizing::new(STANDARD.encode(key.as_slice()));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(fail)?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trips_and_binds_associated_data() {
        let kek = LocalKek::from_bytes(&[7; 32]).unwrap();
        let wrapped = kek.wrap(b"dek bytes", b"ad").unwrap();
        assert_eq!(kek.unwrap(&wrapped, b"ad").unwrap().as_slice(), b"dek bytes");
        assert!(matches!(kek.unwrap(&wrapped, b"other"), Err(KeyError::CorruptRow)));
        let other = LocalKek::from_bytes(&[8; 32]).unwrap();
        assert!(matches!(other.unwrap(&wrapped, b"ad"), Err(KeyError::CorruptRow)));
    }

    #[test]
    fn bad_key_material_is_named() {
        assert!(matches!(LocalKek::from_bytes(&[0; 16]), Err(KeyError::KekMalformed(_))));
        let err = LocalKek::from_base64("not base64!", "key file k")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("key file k is not base64"), "{err}");
    }

    #[test]
    fn default_key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/kek.key");
        let source = KekSource::File {
            path: path.clone(),
            create: true,
        };
        let first = LocalKek::load(&source).unwrap();
        let wrapped = first.wrap(b"x", b"").unwrap();
        let second = LocalKek::load(&source).unwrap();
        assert_eq!(second.unwrap(&wrapped, b"").unwrap().as_slice(), b"x");
        let missing = KekSource::File {
            path: dir.path().join("absent"),
            create: false,
        };
        assert!(matches!(LocalKek::load(&missing), Err(KeyError::KekMissing(_))));
    }
}
