//! Listing tasks: the filters of `GET /v1/tasks`, checked one by one, and the opaque cursor of
//! its keyset pagination.
//!
//! Tasks are listed newest first by `(submitted_at, task_id)`, a total order, so a page ends at a
//! key and the next page starts strictly after it: rows inserted meanwhile never shift a page, and
//! every row present for the whole listing is listed exactly once. The cursor is that key, in
//! base64url so that clients treat it as opaque.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::phase::Phase;

/// Rows per page unless `limit` says otherwise, and the most a page holds.
pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;

/// Where a page ends: the last row's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub submitted_at: DateTime<Utc>,
    pub task_id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}.{}", self.submitted_at.timestamp_micros(), self.task_id.simple()))
    }

    pub fn decode(s: &str) -> Option<Cursor> {
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(s).ok()?).ok()?;
        let (micros, id) = text.split_once('.')?;
        Some(Cursor {
            submitted_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            task_id: Uuid::try_parse(id).ok()?,
        })
    }
}

/// What `GET /v1/tasks` was asked for, checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskFilter {
    pub tenant: Option<String>,
    pub batch: Option<String>,
    /// Any of these phases.
    pub phases: Option<Vec<Phase>>,
    /// Every one of these labels (a JSON object, matched with `@>`).
    pub labels: Option<serde_json::Map<String, serde_json::Value>>,
    /// Submitted at or after.
    pub since: Option<DateTime<Utc>>,
    /// Submitted before.
    pub until: Option<DateTime<Utc>>,
    pub after: Option<Cursor>,
    pub limit: i64,
}

/// A parameter that cannot be used, named, with what would do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad parameter {param:?}: {message}")]
pub struct BadParam {
    pub param: String,
    pub message: String,
}

fn bad(param: &str, message: impl Into<String>) -> BadParam {
    BadParam { param: param.to_owned(), message: message.into() }
}

fn time(param: &str, v: &str) -> Result<DateTime<Utc>, BadParam> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| bad(param, format!("{v:?} is not an RFC 3339 time such as 2026-11-27T12:00:00Z")))
}

impl TaskFilter {
    /// Parses the query's pairs. Every parameter but `label` may appear once; an unknown one is
    /// refused, not ignored (a typo must not silently widen a listing).
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<TaskFilter, BadParam> {
        let mut f = TaskFilter { limit: DEFAULT_LIMIT, ..Default::default() };
        let mut seen = std::collections::BTreeSet::new();
        for (k, v) in pairs {
            if k != "label" && !seen.insert(k.as_str()) {
                return Err(bad(k, "given twice"));
            }
            match k.as_str() {
                "tenant" => f.tenant = Some(v.clone()).filter(|v| !v.is_empty()),
                "batch" => f.batch = Some(v.clone()).filter(|v| !v.is_empty()),
                "phase" => {
                    let phases = v
                        .split(',')
                        .map(|p| p.trim().parse::<Phase>().map_err(|e| bad(k, e)))
                        .collect::<Result<_, _>>()?;
                    f.phases = Some(phases);
                }
                "label" => {
                    let (key, value) = v
                        .split_once('=')
                        .filter(|(key, _)| !key.is_empty())
                        .ok_or_else(|| bad(k, format!("{v:?}: use label=KEY=VALUE")))?;
                    f.labels.get_or_insert_with(Default::default).insert(key.to_owned(), value.into());
                }
                "since" => f.since = Some(time(k, v)?),
                "until" => f.until = Some(time(k, v)?),
                "cursor" => {
                    f.after = Some(Cursor::decode(v).ok_or_else(|| {
                        bad(k, "not a cursor from this API: pass next_cursor from the previous page as it is")
                    })?)
                }
                "limit" => {
                    f.limit = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| bad(k, format!("{v:?}: expected a number from 1 to {MAX_LIMIT}")))?
                }
                _ => {
                    return Err(bad(
                        k,
                        "unknown; the filters are tenant, batch, phase, label, since, until, cursor, limit",
                    ))
                }
            }
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_cursor_round_trips_and_garbage_is_not_one() {
        let c = Cursor {
            submitted_at: DateTime::parse_from_rfc3339("2026-11-27T12:00:00.123456Z").unwrap().with_timezone(&Utc),
            task_id: Uuid::from_u128(42),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for s in ["", "x", "!!!", &URL_SAFE_NO_PAD.encode("12.nope"), &URL_SAFE_NO_PAD.encode("x.0")] {
            assert_eq!(Cursor::decode(s), None, "{s:?}");
        }
    }

    #[test]
    fn every_filter_parses() {
        let f = TaskFilter::from_pairs(&pairs(&[
            ("tenant", "acme"),
            ("batch", "b1"),
            ("phase", "Succeeded,failed"),
            ("label", "team=x"),
            ("label", "run=a=b"),
            ("since", "2026-11-27T00:00:00Z"),
            ("until", "2026-11-28T00:00:00+01:00"),
            ("limit", "7"),
        ]))
        .unwrap();
        assert_eq!((f.tenant.as_deref(), f.batch.as_deref()), (Some("acme"), Some("b1")));
        assert_eq!(f.phases, Some(vec![Phase::Succeeded, Phase::Failed]));
        assert_eq!(serde_json::Value::Object(f.labels.unwrap()), serde_json::json!({"team": "x", "run": "a=b"}));
        assert_eq!(f.until.unwrap().to_rfc3339(), "2026-11-27T23:00:00+00:00");
        assert_eq!(f.limit, 7);
        assert_eq!(TaskFilter::from_pairs(&[]).unwrap().limit, DEFAULT_LIMIT);
    }

    #[test]
    fn each_bad_parameter_is_named() {
        for (k, v) in [
            ("phase", "Bogus"),
            ("phase", "Queued,"),
            ("label", "novalue"),
            ("label", "=x"),
            ("since", "yesterday"),
            ("until", "2026-11-27"),
            ("cursor", "nope"),
            ("limit", "0"),
            ("limit", "1001"),
            ("limit", "ten"),
            ("tenants", "acme"),
        ] {
            let e = TaskFilter::from_pairs(&pairs(&[(k, v)])).unwrap_err();
            assert_eq!(e.param, k, "{k}={v}: {e}");
        }
        let e = TaskFilter::from_pairs(&pairs(&[("batch", "a"), ("batch", "b")])).unwrap_err();
        assert_eq!(e.param, "batch");
    }
}
