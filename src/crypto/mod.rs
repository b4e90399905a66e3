//! Cryptography: key-encryption keys, data keys and the self-describing tokens they produce.
//!
//! Every data key (DEK) is 32 random bytes; HKDF-SHA256 derives from it one key per purpose, so no key ever
//! serves two constructions:
//! - `encrypt`: AES-256-GCM with a random 96-bit nonce, over the plaintext padded to a multiple of 16 bytes (at
//!   least 32), so that short values of one field all give ciphertexts of one length;
//! - `tokenize`: deterministic AEAD, AES-256-GCM under a *synthetic* nonce = HMAC-SHA256 (its own derived key) over
//!   (context length, context, plaintext). Equal inputs give equal tokens (joins and counts work); different inputs get different nonces.
//!   Unlike AES-SIV from the `aes-siv` crate, the cipher and the HMAC state are keyed once per DEK, not per call;
//! - `hash`: HMAC-SHA256, not reversible.
//!
//! Every ciphertext binds its context (field path or kind) and key id as associated data: a token copied into
//! another field, or relabelled with another key id, does not decrypt.
//!
//! Key material is zeroized on drop: the raw DEK, the derived keys, and the AES key schedules (the `aes` crate's
//! `zeroize` feature, proven by a compile-time test). Not zeroized, for want of support in the crates: the HMAC
//! mid-states kept per DEK (`hmac`/`sha2`) and GCM's hash key H = AES_K(0) (`polyval`'s dispatching backend), neither
//! of which gives the AES or HMAC key back.

#[cfg(feature = "aws-kms")]
mod aws_kms;
mod dek;
mod kek;
mod pkcs11;
pub(crate) mod plain;
mod token;

#[cfg(feature = "aws-kms")]
pub use aws_kms::AwsKmsKek;
pub use dek::{CountSink, DataKey, Dek, HASH_LEN, KeyId, Scratch, ciphertext_len, padded_len, token_len};
pub use kek::{KekProvider, KekSet, KekSource, LocalKek, open_kek};
pub use pkcs11::{Pkcs11Kek, Pkcs11Location, SecretSource};
pub use token::{HEAD_LEN as TOKEN_HEAD_LEN, Token, TokenKind};

/// Where an AWS KMS KEK is: `keys.kek = "aws-kms:KEY"` and `[keys.aws_kms]`. Parsed and checked whether or not this
/// build has the `aws-kms` feature, so `config check` reads such a config anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsKmsLocation {
    /// The KMS key: a key id, key ARN, alias name (`alias/...`) or alias ARN.
    pub key: String,
    /// The region; the standard chain's (`AWS_REGION`, the profile) when unset.
    pub region: Option<String>,
    /// Another endpoint than AWS's (a VPC endpoint, or a test server).
    pub endpoint: Option<String>,
}

/// Why an `aws-kms:` KEK cannot be opened by a build without the feature.
pub const AWS_KMS_NOT_BUILT: &str = "keys.kek names an AWS KMS key, but this piiwall was built without AWS KMS support: \
     build it with `cargo build --release --features aws-kms` (the Docker image has it)";
