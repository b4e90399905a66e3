//! Keys an operator makes in the test HSM (SoftHSM2) and the test KMS (moto), for the KEK tests and the bench of
//! new subjects per provider. Self-contained: benches/subjects.rs includes this file alone.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

/// The token scripts/test-services initialises, and its user PIN.
pub const TOKEN: &str = "piiwall-test";
pub const PIN: &str = "1234";

pub fn module() -> PathBuf {
    std::env::var("PIIWALL_TEST_PKCS11_MODULE")
        .expect("PIIWALL_TEST_PKCS11_MODULE names SoftHSM2's module: run `bash scripts/test` (scripts/test-services)")
        .into()
}

/// The test's own context of the module, kept for the process's life: dropping a context finalises the module
/// under every other user of it in the process.
fn context() -> &'static Pkcs11 {
    static CONTEXT: OnceLock<Pkcs11> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        let context = Pkcs11::new(module()).unwrap();
        match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => panic!("SoftHSM2 does not initialise: {e}"),
        }
        context
    })
}

/// Makes a non-extractable AES-256 key in the test token, as an operator would; returns its (unique) label.
pub fn new_hsm_key() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let label = format!(
        "kek-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let context = context();
    let slot = context
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| context.get_token_info(*slot).unwrap().label().trim_end() == TOKEN)
        .expect("scripts/test-services initialises the token piiwall-test");
    let session = context.open_rw_session(slot).unwrap();
    match session.login(UserType::User, Some(&AuthPin::from(PIN))) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::ValueLen(32.into()),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
            ],
        )
        .unwrap();
    label
}

/// moto's address (`PIIWALL_TEST_AWS`).
#[cfg(feature = "aws-kms")]
pub fn endpoint() -> String {
    std::env::var("PIIWALL_TEST_AWS").expect("PIIWALL_TEST_AWS is moto's address: run `bash scripts/test`")
}

/// A KMS client of the test's own, to make keys as an operator would.
#[cfg(feature = "aws-kms")]
pub fn kms_admin<T>(call: impl AsyncFnOnce(aws_sdk_kms::Client) -> T) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(endpoint())
            .load()
            .await;
        call(aws_sdk_kms::Client::new(&config)).await
    })
}

/// A new symmetric KMS key; returns its ARN (what piiwall names a KMS KEK by).
#[cfg(feature = "aws-kms")]
pub fn new_kms_key() -> String {
    kms_admin(async |kms| {
        let made = kms.create_key().description("piiwall test KEK").send().await.unwrap();
        made.key_metadata().unwrap().arn().unwrap().to_owned()
    })
}
