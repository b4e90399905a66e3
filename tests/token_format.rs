//! docs/token-format.md checked from outside. piiwall's [`Dek`] only writes the tokens here; everything that reads
//! them is the spec done again with the RustCrypto primitives (HKDF, HMAC, AES-GCM, base64), and then a second time in
//! Python (`tests/token_format.py`). The worked example is read out of the document itself, so the document cannot
//! drift from the code. Where tokens go back into piiwall (`Dek::open`), it is to check the other direction:
//! ciphertexts built from the document alone reveal in piiwall.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use piiwall::crypto::{Dek, KeyId, Token};
use serde_json::{Value as Json, json};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The data key and key id of the worked example.
const SECRET: [u8; 32] = [9; 32];
const KEY_ID: [u8; 12] = [1; 12];
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const PAD_MARK: u8 = 0x80;

/// Contexts of every shape: a kind, a nested field path, a map key's, non-ASCII, and empty.
const CONTEXTS: [&str; 5] = ["email", "customer.address.city", "attributes#key", "prénom.名前", ""];

fn lengths() -> impl Iterator<Item = usize> {
    (0..=40).chain([100])
}

fn dek() -> Dek {
    Dek::new(KeyId(KEY_ID), 1, &SECRET)
}

/// A plaintext of `len` bytes: a string tag, then bytes that vary (and include zeros) so that no run hides a bug.
fn plaintext(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if i == 0 {
                0
            } else {
                u8::try_from(i * 37 % 251).expect("below 251")
            }
        })
        .collect()
}

/// The worked example's plaintext: tag 0 (string), then the value.
fn example_plaintext() -> Vec<u8> {
    let mut plaintext = vec![0];
    plaintext.extend_from_slice(b"ada@example.com");
    plaintext
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|&b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

// ---- The spec, done again with the primitives ----

/// `HKDF-SHA256(salt = "piiwall dek v1", IKM = data key, info = label, L = 32)`.
fn derive(secret: &[u8], label: &str) -> [u8; 32] {
    let mut key = [0; 32];
    Hkdf::<Sha256>::new(Some(b"piiwall dek v1"), secret)
        .expand(label.as_bytes(), &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    key
}

/// `u32be(len(context)) || context || plaintext`: what the `pwt1` nonce and the `pwh1` payload are MACs of.
fn mac_input(context: &str, plaintext: &[u8]) -> Vec<u8> {
    let mut input = u32::try_from(context.len())
        .expect("a short context")
        .to_be_bytes()
        .to_vec();
    input.extend_from_slice(context.as_bytes());
    input.extend_from_slice(plaintext);
    input
}

/// HMAC-SHA256 of [`mac_input`].
fn keyed_mac(key: &[u8; 32], context: &str, plaintext: &[u8]) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(&mac_input(context, plaintext));
    mac.finalize().into_bytes().into()
}

/// The HKDF label of the key, and the kind letter and version byte of the associated data, of a prefix.
fn format_of(prefix: &str) -> (&'static str, u8, u8) {
    match prefix {
        "pwt1" => ("tokenize", b't', 1),
        "pwe2" => ("encrypt", b'e', 2),
        "pwe1" => ("encrypt", b'e', 1),
        "pwh1" => ("hash", b'h', 1),
        other => panic!("unknown prefix {other:?}"),
    }
}

fn associated_data(letter: u8, version: u8, key_id: [u8; 12], context: &str) -> Vec<u8> {
    let mut ad = vec![letter, version];
    ad.extend_from_slice(&key_id);
    ad.extend_from_slice(context.as_bytes());
    ad
}

fn cipher(secret: &[u8], label: &str) -> Aes256Gcm {
    Aes256Gcm::new_from_slice(&derive(secret, label)).expect("a 32-byte key")
}

/// The next multiple of 16 strictly above `n`, at least 32.
fn padded_len(n: usize) -> usize {
    ((n / 16 + 1) * 16).max(32)
}

fn pad(plaintext: &[u8]) -> Vec<u8> {
    let mut padded = plaintext.to_vec();
    padded.push(PAD_MARK);
    padded.resize(padded_len(plaintext.len()), 0);
    padded
}

/// Strips the padding, checking it is exactly what a writer must produce.
fn unpad(padded: &[u8]) -> Vec<u8> {
    let end = padded
        .iter()
        .rposition(|&b| b != 0)
        .expect("a 0x80 before the zero bytes");
    assert_eq!(padded[end], PAD_MARK, "the padding starts with 0x80");
    assert_eq!(
        padded.len(),
        padded_len(end),
        "{end} bytes are padded to padded_len({end})"
    );
    padded[..end].to_vec()
}

/// A token's three parts, decoded.
struct Parsed {
    prefix: String,
    key_id: [u8; 12],
    payload: Vec<u8>,
}

fn parse(text: &str) -> Parsed {
    let parts: Vec<&str> = text.split('.').collect();
    let &[prefix, key_id, payload] = parts.as_slice() else {
        panic!("expected three dot-separated parts, got {}", parts.len());
    };
    assert_eq!(key_id.len(), 16, "the key id is 16 characters");
    let decode = |part: &str| {
        let bytes = URL_SAFE_NO_PAD.decode(part).expect("unpadded URL-safe base64");
        assert_eq!(URL_SAFE_NO_PAD.encode(&bytes), part, "canonical base64");
        bytes
    };
    Parsed {
        prefix: prefix.to_owned(),
        key_id: decode(key_id).try_into().expect("a 12-byte key id"),
        payload: decode(payload),
    }
}

/// Reveals a `pwt1`, `pwe2` or `pwe1` token; `None` when it does not authenticate.
fn open(secret: &[u8], context: &str, text: &str) -> Option<Vec<u8>> {
    let token = parse(text);
    assert_ne!(token.prefix, "pwh1", "a hash is not reversible");
    let (label, letter, version) = format_of(&token.prefix);
    assert!(token.payload.len() >= NONCE_LEN + TAG_LEN, "a nonce and a tag at least");
    let (nonce, sealed) = token.payload.split_at(NONCE_LEN);
    let ad = associated_data(letter, version, token.key_id, context);
    let opened = cipher(secret, label)
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: &ad })
        .ok()?;
    Some(if token.prefix == "pwe2" { unpad(&opened) } else { opened })
}

