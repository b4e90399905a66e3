//! A produce gate: a TCP proxy in front of a test broker of its own (which advertises the gate's address, so every
//! client's connections go through it) that, while shut, refuses the Produce requests of every client but one — the
//! connection that sends one is closed, unanswered. Reads (Fetch, Metadata, group calls) go on, so a pipeline keeps
//! reading and sanitizing while none of its writes lands: the brokers' side of an output that cannot be written.
//! It can also hold back one kind of request for a while before passing it on (a slow broker).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Kafka's API key of a Produce request.
const PRODUCE: i16 = 0;

pub struct ProduceGate {
    pub port: u16,
    shut: Arc<AtomicBool>,
    slow: Arc<Mutex<Option<(i16, Duration)>>>,
}

/// What every connection's forwarder reads.
struct Rules {
    shut: Arc<AtomicBool>,
    slow: Arc<Mutex<Option<(i16, Duration)>>>,
    exempt: Vec<u8>,
}

impl ProduceGate {
    /// Listens on a free port and forwards every connection to 127.0.0.1:`upstream`. The client whose `client.id`
    /// is `exempt` is never refused (the test's own producer).
    pub fn open(upstream: u16, exempt: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (shut, slow) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(None)));
        let rules = Arc::new(Rules {
            shut: shut.clone(),
            slow: slow.clone(),
            exempt: exempt.as_bytes().to_vec(),
        });
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(broker) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (client_out, broker_in) = (client.try_clone().unwrap(), broker.try_clone().unwrap());
                std::thread::spawn(move || copy_back(broker_in, client_out));
                let rules = rules.clone();
                std::thread::spawn(move || forward_requests(client, broker, &rules));
            }
        });
        Self { port, shut, slow }
    }

    /// From now on, requests of `api_key` (2: ListOffsets) are passed on only after `by`.
    pub fn slow(&self, api_key: i16, by: Duration) {
        *self.slow.lock().unwrap() = Some((api_key, by));
    }

    /// From now on, Produce requests are refused (their connections closed).
    pub fn shut(&self) {
        self.shut.store(true, Ordering::SeqCst);
    }

    pub fn open_again(&self) {
        self.shut.store(false, Ordering::SeqCst);
    }
}

/// Broker to client, as it comes.
fn copy_back(mut broker: TcpStream, mut client: TcpStream) {
    let _ = std::io::copy(&mut broker, &mut client);
    let _ = client.shutdown(Shutdown::Both);
}

/// Client to broker, one request at a time: `[size: i32][api_key: i16][api_version: i16][correlation_id: i32]
/// [client_id: i16 length, bytes]...`.
fn forward_requests(mut client: TcpStream, mut broker: TcpStream, rules: &Rules) {
    loop {
        let mut size = [0u8; 4];
        if client.read_exact(&mut size).is_err() {
            break;
        }
        let mut request = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
        if client.read_exact(&mut request).is_err() {
            break;
        }
        let api_key = i16::from_be_bytes([request[0], request[1]]);
        let id_len = i16::from_be_bytes([request[8], request[9]]).max(0) as usize;
        let client_id = request.get(10..10 + id_len).unwrap_or_default();
        if api_key == PRODUCE && client_id != rules.exempt && rules.shut.load(Ordering::SeqCst) {
            break;
        }
        let slow = *rules.slow.lock().unwrap();
        if let Some((_, by)) = slow.filter(|(key, _)| *key == api_key) {
            std::thread::sleep(by);
        }
        if broker
            .write_all(&size)
            .and_then(|()| broker.write_all(&request))
            .is_err()
        {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = broker.shutdown(Shutdown::Both);
}
