//! The test Schema Registry: rivven-schema (installed by scripts/test-services), a process of each test's own.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use schema_registry_converter::async_impl::schema_registry::{SrSettings, post_schema};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

/// A registry of our own, on a free port, so a test can stop and restart it.
pub struct Registry {
    port: u16,
    child: Option<Child>,
}

impl Registry {
    pub fn start(port: u16) -> Self {
        let child = Command::new("rivven-schema")
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rivven-schema is on PATH: run `bash scripts/test` (scripts/test-services installs it)");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "rivven-schema did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            port,
            child: Some(child),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

pub async fn register(url: &str, subject: &str, schema: &str) -> u32 {
    register_typed(url, subject, schema, SchemaType::Avro).await
}

/// Registers a schema of a given type (through the third-party client, as a producer would).
pub async fn register_typed(url: &str, subject: &str, schema: &str, schema_type: SchemaType) -> u32 {
    let settings = SrSettings::new(url.to_owned());
    post_schema(
        &settings,
        subject.to_owned(),
        SuppliedSchema::new(None, schema_type, schema.to_owned()),
    )
    .await
    .unwrap()
    .id
}
