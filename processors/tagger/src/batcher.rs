//! The dynamic batcher: many callers, one model.
//!
//! ```text
//! callers ──infer()──> [bounded queue] ──batching task──> [slot: 1 batch] ──> model thread
//!    ^                                        │ groups by length, pads            │
//!    └──────────── oneshot reply per sequence ┴───────────────────────────────────┘
//! ```
//!
//! - A batch closes at `max_batch_size` sequences, at `max_batch_tokens` of padded cost
//!   (longest × count), or when its oldest sequence has waited `max_wait` — whichever first.
//! - The oldest waiting sequence always anchors the next batch (no starvation); the rest of
//!   the batch is filled with the sequences closest to it in length (less padding).
//! - A batch is formed when the model thread is free ([`Handoff::WhenFree`], the default): every
//!   sequence that arrived during the previous forward pass joins the next batch, so batches
//!   grow with the load and no sequence waits behind a batch that closed without it.
//!   ([`Handoff::Ahead`] closes the next batch while the model runs the current one: at 50%
//!   load that batch is often a single early item, and the items after it wait one more pass.)
//! - Sequences whose caller went away (dropped future) are skipped, never computed.
//! - The queue is bounded: when it is full, `infer` waits (backpressure); nothing is dropped.
//! - The model runs on its own OS thread, so inference never blocks the async runtime.
//! - A failed batch (a bad input, out of memory, a panic in libtorch) is split in halves and
//!   retried until the failing sequence is alone: only its caller gets the error
//!   ([`BatchError::Model`], dead-lettered); everyone else in the batch gets a result. A lone
//!   sequence that fails with out-of-memory is reported as [`BatchError::Overloaded`] (transient:
//!   the record is retried later), not as the item's fault.
//! - Every step of a sequence is timed in `streamoasis_tagger_step_seconds{step}`: `queue`
//!   (enqueued → batch closed), `slot` (closed → the model starts it), `model` (its batch's
//!   forward pass), `reply` (forward done → the caller runs again); the tagger adds
//!   `tokenize` and `score` per item ([`observe_step`]).

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// One model input sequence: token ids including special tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq {
    /// Token ids.
    pub ids: Vec<i64>,
    /// Segment ids (sentence pairs), if the model takes them.
    pub type_ids: Option<Vec<i64>>,
}

impl Seq {
    /// A single-segment sequence.
    pub fn new(ids: Vec<i64>) -> Self {
        Seq { ids, type_ids: None }
    }
    /// Length in tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// True when it has no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A padded batch, row-major `[rows, cols]`.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids, 0-padded.
    pub input_ids: Vec<i64>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// Segment ids, when every sequence had them.
    pub token_type_ids: Option<Vec<i64>>,
    /// Sequences.
    pub rows: usize,
    /// Longest sequence.
    pub cols: usize,
}

impl Batch {
    /// Pad sequences to the longest.
    pub fn pad(seqs: &[&Seq]) -> Batch {
        let rows = seqs.len();
        let cols = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut input_ids = vec![0i64; rows * cols];
        let mut attention_mask = vec![0i64; rows * cols];
        let with_types = !seqs.is_empty() && seqs.iter().all(|s| s.type_ids.is_some());
        let mut types = if with_types { Some(vec![0i64; rows * cols]) } else { None };
        for (r, s) in seqs.iter().enumerate() {
            let off = r * cols;
            input_ids[off..off + s.len()].copy_from_slice(&s.ids);
            attention_mask[off..off + s.len()].fill(1);
            if let (Some(t), Some(st)) = (types.as_mut(), s.type_ids.as_ref()) {
                t[off..off + st.len()].copy_from_slice(st);
            }
        }
        Batch { input_ids, attention_mask, token_type_ids: types, rows, cols }
    }
}

/// The model side of the batcher: a synchronous forward pass, one output row per sequence.
pub trait Backend: Send + 'static {
    /// Called once on the model thread before the first batch (thread-local runtime settings
    /// such as libtorch's OpenMP thread count belong here).
    fn on_start(&mut self) {}

    /// Run one batch; returns `batch.rows` vectors.
    fn forward(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, ForwardError>;
}

/// Why a forward pass failed, as the backend knows it.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ForwardError {
    /// The device ran out of memory for this batch: a smaller batch (or later) may work.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// Any other failure (bad input, a bug, a panic in the library).
    #[error("{0}")]
    Failed(String),
}

impl From<String> for ForwardError {
    fn from(message: String) -> Self {
        ForwardError::Failed(message)
    }
}

