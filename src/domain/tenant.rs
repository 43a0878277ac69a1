//! Tenants: their names and the quotas an operator sets for them in the tenants file.
//!
//! Parsing is pure (text in, policies out) so that a bad file is refused with a message that names
//! the tenant and the field, before anything running is touched.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::quantity::{parse_cpu_millis, parse_memory_bytes};

/// A tenant's name: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`. It is part of queue names, routing keys
/// and Kubernetes labels, which is why it is so strict.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct TenantName(String);

impl TenantName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let b = s.as_bytes();
        let edge_ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let ok = !b.is_empty()
            && b.len() <= 63
            && edge_ok(b[0])
            && edge_ok(b[b.len() - 1])
            && b.iter().all(|&c| edge_ok(c) || c == b'-');
        if ok {
            Ok(TenantName(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a valid tenant name: use 1-63 lowercase letters, digits and '-', \
                 starting and ending with a letter or digit"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of this tenant's read-only Postgres role: `agenttask_tenant_<name>`, with `-` as
    /// `_`. Postgres cuts names at 63 bytes, so a long tenant name is shortened and ends in a hash
    /// of the whole name, keeping distinct tenants' roles distinct.
    pub fn sql_role(&self) -> String {
        const PREFIX: &str = "agenttask_tenant_";
        let name = self.0.replace('-', "_");
        if PREFIX.len() + name.len() <= 63 {
            return format!("{PREFIX}{name}");
        }
        let hash = crate::domain::token::sha256(self.0.as_bytes());
        let hex: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
        format!("{PREFIX}{}_{hex}", &name[..63 - PREFIX.len() - 9])
    }
}

/// Ordered and hashed as its text, so a map keyed by names can be asked with a `&str`.
impl std::borrow::Borrow<str> for TenantName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TenantName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TenantName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One tenant's resolved quotas (defaults applied, quantities parsed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantPolicy {
    pub weight: u32,
    pub max_concurrency: u32,
    pub max_queued: u64,
    pub rate_per_second: u32,
    pub burst: u32,
    pub max_timeout_seconds: u32,
    pub default_timeout_seconds: u32,
    pub max_cpu_millis: u64,
    pub max_memory_bytes: u64,
    pub default_cpu_millis: u64,
    pub default_memory_bytes: u64,
    pub max_code_bytes: u64,
    pub isolation: Vec<String>,
    /// Artifact storage for this tenant, over every task's artifacts still retained; past it a
    /// task's artifacts are not stored (the task still succeeds, its result says so).
    #[serde(default = "default_max_artifact_bytes")]
    pub max_artifact_bytes: u64,
    /// Kubernetes namespaces whose directly applied AgentTasks belong to this tenant (with one
    /// namespace for every task; `--namespace-per-tenant` maps namespaces by name instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// `--kube-backend sandbox`: the agent-sandbox `SandboxWarmPool` (in the task namespace)
    /// whose pre-warmed sandboxes run this tenant's eligible tasks (src/kube/agent-sandbox.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool: Option<String>,
    /// What a task does when `warm_pool` has no ready replica.
    #[serde(default)]
    pub warm_pool_empty: WarmPoolEmpty,
}

/// What a task for a warm pool with no ready replica does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WarmPoolEmpty {
    /// Runs at once on the cold path (its own Sandbox), and says so.
    #[default]
    Cold,
    /// Stays admitted and `Pending` until a replica is ready (at most its timeout).
    Wait,
}

impl WarmPoolEmpty {
    pub fn as_str(self) -> &'static str {
        match self {
            WarmPoolEmpty::Cold => "cold",
            WarmPoolEmpty::Wait => "wait",
        }
    }
}

fn default_max_artifact_bytes() -> u64 {
    1 << 30
}

