//! A Schema Registry that misbehaves for a while: an error-injecting HTTP proxy, written here, in front of the real
//! test registry (rivven-schema). Transient answers — 500 (leader election), 502, 503, 504, 429, 401, a truncated
//! body, a 404 from a follower that has not yet seen a schema — make piiwall wait and ask again; none of them
//! decides that a schema is unusable. A schema that is unusable is asked for again after `schemas.retry_broken_secs`.

mod common;

use std::collections::{BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::kafka::{audit_events_of, consume, create_topic, customer_records, header, produce, reader, unique};
use common::registry::{Registry, register};
use common::services::free_port;
use piiwall::config::Config;
use piiwall::error::ErrorKind;
use piiwall::server;
use piiwall::stream::{Part, Route, Routes, SOURCE_OFFSET, SOURCE_PARTITION, Shutdown};
use rdkafka::ClientConfig;
use rdkafka::consumer::Consumer;

/// What the proxy does with one request.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// An answer of this status with a JSON error body, without asking the registry.
    Status(u16),
    /// The registry's answer, cut off in the middle of its body.
    Truncated,
    /// No answer for longer than piiwall waits for one (its request timeout is 10 s), then the connection ends.
    Stall,
}

/// The proxy: faults are served in order, one per request; with none left, requests go to the registry.
struct Proxy {
    port: u16,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    requests: Arc<Mutex<usize>>,
}

impl Proxy {
    fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults: Arc<Mutex<VecDeque<Fault>>> = Arc::default();
        let requests: Arc<Mutex<usize>> = Arc::default();
        let (queue, count) = (faults.clone(), requests.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                *count.lock().unwrap() += 1;
                let fault = queue.lock().unwrap().pop_front();
                // A connection each: a stalled answer holds up no other request.
                std::thread::spawn(move || serve(client, upstream, fault));
            }
        });
        Self { port, faults, requests }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn inject(&self, faults: &[Fault]) {
        self.faults.lock().unwrap().extend(faults);
    }

    fn requests(&self) -> usize {
        *self.requests.lock().unwrap()
    }

    fn faults_left(&self) -> usize {
        self.faults.lock().unwrap().len()
    }
}

/// Reads one HTTP/1.1 request (head and Content-Length body).
fn read_request(client: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = client.read(&mut buf)?;
        if n == 0 {
            return Ok(request);
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                return Ok(request);
            }
        }
    }
}

/// Puts `Connection: close` after the first line of an HTTP message, so each request has a connection of its own.
fn close_after(message: &[u8]) -> Vec<u8> {
    let line_end = message.windows(2).position(|w| w == b"\r\n").unwrap_or(message.len());
    [&message[..line_end], b"\r\nConnection: close", &message[line_end..]].concat()
}

