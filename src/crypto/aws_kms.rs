//! The KEK in AWS KMS: a symmetric KMS key wraps each data key with `Encrypt` and unwraps it with `Decrypt`; the
//! KEK never leaves KMS. The data key's associated data (key id, scope, version) goes in the encryption context, so a
//! wrapped key copied onto another row does not decrypt. Credentials come from the standard AWS chain (environment,
//! profile, web identity, container or instance role).
//!
//! The SDK is asynchronous; the provider runs it on a runtime of its own (one worker thread) and waits for each
//! call, so that it serves the synchronous keyring from any thread, a runtime's or not. Wraps of many new keys go
//! out concurrently ([`KekProvider::wrap_many`]): KMS has no batch call, and one round trip per new subject in turn
//! would make a sign-up burst wait on the network.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

use super::AwsKmsLocation;
use super::kek::KekProvider;
use crate::error::KeyError;

/// The encryption-context entry that carries a wrapped key's associated data (base64url: KMS takes strings).
const CONTEXT_KEY: &str = "piiwall-ad";

/// How many KMS calls a batch's wraps keep in flight at once.
const CONCURRENT_CALLS: usize = 16;

/// A KMS client on its own runtime and the key it wraps with.
pub struct AwsKmsKek {
    runtime: Option<tokio::runtime::Runtime>,
    client: aws_sdk_kms::Client,
    key: Arc<str>,
    id: String,
}

impl AwsKmsKek {
    /// Builds the client and wraps and unwraps a test value: a key that does not exist, is disabled, or that the
    /// credentials may not use is refused here, naming the setting; KMS not answering is `StoreUnavailable` (start-up
    /// waits for it).
    pub fn open(location: &AwsKmsLocation) -> Result<Self, KeyError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("piiwall-aws-kms")
            .enable_all()
            .build()
            .map_err(|e| KeyError::StoreUnavailable(format!("cannot start the AWS KMS client's runtime: {e}")))?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(5))
                    .operation_timeout(Duration::from_secs(12))
                    .build(),
            )
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(3));
        if let Some(region) = &location.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &location.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let config = wait_on(&runtime, loader.load());
        if config.region().is_none() {
            return Err(KeyError::KekMissing(
                "aws-kms: no AWS region: set keys.aws_kms.region, or AWS_REGION in the environment".into(),
            ));
        }
        let kek = Self {
            client: aws_sdk_kms::Client::new(&config),
            runtime: Some(runtime),
            key: location.key.as_str().into(),
            id: format!("aws-kms:{}", location.key),
        };
        let probe = Zeroizing::new(rand::random::<[u8; 32]>());
        let wrapped = kek.wrap(probe.as_slice(), b"piiwall/1|kek self-test")?;
        match kek.unwrap(&wrapped, b"piiwall/1|kek self-test") {
            Ok(back) if back.as_slice() == probe.as_slice() => Ok(kek),
            Ok(_) => Err(KeyError::KekMalformed(format!(
                "{}: KMS did not give back what it encrypted; check keys.kek and keys.aws_kms.endpoint",
                kek.id
            ))),
            Err(e) => Err(e),
        }
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }
}

impl Drop for AwsKmsKek {
    fn drop(&mut self) {
        // Not `Runtime::drop`, which blocks and panics when the provider is dropped inside another runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs `future` on `runtime` and waits for it from this thread, whatever runtime this thread may belong to.
fn wait_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    future: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(future.await);
    });
    rx.recv().expect("the KMS runtime runs its calls to the end")
}

fn context(associated_data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(associated_data)
}

async fn encrypt(
    client: aws_sdk_kms::Client,
    key: Arc<str>,
    plaintext: Zeroizing<Vec<u8>>,
    associated_data: Vec<u8>,
) -> Result<Vec<u8>, SdkError<aws_sdk_kms::operation::encrypt::EncryptError>> {
    let out = client
        .encrypt()
        .key_id(&*key)
        .plaintext(Blob::new(plaintext.to_vec()))
        .encryption_context(CONTEXT_KEY, context(&associated_data))
        .send()
        .await?;
    Ok(out.ciphertext_blob.map(Blob::into_inner).unwrap_or_default())
}

impl KekProvider for AwsKmsKek {
    fn wrap(&self, plaintext: &[u8], associated_data: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut wrapped = self.wrap_many(&[(plaintext, associated_data)])?;
        Ok(wrapped.remove(0))
    }