fn reveal(secret: &[u8], context: &str, text: &str) -> Vec<u8> {
    open(secret, context, text).expect("the token authenticates")
}

/// Writes a `pwt1`, `pwe2` or `pwe1` token of `message` (for `pwe2`, already padded) under `nonce`.
fn seal(prefix: &str, secret: &[u8], context: &str, nonce: &[u8; 12], message: &[u8]) -> String {
    let (label, letter, version) = format_of(prefix);
    let ad = associated_data(letter, version, KEY_ID, context);
    let sealed = cipher(secret, label)
        .encrypt(Nonce::from_slice(nonce), Payload { msg: message, aad: &ad })
        .expect("AES-GCM seals any short message");
    let mut payload = nonce.to_vec();
    payload.extend_from_slice(&sealed);
    format!(
        "{prefix}.{}.{}",
        URL_SAFE_NO_PAD.encode(KEY_ID),
        URL_SAFE_NO_PAD.encode(payload)
    )
}

/// A `pwt1` token written from the document alone.
fn spec_tokenize(secret: &[u8], context: &str, plaintext: &[u8]) -> String {
    let digest = keyed_mac(&derive(secret, "tokenize nonce"), context, plaintext);
    let nonce: [u8; 12] = digest[..NONCE_LEN].try_into().expect("12 bytes");
    seal("pwt1", secret, context, &nonce, plaintext)
}

// ---- piiwall's tokens, read by the spec ----

#[test]
fn tokens_decrypt_and_carry_their_synthetic_nonce() {
    let dek = dek();
    let nonce_key = derive(&SECRET, "tokenize nonce");
    for context in CONTEXTS {
        for len in lengths() {
            let plaintext = plaintext(len);
            let token = dek.tokenize(context, &plaintext);
            let parsed = parse(&token);
            assert_eq!(parsed.prefix, "pwt1");
            assert_eq!(parsed.key_id, KEY_ID);
            assert_eq!(
                parsed.payload.len(),
                NONCE_LEN + len + TAG_LEN,
                "{context:?}, {len} bytes"
            );
            assert_eq!(reveal(&SECRET, context, &token), plaintext, "{context:?}, {len} bytes");
            assert_eq!(
                &parsed.payload[..NONCE_LEN],
                &keyed_mac(&nonce_key, context, &plaintext)[..NONCE_LEN],
                "{context:?}, {len} bytes: the nonce is the synthetic one"
            );
            assert_eq!(
                token,
                spec_tokenize(&SECRET, context, &plaintext),
                "{context:?}, {len} bytes"
            );
            assert!(open(&SECRET, "another.field", &token).is_none(), "the context is bound");
        }
    }
}