/// Batching knobs (see `tagging.batching` in topology.yaml for the trade-offs).
#[derive(Debug, Clone)]
pub struct BatcherConfig {
    /// Most sequences per batch.
    pub max_batch_size: usize,
    /// Most padded tokens (longest × count) per batch.
    pub max_batch_tokens: usize,
    /// Longest the oldest sequence waits for a batch to fill.
    pub max_wait: Duration,
    /// Sequences waiting for the model before callers are made to wait.
    pub queue_capacity: usize,
}

/// Why inference failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum BatchError {
    /// The model fails on this sequence, even alone.
    #[error("model error: {0}")]
    Model(String),
    /// The model ran out of memory on this sequence alone: retry later.
    #[error("model out of memory: {0}")]
    Overloaded(String),
    /// The batcher or model thread is gone (shutting down).
    #[error("batcher stopped")]
    Stopped,
    /// `try_infer` only: the queue has no room now (callers answer "busy, retry later").
    #[error("batcher queue full")]
    QueueFull,
}

/// How the batching task hands batches to the model thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Handoff {
    /// Form a batch only once the model thread is free, from everything queued by then.
    #[default]
    WhenFree,
    /// Form the next batch while the model runs the current one (one batch waits, ready).
    Ahead,
}

/// A result and when the model thread sent it (to time the caller's wake-up).
type Reply = (Result<Vec<f32>, BatchError>, std::time::Instant);

struct Request {
    seq: Seq,
    enqueued: Instant,
    reply: oneshot::Sender<Reply>,
}

struct Job {
    batch: Batch,
    /// The sequences, kept to re-pad halves of a failed batch.
    seqs: Vec<Seq>,
    replies: Vec<oneshot::Sender<Reply>>,
    /// When the batch closed (for the `slot` step).
    closed: std::time::Instant,
}

struct BatchMetrics {
    size: Histogram,
    padding: Histogram,
    batches: IntCounter,
    skipped: IntCounter,
    queue_wait: Histogram,
    inference: Histogram,
    depth: IntGauge,
    splits: IntCounter,
    steps: HistogramVec,
}

/// Buckets of the per-step histogram: fine at the low end, where most steps are.
const STEP_BUCKETS: [f64; 16] = [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.5];

/// Record a step of the tagger (`streamoasis_tagger_step_seconds{step}`) that began at `since`.
pub fn observe_step(step: &str, since: std::time::Instant) {
    observe_step_secs(step, since.elapsed().as_secs_f64(), 1);
}

fn observe_step_secs(step: &str, secs: f64, times: usize) {
    let h = batch_metrics().steps.with_label_values(&[step]);
    for _ in 0..times {
        h.observe(secs);
    }
}

fn batch_metrics() -> &'static BatchMetrics {
    static M: OnceLock<BatchMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let r = streamoasis_pipeline::telemetry::registry();
        let m = BatchMetrics {
            size: Histogram::with_opts(HistogramOpts::new("streamoasis_batch_size", "Sequences per model batch").buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]))
                .unwrap(),
            padding: Histogram::with_opts(
                HistogramOpts::new("streamoasis_batch_padding_ratio", "Padded tokens / all tokens per batch").buckets(vec![0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75]),
            )
            .unwrap(),
            batches: IntCounter::new("streamoasis_batches_total", "Model batches run").unwrap(),
            skipped: IntCounter::new("streamoasis_batch_skipped_total", "Sequences skipped because their caller went away").unwrap(),
            queue_wait: Histogram::with_opts(
                HistogramOpts::new("streamoasis_batch_queue_wait_seconds", "Time a sequence waited in the queue before its batch closed")
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )
            .unwrap(),
            inference: Histogram::with_opts(
                HistogramOpts::new("streamoasis_inference_seconds", "Model forward time per batch").buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )
            .unwrap(),
            depth: IntGauge::new("streamoasis_batch_queue_depth", "Sequences waiting for a batch").unwrap(),
            splits: IntCounter::new("streamoasis_batch_splits_total", "Failed batches split to isolate a failing sequence").unwrap(),
            steps: HistogramVec::new(
                HistogramOpts::new("streamoasis_tagger_step_seconds", "Time per step in the tagger: tokenize and score per item; queue, slot, model and reply per sequence")
                    .buckets(STEP_BUCKETS.to_vec()),
                &["step"],
            )
            .unwrap(),
        };
        let _ = r.register(Box::new(m.size.clone()));
        let _ = r.register(Box::new(m.padding.clone()));
        let _ = r.register(Box::new(m.batches.clone()));
        let _ = r.register(Box::new(m.skipped.clone()));
        let _ = r.register(Box::new(m.queue_wait.clone()));
        let _ = r.register(Box::new(m.inference.clone()));
        let _ = r.register(Box::new(m.depth.clone()));
        let _ = r.register(Box::new(m.splits.clone()));
        let _ = r.register(Box::new(m.steps.clone()));
        m
    })
}

