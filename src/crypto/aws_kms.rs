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

/// The encryption-context entry that carries the SHA-256 of a wrapped key's associated data (base64url: KMS takes
/// strings).
const CONTEXT_KEY: &str = "piiwall-ad-sha256";

/// How many KMS calls a batch's wraps keep in flight at once.
const CONCURRENT_CALLS: usize = 16;

/// A KMS client on its own runtime and the key it wraps with.
pub struct AwsKmsKek {
    runtime: Runtime,
    client: aws_sdk_kms::Client,
    /// The key as every call names it: its ARN, as KMS gave it at open (never an alias, which may be pointed at
    /// another key), or the configured string for a previous KEK.
    key: Arc<str>,
    id: String,
}

/// The provider's runtime, shut down without blocking when dropped: a provider may be dropped (or fail to open)
/// on another runtime's thread, where a blocking shutdown panics.
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Runtime {
    /// Runs `future` on the runtime and waits for it from this thread, whatever runtime this thread may belong to.
    fn wait_on<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, KeyError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.0.as_ref().expect("present until drop").spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv()
            .map_err(|_| KeyError::StoreUnavailable("an AWS KMS call ended without an answer".into()))
    }
}

impl AwsKmsKek {
    /// Builds the client. As the current KEK (`current`), wraps and unwraps a test value and takes the key's ARN
    /// from KMS's answer as the key every call names: a key that does not exist, is disabled, or that the
    /// credentials may not use is refused here, naming the setting; KMS not answering is `StoreUnavailable`
    /// (start-up waits for it). A previous KEK may only be allowed to decrypt: it is named as configured (its ARN, as
    /// the error about a store's unknown KEK says) and not tested.
    pub fn open(location: &AwsKmsLocation, current: bool) -> Result<Self, KeyError> {
        let runtime = Runtime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("piiwall-aws-kms")
                .enable_all()
                .build()
                .map_err(|e| KeyError::StoreUnavailable(format!("cannot start the AWS KMS client's runtime: {e}")))?,
        ));
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
        let config = runtime.wait_on(loader.load())?;
        if config.region().is_none() {
            return Err(KeyError::KekMissing(
                "aws-kms: no AWS region: set keys.aws_kms.region, or AWS_REGION in the environment".into(),
            ));
        }
        // Only keys.aws_kms.endpoint (checked: https, or http to this host) names another endpoint than AWS's:
        // AWS_ENDPOINT_URL* and a profile's endpoint_url, which could send data keys anywhere, are not followed.
        let mut kms = aws_sdk_kms::config::Builder::from(&config);
        kms.set_endpoint_url(location.endpoint.clone());
        let client = aws_sdk_kms::Client::from_conf(kms.build());
        let configured = format!("aws-kms:{}", location.key);
        if !current {
            return Ok(Self {
                runtime,
                client,
                key: location.key.as_str().into(),
                id: configured,
            });
        }
        let probe = Zeroizing::new(rand::random::<[u8; 32]>());
        let ad = b"piiwall/1|kek self-test";
        let (wrapped, arn) = runtime
            .wait_on(encrypt(
                client.clone(),
                location.key.as_str().into(),
                Zeroizing::new(probe.to_vec()),
                ad.to_vec(),
            ))?
            .map_err(|e| failure(&configured, e, "Encrypt"))?;
        if !arn.starts_with("arn:") {
            return Err(KeyError::KekMalformed(format!(
                "{configured}: KMS answered Encrypt without the key's ARN; check keys.aws_kms.endpoint"
            )));
        }
        let kek = Self {
            runtime,
            client,
            id: format!("aws-kms:{arn}"),
            key: arn.into(),
        };
        match kek.unwrap(&wrapped, ad) {
            Ok(back) if back.as_slice() == probe.as_slice() => Ok(kek),
            Ok(_) => Err(KeyError::KekMalformed(format!(
                "{configured}: KMS did not give back what it encrypted; check keys.kek and keys.aws_kms.endpoint"
            ))),
            Err(e) => Err(e),
        }
    }
}

fn context(associated_data: &[u8]) -> String {
    use sha2::Digest;
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(associated_data))
}

