//! The executor's journal: what the event loop reported about its runs that the store has not
//! recorded yet, folded per run so that one batch holds at most one write per run. Pure; the
//! writer that drains it into the store is `JournalWriter` in the parent module.
//!
//! Folding keeps what a serial writer would have left in the row, with fewer writes:
//! - a finish supersedes the run's marks: it moves the task from any active phase and sets
//!   `started_at` itself (to the folded `Running` mark's time, which a serial writer would have
//!   stored first);
//! - `Running` supersedes `Scheduled` (it is accepted from `Pending` too), and a `Scheduled`
//!   reported after `Running` changes nothing, as the store's phase guard would refuse it;
//! - nothing supersedes a finish (the loop sends nothing for a run after its finish).

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::Watched;
use crate::exec::{Outcome, RunKey};
use crate::store::Mark;

/// What the event loop reports about one run.
#[derive(Debug)]
pub(super) enum Report {
    Mark(Mark),
    Finish(Box<Outcome>),
}

/// The one write a batch holds for a run.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Write {
    Mark(Mark),
    Finish {
        outcome: Box<Outcome>,
        /// The time of a `Running` mark folded into this finish.
        running_at: Option<DateTime<Utc>>,
        /// The outcome was already replaced by a `BackendError` because Postgres refused a value
        /// of the original: a second refusal is not retried.
        stripped: bool,
    },
}

/// A run and its pending write.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub(super) run: Watched,
    pub(super) write: Write,
}

/// Pending writes in the order their runs first reported, one per run.
#[derive(Debug, Default)]
pub(super) struct Journal {
    slots: Vec<Slot>,
    index: HashMap<RunKey, usize>,
}

impl Journal {
    /// Folds `report` about `run` into what is pending for that run.
    pub(super) fn push(&mut self, run: Watched, report: Report) {
        let Some(&i) = self.index.get(&run.key) else {
            let write = match report {
                Report::Mark(mark) => Write::Mark(mark),
                Report::Finish(outcome) => Write::Finish { outcome, running_at: None, stripped: false },
            };
            self.index.insert(run.key, self.slots.len());
            self.slots.push(Slot { run, write });
            return;
        };
        let slot = &mut self.slots[i];
        slot.write = match (std::mem::replace(&mut slot.write, Write::Mark(Mark::Scheduled)), report) {
            (finish @ Write::Finish { .. }, _) => finish,
            (Write::Mark(Mark::Running { at }), Report::Finish(outcome)) => {
                Write::Finish { outcome, running_at: Some(at), stripped: false }
            }
            (Write::Mark(Mark::Scheduled), Report::Finish(outcome)) => {
                Write::Finish { outcome, running_at: None, stripped: false }
            }
            (Write::Mark(Mark::Scheduled), Report::Mark(mark)) => Write::Mark(mark),
            (running @ Write::Mark(Mark::Running { .. }), Report::Mark(_)) => running,
        };
    }

    /// How many runs have a pending write.
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Takes every pending write, oldest run first.
    pub(super) fn take(&mut self) -> Vec<Slot> {
        self.index.clear();
        std::mem::take(&mut self.slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::Termination;
    use uuid::Uuid;

    fn run(attempt: i32, task_id: Uuid) -> Watched {
        Watched {
            key: RunKey { task_id, attempt },
            tenant: "acme".into(),
            language: None,
            timeout_seconds: 5,
            backend: "fake",
            finishing: false,
        }
    }

    fn outcome(code: i32) -> Box<Outcome> {
        let mut o = Outcome::bare(Termination::Exited, Utc::now(), Utc::now());
        o.exit_code = Some(code);
        Box::new(o)
    }

    /// What folding decided for each run: its mark, or its finish's exit code and start time.
    #[derive(Debug, PartialEq)]
    enum Decided {
        Mark(Mark),
        Finish(Option<i32>, Option<DateTime<Utc>>),
    }

    fn decided(j: &mut Journal) -> Vec<(RunKey, Decided)> {
        j.take()
            .into_iter()
            .map(|s| {
                let d = match s.write {
                    Write::Mark(m) => Decided::Mark(m),
                    Write::Finish { outcome, running_at, stripped } => {
                        assert!(!stripped);
                        Decided::Finish(outcome.exit_code, running_at)
                    }
                };
                (s.run.key, d)
            })
            .collect()
    }

    #[test]
    fn each_run_keeps_the_furthest_write_it_reported() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z").unwrap().with_timezone(&Utc);
        let (a, b, c, d) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut j = Journal::default();
        // a: placed, started, finished (what the null backend reports at once).
        j.push(run(1, a), Report::Mark(Mark::Scheduled));
        j.push(run(1, a), Report::Mark(Mark::Running { at: t }));
        j.push(run(1, a), Report::Finish(outcome(0)));
        // b: placed then started; c: started, then a late placement report.
        j.push(run(1, b), Report::Mark(Mark::Scheduled));
        j.push(run(1, b), Report::Mark(Mark::Running { at: t }));
        j.push(run(2, c), Report::Mark(Mark::Running { at: t }));
        j.push(run(2, c), Report::Mark(Mark::Scheduled));
        // d: placed, then finished without a start (a run cancelled while it was placed).
        j.push(run(1, d), Report::Mark(Mark::Scheduled));
        j.push(run(1, d), Report::Finish(outcome(3)));
        assert_eq!(j.len(), 4);
        assert_eq!(
            decided(&mut j),
            [
                (run(1, a).key, Decided::Finish(Some(0), Some(t))),
                (run(1, b).key, Decided::Mark(Mark::Running { at: t })),
                (run(2, c).key, Decided::Mark(Mark::Running { at: t })),
                (run(1, d).key, Decided::Finish(Some(3), None)),
            ]
        );
        assert_eq!(j.len(), 0, "taking empties the journal");
    }

    #[test]
    fn a_finish_is_final_and_attempts_are_separate_runs() {
        let t = Utc::now();
        let task = Uuid::new_v4();
        let mut j = Journal::default();
        j.push(run(1, task), Report::Finish(outcome(7)));
        j.push(run(1, task), Report::Mark(Mark::Running { at: t }));
        j.push(run(1, task), Report::Finish(outcome(0)));
        // A newer attempt of the same task is another run: the store's attempt guard decides.
        j.push(run(2, task), Report::Mark(Mark::Scheduled));
        assert_eq!(
            decided(&mut j),
            [
                (RunKey { task_id: task, attempt: 1 }, Decided::Finish(Some(7), None)),
                (RunKey { task_id: task, attempt: 2 }, Decided::Mark(Mark::Scheduled)),
            ]
        );
    }
}