impl Default for TenantPolicy {
    /// The contract's defaults, used for any field neither `[defaults]` nor the tenant sets.
    fn default() -> Self {
        TenantPolicy {
            weight: 1,
            max_concurrency: 8,
            max_queued: 10_000,
            rate_per_second: 50,
            burst: 50,
            max_timeout_seconds: 600,
            default_timeout_seconds: 30,
            max_cpu_millis: 2000,
            max_memory_bytes: 1 << 30,
            default_cpu_millis: 500,
            default_memory_bytes: 256 << 20,
            max_code_bytes: 1 << 20,
            isolation: vec!["standard".to_owned()],
            max_artifact_bytes: default_max_artifact_bytes(),
            namespaces: Vec::new(),
            warm_pool: None,
            warm_pool_empty: WarmPoolEmpty::default(),
        }
    }
}

/// The fields a `[defaults]` or `[tenants.NAME]` table may set; all optional so tables layer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyPatch {
    weight: Option<u32>,
    max_concurrency: Option<u32>,
    max_queued: Option<u64>,
    rate_per_second: Option<u32>,
    burst: Option<u32>,
    max_timeout_seconds: Option<u32>,
    default_timeout_seconds: Option<u32>,
    max_cpu: Option<String>,
    max_memory: Option<String>,
    default_cpu: Option<String>,
    default_memory: Option<String>,
    max_code_bytes: Option<u64>,
    isolation: Option<Vec<String>>,
    max_artifact_bytes: Option<u64>,
    namespaces: Option<Vec<String>>,
    warm_pool: Option<String>,
    warm_pool_empty: Option<WarmPoolEmpty>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFileRaw {
    #[serde(default)]
    defaults: PolicyPatch,
    #[serde(default)]
    tenants: BTreeMap<String, Option<PolicyPatch>>,
}

/// Every configured tenant and its policy, in name order.
pub type Tenants = BTreeMap<TenantName, TenantPolicy>;

impl PolicyPatch {
    fn apply(&self, base: &TenantPolicy, burst_set: bool) -> Result<(TenantPolicy, bool), String> {
        let mut p = base.clone();
        let cpu = |s: &Option<String>, field: &str, cur: u64| -> Result<u64, String> {
            s.as_deref().map(|v| parse_cpu_millis(v).map_err(|e| format!("{field}: {e}"))).unwrap_or(Ok(cur))
        };
        let mem = |s: &Option<String>, field: &str, cur: u64| -> Result<u64, String> {
            s.as_deref().map(|v| parse_memory_bytes(v).map_err(|e| format!("{field}: {e}"))).unwrap_or(Ok(cur))
        };
        p.weight = self.weight.unwrap_or(p.weight);
        p.max_concurrency = self.max_concurrency.unwrap_or(p.max_concurrency);
        p.max_queued = self.max_queued.unwrap_or(p.max_queued);
        p.rate_per_second = self.rate_per_second.unwrap_or(p.rate_per_second);
        p.max_timeout_seconds = self.max_timeout_seconds.unwrap_or(p.max_timeout_seconds);
        p.default_timeout_seconds = self.default_timeout_seconds.unwrap_or(p.default_timeout_seconds);
        p.max_cpu_millis = cpu(&self.max_cpu, "max_cpu", p.max_cpu_millis)?;
        p.max_memory_bytes = mem(&self.max_memory, "max_memory", p.max_memory_bytes)?;
        p.default_cpu_millis = cpu(&self.default_cpu, "default_cpu", p.default_cpu_millis)?;
        p.default_memory_bytes = mem(&self.default_memory, "default_memory", p.default_memory_bytes)?;
        p.max_code_bytes = self.max_code_bytes.unwrap_or(p.max_code_bytes);
        p.max_artifact_bytes = self.max_artifact_bytes.unwrap_or(p.max_artifact_bytes);
        if let Some(iso) = &self.isolation {
            p.isolation = iso.clone();
        }
        if let Some(ns) = &self.namespaces {
            p.namespaces = ns.clone();
        }
        if let Some(pool) = &self.warm_pool {
            // An empty name turns a pool set in `[defaults]` off for one tenant.
            p.warm_pool = Some(pool.clone()).filter(|p| !p.is_empty());
        }
        p.warm_pool_empty = self.warm_pool_empty.unwrap_or(p.warm_pool_empty);
        // `burst` follows `rate_per_second` unless some table set it explicitly.
        let burst_set = burst_set || self.burst.is_some();
        p.burst = match self.burst {
            Some(b) => b,
            None if burst_set => p.burst,
            None => p.rate_per_second,
        };
        Ok((p, burst_set))
    }
}

