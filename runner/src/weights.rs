//! Weights built while their file streams in.
//!
//! [`SafetensorsIntake`] is the [`Intake`] a verified Safetensors stream is read into: it parses
//! the header, asks a plan for each tensor (skip it, keep it as f32, or make it a weight matrix in
//! a format), and converts each tensor as its bytes arrive, a group of rows at a time, straight
//! into its final form (packed for sanctum's kernels, a ggml block tensor for candle, or f32 on the
//! device). So a model's peak memory is its final weights plus one group of rows, never a copy of
//! the file. What it built is used only after the load that streamed it confirmed every digest
//! (see [`attest::verify::StreamedLoad`]).

use std::borrow::Cow;
use std::collections::HashMap;

use attest::verify::{Intake, IntakeError, ModelFiles};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::Metadata;

use crate::kernels::PackedBuilder;
use crate::models::{self, LoadError};
use crate::quant::{Choice, Matrix, Quant};

/// Raw bytes converted per step of a matrix: large enough to keep every core busy, small enough
/// to be noise beside the weights.
const GROUP_BYTES: usize = 4 << 20;

/// `__metadata__` key prefix naming a tensor's ggml block type (docs/quantized-safetensors.md):
/// `"sanctum.ggml_type.<tensor>": "q4_1"` for a `U8` tensor `[rows, row_bytes]` of raw blocks.
pub const GGML_TYPE_KEY: &str = "sanctum.ggml_type.";

/// The ggml block types a quantized Safetensors file may hold, by their names in it.
pub const BLOCK_TYPES: [(&str, GgmlDType); 11] = [
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q8_0", GgmlDType::Q8_0),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
    ("q8_k", GgmlDType::Q8K),
];

/// The name a block type is written under, or None for a type that is not a block format.
pub fn block_type_name(dtype: GgmlDType) -> Option<&'static str> {
    BLOCK_TYPES
        .iter()
        .find(|(_, t)| *t == dtype)
        .map(|(name, _)| *name)
}

/// Bytes of one row of `cols` values in ggml blocks of type `t`.
pub fn block_row_bytes(t: GgmlDType, cols: usize) -> usize {
    cols / t.block_size() * t.type_size()
}

/// How a tensor's values are written in a Safetensors file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// As values of this dtype.
    Values(safetensors::Dtype),
    /// As a matrix's raw ggml blocks of this type: `U8 [rows, row bytes]`.
    Blocks(GgmlDType),
}

/// One tensor of a Safetensors file being written.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    /// Its name.
    pub name: String,
    /// The shape of its values (`[rows, cols]` for blocks).
    pub shape: Vec<usize>,
    /// How they are written.
    pub stored: Stored,
}

impl StoredTensor {
    /// The dtype and shape its header entry declares.
    pub fn declared(&self) -> (safetensors::Dtype, Vec<usize>) {
        match self.stored {
            Stored::Values(dtype) => (dtype, self.shape.clone()),
            Stored::Blocks(t) => {
                let cols = self.shape.last().copied().unwrap_or(0);
                let rows = self.shape.iter().product::<usize>() / cols.max(1);
                (safetensors::Dtype::U8, vec![rows, block_row_bytes(t, cols)])
            }
        }
    }

    /// Bytes of its data.
    pub fn byte_len(&self) -> usize {
        let (dtype, shape) = self.declared();
        shape.iter().product::<usize>() * dtype.bitsize() / 8
    }
}

/// The header of a Safetensors file of these tensors, in this order: `__metadata__` with
/// `"format": "pt"` and one [`GGML_TYPE_KEY`] entry per block tensor, keys sorted so the bytes
/// never depend on hashing, the length prefix first and spaces up to a multiple of 8 bytes, as the
/// `safetensors` crate writes. The data follows in the same order, with no gaps.
pub fn safetensors_header(tensors: &[StoredTensor]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut metadata = serde_json::Map::new();
    metadata.insert("format".to_owned(), "pt".into());
    let mut offset = 0usize;
    for tensor in tensors {
        let (dtype, shape) = tensor.declared();
        let len = tensor.byte_len();
        header.insert(
            tensor.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
        if let Stored::Blocks(t) = tensor.stored
            && let Some(kind) = block_type_name(t)
        {
            metadata.insert(format!("{GGML_TYPE_KEY}{}", tensor.name), kind.into());
        }
    }
    header.insert("__metadata__".to_owned(), metadata.into());
    let mut json = serde_json::to_vec(&header).expect("serializing plain data to JSON cannot fail");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json);
    bytes
}

