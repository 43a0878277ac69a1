//! Admission decisions: which tenants' queued tasks start now.
//!
//! This is the walking skeleton's policy: tenants take turns, one task per turn, under each
//! tenant's `max_concurrency` and the global `--max-running`. The fair-share core replaces the
//! choice of "whose turn" without changing this seam: the scheduler hands in a snapshot of every
//! backlogged tenant and gets back an ordered list of admissions.

/// One tenant's state as the scheduler sees it at the start of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantLoad {
    pub tenant: String,
    /// Admitted and not finished (Pending, Scheduled, Running).
    pub running: u32,
    pub max_concurrency: u32,
    /// Queued tasks that could be admitted now (the caller may cap this at what it fetched).
    pub queued: u32,
}

/// Chooses admissions, returning indexes into `tenants` in admission order (an index appears once
/// per task to admit). Turns start at `start % len` so that, over rounds, no tenant is always first.
pub fn round_robin(tenants: &[TenantLoad], free_slots: u32, start: usize) -> Vec<usize> {
    let n = tenants.len();
    let mut admitted = vec![0u32; n];
    let mut out = Vec::new();
    if n == 0 {
        return out;
    }
    let can_take = |i: usize, admitted: &[u32]| {
        let t = &tenants[i];
        admitted[i] < t.queued && t.running.saturating_add(admitted[i]) < t.max_concurrency
    };
    let mut free = free_slots;
    while free > 0 {
        let mut progressed = false;
        for k in 0..n {
            let i = (start + k) % n;
            if free == 0 {
                break;
            }
            if can_take(i, &admitted) {
                admitted[i] += 1;
                out.push(i);
                free -= 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(running: u32, max: u32, queued: u32) -> TenantLoad {
        TenantLoad { tenant: String::new(), running, max_concurrency: max, queued }
    }

    #[test]
    fn takes_turns_under_every_cap() {
        let t = [load(0, 8, 10), load(0, 8, 10), load(0, 8, 0)];
        assert_eq!(round_robin(&t, 5, 0), vec![0, 1, 0, 1, 0]);
        assert_eq!(round_robin(&t, 5, 1), vec![1, 0, 1, 0, 1]);
        let t = [load(7, 8, 10), load(0, 2, 10)];
        assert_eq!(round_robin(&t, 10, 0), vec![0, 1, 1]);
        assert!(round_robin(&t, 0, 0).is_empty());
        assert!(round_robin(&[], 3, 0).is_empty());
    }

    #[test]
    fn never_exceeds_limits() {
        for free in 0..20 {
            for start in 0..4 {
                let t = [load(1, 3, 5), load(0, 4, 2), load(5, 5, 9), load(0, 9, 9)];
                let out = round_robin(&t, free, start);
                assert!(out.len() as u32 <= free);
                for (i, tl) in t.iter().enumerate() {
                    let n = out.iter().filter(|&&j| j == i).count() as u32;
                    assert!(n <= tl.queued && tl.running + n <= tl.max_concurrency);
                }
                // Work-conserving: if slots remain, nobody else could take one.
                if (out.len() as u32) < free {
                    for (i, tl) in t.iter().enumerate() {
                        let n = out.iter().filter(|&&j| j == i).count() as u32;
                        assert!(n == tl.queued || tl.running + n == tl.max_concurrency);
                    }
                }
            }
        }
    }
}