    fn wrap_many(&self, keys: &[(&[u8], &[u8])]) -> Result<Vec<Vec<u8>>, KeyError> {
        let calls: Vec<_> = keys
            .iter()
            .map(|(plaintext, ad)| {
                encrypt(
                    self.client.clone(),
                    self.key.clone(),
                    Zeroizing::new(plaintext.to_vec()),
                    ad.to_vec(),
                )
            })
            .collect();
        let results = wait_on(self.runtime(), async move {
            let limit = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CALLS));
            let tasks: Vec<_> = calls
                .into_iter()
                .map(|call| {
                    let limit = limit.clone();
                    tokio::spawn(async move {
                        let _permit = limit.acquire_owned().await;
                        call.await
                    })
                })
                .collect();
            let mut results = Vec::with_capacity(tasks.len());
            for task in tasks {
                results.push(task.await);
            }
            results
        });
        results
            .into_iter()
            .map(|result| match result {
                Ok(Ok(wrapped)) if !wrapped.is_empty() => Ok(wrapped),
                Ok(Ok(_)) => Err(KeyError::StoreUnavailable(format!(
                    "{}: KMS answered Encrypt without a ciphertext",
                    self.id
                ))),
                Ok(Err(e)) => Err(self.failure(e, "Encrypt")),
                Err(e) => Err(KeyError::StoreUnavailable(format!(
                    "{}: an Encrypt call failed: {e}",
                    self.id
                ))),
            })
            .collect()
    }

    fn unwrap(&self, wrapped: &[u8], associated_data: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let call = self
            .client
            .decrypt()
            .key_id(&*self.key)
            .ciphertext_blob(Blob::new(wrapped))
            .encryption_context(CONTEXT_KEY, context(associated_data))
            .send();
        match wait_on(self.runtime(), call) {
            Ok(out) => Ok(Zeroizing::new(out.plaintext.map(Blob::into_inner).unwrap_or_default())),
            Err(e) => Err(self.failure(e, "Decrypt")),
        }
    }

    fn id(&self) -> String {
        self.id.clone()
    }
}

impl AwsKmsKek {
    /// What a failed KMS call means: the wrapped key does not authenticate (altered, another row's, another key's),
    /// the key or the credentials cannot do this at all (fatal: fix the key, its policy or keys.kek), or KMS is not
    /// answering now (throttled, timed out, unreachable: the batch waits and retries).
    fn failure<E: ProvideErrorMetadata + std::error::Error + 'static>(&self, e: SdkError<E>, call: &str) -> KeyError {
        let shown = aws_sdk_kms::error::DisplayErrorContext(&e);
        let SdkError::ServiceError(service) = &e else {
            return match e {
                SdkError::ConstructionFailure(_) => KeyError::KekMissing(format!(
                    "{}: the {call} request could not be made ({shown}); check keys.aws_kms and the AWS credentials",
                    self.id
                )),
                _ => KeyError::StoreUnavailable(format!("{}: AWS KMS did not answer {call}: {shown}", self.id)),
            };
        };
        let code = service.err().code().unwrap_or("");
        match meaning(code) {
            Meaning::Corrupt => KeyError::CorruptRow,
            Meaning::Refused => KeyError::KekMissing(format!(
                "{}: AWS KMS refused {call} ({code}); check keys.kek (the key exists, is enabled and symmetric), \
                 keys.aws_kms.region, and that the credentials may call kms:Encrypt and kms:Decrypt on it",
                self.id
            )),
            Meaning::Unavailable => {
                KeyError::StoreUnavailable(format!("{}: AWS KMS failed {call} ({code}): {shown}", self.id))
            }
        }
    }
}

/// What an error code of KMS's means to piiwall.
#[derive(Debug, PartialEq, Eq)]
enum Meaning {
    /// The wrapped key does not authenticate under this KMS key and context: an altered or moved row.
    Corrupt,
    /// The key or the credentials cannot do this at all: a fatal error, until an operator fixes the key, its policy,
    /// the credentials or keys.kek.
    Refused,
    /// KMS is not serving now (throttled, internal error, a dependency timed out): the call is retried later.
    Unavailable,
}

fn meaning(code: &str) -> Meaning {
    match code {
        "InvalidCiphertextException" | "IncorrectKeyException" => Meaning::Corrupt,
        "NotFoundException"
        | "DisabledException"
        | "KMSInvalidStateException"
        | "InvalidKeyUsageException"
        | "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "ExpiredTokenException"
        | "InvalidClientTokenId"
        | "InvalidGrantTokenException"
        | "ValidationException" => Meaning::Refused,
        _ => Meaning::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes moto cannot produce (it does not enforce key states or IAM): a disabled, pending-deletion or denied
    /// key is fatal, throttling and KMS's own failures are waited out.
    #[test]
    fn kms_error_codes_mean_fatal_retry_or_a_bad_row() {
        for fatal in [
            "DisabledException",
            "KMSInvalidStateException",
            "AccessDeniedException",
            "NotFoundException",
        ] {
            assert_eq!(meaning(fatal), Meaning::Refused, "{fatal}");
        }
        for retry in [
            "ThrottlingException",
            "KMSInternalException",
            "DependencyTimeoutException",
            "KeyUnavailableException",
            "",
        ] {
            assert_eq!(meaning(retry), Meaning::Unavailable, "{retry}");
        }
        assert_eq!(meaning("InvalidCiphertextException"), Meaning::Corrupt);
    }
}
