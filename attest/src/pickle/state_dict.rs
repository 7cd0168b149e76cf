//! A restricted unpickler for PyTorch state dicts: it builds values from the opcode stream, but the
//! only globals it accepts are torch's tensor rebuild functions, its storage types,
//! `collections.OrderedDict` and `_codecs.encode`, and it calls none of them: a rebuild becomes a
//! [`TensorRef`] describing where the tensor's bytes lie. Any other global is refused by name, before
//! anything else happens. Values are shared (`Rc`), so `GET` and `DUP` cost nothing however large
//! what they copy.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Read;
use std::rc::Rc;

use super::{Arg, OpError, Ops};

/// Deepest stack accepted.
const MAX_STACK: usize = 1 << 20;

/// Most opcodes in one state dict pickle (`data.pkl` of a 70B model has a few hundred thousand).
const MAX_OPS: u64 = 1 << 26;

/// The element types of torch's storages, by the storage class that names them.
const STORAGES: &[(&str, Dtype)] = &[
    ("FloatStorage", Dtype::F32),
    ("HalfStorage", Dtype::F16),
    ("BFloat16Storage", Dtype::BF16),
    ("DoubleStorage", Dtype::F64),
    ("LongStorage", Dtype::I64),
    ("IntStorage", Dtype::I32),
    ("ShortStorage", Dtype::I16),
    ("CharStorage", Dtype::I8),
    ("ByteStorage", Dtype::U8),
    ("BoolStorage", Dtype::Bool),
];

/// A storage's element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// float32
    F32,
    /// float16
    F16,
    /// bfloat16
    BF16,
    /// float64
    F64,
    /// int64
    I64,
    /// int32
    I32,
    /// int16
    I16,
    /// int8
    I8,
    /// uint8
    U8,
    /// bool
    Bool,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
}

/// A tensor of the state dict: where its elements lie in which storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// Its key in the state dict.
    pub name: String,
    /// The storage's key (`archive/data/<key>` in a torch zip).
    pub storage: String,
    /// Its elements' type.
    pub dtype: Dtype,
    /// Elements the storage holds, as its persistent id declares.
    pub storage_numel: u64,
    /// The tensor's first element, in elements from the storage's start.
    pub offset: u64,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Its strides, in elements.
    pub stride: Vec<u64>,
}

/// What a state dict pickle holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDict {
    /// The tensors, in the pickle's order.
    pub tensors: Vec<TensorRef>,
    /// Keys whose values are not tensors (an epoch counter, a config), left out.
    pub skipped: Vec<String>,
}

/// Why a pickle is not a state dict this reader accepts.
#[derive(Debug, thiserror::Error)]
pub enum StateDictError {
    /// The opcode stream itself is broken, or reading failed.
    #[error(transparent)]
    Ops(#[from] OpError),
    /// It imports a global that is not a torch rebuild function, storage type or `OrderedDict`.
    #[error(
        "at byte {offset}: refused global {global}: only torch's tensor rebuild functions, storage types and collections.OrderedDict are allowed"
    )]
    Refused {
        /// `module.name`.
        global: String,
        /// Where.
        offset: u64,
    },
    /// Well-formed pickle, but not what a state dict is made of.
    #[error("at byte {offset}: {reason}")]
    Unexpected {
        /// Where.
        offset: u64,
        /// What.
        reason: String,
    },
}

#[derive(Debug)]
enum Value {
    Mark,
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Seq(RefCell<Vec<Rc<Value>>>),
    Dict(RefCell<Vec<(Rc<Value>, Rc<Value>)>>),
    Global(Allowed),
    Storage {
        key: String,
        dtype: Dtype,
        numel: u64,
    },
    Tensor(Box<TensorRef>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Allowed {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    Storage(Dtype),
    CodecsEncode,
}

fn allowed(module: &str, name: &str) -> Option<Allowed> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Allowed::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Allowed::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Allowed::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Allowed::RebuildParameterWithState,
        ("_codecs", "encode") => Allowed::CodecsEncode,
        ("torch", storage) => Allowed::Storage(STORAGES.iter().find(|(n, _)| *n == storage)?.1),
        _ => return None,
    })
}

