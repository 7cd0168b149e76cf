//! `sanctum import pickle`: turns a PyTorch checkpoint in `torch.save`'s zip layout (the default
//! since torch 1.6: `<archive>/data.pkl` and one `<archive>/data/<key>` member per storage) into
//! Safetensors, without running it: the pickle is read by `attest::pickle::state_dict`, which
//! accepts only torch's rebuild functions and storage types and refuses any other global by name.
//!
//! A model directory is converted file by file: each checkpoint (`pytorch_model.bin` becomes
//! `model.safetensors`, `X.bin`/`.pt`/`.pth` become `X.safetensors`), everything else (configs,
//! tokenizers) copied as it is. Safetensors is written by the `safetensors` crate, in its layout
//! (the one `save_file` writes), one tensor in memory at a time. As with the GGUF import, the output
//! appears at `out_dir` by one rename of a fully written, fsynced staging directory.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use attest::Sha256Digest;
use attest::format::{self, ContentKind};
use attest::pickle::state_dict::{self, Dtype, StateDict, TensorRef};
use safetensors::tensor::View;

use super::gguf::{
    ImportError, ImportedFile, MODEL_FILE, check_out_dir, hash_and_sync, io_err, publish,
    staging_dir,
};
use crate::staging;

/// Largest `data.pkl` read: the metadata of a 70B model's state dict is a few megabytes.
const MAX_PICKLE: u64 = 1 << 30;

/// Files a model directory may hold, at most.
const MAX_FILES: usize = 10_000;

/// One checkpoint converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedCheckpoint {
    /// Its path in the input, relative to the input directory (its file name for a file).
    pub input: String,
    /// Its sha256.
    pub input_sha256: Sha256Digest,
    /// The Safetensors file written from it.
    pub output: String,
    /// Tensors written.
    pub tensors: usize,
    /// State dict entries that were not tensors, left out.
    pub skipped: Vec<String>,
}

/// What [`import_pickle`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleImport {
    /// The files written, sorted by path.
    pub files: Vec<ImportedFile>,
    /// The checkpoints converted.
    pub checkpoints: Vec<ConvertedCheckpoint>,
    /// `config.json`'s `model_type`, when the directory has one.
    pub architecture: Option<String>,
}

/// Converts a torch zip checkpoint, or a model directory holding them, into `out_dir`.
pub fn import_pickle(input: &Path, out_dir: &Path) -> Result<PickleImport, ImportError> {
    check_out_dir(out_dir)?;
    let metadata = fs::symlink_metadata(input).map_err(io_err(input))?;
    let entries: Vec<(String, PathBuf)> = if metadata.is_dir() {
        directory_files(input)?
    } else {
        let name = input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        vec![(name, input.to_path_buf())]
    };
    let single = !metadata.is_dir();
    if let Some((name, path)) = entries
        .iter()
        .find(|(name, _)| name.ends_with(".bin.index.json"))
    {
        return Err(ImportError::Unsupported {
            path: path.clone(),
            problem: format!("{name}: sharded checkpoints are not converted yet"),
        });
    }

    let staging = staging_dir(out_dir, staging::IMPORT)?;
    let dir = staging.path();
    let mut files = Vec::new();
    let mut checkpoints = Vec::new();
    for (relative, path) in &entries {
        let kind = sniff(path)?;
        let is_checkpoint = kind == ContentKind::Zip || matches!(kind, ContentKind::Pickle { .. });
        if !is_checkpoint {
            if single {
                return Err(not_a_checkpoint(path, &kind));
            }
            if let Err(e) = format::check_model_file_start(relative, &head(path)?, file_len(path)?)
            {
                return Err(ImportError::Unsupported {
                    path: path.clone(),
                    problem: format!("not converted and not copied: {e}"),
                });
            }
            files.push(copy_file(path, dir, relative)?);
            continue;
        }
        let output = output_name(relative, single);
        if entries.iter().any(|(other, _)| *other == output) {
            return Err(ImportError::Unsupported {
                path: path.clone(),
                problem: format!(
                    "the directory already has {output}, which converting it would write"
                ),
            });
        }
        let converted = convert(path, relative, dir, &output)?;
        files.push(hash_and_sync(dir, &output)?);
        checkpoints.push(converted);
    }
    if checkpoints.is_empty() {
        return Err(ImportError::Unsupported {
            path: input.to_path_buf(),
            problem: "no PyTorch checkpoint (.bin, .pt, .pth, .ckpt in torch.save's zip layout) to convert".into(),
        });
    }
    let architecture =
        attest::files::read_bounded(&dir.join("config.json"), attest::files::MAX_DOCUMENT_BYTES)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|config| config.get("model_type")?.as_str().map(str::to_owned));
    files.sort_by(|a, b| a.path.cmp(&b.path));
    publish(staging, out_dir)?;
    Ok(PickleImport {
        files,
        checkpoints,
        architecture,
    })
}

