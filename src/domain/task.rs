//! The validated shape of a task, as the rest of the service sees it.

use serde::{Deserialize, Serialize};

/// A task's language; decides which runtime runs the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    R,
}

impl Language {
    pub const ALL: [Language; 2] = [Language::Python, Language::R];

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::R => "r",
        }
    }
}

impl std::fmt::Display for Language {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Language {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "python" => Ok(Language::Python),
            "r" => Ok(Language::R),
            _ => Err(format!("unknown language {s:?}; use \"python\" or \"r\"")),
        }
    }
}

/// A validated task: every field checked and capped, defaults from the tenant applied.
///
/// The program-facing part ([`Program`]) is stored as one JSON document; the scheduling fields are
/// columns so that admission can read them without decoding the program.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub language: Language,
    pub program: Program,
    pub timeout_seconds: u32,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub priority: i16,
    pub batch_id: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub isolation: String,
}

/// What the sandbox needs to run the code. Files are kept base64-encoded so the document is
/// plain JSON (Postgres `jsonb` cannot hold NUL bytes).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Program {
    pub code: String,
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}