/// Reads a state dict pickle (a torch zip's `data.pkl`): a dict, or one nested under `state_dict`
/// or `model`, of names to tensors.
pub fn read_state_dict(reader: impl Read) -> Result<StateDict, StateDictError> {
    let mut ops = Ops::new(reader);
    let mut stack: Vec<Rc<Value>> = Vec::new();
    let mut memo: BTreeMap<i64, Rc<Value>> = BTreeMap::new();
    let mut containers = Containers::default();
    let mut count = 0u64;
    let result = loop {
        let Some(op) = ops.next_op()? else {
            return Err(StateDictError::Unexpected {
                offset: ops.offset(),
                reason: "the stream ends before STOP".into(),
            });
        };
        count += 1;
        let offset = op.offset;
        let unexpected = |reason: String| StateDictError::Unexpected { offset, reason };
        if count > MAX_OPS || stack.len() > MAX_STACK {
            return Err(unexpected(
                "more opcodes or a deeper stack than any state dict has".into(),
            ));
        }
        let pop = |stack: &mut Vec<Rc<Value>>| {
            stack
                .pop()
                .ok_or_else(|| unexpected(format!("{} pops an empty stack", op.name)))
        };
        let pop_mark = |stack: &mut Vec<Rc<Value>>| {
            let at = stack
                .iter()
                .rposition(|v| matches!(**v, Value::Mark))
                .ok_or_else(|| unexpected(format!("{} without a MARK", op.name)))?;
            let mut items = stack.split_off(at);
            items.remove(0);
            Ok::<_, StateDictError>(items)
        };
        let mut value = |v: Value| containers.track(Rc::new(v));
        match op.name {
            "PROTO" | "FRAME" => {}
            "STOP" => break pop(&mut stack)?,
            "MARK" => stack.push(value(Value::Mark)),
            "POP" => {
                pop(&mut stack)?;
            }
            "POP_MARK" => {
                pop_mark(&mut stack)?;
            }
            "DUP" => {
                let top = stack
                    .last()
                    .cloned()
                    .ok_or_else(|| unexpected("DUP of an empty stack".into()))?;
                stack.push(top);
            }
            "NONE" => stack.push(value(Value::None)),
            "NEWTRUE" | "NEWFALSE" => stack.push(value(Value::Bool)),
            "INT" | "BININT" | "BININT1" | "BININT2" | "LONG" | "LONG1" | "LONG4" => match op.arg {
                Arg::Int(n) => stack.push(value(Value::Int(n))),
                _ => {
                    return Err(unexpected(format!(
                        "{} too large for a size or offset",
                        op.name
                    )));
                }
            },
            "FLOAT" | "BINFLOAT" => stack.push(value(Value::Float)),
            "STRING" | "BINSTRING" | "SHORT_BINSTRING" | "UNICODE" | "BINUNICODE"
            | "SHORT_BINUNICODE" | "BINUNICODE8" => match op.arg {
                Arg::Str(s) => stack.push(value(Value::Str(s))),
                _ => stack.push(value(Value::Bytes)),
            },
            "BINBYTES" | "SHORT_BINBYTES" | "BINBYTES8" | "BYTEARRAY8" => {
                stack.push(value(Value::Bytes))
            }
            "EMPTY_TUPLE" | "EMPTY_LIST" | "EMPTY_SET" => {
                stack.push(value(Value::Seq(RefCell::default())))
            }
            "EMPTY_DICT" => stack.push(value(Value::Dict(RefCell::default()))),
            "TUPLE" | "LIST" | "FROZENSET" => {
                let items = pop_mark(&mut stack)?;
                stack.push(value(Value::Seq(RefCell::new(items))));
            }
            "TUPLE1" | "TUPLE2" | "TUPLE3" => {
                let n = usize::from(op.code - 0x84);
                if stack.len() < n {
                    return Err(unexpected(format!(
                        "{} with {} values on the stack",
                        op.name,
                        stack.len()
                    )));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(value(Value::Seq(RefCell::new(items))));
            }
            "DICT" => {
                let items = pop_mark(&mut stack)?;
                let pairs = pairs(items)
                    .ok_or_else(|| unexpected("DICT of an odd number of values".into()))?;
                stack.push(value(Value::Dict(RefCell::new(pairs))));
            }
            "APPEND" | "APPENDS" | "ADDITEMS" => {
                let items = if op.name == "APPEND" {
                    vec![pop(&mut stack)?]
                } else {
                    pop_mark(&mut stack)?
                };
                match stack.last().map(|v| &**v) {
                    Some(Value::Seq(seq)) => seq.borrow_mut().extend(items),
                    _ => {
                        return Err(unexpected(format!(
                            "{} to something that is not a list",
                            op.name
                        )));
                    }
                }
            }
            "SETITEM" | "SETITEMS" => {
                let items = if op.name == "SETITEM" {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![(k, v)]
                } else {
                    pairs(pop_mark(&mut stack)?)
                        .ok_or_else(|| unexpected("SETITEMS of an odd number of values".into()))?
                };
                match stack.last().map(|v| &**v) {
                    Some(Value::Dict(dict)) => dict.borrow_mut().extend(items),
                    _ => {
                        return Err(unexpected(format!(
                            "{} to something that is not a dict",
                            op.name
                        )));
                    }
                }
            }
            "GLOBAL" | "STACK_GLOBAL" => {
                let (module, name) = match (&op.arg, op.name) {
                    (Arg::Global(m, n), _) => (m.clone(), n.clone()),
                    (_, _) => {
                        let name = pop(&mut stack)?;
                        let module = pop(&mut stack)?;
                        match (&*module, &*name) {
                            (Value::Str(m), Value::Str(n)) => (m.clone(), n.clone()),
                            _ => {
                                return Err(unexpected(
                                    "STACK_GLOBAL of values that are not strings".into(),
                                ));
                            }
                        }
                    }
                };
                match allowed(&module, &name) {
                    Some(global) => stack.push(value(Value::Global(global))),
                    None => {
                        return Err(StateDictError::Refused {
                            global: format!("{module}.{name}"),
                            offset,
                        });
                    }
                }
            }
            "BINPERSID" => {
                let pid = pop(&mut stack)?;
                stack.push(value(storage(&pid).ok_or_else(|| {
                    unexpected("a persistent id that is not ('storage', <torch storage type>, key, location, numel)".into())
                })?));
            }
            "REDUCE" => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                let Value::Global(global) = *callable else {
                    return Err(unexpected(
                        "REDUCE of something that is not an allowed global".into(),
                    ));
                };
                let Value::Seq(args) = &*args else {
                    return Err(unexpected("REDUCE arguments that are not a tuple".into()));
                };
                let built = reduce(global, &args.borrow()).ok_or_else(|| {
                    unexpected(format!("{global:?} called with arguments it does not take"))
                })?;
                stack.push(value(built));
            }
            "BUILD" => {
                // An OrderedDict's `_metadata` (per-module versions) or a parameter's state: dropped.
                pop(&mut stack)?;
                match stack.last().map(|v| &**v) {
                    Some(Value::Dict(_) | Value::Tensor(_)) => {}
                    _ => {
                        return Err(unexpected(
                            "BUILD of something that is not a dict or tensor".into(),
                        ));
                    }
                }
            }
            "PUT" | "BINPUT" | "LONG_BINPUT" | "MEMOIZE" => {
                let index = match op.arg {
                    Arg::Int(n) => n,
                    _ => memo.len() as i64,
                };
                let top = stack
                    .last()
                    .cloned()
                    .ok_or_else(|| unexpected("memoizes an empty stack".into()))?;
                memo.insert(index, top);
            }
            "GET" | "BINGET" | "LONG_BINGET" => {
                let Arg::Int(index) = op.arg else {
                    return Err(unexpected("GET without an index".into()));
                };
                let found = memo
                    .get(&index)
                    .cloned()
                    .ok_or_else(|| unexpected(format!("memo entry {index} was never put")))?;
                stack.push(found);
            }
            other => {
                return Err(unexpected(format!("{other} has no place in a state dict")));
            }
        }
    };
    state_dict(&result, false).ok_or_else(|| StateDictError::Unexpected {
        offset: ops.offset(),
        reason: "the pickle is not a dict of tensors (nor one under \"state_dict\" or \"model\")"
            .into(),
    })
}