/// Every regular file below `dir`, by relative `/` path, sorted; symlinks refused (never followed).
fn directory_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, ImportError> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        for entry in fs::read_dir(&at).map_err(io_err(&at))? {
            let entry = entry.map_err(io_err(&at))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(io_err(&path))?;
            if kind.is_symlink() {
                return Err(ImportError::Unsupported {
                    path,
                    problem: "a symlink in the model directory (copy the file it points to)".into(),
                });
            } else if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let relative = path
                    .strip_prefix(dir)
                    .map_err(|_| not_a_checkpoint(&path, &ContentKind::Other))?
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                found.push((relative, path));
            }
            if found.len() > MAX_FILES {
                return Err(ImportError::Unsupported {
                    path: dir.to_path_buf(),
                    problem: format!("more than {MAX_FILES} files"),
                });
            }
        }
    }
    found.sort();
    Ok(found)
}

fn head(path: &Path) -> Result<Vec<u8>, ImportError> {
    let len = file_len(path)?;
    let mut start = Vec::new();
    let file = attest::files::open_regular(path).map_err(io_err(path))?;
    let mut reader = BufReader::new(file);
    (&mut reader)
        .take(format::start_len(&[], len).max(8))
        .read_to_end(&mut start)
        .map_err(io_err(path))?;
    let need = format::start_len(&start, len);
    (&mut reader)
        .take(need.saturating_sub(start.len() as u64))
        .read_to_end(&mut start)
        .map_err(io_err(path))?;
    Ok(start)
}

fn file_len(path: &Path) -> Result<u64, ImportError> {
    Ok(fs::metadata(path).map_err(io_err(path))?.len())
}

fn sniff(path: &Path) -> Result<ContentKind, ImportError> {
    let mut start = Vec::new();
    attest::files::open_regular(path)
        .and_then(|f| f.take(64).read_to_end(&mut start))
        .map_err(io_err(path))?;
    Ok(format::sniff(&start))
}

fn not_a_checkpoint(path: &Path, kind: &ContentKind) -> ImportError {
    ImportError::Unsupported {
        path: path.to_path_buf(),
        problem: format!(
            "not a PyTorch checkpoint in torch.save's zip layout (its content is {kind:?})"
        ),
    }
}

/// `pytorch_model.bin` → `model.safetensors` (transformers' names); `X.bin|pt|pth|ckpt` →
/// `X.safetensors`; a single file given on its own → `model.safetensors`.
fn output_name(relative: &str, single: bool) -> String {
    if single {
        return MODEL_FILE.to_string();
    }
    let (dir, name) = match relative.rsplit_once('/') {
        Some((dir, name)) => (format!("{dir}/"), name),
        None => (String::new(), relative),
    };
    let stem = name.rsplit_once('.').map_or(name, |(stem, _)| stem);
    let stem = stem.strip_prefix("pytorch_").unwrap_or(stem);
    format!("{dir}{stem}.safetensors")
}

fn copy_file(path: &Path, dir: &Path, relative: &str) -> Result<ImportedFile, ImportError> {
    let target = dir.join(relative);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    fs::copy(path, &target).map_err(io_err(&target))?;
    hash_and_sync(dir, relative)
}

/// The pickle error as the import reports it, naming the file (and the member).
fn refused(path: &Path, member: &str, e: state_dict::StateDictError) -> ImportError {
    ImportError::Unsupported {
        path: path.to_path_buf(),
        problem: format!("{member}: {e}"),
    }
}

