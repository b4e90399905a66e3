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

pub(super) const NONCE_LEN: usize = 12;

/// Wraps and unwraps data keys. The local implementation holds the KEK in memory; an HSM-backed one keeps it
/// out of the process. Network or device calls happen only when a key is created or first read: unwrapped data
/// keys are cached by the keyring.
pub trait KekProvider: Send + Sync {
    fn wrap(&self, plaintext: &[u8], associated_data: &[u8]) -> Result<Vec<u8>, KeyError>;
    fn unwrap(&self, wrapped: &[u8], associated_data: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError>;
    /// Wraps many keys (plaintext, associated data), in order: a batch's new subjects. One at a time unless the
    /// provider does better (AWS KMS sends them concurrently).
    fn wrap_many(&self, keys: &[(&[u8], &[u8])]) -> Result<Vec<Vec<u8>>, KeyError> {
        keys.iter().map(|(plaintext, ad)| self.wrap(plaintext, ad)).collect()
    }
    /// Names this KEK in every key it wraps (provider and key, never secret): `local:<fingerprint>`,
    /// `pkcs11:<token>/<key label>`. The key store's rows say which KEK wrapped them by it.
    fn id(&self) -> String;
}

/// A shared provider is a provider: the store's wrapping key and the keyring's set hold one remote KEK together.
impl<T: KekProvider + ?Sized> KekProvider for std::sync::Arc<T> {
    fn wrap(&self, plaintext: &[u8], associated_data: &[u8]) -> Result<Vec<u8>, KeyError> {
        (**self).wrap(plaintext, associated_data)
    }
    fn unwrap(&self, wrapped: &[u8], associated_data: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        (**self).unwrap(wrapped, associated_data)
    }
    fn wrap_many(&self, keys: &[(&[u8], &[u8])]) -> Result<Vec<Vec<u8>>, KeyError> {
        (**self).wrap_many(keys)
    }
    fn id(&self) -> String {
        (**self).id()
    }
}

/// Marks a key wrapped in an envelope that names its KEK; keys wrapped before envelopes existed are bare local
/// wraps (a 12-byte random nonce first, which begins with these 4 bytes once in 2^32).
const ENVELOPE: &[u8; 4] = b"\0pwk";

/// The KEKs a key store is read with: `current` wraps every new key, in an envelope that names it; `previous` (during
/// a KEK rotation, until `piiwall keys rewrap` has rewrapped every key) still unwrap the keys they wrapped.
pub struct KekSet {
    current: Box<dyn KekProvider>,
    previous: Vec<Box<dyn KekProvider>>,
    /// Local KEKs in the set, in order (current first), for keys wrapped before envelopes existed.
    bare: Vec<usize>,
}

impl KekSet {
    /// The set of `current` and `previous`; two KEKs with one id are refused (their keys could not be told apart).
    pub fn new(current: Box<dyn KekProvider>, previous: Vec<Box<dyn KekProvider>>) -> Result<Self, KeyError> {
        let ids: Vec<String> = std::iter::once(&current).chain(&previous).map(|kek| kek.id()).collect();
        if let Some(twice) = ids
            .iter()
            .enumerate()
            .find_map(|(i, id)| ids[..i].contains(id).then_some(id))
        {
            return Err(KeyError::KekMalformed(format!(
                "keys.kek and keys.kek_previous name the KEK {twice} twice"
            )));
        }
        let bare = ids
            .iter()
            .enumerate()
            .filter(|(_, id)| id.starts_with("local:"))
            .map(|(i, _)| i)
            .collect();
        Ok(Self {
            current,
            previous,
            bare,
        })
    }

    fn member(&self, i: usize) -> &dyn KekProvider {
        if i == 0 { &*self.current } else { &*self.previous[i - 1] }
    }

    /// The id of the KEK that wrapped `wrapped`, when it names one (keys wrapped before envelopes say none).
    pub fn wrapped_by(wrapped: &[u8]) -> Option<&str> {
        envelope(wrapped).map(|(id, _)| id)
    }

    /// The current KEK's wrap of a key, in the envelope that names the KEK.
    fn envelop(&self, inner: Vec<u8>) -> Result<Vec<u8>, KeyError> {
        let id = self.current.id();
        let id_len = u8::try_from(id.len())
            .map_err(|_| KeyError::KekMalformed(format!("its name is longer than 255 bytes: {id}")))?;
        let mut out = Vec::with_capacity(ENVELOPE.len() + 1 + id.len() + inner.len());
        out.extend_from_slice(ENVELOPE);
        out.push(id_len);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&inner);
        Ok(out)
    }

    /// Whether `wrapped` is already wrapped by the current KEK, in an envelope (what `keys rewrap` leaves).
    pub fn is_current(&self, wrapped: &[u8]) -> bool {
        Self::wrapped_by(wrapped) == Some(self.current.id().as_str())
    }
}

