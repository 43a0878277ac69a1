//! What `/readyz` reports: each connection a component depends on says whether it is up, and
//! the HTTP endpoint adds what it checks itself (the database, the migrations).
//!
//! Parts start *down* ("starting") when registered, so a process is not ready before its
//! consumers and publisher are connected, and go down again the moment a connection is lost.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The parts of this process and, for those that are down, why.
#[derive(Debug, Default)]
pub struct Readiness {
    parts: Mutex<BTreeMap<String, Option<String>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// `part` is connected and working.
    pub fn up(&self, part: &str) {
        self.parts.lock().expect("not poisoned").insert(part.to_owned(), None);
    }

    /// `part` is not working, because `why`.
    pub fn down(&self, part: &str, why: impl Into<String>) {
        self.parts.lock().expect("not poisoned").insert(part.to_owned(), Some(why.into()));
    }

    /// `part` no longer exists (a removed tenant's consumer): it neither helps nor hurts.
    pub fn forget(&self, part: &str) {
        self.parts.lock().expect("not poisoned").remove(part);
    }

    /// The parts that are down, with why.
    pub fn down_parts(&self) -> BTreeMap<String, String> {
        self.parts
            .lock()
            .expect("not poisoned")
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|why| (k.clone(), why.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_go_down_and_up_and_away() {
        let r = Readiness::new();
        assert!(r.down_parts().is_empty());
        r.down("rabbitmq ingest q1", "starting");
        r.down("rabbitmq publisher", "connection refused");
        assert_eq!(r.down_parts().len(), 2);
        r.up("rabbitmq ingest q1");
        assert_eq!(r.down_parts().keys().collect::<Vec<_>>(), ["rabbitmq publisher"]);
        r.forget("rabbitmq publisher");
        assert!(r.down_parts().is_empty());
    }
}
