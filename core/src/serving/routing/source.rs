//! Where the routing table comes from: the [`RoutingSource`] seam and its local
//! implementations.

use std::fmt;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{RoutingError, RoutingFormat, RoutingMetrics, RoutingTable, ValidationError};

/// A routing table that may change while the scorer runs.
///
/// [`RoutingSource::current`] is the request path: a lock-free load (no await, no lock), so it
/// is a plain method. Changes are announced on a [`watch`] channel, whose receivers await
/// `changed()`: the scorer loads and warms the versions a new table names before serving it.
/// Implementations only ever publish validated tables; a refused change leaves the current
/// table in place. The in-cluster source (the table the operator writes) is another
/// implementation of this trait.
pub trait RoutingSource: Send + Sync + fmt::Debug {
    /// The table serving now.
    fn current(&self) -> Arc<RoutingTable>;

    /// A receiver that sees every table published from now on (and the current one with
    /// `borrow()`).
    fn subscribe(&self) -> watch::Receiver<Arc<RoutingTable>>;
}

/// The table serving and the channel announcing its changes: the publishing half every
/// [`RoutingSource`] needs, for implementations outside this module (the scorer's in-cluster
/// source). [`RoutingPublisher::current`] is a lock-free load.
#[derive(Debug)]
pub struct RoutingPublisher {
    current: ArcSwap<RoutingTable>,
    changes: watch::Sender<Arc<RoutingTable>>,
}

impl RoutingPublisher {
    /// A publisher serving `table`.
    pub fn new(table: Arc<RoutingTable>) -> Self {
        Self {
            current: ArcSwap::new(table.clone()),
            changes: watch::Sender::new(table),
        }
    }

    /// The table serving now.
    pub fn current(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }

    /// Serves `table` from now on and tells subscribers.
    pub fn publish(&self, table: Arc<RoutingTable>) {
        self.current.store(table.clone());
        // `send_replace` stores the value even when nobody subscribes.
        self.changes.send_replace(table);
    }

    /// A receiver of every table published from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.changes.subscribe()
    }

    /// Publishes `table`, read from `origin`: logged with the revision it replaces, and
    /// counted in `metrics`.
    pub fn apply(&self, table: RoutingTable, origin: &dyn fmt::Display, metrics: &RoutingMetrics) {
        let previous = self.current();
        tracing::info!(
            %origin,
            revision = table.revision(),
            previous_revision = previous.revision(),
            table = %table,
            "routing table loaded"
        );
        metrics.record_loaded(&table);
        self.publish(Arc::new(table));
    }

    /// Logs and counts a change from `origin` that was refused; the current table stays.
    pub fn refuse(
        &self,
        error: &RoutingError,
        origin: &dyn fmt::Display,
        metrics: &RoutingMetrics,
    ) {
        tracing::warn!(
            %origin,
            kind = error.kind(),
            error = %error,
            serving_revision = self.current().revision(),
            "routing table change refused; the previous table keeps serving"
        );
        metrics.record_refused(error.kind());
    }
}

/// A table set by the program: for tests and the embedded default (one model at its
/// `champion` alias, [`StaticRoutingSource::champion`]).
#[derive(Debug)]
pub struct StaticRoutingSource {
    published: RoutingPublisher,
    metrics: Option<RoutingMetrics>,
}

impl StaticRoutingSource {
    /// A source serving `table`.
    pub fn new(table: RoutingTable) -> Self {
        Self {
            published: RoutingPublisher::new(Arc::new(table)),
            metrics: None,
        }
    }

    /// A source serving `model` at its `champion` alias to every user.
    pub fn champion(model: &str) -> Result<Self, ValidationError> {
        Ok(Self::new(RoutingTable::champion(model)?))
    }

    /// Records the table (and every later [`StaticRoutingSource::replace`]) in `metrics`.
    pub fn with_metrics(mut self, metrics: RoutingMetrics) -> Self {
        metrics.record_loaded(&self.published.current());
        self.metrics = Some(metrics);
        self
    }

    /// Serves `table` from now on and tells subscribers (tests use this to simulate the
    /// operator changing the table).
    pub fn replace(&self, table: RoutingTable) {
        if let Some(m) = &self.metrics {
            m.record_loaded(&table);
        }
        self.published.publish(Arc::new(table));
    }
}

impl RoutingSource for StaticRoutingSource {
    fn current(&self) -> Arc<RoutingTable> {
        self.published.current()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.published.subscribe()
    }
}

/// How often [`FileRoutingSource`] looks at its file by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest poll interval; shorter settings are raised to it.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Largest routing file read (1 MiB, the size limit of a ConfigMap).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Options of a [`FileRoutingSource`].
#[derive(Clone, Debug)]
pub struct FileRoutingOptions {
    /// How often the file is read (at least 10 ms). A change serves within two intervals of
    /// being written (it must read the same twice).
    pub poll_interval: Duration,
    /// Where loads and refusals are recorded.
    pub metrics: RoutingMetrics,
}

