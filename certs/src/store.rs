//! Atomic file writes for certificates and keys.
//!
//! Data goes to a temporary file in the same directory, is synced, then
//! renamed over the target, and the directory is synced; readers see the old
//! file or the new one, never a torn mix. Key files are created mode 0600
//! before any byte is written.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::CertError;

/// Whether a file holds a secret (created mode 0600) or public data (0644).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sensitivity {
    /// Private keys and tokens.
    Secret,
    /// Certificates.
    Public,
}

/// Atomically replaces `path` with `data`.
pub fn write_atomic(path: &Path, data: &[u8], sensitivity: Sensitivity) -> Result<(), CertError> {
    publish(path, data, sensitivity, |tmp| fs::rename(tmp, path)).map(|_| ())
}

/// Creates `path` with `data` unless it exists: `Ok(true)` if this call
/// created it, `Ok(false)` if another writer got there first (its file is
/// left as it is). The data is complete before the name appears (a hard
/// link of a synced temporary file), so a reader never sees a partial file
/// and of several racing processes exactly one wins.
pub fn create_new(path: &Path, data: &[u8], sensitivity: Sensitivity) -> Result<bool, CertError> {
    let linked = publish(path, data, sensitivity, |tmp| match fs::hard_link(tmp, path) {
        Ok(()) => Ok(Some(true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Some(false)),
        // A file system without hard links (some FUSE, SMB, FAT mounts).
        Err(_) => Ok(None),
    })?;
    if let Some(created) = linked {
        return Ok(created);
    }
    // Still one winner (O_EXCL), though a racing reader may see the file
    // before its bytes.
    let io = |source| CertError::Io { path: path.to_path_buf(), source };
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode(sensitivity));
    }
    match options.open(path) {
        Ok(mut file) => {
            file.write_all(data).and_then(|()| file.sync_all()).map_err(io)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io(e)),
    }
}

#[cfg(unix)]
fn mode(sensitivity: Sensitivity) -> u32 {
    match sensitivity {
        Sensitivity::Secret => 0o600,
        Sensitivity::Public => 0o644,
    }
}

/// Writes `data` to a synced temporary file beside `path` (mode set at
/// creation), gives it its name with `put`, syncs the directory and removes
/// whatever temporary name is left.
fn publish<T>(
    path: &Path,
    data: &[u8],
    sensitivity: Sensitivity,
    put: impl FnOnce(&Path) -> std::io::Result<T>,
) -> Result<T, CertError> {
    let io = |source| CertError::Io { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let tmp = temp_path(dir, path);
    let result = (|| {
        let mut file = open_new(&tmp, sensitivity)?;
        file.write_all(data)?;
        file.sync_all()?;
        let put = put(&tmp)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(put)
    })();
    // Gone after a rename; the second name after a hard link; left over
    // after a failure.
    let _ = fs::remove_file(&tmp);
    result.map_err(io)
}

/// An exclusive lock on `<dir>/<name>` held until dropped: first-start
/// work that writes several files (a key and its certificate) runs under
/// it, so two processes starting at once never mix their halves.
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] fs::File);

/// Takes [`DirLock`] on `<dir>/<name>`, waiting for another holder.
pub fn lock_dir(dir: &Path, name: &str) -> Result<DirLock, CertError> {
    let path = dir.join(name);
    let io = |source| CertError::Io { path: path.clone(), source };
    fs::create_dir_all(dir).map_err(io)?;
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
    file.lock().map_err(io)?;
    Ok(DirLock(file))
}

fn temp_path(dir: &Path, path: &Path) -> std::path::PathBuf {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Unique per process and call: two writers of one file never share a temp.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!(".{file_name}.tmp.{}.{n}", std::process::id()))
}

fn open_new(path: &Path, sensitivity: Sensitivity) -> std::io::Result<fs::File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode(sensitivity));
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_and_set_modes() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("sub/node.key");
        write_atomic(&key, b"one", Sensitivity::Secret).unwrap();
        write_atomic(&key, b"two", Sensitivity::Secret).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let leftovers: Vec<_> = fs::read_dir(key.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp files left behind");
    }

    #[test]
    fn create_new_has_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let writers: Vec<_> = (0..8u8)
            .map(|i| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    create_new(&path, &[b'a' + i; 64], Sensitivity::Secret).unwrap()
                })
            })
            .collect();
        let wins = writers.into_iter().map(|w| w.join().unwrap()).filter(|won| *won).count();
        assert_eq!(wins, 1);
        let data = fs::read(&path).unwrap();
        assert_eq!(data.len(), 64, "never a partial file");
        assert!(data.iter().all(|b| *b == data[0]), "never a mix of writers");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp files left behind");
    }
}
