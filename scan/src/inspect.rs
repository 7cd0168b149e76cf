//! What one file is, by content: its format and what its header says (architecture, parameter count),
//! and for pickles every global they import. Reads headers only; weights are never decoded and a
//! pickle is never unpickled.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use attest::format::{self, ContentKind};
use attest::pickle::{self, Analysis, Verdict};
use serde::Serialize;

/// Bytes read to recognize a format: every magic sits in them, and a zip's central directory is
/// found from the end.
const SNIFF_LEN: usize = 64;

/// A model-file format, as the scan reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Safetensors (header validated).
    Safetensors,
    /// llama.cpp's GGUF.
    Gguf,
    /// llama.cpp's GGML/GGMF/GGJT predecessors of GGUF.
    Ggml,
    /// A raw Python pickle (`.bin`, `.pkl`, `.pt`, legacy `torch.save`).
    Pickle,
    /// `torch.save`'s zip layout: an `archive/data.pkl` pickle beside raw storages.
    PytorchZip,
    /// A NumPy `.npy` array.
    Numpy,
    /// A NumPy `.npz` archive (a zip of `.npy` members, which may hold pickled objects).
    NumpyZip,
    /// Keras 3's `.keras` zip (config and HDF5 weights).
    Keras,
    /// HDF5 (Keras/TensorFlow `.h5` weights).
    Hdf5,
    /// An ONNX model (protobuf `ModelProto`).
    Onnx,
    /// A TensorFlow SavedModel's `saved_model.pb`.
    TfSavedModel,
    /// A llamafile: an Actually Portable Executable carrying GGUF weights in its zip.
    Llamafile,
}

impl Format {
    /// Every format, for the names the policy's `formats.files` may use.
    pub const ALL: [Format; 12] = [
        Format::Safetensors,
        Format::Gguf,
        Format::Ggml,
        Format::Pickle,
        Format::PytorchZip,
        Format::Numpy,
        Format::NumpyZip,
        Format::Keras,
        Format::Hdf5,
        Format::Onnx,
        Format::TfSavedModel,
        Format::Llamafile,
    ];

    /// The name reports and the policy use (`pytorch-zip`), as serde writes it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Gguf => "gguf",
            Format::Ggml => "ggml",
            Format::Pickle => "pickle",
            Format::PytorchZip => "pytorch-zip",
            Format::Numpy => "numpy",
            Format::NumpyZip => "numpy-zip",
            Format::Keras => "keras",
            Format::Hdf5 => "hdf5",
            Format::Onnx => "onnx",
            Format::TfSavedModel => "tf-saved-model",
            Format::Llamafile => "llamafile",
        }
    }

    /// Whether loading a file of this format can run code from it.
    pub fn executes_on_load(self) -> bool {
        matches!(
            self,
            Format::Pickle | Format::PytorchZip | Format::NumpyZip | Format::Llamafile
        )
    }
}

/// What a model file's header says; everything optional, since headers differ by format.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Header {
    /// The architecture (GGUF `general.architecture`; for Safetensors the model directory's
    /// `config.json` `model_type`, filled in by the caller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// The model's own name where the header has one (GGUF `general.name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Parameters: the sum of the tensors' element counts (quantized blocks counted as the values
    /// they hold).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<u64>,
    /// Tensors the header lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors: Option<u64>,
    /// Pickles examined (one for a raw pickle, one per pickle member of a zip).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pickles: Vec<PickleMember>,
}

/// One pickle stream and what it imports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PickleMember {
    /// The zip member it is (`archive/data.pkl`), `None` for a raw pickle file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// The analysis: globals with verdicts, malformation.
    #[serde(flatten)]
    pub analysis: Analysis,
}

/// A recognized model file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inspection {
    /// Its format, by content.
    pub format: Format,
    /// What its header says.
    #[serde(flatten)]
    pub header: Header,
    /// Why the header could not be read fully (a truncated GGUF, a Safetensors file that fails
    /// validation); the format is still what the magic says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub malformed: Option<String>,
}

