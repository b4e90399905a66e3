//! TLS on the HTTP listener (`http.tls_cert`, `http.tls_key`): a client that trusts the certificate gets answers;
//! a plain-HTTP client gets none; a client that connects and never starts its handshake delays no one else; a key
//! that does not fit is refused at start with the setting named.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use piiwall::config::HttpTls;
use piiwall::http::Readiness;
use tokio::sync::watch;

/// A self-signed certificate for localhost and 127.0.0.1, made with the openssl command.
fn self_signed(dir: &Path, name: &str) -> HttpTls {
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the openssl command");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    HttpTls { cert, key }
}

/// A ready listener with TLS under a fresh self-signed certificate: its stop switch, its address, the certificate.
async fn tls_listener(dir: &Path) -> (watch::Sender<bool>, std::net::SocketAddr, HttpTls) {
    let tls = self_signed(dir, "server");
    let (stop, stopped) = watch::channel(false);
    let bound = piiwall::http::serve(
        "127.0.0.1:0".parse().unwrap(),
        Readiness::new(Arc::new(AtomicBool::new(true))),
        stopped,
        None,
        Some(&tls),
    )
    .await
    .unwrap();
    (stop, bound, tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_speaks_tls_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (stop, bound, tls) = tls_listener(dir.path()).await;

    let trusted = reqwest::Certificate::from_pem(&std::fs::read(&tls.cert).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(trusted)
        .build()
        .unwrap();
    let response = client
        .get(format!("https://localhost:{}/healthz", bound.port()))
        .send()
        .await
        .expect("an https request with the certificate trusted");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok\n");

    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", bound.port()))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "no answer in clear"
    );
    let untrusted = reqwest::Client::new()
        .get(format!("https://localhost:{}/healthz", bound.port()))
        .send()
        .await;
    assert!(
        untrusted.is_err(),
        "a client that does not trust the certificate is refused"
    );
    stop.send_replace(true);
}

/// The listener's handshake timeout is 5 s; an answer well within it shows the silent clients were not waited on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_send_a_client_hello_do_not_stall_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (stop, bound, tls) = tls_listener(dir.path()).await;

    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(bound).await.unwrap());
    }
    // Time for the server to accept them first: with handshakes one at a time, the real client would queue behind them.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let trusted = reqwest::Certificate::from_pem(&std::fs::read(&tls.cert).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(trusted)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let started = Instant::now();
    let response = client
        .get(format!("https://localhost:{}/healthz", bound.port()))
        .send()
        .await
        .expect("an https request with the certificate trusted");
    let took = started.elapsed();
    assert_eq!(response.status(), 200);
    assert!(
        took < Duration::from_secs(2),
        "/healthz took {took:?} while {} clients sent nothing",
        silent.len()
    );
    drop(silent);
    stop.send_replace(true);
}

#[tokio::test]
async fn a_key_that_does_not_fit_the_certificate_is_refused_naming_the_settings() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (self_signed(dir.path(), "first"), self_signed(dir.path(), "second"));
    let mismatched = HttpTls {
        cert: first.cert,
        key: second.key,
    };
    let (_stop, stopped) = watch::channel(false);
    let error = piiwall::http::serve(
        "127.0.0.1:0".parse().unwrap(),
        Readiness::new(Arc::new(AtomicBool::new(true))),
        stopped,
        None,
        Some(&mismatched),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("http.tls_cert") && error.contains("http.tls_key"),
        "{error}"
    );
}
