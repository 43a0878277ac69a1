//! The program's result file, read back after a local run.

use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::exec::ProgramResult;

/// Reads the program's result file: missing, valid JSON, or invalid with the reason.
pub fn read_result(path: &Path, max_bytes: u64) -> ProgramResult {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return ProgramResult::Missing,
        Err(e) => return ProgramResult::Invalid(format!("result file could not be read: {e}")),
    };
    if meta.file_type().is_symlink() {
        return ProgramResult::Invalid("result file is a symbolic link; it was not followed".into());
    }
    if !meta.file_type().is_file() {
        return ProgramResult::Invalid("result file is not a regular file".into());
    }
    if meta.len() > max_bytes {
        return ProgramResult::Invalid(format!("result file is {} bytes, over the {max_bytes}-byte limit", meta.len()));
    }
    let file =
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn result_file_missing_valid_invalid_oversized_and_symlinked() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("result.json");
        assert_eq!(read_result(&p, 100), ProgramResult::Missing);
        fs::write(&p, br#"{"a": [1, 2]}"#).unwrap();
        assert_eq!(read_result(&p, 100), ProgramResult::Json(serde_json::json!({"a": [1, 2]})));
        fs::write(&p, b"{not json").unwrap();
        assert!(matches!(read_result(&p, 100), ProgramResult::Invalid(m) if m.contains("not valid JSON")));
        fs::write(&p, vec![b' '; 101]).unwrap();
        assert!(matches!(read_result(&p, 100), ProgramResult::Invalid(m) if m.contains("over the 100-byte limit")));
        fs::remove_file(&p).unwrap();
        fs::write(tmp.path().join("target"), b"1").unwrap();
        symlink(tmp.path().join("target"), &p).unwrap();
        assert!(matches!(read_result(&p, 100), ProgramResult::Invalid(m) if m.contains("symbolic link")));
    }
}