fn convert(
    path: &Path,
    relative: &str,
    dir: &Path,
    output: &str,
) -> Result<ConvertedCheckpoint, ImportError> {
    let (input_sha256, _) = attest::files::open_regular(path)
        .and_then(|f| Sha256Digest::of_reader(BufReader::new(f)))
        .map_err(io_err(path))?;
    let file = attest::files::open_regular(path).map_err(io_err(path))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        ImportError::Unsupported {
            path: path.to_path_buf(),
            problem: format!(
                "not torch.save's zip layout ({e}); checkpoints saved before torch 1.6 are not converted: load and save them again with a current torch"
            ),
        }
    })?;
    let pickles: Vec<String> = archive
        .file_names()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_owned)
        .collect();
    let [data_pkl] = pickles.as_slice() else {
        return Err(ImportError::Unsupported {
            path: path.to_path_buf(),
            problem: format!("expected one <archive>/data.pkl, found {}", pickles.len()),
        });
    };
    let prefix = data_pkl.trim_end_matches("data.pkl").to_string();
    let dict: StateDict = {
        let member = archive
            .by_name(data_pkl)
            .map_err(|e| zip_err(path, data_pkl, e))?;
        state_dict::read_state_dict(member.take(MAX_PICKLE))
            .map_err(|e| refused(path, data_pkl, e))?
    };

    // Check every tensor against its storage member before writing a byte.
    let mut views = Vec::with_capacity(dict.tensors.len());
    for tensor in &dict.tensors {
        let member = format!("{prefix}data/{}", tensor.storage);
        let size = archive
            .by_name(&member)
            .map_err(|e| zip_err(path, &member, e))?
            .size();
        let expected = tensor.storage_numel.checked_mul(tensor.dtype.size());
        if expected != Some(size) {
            return Err(ImportError::Tensor {
                path: path.to_path_buf(),
                tensor: tensor.name.clone(),
                problem: format!(
                    "storage {member} holds {size} bytes, its persistent id says {} elements of {} bytes",
                    tensor.storage_numel,
                    tensor.dtype.size()
                ),
            });
        }
        let last = last_element(tensor).ok_or_else(|| ImportError::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.name.clone(),
            problem: "its shape, strides and offset overflow".into(),
        })?;
        if last.is_some_and(|last| last >= tensor.storage_numel) {
            return Err(ImportError::Tensor {
                path: path.to_path_buf(),
                tensor: tensor.name.clone(),
                problem: format!(
                    "reaches past the {} elements of storage {}",
                    tensor.storage_numel, tensor.storage
                ),
            });
        }
        views.push(LazyTensor::new(tensor, member)?);
    }
    let source = Source {
        archive: RefCell::new(archive),
        failure: RefCell::new(None),
    };
    let bound: Vec<(String, Bound<'_>)> = dict
        .tensors
        .iter()
        .zip(views)
        .map(|(t, view)| {
            (
                t.name.clone(),
                Bound {
                    view,
                    source: &source,
                },
            )
        })
        .collect();
    let target = dir.join(output);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(bound, metadata, &target).map_err(|e| ImportError::Tensor {
        path: path.to_path_buf(),
        tensor: String::new(),
        problem: format!("writing {output}: {e}"),
    })?;
    if let Some(failure) = source.failure.into_inner() {
        return Err(failure);
    }
    Ok(ConvertedCheckpoint {
        input: relative.to_string(),
        input_sha256,
        output: output.to_string(),
        tensors: dict.tensors.len(),
        skipped: dict.skipped,
    })
}

fn zip_err(path: &Path, member: &str, e: zip::result::ZipError) -> ImportError {
    ImportError::Unsupported {
        path: path.to_path_buf(),
        problem: format!("{member}: {e}"),
    }
}

/// The index of the last element a tensor reads, `Some(None)` for an empty tensor, `None` on
/// overflow.
fn last_element(t: &TensorRef) -> Option<Option<u64>> {
    if t.shape.contains(&0) {
        return Some(None);
    }
    let mut last = t.offset;
    for (&dim, &stride) in t.shape.iter().zip(&t.stride) {
        last = last.checked_add((dim - 1).checked_mul(stride)?)?;
    }
    Some(Some(last))
}

