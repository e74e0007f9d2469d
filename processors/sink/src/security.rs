//! Credentials and TLS of the CQL session, and the connection itself.
//!
//! [`CqlSecurity::resolve`] lays the environment ([`env`](mod@env)) over the `scylla:` section: a user
//! without a password (or the reverse), a certificate without its key, or a path that is not a
//! readable file fails at start-up naming the key. [`connect`] builds the session with the
//! section's consistency and timeout as the default execution profile.

use std::path::{Path, PathBuf};
use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::Consistency;
use streamoasis_pipeline::secret::{self, Secret};
use streamoasis_pipeline::topology::ConfigError;

use crate::config::{consistency, CqlTlsConfig, SinkConfig};

/// Environment variables read by [`CqlSecurity::resolve`].
pub mod env {
    /// Role name.
    pub const USERNAME: &str = "SCYLLA_USERNAME";
    /// Password (or `SCYLLA_PASSWORD_FILE`).
    pub const PASSWORD: &str = "SCYLLA_PASSWORD";
    /// PEM CA file; turns TLS on.
    pub const CA: &str = "SCYLLA_CA";
    /// Client certificate (PEM).
    pub const CLIENT_CERT: &str = "SCYLLA_CLIENT_CERT";
    /// Client key (PEM).
    pub const CLIENT_KEY: &str = "SCYLLA_CLIENT_KEY";
}

/// Credentials and TLS of a CQL session, resolved from the `scylla:` section and the
/// environment. `Debug` hides the password.
#[derive(Debug, Clone, Default)]
pub struct CqlSecurity {
    /// Role to log in as; `None` connects without credentials.
    pub username: Option<String>,
    /// Its password.
    pub password: Option<Secret>,
    /// TLS settings; `None` is plaintext.
    pub tls: Option<CqlTlsConfig>,
}

impl CqlSecurity {
    /// Topology settings, overridden by `SCYLLA_USERNAME`, `SCYLLA_PASSWORD` (or `_FILE`),
    /// `SCYLLA_CA`, `SCYLLA_CLIENT_CERT`, `SCYLLA_CLIENT_KEY`. Reads the password file.
    pub fn resolve(c: &SinkConfig) -> Result<Self, ConfigError> {
        let username = secret::var(env::USERNAME).or_else(|| c.username.clone());
        let password = match secret::from_env(env::PASSWORD)? {
            Some(p) => Some(p),
            None => match &c.password_file {
                Some(f) => Some(secret::read_file(f, "scylla.password_file")?),
                None => None,
            },
        };
        if username.is_some() != password.is_some() {
            let (have, missing) =
                if username.is_some() { ("a user", "SCYLLA_PASSWORD, SCYLLA_PASSWORD_FILE or scylla.password_file") } else { ("a password", "SCYLLA_USERNAME or scylla.username") };
            return Err(ConfigError::new("scylla.username", format!("{have} is set but not its pair: set {missing}")));
        }
        let mut tls = c.tls.clone();
        if let Some(ca) = secret::var(env::CA) {
            tls.ca = Some(PathBuf::from(ca));
        }
        if let Some(v) = secret::var(env::CLIENT_CERT) {
            tls.cert = Some(PathBuf::from(v));
        }
        if let Some(v) = secret::var(env::CLIENT_KEY) {
            tls.key = Some(PathBuf::from(v));
        }
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(ConfigError::new("scylla.tls.cert", "set both scylla.tls.cert and scylla.tls.key (or SCYLLA_CLIENT_CERT and SCYLLA_CLIENT_KEY), or neither"));
        }
        for (key, p) in [("scylla.tls.ca (SCYLLA_CA)", &tls.ca), ("scylla.tls.cert", &tls.cert), ("scylla.tls.key", &tls.key)] {
            if let Some(p) = p {
                if !p.is_file() {
                    return Err(ConfigError::new(key, format!("'{}' is not a readable file", p.display())));
                }
            }
        }
        let on = tls.enabled || tls.ca.is_some() || tls.cert.is_some();
        Ok(CqlSecurity { username, password, tls: on.then_some(tls) })
    }
}

/// An OpenSSL client context for the CQL session: the CA (added to the system roots), the
/// optional client certificate, peer verification always on, host-name check as configured.
fn tls_context(t: &CqlTlsConfig) -> Result<openssl::ssl::SslConnectorBuilder, anyhow::Error> {
    use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
    let path = |p: &Path| p.display().to_string();
    let mut b = SslConnector::builder(SslMethod::tls_client())?;
    if let Some(ca) = &t.ca {
        b.set_ca_file(ca).map_err(|e| anyhow::anyhow!("scylla.tls.ca {}: {e}", path(ca)))?;
    }
    if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
        b.set_certificate_chain_file(cert).map_err(|e| anyhow::anyhow!("scylla.tls.cert {}: {e}", path(cert)))?;
        b.set_private_key_file(key, SslFiletype::PEM).map_err(|e| anyhow::anyhow!("scylla.tls.key {}: {e}", path(key)))?;
        b.check_private_key().map_err(|e| anyhow::anyhow!("scylla.tls.key does not match scylla.tls.cert: {e}"))?;
    }
    if !t.verify_hostname {
        // The chain is still verified; only a name/IP mismatch (X509_V_ERR_HOSTNAME_MISMATCH 62,
        // X509_V_ERR_IP_ADDRESS_MISMATCH 64) is let through.
        b.set_verify_callback(SslVerifyMode::PEER, |ok, ctx| ok || matches!(ctx.error().as_raw(), 62 | 64));
    }
    Ok(b)
}

/// Connect to the cluster at `uri` (host:port[,host:port...]) with the credentials and TLS of
/// the `scylla:` section and the environment ([`CqlSecurity::resolve`]).
pub async fn connect(uri: &str, c: &SinkConfig) -> anyhow::Result<Session> {
    connect_with(uri, c, &CqlSecurity::resolve(c)?).await
}

/// Connect with explicit credentials and TLS.
pub async fn connect_with(uri: &str, c: &SinkConfig, sec: &CqlSecurity) -> anyhow::Result<Session> {
    let profile = ExecutionProfile::builder().consistency(consistency(&c.consistency).unwrap_or(Consistency::LocalQuorum)).request_timeout(Some(c.request_timeout)).build();
    let nodes: Vec<&str> = uri.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let mut b = SessionBuilder::new().known_nodes(&nodes).default_execution_profile_handle(profile.into_handle()).connection_timeout(Duration::from_secs(10));
    if let (Some(user), Some(pass)) = (&sec.username, &sec.password) {
        b = b.user(user.as_str(), pass.expose());
    }
    if let Some(t) = &sec.tls {
        b = b.tls_context(Some(tls_context(t)?));
    }
    tracing::debug!(uri, user = ?sec.username, tls = sec.tls.is_some(), "connecting to the CQL database");
    b.build().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to the CQL database at {uri} as {} over {} ({e}); start it with `scripts/stack up`, set SCYLLA_URI, and check SCYLLA_USERNAME / SCYLLA_PASSWORD / SCYLLA_CA",
            sec.username.as_deref().unwrap_or("no user"),
            if sec.tls.is_some() { "TLS" } else { "plaintext" }
        )
    })
}
