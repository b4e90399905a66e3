//! Data keys: one 32-byte secret, with the per-purpose keys derived from it kept ready for use.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aes_gcm::aead::{Aead, AeadCore, AeadInPlace, KeyInit, Payload};
use aes_gcm::{AesGcm, Nonce};

/// AES-256-GCM over the encrypt-only AES: GCM never runs the block cipher backwards, so the decryption key schedule
/// `Aes256Gcm` also expands (a round of `aesimc` per round key) is not made. The same cipher, bit for bit.
type Aes256Gcm = AesGcm<aes::Aes256Enc, aes_gcm::aead::consts::U12>;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::token::{HEAD_LEN, Token, TokenKind};
use crate::error::RevealError;

type HmacSha256 = Hmac<Sha256>;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The public name of a data key: 12 random bytes, shown as 16 URL-safe characters inside tokens.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 12]);

impl KeyId {
    pub fn random() -> Self {
        Self(rand::random())
    }

    pub fn to_text(self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn from_text(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

/// Key ids link tokens of one subject together: keep them out of logs.
impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyId(..)")
    }
}

/// A data key as the key caches hold it: its per-purpose keys derived (HKDF, done once per unwrap), its two AES
/// keys not yet expanded. About 450 bytes, where a [`Dek`] takes 2.4 KB (two AES-256 key schedules of ~1 KB each,
/// for the run-time dispatch between AES-NI and the portable code): a cache of 100,000 subjects' keys fits in ~50
/// MB. [`expand`](Self::expand) makes the `Dek` that works with it, once per batch of records.
pub struct DataKey {
    pub key_id: KeyId,
    pub version: u32,
    encrypt: Zeroizing<[u8; 32]>,
    token: Zeroizing<[u8; 32]>,
    token_nonce: HmacSha256,
    hash: HmacSha256,
    /// `<prefix>.<key id>.` of this key's tokens, ciphertexts and hashes.
    heads: [[u8; HEAD_LEN]; 3],
    /// Random-nonce encryptions under this key not yet added to the key store's count (`Keyring::retire_worn`):
    /// shared by every `Dek` expanded from it.
    unrecorded: Arc<AtomicU64>,
    /// Where that count goes when the last copy of this key is dropped before it was recorded (see [`counted`]).
    ///
    /// [`counted`]: Self::counted
    leftover: Option<CountSink>,
}

/// Takes the encryption count of a data key dropped before the count was recorded: given the key id and the key's
/// counter, it swaps the counter to 0 under its own lock (so a clean stop that holds that lock sees the count either
/// in the counter or in the sink, never in between).
pub type CountSink = Arc<dyn Fn(KeyId, &AtomicU64) + Send + Sync>;

impl Drop for DataKey {
    fn drop(&mut self) {
        // Nothing else can add to it now: a zero stays zero.
        if let (Some(sink), true) = (&self.leftover, self.unrecorded.load(Ordering::Relaxed) > 0) {
            sink(self.key_id, &self.unrecorded);
        }
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl DataKey {
    /// Derives the per-purpose keys from the 32 secret bytes of a data key.
    pub fn new(key_id: KeyId, version: u32, secret: &[u8]) -> Self {
        let hkdf = Hkdf::<Sha256>::new(Some(b"piiwall dek v1"), secret);
        let derive = |label: &[u8]| {
            let mut okm = Zeroizing::new([0u8; 32]);
            hkdf.expand(label, okm.as_mut_slice())
                .expect("32 bytes is a valid HKDF-SHA256 length");
            okm
        };
        Self {
            key_id,
            version,
            encrypt: derive(b"encrypt"),
            token: derive(b"tokenize"),
            token_nonce: <HmacSha256 as Mac>::new_from_slice(derive(b"tokenize nonce").as_slice()).expect("any length"),
            hash: <HmacSha256 as Mac>::new_from_slice(derive(b"hash").as_slice()).expect("any length"),
            heads: [TokenKind::Token, TokenKind::Ciphertext, TokenKind::Hash].map(|kind| Token::head(kind, key_id)),
            unrecorded: Arc::default(),
            leftover: None,
        }
    }

    /// The key with `carried` encryptions not yet recorded (left by an earlier copy of it), whose count goes to
    /// `sink` if this copy is dropped before the count is recorded: a key whose cache entry expires and is filled
    /// again keeps counting where it was, so it reaches its recording step and rotates however often it is reloaded.
    pub fn counted(mut self, carried: u64, sink: CountSink) -> Self {
        self.unrecorded.store(carried, Ordering::Relaxed);
        self.leftover = Some(sink);
        self
    }

    /// This key's count of encryptions not yet recorded, for a clean stop to take whether or not a cache still
    /// holds the key (`Keyring::record_all_counts`); an atomic swap takes it, so it is never recorded twice.
    pub fn unrecorded_count(&self) -> std::sync::Weak<AtomicU64> {
        Arc::downgrade(&self.unrecorded)
    }

    /// The key ready for use: its AES keys expanded (two key schedules and GHASH keys, a fraction of a
    /// microsecond).
    pub fn expand(self: &Arc<Self>) -> Dek {
        Dek {
            key_id: self.key_id,
            version: self.version,
            encrypt: Aes256Gcm::new_from_slice(self.encrypt.as_slice()).expect("32-byte key"),
            token: Aes256Gcm::new_from_slice(self.token.as_slice()).expect("32-byte key"),
            key: self.clone(),
        }
    }
}

/// A data key, unwrapped, with its derived ciphers keyed: what records are sanitized with. Dropping it zeroizes
/// the AES key schedules.
pub struct Dek {
    pub key_id: KeyId,
    pub version: u32,
    encrypt: Aes256Gcm,
    token: Aes256Gcm,
    key: Arc<DataKey>,
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dek")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Dek {
    /// Derives the per-purpose keys from the 32 secret bytes of a data key and expands them.
    pub fn new(key_id: KeyId, version: u32, secret: &[u8]) -> Self {
        Arc::new(DataKey::new(key_id, version, secret)).expand()
    }

    /// The compact form it was expanded from (see [`DataKey`]).
    pub fn data_key(&self) -> &Arc<DataKey> {
        &self.key
    }

    /// Takes the count of encryptions not yet recorded in the key store, once it has reached `at_least`.
    pub fn take_unrecorded(&self, at_least: u64) -> Option<u64> {
        let unrecorded = &self.key.unrecorded;
        (unrecorded.load(Ordering::Relaxed) >= at_least).then(|| unrecorded.swap(0, Ordering::Relaxed))
    }

    /// Gives back a count taken by [`take_unrecorded`](Self::take_unrecorded) that the store did not record.
    pub fn restore_unrecorded(&self, count: u64) {
        self.key.unrecorded.fetch_add(count, Ordering::Relaxed);
    }

    /// A deterministic, reversible token of `plaintext`, bound to `context`.
    pub fn tokenize(&self, context: &str, plaintext: &[u8]) -> String {
        text(|out| self.tokenize_into(context, plaintext, &mut Scratch::default(), out))
    }

    /// A randomized ciphertext of `plaintext`, bound to `context`.
    pub fn encrypt(&self, context: &str, plaintext: &[u8]) -> String {
        text(|out| self.encrypt_into(context, plaintext, &mut Scratch::default(), out))
    }

    /// A keyed, irreversible pseudonym of `plaintext` within `context`.
    pub fn hash(&self, context: &str, plaintext: &[u8]) -> String {
        text(|out| self.hash_into(context, plaintext, out))
    }

    /// Appends the token of `plaintext` to `out`: [`token_len`] bytes.
    pub fn tokenize_into(&self, context: &str, plaintext: &[u8], scratch: &mut Scratch, out: &mut Vec<u8>) {
        associated_data(TokenKind::Token, self.key_id, context, &mut scratch.ad);
        // The nonce key is this DEK's own, so the key id need not be hashed again; with the context's length
        // first, a field name and a value of common sizes fit one SHA-256 block.
        let mut mac = self.key.token_nonce.clone();
        mac.update(&(context.len() as u32).to_be_bytes());
        mac.update(context.as_bytes());
        mac.update(plaintext);
        let digest = mac.finalize().into_bytes();
        self.seal_into(
            &self.token,
            TokenKind::Token,
            &digest[..NONCE_LEN],
            plaintext,
            scratch,
            out,
        );
    }

    /// Appends a randomized ciphertext of `plaintext` to `out`: [`ciphertext_len`] bytes. The plaintext is padded
    /// (see [`padded_len`]) so that the ciphertext's length does not give short values away.
    pub fn encrypt_into(&self, context: &str, plaintext: &[u8], scratch: &mut Scratch, out: &mut Vec<u8>) {
        associated_data(TokenKind::Ciphertext, self.key_id, context, &mut scratch.ad);
        // The thread-local CSPRNG (ChaCha, reseeded from the OS) rather than a system call per value.
        let nonce = aes_gcm::Aes256Gcm::generate_nonce(&mut rand::thread_rng());
        // Random 96-bit nonces bound the encryptions per key (2^32, NIST SP 800-38D): counted for rotation.
        self.key.unrecorded.fetch_add(1, Ordering::Relaxed);
        let payload = &mut scratch.payload;
        payload.clear();
        payload.extend_from_slice(&nonce);
        payload.extend_from_slice(plaintext);
        payload.push(PAD_MARK);
        payload.resize(NONCE_LEN + padded_len(plaintext.len()), 0);
        self.seal_payload(&self.encrypt, TokenKind::Ciphertext, scratch, out);
    }

    /// Appends the keyed hash of `plaintext` to `out`: [`HASH_LEN`] bytes.
    pub fn hash_into(&self, context: &str, plaintext: &[u8], out: &mut Vec<u8>) {
        Token::render_with_head(self.head(TokenKind::Hash), &self.mac(context, plaintext), out);
    }

    /// HMAC-SHA256 of `data` within `context`, under this key's hash key.
    pub fn mac(&self, context: &str, data: &[u8]) -> [u8; 32] {
        let mut mac = self.key.hash.clone();
        mac.update(&(context.len() as u32).to_be_bytes());
        mac.update(context.as_bytes());
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// Opens a token or ciphertext issued under this key for `context`.
    pub fn open(&self, token: &Token, context: &str) -> Result<Zeroizing<Vec<u8>>, RevealError> {
        let cipher = match token.kind {
            TokenKind::Token => &self.token,
            TokenKind::Ciphertext | TokenKind::CiphertextV1 => &self.encrypt,
            TokenKind::Hash => return Err(RevealError::NotReversible("hash")),
        };
        if token.payload.len() < NONCE_LEN + TAG_LEN {
            return Err(RevealError::Malformed("the payload is too short"));
        }
        let (nonce, sealed) = token.payload.split_at(NONCE_LEN);
        let mut ad = Vec::new();
        associated_data(token.kind, token.key_id, context, &mut ad);
        let mut plaintext = cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: &ad })
            .map(Zeroizing::new)
            .map_err(|_| RevealError::Forged)?;
        if token.kind == TokenKind::Ciphertext {
            let end = plaintext.iter().rposition(|&b| b != 0);
            match end {
                Some(end) if plaintext[end] == PAD_MARK => plaintext.truncate(end),
                _ => return Err(RevealError::Forged),
            }
        }
        Ok(plaintext)
    }

    fn head(&self, kind: TokenKind) -> &[u8; HEAD_LEN] {
        &self.key.heads[match kind {
            TokenKind::Token => 0,
            TokenKind::Ciphertext | TokenKind::CiphertextV1 => 1,
            TokenKind::Hash => 2,
        }]
    }

    fn seal_into(
        &self,
        cipher: &Aes256Gcm,
        kind: TokenKind,
        nonce: &[u8],
        plaintext: &[u8],
        scratch: &mut Scratch,
        out: &mut Vec<u8>,
    ) {
        let payload = &mut scratch.payload;
        payload.clear();
        payload.extend_from_slice(nonce);
        payload.extend_from_slice(plaintext);
        self.seal_payload(cipher, kind, scratch, out);
    }

    /// Encrypts `scratch.payload` (nonce, then plaintext) in place, appends the tag and writes the token.
    fn seal_payload(&self, cipher: &Aes256Gcm, kind: TokenKind, scratch: &mut Scratch, out: &mut Vec<u8>) {
        let payload = &mut scratch.payload;
        let (nonce, plaintext) = payload.split_at_mut(NONCE_LEN);
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(nonce), &scratch.ad, plaintext)
            .expect("AES-GCM encrypts any input under 64 GiB");
        payload.extend_from_slice(&tag);
        Token::render_with_head(self.head(kind), payload, out);
    }
}

/// Reusable buffers for building tokens, so the hot path allocates nothing per value. Holds no secret: the
/// payload buffer holds plaintext only for the instant between copy and in-place encryption.
#[derive(Default)]
pub struct Scratch {
    ad: Vec<u8>,
    payload: Vec<u8>,
}

/// Ends a plaintext inside a `pwe2` ciphertext; zero bytes follow up to the padded length (ISO/IEC 7816-4 padding).
const PAD_MARK: u8 = 0x80;

/// The length a plaintext is padded to before `encrypt`: the next multiple of 16 above it (room for the pad mark),
/// and at least 32, so every plaintext of up to 31 bytes (a tag byte and 30 bytes of value) gives a ciphertext of
/// one length.
pub const fn padded_len(plaintext_len: usize) -> usize {
    let next = (plaintext_len / 16 + 1) * 16;
    if next < 32 { 32 } else { next }
}

/// The length of the text of a token of a `plaintext_len`-byte plaintext.
pub const fn token_len(plaintext_len: usize) -> usize {
    Token::text_len(NONCE_LEN + plaintext_len + TAG_LEN)
}

/// The length of the text of a ciphertext (`encrypt`) of a `plaintext_len`-byte plaintext.
pub const fn ciphertext_len(plaintext_len: usize) -> usize {
    Token::text_len(NONCE_LEN + padded_len(plaintext_len) + TAG_LEN)
}

/// The length of the text of a hash.
pub const HASH_LEN: usize = Token::text_len(32);

fn text(write: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut out = Vec::new();
    write(&mut out);
    String::from_utf8(out).expect("tokens are ASCII")
}

/// What a ciphertext is bound to: its kind and format version, its key id and its context. Kept short: GCM
/// authenticates it 16 bytes at a time.
fn associated_data(kind: TokenKind, key_id: KeyId, context: &str, ad: &mut Vec<u8>) {
    ad.clear();
    let (letter, version) = match kind {
        TokenKind::Token => (b't', 1),
        TokenKind::Ciphertext => (b'e', 2),
        TokenKind::CiphertextV1 => (b'e', 1),
        TokenKind::Hash => (b'h', 1),
    };
    ad.push(letter);
    ad.push(version);
    ad.extend_from_slice(&key_id.0);
    ad.extend_from_slice(context.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dek() -> Dek {
        Dek::new(KeyId([1; 12]), 1, &[9; 32])
    }

    fn parse(text: &str) -> Token {
        Token::parse(text).unwrap()
    }

    /// Compiles only when `T` wipes its memory on drop.
    fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>() {}

    #[test]
    fn key_schedules_are_zeroized_on_drop() {
        // The AES-256 round keys behind both ciphers of every data key. (The GHASH key H = AES_K(0) of each cipher
        // is not: polyval's run-time-dispatched backend has no `Drop`. H reveals nothing of K.)
        zeroized_on_drop::<aes::Aes256Enc>();
    }

    /// The key caches hold `DataKey`s: a cache of 100,000 keys must stay within tens of megabytes.
    #[test]
    fn a_cached_key_is_small() {
        let size = std::mem::size_of::<DataKey>();
        assert!(size <= 512, "a DataKey takes {size} bytes");
    }

    /// Every `Dek` expanded from one `DataKey` seals and opens alike, and counts its encryptions in the one count
    /// rotation reads (a batch's expansion must not lose the encryptions of another).
    #[test]
    fn expansions_of_a_key_are_one_key() {
        let key = Arc::new(DataKey::new(KeyId([1; 12]), 1, &[9; 32]));
        let (a, b) = (key.expand(), key.expand());
        assert_eq!(a.tokenize("email", b"ada"), b.tokenize("email", b"ada"));
        let sealed = a.encrypt("email", b"ada");
        assert_eq!(&b.open(&parse(&sealed), "email").unwrap()[..], b"ada");
        a.encrypt("email", b"x");
        assert_eq!(b.take_unrecorded(2), Some(2));
        assert_eq!(a.take_unrecorded(1), None);
    }

    #[test]
    fn tokenize_is_deterministic_and_reversible() {
        let dek = dek();
        let a = dek.tokenize("email", b"ada@example.com");
        assert_eq!(a, dek.tokenize("email", b"ada@example.com"));
        assert_ne!(a, dek.tokenize("email", b"bob@example.com"));
        assert_ne!(a, dek.tokenize("contact", b"ada@example.com"));
        assert_eq!(dek.open(&parse(&a), "email").unwrap().as_slice(), b"ada@example.com");
    }

    #[test]
    fn encrypt_never_repeats_and_is_reversible() {
        let dek = dek();
        let a = dek.encrypt("note", b"secret");
        let b = dek.encrypt("note", b"secret");
        assert_ne!(a, b);
        assert_eq!(dek.open(&parse(&a), "note").unwrap().as_slice(), b"secret");
    }

    #[test]
    fn context_and_key_id_are_bound() {
        let dek = dek();
        let token = dek.tokenize("email", b"x");
        assert_eq!(dek.open(&parse(&token), "phone").unwrap_err(), RevealError::Forged);
        let mut relabelled = parse(&token);
        relabelled.key_id = KeyId([2; 12]);
        assert_eq!(dek.open(&relabelled, "email").unwrap_err(), RevealError::Forged);
        let other = Dek::new(KeyId([1; 12]), 1, &[8; 32]);
        assert_eq!(other.open(&parse(&token), "email").unwrap_err(), RevealError::Forged);
    }

    #[test]
    fn token_lengths_are_known_in_advance() {
        let dek = dek();
        for len in [0, 1, 2, 3, 30, 100] {
            let plaintext = vec![b'x'; len];
            assert_eq!(dek.tokenize("c", &plaintext).len(), token_len(len));
            assert_eq!(dek.encrypt("c", &plaintext).len(), ciphertext_len(len));
            assert_eq!(dek.hash("c", &plaintext).len(), HASH_LEN);
        }
    }

    #[test]
    fn ciphertexts_of_short_values_have_one_length() {
        let dek = dek();
        // A tag byte and up to 30 bytes of value: MALE/FEMALE/OTHER, yes/no, small numbers all look alike.
        let lengths: std::collections::BTreeSet<usize> =
            (1..=31).map(|len| dek.encrypt("sex", &vec![b'x'; len]).len()).collect();
        assert_eq!(lengths.len(), 1, "{lengths:?}");
        assert!(dek.encrypt("sex", &[b'x'; 32]).len() > dek.encrypt("sex", b"x").len());
        for len in [0, 1, 15, 16, 17, 29, 30, 31, 32, 100] {
            let plaintext: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37) | 1).collect();
            let token = dek.encrypt("c", &plaintext);
            assert_eq!(
                dek.open(&parse(&token), "c").unwrap().as_slice(),
                plaintext,
                "{len} bytes"
            );
        }
        // Trailing zero bytes are value, not padding.
        let token = dek.encrypt("c", &[7, 0, 0]);
        assert_eq!(dek.open(&parse(&token), "c").unwrap().as_slice(), [7, 0, 0]);
    }