/// A tensor whose bytes are read from its storage only when the writer asks for them.
struct LazyTensor {
    tensor: TensorRef,
    member: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    len: usize,
}

impl LazyTensor {
    fn new(tensor: &TensorRef, member: String) -> Result<Self, ImportError> {
        let overflow = || ImportError::Tensor {
            path: PathBuf::from(&member),
            tensor: tensor.name.clone(),
            problem: "too large for this machine".into(),
        };
        let shape = tensor
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| overflow()))
            .collect::<Result<Vec<_>, _>>()?;
        let len = shape
            .iter()
            .try_fold(tensor.dtype.size() as usize, |n, &d| n.checked_mul(d))
            .ok_or_else(overflow)?;
        Ok(Self {
            dtype: safetensors_dtype(tensor.dtype),
            tensor: tensor.clone(),
            member,
            shape,
            len,
        })
    }

    /// The tensor's bytes in row-major order, gathered from the storage through its strides.
    fn read(&self, archive: &mut zip::ZipArchive<BufReader<File>>) -> io::Result<Vec<u8>> {
        let mut storage = Vec::new();
        archive
            .by_name(&self.member)
            .map_err(io::Error::other)?
            .read_to_end(&mut storage)?;
        if storage.len() as u64 != self.tensor.storage_numel * self.tensor.dtype.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} bytes read, its zip entry says otherwise", storage.len()),
            ));
        }
        let size = self.tensor.dtype.size() as usize;
        let numel = self.len / size;
        let contiguous = {
            let mut expected = 1u64;
            self.tensor
                .shape
                .iter()
                .zip(&self.tensor.stride)
                .rev()
                .all(|(&dim, &stride)| {
                    let ok = dim == 1 || stride == expected;
                    expected *= dim;
                    ok
                })
        };
        let start = self.tensor.offset as usize * size;
        if contiguous {
            // In bounds: the element range was checked against the storage before writing began.
            return storage
                .get(start..start + self.len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "tensor past its storage")
                });
        }
        let mut out = Vec::with_capacity(self.len);
        let mut index = vec![0u64; self.shape.len()];
        for _ in 0..numel {
            let at = self.tensor.offset
                + index
                    .iter()
                    .zip(&self.tensor.stride)
                    .map(|(i, s)| i * s)
                    .sum::<u64>();
            let at = at as usize * size;
            let element = storage.get(at..at + size).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "tensor past its storage")
            })?;
            out.extend_from_slice(element);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < self.tensor.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok(out)
    }
}

fn safetensors_dtype(dtype: Dtype) -> safetensors::Dtype {
    match dtype {
        Dtype::F32 => safetensors::Dtype::F32,
        Dtype::F16 => safetensors::Dtype::F16,
        Dtype::BF16 => safetensors::Dtype::BF16,
        Dtype::F64 => safetensors::Dtype::F64,
        Dtype::I64 => safetensors::Dtype::I64,
        Dtype::I32 => safetensors::Dtype::I32,
        Dtype::I16 => safetensors::Dtype::I16,
        Dtype::I8 => safetensors::Dtype::I8,
        Dtype::U8 => safetensors::Dtype::U8,
        Dtype::Bool => safetensors::Dtype::BOOL,
    }
}

/// The open checkpoint the writer's views read from, and the first read that failed (the writer's
/// `View::data` cannot return an error: a failure is kept here and fails the import after).
struct Source {
    archive: RefCell<zip::ZipArchive<BufReader<File>>>,
    failure: RefCell<Option<ImportError>>,
}

struct Bound<'a> {
    view: LazyTensor,
    source: &'a Source,
}

impl View for Bound<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.view.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.view.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self.view.read(&mut self.source.archive.borrow_mut()) {
            Ok(bytes) => Cow::Owned(bytes),
            Err(e) => {
                let mut failure = self.source.failure.borrow_mut();
                failure.get_or_insert(ImportError::Io {
                    path: PathBuf::from(&self.view.member),
                    source: e,
                });
                // The same length, so the file stays well-formed until it is thrown away.
                Cow::Owned(vec![0; self.view.len])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.view.len
    }
}