/// A tensor as the file's header declares it.
#[derive(Debug, Clone)]
pub struct TensorHeader {
    /// Name in the checkpoint.
    pub name: String,
    /// Element type (`U8` for ggml blocks).
    pub dtype: safetensors::Dtype,
    /// Shape of the values: for ggml blocks `[rows, cols]` of weights, not of bytes.
    pub shape: Vec<usize>,
    /// The ggml block type, for a quantized tensor.
    pub blocks: Option<GgmlDType>,
}

impl TensorHeader {
    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for what weights can be built from: f32, f16, bf16 values, or ggml blocks.
    pub fn is_loadable(&self) -> bool {
        self.blocks.is_some()
            || matches!(
                self.dtype,
                safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
            )
    }

    /// Bytes of one row of the stored tensor.
    fn row_bytes(&self) -> usize {
        let cols = self.shape.last().copied().unwrap_or(1);
        match self.blocks {
            Some(t) => block_row_bytes(t, cols),
            None => cols * (self.dtype.bitsize() / 8),
        }
    }
}

/// What to build from one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Not used by the model: its bytes are hashed and dropped.
    Skip,
    /// f32 on the device (norms, biases, a BERT's weights).
    Dense,
    /// A `[rows, cols]` weight matrix in the format the choice names.
    Matrix(Choice),
}

/// One built tensor.
#[derive(Debug)]
pub enum Built {
    /// f32 on the device.
    Dense(Tensor),
    /// A weight matrix, with the format chosen for it.
    Matrix(Matrix, Choice),
}

/// Receives each tensor as soon as it is built, in file order (instead of [`Weights`] keeping
/// it): what `sanctum quantize` writes out one tensor at a time.
pub type TensorSink<'a> = &'a mut dyn FnMut(&TensorHeader, Built) -> Result<(), IntakeError>;

/// The tensors built from a model's weight files, taken out by name as the model is assembled.
#[derive(Debug, Default)]
pub struct Weights {
    built: HashMap<String, Built>,
    /// Every tensor of the files, skipped ones too, as the headers declare them.
    headers: Vec<TensorHeader>,
    bytes: u64,
}

impl Weights {
    /// Streams every weight file of `model` through a [`SafetensorsIntake`]; `plan` sees each
    /// file's whole header. The caller completes verification ([`ModelFiles::finish`]) before
    /// using them.
    pub fn load(
        model: &mut impl ModelFiles,
        device: &Device,
        plan: &mut dyn FnMut(&[TensorHeader]) -> Vec<Plan>,
    ) -> Result<Self, LoadError> {
        let mut weights = Weights::default();
        for path in models::weight_files(model)? {
            let mut intake = SafetensorsIntake::new(device, plan);
            model.stream(&path, &mut intake)?;
            weights.absorb(intake.finish_into());
        }
        Ok(weights)
    }

    /// Builds the tensors of one in-memory Safetensors buffer (tests, and files already read).
    pub fn from_bytes(
        bytes: &[u8],
        device: &Device,
        plan: &mut dyn FnMut(&[TensorHeader]) -> Vec<Plan>,
    ) -> Result<Self, IntakeError> {
        let mut intake = SafetensorsIntake::new(device, plan);
        intake.take(bytes)?;
        let mut weights = Weights::default();
        weights.absorb(intake.finish_into());
        Ok(weights)
    }

    fn absorb(&mut self, other: Weights) {
        self.built.extend(other.built);
        self.headers.extend(other.headers);
        self.bytes += other.bytes;
    }

    /// Every tensor the files declared.
    pub fn headers(&self) -> &[TensorHeader] {
        &self.headers
    }

    /// Bytes the built tensors take in memory.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Takes the f32 tensor `name`.
    pub fn dense(&mut self, name: &str) -> candle_core::Result<Tensor> {
        match self.built.remove(name) {
            Some(Built::Dense(t)) => Ok(t),
            Some(Built::Matrix(..)) => candle_core::bail!("{name}: built as a matrix, not f32"),
            None => candle_core::bail!("cannot find tensor {name}"),
        }
    }

    /// Takes the weight matrix `name`, with the format chosen for it.
    pub fn matrix(&mut self, name: &str) -> candle_core::Result<(Matrix, Choice)> {
        match self.built.remove(name) {
            Some(Built::Matrix(m, c)) => Ok((m, c)),
            Some(Built::Dense(_)) => candle_core::bail!("{name}: built as f32, not as a matrix"),
            None => candle_core::bail!("cannot find tensor {name}"),
        }
    }

    /// Every f32 tensor left, by name (a BERT takes them all at once).
    pub fn into_dense(self) -> HashMap<String, Tensor> {
        self.built
            .into_iter()
            .filter_map(|(name, built)| match built {
                Built::Dense(t) => Some((name, t)),
                Built::Matrix(..) => None,
            })
            .collect()
    }
}

