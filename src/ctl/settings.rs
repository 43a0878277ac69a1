//! Where agentctl's settings come from: a flag, else its environment variable (clap reads both),
//! else the user's config file, else the built-in default.
//!
//! The file is `$XDG_CONFIG_HOME/agentctl/config.toml` (`~/.config/agentctl/config.toml` when
//! `XDG_CONFIG_HOME` is unset), with the keys `server`, `token`, `tenant` and `amqp_url`. A
//! missing file is fine; an unreadable one, or one with an unknown key, is an error naming the
//! file, because a misspelt `tokn = ...` silently ignored would send requests without a token.
//! [`resolve`] is the precedence rule alone, without I/O, so it is tested on its own.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::DEFAULT_AMQP_URL;

/// The API's address when nothing else names it.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:9464";

/// One layer of settings (flags and env together, or the file): each may be unset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub server: Option<String>,
    pub token: Option<String>,
    pub tenant: Option<String>,
    pub amqp_url: Option<String>,
}

/// The settings a command runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub server: String,
    pub token: Option<String>,
    pub tenant: Option<String>,
    pub amqp_url: String,
}

/// The precedence rule: the command line's layer (a flag, else its env variable) wins over the
/// file's, which wins over the defaults.
pub fn resolve(command_line: Layer, file: Layer) -> Resolved {
    Resolved {
        server: command_line.server.or(file.server).unwrap_or_else(|| DEFAULT_SERVER.to_owned()),
        token: command_line.token.or(file.token),
        tenant: command_line.tenant.or(file.tenant),
        amqp_url: command_line.amqp_url.or(file.amqp_url).unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned()),
    }
}

/// Parses the config file's text; errors name `path` and say what is wrong.
pub fn parse(path: &Path, text: &str) -> Result<Layer, String> {
    toml::from_str(text).map_err(|e| {
        format!("{}: {} (the keys are server, token, tenant and amqp_url)", path.display(), e.to_string().trim_end())
    })
}

/// The config file's path, from `XDG_CONFIG_HOME` or `HOME`; `None` when neither is set.
pub fn path(xdg_config_home: Option<&str>, home: Option<&str>) -> Option<PathBuf> {
    // The XDG spec says a relative XDG_CONFIG_HOME is invalid and is to be ignored.
    match (xdg_config_home.filter(|x| Path::new(x).is_absolute()), home.filter(|h| !h.is_empty())) {
        (Some(x), _) => Some(Path::new(x).join("agentctl/config.toml")),
        (None, Some(h)) => Some(Path::new(h).join(".config/agentctl/config.toml")),
        (None, None) => None,
    }
}

/// A token in a file others can read is a credential leak waiting to happen (like ssh's
/// "UNPROTECTED PRIVATE KEY FILE"); this is the warning, or `None` when the mode is private.
pub fn exposure_warning(path: &Path, mode: u32, has_token: bool) -> Option<String> {
    (has_token && mode & 0o044 != 0).then(|| {
        format!(
            "warning: {} holds a token and is readable by {} (mode {:o}); run: chmod 600 {}",
            path.display(),
            if mode & 0o004 != 0 { "everyone" } else { "its group" },
            mode & 0o777,
            path.display()
        )
    })
}

/// Reads the user's config file (if there is one) and resolves every setting. Warnings go to
/// stderr.
pub fn load(command_line: Layer) -> Result<Resolved, String> {
    let xdg = std::env::var("XDG_CONFIG_HOME").ok();
    let home = std::env::var("HOME").ok();
    let Some(path) = path(xdg.as_deref(), home.as_deref()) else {
        return Ok(resolve(command_line, Layer::default()));
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(resolve(command_line, Layer::default())),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let file = parse(&path, &text)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).map(|m| m.permissions().mode()).unwrap_or(0);
        if let Some(w) = exposure_warning(&path, mode, file.token.is_some()) {
            eprintln!("{w}");
        }
    }
    Ok(resolve(command_line, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(server: Option<&str>, token: Option<&str>, tenant: Option<&str>, amqp: Option<&str>) -> Layer {
        Layer {
            server: server.map(str::to_owned),
            token: token.map(str::to_owned),
            tenant: tenant.map(str::to_owned),
            amqp_url: amqp.map(str::to_owned),
        }
    }

    #[test]
    fn the_command_line_beats_the_file_which_beats_the_defaults() {
        let file = layer(Some("http://file:1"), Some("file-token"), Some("file-tenant"), Some("amqp://file"));
        // Each setting on its own: set on the command line, it wins; unset, the file's is used.
        let got = resolve(layer(Some("http://flag:1"), None, None, None), file.clone());
        assert_eq!(got.server, "http://flag:1");
        assert_eq!(got.token.as_deref(), Some("file-token"));
        let got = resolve(layer(None, Some("t"), Some("acme"), Some("amqp://flag")), file.clone());
        assert_eq!(
            got,
            Resolved {
                server: "http://file:1".into(),
                token: Some("t".into()),
                tenant: Some("acme".into()),
                amqp_url: "amqp://flag".into(),
            }
        );
        let got = resolve(Layer::default(), Layer::default());
        assert_eq!(
            got,
            Resolved { server: DEFAULT_SERVER.into(), token: None, tenant: None, amqp_url: DEFAULT_AMQP_URL.into() }
        );
    }

    #[test]
    fn the_file_takes_the_four_keys_and_refuses_any_other_naming_itself() {
        let p = Path::new("/home/u/.config/agentctl/config.toml");
        let got =
            parse(p, "server = \"http://s\"\ntoken = \"x\"\ntenant = \"acme\"\namqp_url = \"amqp://a\"\n").unwrap();
        assert_eq!(got, layer(Some("http://s"), Some("x"), Some("acme"), Some("amqp://a")));
        assert_eq!(parse(p, "").unwrap(), Layer::default());
        let err = parse(p, "tokn = \"x\"\n").unwrap_err();
        assert!(err.starts_with("/home/u/.config/agentctl/config.toml: ") && err.contains("tokn"), "{err}");
        let err = parse(p, "server = 3\n").unwrap_err();
        assert!(err.contains("config.toml") && err.contains("server"), "{err}");
    }

    #[test]
    fn xdg_config_home_wins_over_home_when_it_is_absolute() {
        assert_eq!(path(Some("/x"), Some("/h")), Some(PathBuf::from("/x/agentctl/config.toml")));
        assert_eq!(path(Some("rel"), Some("/h")), Some(PathBuf::from("/h/.config/agentctl/config.toml")));
        assert_eq!(path(None, Some("/h")), Some(PathBuf::from("/h/.config/agentctl/config.toml")));
        assert_eq!(path(None, None), None);
    }

    #[test]
    fn only_a_readable_token_is_warned_about() {
        let p = Path::new("/c.toml");
        assert_eq!(exposure_warning(p, 0o100600, true), None);
        assert_eq!(exposure_warning(p, 0o100644, false), None);
        assert!(exposure_warning(p, 0o100640, true).unwrap().contains("its group"));
        let w = exposure_warning(p, 0o100644, true).unwrap();
        assert!(w.contains("everyone") && w.contains("chmod 600 /c.toml") && w.contains("644"), "{w}");
    }
}
