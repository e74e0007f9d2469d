//! Secrets: read from the environment or from a file (a mounted Kubernetes Secret), and never
//! printed. [`Secret`] prints as `***` in `Debug` and `Display`; [`redact_url`] drops the
//! `user:password@` part of a URL; [`redacted`] masks the sensitive values of a property map.

use std::collections::BTreeMap;
use std::path::Path;

use crate::topology::ConfigError;

/// A secret value. `Debug` and `Display` print `***`; [`Secret::expose`] is the only way in.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one call that needs it (a client's config).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A plain (non-secret) setting from the environment; empty counts as unset.
pub fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Read a secret file: its content without the trailing newline (as `kubectl create secret
/// --from-file` and `echo >file` leave it).
pub fn read_file(path: &Path, what: &str) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(what, format!("cannot read the secret file {}: {e}", path.display())))?;
    let value = text.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        return Err(ConfigError::new(what, format!("the secret file {} is empty", path.display())));
    }
    Ok(Secret(value))
}

/// A secret from `NAME` or from the file named by `NAME_FILE`. Both set is an error (which one
/// wins would be a guess); neither is `Ok(None)`.
pub fn from_env(name: &str) -> Result<Option<Secret>, ConfigError> {
    from_vars(name, var)
}

/// [`from_env`] over another source of variables (`var` answers `None` for unset): the one
/// reading of `NAME` / `NAME_FILE` that every secret goes through (Kafka, CQL, the registry,
/// the API's JWT secret).
pub fn from_vars(name: &str, var: impl Fn(&str) -> Option<String>) -> Result<Option<Secret>, ConfigError> {
    let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
    let file_var = format!("{name}_FILE");
    match (var(name), var(&file_var)) {
        (Some(_), Some(_)) => Err(ConfigError::new(name, format!("both {name} and {file_var} are set: set one of them"))),
        (Some(v), None) => Ok(Some(Secret(v))),
        (None, Some(path)) => read_file(Path::new(&path), &file_var).map(Some),
        (None, None) => Ok(None),
    }
}

/// Whether a client property holds a secret (librdkafka's and similar naming).
pub fn is_sensitive_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "jaas", "token", "credential", "ssl.key.pem", "private"].iter().any(|s| k.contains(s))
}

/// A copy of `props` with every sensitive value replaced by `***` (for logs and `Debug`).
pub fn redacted(props: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    props.iter().map(|(k, v)| (k.as_str(), if is_sensitive_key(k) { "***" } else { v.as_str() })).collect()
}

/// `scheme://user:password@host/...` → `scheme://***@host/...`; anything else unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// Split `user:password@` off a URL: the URL without it, and the credentials (percent-decoding
/// is left to the caller's URL; the local and Confluent forms use plain text).
pub fn split_url_credentials(url: &str) -> (String, Option<(String, Option<Secret>)>) {
    let Some((scheme, rest)) = url.split_once("://") else { return (url.to_string(), None) };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return (url.to_string(), None) };
    let userinfo = &rest[..at];
    let clean = format!("{scheme}://{}", &rest[at + 1..]);
    let creds = match userinfo.split_once(':') {
        Some((u, p)) => (u.to_string(), Some(Secret::new(p))),
        None => (userinfo.to_string(), None),
    };
    (clean, Some(creds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn url_credentials_are_redacted_and_split() {
        assert_eq!(redact_url("https://u:p@h:8081/apis/ccompat/v7"), "https://***@h:8081/apis/ccompat/v7");
        assert_eq!(redact_url("https://h:8081/a@b"), "https://h:8081/a@b");
        assert_eq!(redact_url("h:9092"), "h:9092");
        let (clean, creds) = split_url_credentials("https://key:se:cret@h/x");
        assert_eq!(clean, "https://h/x");
        let (u, p) = creds.unwrap();
        assert_eq!((u.as_str(), p.unwrap().expose()), ("key", "se:cret"));
        assert!(split_url_credentials("http://h/x").1.is_none());
    }

    #[test]
    fn sensitive_properties_are_masked() {
        let m = BTreeMap::from([
            ("sasl.password".to_string(), "p".to_string()),
            ("sasl.username".to_string(), "u".to_string()),
            ("ssl.key.password".to_string(), "k".to_string()),
            ("sasl.oauthbearer.client.secret".to_string(), "s".to_string()),
        ]);
        let r = redacted(&m);
        assert_eq!(r["sasl.password"], "***");
        assert_eq!(r["ssl.key.password"], "***");
        assert_eq!(r["sasl.oauthbearer.client.secret"], "***");
        assert_eq!(r["sasl.username"], "u");
    }

    #[test]
    fn secret_files_lose_the_trailing_newline() {
        let p = std::env::temp_dir().join(format!("streamoasis-secret-{}", std::process::id()));
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(read_file(&p, "X_FILE").unwrap().expose(), "s3cret");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_file(&p, "X_FILE").unwrap_err().to_string().contains("empty"));
        std::fs::remove_file(&p).unwrap();
    }
}