/// Where the intake is in the file.
enum Stage {
    /// Gathering the length prefix and the header.
    Header(Vec<u8>),
    /// In the data section: tensors in offset order, the current one, and its unconverted bytes.
    Data {
        queue: std::vec::IntoIter<(TensorHeader, usize, Plan)>,
        current: Option<Box<Builder>>,
        pending: Vec<u8>,
    },
}

/// Turns a Safetensors byte stream into built tensors as it arrives.
pub struct SafetensorsIntake<'a> {
    device: Device,
    plan: &'a mut dyn FnMut(&[TensorHeader]) -> Vec<Plan>,
    stage: Stage,
    weights: Weights,
    sink: Option<TensorSink<'a>>,
}

impl<'a> SafetensorsIntake<'a> {
    /// An intake that builds tensors on `device` as `plan` says.
    pub fn new(device: &Device, plan: &'a mut dyn FnMut(&[TensorHeader]) -> Vec<Plan>) -> Self {
        Self {
            device: device.clone(),
            plan,
            stage: Stage::Header(Vec::new()),
            weights: Weights::default(),
            sink: None,
        }
    }

    /// An intake that hands each built tensor to `sink` rather than keeping it.
    pub fn with_sink(
        device: &Device,
        plan: &'a mut dyn FnMut(&[TensorHeader]) -> Vec<Plan>,
        sink: TensorSink<'a>,
    ) -> Self {
        Self {
            sink: Some(sink),
            ..Self::new(device, plan)
        }
    }

    fn finish_into(self) -> Weights {
        self.weights
    }

    /// Parses the header once it is complete; returns the data bytes that came with it.
    fn start_data(&mut self, gathered: &[u8]) -> Result<Option<Vec<u8>>, IntakeError> {
        let Some(len) = gathered.get(..8) else {
            return Ok(None);
        };
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(len);
        let header_len = usize::try_from(u64::from_le_bytes(prefix))
            .ok()
            .filter(|&n| n as u64 <= attest::format::MAX_HEADER_SIZE)
            .ok_or("header length is out of range")?;
        let Some(header) = gathered.get(8..8 + header_len) else {
            return Ok(None);
        };
        let header = std::str::from_utf8(header)?;
        let metadata: Metadata = serde_json::from_str(header)?;
        let block_types = block_types(&metadata)?;
        let mut tensors: Vec<(TensorHeader, usize, usize)> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let header = match block_types.get(name.as_str()) {
                    Some(&t) => block_header(name, info.dtype, &info.shape, t)?,
                    None => TensorHeader {
                        name,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        blocks: None,
                    },
                };
                let (begin, end) = info.data_offsets;
                Ok((header, begin, end - begin))
            })
            .collect::<Result<_, IntakeError>>()?;
        tensors.sort_by_key(|(_, begin, _)| *begin);
        let headers: Vec<TensorHeader> = tensors.iter().map(|(h, _, _)| h.clone()).collect();
        let plans = (self.plan)(&headers);
        if plans.len() != headers.len() {
            return Err(
                "the loader planned a different number of tensors than the file has".into(),
            );
        }
        let queue: Vec<_> = tensors
            .into_iter()
            .zip(plans)
            .map(|((header, _, len), plan)| (header, len, plan))
            .collect();
        self.weights.headers = headers;
        self.stage = Stage::Data {
            queue: queue.into_iter(),
            current: None,
            pending: Vec::new(),
        };
        Ok(Some(gathered[8 + header_len..].to_vec()))
    }

    /// Feeds data-section bytes to the tensors in turn.
    fn feed(&mut self, mut chunk: &[u8]) -> Result<(), IntakeError> {
        let Stage::Data {
            queue,
            current,
            pending,
        } = &mut self.stage
        else {
            return Err("data before the header".into());
        };
        loop {
            if current.is_none() {
                match queue.next() {
                    Some((header, len, plan)) => {
                        *current = Some(Box::new(Builder::new(header, len, plan, &self.device)?));
                    }
                    None if chunk.is_empty() => return Ok(()),
                    None => return Err("bytes after the last tensor".into()),
                }
            }
            let Some(builder) = current.as_mut() else {
                continue;
            };
            let used = builder.take(chunk, pending)?;
            chunk = &chunk[used..];
            if builder.remaining == 0 {
                if let Some((header, built)) = current
                    .take()
                    .map(|done| done.finish(&self.device))
                    .transpose()?
                    .flatten()
                {
                    match &mut self.sink {
                        Some(sink) => sink(&header, built)?,
                        None => {
                            self.weights.bytes += built_bytes(&built);
                            self.weights.built.insert(header.name, built);
                        }
                    }
                }
                continue;
            }
            if chunk.is_empty() {
                return Ok(());
            }
        }
    }
}

