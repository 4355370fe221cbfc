//! The block files: checked before the receiver listens, created as soon as the block list is
//! known, written and renamed into place only once the migration completed.
//!
//! Every file is created under a random name with `O_CREAT | O_EXCL` (by `tempfile`), mode 0600:
//! a name planted in the output directory, a symbolic link included, is never opened, let alone
//! followed. The final name is given by `rename(2)`, which replaces whatever is at the final path (a
//! link itself, not its target). A temporary file left by a failure, a signal or a stop is removed.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use multifd_core::lifecycle::AllJoined;
use multifd_core::recv::RecvError;
use tempfile::NamedTempFile;

use super::{BlockReport, Control, Failure, Place, block_file_name};
use crate::mem::AnonMemory;

/// Bytes written between two looks at the stop flag.
const CHUNK: usize = 64 << 20;

fn output_failure(path: &Path, doing: &'static str) -> impl FnOnce(io::Error) -> Failure {
    let place = Place::Output(path.to_path_buf());
    move |error| Failure::Io { place, doing, error }
}

/// Creates the output directory if needed and checks that files can be created in it.
pub(super) fn prepare_out(out: &Path) -> Result<(), Failure> {
    fs::create_dir_all(out).map_err(output_failure(out, "creating"))?;
    let probe = tempfile::Builder::new().prefix(".multifd-probe-").tempfile_in(out);
    probe.map(drop).map_err(output_failure(out, "creating a file in"))
}

/// One temporary file per block, with the path it is renamed to.
pub(super) struct BlockFiles {
    files: Vec<(NamedTempFile, PathBuf)>,
}

impl BlockFiles {
    /// Creates a temporary file beside each block's final path; refuses a final path that is a
    /// directory (the rename at the end would fail).
    pub(super) fn create(out: &Path, blocks: &[BlockReport]) -> Result<Self, Failure> {
        let mut files = Vec::with_capacity(blocks.len());
        for b in blocks {
            if fs::symlink_metadata(&b.file).is_ok_and(|m| m.is_dir()) {
                let e = io::Error::new(io::ErrorKind::IsADirectory, "a directory is in the way");
                return Err(output_failure(&b.file, "checking")(e));
            }
            let prefix = format!(".{}.", block_file_name(b.name.as_bytes()));
            let tmp = tempfile::Builder::new().prefix(&prefix).suffix(".part").tempfile_in(out);
            files.push((tmp.map_err(output_failure(out, "creating a block file in"))?, b.file.clone()));
        }
        Ok(Self { files })
    }

    /// Writes each block's bytes to its file, then renames every file into place. On failure, or
    /// when `control` is stopped meanwhile, nothing is renamed and every temporary file is removed.
    pub(super) fn write(
        self,
        mem: &[AnonMemory],
        token: &AllJoined<'_>,
        blocks: &[BlockReport],
        control: &Control,
    ) -> Result<(), Failure> {
        let mut files = self.files;
        for ((tmp, _), (m, b)) in files.iter_mut().zip(mem.iter().zip(blocks)) {
            let bytes = m.bytes(token).map_err(|e| Failure::Recv(RecvError::ForeignToken(e)))?;
            let size = usize::try_from(b.size).unwrap_or(usize::MAX).min(bytes.len());
            for chunk in bytes[..size].chunks(CHUNK) {
                if let Some(signal) = control.stopped() {
                    return Err(Failure::Interrupted { signal });
                }
                tmp.write_all(chunk).map_err(output_failure(tmp.path(), "writing"))?;
            }
        }
        if let Some(signal) = control.stopped() {
            return Err(Failure::Interrupted { signal });
        }
        for (tmp, path) in files.drain(..) {
            tmp.persist(&path).map_err(|e| output_failure(&path, "renaming into place")(e.error))?;
        }
        Ok(())
    }
}