/// Handle to a running batcher; cheap to clone. The batcher stops when every handle is dropped.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Request>,
    alive: Arc<AtomicBool>,
    /// Straight to the model thread (warm-up), past the queue.
    jobs: mpsc::Sender<Job>,
    /// One permit while the model thread is free ([`Handoff::WhenFree`]).
    idle: Arc<tokio::sync::Semaphore>,
    handoff: Handoff,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

/// Fault injection for tests: with this set to a path, the model thread ends at its next batch
/// once a file exists there, as it would on a crash in libtorch. Read once at start; unset, nothing
/// is checked.
pub const MODEL_EXIT_HOOK: &str = "STREAMOASIS_TEST_MODEL_EXIT_FILE";

/// Model threads inside a batch now (process-wide), and whether the process is stopping.
static BUSY: AtomicUsize = AtomicUsize::new(0);
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Before the process exits: model threads take no new batch, and this waits (up to `timeout`)
/// until none is inside one, so libtorch's static destructors never run under a forward pass.
/// True when no model thread is busy. Afterwards no batcher in the process runs again.
pub async fn quiesce(timeout: Duration) -> bool {
    STOPPING.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + timeout;
    while BUSY.load(Ordering::SeqCst) > 0 {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

impl Batcher {
    /// Start the batching task (on the current tokio runtime) and the model thread.
    pub fn spawn<B: Backend>(backend: B, cfg: BatcherConfig) -> Batcher {
        Self::spawn_with(backend, cfg, Handoff::default())
    }

    /// [`Batcher::spawn`] with a chosen [`Handoff`] (benches compare them).
    pub fn spawn_with<B: Backend>(mut backend: B, cfg: BatcherConfig, handoff: Handoff) -> Batcher {
        let (tx, rx) = mpsc::channel::<Request>(cfg.queue_capacity.max(1));
        let (job_tx, mut job_rx) = mpsc::channel::<Job>(1);
        let alive = Arc::new(AtomicBool::new(true));
        let flag = alive.clone();
        let idle = Arc::new(tokio::sync::Semaphore::new(1));
        let freed = (handoff == Handoff::WhenFree).then(|| idle.clone());
        std::thread::Builder::new()
            .name("streamoasis-model".into())
            .spawn(move || {
                struct Dead(Arc<AtomicBool>);
                impl Drop for Dead {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::SeqCst);
                    }
                }
                let _dead = Dead(flag);
                backend.on_start();
                let exit_file = std::env::var_os(MODEL_EXIT_HOOK).map(std::path::PathBuf::from);
                while let Some(job) = job_rx.blocking_recv() {
                    if exit_file.as_ref().is_some_and(|f| f.exists()) {
                        tracing::error!(hook = MODEL_EXIT_HOOK, "model thread exiting (fault injection)");
                        break;
                    }
                    // Busy first, then the stop check (see `quiesce`): either it sees this batch
                    // or this thread sees the stop.
                    BUSY.fetch_add(1, Ordering::SeqCst);
                    if STOPPING.load(Ordering::SeqCst) {
                        BUSY.fetch_sub(1, Ordering::SeqCst);
                        break;
                    }
                    let started = std::time::Instant::now();
                    let n = job.replies.len();
                    observe_step_secs("slot", (started - job.closed).as_secs_f64(), n);
                    let results = run_isolating(&mut backend, &job.batch, &job.seqs);
                    BUSY.fetch_sub(1, Ordering::SeqCst);
                    let done = std::time::Instant::now();
                    let took = (done - started).as_secs_f64();
                    batch_metrics().inference.observe(took);
                    observe_step_secs("model", took, n);
                    for (reply, r) in job.replies.into_iter().zip(results) {
                        let _ = reply.send((r, done));
                    }
                    if let Some(idle) = &freed {
                        idle.add_permits(1);
                    }
                }
            })
            .expect("spawn model thread");
        tokio::spawn(batching_task(rx, job_tx.clone(), cfg, (handoff == Handoff::WhenFree).then(|| idle.clone())));
        Batcher { tx, alive, jobs: job_tx, idle, handoff }
    }

    /// Run padded batches of the given sequences straight on the model thread, one after the
    /// other, past the queue and batch selection (start-up warm-up: see [`crate::warmup`]).
    /// Waits for the model to be free before each. Errors of a batch are returned, not retried.
    pub async fn run_batch(&self, seqs: Vec<Seq>) -> Result<Vec<Vec<f32>>, BatchError> {
        // Take the model while it is free, so that no queued batch runs at the same time.
        let free = self.idle.acquire().await.map_err(|_| BatchError::Stopped)?;
        let refs: Vec<&Seq> = seqs.iter().collect();
        let batch = Batch::pad(&refs);
        let mut replies = Vec::with_capacity(seqs.len());
        let mut rxs = Vec::with_capacity(seqs.len());
        for _ in 0..seqs.len() {
            let (tx, rx) = oneshot::channel();
            replies.push(tx);
            rxs.push(rx);
        }
        let sent = self.jobs.send(Job { batch, seqs, replies, closed: std::time::Instant::now() }).await;
        if self.handoff == Handoff::WhenFree {
            // The model thread gives the permit back once the batch is done.
            free.forget();
        }
        sent.map_err(|_| BatchError::Stopped)?;
        let mut out = Vec::with_capacity(rxs.len());
        for rx in rxs {
            out.push(rx.await.map_err(|_| BatchError::Stopped)?.0?);
        }
        Ok(out)
    }

    /// False once the model thread has exited (it ends only when the batcher is dropped, or if it
    /// died): liveness checks this.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Run `seqs` through the model; outputs in the same order. Waits while the queue is full.
    pub async fn infer(&self, seqs: Vec<Seq>) -> Result<Vec<Vec<f32>>, BatchError> {
        use tracing::Instrument;
        let n = seqs.len();
        async move {
            let mut replies = Vec::with_capacity(seqs.len());
            for seq in seqs {
                let (reply, rx) = oneshot::channel();
                self.tx.send(Request { seq, enqueued: Instant::now(), reply }).await.map_err(|_| BatchError::Stopped)?;
                replies.push(rx);
            }
            collect(replies).await
        }
        .instrument(tracing::info_span!("inference", sequences = n))
        .await
    }

    /// Like [`Batcher::infer`], but never waits for room: when the queue cannot take all of
    /// `seqs` at once it fails with [`BatchError::QueueFull`] and enqueues nothing (synchronous
    /// API callers get "busy, retry later" instead of an unbounded wait). A request larger than
    /// the whole queue waits its turns as with `infer`.
    pub async fn try_infer(&self, seqs: Vec<Seq>) -> Result<Vec<Vec<f32>>, BatchError> {
        if seqs.len() > self.tx.max_capacity() {
            // More sequences than the queue ever holds at once: they can only enter in turns.
            return self.infer(seqs).await;
        }
        let permits = self.tx.try_reserve_many(seqs.len()).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => BatchError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => BatchError::Stopped,
        })?;
        let mut replies = Vec::with_capacity(seqs.len());
        for (seq, permit) in seqs.into_iter().zip(permits) {
            let (reply, rx) = oneshot::channel();
            permit.send(Request { seq, enqueued: Instant::now(), reply });
            replies.push(rx);
        }
        collect(replies).await
    }
}