#[test]
fn ciphertexts_decrypt_and_unpad() {
    let dek = dek();
    for context in CONTEXTS {
        for len in lengths() {
            let plaintext = plaintext(len);
            let first = dek.encrypt(context, &plaintext);
            let parsed = parse(&first);
            assert_eq!(parsed.prefix, "pwe2");
            assert_eq!(parsed.key_id, KEY_ID);
            assert_eq!(
                parsed.payload.len(),
                NONCE_LEN + padded_len(len) + TAG_LEN,
                "{context:?}, {len} bytes"
            );
            assert_eq!(reveal(&SECRET, context, &first), plaintext, "{context:?}, {len} bytes");
            assert!(open(&SECRET, "another.field", &first).is_none(), "the context is bound");
            let second = parse(&dek.encrypt(context, &plaintext));
            assert_ne!(
                &second.payload[..NONCE_LEN],
                &parsed.payload[..NONCE_LEN],
                "a fresh nonce each time"
            );
        }
    }
    // Values that end like padding: only the last 0x80 and the zeros after it are padding.
    let tricky: [&[u8]; 6] = [
        &[PAD_MARK],
        &[7, PAD_MARK],
        &[7, PAD_MARK, 0, 0],
        &[7, 0, 0],
        &[0; 31],
        &[PAD_MARK; 32],
    ];
    for value in tricky {
        assert_eq!(reveal(&SECRET, "c", &dek.encrypt("c", value)), value);
    }
}

#[test]
fn hashes_are_keyed_macs_of_context_and_plaintext() {
    let dek = dek();
    let hash_key = derive(&SECRET, "hash");
    for context in CONTEXTS {
        for len in lengths() {
            let plaintext = plaintext(len);
            let hash = dek.hash(context, &plaintext);
            assert_eq!(hash.len(), 65);
            let parsed = parse(&hash);
            assert_eq!(parsed.prefix, "pwh1");
            assert_eq!(parsed.key_id, KEY_ID);
            assert_eq!(
                parsed.payload,
                keyed_mac(&hash_key, context, &plaintext),
                "{context:?}, {len} bytes"
            );
        }
    }
}

#[test]
fn a_hash_is_keyed_by_the_data_key_and_the_context() {
    let plaintext = example_plaintext();
    let ours = dek();
    let hash = parse(&ours.hash("email", &plaintext)).payload;
    assert_eq!(hash, parse(&ours.hash("email", &plaintext)).payload, "deterministic");

    let other_secret = [10u8; 32];
    let other = Dek::new(KeyId(KEY_ID), 1, &other_secret);
    let other_hash = parse(&other.hash("email", &plaintext)).payload;
    assert_ne!(hash, other_hash, "another data key, another pseudonym");
    assert_eq!(
        other_hash,
        keyed_mac(&derive(&other_secret, "hash"), "email", &plaintext)
    );

    let other_context = parse(&ours.hash("contact.email", &plaintext)).payload;
    assert_ne!(hash, other_context, "another context, another pseudonym");

    // Nor is it a plain digest anyone could recompute from a guess.
    let unkeyed = <Sha256 as sha2::Digest>::digest(mac_input("email", &plaintext));
    assert_ne!(hash, unkeyed.to_vec());
}

#[test]
fn short_plaintexts_give_ciphertexts_of_one_length() {
    let dek = dek();
    let sizes: BTreeSet<usize> = (0..=31).map(|len| dek.encrypt("sex", &plaintext(len)).len()).collect();
    // 22 characters of head, then 80 for 12 nonce + 32 padded + 16 tag bytes.
    assert_eq!(sizes, BTreeSet::from([102]), "every plaintext of up to 31 bytes");
    assert!(dek.encrypt("sex", &plaintext(32)).len() > 102);
}

// ---- The document ----