impl Intake for SafetensorsIntake<'_> {
    fn take(&mut self, chunk: &[u8]) -> Result<(), IntakeError> {
        if let Stage::Header(gathered) = &mut self.stage {
            gathered.extend_from_slice(chunk);
            let gathered = std::mem::take(gathered);
            match self.start_data(&gathered)? {
                Some(rest) => return self.feed(&rest),
                None => {
                    self.stage = Stage::Header(gathered);
                    return Ok(());
                }
            }
        }
        self.feed(chunk)
    }
}

fn built_bytes(built: &Built) -> u64 {
    match built {
        Built::Dense(t) => (t.elem_count() * 4) as u64,
        Built::Matrix(m, _) => m.bytes(),
    }
}

/// The block type of every tensor the metadata names one for.
fn block_types(metadata: &Metadata) -> Result<HashMap<String, GgmlDType>, IntakeError> {
    let mut types = HashMap::new();
    for (key, value) in metadata.metadata().iter().flatten() {
        let Some(tensor) = key.strip_prefix(GGML_TYPE_KEY) else {
            continue;
        };
        let Some(&(_, t)) = BLOCK_TYPES.iter().find(|(name, _)| name == value) else {
            let known: Vec<&str> = BLOCK_TYPES.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "__metadata__ {key:?} names block type {value:?}; known types: {}",
                known.join(", ")
            )
            .into());
        };
        if metadata.info(tensor).is_none() {
            return Err(
                format!("__metadata__ {key:?} names a tensor the file does not have").into(),
            );
        }
        types.insert(tensor.to_owned(), t);
    }
    Ok(types)
}

/// The header of a tensor of raw ggml blocks: `U8 [rows, row_bytes]`, whole blocks per row.
fn block_header(
    name: String,
    dtype: safetensors::Dtype,
    shape: &[usize],
    blocks: GgmlDType,
) -> Result<TensorHeader, IntakeError> {
    let kind = block_type_name(blocks).unwrap_or("?");
    let malformed = |problem: String| -> IntakeError {
        format!("tensor {name:?} ({kind} blocks): malformed block layout: {problem}").into()
    };
    if dtype != safetensors::Dtype::U8 {
        return Err(malformed(format!("dtype is {dtype:?}, not U8")));
    }
    let &[rows, row_bytes] = shape else {
        return Err(malformed(format!(
            "shape {shape:?} is not [rows, bytes per row]"
        )));
    };
    let size = blocks.type_size();
    if row_bytes == 0 || !row_bytes.is_multiple_of(size) {
        return Err(malformed(format!(
            "rows of {row_bytes} bytes are not a whole number of {size}-byte blocks"
        )));
    }
    Ok(TensorHeader {
        name,
        dtype,
        shape: vec![rows, row_bytes / size * blocks.block_size()],
        blocks: Some(blocks),
    })
}

/// Where one tensor's converted rows go.
enum Target {
    Skip,
    Dense(Vec<f32>),
    Packed(PackedBuilder),
    /// ggml blocks for candle, filled group by group.
    Blocks {
        quant: Quant,
        raw: AlignedBytes,
    },
}

/// One tensor being built from its bytes.
struct Builder {
    header: TensorHeader,
    choice: Option<Choice>,
    /// Bytes of the tensor still to come.
    remaining: usize,
    /// Bytes per converted unit (an element, or a group of whole rows).
    unit: usize,
    element: usize,
    target: Target,
    rows_buf: Vec<f32>,
}

impl Builder {
    fn new(
        header: TensorHeader,
        len: usize,
        plan: Plan,
        device: &Device,
    ) -> Result<Self, IntakeError> {
        // Blocks convert a row at a time at least; values an element at a time.
        let element = match header.blocks {
            Some(_) => header.row_bytes().max(1),
            None => (header.dtype.bitsize() / 8).max(1),
        };
        let name = &header.name;
        if plan != Plan::Skip && !header.is_loadable() {
            return Err(format!(
                "tensor {name:?} is {:?}, not a float type sanctum can load",
                header.dtype
            )
            .into());
        }
        let (target, unit, choice) = match plan {
            Plan::Skip => (Target::Skip, 1, None),
            Plan::Dense => (
                Target::Dense(Vec::with_capacity(header.elements())),
                element,
                None,
            ),
            Plan::Matrix(choice) => {
                let &[rows, cols] = header.shape.as_slice() else {
                    return Err(format!(
                        "tensor {name:?} has shape {:?}, not a matrix",
                        header.shape
                    )
                    .into());
                };
                let row_bytes = header.row_bytes().max(1);
                let unit = row_bytes * (GROUP_BYTES / row_bytes).max(1);
                let quant = choice.used;
                let target = match quant.packed_format() {
                    Some(format) if device.is_cpu() => Target::Packed(
                        PackedBuilder::new(format, rows, cols)?
                            .with_activations(choice.activations),
                    ),
                    _ if quant == Quant::F32 => Target::Dense(Vec::with_capacity(rows * cols)),
                    _ => {
                        let size = rows * block_row_bytes(quant.ggml(), cols);
                        Target::Blocks {
                            quant,
                            raw: AlignedBytes::with_capacity(size),
                        }
                    }
                };
                (target, unit, Some(choice))
            }
        };
        Ok(Self {
            header,
            choice,
            remaining: len,
            unit,
            element,
            target,
            rows_buf: Vec::new(),
        })
    }