async fn encrypt(
    client: aws_sdk_kms::Client,
    key: Arc<str>,
    plaintext: Zeroizing<Vec<u8>>,
    associated_data: Vec<u8>,
) -> Result<(Vec<u8>, String), SdkError<aws_sdk_kms::operation::encrypt::EncryptError>> {
    let out = client
        .encrypt()
        .key_id(&*key)
        .plaintext(Blob::new(plaintext.to_vec()))
        .encryption_context(CONTEXT_KEY, context(&associated_data))
        .send()
        .await?;
    Ok((
        out.ciphertext_blob.map(Blob::into_inner).unwrap_or_default(),
        out.key_id.unwrap_or_default(),
    ))
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
                let plaintext = Zeroizing::new(plaintext.to_vec());
                encrypt(self.client.clone(), self.key.clone(), plaintext, ad.to_vec())
            })
            .collect();
        let results = self.runtime.wait_on(async move {
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
        })?;
        results
            .into_iter()
            .map(|result| match result {
                Ok(Ok((wrapped, _))) if !wrapped.is_empty() => Ok(wrapped),
                Ok(Ok(_)) => Err(KeyError::StoreUnavailable(format!(
                    "{}: KMS answered Encrypt without a ciphertext",
                    self.id
                ))),
                Ok(Err(e)) => Err(failure(&self.id, e, "Encrypt")),
                Err(_) => Err(KeyError::StoreUnavailable(format!(
                    "{}: an Encrypt call ended without an answer",
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
        match self.runtime.wait_on(call)? {
            Ok(out) => Ok(Zeroizing::new(out.plaintext.map(Blob::into_inner).unwrap_or_default())),
            Err(e) => Err(failure(&self.id, e, "Decrypt")),
        }
    }

    fn id(&self) -> String {
        self.id.clone()
    }
}

/// What a failed KMS call means: the wrapped key does not authenticate (altered, another row's, another key's),
/// the key, the credentials or the request cannot succeed at all (fatal: fix the key, its policy, the credentials or
/// keys.kek), or KMS is not answering now (throttled, failing, timed out, unreachable: the batch waits and
/// retries). The refusal's message names the KMS code and the settings, not KMS's own text.
fn failure<E: ProvideErrorMetadata + std::error::Error + 'static>(id: &str, e: SdkError<E>, call: &str) -> KeyError {
    let refused = |why: &str| {
        KeyError::KekRefused(format!(
            "{id}: AWS KMS refused {call} ({why}); check keys.kek (the key exists, is enabled and symmetric), \
             keys.aws_kms, the AWS credentials, and that they may call kms:Encrypt and kms:Decrypt on the key"
        ))
    };
    let status = e.raw_response().map(|raw| raw.status().as_u16());
    match &e {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("an unnamed error");
            match meaning(code, status.unwrap_or(0)) {
                Meaning::Corrupt => KeyError::CorruptRow,
                Meaning::Refused => refused(code),
                Meaning::Unavailable => KeyError::StoreUnavailable(format!("{id}: AWS KMS failed {call} ({code})")),
            }
        }
        // A request that cannot be built, no credentials configured anywhere or a broken profile, the caller's fault:
        // nothing a retry changes. A lost connection, a timeout, a credential provider that did not answer: KMS (or
        // the credentials' source) is not answering now.
        SdkError::ConstructionFailure(_) => refused("the request could not be made"),
        SdkError::DispatchFailure(dispatch)
            if dispatch.is_user()
                || dispatch.as_other() == Some(aws_smithy_types::retry::ErrorKind::ClientError)
                || credentials_refused(&e) =>
        {
            refused(&aws_sdk_kms::error::DisplayErrorContext(&e).to_string())
        }
        _ => KeyError::StoreUnavailable(format!(
            "{id}: AWS KMS did not answer {call}: {}",
            aws_sdk_kms::error::DisplayErrorContext(&e)
        )),
    }
}

/// Whether the error comes from the credential chain finding no credentials at all, or a configuration it cannot
/// use: a provider that timed out or failed on the network is an outage instead.
fn credentials_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    use aws_credential_types::provider::error::CredentialsError;
    let mut source = e.source();
    while let Some(cause) = source {
        if let Some(credentials) = cause.downcast_ref::<CredentialsError>() {
            return matches!(
                credentials,
                CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_)
            );
        }
        source = cause.source();
    }
    false
}

/// What an answer of KMS's means to piiwall, by its error code and HTTP status.
#[derive(Debug, PartialEq, Eq)]
enum Meaning {
    /// The wrapped key does not authenticate under this KMS key and context: an altered or moved row.
    Corrupt,
    /// The key, the credentials or the request cannot succeed: a fatal error, until an operator fixes the key, its
    /// policy, the credentials or keys.kek.
    Refused,
    /// KMS is not serving now (throttled, failing, a dependency timed out): the call is retried later.
    Unavailable,
}

fn meaning(code: &str, status: u16) -> Meaning {
    match code {
        "InvalidCiphertextException" | "IncorrectKeyException" => Meaning::Corrupt,
        "ThrottlingException"
        | "LimitExceededException"
        | "RequestLimitExceeded"
        | "KMSInternalException"
        | "DependencyTimeoutException"
        | "KeyUnavailableException" => Meaning::Unavailable,
        _ if status == 429 || status >= 500 => Meaning::Unavailable,
        _ => Meaning::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes moto cannot produce (it does not enforce key states or IAM): a disabled, pending-deletion or denied
    /// key, and any other client error, is fatal; throttling and KMS's own failures are waited out.
    #[test]
    fn kms_answers_mean_fatal_retry_or_a_bad_row() {
        for fatal in [
            "DisabledException",
            "KMSInvalidStateException",
            "AccessDeniedException",
            "NotFoundException",
            "ValidationError",
            "RequestExpired",
        ] {
            assert_eq!(meaning(fatal, 400), Meaning::Refused, "{fatal}");
        }
        for retry in [
            "ThrottlingException",
            "KMSInternalException",
            "DependencyTimeoutException",
            "KeyUnavailableException",
        ] {
            assert_eq!(meaning(retry, 400), Meaning::Unavailable, "{retry}");
        }
        assert_eq!(meaning("an unnamed error", 503), Meaning::Unavailable);
        assert_eq!(meaning("an unnamed error", 429), Meaning::Unavailable);
        assert_eq!(meaning("InvalidCiphertextException", 400), Meaning::Corrupt);
    }
}