impl Default for FileRoutingOptions {
    fn default() -> Self {
        Self {
            poll_interval: DEFAULT_POLL_INTERVAL,
            metrics: RoutingMetrics::new(),
        }
    }
}

/// A routing table in a file, reread when it changes (local mode; also a ConfigMap mounted
/// as a volume).
///
/// # How changes are seen
///
/// A background task reads the whole file every `poll_interval`, following symlinks, and
/// compares the SHA-256 of its bytes with the last read. This is deliberately not
/// inotify-style watching (the `notify` crate):
/// - writers replace the file by atomic rename (most editors, `mv`, `sed -i`); a watch
///   on the file stays on the old, deleted inode and sees nothing more;
/// - a ConfigMap volume swaps the `..data` symlink one level up; the file's own path never
///   gets an event, so the directory would have to be watched and every event rechecked;
/// - events are not delivered at all on some mounts (NFS, some FUSE and overlay setups);
/// - metadata is not enough either: two writes within the filesystem's mtime granularity with
///   the same length (weight `10` → `20`) look identical.
///
/// Reading and hashing a file of a few kilobytes costs microseconds, so polling the content
/// is cheap and catches every case above.
///
/// A change is acted upon once it holds still: when the next poll reads the same bytes (or
/// fails the same way). A writer that rewrites the file in place (`kubectl cp`, `echo >`) can
/// be caught half-way, and a truncated table may still parse (with a model missing); waiting
/// one interval keeps such a read from serving or from being reported. So a change serves
/// within two intervals of being written: small next to the kubelet's ConfigMap propagation
/// (up to a minute). Writers should still replace the file atomically (write, then rename).
///
/// # Bad changes
///
/// A missing or invalid file at start is an error from [`FileRoutingSource::start`]. After
/// that, a change that cannot be read, parsed or validated is logged once (with the reason
/// and the field) and counted in [`RoutingMetrics`], and the previous table keeps serving
/// until the file changes again. A file put back to the table serving is not a new load.
pub struct FileRoutingSource {
    path: PathBuf,
    published: Arc<RoutingPublisher>,
    task: JoinHandle<()>,
}

impl fmt::Debug for FileRoutingSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileRoutingSource")
            .field("path", &self.path)
            .field("revision", &self.published.current().revision())
            .finish_non_exhaustive()
    }
}

impl FileRoutingSource {
    /// Loads the table in `path` and starts watching it (on the current Tokio runtime; the
    /// task stops when the source is dropped).
    ///
    /// Fails if the file is missing, unreadable, larger than [`MAX_FILE_BYTES`], or not a valid
    /// routing table; the error names the path and the field.
    pub async fn start(
        path: impl Into<PathBuf>,
        options: FileRoutingOptions,
    ) -> Result<Self, RoutingError> {
        let path = path.into();
        let loaded = read(path.clone())
            .await
            .map_err(|source| RoutingError::Read {
                path: path.clone(),
                source,
            });
        let (table, digest) = match loaded.and_then(|bytes| Ok((decode(&path, &bytes)?, bytes))) {
            Ok((table, bytes)) => (table, sha256(&bytes)),
            Err(e) => {
                options.metrics.record_refused(e.kind());
                return Err(e);
            }
        };
        options.metrics.record_loaded(&table);
        tracing::info!(
            path = %path.display(),
            revision = table.revision(),
            table = %table,
            "routing table loaded"
        );
        let published = Arc::new(RoutingPublisher::new(Arc::new(table)));
        let watcher = Watcher {
            path: path.clone(),
            interval: options.poll_interval.max(MIN_POLL_INTERVAL),
            published: published.clone(),
            metrics: options.metrics,
            applied: digest,
            last: Observation::Content(digest),
            settled: true,
        };
        let task = tokio::spawn(watcher.run());
        Ok(Self {
            path,
            published,
            task,
        })
    }

    /// The file watched.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FileRoutingSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RoutingSource for FileRoutingSource {
    fn current(&self) -> Arc<RoutingTable> {
        self.published.current()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.published.subscribe()
    }
}

type Digest = [u8; 32];

fn sha256(bytes: &[u8]) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(&Sha256::digest(bytes));
    out
}

/// What one poll saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Observation {
    /// The file's bytes, by hash.
    Content(Digest),
    /// The file could not be read.
    Unreadable(io::ErrorKind),
}