/// Await the replies in order; the first one's wake-up (model done → caller running) is timed
/// as the `reply` step (later ones were sent with or before it).
async fn collect(replies: Vec<oneshot::Receiver<Reply>>) -> Result<Vec<Vec<f32>>, BatchError> {
    let mut out = Vec::with_capacity(replies.len());
    for (i, rx) in replies.into_iter().enumerate() {
        let (r, sent) = rx.await.map_err(|_| BatchError::Stopped)?;
        if i == 0 {
            observe_step("reply", sent);
        }
        out.push(r?);
    }
    Ok(out)
}

/// One forward pass, with panics in the backend turned into errors.
fn forward_caught<B: Backend>(backend: &mut B, batch: &Batch) -> Result<Vec<Vec<f32>>, ForwardError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.forward(batch))) {
        Ok(Ok(rows)) if rows.len() == batch.rows => Ok(rows),
        Ok(Ok(rows)) => Err(ForwardError::Failed(format!("model returned {} rows for {} sequences", rows.len(), batch.rows))),
        Ok(Err(e)) => Err(e),
        Err(panic) => Err(ForwardError::Failed(format!(
            "model panicked: {}",
            panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("unknown")
        ))),
    }
}

/// Run a batch; if it fails, split it in halves and run each, down to single sequences, so that
/// only the sequence(s) that fail alone get an error. Costs at most 2·log2(n) extra passes per
/// failing sequence.
fn run_isolating<B: Backend>(backend: &mut B, batch: &Batch, seqs: &[Seq]) -> Vec<Result<Vec<f32>, BatchError>> {
    match forward_caught(backend, batch) {
        Ok(rows) => rows.into_iter().map(Ok).collect(),
        Err(e) if seqs.len() <= 1 => {
            let err = match e {
                ForwardError::OutOfMemory(m) => BatchError::Overloaded(m),
                ForwardError::Failed(m) => BatchError::Model(m),
            };
            vec![Err(err); seqs.len()]
        }
        Err(e) => {
            batch_metrics().splits.inc();
            tracing::warn!(rows = seqs.len(), error = %e, "model failed on a batch: splitting it to isolate the failing item");
            let (a, b) = seqs.split_at(seqs.len() / 2);
            let mut out = Vec::with_capacity(seqs.len());
            for half in [a, b] {
                let refs: Vec<&Seq> = half.iter().collect();
                out.extend(run_isolating(backend, &Batch::pad(&refs), half));
            }
            out
        }
    }
}

