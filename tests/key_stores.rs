//! Both key stores answer a batch of first uses the same way (`ensure_current`, one transaction per batch): a scope
//! with a key gets that key, a forgotten scope gets none and no key is made for it, a new scope gets the candidate;
//! and batches racing over the same new scopes agree on one key per scope. PostgreSQL is the test server started by
//! scripts/test-services (`PIIWALL_TEST_PG`).

mod common;

use std::sync::{Arc, Barrier};

use piiwall::crypto::KeyId;
use piiwall::keys::{KeyStore, PostgresStore, SqliteStore, StoredKey};

fn candidate(scope: &str) -> StoredKey {
    StoredKey {
        key_id: KeyId::random(),
        scope: scope.to_owned(),
        version: 1,
        wrapped: (0..60).map(|_| rand::random::<u8>()).collect(),
    }
}

fn a_batch_gets_the_stored_key_none_for_a_forgotten_scope_and_its_candidate_for_a_new_one(store: &dyn KeyStore) {
    let existing = store.insert_if_absent(&candidate("s:known")).unwrap().unwrap();
    store.insert_if_absent(&candidate("s:gone")).unwrap().unwrap();
    assert_eq!(store.forget("s:gone").unwrap(), 1);
    store.insert_if_absent(&candidate("s:rotated")).unwrap().unwrap();
    let newest = store
        .insert_if_absent(&StoredKey {
            version: 2,
            ..candidate("s:rotated")
        })
        .unwrap()
        .unwrap();
    let batch = [
        candidate("s:known"),
        candidate("s:gone"),
        candidate("s:rotated"),
        candidate("s:new-1"),
        candidate("s:new-2"),
    ];

    let rows = store.ensure_current(&batch).unwrap();

    assert_eq!(rows.len(), 5, "one answer per candidate, in order");
    let known = rows[0].as_ref().expect("a stored key");
    assert!(
        known.key_id == existing.key_id && known.wrapped == existing.wrapped,
        "the stored key, not the candidate"
    );
    assert!(rows[1].is_none(), "a forgotten scope gets no key");
    assert_eq!(store.versions("s:gone").unwrap(), 0, "and none was made for it");
    let rotated = rows[2].as_ref().expect("a rotated scope's key");
    assert!(
        rotated.key_id == newest.key_id && rotated.version == 2,
        "a rotated scope gets its newest version"
    );
    for (row, candidate) in rows[3..].iter().zip(&batch[3..]) {
        let row = row.as_ref().expect("a new scope gets a key");
        assert!(
            row.key_id == candidate.key_id && row.wrapped == candidate.wrapped,
            "the candidate is stored"
        );
        assert_eq!(row.scope, candidate.scope);
    }
    // Again with other candidates: the keys now stored are kept.
    let again = store
        .ensure_current(&[candidate("s:new-2"), candidate("s:new-1")])
        .unwrap();
    assert!(again[0].as_ref().unwrap().key_id == batch[4].key_id);
    assert!(again[1].as_ref().unwrap().key_id == batch[3].key_id);
}

/// Several instances (threads with their own connections) make first use of the same 200 new scopes at once, each
/// with its own candidates and in its own order: every one gets the same key per scope.
fn racing_batches_agree_on_one_key_per_scope(stores: Vec<Arc<dyn KeyStore>>) {
    let scopes: Vec<String> = (0..200).map(|i| format!("s:race-{i:03}")).collect();
    let barrier = Arc::new(Barrier::new(stores.len()));
    let answers: Vec<Vec<KeyId>> = std::thread::scope(|threads| {
        let running: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(n, store)| {
                let (barrier, scopes) = (barrier.clone(), &scopes);
                threads.spawn(move || {
                    let mut batch: Vec<StoredKey> = scopes.iter().map(|s| candidate(s)).collect();
                    if n % 2 == 1 {
                        batch.reverse();
                    }
                    barrier.wait();
                    let mut rows: Vec<StoredKey> = store
                        .ensure_current(&batch)
                        .unwrap()
                        .into_iter()
                        .map(Option::unwrap)
                        .collect();
                    rows.sort_by(|a, b| a.scope.cmp(&b.scope));
                    rows.into_iter().map(|row| row.key_id).collect::<Vec<KeyId>>()
                })
            })
            .collect();
        running.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for other in &answers[1..] {
        assert!(other == &answers[0], "every batch got the same key for every scope");
    }
    for scope in &scopes {
        assert_eq!(stores[0].versions(scope).unwrap(), 1, "one key stored per scope");
    }
}

#[test]
fn sqlite_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    a_batch_gets_the_stored_key_none_for_a_forgotten_scope_and_its_candidate_for_a_new_one(
        &SqliteStore::open(&path).unwrap(),
    );
    a_scope_twice_in_a_batch_gets_one_key(&SqliteStore::open(&path).unwrap());
    counts_recorded_together_add_up(&SqliteStore::open(&path).unwrap());
    let stores: Vec<Arc<dyn KeyStore>> = (0..4)
        .map(|_| Arc::new(SqliteStore::open(&path).unwrap()) as Arc<dyn KeyStore>)
        .collect();
    racing_batches_agree_on_one_key_per_scope(stores);
}

