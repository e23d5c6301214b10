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
    let io = |source| CertError::Io { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Unique per process and call: two writers of one file never share a temp.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{file_name}.tmp.{}.{n}", std::process::id()));
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(match sensitivity {
            Sensitivity::Secret => 0o600,
            Sensitivity::Public => 0o644,
        });
    }
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
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
}