fn document() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/token-format.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The complete tokens with `prefix` the document shows (a placeholder such as `<prefix>.<key id>.` is not one).
fn tokens_in(doc: &str, prefix: &str) -> BTreeSet<String> {
    doc.match_indices(prefix)
        .map(|(at, _)| {
            let token: String = doc[at..]
                .chars()
                .take_while(|&c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                .collect();
            token.trim_end_matches('.').to_owned()
        })
        .filter(|token| {
            let parts: Vec<&str> = token.split('.').collect();
            parts.len() == 3 && parts.iter().all(|part| !part.is_empty())
        })
        .collect()
}

fn the_one(doc: &str, prefix: &str) -> String {
    let tokens = tokens_in(doc, prefix);
    assert_eq!(
        tokens.len(),
        1,
        "docs/token-format.md shows one {prefix} token: {tokens:?}"
    );
    tokens.into_iter().next().expect("one token")
}

#[test]
fn the_worked_example_is_what_piiwall_writes() {
    let doc = document();
    let dek = dek();
    let context = "email";
    let plaintext = example_plaintext();

    let token = the_one(&doc, "pwt1.");
    assert_eq!(token, dek.tokenize(context, &plaintext), "the pwt1 example");
    assert_eq!(reveal(&SECRET, context, &token), plaintext);
    let hash = the_one(&doc, "pwh1.");
    assert_eq!(hash, dek.hash(context, &plaintext), "the pwh1 example");

    // pwe2 draws its nonce at random: the example is rebuilt from its own nonce, and piiwall must reveal it.
    let ciphertext = the_one(&doc, "pwe2.");
    let pwe2 = parse(&ciphertext);
    let pwe2_nonce: [u8; 12] = pwe2.payload[..NONCE_LEN].try_into().expect("12 bytes");
    let padded = pad(&plaintext);
    assert_eq!(
        ciphertext,
        seal("pwe2", &SECRET, context, &pwe2_nonce, &padded),
        "the pwe2 example"
    );
    assert_eq!(reveal(&SECRET, context, &ciphertext), plaintext);
    let revealed = dek
        .open(&Token::parse(&ciphertext).expect("parses"), context)
        .expect("piiwall reveals it");
    assert_eq!(revealed.as_slice(), plaintext.as_slice());

    // Every intermediate value the document shows.
    let pwt1 = parse(&token).payload;
    let (pwt1_sealed, pwt1_tag) = pwt1[NONCE_LEN..].split_at(plaintext.len());
    let (pwe2_sealed, pwe2_tag) = pwe2.payload[NONCE_LEN..].split_at(padded.len());
    let mut shown = vec![
        hex(&SECRET),
        hex(&KEY_ID),
        URL_SAFE_NO_PAD.encode(KEY_ID),
        hex(context.as_bytes()),
        hex(&plaintext),
        hex(&mac_input(context, &plaintext)),
        hex(&keyed_mac(&derive(&SECRET, "tokenize nonce"), context, &plaintext)),
        hex(&associated_data(b't', 1, KEY_ID, context)),
        hex(pwt1_sealed),
        hex(pwt1_tag),
        hex(&pwt1),
        hex(&keyed_mac(&derive(&SECRET, "hash"), context, &plaintext)),
        hex(&pwe2_nonce),
        hex(&padded),
        hex(&associated_data(b'e', 2, KEY_ID, context)),
        hex(pwe2_sealed),
        hex(pwe2_tag),
    ];
    for label in ["encrypt", "tokenize", "tokenize nonce", "hash"] {
        shown.push(hex(&derive(&SECRET, label)));
    }
    for value in shown {
        assert!(doc.contains(&value), "docs/token-format.md does not show {value}");
    }
}

#[test]
fn ciphertexts_built_from_the_document_reveal_in_piiwall() {
    let dek = dek();
    for context in CONTEXTS {
        for len in lengths() {
            let plaintext = plaintext(len);
            let nonce = [u8::try_from(len % 256).expect("below 256"); NONCE_LEN];
            for text in [
                seal("pwe2", &SECRET, context, &nonce, &pad(&plaintext)),
                seal("pwe1", &SECRET, context, &nonce, &plaintext),
            ] {
                let token = Token::parse(&text).expect("parses");
                let revealed = dek.open(&token, context).expect("piiwall reveals it");
                assert_eq!(revealed.as_slice(), plaintext.as_slice(), "{context:?}, {len} bytes");
            }
        }
    }
}

// ---- A second implementation, in Python ----

#[test]
fn a_python_reader_written_from_the_document_reads_piiwall_tokens() {
    const NEEDS: &str = "tests/token_format.py needs Python 3.11+ with the `cryptography` package";
    match Command::new("python3").args(["-c", "import cryptography"]).output() {
        Ok(probe) if probe.status.success() => {}
        Ok(_) => panic!("python3 cannot import cryptography: {NEEDS}: pip install cryptography"),
        Err(e) => panic!("python3 does not run ({e}): {NEEDS}: install python3, then pip install cryptography"),
    }

    let mut vectors = Vec::new();
    for (secret, key_id) in [(SECRET, KEY_ID), ([0xa5; 32], [0xfe; 12])] {
        let dek = Dek::new(KeyId(key_id), 1, &secret);
        for context in CONTEXTS {
            for len in lengths() {
                let plaintext = plaintext(len);
                for (kind, token) in [
                    ("pwt1", dek.tokenize(context, &plaintext)),
                    ("pwe2", dek.encrypt(context, &plaintext)),
                    ("pwh1", dek.hash(context, &plaintext)),
                ] {
                    vectors.push(json!({
                        "secret": hex(&secret),
                        "context": context,
                        "kind": kind,
                        "token": token,
                        "plaintext": hex(&plaintext),
                    }));
                }
            }
        }
    }
    let count = vectors.len();
    let file = tempfile::NamedTempFile::new().expect("a temporary file");
    std::fs::write(file.path(), serde_json::to_vec(&Json::Array(vectors)).expect("JSON")).expect("writing the vectors");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/token_format.py");
    let run = Command::new("python3")
        .arg(&script)
        .arg(file.path())
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "{}: {}\n{stdout}\n{stderr}",
        script.display(),
        run.status
    );
    assert_eq!(stdout.trim(), format!("{count} passed, 0 failed"));
}