impl KekProvider for KekSet {
    fn wrap(&self, plaintext: &[u8], associated_data: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.envelop(self.current.wrap(plaintext, associated_data)?)
    }

    fn wrap_many(&self, keys: &[(&[u8], &[u8])]) -> Result<Vec<Vec<u8>>, KeyError> {
        let wrapped = self.current.wrap_many(keys)?;
        if wrapped.len() != keys.len() {
            return Err(KeyError::StoreUnavailable(format!(
                "{}: {} keys wrapped of {}",
                self.current.id(),
                wrapped.len(),
                keys.len()
            )));
        }
        wrapped.into_iter().map(|inner| self.envelop(inner)).collect()
    }

    fn unwrap(&self, wrapped: &[u8], associated_data: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let named = envelope(wrapped).map(|(id, inner)| {
            let kek = std::iter::once(&self.current)
                .chain(&self.previous)
                .find(|kek| kek.id() == id);
            match kek {
                Some(kek) => kek.unwrap(inner, associated_data),
                None => Err(KeyError::KekMissing(format!(
                    "the configured KEKs do not open this key store: a stored key is wrapped by the KEK {id}, which \
                     neither keys.kek nor keys.kek_previous names"
                ))),
            }
        });
        match named {
            Some(Ok(secret)) => return Ok(secret),
            // Unavailable (an HSM not answering): said as it is, not tried as something else.
            Some(Err(e @ KeyError::StoreUnavailable(_))) => return Err(e),
            _ => {}
        }
        // A bare local wrap of before envelopes, whichever local KEK authenticates it; also tried when an envelope
        // did not open, since a bare wrap's random nonce begins like an envelope once in 2^32.
        for &i in &self.bare {
            if let Ok(secret) = self.member(i).unwrap(wrapped, associated_data) {
                return Ok(secret);
            }
        }
        Err(match named {
            Some(Err(e)) => e,
            _ => KeyError::CorruptRow,
        })
    }

    fn id(&self) -> String {
        self.current.id()
    }
}

/// The KEK id and the provider's bytes of an enveloped key.
fn envelope(wrapped: &[u8]) -> Option<(&str, &[u8])> {
    let rest = wrapped.strip_prefix(ENVELOPE.as_slice())?;
    let (&id_len, rest) = rest.split_first()?;
    let id = rest.get(..usize::from(id_len))?;
    Some((std::str::from_utf8(id).ok()?, &rest[usize::from(id_len)..]))
}

/// Where the local KEK comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekSource {
    /// A file holding the base64 of 32 random bytes; `create` makes one on first use (the embedded default).
    File { path: PathBuf, create: bool },
    /// An environment variable holding the base64 of 32 random bytes.
    Env(String),
    /// An AES key in an HSM, through PKCS#11.
    Pkcs11(super::pkcs11::Pkcs11Location),
    /// A symmetric key in AWS KMS.
    AwsKms(super::AwsKmsLocation),
}

/// Opens the KEK a source names: `current` for `keys.kek`, which wraps new keys (and is tested at open), or one of
/// `keys.kek_previous`, which may only be allowed to unwrap.
pub fn open_kek(source: &KekSource, current: bool) -> Result<Box<dyn KekProvider>, KeyError> {
    match source {
        KekSource::File { .. } | KekSource::Env(_) => Ok(Box::new(LocalKek::load(source)?)),
        KekSource::Pkcs11(location) => Ok(Box::new(super::pkcs11::Pkcs11Kek::open(location)?)),
        #[cfg(feature = "aws-kms")]
        KekSource::AwsKms(location) => Ok(Box::new(super::aws_kms::AwsKmsKek::open(location, current)?)),
        #[cfg(not(feature = "aws-kms"))]
        KekSource::AwsKms(_) => {
            let _ = current;
            Err(KeyError::KekMissing(super::AWS_KMS_NOT_BUILT.into()))
        }
    }
}

/// A 256-bit KEK held in memory, wrapping with AES-256-GCM (random nonce, associated data bound).
pub struct LocalKek {
    cipher: Aes256Gcm,
    /// `local:` and the first 8 bytes of HMAC-SHA256(KEK, "piiwall kek id"), in hex: tells two local KEKs apart and
    /// gives nothing of the key.
    id: String,
}

