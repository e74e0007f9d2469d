//! Command-line arguments. Every connection setting also reads the environment variable that
//! `scripts/stack up` writes to `.cache/stack/env`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    #[arg(long, global = true, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub kafka: String,
    /// Confluent-compatible schema registry base URL.
    #[arg(long, global = true, env = "SCHEMA_REGISTRY_URL", default_value = "http://127.0.0.1:8081/apis/ccompat/v7")]
    pub registry: String,
    /// ScyllaDB / CQL contact points, host:port[,host:port].
    #[arg(long, global = true, env = "SCYLLA_URI", default_value = "127.0.0.1:9042")]
    pub scylla: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the tagger: media.ingested → model → media.tagged.
    Tagger(RunArgs),
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