/// Every list and dict a pickle built, emptied when the read ends, however it ends: a pickle can
/// put a container inside itself (APPEND of its own memo entry), and such an `Rc` cycle would
/// never be freed.
#[derive(Default)]
struct Containers(Vec<Rc<Value>>);

impl Containers {
    fn track(&mut self, value: Rc<Value>) -> Rc<Value> {
        if matches!(*value, Value::Seq(_) | Value::Dict(_)) {
            self.0.push(Rc::clone(&value));
        }
        value
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for value in &self.0 {
            match &**value {
                Value::Seq(items) => items.borrow_mut().clear(),
                Value::Dict(pairs) => pairs.borrow_mut().clear(),
                _ => {}
            }
        }
    }
}

fn pairs(items: Vec<Rc<Value>>) -> Option<Vec<(Rc<Value>, Rc<Value>)>> {
    if !items.len().is_multiple_of(2) {
        return None;
    }
    let mut items = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (items.next(), items.next()) {
        out.push((k, v));
    }
    Some(out)
}

/// `('storage', torch.<T>Storage, key, location, numel)`.
fn storage(pid: &Value) -> Option<Value> {
    let Value::Seq(items) = pid else { return None };
    let items = items.borrow();
    match items.iter().map(|v| &**v).collect::<Vec<_>>().as_slice() {
        [
            Value::Str(kind),
            Value::Global(Allowed::Storage(dtype)),
            Value::Str(key),
            Value::Str(_),
            Value::Int(numel),
        ] if kind == "storage" => Some(Value::Storage {
            key: key.clone(),
            dtype: *dtype,
            numel: u64::try_from(*numel).ok()?,
        }),
        _ => None,
    }
}