fn serve(mut client: TcpStream, upstream: u16, fault: Option<Fault>) -> std::io::Result<()> {
    let request = read_request(&mut client)?;
    match fault {
        Some(Fault::Stall) => std::thread::sleep(Duration::from_secs(12)),
        Some(Fault::Status(status)) => {
            let body = format!(r#"{{"error_code":{status}01,"message":"injected"}}"#);
            write!(
                client,
                "HTTP/1.1 {status} Injected\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )?;
        }
        fault => {
            let mut registry = TcpStream::connect(("127.0.0.1", upstream))?;
            registry.write_all(&close_after(&request))?;
            let mut answer = Vec::new();
            registry.read_to_end(&mut answer)?;
            let mut answer = close_after(&answer);
            if matches!(fault, Some(Fault::Truncated)) {
                // The head says the whole length; half the body comes, then the connection ends.
                let body_start = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                answer.truncate(body_start + (answer.len() - body_start) / 2);
            }
            client.write_all(&answer)?;
        }
    }
    client.flush()
}

fn config(dir: &std::path::Path, registry: &str, extra: &str) -> Config {
    std::fs::write(dir.join("kek.key"), "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n").unwrap();
    let text = format!(
        "[keys]\nstore = \"sqlite:{dir}/keys.db\"\nkek = \"file:{dir}/kek.key\"\ncontrol_topic = \"{control}\"\n\
         [schemas]\nregistry = \"{registry}\"\n{extra}",
        dir = dir.display(),
        control = unique("regfault-control"),
    );
    Config::parse(&text, std::iter::empty(), "registry fault test config").unwrap()
}

/// Asks `routes` to resolve a schema id until it decides, counting the answers that said "wait".
async fn resolve(routes: &Routes, topic: &str, id: u32) -> (Route, usize) {
    let wanted = [(topic.to_owned(), Part::Value, id)];
    let mut waits = 0;
    loop {
        match routes.resolve(&wanted).await {
            Ok(()) => return (routes.get(topic, id), waits),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Retriable, "{e}");
                assert!(
                    !e.to_string().contains("127.0.0.1:"),
                    "errors do not repeat the URL: {e}"
                );
                waits += 1;
                assert!(waits < 50, "never decided");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_answers_make_piiwall_wait_never_give_up() {
    let registry = Registry::start(free_port());
    let upstream: u16 = registry.url().rsplit(':').next().unwrap().parse().unwrap();
    let proxy = Proxy::start(upstream);
    let id = register(
        &registry.url(),
        "faults-value",
        &common::example("customer_profile.avsc"),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let routes = Routes::compile(&config(dir.path(), &proxy.url(), "")).unwrap();

    let faults = [
        Fault::Status(500),
        Fault::Status(502),
        Fault::Status(503),
        Fault::Status(504),
        Fault::Status(429),
        Fault::Status(401),
        Fault::Truncated,
        Fault::Status(404),
    ];
    proxy.inject(&faults);
    let (route, waits) = resolve(&routes, "faults", id).await;
    assert!(
        matches!(route, Route::Ready(_)),
        "a transient answer decided the schema is unusable"
    );
    assert_eq!(waits, faults.len(), "each transient answer is one wait");

    // Registering the sanitized schema rides through the same answers.
    proxy.inject(&[Fault::Status(500), Fault::Truncated]);
    let (route, waits) = resolve(&routes, "faults2", id).await;
    assert!(matches!(route, Route::Ready(_)));
    assert!(waits >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_id_is_quarantined_after_its_grace_and_a_broken_route_is_asked_again() {
    let registry = Registry::start(free_port());
    let upstream: u16 = registry.url().rsplit(':').next().unwrap().parse().unwrap();
    let proxy = Proxy::start(upstream);
    let dir = tempfile::tempdir().unwrap();
    let routes = Routes::compile(&config(
        dir.path(),
        &proxy.url(),
        "not_found_grace_secs = 1\nretry_broken_secs = 1\n",
    ))
    .unwrap();
    let (route, waits) = resolve(&routes, "unknown", 4242).await;
    let Route::Broken(reason) = route else {
        panic!("an id the registry never had is unusable")
    };
    assert!(reason.contains("no schema id 4242"), "{reason}");
    assert!(waits >= 5, "asked again for about a second: {waits} waits");

    // Within retry_broken_secs the decision holds without asking; after it, the registry is asked again.
    let before = proxy.requests();
    assert!(matches!(resolve(&routes, "unknown", 4242).await.0, Route::Broken(_)));
    assert_eq!(proxy.requests(), before, "decided: not asked again at once");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let _ = resolve(&routes, "unknown", 4242).await;
    assert!(proxy.requests() > before, "a broken route expires");
}

/// The (partition, offset) source coordinates that reached `topic`, read until `wanted` distinct ones arrived or
/// the deadline passed (duplicates, which at-least-once allows, count once).
fn coordinates(topic: &str, wanted: usize, deadline: Duration) -> BTreeSet<(i32, i64)> {
    let consumer = reader(topic);
    let start = std::time::Instant::now();
    let mut seen = BTreeSet::new();
    while seen.len() < wanted && start.elapsed() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let message = message.detach();
            let number = |name| {
                std::str::from_utf8(header(&message, name).expect("source coordinates"))
                    .unwrap()
                    .parse::<i64>()
                    .unwrap()
            };
            seen.insert((number(SOURCE_PARTITION) as i32, number(SOURCE_OFFSET)));
        }
    }
    consumer.unsubscribe();
    seen
}

/// Every (partition, offset) of `n` records spread over 3 partitions as `customer_records` spreads them.
fn every_coordinate(n: usize) -> BTreeSet<(i32, i64)> {
    (0..n).map(|i| ((i % 3) as i32, (i / 3) as i64)).collect()
}

/// The fault suite's registry scenario, through a running pipeline: a second topic starts flowing while the
/// registry answers 500, 429, 504, a truncated body, a late 404, 503, 401 and a timeout in turn. The topic's lanes
/// wait (the first topic's records went on meanwhile); then every record of both topics is in the output, nothing
/// is in quarantine, and the audit chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_misbehaving_mid_stream_loses_nothing_and_quarantines_nothing() {
    let registry = Registry::start(free_port());
    let upstream: u16 = registry.url().rsplit(':').next().unwrap().parse().unwrap();
    let proxy = Proxy::start(upstream);
    let (first, second) = (unique("regfault-a"), unique("regfault-b"));
    let schema_text = common::example("customer_profile.avsc");
    let id = register(&registry.url(), &format!("{first}-value"), &schema_text).await;
    let schema = common::compiled(&schema_text);
    const N: usize = 300;
    for topic in [&first, &second] {
        create_topic(topic, 3).await;
    }
    produce(&first, customer_records(&schema, id, N)).await;

    let dir = tempfile::tempdir().unwrap();
    let audit = format!("{first}.audit");
    let config = config(
        dir.path(),
        &proxy.url(),
        &format!(
            "not_found_grace_secs = 60\n\
             [kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{group}\"\ninputs = [\"{first}\", \"{second}\"]\n\
             quarantine_topic = \"{first}.quarantine\"\n\
             [pipeline]\nbatch_size = 50\ncommit_interval_ms = 100\ndrain_timeout_secs = 5\n\
             [audit]\ntopic = \"{audit}\"\n[http]\nlisten = \"off\"\n",
            brokers = common::kafka::broker(),
            group = unique("piiwall"),
        ),
    );
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(config, shutdown.clone()));
    let output = format!("{first}.sanitized");
    let seen = tokio::task::spawn_blocking(move || coordinates(&output, N, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(seen, every_coordinate(N), "the first topic flows");

    let faults = [
        Fault::Status(500),
        Fault::Status(429),
        Fault::Status(504),
        Fault::Truncated,
        Fault::Status(404),
        Fault::Status(503),
        Fault::Status(401),
        Fault::Stall,
    ];
    proxy.inject(&faults);
    produce(&second, customer_records(&schema, id, N)).await;
    let output = format!("{second}.sanitized");
    let seen = tokio::task::spawn_blocking(move || coordinates(&output, N, Duration::from_secs(120)))
        .await
        .unwrap();
    assert_eq!(proxy.faults_left(), 0, "the registry was asked through every fault");
    assert_eq!(seen, every_coordinate(N), "every record of the second topic arrives");

    shutdown.trigger();
    let summary = task.await.unwrap().expect("the pipeline rode through");
    assert_eq!(summary.quarantined, 0, "no transient answer quarantined a record");
    assert!(summary.sanitized >= 2 * N as u64);
    let events = tokio::task::spawn_blocking({
        let audit = audit.clone();
        move || consume(&audit, 2, Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert!(audit_events_of(&events, "QUARANTINE").is_empty());
    let keyring = common::keyring_at(dir.path());
    let report = tokio::task::spawn_blocking(move || {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", common::kafka::broker());
        piiwall::audit::verify(&client, &audit, &keyring).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(report.first_break, None, "the audit chain verifies");
}
