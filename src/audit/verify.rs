//! `piiwall audit verify`: reads an audit topic from its start to its end and checks every instance's chain.

use std::collections::HashMap;
use std::time::Duration;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use rdkafka::{ClientConfig, Message};
use subtle::ConstantTimeEq;

use super::event::{AUDIT_SCHEMA, MAC_CONTEXT, MAC_TAIL, mac_key_id};
use crate::error::Error;
use crate::keys::Keyring;

/// How long reading an audit topic to its end may take.
const READ_DEADLINE: Duration = Duration::from_secs(300);

/// What a verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub events: usize,
    pub instances: usize,
    /// Runs of those instances: each start of a process begins a new run of its instance's chain at sequence 0.
    pub runs: usize,
    /// The first break found: where, and what is wrong. `None` when every chain holds.
    pub first_break: Option<String>,
}

struct Position {
    seq: i64,
    mac: Vec<u8>,
}

/// Reads `topic` (all partitions, from the start to the current end) and checks each instance's chain: sequence
/// numbers without gaps from 0, each event naming its predecessor's MAC, and each MAC verifying. A restarted
/// instance begins a new run of its chain (sequence 0, no predecessor); events removed from the middle or the
/// start of a run break it.
pub fn verify(client: &ClientConfig, topic: &str, keyring: &Keyring) -> Result<VerifyReport, Error> {
    let reader = GenericDatumReader::builder(&AUDIT_SCHEMA)
        .build()
        .expect("the audit schema resolves");
    let mut chains: HashMap<String, Position> = HashMap::new();
    let mut runs = 0;
    let mut events = 0;
    let mut first_break = None;
    crate::topic_reader::read_topic(client, topic, "audit topic", READ_DEADLINE, |message| {
        events += 1;
        if first_break.is_none() {
            let at = format!("partition {}, offset {}", message.partition(), message.offset());
            match check(message.payload().unwrap_or_default(), &reader, keyring, &mut chains) {
                Ok(Link::NewRun) => runs += 1,
                Ok(Link::Next | Link::Duplicate) => {}
                Err(problem) => first_break = Some(format!("{at}: {problem}")),
            }
        }
        Ok(())
    })?;
    Ok(VerifyReport {
        events,
        instances: chains.len(),
        runs,
        first_break,
    })
}

fn field<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
    match value {
        Value::Record(fields) => fields.iter().find(|(n, _)| n == name).map(|(_, v)| v),
        _ => None,
    }
}

/// How a verified event joins its instance's chain.
enum Link {
    /// It begins a run: sequence 0, no predecessor.
    NewRun,
    /// The same event as the one before, byte for byte: written twice by a retry whose first attempt did land
    /// (audit is at-least-once). Nothing is missing or changed.
    Duplicate,
    /// It follows the event before it.
    Next,
}

fn check(
    bytes: &[u8],
    reader: &GenericDatumReader<'_>,
    keyring: &Keyring,
    chains: &mut HashMap<String, Position>,
) -> Result<Link, String> {
    let value = reader
        .read_value(&mut &bytes[..])
        .map_err(|_| "not an audit event (does not decode)".to_owned())?;
    let (Some(Value::String(instance)), Some(Value::Long(seq)), Some(Value::Bytes(prev_mac)), Some(Value::Bytes(mac))) = (
        field(&value, "instance"),
        field(&value, "seq"),
        field(&value, "prev_mac"),
        field(&value, "mac"),
    ) else {
        return Err("an audit event without its chain fields".into());
    };
    if mac.len() != 32 || bytes.len() < MAC_TAIL || bytes[bytes.len() - MAC_TAIL] != 0x40 {
        return Err(format!("instance {instance}, seq {seq}: malformed MAC"));
    }
    let key_id = mac_key_id(&value).ok_or_else(|| format!("instance {instance}, seq {seq}: no MAC key id"))?;
    let key = keyring
        .key_by_id(key_id)
        .map_err(|e| format!("instance {instance}, seq {seq}: MAC key: {e}"))?;
    let expected = key.mac(MAC_CONTEXT, &bytes[..bytes.len() - MAC_TAIL]);
    if !bool::from(expected.ct_eq(mac.as_slice())) {
        return Err(format!(
            "instance {instance}, seq {seq}: MAC does not verify (the event was altered)"
        ));
    }
    if chains.get(instance).is_some_and(|p| p.seq == *seq && p.mac == *mac) {
        return Ok(Link::Duplicate);
    }
    let link = if *seq == 0 && prev_mac.is_empty() {
        Link::NewRun
    } else {
        Link::Next
    };
    let (want_seq, want_prev) = match (chains.get(instance), &link) {
        (Some(position), Link::Next) => (position.seq + 1, position.mac.clone()),
        _ => (0, Vec::new()),
    };
    if *seq != want_seq {
        return Err(format!(
            "instance {instance}: expected seq {want_seq}, found {seq} (events removed or reordered)"
        ));
    }
    if *prev_mac != want_prev {
        return Err(format!(
            "instance {instance}, seq {seq}: does not follow the previous event (chain broken)"
        ));
    }
    chains.insert(
        instance.clone(),
        Position {
            seq: *seq,
            mac: mac.clone(),
        },
    );
    Ok(link)
}