fn ints(value: &Value) -> Option<Vec<u64>> {
    let Value::Seq(items) = value else {
        return None;
    };
    items
        .borrow()
        .iter()
        .map(|v| match **v {
            Value::Int(n) => u64::try_from(n).ok(),
            _ => None,
        })
        .collect()
}

fn reduce(global: Allowed, args: &[Rc<Value>]) -> Option<Value> {
    match global {
        Allowed::OrderedDict => args.is_empty().then(|| Value::Dict(RefCell::default())),
        // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        Allowed::RebuildTensorV2 => {
            let (Value::Storage { key, dtype, numel }, Value::Int(offset)) =
                (&*args.first()?.clone(), &**args.get(1)?)
            else {
                return None;
            };
            let shape = ints(args.get(2)?)?;
            let stride = ints(args.get(3)?)?;
            (shape.len() == stride.len() && (6..=7).contains(&args.len())).then(|| {
                Value::Tensor(Box::new(TensorRef {
                    name: String::new(),
                    storage: key.clone(),
                    dtype: *dtype,
                    storage_numel: *numel,
                    offset: u64::try_from(*offset).unwrap_or(u64::MAX),
                    shape,
                    stride,
                }))
            })
        }
        // (tensor, requires_grad, backward_hooks[, state])
        Allowed::RebuildParameter | Allowed::RebuildParameterWithState => match &**args.first()? {
            Value::Tensor(t) => Some(Value::Tensor(t.clone())),
            _ => None,
        },
        Allowed::CodecsEncode => matches!(&**args.first()?, Value::Str(_)).then_some(Value::Bytes),
        Allowed::Storage(_) => None,
    }
}

/// The tensors of a dict, or of the dict under its `state_dict` or `model` key (one level: a
/// dict that contains itself is not followed around).
fn state_dict(value: &Value, nested: bool) -> Option<StateDict> {
    let Value::Dict(entries) = value else {
        return None;
    };
    let entries = entries.borrow();
    let mut dict = StateDict::default();
    for (key, value) in entries.iter() {
        let Value::Str(name) = &**key else {
            return None;
        };
        match &**value {
            Value::Tensor(t) => dict.tensors.push(TensorRef {
                name: name.clone(),
                ..(**t).clone()
            }),
            inner @ Value::Dict(_)
                if !nested
                    && dict.tensors.is_empty()
                    && (name == "state_dict" || name == "model") =>
            {
                if let Some(found) = state_dict(inner, true) {
                    return Some(found);
                }
                dict.skipped.push(name.clone());
            }
            _ => dict.skipped.push(name.clone()),
        }
    }
    (!dict.tensors.is_empty()).then_some(dict)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `pickle` fuzz target (LeakSanitizer): PROTO 2, EMPTY_LIST, BINPUT 0,
    /// BINGET 0, APPEND, STOP puts a list inside itself.
    const SELF_CONTAINING_LIST: &[u8] = b"\x80\x02]q\x00h\x00a.";

    #[test]
    fn a_list_inside_itself_is_refused_and_freed() {
        assert!(matches!(
            read_state_dict(SELF_CONTAINING_LIST),
            Err(StateDictError::Unexpected { .. })
        ));
        // The same cycle by hand: the tracker's drop breaks it, so its last reference frees it.
        let list = Rc::new(Value::Seq(RefCell::default()));
        let mut containers = Containers::default();
        let tracked = containers.track(Rc::clone(&list));
        if let Value::Seq(items) = &*list {
            items.borrow_mut().push(tracked);
        }
        let freed = Rc::downgrade(&list);
        drop(list);
        assert!(freed.upgrade().is_some(), "the cycle holds it");
        drop(containers);
        assert!(freed.upgrade().is_none(), "a cycle was left behind");
    }
}