/// Padded cost of a set of sequences: longest × count.
fn padded_cost(longest: usize, count: usize) -> usize {
    longest * count
}

/// Would the pending sequences fill a batch right now?
fn can_fill(pending: &VecDeque<Request>, cfg: &BatcherConfig) -> bool {
    if pending.len() >= cfg.max_batch_size {
        return true;
    }
    let longest = pending.iter().map(|r| r.seq.len()).max().unwrap_or(0);
    padded_cost(longest, pending.len()) >= cfg.max_batch_tokens
}

/// Choose the next batch: the oldest request anchors it; the rest are the requests closest to
/// it in length, taken while size and token budgets allow. Returns indices into `pending`.
fn select(pending: &VecDeque<Request>, cfg: &BatcherConfig) -> Vec<usize> {
    let anchor_len = pending[0].seq.len();
    let mut order: Vec<usize> = (1..pending.len()).collect();
    // Closest length first; ties broken by age (index order), so equal lengths are FIFO.
    order.sort_by_key(|&i| (pending[i].seq.len().abs_diff(anchor_len), i));
    let mut chosen = vec![0];
    let mut longest = anchor_len;
    for i in order {
        if chosen.len() >= cfg.max_batch_size {
            break;
        }
        let l = longest.max(pending[i].seq.len());
        if padded_cost(l, chosen.len() + 1) > cfg.max_batch_tokens {
            continue;
        }
        longest = l;
        chosen.push(i);
    }
    chosen
}

