//! `sanctum quantize`: a verified chat model rewritten in one format, as a new model directory of
//! quantized Safetensors (docs/quantized-safetensors.md) with its other files as they are.
//!
//! An approver pins the new directory in the lock like any model (its entry records what it was
//! derived from), and loading it then needs no quantization: each matrix's blocks go to the
//! kernels as they are. The weights are chosen exactly as an in-situ load in that format chooses
//! them ([`crate::models::llama::plan`]: output head at 6 bits or more, llama.cpp's fallbacks), so
//! the derived model runs the same numbers as its source loaded with `--quant`. Each weight file
//! streams through the verified read one tensor at a time; the output appears by one rename of a
//! fully written, fsynced staging directory.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use attest::verify::{IntakeError, ModelFiles, VerifyError};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device};
use safetensors::Dtype;

use crate::import::gguf::{
    ImportError, ImportedFile, check_out_dir, hash_and_sync, io_err, publish, staging_dir,
    write_bytes,
};
use crate::kernels::Activations;
use crate::models::llama::{self, HeadTying};
use crate::models::{self, Family, LoadError};
use crate::quant::{Choice, Matrix, Quant};
use crate::staging;
use crate::weights::{
    Built, Plan, SafetensorsIntake, Stored, StoredTensor, TensorHeader, block_type_name,
    safetensors_header,
};

/// Why a model could not be quantized.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuantizeError {
    /// A file of the source did not verify, or could not be read as weights.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The source is not a model this can quantize.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The output directory could not be written.
    #[error(transparent)]
    Output(#[from] ImportError),
}

/// What [`quantize_model`] wrote.
#[derive(Debug)]
pub struct Quantized {
    /// The files written, sorted by path.
    pub files: Vec<ImportedFile>,
    /// The format chosen for each matrix.
    pub choices: Vec<Choice>,
}

/// Writes `model` with every matrix in `quant` into `out_dir` (which must not exist or be empty).
pub fn quantize_model(
    mut model: impl ModelFiles,
    quant: Quant,
    out_dir: &Path,
) -> Result<Quantized, QuantizeError> {
    check_out_dir(out_dir)?;
    let name = model.name().to_owned();
    if let Family::Bert = models::family(&model)? {
        return Err(LoadError::WrongTask {
            model: name,
            found: "BERT embedding",
            wanted: "only chat models are quantized (embedding models run in f32)",
        }
        .into());
    }
    let config: llama::Config = models::config::read(&model)?;
    let mut tying = HeadTying::new(&model, &config)?;

    let staging = staging_dir(out_dir, staging::QUANTIZE)?;
    let dir = staging.path();
    let mut files = Vec::new();
    for file in model.other_files() {
        if let Some(sub) = Path::new(&file.path).parent() {
            let sub = dir.join(sub);
            fs::create_dir_all(&sub).map_err(io_err(&sub))?;
        }
        files.push(write_bytes(dir, &file.path, &file.bytes)?);
    }
    let mut choices = Vec::new();
    for path in models::weight_files(&model)? {
        let out = dir.join(&path);
        let writer = RefCell::new(Writer::new(&out)?);
        let mut plan = |tensors: &[TensorHeader]| {
            let plans = tying.plan(tensors, quant, false, Activations::Int8);
            writer.borrow_mut().lay_out(tensors, &plans);
            plans
        };
        let mut sink =
            |header: &TensorHeader, built: Built| writer.borrow_mut().write(header, built);
        let mut intake = SafetensorsIntake::with_sink(&Device::Cpu, &mut plan, &mut sink);
        model.stream(&path, &mut intake)?;
        drop(intake);
        let writer = writer.into_inner();
        choices.extend(writer.choices.iter().cloned());
        writer.finish()?;
        files.push(hash_and_sync(dir, &path)?);
    }
    // Only now is every source file known to match its lock entry.
    model.finish()?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    publish(staging, out_dir)?;
    Ok(Quantized { files, choices })
}

