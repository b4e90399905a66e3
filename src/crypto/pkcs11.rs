//! The KEK inside an HSM, through PKCS#11: a non-extractable AES key in a token, found by its label. Data keys are
//! wrapped and unwrapped with AES-256-GCM inside the token (a random 12-byte IV, the data key's associated data,
//! a 128-bit tag); the KEK never leaves it. The module is loaded at run time (SoftHSM2 in the tests).

use std::path::PathBuf;
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::kek::KekProvider;
use crate::error::KeyError;

const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;

/// Where a PKCS#11 KEK is: `[keys.pkcs11]` and the key label of `keys.kek = "pkcs11:LABEL"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Location {
    /// The vendor's PKCS#11 module (a shared library).
    pub module: PathBuf,
    /// The label of the token holding the KEK.
    pub token: String,
    /// The label of the KEK (an AES key) in the token.
    pub key_label: String,
    /// Where the user PIN is: never in the config file itself.
    pub pin: SecretSource,
}

/// A secret named by the config, held elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

impl SecretSource {
    fn read(&self, what: &str) -> Result<Zeroizing<String>, KeyError> {
        let text = match self {
            SecretSource::Env(var) => std::env::var(var)
                .map_err(|_| KeyError::KekMissing(format!("{what}: the environment variable {var} is not set")))?,
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map_err(|e| KeyError::KekMissing(format!("{what}: cannot read {}: {e}", path.display())))?,
        };
        Ok(Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_owned()))
    }
}

/// A logged-in session on the token and the KEK's handle in it. PKCS#11 sessions serve one call at a time: the
/// mutex serialises them (wraps happen per new key, unwraps per key read, never per record).
pub struct Pkcs11Kek {
    session: Mutex<Session>,
    key: ObjectHandle,
    id: String,
    /// Kept so the module stays loaded as long as the session.
    _context: Pkcs11,
}

impl Pkcs11Kek {
    /// Opens the module, finds the token, logs in and finds the key; every failure names the setting to check.
    pub fn open(location: &Pkcs11Location) -> Result<Self, KeyError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            KeyError::KekMissing(format!("PKCS#11 ({what}; check [keys.pkcs11] and keys.kek): {e}"))
        };
        let context = context_for(location)
            .map_err(|e| KeyError::KekMissing(format!("PKCS#11 ({e}; check keys.pkcs11.module)")))?;
        let slots = context
            .get_slots_with_token()
            .map_err(|e| fail("listing the tokens", &e))?;
        let slot = slots
            .into_iter()
            .find(|slot| {
                context
                    .get_token_info(*slot)
                    .is_ok_and(|info| info.label().trim_end() == location.token)
            })
            .ok_or_else(|| fail("finding the token", &format!("no token is labelled {}", location.token)))?;
        let session = context
            .open_ro_session(slot)
            .map_err(|e| fail("opening a session", &e))?;
        let pin = location.pin.read("keys.pkcs11.pin")?;
        session
            .login(UserType::User, Some(&AuthPin::from(pin.as_str())))
            .map_err(|e| fail("logging in to the token (is the PIN right?)", &e))?;
        let keys = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(location.key_label.as_bytes().to_vec()),
            ])
            .map_err(|e| fail("finding the key", &e))?;
        let key = match keys.as_slice() {
            [key] => *key,
            [] => {
                return Err(fail(
                    "finding the key",
                    &format!(
                        "token {} holds no secret key labelled {}",
                        location.token, location.key_label
                    ),
                ));
            }
            _ => {
                return Err(fail(
                    "finding the key",
                    &format!(
                        "token {} holds several keys labelled {}",
                        location.token, location.key_label
                    ),
                ));
            }
        };
        Ok(Self {
            session: Mutex::new(session),
            key,
            id: format!("pkcs11:{}/{}", location.token, location.key_label),
            _context: context,
        })
    }
}

/// The process's one context of a module: a module is initialised once, and a context finalises its module when
/// dropped, which would end the sessions of every other KEK on the same module (a rotation between two keys of one
/// HSM). So contexts are kept for the life of the process.
fn context_for(location: &Pkcs11Location) -> Result<Pkcs11, String> {
    static CONTEXTS: std::sync::OnceLock<Mutex<std::collections::HashMap<PathBuf, Pkcs11>>> =
        std::sync::OnceLock::new();
    let mut contexts = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(context) = contexts.get(&location.module) {
        return Ok(context.clone());
    }
    let context =
        Pkcs11::new(&location.module).map_err(|e| format!("loading the module {}: {e}", location.module.display()))?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(format!("initialising the module {}: {e}", location.module.display())),
    }
    contexts.insert(location.module.clone(), context.clone());
    Ok(context)
}

impl KekProvider for Pkcs11Kek {
    fn wrap(&self, plaintext: &[u8], associated_data: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut iv = rand::random::<[u8; IV_LEN]>();
        let stored_iv = iv;
        let params = GcmParams::new(&mut iv, associated_data, TAG_BITS.into())
            .map_err(|e| KeyError::Store(format!("PKCS#11 wrap parameters: {e}")))?;
        let sealed = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .encrypt(&Mechanism::AesGcm(params), self.key, plaintext)
            .map_err(|e| KeyError::StoreUnavailable(format!("the HSM did not wrap a key ({}): {e}", self.id)))?;
        let mut out = Vec::with_capacity(IV_LEN + sealed.len());
        out.extend_from_slice(&stored_iv);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8], associated_data: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        if wrapped.len() < IV_LEN + 16 {
            return Err(KeyError::CorruptRow);
        }
        let (iv, sealed) = wrapped.split_at(IV_LEN);
        let mut iv: [u8; IV_LEN] = iv.try_into().expect("split at IV_LEN");
        let params = GcmParams::new(&mut iv, associated_data, TAG_BITS.into()).map_err(|_| KeyError::CorruptRow)?;
        let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        match session.decrypt(&Mechanism::AesGcm(params), self.key, sealed) {
            Ok(secret) => Ok(Zeroizing::new(secret)),
            // The tag does not authenticate: a row altered or wrapped under another key.
            Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::EncryptedDataInvalid, _)) => {
                Err(KeyError::CorruptRow)
            }
            Err(e) => Err(KeyError::StoreUnavailable(format!(
                "the HSM did not unwrap a key ({}): {e}",
                self.id
            ))),
        }
    }

    fn id(&self) -> String {
        self.id.clone()
    }
}
