//! A test broker of a test's own (Tansu, as scripts/test-services installs it), for the faults that need a broker
//! to stop, start late, or restart with its data.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Broker {
    pub port: u16,
    storage: String,
    /// Where it runs: Tansu reads a `sqlite://` path relative to its working directory.
    dir: Option<PathBuf>,
    child: Option<Child>,
}

impl Broker {
    /// A broker on `port`, not started: clients pointed at it meet a broker that is down.
    pub fn on(port: u16) -> Self {
        Self {
            port,
            storage: "memory://tansu/".into(),
            dir: None,
            child: None,
        }
    }

    /// As [`on`](Self::on), keeping its data in a SQLite file in `dir`, so a restart keeps the topics and records.
    pub fn persistent(port: u16, dir: PathBuf) -> Self {
        Self {
            port,
            storage: "sqlite://broker.db".into(),
            dir: Some(dir),
            child: None,
        }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it and waits until it accepts connections.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut command = Command::new("tansu");
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        let child = command
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &self.storage])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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
