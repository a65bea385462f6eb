//! Settings that `huggingface_hub` reads from the environment, read the same way here.
//!
//! Everything is gathered once into a [`HubConfig`] and then passed explicitly, so library code and
//! tests never depend on (or mutate) process-wide variables behind the caller's back.

use std::path::PathBuf;
use std::time::Duration;

/// The public hub; `HF_ENDPOINT` overrides it.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// `huggingface_hub`'s default `HF_HUB_ETAG_TIMEOUT`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to reach the hub and its local cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// Root of the model cache (the directory holding `models--org--name/`).
    pub cache_dir: PathBuf,
    /// Hub base URL, without a trailing slash.
    pub endpoint: String,
    /// Access token sent as `Authorization: Bearer`, if any.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: never touch the network.
    pub offline: bool,
    /// How long to wait for the endpoint to accept a connection (`HF_HUB_ETAG_TIMEOUT` seconds,
    /// default 10, as in `huggingface_hub`).
    pub connect_timeout: Duration,
}

impl HubConfig {
    /// Read the settings from the process environment (see [`HubConfig::from_vars`]).
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Read the settings through `var`, which maps a variable name to its value; empty values count
    /// as unset. The precedence follows `huggingface_hub`:
    ///
    /// - cache: `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`,
    ///   `~/.cache/huggingface/hub`;
    /// - endpoint: `HF_ENDPOINT`, else <https://huggingface.co>;
    /// - token: `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, then the token file (`HF_TOKEN_PATH`, else
    ///   `$HF_HOME/token`, else `~/.cache/huggingface/token`); none at all when
    ///   `HF_HUB_DISABLE_IMPLICIT_TOKEN` is true;
    /// - offline: `HF_HUB_OFFLINE` is one of `1`, `ON`, `YES`, `TRUE` (any case);
    /// - connect timeout: `HF_HUB_ETAG_TIMEOUT` seconds, default 10.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let home = get("HOME").map(PathBuf::from).or_else(home_dir);
        let expand = |v: String| expand_tilde(&v, home.as_deref());
        let hf_home = get("HF_HOME").map(expand).unwrap_or_else(|| {
            let xdg = get("XDG_CACHE_HOME").map(expand).unwrap_or_else(|| {
                home.clone()
                    .unwrap_or_else(|| PathBuf::from("."))
                    .join(".cache")
            });
            xdg.join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = get("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = if get("HF_HUB_DISABLE_IMPLICIT_TOKEN").is_some_and(|v| is_true(&v)) {
            None
        } else {
            get("HF_TOKEN")
                .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
                .or_else(|| {
                    let path = get("HF_TOKEN_PATH")
                        .map(expand)
                        .unwrap_or_else(|| hf_home.join("token"));
                    std::fs::read_to_string(path).ok()
                })
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        };
        let offline = get("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v));
        let connect_timeout = get("HF_HUB_ETAG_TIMEOUT")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        HubConfig {
            cache_dir,
            endpoint,
            token,
            offline,
            connect_timeout,
        }
    }

    /// The same settings with another cache root.
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = dir.into();
        self
    }

    /// The same settings with another endpoint (trailing `/` removed).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into().trim_end_matches('/').to_string();
        self
    }

    /// The same settings with offline mode switched on or off.
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        Self::from_env()
    }
}

/// The cache root that `huggingface_hub` would use in this environment.
pub fn cache_dir() -> PathBuf {
    HubConfig::from_env().cache_dir
}

/// `huggingface_hub`'s notion of a true environment value.
pub(crate) fn is_true(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

fn expand_tilde(v: &str, home: Option<&std::path::Path>) -> PathBuf {
    match (v.strip_prefix("~/"), home) {
        (Some(rest), Some(home)) => home.join(rest),
        _ if v == "~" => home.map(PathBuf::from).unwrap_or_else(|| PathBuf::from(v)),
        _ => PathBuf::from(v),
    }
}

fn home_dir() -> Option<PathBuf> {
    // `HOME` was unset or empty; fall back to the platform's notion (USERPROFILE on Windows).
    std::env::var_os("USERPROFILE").map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> HubConfig {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubConfig::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn cache_dir_precedence_follows_huggingface_hub() {
        let base = [("HOME", "/home/u")];
        assert_eq!(
            cfg(&base).cache_dir,
            PathBuf::from("/home/u/.cache/huggingface/hub")
        );
        let xdg = [("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")];
        assert_eq!(cfg(&xdg).cache_dir, PathBuf::from("/xdg/huggingface/hub"));
        let home = [
            ("HOME", "/home/u"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HF_HOME", "/hf"),
        ];
        assert_eq!(cfg(&home).cache_dir, PathBuf::from("/hf/hub"));
        let legacy = [("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/legacy")];
        assert_eq!(cfg(&legacy).cache_dir, PathBuf::from("/legacy"));
        let all = [
            ("HF_HOME", "/hf"),
            ("HUGGINGFACE_HUB_CACHE", "/legacy"),
            ("HF_HUB_CACHE", "~/c"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(cfg(&all).cache_dir, PathBuf::from("/home/u/c"));
        // Empty values count as unset, as in huggingface_hub.
        let empty = [("HOME", "/home/u"), ("HF_HUB_CACHE", ""), ("HF_HOME", "")];
        assert_eq!(
            cfg(&empty).cache_dir,
            PathBuf::from("/home/u/.cache/huggingface/hub")
        );
    }

    #[test]
    fn offline_endpoint_and_token() {
        for (v, want) in [
            ("1", true),
            ("yes", true),
            ("ON", true),
            ("True", true),
            ("0", false),
            ("false", false),
            ("", false),
        ] {
            let c = cfg(&[("HOME", "/nonexistent"), ("HF_HUB_OFFLINE", v)]);
            assert_eq!(c.offline, want, "HF_HUB_OFFLINE={v:?}");
        }
        let c = cfg(&[
            ("HOME", "/nonexistent"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_TOKEN", " hf_abc \n"),
        ]);
        assert_eq!(c.endpoint, "http://127.0.0.1:9");
        assert_eq!(c.token.as_deref(), Some("hf_abc"));
        let c = cfg(&[("HOME", "/nonexistent")]);
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        let c2 = cfg(&[("HOME", "/nonexistent"), ("HF_HUB_ETAG_TIMEOUT", "2.5")]);
        assert_eq!(c2.connect_timeout, Duration::from_millis(2500));
        assert_eq!(c.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(c.token, None);
        let c = cfg(&[
            ("HOME", "/nonexistent"),
            ("HF_TOKEN", "hf_abc"),
            ("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1"),
        ]);
        assert_eq!(c.token, None);
    }

    #[test]
    fn token_file_is_read_from_hf_home() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_from_file\n").unwrap();
        let home = dir.path().to_str().unwrap();
        let c = cfg(&[("HF_HOME", home)]);
        assert_eq!(c.token.as_deref(), Some("hf_from_file"));
        assert_eq!(c.cache_dir, dir.path().join("hub"));
    }
}