    /// Takes what it needs of `chunk` (returns how much), converting every whole unit gathered.
    fn take(&mut self, chunk: &[u8], pending: &mut Vec<u8>) -> Result<usize, IntakeError> {
        let used = chunk.len().min(self.remaining);
        self.remaining -= used;
        let bytes = &chunk[..used];
        if let Target::Skip = self.target {
            return Ok(used);
        }
        // Every whole unit, or everything at the tensor's end.
        let (last, unit) = (self.remaining == 0, self.unit);
        let whole = |len: usize| if last { len } else { len / unit * unit };
        // Straight from the chunk when nothing is pending; else through `pending`.
        if pending.is_empty() {
            let ready = whole(bytes.len());
            self.convert(&bytes[..ready])?;
            pending.extend_from_slice(&bytes[ready..]);
        } else {
            pending.extend_from_slice(bytes);
            let ready = whole(pending.len());
            if ready > 0 {
                let rest = pending.split_off(ready);
                let ready = std::mem::replace(pending, rest);
                self.convert(&ready)?;
            }
        }
        Ok(used)
    }

    /// Converts whole elements (whole rows for matrices) into the target.
    fn convert(&mut self, bytes: &[u8]) -> Result<(), IntakeError> {
        if bytes.is_empty() {
            return Ok(());
        }
        if !bytes.len().is_multiple_of(self.element) {
            return Err(format!("tensor {:?} ends inside an element", self.header.name).into());
        }
        if let Some(stored) = self.header.blocks {
            // Blocks already in the format asked for go in as they are; others are expanded.
            let unchanged = self
                .choice
                .as_ref()
                .is_some_and(|c| c.used.ggml() == stored);
            match &mut self.target {
                Target::Blocks { raw, .. } if unchanged => {
                    raw.extend(bytes);
                    return Ok(());
                }
                Target::Packed(builder) if unchanged => {
                    builder.push_ggml_rows(bytes)?;
                    return Ok(());
                }
                _ => {}
            }
            self.rows_buf.clear();
            let cols = self.header.shape.last().copied().unwrap_or(1);
            // Rows dequantize independently: split them over the pool.
            let row_bytes = self.element;
            let per_task = (bytes.len() / row_bytes)
                .div_ceil(rayon::current_num_threads())
                .max(1);
            let parts = bytes
                .par_chunks(per_task * row_bytes)
                .map(|rows| {
                    let mut values = Vec::new();
                    dequantize(stored, rows, cols, &mut values).map(|()| values)
                })
                .collect::<Result<Vec<_>, IntakeError>>()?;
            for part in parts {
                self.rows_buf.extend_from_slice(&part);
            }
        } else {
            self.rows_buf.clear();
            to_f32(self.header.dtype, bytes, &mut self.rows_buf);
        }
        // Quantizing would turn a NaN into a zero (and an infinity into a saturated block), so a
        // broken tensor is refused here, where its values pass by, instead of running silently.
        if self.rows_buf.iter().any(|v| !v.is_finite()) {
            return Err(
                format!("tensor {:?} holds NaN or infinite values", self.header.name).into(),
            );
        }
        match &mut self.target {
            Target::Skip => {}
            Target::Dense(values) => values.extend_from_slice(&self.rows_buf),
            Target::Packed(builder) => builder.push_rows(&self.rows_buf)?,
            Target::Blocks { quant, raw } => {
                let cols = self.header.shape.get(1).copied().unwrap_or(1).max(1);
                let rows = self.rows_buf.len() / cols;
                let group = Tensor::from_slice(&self.rows_buf, (rows, cols), &Device::Cpu)?;
                let q = QTensor::quantize(&group, quant.ggml())?;
                raw.extend(&q.data()?[..]);
            }
        }
        Ok(())
    }