/// Reads at most `MAX_FILE_BYTES + 1` bytes of `path` (following symlinks), off the runtime.
async fn read(path: PathBuf) -> io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        let mut bytes = Vec::new();
        std::fs::File::open(&path)?
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Parses and validates the bytes of `path`.
fn decode(path: &Path, bytes: &[u8]) -> Result<RoutingTable, RoutingError> {
    let origin = path.display().to_string();
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(RoutingError::TooLarge {
            origin,
            limit: MAX_FILE_BYTES,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| RoutingError::Parse {
        origin: origin.clone(),
        format: RoutingFormat::detect(path, ""),
        message: format!("not UTF-8: {e}"),
    })?;
    RoutingTable::parse(text, RoutingFormat::detect(path, text), &origin)
}

/// The polling task of a [`FileRoutingSource`].
struct Watcher {
    path: PathBuf,
    interval: Duration,
    published: Arc<RoutingPublisher>,
    metrics: RoutingMetrics,
    /// Hash of the bytes of the table serving.
    applied: Digest,
    /// What the previous poll saw.
    last: Observation,
    /// Whether `last` was acted upon (applied, refused, or found to be the table serving).
    settled: bool,
}

impl Watcher {
    async fn run(mut self) {
        loop {
            tokio::time::sleep(self.interval).await;
            self.poll().await;
        }
    }

    async fn poll(&mut self) {
        let read = read(self.path.clone()).await;
        let observed = match &read {
            Ok(bytes) => Observation::Content(sha256(bytes)),
            Err(e) => Observation::Unreadable(e.kind()),
        };
        if observed != self.last {
            // Changed since the previous poll: act once it holds still for an interval, so
            // that a writer caught half-way is neither served nor reported.
            self.last = observed;
            self.settled = false;
            return;
        }
        if self.settled {
            return;
        }
        self.settled = true;
        match read {
            Err(source) => self.refuse(&RoutingError::Read {
                path: self.path.clone(),
                source,
            }),
            Ok(bytes) => {
                let digest = sha256(&bytes);
                if digest == self.applied {
                    tracing::debug!(
                        path = %self.path.display(),
                        "routing table file is back to the table serving"
                    );
                    return;
                }
                match decode(&self.path, &bytes) {
                    Ok(table) => self.apply(table, digest),
                    Err(error) => self.refuse(&error),
                }
            }
        }
    }

    fn apply(&mut self, table: RoutingTable, digest: Digest) {
        self.published
            .apply(table, &self.path.display(), &self.metrics);
        self.applied = digest;
    }

    fn refuse(&self, error: &RoutingError) {
        self.published
            .refuse(error, &self.path.display(), &self.metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_MODELS: &str =
        "formatVersion: 1\nrevision: r2\nmodels:\n  als: {stable: v1}\n  bpr: {stable: v1}\n";

    /// A watcher over `path` (already holding `first`), polled by hand.
    async fn watcher(path: &Path, first: &str) -> (Watcher, RoutingMetrics) {
        std::fs::write(path, first).expect("write");
        let bytes = read(path.to_owned()).await.expect("read");
        let table = decode(path, &bytes).expect("valid");
        let digest = sha256(&bytes);
        let metrics = RoutingMetrics::new();
        let w = Watcher {
            path: path.to_owned(),
            interval: POLL_FOR_TESTS,
            published: Arc::new(RoutingPublisher::new(Arc::new(table))),
            metrics: metrics.clone(),
            applied: digest,
            last: Observation::Content(digest),
            settled: true,
        };
        (w, metrics)
    }

    const POLL_FOR_TESTS: Duration = Duration::from_millis(10);

    fn revision(w: &Watcher) -> String {
        w.published.current().revision().to_owned()
    }

    fn failures(metrics: &RoutingMetrics) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text.lines()
            .filter(|l| l.starts_with("routing_table_reload_failures_total{"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[tokio::test]
    async fn a_half_written_file_is_neither_served_nor_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routing.yaml");
        let (mut w, metrics) = watcher(&path, "formatVersion: 1\nrevision: r1\nmodels: {}\n").await;

        // Caught half-way: a prefix that happens to be a valid table with one model missing,
        // then a prefix that does not parse at all.
        let cut = TWO_MODELS.find("  bpr").expect("bpr");
        std::fs::write(&path, &TWO_MODELS[..cut]).expect("write");
        w.poll().await;
        assert_eq!(revision(&w), "r1", "a change is not served on first sight");
        std::fs::write(&path, &TWO_MODELS[..cut + 5]).expect("write");
        w.poll().await;
        std::fs::write(&path, TWO_MODELS).expect("write");
        w.poll().await;
        assert_eq!(revision(&w), "r1");
        assert_eq!(failures(&metrics), "", "nothing half-written is reported");

        // Held still for an interval: served.
        w.poll().await;
        let table = w.published.current();
        assert_eq!(table.revision(), "r2");
        assert_eq!(table.len(), 2);
        w.poll().await;
        assert_eq!(failures(&metrics), "");
    }

    #[tokio::test]
    async fn a_settled_bad_change_is_reported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routing.yaml");
        let (mut w, metrics) = watcher(&path, TWO_MODELS).await;
        std::fs::write(&path, "formatVersion: 1\nmodels: {als: {stable: '..'}}\n").expect("write");
        for _ in 0..5 {
            w.poll().await;
        }
        assert_eq!(
            failures(&metrics),
            "routing_table_reload_failures_total{kind=\"Invalid\"} 1"
        );
        assert_eq!(revision(&w), "r2");
        std::fs::remove_file(&path).expect("remove");
        for _ in 0..5 {
            w.poll().await;
        }
        assert!(
            failures(&metrics)
                .contains("routing_table_reload_failures_total{kind=\"Unreadable\"} 1"),
            "{}",
            failures(&metrics)
        );
        assert_eq!(revision(&w), "r2");
    }
}