    #[test]
    fn unpadded_ciphertexts_written_before_padding_still_open() {
        let dek = dek();
        let mut ad = Vec::new();
        associated_data(TokenKind::CiphertextV1, dek.key_id, "note", &mut ad);
        let nonce = [5u8; NONCE_LEN];
        let sealed = dek
            .encrypt
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: b"old", aad: &ad })
            .unwrap();
        let token = Token::render(TokenKind::CiphertextV1, dek.key_id, &[&nonce[..], &sealed].concat());
        assert!(token.starts_with("pwe1."));
        assert_eq!(dek.open(&parse(&token), "note").unwrap().as_slice(), b"old");
    }

    #[test]
    fn a_padded_ciphertext_relabelled_as_unpadded_does_not_open() {
        let dek = dek();
        let token = dek.encrypt("c", b"value");
        let relabelled = token.replacen("pwe2.", "pwe1.", 1);
        assert_eq!(dek.open(&parse(&relabelled), "c").unwrap_err(), RevealError::Forged);
    }

    #[test]
    fn hash_is_deterministic_and_not_reversible() {
        let dek = dek();
        assert_eq!(dek.hash("ip", b"10.0.0.1"), dek.hash("ip", b"10.0.0.1"));
        assert_ne!(dek.hash("ip", b"10.0.0.1"), dek.hash("ip", b"10.0.0.2"));
        let token = parse(&dek.hash("ip", b"10.0.0.1"));
        assert_eq!(dek.open(&token, "ip").unwrap_err(), RevealError::NotReversible("hash"));
    }
}