    /// The built tensor; None for a skipped one.
    fn finish(self, device: &Device) -> Result<Option<(TensorHeader, Built)>, IntakeError> {
        let shape = self.header.shape.clone();
        let name = &self.header.name;
        let built = match (self.target, self.choice) {
            (Target::Dense(values), choice) => {
                let dense = Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?;
                match choice {
                    None => Built::Dense(dense),
                    Some(choice) => Built::Matrix(Matrix::Candle(QMatMul::Tensor(dense)), choice),
                }
            }
            (Target::Packed(builder), Some(choice)) => Built::Matrix(
                Matrix::Packed(std::sync::Arc::new(builder.finish()?)),
                choice,
            ),
            (Target::Blocks { quant, raw }, Some(choice)) => {
                let storage =
                    QStorage::from_data(Cow::Borrowed(raw.bytes()), device, quant.ggml())?;
                let q = QTensor::new(storage, shape)?;
                // Not `QMatMul::from_qtensor`: it would expand f16/bf16 back to f32.
                let matrix = Matrix::Candle(QMatMul::QTensor(std::sync::Arc::new(q)));
                Built::Matrix(matrix, choice)
            }
            (Target::Skip, _) => return Ok(None),
            (_, None) => return Err(format!("tensor {name:?} has no format chosen").into()),
        };
        Ok(Some((self.header, built)))
    }
}

/// Bytes kept 8-byte aligned, as candle's block types need when it reads them in place.
struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    fn with_capacity(bytes: usize) -> Self {
        Self {
            words: Vec::with_capacity(bytes.div_ceil(8)),
            len: 0,
        }
    }

    fn extend(&mut self, bytes: &[u8]) {
        let len = self.len + bytes.len();
        self.words.resize(len.div_ceil(8), 0);
        bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[self.len..len].copy_from_slice(bytes);
        self.len = len;
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }
}

/// Appends whole rows of `stored` blocks (rows of `cols` values) to `out` as f32, exactly as
/// ggml dequantizes them.
fn dequantize(
    stored: GgmlDType,
    bytes: &[u8],
    cols: usize,
    out: &mut Vec<f32>,
) -> Result<(), IntakeError> {
    let rows = bytes.len() / block_row_bytes(stored, cols).max(1);
    let mut aligned = AlignedBytes::with_capacity(bytes.len());
    aligned.extend(bytes);
    let storage = QStorage::from_data(Cow::Borrowed(aligned.bytes()), &Device::Cpu, stored)?;
    let values = QTensor::new(storage, (rows, cols))?
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    out.extend_from_slice(&values);
    Ok(())
}

