//! A test broker of a test's own (Tansu, as scripts/test-services installs it), for the faults that need a broker
//! to stop, start late, or restart with its data.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Broker {
    pub port: u16,
    storage: String,
    /// The S3 endpoint of a persistent broker's storage.
    s3: Option<String>,
    /// The port it tells clients to connect to, when not its own (a proxy's in front of it).
    advertised: Option<u16>,
    child: Option<Child>,
}

impl Broker {
    /// A broker on `port`, not started: clients pointed at it meet a broker that is down.
    pub fn on(port: u16) -> Self {
        Self {
            port,
            storage: "memory://tansu/".into(),
            s3: None,
            advertised: None,
            child: None,
        }
    }

    /// As [`on`](Self::on), keeping its data in a bucket of its own on the test services' S3 (moto, at
    /// `PIIWALL_TEST_AWS`), so a restart keeps the topics and records. Tansu's object-store engine, because its
    /// SQLite engine panics on the first write of an idempotent producer it forgot in a restart.
    pub fn persistent(port: u16) -> Self {
        let endpoint = std::env::var("PIIWALL_TEST_AWS")
            .expect("PIIWALL_TEST_AWS names the test S3 endpoint: run `bash scripts/test` (scripts/test-services)");
        // Unique across runs (moto outlives them, and answers 200 to creating a bucket that exists).
        let bucket = super::kafka::unique("tansu").to_lowercase();
        create_bucket(&endpoint, &bucket);
        Self {
            port,
            storage: format!("s3://{bucket}/"),
            s3: Some(endpoint),
            advertised: None,
            child: None,
        }
    }

    /// Where its output goes, appended across restarts: the system temp dir, named by port (shown on failure).
    fn log(&self) -> Stdio {
        let path = std::env::temp_dir().join(format!("piiwall-test-tansu-{}.log", self.port));
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_or_else(|_| Stdio::null(), Stdio::from)
    }

    /// Tells its clients to connect to 127.0.0.1:`port` (a proxy in front of it) instead: set before starting it.
    pub fn advertise(&mut self, port: u16) {
        self.advertised = Some(port);
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it and waits until it accepts connections.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised.unwrap_or(self.port));
        let mut command = Command::new("tansu");
        if let Some(endpoint) = &self.s3 {
            command
                .env("AWS_ENDPOINT", endpoint)
                .env("AWS_ALLOW_HTTP", "true")
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_DEFAULT_REGION", "us-east-1");
        }
        let child = command
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", &self.storage])
            .stdout(Stdio::null())
            .stderr(self.log())
            .spawn()
            .expect("tansu is on PATH: run `bash scripts/test` (scripts/test-services installs it)");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "tansu did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates `bucket` on the S3 endpoint `endpoint` (`http://host:port`): one unsigned PUT, which moto accepts.
fn create_bucket(endpoint: &str, bucket: &str) {
    let host = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(host).expect("the test S3 (moto) answers");
    write!(
        stream,
        "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "bucket not created: {}",
        answer.lines().next().unwrap_or("")
    );
}
