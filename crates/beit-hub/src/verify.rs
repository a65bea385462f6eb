//! Checking a downloaded blob against what the hub announced for it.
//!
//! The hub's `ETag` for a file stored with Git LFS (every weight file) is the SHA-256 of its contents;
//! for a plain git file (`config.json`, ...) it is the git blob id, SHA-1 of `"blob <len>\0" + contents`.
//! Both are recomputed here, so a truncated or altered download is never moved into the cache.
//! (The hub maintainers describe the two etag kinds in huggingface/huggingface_hub#3018.)

use std::io::Read;
use std::path::Path;

use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Check `path` has `size` bytes and, when `etag` is a SHA-256 or git-SHA-1 digest, that it hashes to
/// it. Returns a description of the mismatch on failure.
pub fn verify_blob(path: &Path, size: u64, etag: &str) -> Result<(), String> {
    let actual = std::fs::metadata(path)
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
        .len();
    if actual != size {
        return Err(format!("expected {size} bytes, got {actual}"));
    }
    let etag = etag.trim_matches('"').to_ascii_lowercase();
    let is_hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
    let digest = match (etag.len(), is_hex) {
        (64, true) => hash_file(path, Sha256::new(), b"")?,
        (40, true) => hash_file(path, Sha1::new(), format!("blob {size}\0").as_bytes())?,
        // An etag in another form (e.g. from a mirror) cannot be checked beyond its size.
        _ => return Ok(()),
    };
    if digest == etag {
        Ok(())
    } else {
        Err(format!(
            "content hash {digest} does not match the hub's etag {etag}"
        ))
    }
}

fn hash_file<D: Digest>(path: &Path, mut hasher: D, prefix: &[u8]) -> Result<String, String> {
    hasher.update(prefix);
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_size_sha256_and_git_sha1() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello\n").unwrap();
        // `printf 'hello\n' | sha256sum` and `printf 'hello\n' | git hash-object --stdin`.
        let sha256 = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        let git = "ce013625030ba8dba906f756967f9e9ca394464a";
        verify_blob(&p, 6, sha256).unwrap();
        verify_blob(&p, 6, git).unwrap();
        verify_blob(&p, 6, "not-a-digest").unwrap();
        assert!(verify_blob(&p, 7, sha256)
            .unwrap_err()
            .contains("expected 7 bytes"));
        let wrong = "0".repeat(64);
        assert!(verify_blob(&p, 6, &wrong)
            .unwrap_err()
            .contains("does not match"));
        let wrong = "0".repeat(40);
        assert!(verify_blob(&p, 6, &wrong)
            .unwrap_err()
            .contains("does not match"));
    }
}
