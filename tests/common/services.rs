//! Helpers for the tests that need PostgreSQL (started by scripts/test-services) or talk HTTP to a running
//! `piiwall run`.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// A database of its own on the test PostgreSQL; returns its URL.
pub fn fresh_database() -> String {
    let admin = std::env::var("PIIWALL_TEST_PG").expect(
        "these tests need the test PostgreSQL: run `bash scripts/test`, or `bash scripts/test-services` and export the \
         PIIWALL_TEST_PG it prints",
    );
    let name = format!("piiwall_{:016x}", rand::random::<u64>());
    let mut client = postgres::Client::connect(&admin, postgres::NoTls).expect("connect to the test PostgreSQL");
    client.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let (base, query) = admin.split_once('?').unwrap_or((&admin, ""));
    let base = base.rsplit_once('/').unwrap().0;
    format!("{base}/{name}?{query}")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request to 127.0.0.1:`port`: (status, body as JSON or as a JSON string).
pub fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Json) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\
         {auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = serde_json::from_str(body).unwrap_or_else(|_| Json::String(body.to_owned()));
    (status, body)
}

/// `piiwall run --config config` as a child process, its log (debug level) in `log`; returns once /readyz says 200.
#[allow(clippy::zombie_processes)] // the caller waits for it, through `stop`
pub fn spawn_run(config: &Path, log: &Path, port: u16) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_piiwall"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .env("RUST_LOG", "piiwall=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && http(port, "GET", "/readyz", None, "").0 == 200
        {
            return child;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "piiwall run did not become ready; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM, then wait for the exit.
pub fn stop(mut child: Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}