/// Appends `bytes` (little-endian `dtype` values, a float type) to `out` as f32.
fn to_f32(dtype: safetensors::Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        safetensors::Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        safetensors::Dtype::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        _ => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::kernels::PackedMatrix;
    use crate::quant::ALL;

    const ROWS: usize = 48;
    const COLS: usize = 256;

    fn values(n: usize, state: u64) -> Vec<f32> {
        crate::testing::values(n, state, 1.0)
    }

    /// One `[ROWS, COLS]` matrix in `dtype`, an f16 vector, and an i64 buffer, as Safetensors.
    fn file(dtype: safetensors::Dtype) -> (Vec<u8>, Vec<f32>) {
        let w = values(ROWS * COLS, 1);
        let bytes: Vec<u8> = match dtype {
            safetensors::Dtype::BF16 => w
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            safetensors::Dtype::F16 => w
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        // What the matrix holds once read, for references.
        let mut read = Vec::new();
        to_f32(dtype, &bytes, &mut read);
        let norm: Vec<u8> = [0.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let ids: Vec<u8> = (0i64..4).flat_map(|v| v.to_le_bytes()).collect();
        let view = |dtype, shape: Vec<usize>, data| {
            safetensors::tensor::TensorView::new(dtype, shape, data).expect("view")
        };
        let tensors = [
            ("ids", view(safetensors::Dtype::I64, vec![4], &ids)),
            ("norm", view(safetensors::Dtype::F16, vec![3], &norm)),
            ("w", view(dtype, vec![ROWS, COLS], &bytes)),
        ];
        (
            safetensors::serialize(tensors, None).expect("serializes"),
            read,
        )
    }

    fn plan_for(quant: Quant) -> impl FnMut(&[TensorHeader]) -> Vec<Plan> {
        move |tensors: &[TensorHeader]| {
            tensors
                .iter()
                .map(|t| match t.name.as_str() {
                    "w" => Plan::Matrix(crate::quant::choose(
                        "w",
                        quant,
                        crate::quant::Role::Layer,
                        COLS,
                    )),
                    "norm" => Plan::Dense,
                    _ => Plan::Skip,
                })
                .collect()
        }
    }

    /// Feeds `bytes` in chunks of `chunk` bytes, as a streamed read does.
    fn built(bytes: &[u8], quant: Quant, chunk: usize) -> Weights {
        let mut plan = plan_for(quant);
        let mut intake = SafetensorsIntake::new(&Device::Cpu, &mut plan);
        for piece in bytes.chunks(chunk) {
            intake.take(piece).expect("takes");
        }
        intake.finish_into()
    }

    fn product(m: &Matrix) -> Vec<f32> {
        let x = Tensor::from_vec(values(3 * COLS, 2), (1, 3, COLS), &Device::Cpu).expect("x");
        m.forward(&x)
            .and_then(|y| y.flatten_all())
            .and_then(|y| y.to_vec1())
            .expect("multiplies")
    }

    /// The matrix built from a stream is the one quantizing the whole tensor at once gives, bit
    /// for bit, however the stream is cut, from every float dtype, in every format.
    #[test]
    fn streamed_matrices_equal_whole_tensor_quantization_for_any_chunking() {
        for dtype in [
            safetensors::Dtype::F32,
            safetensors::Dtype::F16,
            safetensors::Dtype::BF16,
        ] {
            let (bytes, read) = file(dtype);
            for quant in ALL {
                let whole = Tensor::from_vec(read.clone(), (ROWS, COLS), &Device::Cpu).expect("w");
                let reference = match quant.packed_format() {
                    Some(format) => {
                        let packed =
                            PackedMatrix::quantize(format, &read, ROWS, COLS).expect("packs");
                        product(&Matrix::Packed(std::sync::Arc::new(packed)))
                    }
                    None if quant == Quant::F32 => product(&Matrix::Candle(QMatMul::Tensor(whole))),
                    None => {
                        let q = QTensor::quantize(&whole, quant.ggml()).expect("quantizes");
                        product(&Matrix::Candle(QMatMul::QTensor(std::sync::Arc::new(q))))
                    }
                };
                for chunk in [1, 7, 4099, bytes.len()] {
                    let mut weights = built(&bytes, quant, chunk);
                    let skipped = weights
                        .dense("ids")
                        .expect_err("integer buffers are skipped");
                    // (candle appends a backtrace when RUST_BACKTRACE is set)
                    assert!(skipped.to_string().starts_with("cannot find tensor ids"));
                    let norm = weights.dense("norm").expect("norm");
                    assert_eq!(norm.to_vec1::<f32>().expect("f32"), [0.5, -2.0, 3.25]);
                    let (m, choice) = weights.matrix("w").expect("matrix");
                    assert_eq!(choice.used, quant);
                    assert_eq!(
                        product(&m),
                        reference,
                        "{dtype:?} {quant} in chunks of {chunk}"
                    );
                }
            }
        }
    }

    /// Memory is what the formats cost, and the in-memory size is reported.
    #[test]
    fn built_sizes_are_the_formats_sizes() {
        let (bytes, _) = file(safetensors::Dtype::BF16);
        for (quant, per_block) in [(Quant::Q8_0, 34), (Quant::Q4_0, 18)] {
            let weights = built(&bytes, quant, 1 << 20);
            let expected = (ROWS * COLS / 32 * per_block + 3 * 4) as u64;
            assert_eq!(weights.bytes(), expected, "{quant}");
        }
        // q4_K on sanctum's kernels: ggml's 144 bytes per 256 values, plus 4 for its 6-bit block
        // scales and minimums kept as bytes.
        let weights = built(&bytes, Quant::Q4K, 1 << 20);
        let q4k = GgmlDType::Q4K;
        let expected = ROWS * COLS / q4k.block_size() * (q4k.type_size() + 4) + 3 * 4;
        assert_eq!(weights.bytes(), expected as u64);
    }

    #[test]
    fn unusable_tensors_are_refused_by_name() {
        let (bytes, _) = file(safetensors::Dtype::F32);
        let mut plan = |t: &[TensorHeader]| vec![Plan::Dense; t.len()];
        let err = Weights::from_bytes(&bytes, &Device::Cpu, &mut plan).expect_err("i64");
        assert_eq!(
            err.to_string(),
            "tensor \"ids\" is I64, not a float type sanctum can load"
        );
        let mut plan = |t: &[TensorHeader]| {
            t.iter()
                .map(|t| match t.name.as_str() {
                    "norm" => Plan::Matrix(crate::quant::choose(
                        "norm",
                        Quant::Q8_0,
                        crate::quant::Role::Layer,
                        3,
                    )),
                    _ => Plan::Skip,
                })
                .collect()
        };
        let err = Weights::from_bytes(&bytes, &Device::Cpu, &mut plan).expect_err("vector");
        assert!(
            err.to_string()
                .contains("\"norm\" has shape [3], not a matrix"),
            "{err}"
        );
    }

    /// A file holding `w` as raw blocks of `stored` (quantized from the test values by candle),
    /// and those blocks dequantized, which is what the weights are.
    fn block_file(stored: GgmlDType) -> (Vec<u8>, Vec<f32>) {
        let w = Tensor::from_vec(values(ROWS * COLS, 3), (ROWS, COLS), &Device::Cpu).expect("w");
        let q = QTensor::quantize(&w, stored).expect("quantizes");
        let raw = q.data().expect("data").into_owned();
        let exact: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("dequantizes");
        let name = block_type_name(stored).expect("a block type");
        let row_bytes = raw.len() / ROWS;
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::U8,
            vec![ROWS, row_bytes],
            &raw,
        )
        .expect("view");
        let metadata = HashMap::from([(format!("{GGML_TYPE_KEY}w"), name.to_owned())]);
        let bytes = safetensors::serialize([("w", view)], Some(metadata)).expect("serializes");
        (bytes, exact)
    }

    /// Stored blocks in the format asked for go in unchanged; into any other format they are
    /// dequantized exactly as ggml does and quantized from those values.
    #[test]
    fn stored_blocks_pass_through_or_are_requantized_from_their_exact_values() {
        for stored in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let (bytes, exact) = block_file(stored);
            for quant in ALL {
                let mut weights = built(&bytes, quant, 5003);
                let (m, _) = weights.matrix("w").expect("matrix");
                let reference = if quant.ggml() == stored {
                    match &m {
                        Matrix::Packed(p) => {
                            // Unchanged blocks: every row dequantizes to ggml's values.
                            let mut row = vec![0f32; COLS];
                            for r in 0..ROWS {
                                p.dequantize_row(r, &mut row);
                                assert_eq!(row, exact[r * COLS..(r + 1) * COLS], "{quant} row {r}");
                            }
                            continue;
                        }
                        _ => {
                            // The very blocks the file holds (candle quantizes the same values
                            // to the same blocks).
                            let w = Tensor::from_vec(
                                values(ROWS * COLS, 3),
                                (ROWS, COLS),
                                &Device::Cpu,
                            )
                            .expect("w");
                            let q = QTensor::quantize(&w, stored).expect("quantizes");
                            product(&Matrix::Candle(QMatMul::QTensor(std::sync::Arc::new(q))))
                        }
                    }
                } else {
                    let (whole_bytes, _) = {
                        let b: Vec<u8> = exact.iter().flat_map(|v| v.to_le_bytes()).collect();
                        let view = safetensors::tensor::TensorView::new(
                            safetensors::Dtype::F32,
                            vec![ROWS, COLS],
                            &b,
                        )
                        .expect("view");
                        (
                            safetensors::serialize([("w", view)], None).expect("serializes"),
                            (),
                        )
                    };
                    let mut from_values = built(&whole_bytes, quant, 1 << 20);
                    product(&from_values.matrix("w").expect("matrix").0)
                };
                assert_eq!(product(&m), reference, "{stored:?} stored, {quant} asked");
            }
            // As f32 (a BERT, a norm) the blocks are their exact values.
            let mut dense = |t: &[TensorHeader]| vec![Plan::Dense; t.len()];
            let mut weights = Weights::from_bytes(&bytes, &Device::Cpu, &mut dense).expect("dense");
            let w = weights.dense("w").expect("w");
            assert_eq!(w.dims(), [ROWS, COLS]);
            assert_eq!(
                w.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("f32"),
                exact
            );
        }
    }

    #[test]
    fn malformed_block_layouts_are_refused_naming_the_tensor() {
        let raw = vec![0u8; 4 * 34];
        let file = |dtype, shape: Vec<usize>, kind: &str, key: &str| {
            let view = safetensors::tensor::TensorView::new(dtype, shape, &raw).expect("view");
            let metadata = HashMap::from([(format!("{GGML_TYPE_KEY}{key}"), kind.to_owned())]);
            safetensors::serialize([("w", view)], Some(metadata)).expect("serializes")
        };
        let mut dense = |t: &[TensorHeader]| vec![Plan::Dense; t.len()];
        for (bytes, message) in [
            (
                file(safetensors::Dtype::U8, vec![4, 34], "q9_9", "w"),
                "names block type \"q9_9\"",
            ),
            (
                file(safetensors::Dtype::U8, vec![4, 34], "q8_0", "x"),
                "names a tensor the file does not have",
            ),
            (
                file(safetensors::Dtype::U8, vec![2, 68], "q4_0", "w"),
                "tensor \"w\" (q4_0 blocks): malformed block layout: rows of 68 bytes are not a whole number of 18-byte blocks",
            ),
            (
                file(safetensors::Dtype::U8, vec![136], "q8_0", "w"),
                "malformed block layout: shape [136] is not [rows, bytes per row]",
            ),
            (
                file(safetensors::Dtype::I16, vec![4, 17], "q8_0", "w"),
                "malformed block layout: dtype is I16, not U8",
            ),
        ] {
            let err = Weights::from_bytes(&bytes, &Device::Cpu, &mut dense).expect_err(message);
            assert!(err.to_string().contains(message), "{err}");
        }
    }
}