async fn batching_task(mut rx: mpsc::Receiver<Request>, job_tx: mpsc::Sender<Job>, cfg: BatcherConfig, idle: Option<Arc<tokio::sync::Semaphore>>) {
    let mut pending: VecDeque<Request> = VecDeque::with_capacity(cfg.queue_capacity);
    let mut closed = false;
    let m = batch_metrics();
    'next: loop {
        // Something to run first: an idle batcher holds no claim on the model (a warm-up pass
        // may take it meanwhile).
        if pending.is_empty() {
            if closed {
                return;
            }
            match rx.recv().await {
                Some(r) => pending.push_back(r),
                None => return,
            }
        }
        // `WhenFree`: wait for the model thread to be free (it gives the permit back after each
        // batch), so the batch formed next takes everything queued meanwhile.
        if let Some(idle) = &idle {
            match idle.acquire().await {
                Ok(p) => p.forget(),
                Err(_) => return,
            }
        }
        // Reserve the model slot: at most one batch waits while the model runs one.
        let permit = match job_tx.reserve().await {
            Ok(p) => p,
            Err(_) => return, // model thread gone; dropping requests fails their callers
        };
        // Wait until a batch should close.
        loop {
            while pending.len() < cfg.queue_capacity {
                match rx.try_recv() {
                    Ok(r) => pending.push_back(r),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            let before = pending.len();
            pending.retain(|r| !r.reply.is_closed());
            m.skipped.inc_by((before - pending.len()) as u64);
            if pending.is_empty() {
                // Every caller went away: hand the model back and wait for a request.
                if let Some(idle) = &idle {
                    idle.add_permits(1);
                }
                continue 'next;
            }
            if closed || can_fill(&pending, &cfg) || pending.len() >= cfg.queue_capacity {
                break;
            }
            let deadline = pending[0].enqueued + cfg.max_wait;
            if Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => pending.push_back(r),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let mut idx = select(&pending, &cfg);
        idx.sort_unstable_by(|a, b| b.cmp(a));
        let mut reqs: Vec<Request> = idx.into_iter().filter_map(|i| pending.remove(i)).collect();
        reqs.reverse();
        let now = Instant::now();
        for r in &reqs {
            let waited = (now - r.enqueued).as_secs_f64();
            m.queue_wait.observe(waited);
            observe_step_secs("queue", waited, 1);
        }
        m.depth.set(pending.len() as i64);
        let refs: Vec<&Seq> = reqs.iter().map(|r| &r.seq).collect();
        let batch = Batch::pad(&refs);
        let real: usize = refs.iter().map(|s| s.len()).sum();
        m.batches.inc();
        m.size.observe(batch.rows as f64);
        if batch.rows * batch.cols > 0 {
            m.padding.observe(1.0 - real as f64 / (batch.rows * batch.cols) as f64);
        }
        let (seqs, replies) = reqs.into_iter().map(|r| (r.seq, r.reply)).unzip();
        permit.send(Job { batch, seqs, replies, closed: std::time::Instant::now() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A fake model: output row = [first token id, row length without padding, batch rows].
    /// Records every batch it sees; optionally sleeps to emulate compute.
    #[derive(Clone, Default)]
    struct Fake {
        seen: Arc<Mutex<Vec<(usize, usize)>>>,
        delay: Duration,
        fail_on: Option<i64>,
        /// When set, every forward pass blocks until the gate is opened (`true`).
        gate: Option<Arc<(Mutex<bool>, std::sync::Condvar)>>,
    }

    fn open(gate: &Arc<(Mutex<bool>, std::sync::Condvar)>) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    impl Backend for Fake {
        fn forward(&mut self, b: &Batch) -> Result<Vec<Vec<f32>>, ForwardError> {
            self.seen.lock().unwrap().push((b.rows, b.cols));
            if let Some(g) = &self.gate {
                let mut opened = g.0.lock().unwrap();
                while !*opened {
                    opened = g.1.wait(opened).unwrap();
                }
            }
            if !self.delay.is_zero() {
                std::thread::sleep(self.delay);
            }
            let mut out = Vec::new();
            for r in 0..b.rows {
                let row = &b.input_ids[r * b.cols..(r + 1) * b.cols];
                if Some(row[0]) == self.fail_on {
                    return Err(ForwardError::Failed(format!("poisoned id {}", row[0])));
                }
                let len = b.attention_mask[r * b.cols..(r + 1) * b.cols].iter().sum::<i64>();
                out.push(vec![row[0] as f32, len as f32, b.rows as f32]);
            }
            Ok(out)
        }
    }

    fn cfg(size: usize, tokens: usize, wait_ms: u64, cap: usize) -> BatcherConfig {
        BatcherConfig { max_batch_size: size, max_batch_tokens: tokens, max_wait: Duration::from_millis(wait_ms), queue_capacity: cap }
    }

    fn seq(id: i64, len: usize) -> Seq {
        let mut ids = vec![id; len.max(1)];
        ids[0] = id;
        Seq::new(ids)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_caller_gets_its_own_result() {
        let fake = Fake::default();
        let b = Batcher::spawn(fake.clone(), cfg(8, 10_000, 5, 64));
        let mut tasks = Vec::new();
        for i in 1..=100i64 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                let len = 3 + (i as usize % 7);
                let out = b.infer(vec![seq(i, len), seq(i + 1000, 2)]).await.unwrap();
                assert_eq!(out[0][0], i as f32);
                assert_eq!(out[0][1], len as f32);
                assert_eq!(out[1][0], (i + 1000) as f32);
                assert_eq!(out[1][1], 2.0);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let seen = fake.seen.lock().unwrap();
        assert!(seen.iter().all(|&(rows, _)| rows <= 8), "batch size respected: {seen:?}");
        assert!(seen.iter().map(|&(r, _)| r).sum::<usize>() == 200);
        assert!(seen.len() < 200, "requests were batched together: {} batches", seen.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_item_waits_max_wait_then_runs() {
        let fake = Fake::default();
        let b = Batcher::spawn(fake.clone(), cfg(32, 10_000, 50, 64));
        let start = Instant::now();
        let out = b.infer(vec![seq(7, 4)]).await.unwrap();
        let waited = start.elapsed();
        assert_eq!(out[0][2], 1.0, "batch of one");
        assert!(waited >= Duration::from_millis(50), "closed early: {waited:?}");
        assert!(waited < Duration::from_millis(60), "closed late: {waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_closes_without_waiting() {
        let fake = Fake::default();
        let b = Batcher::spawn(fake.clone(), cfg(4, 10_000, 10_000, 64));
        let start = Instant::now();
        let out = b.infer((0..4).map(|i| seq(i, 5)).collect()).await.unwrap();
        assert_eq!(out.len(), 4);
        assert!(start.elapsed() < Duration::from_millis(100), "waited {:?} for a full batch", start.elapsed());
        assert_eq!(fake.seen.lock().unwrap()[0], (4, 5));
    }

    #[tokio::test(start_paused = true)]
    async fn token_budget_limits_padded_cost() {
        let fake = Fake::default();
        // 100 tokens budget; sequences of 30 tokens: at most 3 per batch.
        let b = Batcher::spawn(fake.clone(), cfg(32, 100, 5, 64));
        let out = b.infer((0..10).map(|i| seq(i, 30)).collect()).await.unwrap();
        assert_eq!(out.len(), 10);
        for &(rows, cols) in fake.seen.lock().unwrap().iter() {
            assert!(rows * cols <= 100, "padded cost {rows}x{cols} over budget");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_longer_than_the_budget_still_runs_alone() {
        let fake = Fake::default();
        let b = Batcher::spawn(fake.clone(), cfg(32, 16, 5, 64));
        let out = b.infer(vec![seq(1, 40), seq(2, 4)]).await.unwrap();
        assert_eq!(out[0][1], 40.0);
        assert_eq!(out[0][2], 1.0, "the long item ran alone");
    }

    #[tokio::test(start_paused = true)]
    async fn similar_lengths_are_grouped() {
        let fake = Fake::default();
        // The model is slow, so the queue fills while it works; then 4-wide batches form.
        let b = Batcher::spawn(Fake { delay: Duration::from_millis(0), ..fake.clone() }, cfg(4, 10_000, 20, 64));
        let lens = [10, 100, 11, 101, 12, 102, 13, 103];
        let out = b.infer(lens.iter().enumerate().map(|(i, &l)| seq(i as i64, l)).collect()).await.unwrap();
        assert_eq!(out.len(), 8);
        let seen = fake.seen.lock().unwrap();
        // Two batches: the short ones padded to 13, the long ones to 103 (not 4 x 103 twice).
        assert_eq!(*seen, vec![(4, 13), (4, 103)]);
    }

    #[tokio::test(start_paused = true)]
    async fn long_items_are_not_starved_by_a_stream_of_short_ones() {
        let fake = Fake::default();
        let b = Batcher::spawn(fake.clone(), cfg(2, 10_000, 5, 256));
        let long = {
            let b = b.clone();
            tokio::spawn(async move { b.infer(vec![seq(999, 200)]).await })
        };
        tokio::task::yield_now().await;
        let mut shorts = Vec::new();
        for i in 0..50 {
            let b = b.clone();
            shorts.push(tokio::spawn(async move { b.infer(vec![seq(i, 3)]).await }));
        }
        let out = long.await.unwrap().unwrap();
        assert_eq!(out[0][0], 999.0);
        // The long item was in one of the first batches (it was the oldest).
        let seen = fake.seen.lock().unwrap().clone();
        let pos = seen.iter().position(|&(_, cols)| cols == 200).unwrap();
        assert!(pos <= 1, "long item served at batch {pos}: {seen:?}");
        drop(seen);
        for s in shorts {
            s.await.unwrap().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_callers_are_skipped() {
        // Formed when the model is free: every cancelled request is skipped.
        assert_eq!(cancelled_run(Handoff::WhenFree).await, 2);
        // Formed ahead: the one batch prepared while the model was busy had already closed.
        assert_eq!(cancelled_run(Handoff::Ahead).await, 3);
    }

    /// Batches run when ten callers give up while the model is busy, then one more comes.
    async fn cancelled_run(handoff: Handoff) -> usize {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let fake = Fake { gate: Some(gate.clone()), ..Default::default() };
        let b = Batcher::spawn_with(fake.clone(), cfg(1, 10_000, 0, 64), handoff);
        // Occupy the model: it blocks until the gate opens.
        let busy = {
            let b = b.clone();
            tokio::spawn(async move { b.infer(vec![seq(1, 3)]).await })
        };
        while fake.seen.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // These callers give up while the model is busy.
        for i in 100..110 {
            let b = b.clone();
            let _ = tokio::time::timeout(Duration::from_millis(5), async move { b.infer(vec![seq(i, 3)]).await }).await;
        }
        open(&gate);
        let out = b.infer(vec![seq(2, 3)]).await.unwrap();
        assert_eq!(out[0][0], 2.0);
        busy.await.unwrap().unwrap();
        let seen = fake.seen.lock().unwrap().len();
        seen
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn items_arriving_during_a_pass_join_the_next_batch_together() {
        // The model is busy; one item comes, then three more. Formed when the model is free, the
        // four run together in the next pass; formed ahead, the first runs alone and the other
        // three wait one more pass.
        for (handoff, want) in [(Handoff::WhenFree, vec![(1, 3), (4, 3)]), (Handoff::Ahead, vec![(1, 3), (1, 3), (3, 3)])] {
            let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
            let fake = Fake { gate: Some(gate.clone()), ..Default::default() };
            let b = Batcher::spawn_with(fake.clone(), cfg(32, 10_000, 0, 64), handoff);
            let mut calls = vec![];
            let call = |b: &Batcher, i: i64| {
                let b = b.clone();
                tokio::spawn(async move { b.infer(vec![seq(i, 3)]).await })
            };
            calls.push(call(&b, 1));
            while fake.seen.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            for i in 2..=5 {
                calls.push(call(&b, i));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            open(&gate);
            for c in calls {
                c.await.unwrap().unwrap();
            }
            assert_eq!(*fake.seen.lock().unwrap(), want, "{handoff:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_makes_callers_wait_and_drops_nothing() {
        let fake = Fake { delay: Duration::from_millis(20), ..Default::default() };
        let b = Batcher::spawn(fake.clone(), cfg(2, 10_000, 0, 2));
        // Far more than queue + slot + running: callers must wait, not fail.
        let mut tasks = Vec::new();
        for i in 0..20 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move { b.infer(vec![seq(i, 3)]).await.unwrap()[0][0] }));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        // The queue holds at most its capacity: the 21st send cannot complete at once.
        let probe = b.clone();
        let quick = tokio::time::timeout(Duration::from_millis(1), async move { probe.tx.reserve().await.map(|_| ()) }).await;
        assert!(quick.is_err(), "queue should be full and push back");
        let mut got: Vec<f32> = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        got.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(got, (0..20).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_model_error_fails_only_its_batch() {
        let fake = Fake { fail_on: Some(666), ..Default::default() };
        let b = Batcher::spawn(fake, cfg(1, 10_000, 1, 16));
        assert!(matches!(b.infer(vec![seq(666, 3)]).await, Err(BatchError::Model(_))));
        assert_eq!(b.infer(vec![seq(5, 3)]).await.unwrap()[0][0], 5.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_item_is_isolated_and_its_batch_mates_succeed() {
        let fake = Fake { fail_on: Some(666), ..Default::default() };
        // One batch of 16: the item with id 666 fails the whole batch; splitting isolates it.
        let b = Batcher::spawn(fake.clone(), cfg(16, 10_000, 50, 64));
        let mut tasks = Vec::new();
        for i in 0..16i64 {
            let b = b.clone();
            let id = if i == 9 { 666 } else { i };
            tasks.push(tokio::spawn(async move { (id, b.infer(vec![seq(id, 3)]).await) }));
        }
        let mut ok = 0;
        for t in tasks {
            let (id, r) = t.await.unwrap();
            if id == 666 {
                assert!(matches!(r, Err(BatchError::Model(ref m)) if m.contains("666")), "{r:?}");
            } else {
                assert_eq!(r.unwrap()[0][0], id as f32);
                ok += 1;
            }
        }
        assert_eq!(ok, 15, "every other item of the batch got its result");
        let seen = fake.seen.lock().unwrap();
        assert!(seen.len() <= 1 + 2 * 4 + 2, "isolation took {} passes: {seen:?}", seen.len());
    }

    /// A backend that panics on one id and runs out of memory above 4 rows.
    struct Flaky;
    impl Backend for Flaky {
        fn forward(&mut self, b: &Batch) -> Result<Vec<Vec<f32>>, ForwardError> {
            if b.rows > 4 {
                return Err(ForwardError::OutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB".into()));
            }
            for r in 0..b.rows {
                if b.input_ids[r * b.cols] == 13 {
                    panic!("index out of range in the embedding");
                }
            }
            Ok((0..b.rows).map(|r| vec![b.input_ids[r * b.cols] as f32]).collect())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn out_of_memory_retries_smaller_batches_and_panics_are_contained() {
        let b = Batcher::spawn(Flaky, cfg(16, 10_000, 50, 64));
        let out = b.infer((0..12).map(|i| seq(i, 3)).collect::<Vec<_>>()).await;
        // Item 13 is not in this call: every item succeeds in batches of <= 4.
        assert_eq!(out.unwrap().iter().map(|r| r[0]).collect::<Vec<_>>(), (0..12).map(|i| i as f32).collect::<Vec<_>>());
        let r = b.infer(vec![seq(13, 3)]).await;
        assert!(matches!(r, Err(BatchError::Model(ref m)) if m.contains("panicked")), "{r:?}");
        assert!(b.is_alive(), "the model thread survived the panic");
        assert_eq!(b.infer(vec![seq(2, 3)]).await.unwrap()[0][0], 2.0);
    }

    #[test]
    fn padding_builds_masks_and_types() {
        let a = Seq { ids: vec![1, 2, 3], type_ids: Some(vec![0, 0, 1]) };
        let b = Seq { ids: vec![4], type_ids: Some(vec![0]) };
        let batch = Batch::pad(&[&a, &b]);
        assert_eq!((batch.rows, batch.cols), (2, 3));
        assert_eq!(batch.input_ids, vec![1, 2, 3, 4, 0, 0]);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(batch.token_type_ids, Some(vec![0, 0, 1, 0, 0, 0]));
    }
}
