//! What a finished task leaves: its result file and artifacts, and the sweep of old artifacts.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::scratch::remove_tree;
use crate::exec::{Artifact, ProgramResult};

/// Caps on what is collected from a task's artifacts directory.
#[derive(Debug, Clone)]
pub struct ArtifactCaps {
    pub max_files: usize,
    pub max_bytes: u64,
    pub max_depth: usize,
}

/// Directory entries examined per task at most, so a directory of a million files costs little.
const ARTIFACT_SCAN_LIMIT: usize = 20_000;

/// Copies regular files from `src` (the task's artifacts dir) to `dest`, listing each with its
/// size and sha256. Never follows a symlink (they are skipped, as are `src` itself being one,
/// files with more than one hard link, sockets, FIFOs and devices), recurses at most
/// `max_depth` levels, and stops at `max_files` / `max_bytes` (a file that would pass the byte
/// cap is skipped). Names are `/`-separated paths relative to `src`; non-UTF-8 names are
/// skipped. Runs after every process of the task is dead, so nothing changes underneath.
pub fn collect_artifacts(src: &Path, dest: &Path, caps: &ArtifactCaps) -> Vec<Artifact> {
    let mut out = Vec::new();
    match fs::symlink_metadata(src) {
        Ok(m) if m.file_type().is_dir() => {}
        _ => return out,
    }
    let _ = remove_tree(dest);
    let mut total = 0u64;
    let mut scanned = 0usize;
    let mut stack: Vec<(PathBuf, String, usize)> = vec![(src.to_path_buf(), String::new(), 0)];
    'walk: while let Some((dir, prefix, depth)) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let mut names = Vec::new();
        for entry in entries {
            scanned += 1;
            if scanned > ARTIFACT_SCAN_LIMIT {
                break;
            }
            if let Ok(entry) = entry {
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let rel = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                if depth + 1 < caps.max_depth {
                    subdirs.push((path, rel, depth + 1));
                }
                continue;
            }
            if !ft.is_file() || meta.nlink() != 1 {
                continue;
            }
            if out.len() >= caps.max_files {
                break 'walk;
            }
            if total + meta.len() > caps.max_bytes {
                continue;
            }
            match copy_artifact(&path, &meta, &dest.join(&rel)) {
                Ok(info) => {
                    total += info.1;
                    out.push(Artifact {
                        name: rel,
                        size: info.1,
                        sha256: info.0,
                    });
                }
                Err(e) => tracing::debug!(file = %path.display(), error = %e, "artifact skipped"),
            }
        }
        // Depth-first in name order.
        stack.extend(subdirs.into_iter().rev());
        if scanned > ARTIFACT_SCAN_LIMIT {
            break;
        }
    }
    out
}

fn copy_artifact(src: &Path, lmeta: &fs::Metadata, dest: &Path) -> io::Result<(String, u64)> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(src)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file()
        || meta.nlink() != 1
        || meta.ino() != lmeta.ino()
        || meta.dev() != lmeta.dev()
    {
        return Err(io::Error::other("not the regular file that was listed"));
    }
    if let Some(parent) = dest.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dest)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    // Never more than the size listed, whatever the file claims now.
    let mut limited = (&mut file).take(lmeta.len());
    loop {
        let n = limited.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        size += n as u64;
    }
    let digest = hasher.finalize();
    Ok((digest.iter().map(|b| format!("{b:02x}")).collect(), size))
}