/// One output Safetensors file, written as the tensors are built.
struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    /// The tensors written, in order (skipped ones left out); None until the header is known.
    layout: Option<Vec<StoredTensor>>,
    /// Writing the header failed (a plan callback has no error to return): said at the next write.
    header_error: Option<std::io::Error>,
    next: usize,
    choices: Vec<Choice>,
}

impl Writer {
    fn new(path: &Path) -> Result<Self, ImportError> {
        Ok(Self {
            path: path.to_owned(),
            out: BufWriter::new(File::create(path).map_err(io_err(path))?),
            layout: None,
            header_error: None,
            next: 0,
            choices: Vec::new(),
        })
    }

    /// Fixes the output's tensors from the plans (skipped ones are left out); the header is
    /// written with the first tensor.
    fn lay_out(&mut self, tensors: &[TensorHeader], plans: &[Plan]) {
        let written: Vec<StoredTensor> = tensors
            .iter()
            .zip(plans)
            .filter_map(|(t, plan)| {
                let stored = match plan {
                    Plan::Skip => return None,
                    Plan::Dense => Stored::Values(Dtype::F32),
                    Plan::Matrix(choice) => stored_form(choice.used, &t.shape),
                };
                Some(StoredTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    stored,
                })
            })
            .collect();
        self.header_error = self.out.write_all(&safetensors_header(&written)).err();
        self.layout = Some(written);
    }

    fn write(&mut self, header: &TensorHeader, built: Built) -> Result<(), IntakeError> {
        if let Some(e) = self.header_error.take() {
            return Err(format!("cannot write {}: {e}", self.path.display()).into());
        }
        let Some(layout) = &self.layout else {
            return Err(format!("tensor {:?} came before the header", header.name).into());
        };
        let Some(expected) = layout.get(self.next) else {
            return Err(format!("tensor {:?} was not laid out", header.name).into());
        };
        let (name, len) = (expected.name.clone(), expected.byte_len());
        if name != header.name {
            return Err(
                format!("tensor {:?} came where {name:?} was laid out", header.name).into(),
            );
        }
        let bytes = match built {
            Built::Dense(t) => f32_bytes(&t)?,
            Built::Matrix(m, choice) => {
                self.choices.push(choice);
                match m {
                    Matrix::Packed(p) => p.ggml_blocks(),
                    Matrix::Candle(QMatMul::QTensor(q)) => q.data()?.into_owned(),
                    Matrix::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => f32_bytes(&t)?,
                }
            }
        };
        if bytes.len() != len {
            return Err(format!(
                "tensor {name:?}: {} bytes built, {len} laid out",
                bytes.len()
            )
            .into());
        }
        self.out.write_all(&bytes)?;
        self.next += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<(), ImportError> {
        if let Some(e) = self.header_error.take() {
            return Err(io_err(&self.path)(e));
        }
        let complete = self
            .layout
            .as_ref()
            .is_some_and(|layout| layout.len() == self.next);
        self.out.flush().map_err(io_err(&self.path))?;
        if !complete {
            return Err(io_err(&self.path)(std::io::Error::other(
                "not every tensor was written",
            )));
        }
        Ok(())
    }
}

/// How a matrix in `quant` is stored: ggml blocks for the block formats, float formats as their
/// values.
fn stored_form(quant: Quant, shape: &[usize]) -> Stored {
    let ggml = quant.ggml();
    match (quant, shape) {
        (Quant::F32, _) => Stored::Values(Dtype::F32),
        (Quant::F16, _) => Stored::Values(Dtype::F16),
        (Quant::Bf16, _) => Stored::Values(Dtype::BF16),
        (_, [_, _]) if block_type_name(ggml).is_some() => Stored::Blocks(ggml),
        _ => Stored::Values(Dtype::F32),
    }
}

fn f32_bytes(t: &candle_core::Tensor) -> candle_core::Result<Vec<u8>> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}
