//! The Grafana dashboard and the Prometheus alert rules in deploy/monitoring: they parse, they
//! only use metrics the service exports, and the rules fire when they should (promtool's own
//! rule unit tests).

use std::collections::BTreeSet;
use std::path::Path;

use agenttask::metrics::Metrics;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/monitoring");

/// Every `agenttask_*` metric name in a text, without histogram suffixes.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("agenttask_") {
        let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
        out.insert(base.to_owned());
    }
    out
}

fn exported() -> BTreeSet<String> {
    Metrics::new().names().iter().cloned().collect()
}

#[test]
fn the_dashboard_parses_and_every_panel_queries_exported_metrics() {
    let text = std::fs::read_to_string(Path::new(DIR).join("grafana-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let exported = exported();
    let mut used = BTreeSet::new();
    for p in panels {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", p["title"]));
        assert!(!targets.is_empty(), "panel {} has no queries", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let names = referenced(expr);
            assert!(!names.is_empty(), "panel {} queries no AgentTask metric: {expr}", p["title"]);
            for n in names {
                assert!(exported.contains(&n), "panel {} uses {n}, which the service does not export", p["title"]);
                used.insert(n);
            }
        }
    }
    // What operators need to see, per the issue: each of these has a panel.
    for needed in [
        "agenttask_queue_depth",
        "agenttask_admission_wait_seconds",
        "agenttask_running_tasks",
        "agenttask_fair_share",
        "agenttask_actual_share",
        "agenttask_fairness_index",
        "agenttask_tasks_finished_total",
        "agenttask_outbox_oldest_seconds",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

#[test]
fn the_alert_rules_use_exported_metrics_and_pass_promtool() {
    let rules = Path::new(DIR).join("alerts.yml");
    let text = std::fs::read_to_string(&rules).unwrap();
    let exported = exported();
    let names = referenced(&text);
    assert!(names.len() >= 4, "{names:?}");
    for n in names {
        assert!(exported.contains(&n), "alerts.yml uses {n}, which the service does not export");
    }
    let promtool = |args: &[&str]| {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(DIR)
            .output()
            .expect("promtool runs (deploy/local/test.sh installs it: apt-get install prometheus)");
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(promtool(&["check", "rules", "alerts.yml"]).contains("7 rules found"));
    // The rules fire (and stay quiet) as alerts.test.yml says.
    assert!(promtool(&["test", "rules", "alerts.test.yml"]).contains("SUCCESS"));
}
