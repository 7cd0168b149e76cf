//! Opening files that may be hostile: a FIFO in place of a model file must not hang the open, a
//! device such as `/dev/zero` must not be read until memory runs out, and a symlink where sanctum
//! writes must not send the bytes elsewhere. Every read of a lockfile, policy, bundle, key or model
//! file goes through [`open_regular`] or [`read_bounded`]. (Placing a bundle without following
//! symlinks is `attestation::layout::Placement::write_bundle`.)

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;

/// Largest lockfile, bundle or signature read whole (a lock of ten thousand models is about 10 MB).
pub const MAX_DOCUMENT_BYTES: u64 = 16 << 20;

/// What a non-regular file is, for messages.
pub fn kind_of(file_type: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_socket() {
            return "a socket";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symlink"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file. The open does not block (a FIFO without a
/// writer would), and the type is checked on the opened handle, so a swap between a check and the
/// open changes nothing. Symlinks are followed; callers that refuse them check first.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path)?;
    let file_type = file.metadata()?.file_type();
    if !file_type.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file but {}", kind_of(file_type)),
        ));
    }
    Ok(file)
}

/// The whole of the regular file `path`, refused when it is over `max` bytes (checked while
/// reading too, should it grow).
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata()?.len();
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than the {max} bytes accepted"),
        )
    };
    if len > max {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_bounded_text(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("model.safetensors");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let e = open_regular(&fifo).unwrap_err();
        assert_eq!(e.to_string(), "not a regular file but a FIFO");
        assert!(
            read_bounded(dir.path(), 10)
                .unwrap_err()
                .to_string()
                .contains("a directory")
        );
    }

    #[test]
    fn devices_and_large_files_are_refused() {
        #[cfg(unix)]
        assert!(
            read_bounded(Path::new("/dev/zero"), 1 << 20)
                .unwrap_err()
                .to_string()
                .contains("a character device")
        );
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("models.lock");
        std::fs::write(&big, vec![b'#'; 11]).unwrap();
        assert!(
            read_bounded(&big, 10)
                .unwrap_err()
                .to_string()
                .contains("larger than")
        );
        assert_eq!(read_bounded(&big, 11).unwrap().len(), 11);
    }
}