/// Reads the program's result file: missing, valid JSON, or invalid with the reason.
pub fn read_result(path: &Path, max_bytes: u64) -> ProgramResult {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return ProgramResult::Missing,
        Err(e) => return ProgramResult::Invalid(format!("result file could not be read: {e}")),
    };
    if meta.file_type().is_symlink() {
        return ProgramResult::Invalid(
            "result file is a symbolic link; it was not followed".into(),
        );
    }
    if !meta.file_type().is_file() {
        return ProgramResult::Invalid("result file is not a regular file".into());
    }
    if meta.len() > max_bytes {
        return ProgramResult::Invalid(format!(
            "result file is {} bytes, over the {max_bytes}-byte limit",
            meta.len()
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
    let mut bytes = Vec::new();
    if let Err(e) = file.and_then(|f| f.take(max_bytes + 1).read_to_end(&mut bytes)) {
        return ProgramResult::Invalid(format!("result file could not be read: {e}"));
    }
    if bytes.len() as u64 > max_bytes {
        return ProgramResult::Invalid(format!("result file is over the {max_bytes}-byte limit"));
    }
    match serde_json::from_slice(&bytes) {
        Ok(v) => ProgramResult::Json(v),
        Err(e) => ProgramResult::Invalid(format!("result file is not valid JSON: {e}")),
    }
}

/// Removes task artifact directories under `<data_dir>/artifacts/` last modified more than
/// `ttl` ago. Returns how many were removed. Call it periodically (e.g. every few minutes).
///
/// # Errors
/// Only when the artifacts directory cannot be listed; a directory that cannot be removed is
/// logged and skipped.
pub fn sweep_artifacts(data_dir: &Path, ttl: Duration) -> io::Result<usize> {
    let root = data_dir.join("artifacts");
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        if age < ttl {
            continue;
        }
        let res = if meta.file_type().is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match res {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove expired artifacts")
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn caps() -> ArtifactCaps {
        ArtifactCaps {
            max_files: 100,
            max_bytes: 1 << 20,
            max_depth: 8,
        }
    }

    fn sha256_hex(data: &[u8]) -> String {
        Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn regular_files_are_copied_with_size_and_sha256_in_name_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
        fs::create_dir_all(src.join("sub/deeper")).unwrap();
        fs::write(src.join("b.txt"), b"bee").unwrap();
        fs::write(src.join("a.txt"), b"a").unwrap();
        fs::write(src.join("sub/deeper/c.bin"), [0u8, 1, 2]).unwrap();
        let got = collect_artifacts(&src, &dest, &caps());
        let names: Vec<_> = got.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["a.txt", "b.txt", "sub/deeper/c.bin"]);
        assert_eq!(got[1].size, 3);
        assert_eq!(got[1].sha256, sha256_hex(b"bee"));
        assert_eq!(
            fs::read(dest.join("sub/deeper/c.bin")).unwrap(),
            [0u8, 1, 2]
        );
    }

    #[test]
    fn links_and_special_files_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
        fs::create_dir(&src).unwrap();
        fs::write(tmp.path().join("secret"), b"host secret").unwrap();
        symlink(tmp.path().join("secret"), src.join("link")).unwrap();
        fs::write(src.join("twice"), b"x").unwrap();
        fs::hard_link(src.join("twice"), src.join("twice2")).unwrap();
        let fifo = std::ffi::CString::new(src.join("fifo").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        fs::write(src.join("ok"), b"fine").unwrap();
        let got = collect_artifacts(&src, &dest, &caps());
        let names: Vec<_> = got.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["ok"]);
    }

    #[test]
    fn a_symlinked_source_directory_yields_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::write(real.join("f"), b"x").unwrap();
        symlink(&real, tmp.path().join("src")).unwrap();
        let got = collect_artifacts(&tmp.path().join("src"), &tmp.path().join("dest"), &caps());
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn file_count_byte_total_and_depth_are_capped() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
        fs::create_dir_all(src.join("d1/d2")).unwrap();
        for i in 0..5 {
            fs::write(src.join(format!("f{i}")), vec![b'x'; 100]).unwrap();
        }
        fs::write(src.join("d1/d2/deep"), b"deep").unwrap();
        let got = collect_artifacts(
            &src,
            &dest,
            &ArtifactCaps {
                max_files: 3,
                max_bytes: 1 << 20,
                max_depth: 8,
            },
        );
        assert_eq!(got.len(), 3);
        let got = collect_artifacts(
            &src,
            &dest,
            &ArtifactCaps {
                max_files: 100,
                max_bytes: 250,
                max_depth: 8,
            },
        );
        // A file that would pass the cap is skipped; smaller ones after it still fit.
        let names: Vec<_> = got.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["f0", "f1", "d1/d2/deep"]);
        let got = collect_artifacts(
            &src,
            &dest,
            &ArtifactCaps {
                max_files: 100,
                max_bytes: 1 << 20,
                max_depth: 2,
            },
        );
        assert!(got.iter().all(|a| a.name != "d1/d2/deep"), "{got:?}");
    }

    #[test]
    fn result_file_missing_valid_invalid_oversized_and_symlinked() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("result.json");
        assert_eq!(read_result(&p, 100), ProgramResult::Missing);
        fs::write(&p, br#"{"a": [1, 2]}"#).unwrap();
        assert_eq!(
            read_result(&p, 100),
            ProgramResult::Json(serde_json::json!({"a": [1, 2]}))
        );
        fs::write(&p, b"{not json").unwrap();
        assert!(
            matches!(read_result(&p, 100), ProgramResult::Invalid(m) if m.contains("not valid JSON"))
        );
        fs::write(&p, vec![b' '; 101]).unwrap();
        assert!(
            matches!(read_result(&p, 100), ProgramResult::Invalid(m) if m.contains("over the 100-byte limit"))
        );
        fs::remove_file(&p).unwrap();
        fs::write(tmp.path().join("target"), b"1").unwrap();
        symlink(tmp.path().join("target"), &p).unwrap();
        assert!(
            matches!(read_result(&p, 100), ProgramResult::Invalid(m) if m.contains("symbolic link"))
        );
    }

    #[test]
    fn the_sweep_removes_only_expired_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("artifacts").join("t1");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("f"), b"x").unwrap();
        assert_eq!(
            sweep_artifacts(tmp.path(), Duration::from_secs(3600)).unwrap(),
            0
        );
        assert!(dir.exists());
        assert_eq!(sweep_artifacts(tmp.path(), Duration::ZERO).unwrap(), 1);
        assert!(!dir.exists());
    }
}