impl Inspection {
    /// The worst verdict of its pickles (`Safe` when it has none).
    pub fn pickle_verdict(&self) -> Verdict {
        self.header
            .pickles
            .iter()
            .map(|p| p.analysis.verdict())
            .max()
            .unwrap_or(Verdict::Safe)
    }
}

/// Recognizes and inspects the file at `path` by its content. `Ok(None)` for a file that is not a
/// model format (text, configs, tokenizers, ordinary binaries).
pub fn inspect(path: &Path) -> io::Result<Option<Inspection>> {
    let mut file = attest::files::open_regular(path)?;
    let len = file.metadata()?.len();
    let mut start = Vec::with_capacity(SNIFF_LEN);
    (&mut file).take(SNIFF_LEN as u64).read_to_end(&mut start)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    file.seek(SeekFrom::Start(0))?;

    let inspection = match format::sniff(&start) {
        // The sniff needs the whole header in hand; a Safetensors file's length prefix and `{` are
        // enough to say what it is, and the full check then reads the header.
        ContentKind::Other if safetensors_prefix(&start) => safetensors(file, len),
        ContentKind::Other => other(file, &start, &name, path),
        ContentKind::Safetensors => safetensors(file, len),
        ContentKind::Gguf => gguf(BufReader::new(file), len),
        ContentKind::Ggml => Some(plain(Format::Ggml)),
        ContentKind::Hdf5 => Some(plain(Format::Hdf5)),
        ContentKind::Numpy => Some(numpy(file)?),
        ContentKind::Pickle { .. } => Some(raw_pickle(file)?),
        ContentKind::Zip => zip(file, &name),
    };
    Ok(inspection)
}

fn plain(format: Format) -> Inspection {
    Inspection {
        format,
        header: Header::default(),
        malformed: None,
    }
}

fn safetensors_prefix(start: &[u8]) -> bool {
    start.get(8) == Some(&b'{')
        && start
            .get(..8)
            .and_then(|p| <[u8; 8]>::try_from(p).ok())
            .is_some_and(|p| (2..=100_000_000).contains(&u64::from_le_bytes(p)))
}

fn safetensors(file: File, len: u64) -> Option<Inspection> {
    let mut inspection = plain(Format::Safetensors);
    let mut start = Vec::new();
    let mut reader = BufReader::new(file);
    let need = format::start_len(&[], len).max(8);
    let read = (&mut reader)
        .take(need)
        .read_to_end(&mut start)
        .and_then(|_| {
            let need = format::start_len(&start, len);
            (&mut reader)
                .take(need.saturating_sub(start.len() as u64))
                .read_to_end(&mut start)
        });
    if let Err(e) = read {
        inspection.malformed = Some(format!("reading the header: {e}"));
        return Some(inspection);
    }
    match format::check_safetensors_start(&start, len) {
        Ok(info) => {
            inspection.header.tensors = Some(info.tensors as u64);
            inspection.header.parameters = safetensors_parameters(&start);
        }
        Err(e) => inspection.malformed = Some(e.to_string()),
    }
    Some(inspection)
}

/// The sum of element counts over a validated header, counting a tensor of ggml blocks as the
/// values they hold.
fn safetensors_parameters(start: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Tensor {
        shape: Vec<u64>,
    }
    let header_len = usize::try_from(u64::from_le_bytes(start.get(..8)?.try_into().ok()?)).ok()?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(start.get(8..8 + header_len)?).ok()?;
    let metadata = header.get("__metadata__");
    let mut total: u64 = 0;
    for (name, value) in &header {
        if name == "__metadata__" {
            continue;
        }
        let tensor: Tensor = serde_json::from_value(value.clone()).ok()?;
        let mut count = tensor
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))?;
        let ggml = metadata
            .and_then(|m| m.get(format!("sanctum.ggml_type.{name}")))
            .and_then(|t| t.as_str());
        if let Some((values, bytes)) = ggml.and_then(attest::gguf::block_shape) {
            count = count / bytes * values;
        }
        total = total.checked_add(count)?;
    }
    Some(total)
}

