//! `streamoasis api`: the REST and gRPC API with its own model; `api token` mints a token and
//! `api call` sends one request over gRPC.
//!
//! The HS256 secret for `token` and `call` is read by [`hs256_secret`]
//! (`STREAMOASIS_JWT_HS256_SECRET` or its `_FILE`); the server's verifier by [`api_auth`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use streamoasis_api::{auth, Auth, Limits, Listeners};
use streamoasis_pipeline::{telemetry, CancellationToken};
use streamoasis_tagger::{Tagger, TaggerConfig};

use super::{load, reload_on_sighup};
use crate::cli::{ApiAction, ApiArgs, Common};

pub(super) async fn run(c: &Common, a: ApiArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    match a.action {
        Some(ApiAction::Token { sub, ttl }) => return token(&sub, ttl),
        Some(ApiAction::Call { text, labels, grpc_addr, token }) => return call(&text, labels, &grpc_addr, token).await,
        None => {}
    }
    let _guard = telemetry::init("streamoasis-api");
    let topo = load(c)?;
    let cfg = TaggerConfig::from_topology(&topo)?;
    let auth = api_auth(a.insecure_no_auth)?;
    let listeners = Listeners::bind(&a.addr, &a.grpc_addr).await?;
    let tagger = Arc::new(Tagger::load(cfg).await?);
    reload_on_sighup(c.topology.clone(), tagger.clone());
    let state = streamoasis_api::state(&connections(c, !a.no_db), &topo, tagger, auth, Limits::default()).await?;
    streamoasis_api::serve(listeners, Arc::new(state), shutdown).await
}

pub(super) fn connections(c: &Common, db: bool) -> streamoasis_api::Connections {
    streamoasis_api::Connections { kafka: c.kafka.clone(), registry: c.registry.clone(), scylla: db.then(|| c.scylla.clone()) }
}

/// The API's token verifier from the environment; refuses to run without keys unless told.
pub(super) fn api_auth(insecure: bool) -> anyhow::Result<Auth> {
    match Auth::from_env(|k| std::env::var(k).ok())? {
        Some(_) if insecure => anyhow::bail!("--insecure-no-auth given but JWT keys are configured: drop one of them"),
        Some(a) => Ok(a),
        None if insecure => {
            tracing::warn!("serving WITHOUT authentication (--insecure-no-auth)");
            Ok(Auth::disabled())
        }
        None => anyhow::bail!(
            "no JWT key configured: set {} (or {}) or {}, or pass --insecure-no-auth for a local experiment",
            auth::ENV_HS256_SECRET,
            auth::ENV_HS256_SECRET_FILE,
            auth::ENV_JWKS_FILE
        ),
    }
}

/// The HS256 secret `token` and `call` sign with: `STREAMOASIS_JWT_HS256_SECRET`, else the file
/// `STREAMOASIS_JWT_HS256_SECRET_FILE` names (one trailing newline dropped).
fn hs256_secret() -> anyhow::Result<Vec<u8>> {
    match streamoasis_pipeline::secret::from_env(auth::ENV_HS256_SECRET)? {
        Some(s) => Ok(s.expose().as_bytes().to_vec()),
        None => anyhow::bail!("set {} (or {}) to the API's HS256 secret", auth::ENV_HS256_SECRET, auth::ENV_HS256_SECRET_FILE),
    }
}

fn token(sub: &str, ttl: Duration) -> anyhow::Result<()> {
    let iss = std::env::var(auth::ENV_ISSUER).ok().filter(|s| !s.is_empty());
    let aud = std::env::var(auth::ENV_AUDIENCE).ok().filter(|s| !s.is_empty());
    println!("{}", auth::mint_hs256(&hs256_secret()?, sub, ttl, iss.as_deref(), aud.as_deref())?);
    Ok(())
}

async fn call(text: &str, labels: Option<Vec<String>>, addr: &str, token: Option<String>) -> anyhow::Result<()> {
    use streamoasis_api::proto::tagger_client::TaggerClient;
    let token = match token {
        Some(t) => Some(t),
        None => hs256_secret().ok().map(|s| auth::mint_hs256(&s, "cli", Duration::from_secs(300), None, None)).transpose()?,
    };
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let mut client = TaggerClient::connect(url.clone()).await.with_context(|| format!("cannot reach the gRPC API at {url}"))?;
    let mut req = tonic::Request::new(streamoasis_api::proto::TagRequest { title: text.to_string(), candidate_labels: labels.unwrap_or_default(), ..Default::default() });
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse()?);
    }
    let r = client.tag(req).await.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?.into_inner();
    let tags: Vec<serde_json::Value> = r.tags.iter().map(|t| serde_json::json!({"label": t.label, "score": t.score})).collect();
    println!("{}", serde_json::json!({"tags": tags, "no_tags_reason": r.no_tags_reason, "strategy": r.strategy, "model": r.model}));
    Ok(())
}