impl TenantPolicy {
    fn check(&self) -> Result<(), String> {
        let positive = [
            ("weight", self.weight as u64),
            ("max_concurrency", self.max_concurrency as u64),
            ("rate_per_second", self.rate_per_second as u64),
            ("burst", self.burst as u64),
            ("max_timeout_seconds", self.max_timeout_seconds as u64),
            ("default_timeout_seconds", self.default_timeout_seconds as u64),
            ("max_cpu", self.max_cpu_millis),
            ("max_memory", self.max_memory_bytes),
            ("default_cpu", self.default_cpu_millis),
            ("default_memory", self.default_memory_bytes),
            ("max_code_bytes", self.max_code_bytes),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be greater than 0"));
        }
        if self.default_timeout_seconds > self.max_timeout_seconds {
            return Err("default_timeout_seconds is larger than max_timeout_seconds".into());
        }
        if self.default_cpu_millis > self.max_cpu_millis {
            return Err("default_cpu is larger than max_cpu".into());
        }
        if self.default_memory_bytes > self.max_memory_bytes {
            return Err("default_memory is larger than max_memory".into());
        }
        if self.max_code_bytes > 16 << 20 {
            return Err("max_code_bytes is above the 16 MiB the service accepts".into());
        }
        if self.default_memory_bytes < super::quantity::MIN_MEMORY_BYTES {
            return Err("default_memory is below the 16Mi every task needs".into());
        }
        if self.isolation.is_empty() {
            return Err("isolation must allow at least one value, e.g. [\"standard\"]".into());
        }
        for iso in &self.isolation {
            if iso != "standard" && TenantName::parse(iso).is_err() {
                return Err(format!("isolation {iso:?} is neither \"standard\" nor a runtime class name"));
            }
        }
        for ns in &self.namespaces {
            // A namespace name is an RFC 1123 label, the same shape as a tenant name.
            TenantName::parse(ns)
                .map_err(|_| format!("namespaces: {ns:?} is not a valid Kubernetes namespace name"))?;
        }
        if let Some(pool) = &self.warm_pool {
            // The pool's name is also a label value and part of its Secret's and policy's names.
            TenantName::parse(pool).map_err(|_| {
                format!(
                    "warm_pool: {pool:?} is not a usable SandboxWarmPool name: at most 63 lowercase letters, \
                     digits and '-', starting and ending with a letter or digit"
                )
            })?;
        }
        Ok(())
    }
}