impl LocalKek {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != 32 {
            return Err(KeyError::KekMalformed(format!(
                "it holds {} bytes, a KEK has 32",
                bytes.len()
            )));
        }
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(bytes).expect("HMAC takes any key length");
        mac.update(b"piiwall kek id");
        let fingerprint = mac.finalize().into_bytes();
        let id = fingerprint[..8].iter().fold(String::from("local:"), |mut id, b| {
            id.push_str(&format!("{b:02x}"));
            id
        });
        Ok(Self {
            cipher: Aes256Gcm::new_from_slice(bytes).expect("32 bytes is an AES-256 key"),
            id,
        })
    }

    /// The hex fingerprint of the key (its id without `local:`): tells two keys apart, gives nothing of them.
    pub fn fingerprint(&self) -> &str {
        self.id.trim_start_matches("local:")
    }

    /// Loads the KEK from its source, creating the key file when the source allows it.
    pub fn load(source: &KekSource) -> Result<Self, KeyError> {
        match source {
            KekSource::Pkcs11(_) | KekSource::AwsKms(_) => {
                Err(KeyError::KekMissing("an HSM or KMS KEK is not a local one".into()))
            }
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
        Ok([nonce.as_slice(), &sealed].concat())
    }

    fn unwrap(&self, wrapped: &[u8], associated_data: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let (nonce, sealed) = split_nonce(wrapped)?;
        self.cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: sealed,
                    aad: associated_data,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| KeyError::CorruptRow)
    }

    fn id(&self) -> String {
        self.id.clone()
    }
}

/// An AES-GCM wrap as every provider stores it, `nonce (12 bytes) || ciphertext || tag (16 bytes)`, split; a row
/// too short to be one does not authenticate.
pub(super) fn split_nonce(wrapped: &[u8]) -> Result<([u8; NONCE_LEN], &[u8]), KeyError> {
    if wrapped.len() < NONCE_LEN + 16 {
        return Err(KeyError::CorruptRow);
    }
    let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
    Ok((nonce.try_into().expect("split at NONCE_LEN"), sealed))
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

    fn local(byte: u8) -> Box<dyn KekProvider> {
        Box::new(LocalKek::from_bytes(&[byte; 32]).unwrap())
    }

    #[test]
    fn a_set_names_its_kek_in_what_it_wraps_and_reads_what_its_previous_keks_wrapped() {
        let old = KekSet::new(local(1), vec![]).unwrap();
        let by_old = old.wrap(b"dek", b"ad").unwrap();
        assert_eq!(KekSet::wrapped_by(&by_old), Some(local(1).id().as_str()));
        let bare = LocalKek::from_bytes(&[1; 32]).unwrap().wrap(b"old dek", b"ad").unwrap();

        let rotated = KekSet::new(local(2), vec![local(1)]).unwrap();
        assert_eq!(rotated.unwrap(&by_old, b"ad").unwrap().as_slice(), b"dek");
        assert_eq!(
            rotated.unwrap(&bare, b"ad").unwrap().as_slice(),
            b"old dek",
            "a bare wrap of before"
        );
        assert!(!rotated.is_current(&by_old) && !rotated.is_current(&bare));
        let by_new = rotated.wrap(b"dek", b"ad").unwrap();
        assert!(rotated.is_current(&by_new));
        assert!(matches!(
            rotated.unwrap(&by_new, b"other ad"),
            Err(KeyError::CorruptRow)
        ));

        let without_old = KekSet::new(local(2), vec![]).unwrap();
        let err = without_old.unwrap(&by_old, b"ad").err().unwrap().to_string();
        assert!(
            err.contains(&local(1).id()) && err.contains("keys.kek_previous"),
            "{err}"
        );
        assert!(matches!(without_old.unwrap(&bare, b"ad"), Err(KeyError::CorruptRow)));
        assert!(matches!(without_old.unwrap(b"\0pwk", b"ad"), Err(KeyError::CorruptRow)));
    }

    #[test]
    fn a_set_refuses_one_kek_named_twice() {
        let err = KekSet::new(local(1), vec![local(2), local(1)])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("twice") && err.contains(&local(1).id()), "{err}");
    }

    #[test]
    fn a_bare_wrap_that_looks_like_an_envelope_still_opens() {
        let kek = LocalKek::from_bytes(&[1; 32]).unwrap();
        // A bare wrap whose random nonce happens to begin with the envelope's mark and a plausible id.
        let mut nonce = [7u8; NONCE_LEN];
        nonce[..4].copy_from_slice(ENVELOPE);
        nonce[4] = 2;
        nonce[5..7].copy_from_slice(b"xy");
        let sealed = kek
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: b"dek",
                    aad: b"ad",
                },
            )
            .unwrap();
        let wrapped = [nonce.as_slice(), &sealed].concat();
        assert_eq!(KekSet::wrapped_by(&wrapped), Some("xy"), "it parses as an envelope");
        let set = KekSet::new(local(1), vec![]).unwrap();
        assert_eq!(set.unwrap(&wrapped, b"ad").unwrap().as_slice(), b"dek");
    }

    #[test]
    fn a_local_keks_id_tells_keys_apart_and_shows_nothing_of_them() {
        let id = local(1).id();
        assert!(id.starts_with("local:") && id.len() == "local:".len() + 16, "{id}");
        assert_ne!(id, local(2).id());
        assert!(!id.contains(&STANDARD.encode([1u8; 32])[..8]));
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