/// Counts recorded many at once add to what each key had, as counts recorded one at a time do.
fn counts_recorded_together_add_up(store: &dyn KeyStore) {
    let (a, b) = (KeyId::random(), KeyId::random());
    assert_eq!(store.record_encryptions(&a, 5).unwrap(), 5);
    store.record_encryptions_of(&[(a, 7), (b, 3)]).unwrap();
    store.record_encryptions_of(&[]).unwrap();
    assert_eq!(store.record_encryptions(&a, 0).unwrap(), 12);
    assert_eq!(store.record_encryptions(&b, 1).unwrap(), 4);
}

/// The same scope twice in one batch: one key, given to both.
fn a_scope_twice_in_a_batch_gets_one_key(store: &dyn KeyStore) {
    let rows = store
        .ensure_current(&[candidate("s:twice"), candidate("s:twice")])
        .unwrap();
    let (first, second) = (rows[0].as_ref().unwrap(), rows[1].as_ref().unwrap());
    assert!(first.key_id == second.key_id);
    assert_eq!(store.versions("s:twice").unwrap(), 1);
}

#[test]
fn postgres_batches() {
    let url = common::services::fresh_database();
    a_batch_gets_the_stored_key_none_for_a_forgotten_scope_and_its_candidate_for_a_new_one(
        &PostgresStore::open(&url).unwrap(),
    );
    a_scope_twice_in_a_batch_gets_one_key(&PostgresStore::open(&url).unwrap());
    counts_recorded_together_add_up(&PostgresStore::open(&url).unwrap());
    let stores: Vec<Arc<dyn KeyStore>> = (0..4)
        .map(|_| Arc::new(PostgresStore::open(&url).unwrap()) as Arc<dyn KeyStore>)
        .collect();
    racing_batches_agree_on_one_key_per_scope(stores);
}

/// A forget of another instance that holds its scope's lock when a batch of first uses comes (PostgreSQL's `forget`
/// locks the scope, then records it forgotten): the batch waits for it, and no key is made for the scope.
#[test]
fn a_batch_waits_for_a_forget_under_way_on_postgres_and_makes_no_key_for_its_scope() {
    let url = common::services::fresh_database();
    let store = Arc::new(PostgresStore::open(&url).unwrap());
    let mut forget = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut under_way = forget.transaction().unwrap();
    under_way
        .batch_execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('s:leaving', 0));
             INSERT INTO piiwall_forgotten_scopes (scope, forgotten_at) VALUES ('s:leaving', 0);",
        )
        .unwrap();
    let batch = std::thread::spawn({
        let store = store.clone();
        move || {
            store
                .ensure_current(&[candidate("s:staying"), candidate("s:leaving")])
                .unwrap()
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!batch.is_finished(), "the batch waits for the scope's lock");
    under_way.commit().unwrap();
    let rows = batch.join().unwrap();
    assert!(rows[0].is_some(), "the other scope gets its key");
    assert!(rows[1].is_none(), "the forgotten scope gets none");
    assert_eq!(store.versions("s:leaving").unwrap(), 0, "and no key was made for it");
}

/// A writer that does not take the scope's lock (an older piiwall, a hand-run INSERT) stores a key for a scope while
/// a batch makes first use of it: the batch's insert waits for that row's transaction, then keeps it, and the batch
/// answers with the stored row (read again), never with its own candidate and never as "forgotten".
#[test]
fn a_key_stored_by_a_writer_without_the_lock_is_the_one_a_racing_batch_gets_on_postgres() {
    let url = common::services::fresh_database();
    let store = Arc::new(PostgresStore::open(&url).unwrap());
    let mut other = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut under_way = other.transaction().unwrap();
    let theirs = candidate("s:contested");
    under_way
        .execute(
            "INSERT INTO piiwall_deks (key_id, scope, version, wrapped, created_at) VALUES ($1, $2, 1, $3, 0)",
            &[&&theirs.key_id.0[..], &theirs.scope, &theirs.wrapped],
        )
        .unwrap();
    let batch = std::thread::spawn({
        let store = store.clone();
        move || {
            store
                .ensure_current(&[candidate("s:free"), candidate("s:contested")])
                .unwrap()
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        !batch.is_finished(),
        "the batch's insert waits for the other writer's row"
    );
    under_way.commit().unwrap();
    let rows = batch.join().unwrap();
    assert!(rows[0].is_some(), "the other scope gets its key");
    let contested = rows[1].as_ref().expect("the stored key, not \"forgotten\"");
    assert!(
        contested.key_id == theirs.key_id && contested.wrapped == theirs.wrapped,
        "the row the other writer stored"
    );
    assert_eq!(store.versions("s:contested").unwrap(), 1);
}