fn gguf(reader: BufReader<File>, len: u64) -> Option<Inspection> {
    let mut inspection = plain(Format::Gguf);
    match attest::gguf::read_header(reader, len) {
        Ok(header) => {
            inspection.header.architecture = header.architecture;
            inspection.header.name = header.name;
            inspection.header.tensors = Some(header.tensors.len() as u64);
            inspection.header.parameters = Some(
                header
                    .tensors
                    .iter()
                    .fold(0u64, |n, t| n.saturating_add(t.elements())),
            );
        }
        Err(e) => inspection.malformed = Some(e.to_string()),
    }
    Some(inspection)
}

fn raw_pickle(file: File) -> io::Result<Inspection> {
    let analysis = pickle::analyze(BufReader::new(file))?;
    let mut inspection = plain(Format::Pickle);
    inspection.header.pickles.push(PickleMember {
        member: None,
        analysis,
    });
    Ok(inspection)
}

/// A `.npy` array: an array of Python objects holds a pickle, which is judged like any other.
fn numpy(file: File) -> io::Result<Inspection> {
    let mut inspection = plain(Format::Numpy);
    if let Some(analysis) = pickle::analyze_npy(BufReader::new(file))? {
        inspection.header.pickles.push(PickleMember {
            member: None,
            analysis,
        });
    }
    Ok(inspection)
}

fn zip(file: File, name: &str) -> Option<Inspection> {
    let members = match pickle::analyze_zip(BufReader::new(file)) {
        Ok(members) => members,
        Err(e) => {
            let mut inspection = plain(Format::PytorchZip);
            inspection.malformed = Some(e.to_string());
            return (name.ends_with(".pt") || name.ends_with(".pth") || name.ends_with(".bin"))
                .then_some(inspection);
        }
    };
    let format = if members.iter().any(|(m, _)| m.ends_with("data.pkl")) {
        Format::PytorchZip
    } else if name.ends_with(".npz") {
        Format::NumpyZip
    } else if name.ends_with(".keras") {
        Format::Keras
    } else if members.is_empty() {
        // An ordinary zip (docs, a wheel): not a model.
        return None;
    } else {
        Format::PytorchZip
    };
    let mut inspection = plain(format);
    inspection.header.pickles = members
        .into_iter()
        .map(|(member, analysis)| PickleMember {
            member: Some(member),
            analysis,
        })
        .collect();
    Some(inspection)
}

/// Formats recognized by name and a structural check rather than a magic: ONNX, SavedModel, and
/// llamafiles (whose magic is an executable's).
fn other(file: File, start: &[u8], name: &str, path: &Path) -> Option<Inspection> {
    // ONNX's ModelProto opens with field 1 (ir_version, a varint): byte 0x08.
    if name.ends_with(".onnx") && start.first() == Some(&0x08) {
        return Some(plain(Format::Onnx));
    }
    if name == "saved_model.pb"
        && path
            .parent()
            .is_some_and(|dir| dir.join("variables").is_dir())
    {
        return Some(plain(Format::TfSavedModel));
    }
    // Actually Portable Executables open with `MZqFpD`; a llamafile is one whose zip holds a GGUF.
    if start.starts_with(b"MZqFpD") && (name.ends_with(".llamafile") || holds_gguf(file)) {
        return Some(plain(Format::Llamafile));
    }
    None
}

/// Whether a zip appended to an executable lists a `.gguf` member (llamafile's layout).
fn holds_gguf(file: File) -> bool {
    let Ok(mut archive) = zip_archive(file) else {
        return false;
    };
    (0..archive.len().min(10_000)).any(|i| {
        archive
            .by_index_raw(i)
            .is_ok_and(|m| m.name().to_ascii_lowercase().ends_with(".gguf"))
    })
}

fn zip_archive(file: File) -> zip::result::ZipResult<zip::ZipArchive<BufReader<File>>> {
    zip::ZipArchive::new(BufReader::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names_are_serde_names_and_the_policy_knows_them() {
        for format in Format::ALL {
            assert_eq!(serde_json::to_value(format).unwrap(), format.name());
        }
        let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
        assert_eq!(names, attest::policy::rules::FILE_FORMATS);
    }
}