/// Parses a tenants file. Errors name the table and field to fix.
pub fn parse_tenants(text: &str) -> Result<Tenants, String> {
    let raw: TenantsFileRaw = toml::from_str(text).map_err(|e| e.to_string())?;
    let (defaults, burst_set) =
        raw.defaults.apply(&TenantPolicy::default(), false).map_err(|e| format!("[defaults] {e}"))?;
    defaults.check().map_err(|e| format!("[defaults] {e}"))?;
    if raw.defaults.namespaces.is_some() {
        return Err("[defaults] namespaces: a namespace belongs to one tenant; set it in that tenant's table".into());
    }
    let mut tenants = Tenants::new();
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for (name, patch) in raw.tenants {
        let tenant = TenantName::parse(&name).map_err(|e| format!("[tenants.{name}] {e}"))?;
        let (policy, _) =
            patch.unwrap_or_default().apply(&defaults, burst_set).map_err(|e| format!("[tenants.{name}] {e}"))?;
        policy.check().map_err(|e| format!("[tenants.{name}] {e}"))?;
        for ns in &policy.namespaces {
            if let Some(other) = owners.insert(ns.clone(), name.clone()) {
                return Err(format!("[tenants.{name}] namespaces: {ns:?} already belongs to tenant {other}"));
            }
        }
        tenants.insert(tenant, policy);
    }
    Ok(tenants)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names() {
        for ok in ["a", "acme", "a-b", "0x9", &"a".repeat(63)] {
            assert!(TenantName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Acme", "a.b", "a_b", "a b", &"a".repeat(64), "é"] {
            assert!(TenantName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn contract_example_parses_with_layering() {
        let text = r#"
            [defaults]
            weight = 1
            max_concurrency = 8
            rate_per_second = 50
            max_memory = "1Gi"
            isolation = ["standard"]

            [tenants.acme]
            weight = 3
            max_concurrency = 32
            namespaces = ["acme-evals"]

            [tenants.globex]
        "#;
        let t = parse_tenants(text).unwrap();
        let acme = &t[&TenantName::parse("acme").unwrap()];
        assert_eq!((acme.weight, acme.max_concurrency, acme.burst), (3, 32, 50));
        assert_eq!(acme.namespaces, ["acme-evals"]);
        let globex = &t[&TenantName::parse("globex").unwrap()];
        assert_eq!(globex.max_concurrency, 8);
        assert_eq!(globex.max_memory_bytes, 1 << 30);
    }

    #[test]
    fn burst_follows_rate_unless_set() {
        let t = parse_tenants("[tenants.a]\nrate_per_second = 7\n[tenants.b]\nburst = 3").unwrap();
        assert_eq!(t[&TenantName::parse("a").unwrap()].burst, 7);
        assert_eq!(t[&TenantName::parse("b").unwrap()].burst, 3);
    }

    #[test]
    fn bad_files_name_the_problem() {
        let cases = [
            ("[tenants.Bad]", "tenants.Bad"),
            ("[tenants.a]\nweight = 0", "weight"),
            ("[tenants.a]\nmax_cpu = \"lots\"", "max_cpu"),
            ("[tenants.a]\nmax_conccurency = 3", "max_conccurency"),
            ("[defaults]\ndefault_timeout_seconds = 900", "default_timeout_seconds"),
            ("[tenants.a]\nisolation = [\"../x\"]", "isolation"),
            ("[tenants.a]\nnamespaces = [\"Evals\"]", "namespaces"),
            ("[tenants.a]\nnamespaces = [\"x\"]\n[tenants.b]\nnamespaces = [\"x\"]", "already belongs to tenant a"),
            ("[defaults]\nnamespaces = [\"x\"]", "[defaults] namespaces"),
            ("[tenants.a]\nwarm_pool = \"Py.Pool\"", "warm_pool"),
            ("[tenants.a]\nwarm_pool_empty = \"later\"", "warm_pool_empty"),
        ];
        for (text, needle) in cases {
            let err = parse_tenants(text).unwrap_err();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn warm_pool_settings_layer_and_default_to_cold() {
        let t = parse_tenants(
            "[defaults]\nwarm_pool = \"py\"\n[tenants.a]\nwarm_pool_empty = \"wait\"\n[tenants.b]\nwarm_pool = \"\"\n[tenants.c]",
        )
        .unwrap();
        let get = |n: &str| t[&TenantName::parse(n).unwrap()].clone();
        assert_eq!((get("a").warm_pool.as_deref(), get("a").warm_pool_empty), (Some("py"), WarmPoolEmpty::Wait));
        assert_eq!(get("b").warm_pool, None);
        assert_eq!((get("c").warm_pool.as_deref(), get("c").warm_pool_empty), (Some("py"), WarmPoolEmpty::Cold));
        assert_eq!(TenantPolicy::default().warm_pool, None);
    }

    #[test]
    fn sql_role_names_fit_postgres_and_stay_distinct() {
        let role = |s: &str| TenantName::parse(s).unwrap().sql_role();
        assert_eq!(role("acme-evals"), "agenttask_tenant_acme_evals");
        let long_a = format!("{}a", "x".repeat(62));
        let long_b = format!("{}b", "x".repeat(62));
        let (a, b) = (role(&long_a), role(&long_b));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert_eq!(role(&"y".repeat(46)).len(), 63, "the longest that needs no hash");
    }
}
