//! Fuzzing the trust boundary: the task-message decoder and validator, the `reply_to` rule and
//! the tenants-file parser get the seed corpus in `tests/corpus/`, mutations of it, and
//! arbitrary bytes and AMQP properties. Whatever comes in, they never panic, and every input
//! gets either a task or a refusal with a reason and a message a person can act on.
//!
//! This is proptest rather than `cargo fuzz`: cargo-fuzz needs a nightly toolchain, which this
//! project's machines do not have. Case counts are bounded (`PROPTEST_CASES` raises them for a
//! longer run); a failing input is saved under `proptest-regressions/` and replayed first from
//! then on, so the corpus grows with every bug found.

use std::path::Path;

use proptest::prelude::*;

use super::phase::Reason;
use super::tenant::{parse_tenants, TenantName, TenantPolicy};
use super::validate::{validate, BackendIsolation, Envelope};
use crate::amqp::route::reply_route;

fn corpus(kind: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files.into_iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// One input through everything ingest decides before storing: the reply route and the
/// validation. Either a task comes out, or a rejection with a known reason and a message.
fn decide(body: &[u8], message_id: Option<&str>, content_type: Option<&str>, reply_to: Option<&str>) {
    let tenant = TenantName::parse("acme").unwrap();
    let policy = TenantPolicy::default();
    if let Err(why) = reply_route(&tenant, reply_to) {
        assert!(why.contains("reply_to"), "{why}");
    }
    for backend in [BackendIsolation::StandardOnly, BackendIsolation::Any] {
        let env = Envelope { body, message_id, content_type };
        match validate(&tenant, &policy, backend, &env) {
            Ok(sub) => {
                assert!(!sub.spec.program.code.contains('\0'));
                assert!(sub.spec.timeout_seconds >= 1 && sub.spec.timeout_seconds <= policy.max_timeout_seconds);
                assert!(
                    sub.spec.memory_bytes <= policy.max_memory_bytes && sub.spec.cpu_millis <= policy.max_cpu_millis
                );
            }
            Err(rejection) => {
                assert!(
                    matches!(rejection.reason, Reason::ValidationFailed | Reason::IsolationNotAllowed),
                    "{rejection:?}"
                );
                assert!(rejection.message.len() >= 10, "an unhelpful message: {rejection:?}");
                // A rejection's salvaged id is itself valid, or it could not be stored.
                if let Some(id) = &rejection.client_id {
                    assert!(super::validate::is_valid_key(id), "{id:?}");
                }
            }
        }
    }
}

fn tenants(text: &str) {
    match parse_tenants(text) {
        Ok(t) => {
            for (name, policy) in &t {
                assert!(TenantName::parse(name.as_str()).is_ok());
                assert!(policy.weight >= 1 && policy.max_concurrency >= 1, "{name}: {policy:?}");
            }
        }
        Err(e) => assert!(!e.is_empty()),
    }
}

#[test]
fn the_seed_corpus_is_decided() {
    let tasks = corpus("tasks");
    let mut accepted = 0;
    for body in &tasks {
        decide(body, Some("m-1"), Some("application/json"), None);
        let env = Envelope { body, message_id: None, content_type: None };
        accepted += usize::from(
            validate(&TenantName::parse("acme").unwrap(), &TenantPolicy::default(), BackendIsolation::Any, &env)
                .is_ok(),
        );
    }
    // The corpus holds valid messages (minimal, full, R with exponent quantities) and invalid ones.
    assert!(accepted == 3 && accepted < tasks.len(), "{accepted} of {}", tasks.len());
    let files = corpus("tenants");
    let mut parsed = 0;
    for text in &files {
        let text = String::from_utf8_lossy(text);
        tenants(&text);
        parsed += usize::from(parse_tenants(&text).is_ok());
    }
    // The example file parses; the broken ones do not.
    assert!(parsed >= 1 && parsed < files.len(), "{parsed} of {}", files.len());
}

/// A corpus entry with some of its bytes changed, cut or repeated.
fn mutated(kind: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus(kind);
    (0..seeds.len(), prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..4), 0..8)).prop_map(move |(i, edits)| {
        let mut b = seeds[i].clone();
        for (at, byte, op) in edits {
            if b.is_empty() {
                b.push(byte);
                continue;
            }
            let at = at % b.len();
            match op {
                0 => b[at] = byte,
                1 => b.insert(at, byte),
                2 => {
                    b.truncate(at);
                }
                _ => {
                    let tail = b[at..].to_vec();
                    b.extend_from_slice(&tail);
                }
            }
        }
        b
    })
}

fn amqp_text() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        "[ -~]{0,300}",
        any::<String>(),
        Just("application/json; charset=utf-8".to_owned()),
        Just("amq.gen-xyz".to_owned()),
        Just("agenttask.reply.acme.q".to_owned()),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutated_task_messages_are_decided(body in mutated("tasks"), mid in amqp_text(), ct in amqp_text(), reply in amqp_text()) {
        decide(&body, mid.as_deref(), ct.as_deref(), reply.as_deref());
    }

    #[test]
    fn arbitrary_bytes_and_properties_are_decided(body in prop::collection::vec(any::<u8>(), 0..2048), mid in amqp_text(), ct in amqp_text(), reply in amqp_text()) {
        decide(&body, mid.as_deref(), ct.as_deref(), reply.as_deref());
    }

    #[test]
    fn mutated_tenants_files_are_parsed_or_refused(text in mutated("tenants")) {
        tenants(&String::from_utf8_lossy(&text));
    }

    #[test]
    fn arbitrary_tenants_files_are_parsed_or_refused(text in any::<String>()) {
        tenants(&text);
    }
}
