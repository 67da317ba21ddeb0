//! [`LocalDirStore`]: artifacts in a directory.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::ArtifactError;
use super::format::sha256_hex;
use super::store::{ArtifactStore, Revision, Versioned, validate_key, validate_prefix};

/// Artifacts as files under a root directory, key `a/b/c` at `<root>/a/b/c`.
///
/// Every write goes to a hidden temporary file in the target's directory, is flushed to disk,
/// then renamed (replace) or hard-linked (create-only) into place, and the directory is
/// flushed: readers see the old object or the whole new one, never a part. Compare-and-swap
/// writes hold an advisory lock (`flock`) on a hidden `.<name>.lock` file beside the object, so
/// several processes may share the directory as long as it is on a local POSIX filesystem.
/// Names starting with `.` are never listed.
#[derive(Clone, Debug)]
pub struct LocalDirStore {
    root: PathBuf,
}

impl LocalDirStore {
    /// A store rooted at `root`; the directory is created by the first write.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, ArtifactError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArtifactError + 'a {
    move |source| ArtifactError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    path: PathBuf,
    work: impl FnOnce() -> Result<T, ArtifactError> + Send + 'static,
) -> Result<T, ArtifactError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(ArtifactError::Io {
            op: "waiting for",
            path,
            source: io::Error::new(io::ErrorKind::Interrupted, e),
        }),
    }
}

fn read(path: &Path) -> Result<Option<Vec<u8>>, ArtifactError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::IsADirectory
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Flushes a directory entry change (rename, link) to disk.
fn sync_dir(dir: &Path) -> Result<(), ArtifactError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("flushing directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Replace,
    CreateNew,
}

/// Writes `bytes` to `path` through a flushed temporary file. `CreateNew` fails with
/// `Conflict` when `path` exists.
fn write_atomic(key: &str, path: &Path, bytes: &[u8], mode: Mode) -> Result<(), ArtifactError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = parent(path);
    fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name(path),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = File::create_new(&tmp).map_err(io_err("creating", &tmp))?;
        file.write_all(bytes).map_err(io_err("writing", &tmp))?;
        file.sync_all().map_err(io_err("flushing", &tmp))?;
        drop(file);
        match mode {
            Mode::Replace => fs::rename(&tmp, path).map_err(io_err("renaming into", path)),
            Mode::CreateNew => match fs::hard_link(&tmp, path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    Err(ArtifactError::Conflict {
                        key: key.to_owned(),
                        reason: "the object already exists",
                    })
                }
                Err(e) => Err(io_err("linking into", path)(e)),
            },
        }
    })();
    // After a rename there is nothing left to remove; after a link or a failure the
    // temporary name goes.
    if mode == Mode::CreateNew || result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir)
}

fn put_if(
    key: &str,
    path: &Path,
    bytes: &[u8],
    expected: Option<&Revision>,
) -> Result<(), ArtifactError> {
    let Some(expected) = expected else {
        return write_atomic(key, path, bytes, Mode::CreateNew);
    };
    let dir = parent(path);
    fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
    let lock_path = dir.join(format!(".{}.lock", file_name(path)));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err("opening lock", &lock_path))?;
    lock.lock().map_err(io_err("locking", &lock_path))?;
    let result = match read(path)? {
        None => Err(ArtifactError::Conflict {
            key: key.to_owned(),
            reason: "the object no longer exists",
        }),
        Some(current) if sha256_hex(&current) != expected.0 => Err(ArtifactError::Conflict {
            key: key.to_owned(),
            reason: "the object changed since it was read",
        }),
        Some(_) => write_atomic(key, path, bytes, Mode::Replace),
    };
    // Closing the file releases the lock too; unlocking first makes it explicit.
    let _ = lock.unlock();
    result
}

fn list(root: &Path, prefix: &str) -> Result<Vec<String>, ArtifactError> {
    // Start at the deepest directory the prefix names, then filter by the string prefix.
    let base = prefix.rfind('/').map_or("", |i| &prefix[..=i]);
    let mut keys = Vec::new();
    let mut pending = vec![base.to_owned()];
    while let Some(dir_key) = pending.pop() {
        let dir = root.join(&dir_key);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                continue;
            }
            Err(e) => return Err(io_err("listing", &dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            let key = format!("{dir_key}{name}");
            let file_type = entry
                .file_type()
                .map_err(io_err("listing", &entry.path()))?;
            if file_type.is_dir() {
                let sub = format!("{key}/");
                if sub.starts_with(prefix) || prefix.starts_with(&sub) {
                    pending.push(sub);
                }
            } else if key.starts_with(prefix) {
                keys.push(key);
            }
        }
    }
    keys.sort();
    Ok(keys)
}

fn delete(path: &Path) -> Result<(), ArtifactError> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent(path)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::IsADirectory
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(io_err("deleting", path)(e)),
    }
}

#[async_trait]
impl ArtifactStore for LocalDirStore {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArtifactError> {
        let path = self.path(key)?;
        let key = key.to_owned();
        blocking(path.clone(), move || {
            write_atomic(&key, &path, &bytes, Mode::Replace)
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ArtifactError> {
        let path = self.path(key)?;
        blocking(path.clone(), move || read(&path)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, ArtifactError> {
        validate_prefix(prefix)?;
        let (root, prefix) = (self.root.clone(), prefix.to_owned());
        blocking(root.clone(), move || list(&root, &prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<(), ArtifactError> {
        let path = self.path(key)?;
        blocking(path.clone(), move || delete(&path)).await
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, ArtifactError> {
        let path = self.path(key)?;
        blocking(path.clone(), move || {
            Ok(read(&path)?.map(|bytes| Versioned {
                revision: Revision(sha256_hex(&bytes)),
                bytes,
            }))
        })
        .await
    }

    async fn put_if(
        &self,
        key: &str,
        bytes: Vec<u8>,
        expected: Option<&Revision>,
    ) -> Result<(), ArtifactError> {
        let path = self.path(key)?;
        let (key, expected) = (key.to_owned(), expected.cloned());
        blocking(path.clone(), move || {
            put_if(&key, &path, &bytes, expected.as_ref())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_temporary_or_lock_file_is_listed_or_left_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalDirStore::new(dir.path());
        store.put("a/x", b"1".to_vec()).await.expect("put");
        store
            .put_if("a/y", b"1".to_vec(), None)
            .await
            .expect("create");
        let rev = store
            .get_versioned("a/y")
            .await
            .expect("get")
            .expect("present")
            .revision;
        store
            .put_if("a/y", b"2".to_vec(), Some(&rev))
            .await
            .expect("swap");
        assert_eq!(store.list("").await.expect("list"), ["a/x", "a/y"]);
        let mut names: Vec<String> = fs::read_dir(dir.path().join("a"))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        // Only the lock file of the compare-and-swap stays, hidden.
        assert_eq!(names, [".y.lock", "x", "y"]);
    }

    #[tokio::test]
    async fn a_failed_write_leaves_the_old_object() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalDirStore::new(dir.path());
        store.put("k", b"old".to_vec()).await.expect("put");
        // `k/x` needs `k` to be a directory: the write fails before touching `k`.
        let err = store.put("k/x", b"new".to_vec()).await.expect_err("fails");
        assert_eq!(err.kind(), "StorageIo");
        assert!(err.to_string().contains("creating directory"), "{err}");
        assert_eq!(store.get("k").await.expect("get"), Some(b"old".to_vec()));
    }
}
