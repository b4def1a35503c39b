//! Reading the files the configuration names: the TOML file, `*_file`
//! secrets, the TLS certificate and key.
//!
//! Each is read only if it is a regular file (a symlink to one is fine, as
//! Kubernetes mounts Secrets), and only up to a limit. A FIFO would block
//! start-up (and every reload poll) until something wrote to it, and a
//! device such as `/dev/zero` would be read until memory ran out: both are
//! refused at once, with an error that says why.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The TOML file. The shipped example, every comment included, is 15 KiB.
pub const CONFIG_LIMIT: u64 = 1 << 20;
/// A token, shared-key secret or encryption key: tens of bytes.
pub const SECRET_LIMIT: u64 = 64 << 10;
/// A PEM certificate chain or private key.
pub const PEM_LIMIT: u64 = 1 << 20;

/// Why a file was not read. Its `Display` is the reason only (no path, no
/// content): callers add the key and the file.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    NotRegular,
    TooLarge(u64),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => e.fmt(f),
            ReadError::NotRegular => f.write_str("not a regular file"),
            ReadError::TooLarge(limit) => write!(f, "larger than {} KiB", limit >> 10),
        }
    }
}

/// The whole of the regular file at `path`, if it holds at most `limit`
/// bytes.
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    // Checked before opening: opening a FIFO for reading blocks, and
    // opening a device may do something.
    if !std::fs::metadata(path).map_err(ReadError::Io)?.is_file() {
        return Err(ReadError::NotRegular);
    }
    // And checked again on what was opened, without blocking: a file
    // renamed over the path in between (a Kubernetes `..data` swap, or a
    // FIFO) is the one read (found in review: a FIFO swapped in there
    // blocked the read forever). `O_NONBLOCK` changes nothing for a
    // regular file.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(ReadError::Io)?;
    let metadata = file.metadata().map_err(ReadError::Io)?;
    if !metadata.is_file() {
        return Err(ReadError::NotRegular);
    }
    // Sized once, as `fs::read` does: a buffer that grew would leave
    // copies of a secret's first bytes behind in freed memory.
    let room = metadata.len().min(limit) + 1;
    let mut bytes = Vec::with_capacity(usize::try_from(room).unwrap_or(0));
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        // It may be a secret: wiped, not just freed.
        zeroize::Zeroize::zeroize(&mut bytes);
        return Err(ReadError::TooLarge(limit));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_a_file_up_to_the_limit_and_refuses_one_byte_more() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[b'a'; 2048]).unwrap();
        assert_eq!(read(f.path(), 2048).unwrap().len(), 2048);
        let err = read(f.path(), 2047).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge(2047)), "{err:?}");
    }

    /// Found in review: the file was checked (`stat`) by its path, then
    /// opened by its path again, so one renamed over it in between — a
    /// Kubernetes `..data` swap, or anything else — was read unchecked: a
    /// FIFO put there blocked the read (start-up, or the reload poll)
    /// forever, and a larger file grew a buffer sized for the old one.
    /// Here a FIFO and a regular file take turns at the path while it is
    /// read: every read ends, within 10 s in all.
    #[test]
    fn a_fifo_renamed_over_the_file_while_it_is_read_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let (regular, fifo) = (dir.path().join("regular"), dir.path().join("fifo"));
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        std::fs::write(&regular, b"token").unwrap();
        std::fs::hard_link(&regular, &path).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (stop, path) = (stop.clone(), path.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Each a hard link renamed over the path: both stay.
                    for from in [&fifo, &regular] {
                        let tmp = path.with_extension("tmp");
                        let _ = std::fs::remove_file(&tmp);
                        std::fs::hard_link(from, &tmp).unwrap();
                        std::fs::rename(&tmp, &path).unwrap();
                    }
                }
            })
        };
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let path = path.clone();
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    let _ = read(&path, SECRET_LIMIT);
                }
                let _ = tx.send(());
            });
        }
        let finished = rx.recv_timeout(std::time::Duration::from_secs(10));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
        if finished.is_err() {
            // Let the blocked reader go (it waits for a writer) before failing.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join("fifo"));
            panic!("a read blocked on a FIFO renamed over the file");
        }
    }

    #[test]
    fn refuses_directories_and_devices_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read(dir.path(), SECRET_LIMIT),
            Err(ReadError::NotRegular)
        ));
        assert!(matches!(
            read(Path::new("/dev/zero"), SECRET_LIMIT),
            Err(ReadError::NotRegular)
        ));
        assert_eq!(
            read(Path::new("/dev/zero"), SECRET_LIMIT)
                .unwrap_err()
                .to_string(),
            "not a regular file"
        );
    }
}
