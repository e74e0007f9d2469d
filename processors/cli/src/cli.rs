//! Command-line arguments. Every connection setting also reads the environment variable that
//! `scripts/stack up` writes to `.cache/stack/env`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use streamoasis_api::{DEFAULT_ADDR, DEFAULT_GRPC_ADDR};
use streamoasis_pipeline::env;

/// Zero-shot media tagging on Kafka.
#[derive(Debug, Parser)]
#[command(name = "streamoasis", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

/// Settings shared by every subcommand.
#[derive(Debug, Args)]
pub struct Common {
    /// The topology file (topics, schemas, processors, model, labels).
    #[arg(long, global = true, env = "STREAMOASIS_TOPOLOGY", default_value = "topology.yaml")]
    pub topology: PathBuf,
    /// Kafka bootstrap servers.
    #[arg(long, global = true, env = env::KAFKA_BOOTSTRAP, default_value = env::DEFAULT_KAFKA)]
    pub kafka: String,
    /// Confluent-compatible schema registry base URL.
    #[arg(long, global = true, env = env::SCHEMA_REGISTRY_URL, default_value = env::DEFAULT_REGISTRY)]
    pub registry: String,
    /// ScyllaDB / CQL contact points, `host:port[,host:port]`.
    #[arg(long, global = true, env = env::SCYLLA_URI, default_value = env::DEFAULT_SCYLLA)]
    pub scylla: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the tagger: media.ingested → model → media.tagged (SIGHUP reloads tagging.labels).
    Tagger(TaggerArgs),
    /// Run the sink: media.tagged → ScyllaDB.
    Sink(RunArgs),
    /// Manage the topology (topics, schemas, keyspace and tables).
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Produce media items from a JSON-lines file to the ingest topic.
    Produce(ProduceArgs),
    /// Print records of a topic (tagged events, ingested events or dead letters) as they arrive.
    Tail(TailArgs),
    /// Tag text locally with the configured model (no Kafka needed).
    Tag(TagArgs),
    /// Query the tags stored in the database.
    Db {
        #[command(subcommand)]
        action: DbAction,
    },
    /// Serve the REST and gRPC API (its own model; `tagger --api-addr` shares the stream's).
    Api(ApiArgs),
    /// Re-tag archived items: re-send ingest records to the ingest topic (after a taxonomy or
    /// model change), from a time, offsets or a list of media ids.
    Retag(RetagArgs),
    /// Compare the tags of a shadow configuration (its own topic and keyspace) with the live
    /// ones: top-1 agreement, per-label precision and recall, the largest disagreements.
    Compare(CompareArgs),
    /// Dead letters.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Debug, Args)]
pub struct TaggerArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Also serve the REST API here, on the same batcher as the stream (e.g. 127.0.0.1:8080).
    #[arg(long, env = "STREAMOASIS_API_ADDR")]
    pub api_addr: Option<String>,
    /// gRPC address when --api-addr is given.
    #[arg(long, env = "STREAMOASIS_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: String,
    /// Serve the API without authentication (local experiments only).
    #[arg(long)]
    pub insecure_no_auth: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ApiArgs {
    #[command(subcommand)]
    pub action: Option<ApiAction>,
    /// REST address.
    #[arg(long, env = "STREAMOASIS_API_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// gRPC address.
    #[arg(long, env = "STREAMOASIS_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: String,
    /// Serve without authentication (local experiments only). Without it, one of
    /// STREAMOASIS_JWT_HS256_SECRET(_FILE) or STREAMOASIS_JWT_JWKS_FILE must be set.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Don't connect to the database (the read routes answer 503).
    #[arg(long)]
    pub no_db: bool,
}

#[derive(Debug, Subcommand)]
pub enum ApiAction {
    /// Print an HS256 token signed with STREAMOASIS_JWT_HS256_SECRET(_FILE) (with the
    /// configured issuer and audience).
    Token {
        /// Subject claim.
        #[arg(long, default_value = "cli")]
        sub: String,
        /// Lifetime (e.g. 15m, 1h).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Tag text over gRPC (`streamoasis.v1.Tagger/Tag`) and print the answer as JSON.
    Call {
        /// Title text to tag.
        text: String,
        /// Labels instead of the taxonomy (comma-separated).
        #[arg(long, value_delimiter = ',')]
        labels: Option<Vec<String>>,
        /// Server.
        #[arg(long, env = "STREAMOASIS_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
        grpc_addr: String,
        /// Bearer token (default: minted from STREAMOASIS_JWT_HS256_SECRET if set).
        #[arg(long, env = "STREAMOASIS_TOKEN")]
        token: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct RetagArgs {
    /// Recompute tags from the embeddings the sink stored (`tagging.store_embeddings`) with the
    /// current taxonomy, without running the model over the text, and produce them to the tags
    /// topic. Items whose stored rows cannot answer (another model or windowing, or a part the
    /// current settings need that was not read) are re-sent to the ingest topic instead (their
    /// records must still be retained there); the command says how many.
    #[arg(long, conflicts_with_all = ["since", "offsets", "from_beginning", "rate"])]
    pub from_embeddings: bool,
    /// Start at this time: RFC 3339 (2026-01-31T00:00:00Z), ms since the epoch, or an age (2h).
    #[arg(long, conflicts_with_all = ["offsets", "from_beginning"])]
    pub since: Option<String>,
    /// Start at these offsets: partition:offset[,partition:offset...] (others are not read).
    #[arg(long, value_delimiter = ',', conflicts_with = "from_beginning")]
    pub offsets: Option<Vec<String>>,
    /// Read every retained record.
    #[arg(long)]
    pub from_beginning: bool,
    /// Only these media ids (comma-separated, or @file with one id per line).
    #[arg(long)]
    pub ids: Option<String>,
    /// Records per second (0 = as fast as the broker takes them).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Don't draw a progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Re-send dead letters to their source topic after a fix (each at most once per run).
    Replay(DlqReplayArgs),
}

#[derive(Debug, Args)]
pub struct DlqReplayArgs {
    /// Dead-letter topic (default: the tagger's).
    #[arg(long)]
    pub topic: Option<String>,
    /// Only these error kinds (the `error.kind` header; repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub kind: Vec<String>,
    /// Only dead letters written at or after: RFC 3339, ms since the epoch, or an age (2h).
    #[arg(long)]
    pub since: Option<String>,
    /// Only dead letters written before: RFC 3339, ms since the epoch, or an age (2h).
    #[arg(long)]
    pub until: Option<String>,
    /// Count what would be re-sent; send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Records per second (0 = as fast as the broker takes them).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Don't draw a progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Serve Prometheus metrics and /healthz on this address (e.g. 0.0.0.0:9464).
    #[arg(long, env = "STREAMOASIS_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum TopologyAction {
    /// Create or update topics, register schemas, create keyspace and tables. Idempotent.
    Apply {
        /// Skip the database part.
        #[arg(long)]
        no_db: bool,
    },
    /// Validate topology.yaml (and the sections of every processor) without touching anything.
    Check,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// JSON-lines file: MediaIngested fields (media_id, title, description, transcript, ...) or
    /// sample records (id, title, description, text, label). `-` reads stdin.
    pub file: PathBuf,
    /// Stop after this many items.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Items per second (0 = as fast as the broker takes them).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Topic (default: the tagger's input).
    #[arg(long)]
    pub topic: Option<String>,
    /// Source name written into each item.
    #[arg(long, default_value = "streamoasis-produce")]
    pub source: String,
    /// Don't draw a progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Topic to read (default: the tagger's output). Dead-letter topics print their headers.
    pub topic: Option<String>,
    /// Read from the beginning instead of only new records.
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub count: Option<usize>,
    /// Stop when nothing arrives for this long (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<std::time::Duration>,
    /// Print each record as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Print nothing per record (only the summary).
    #[arg(long)]
    pub quiet: bool,
    /// JSON-lines file with `id`/`media_id` and `label`: report top-1 accuracy against it.
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// Print a summary at the end (items, tags per item, latency, throughput, accuracy).
    #[arg(long)]
    pub summary: bool,
}

#[derive(Debug, Args)]
pub struct TagArgs {
    /// Text to tag; reads stdin when absent (one item per line with --lines).
    pub text: Option<String>,
    /// Treat each stdin line as one item.
    #[arg(long)]
    pub lines: bool,
    /// Labels to use instead of the taxonomy (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The shadow's topology file (its `scylla.keyspace` differs from the live one's, which
    /// --topology names).
    #[arg(long)]
    pub shadow: PathBuf,
    /// How many of the largest disagreements to show.
    #[arg(long, default_value_t = 10)]
    pub examples: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DbAction {
    /// Row counts of media_tags and of media_by_tag per taxonomy label.
    Stats,
    /// Tags of one media item.
    Get { media_id: String },
    /// Media carrying a tag (highest score first).
    ByTag {
        tag: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}
