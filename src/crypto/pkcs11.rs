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

const IV_LEN: usize = super::kek::NONCE_LEN;
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
        let text = Zeroizing::new(text);
        Ok(Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_owned()))
    }
}

/// A logged-in session on the token and the KEK's handle in it. PKCS#11 sessions serve one call at a time: the
/// mutex serialises them (wraps happen per new key, unwraps per key read, never per record).
pub struct Pkcs11Kek {
    location: Pkcs11Location,
    /// The session and the key's handle in it; replaced when the HSM forgot them (a restart, a failover).
    session: Mutex<(Session, ObjectHandle)>,
    id: String,
}

impl Pkcs11Kek {
    /// Opens the module, finds the token, logs in and finds the key, then wraps and unwraps a test value (an HSM
    /// whose GCM this provider cannot use is refused here, never after keys were written); every failure names the
    /// setting to check, never the PIN.
    pub fn open(location: &Pkcs11Location) -> Result<Self, KeyError> {
        let kek = Self {
            location: location.clone(),
            session: Mutex::new(login(location)?),
            id: format!("pkcs11:{}/{}", location.token, location.key_label),
        };
        let probe = Zeroizing::new(rand::random::<[u8; 32]>());
        let wrapped = kek.wrap(probe.as_slice(), b"piiwall/1|kek self-test")?;
        match kek.unwrap(&wrapped, b"piiwall/1|kek self-test") {
            Ok(back) if back.as_slice() == probe.as_slice() => Ok(kek),
            _ => Err(KeyError::KekMalformed(format!(
                "{}: the HSM's AES-GCM does not give back what it wrapped (it may choose its own IVs, which piiwall \
                 does not support yet); check keys.kek",
                kek.id
            ))),
        }
    }

    /// Runs `call` on the session; when the HSM no longer knows the session or the key (it restarted, failed
    /// over, logged the user out), logs in again on a new session and runs it once more.
    fn with_session<T>(
        &self,
        call: impl Fn(&Session, ObjectHandle) -> cryptoki::error::Result<T>,
    ) -> Result<cryptoki::error::Result<T>, KeyError> {
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        match call(&session.0, session.1) {
            Err(cryptoki::error::Error::Pkcs11(rv, _)) if session_lost(rv) => {
                tracing::warn!(kek = %self.id, error = %rv, "the HSM session was lost: logging in again");
                *session = login(&self.location)
                    .map_err(|e| KeyError::StoreUnavailable(format!("the HSM session could not be reopened: {e}")))?;
                Ok(call(&session.0, session.1))
            }
            result => Ok(result),
        }
    }

    /// What a failed HSM call means: the row does not authenticate (altered, or another KEK's), the key or token
    /// cannot do this at all (fatal: fix the HSM's key), or the HSM is not answering now (the batch waits).
    fn failure(&self, e: cryptoki::error::Error, what: &str) -> KeyError {
        use cryptoki::error::RvError::*;
        match &e {
            cryptoki::error::Error::Pkcs11(EncryptedDataInvalid | EncryptedDataLenRange, _) => KeyError::CorruptRow,
            // CKR_AEAD_DECRYPT_FAILED (PKCS#11 3.0), which cryptoki 0.12 does not name.
            cryptoki::error::Error::Pkcs11(UnknownErrorCode(0x42), _) => KeyError::CorruptRow,
            cryptoki::error::Error::Pkcs11(
                KeyFunctionNotPermitted | KeyTypeInconsistent | MechanismInvalid | MechanismParamInvalid | KeySizeRange,
                _,
            ) => KeyError::KekMalformed(format!(
                "{}: the HSM key cannot {what} with AES-GCM ({e}); it needs CKA_ENCRYPT and CKA_DECRYPT, AES-256",
                self.id
            )),
            _ => KeyError::StoreUnavailable(format!("the HSM did not {what} a key ({}): {e}", self.id)),
        }
    }
}

/// Errors after which the session or the key's handle must be found again.
fn session_lost(rv: cryptoki::error::RvError) -> bool {
    use cryptoki::error::RvError::*;
    matches!(
        rv,
        SessionHandleInvalid
            | SessionClosed
            | UserNotLoggedIn
            | DeviceRemoved
            | TokenNotPresent
            | KeyHandleInvalid
            | ObjectHandleInvalid
            | CryptokiNotInitialized
    )
}

/// A logged-in session on the location's token, and the KEK's handle in it.
fn login(location: &Pkcs11Location) -> Result<(Session, ObjectHandle), KeyError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        KeyError::KekMissing(format!("PKCS#11 ({what}; check [keys.pkcs11] and keys.kek): {e}"))
    };
    let context =
        context_for(location).map_err(|e| KeyError::KekMissing(format!("PKCS#11 ({e}; check keys.pkcs11.module)")))?;
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
    match session.login(UserType::User, Some(&AuthPin::from(pin.as_str()))) {
        // Login belongs to the application, not the session: another KEK of this process may have done it.
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(fail("logging in to the token (is the PIN right?)", &e)),
    }
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(location.key_label.as_bytes().to_vec()),
        ])
        .map_err(|e| fail("finding the key", &e))?;
    match keys.as_slice() {
        [key] => Ok((session, *key)),
        [] => Err(fail(
            "finding the key",
            &format!(
                "token {} holds no secret key labelled {}",
                location.token, location.key_label
            ),
        )),
        _ => Err(fail(
            "finding the key",
            &format!(
                "token {} holds several keys labelled {}",
                location.token, location.key_label
            ),
        )),
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
        let iv = rand::random::<[u8; IV_LEN]>();
        let sealed = self
            .with_session(|session, key| {
                let mut call_iv = iv;
                let params = GcmParams::new(&mut call_iv, associated_data, TAG_BITS.into())?;
                let sealed = session.encrypt(&Mechanism::AesGcm(params), key, plaintext)?;
                // An HSM that writes its own IV into the parameters cannot be used as it is (its IV is not what is
                // stored): refused rather than storing keys nothing can unwrap.
                if call_iv != iv {
                    return Err(cryptoki::error::Error::Pkcs11(
                        cryptoki::error::RvError::MechanismParamInvalid,
                        cryptoki::context::Function::Encrypt,
                    ));
                }
                Ok(sealed)
            })?
            .map_err(|e| self.failure(e, "wrap"))?;
        Ok([iv.as_slice(), &sealed].concat())
    }

    fn unwrap(&self, wrapped: &[u8], associated_data: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let (iv, sealed) = super::kek::split_nonce(wrapped)?;
        self.with_session(|session, key| {
            let mut call_iv = iv;
            let params = GcmParams::new(&mut call_iv, associated_data, TAG_BITS.into())?;
            session.decrypt(&Mechanism::AesGcm(params), key, sealed)
        })?
        .map(Zeroizing::new)
        .map_err(|e| self.failure(e, "unwrap"))
    }

    fn id(&self) -> String {
        self.id.clone()
    }
}
