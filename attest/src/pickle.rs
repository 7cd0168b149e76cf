//! Python pickles read without executing anything: an opcode reader for protocols 0–5 ([`Ops`]),
//! and on top of it [`analyze`], which follows just enough of the stack and memo to name every
//! global a pickle imports (`GLOBAL`, `INST`, `STACK_GLOBAL`, `EXT1/2/4`) with a verdict like
//! picklescan's and modelscan's. Loading a pickle runs whatever its globals name; reading its
//! opcodes runs nothing.
//!
//! Memory stays bounded whatever the input: long payloads and lines are skipped rather than kept,
//! and the stack, the memo and the list of globals are capped. A stream that breaks a rule is
//! reported as [`Analysis::malformed`], a cap reached as [`Analysis::incomplete`], never a panic.
//!
//! The walk is at least as thorough as picklescan's and modelscan's, so that sanctum flags
//! everything they flag: it goes on past a broken stack (they only read opcodes), reads every
//! pickle of a file (as `pickletools.genops` does, one after another), and judges `STACK_GLOBAL`
//! the way they do where their reading and the stack's disagree.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Seek};

use serde::Serialize;

/// Strings and bytes longer than this are skipped, not kept ([`Arg::Skipped`]).
pub const MAX_KEPT: u64 = 64 * 1024;

/// Longest text line (protocol 0 arguments, `GLOBAL`'s module and name) kept; longer ones are
/// read past ([`Arg::Skipped`]).
const MAX_LINE: usize = 64 * 1024;

/// Strings kept on the simulated stack and memo: module and attribute names are short.
const MAX_NAME: usize = 256;

/// Deepest simulated stack (values and marks): real pickles batch their items by the thousand and
/// nest as deep as Python's recursion limit allows.
const MAX_STACK: usize = 1 << 16;

/// Most memo entries followed.
const MAX_MEMO: usize = 1 << 18;

/// Most bytes of strings kept in the memo (module names are memoized when first used, early).
const MAX_MEMO_TEXT: usize = 8 << 20;

/// Most distinct globals listed per stream, for each of dangerous and not dangerous ones, so
/// that dangerous globals are listed however many others come first.
const MAX_GLOBALS: usize = 10_000;

/// Zip members looked at in one archive.
const MAX_ZIP_MEMBERS: usize = 100_000;

/// Longest `.npy` header read (NumPy writes a few hundred bytes).
const MAX_NPY_HEADER: u64 = 64 * 1024;

/// How safe importing a global is, from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Data only: what picklescan allows (`collections.OrderedDict`, torch's rebuild functions and
    /// storage types, NumPy's array reconstruction).
    Safe,
    /// Neither known safe nor known dangerous.
    Unknown,
    /// Runs code, reads or writes files, or opens connections when loaded.
    Dangerous,
}

/// Which names of a module a table entry covers. The two tools compare names differently, and a
/// name either of them flags must be flagged here.
#[derive(Debug, Clone, Copy)]
enum Names {
    /// Every name, in the module and in its submodules (picklescan's `"*"`).
    All,
    /// These names exactly (picklescan's sets).
    Exact(&'static [&'static str]),
    /// Names that contain one of these (modelscan's lists, compared as `filter in name`: so
    /// `builtins.execfile` is `exec`).
    Containing(&'static [&'static str]),
    /// Names that are part of this one (picklescan's entries written as a bare string, compared as
    /// `name in filter`: so `functools.part` is `partial`).
    Within(&'static str),
}

impl Names {
    fn cover(self, name: &str) -> bool {
        match self {
            Names::All => true,
            Names::Exact(names) => names.contains(&name),
            Names::Containing(parts) => parts.iter().any(|part| name.contains(part)),
            Names::Within(whole) => whole.contains(name),
        }
    }
}

/// The builtins both tools flag (modelscan's list; picklescan's is the same less `__import__`).
const DANGEROUS_BUILTINS: Names = Names::Containing(&[
    "eval",
    "compile",
    "getattr",
    "apply",
    "exec",
    "open",
    "breakpoint",
    "__import__",
]);

/// `operator`'s getters, which reach any attribute (picklescan's set).
const GETTERS: Names = Names::Exact(&["attrgetter", "itemgetter", "methodcaller"]);

/// Globals that run code when a pickle is loaded: the union of picklescan 1.0.5's
/// `_unsafe_globals` (`src/picklescan/scanner.py`) and modelscan 0.8.8's `unsafe_globals`, every
/// severity (`modelscan/settings.py`), each kept with its own way of comparing names, and a few
/// of sanctum's own at the end.
const DANGEROUS: &[(&str, Names)] = &[
    // Protocols 0-2 name builtins by their Python 2 module.
    ("__builtin__", DANGEROUS_BUILTINS),
    ("builtins", DANGEROUS_BUILTINS),
    (
        "cloudpickle.cloudpickle",
        Names::Exact(&[
            "_builtin_type",
            "_make_function",
            "_function_setstate",
            "_make_cell",
            "_make_empty_cell",
            "subimport",
        ]),
    ),
    ("types", Names::Exact(&["CodeType"])),
    ("aiohttp", Names::All),
    ("asyncio", Names::All),
    ("bdb", Names::All),
    ("commands", Names::All),
    ("ctypes", Names::All),
    ("functools", Names::Within("partial")),
    ("httplib", Names::All),
    ("logging", Names::Exact(&["FileHandler"])),
    ("_io", Names::Exact(&["FileIO"])),
    ("numpy.f2py", Names::All),
    ("numpy.testing._private.utils", Names::All),
    ("nt", Names::All),
    ("posix", Names::All),
    ("_operator", GETTERS),
    ("operator", GETTERS),
    ("os", Names::All),
    ("requests.api", Names::All),
    ("runpy", Names::All),
    ("shutil", Names::All),
    ("socket", Names::All),
    ("ssl", Names::All),
    ("subprocess", Names::All),
    ("sys", Names::All),
    ("code", Names::Exact(&["InteractiveInterpreter.runcode"])),
    ("cProfile", Names::All),
    ("distutils.file_util", Names::All),
    ("doctest", Names::Exact(&["debug_script"])),
    ("ensurepip", Names::Exact(&["_run_pip"])),
    (
        "idlelib.autocomplete",
        Names::Exact(&["AutoComplete.get_entity", "AutoComplete.fetch_completions"]),
    ),
    (
        "idlelib.calltip",
        Names::Exact(&["Calltip.fetch_tip", "get_entity"]),
    ),
    (
        "idlelib.debugobj",
        Names::Exact(&["ObjectTreeItem.SetText"]),
    ),
    (
        "idlelib.pyshell",
        Names::Exact(&[
            "ModifiedInterpreter.runcode",
            "ModifiedInterpreter.runcommand",
        ]),
    ),
    ("idlelib.run", Names::Exact(&["Executive.runcode"])),
    ("imaplib", Names::Exact(&["IMAP4_stream"])),
    ("lib2to3.pgen2.grammar", Names::Exact(&["Grammar.loads"])),
    (
        "lib2to3.pgen2.pgen",
        Names::Exact(&["ParserGenerator.make_label"]),
    ),
    ("pdb", Names::All),
    ("pickle", Names::All),
    ("_pickle", Names::All),
    ("pip", Names::All),
    ("pkgutil", Names::Exact(&["resolve_name"])),
    ("pty", Names::All),
    ("profile", Names::All),
    ("pydoc", Names::All),
    ("test", Names::All),
    ("timeit", Names::All),
    ("torch._dynamo.guards", Names::Exact(&["GuardBuilder.get"])),
    ("torch._inductor.codecache", Names::Within("compile_file")),
    (
        "torch.fx.experimental.symbolic_shapes",
        Names::Exact(&["ShapeEnv.evaluate_guards_expression"]),
    ),
    (
        "torch.jit.unsupported_tensor_ops",
        Names::Exact(&["execWrapper"]),
    ),
    ("torch.serialization", Names::Within("load")),
    (
        "torch.utils._config_module",
        Names::Exact(&["ConfigModule.load_config"]),
    ),
    (
        "torch.utils.bottleneck.__main__",
        Names::Exact(&["run_cprofile", "run_autograd_prof"]),
    ),
    ("torch.utils.collect_env", Names::Exact(&["run"])),
    (
        "torch.utils.data.datapipes.utils.decoder",
        Names::Exact(&["basichandlers"]),
    ),
    ("trace", Names::Exact(&["Trace.run", "Trace.runctx"])),
    ("urllib.request", Names::All),
    ("uuid", Names::All),
    ("venv", Names::All),
    ("webbrowser", Names::All),
    ("_osx_support", Names::All),
    ("_aix_support", Names::All),
    ("_pyrepl", Names::All),
    // modelscan's where it differs from picklescan's (its builtins are above).
    ("operator", Names::Containing(&["attrgetter"])),
    ("aiohttp.client", Names::All),
    // sanctum's own: importing any module runs its code, and `code` and `marshal` make and run
    // code objects.
    ("importlib", Names::All),
    ("code", Names::All),
    ("marshal", Names::All),
];

/// Globals that only rebuild data: picklescan 1.0.5's `_safe_globals`, plus what
/// `torch.load(weights_only=True)` also allows: torch's other rebuild functions (parameters, tensor
/// subclasses), `torch.Size`, and `_codecs.encode`, which protocols 0–2 use to write `bytes`.
const SAFE: &[(&str, &[&str])] = &[
    ("_codecs", &["encode"]),
    ("collections", &["OrderedDict"]),
    (
        "torch",
        &[
            "LongStorage",
            "FloatStorage",
            "HalfStorage",
            "QUInt2x4Storage",
            "QUInt4x2Storage",
            "QInt32Storage",
            "QInt8Storage",
            "QUInt8Storage",
            "ComplexFloatStorage",
            "ComplexDoubleStorage",
            "DoubleStorage",
            "BFloat16Storage",
            "BoolStorage",
            "CharStorage",
            "ShortStorage",
            "IntStorage",
            "ByteStorage",
            "Size",
        ],
    ),
    ("numpy", &["dtype", "ndarray"]),
    ("numpy._core.multiarray", &["_reconstruct"]),
    ("numpy.core.multiarray", &["_reconstruct"]),
    (
        "torch._utils",
        &[
            "_rebuild_tensor",
            "_rebuild_tensor_v2",
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
        ],
    ),
    ("torch._tensor", &["_rebuild_from_type_v2"]),
];

/// The verdict on importing `module.name`. A module or name that says `unknown` is dangerous, as
/// both tools have it: it is what [`analyze`] writes for an import it could not resolve.
pub fn verdict(module: &str, name: &str) -> Verdict {
    if module.contains("unknown") || name.contains("unknown") {
        return Verdict::Dangerous;
    }
    let within = |parent: &str| {
        module
            .strip_prefix(parent)
            .is_some_and(|rest| rest.starts_with('.'))
    };
    let dangerous = DANGEROUS.iter().any(|(m, names)| {
        (*m == module && names.cover(name)) || (matches!(names, Names::All) && within(m))
    });
    if dangerous {
        Verdict::Dangerous
    } else if SAFE
        .iter()
        .any(|(m, names)| *m == module && names.contains(&name))
    {
        Verdict::Safe
    } else {
        Verdict::Unknown
    }
}

/// An opcode's argument.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    /// No argument.
    None,
    /// An integer (`BININT*`, `INT`, memo indices, `PROTO`, `FRAME`, `EXT*`; `LONG*` when it fits).
    Int(i64),
    /// A float (`FLOAT`, `BINFLOAT`).
    Float(f64),
    /// A string (`*UNICODE*`, `*STRING`, decoded as the opcode says; `PERSID`'s id).
    Str(String),
    /// Bytes (`*BINBYTES*`, `BYTEARRAY8`).
    Bytes(Vec<u8>),
    /// `GLOBAL`'s and `INST`'s module and name.
    Global(String, String),
    /// A payload longer than [`MAX_KEPT`] (or a `LONG` too big for `i64`): its length, skipped.
    Skipped(u64),
}

/// One opcode of the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    /// Its byte offset in the stream.
    pub offset: u64,
    /// The opcode byte.
    pub code: u8,
    /// Its name, as `pickletools` has it.
    pub name: &'static str,
    /// Its argument.
    pub arg: Arg,
}

/// How an opcode's argument is encoded (`pickletools`' argument descriptors).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Encoding {
    None,
    U1,
    U2,
    U4,
    I4,
    U8,
    F8,
    DecimalLine,
    FloatLine,
    QuotedLine,
    RawUnicodeLine,
    Line,
    LinePair,
    Long1,
    Long4,
    Bytes1,
    Bytes4,
    Bytes8,
    String1,
    String4,
    Unicode1,
    Unicode4,
    Unicode8,
}

/// Every opcode of protocols 0–5: (byte, name, argument).
fn opcode(code: u8) -> Option<(&'static str, Encoding)> {
    use Encoding::*;
    Some(match code {
        b'(' => ("MARK", None),
        b'.' => ("STOP", None),
        b'0' => ("POP", None),
        b'1' => ("POP_MARK", None),
        b'2' => ("DUP", None),
        b'F' => ("FLOAT", FloatLine),
        b'I' => ("INT", DecimalLine),
        b'J' => ("BININT", I4),
        b'K' => ("BININT1", U1),
        b'L' => ("LONG", DecimalLine),
        b'M' => ("BININT2", U2),
        b'N' => ("NONE", None),
        b'P' => ("PERSID", Line),
        b'Q' => ("BINPERSID", None),
        b'R' => ("REDUCE", None),
        b'S' => ("STRING", QuotedLine),
        b'T' => ("BINSTRING", String4),
        b'U' => ("SHORT_BINSTRING", String1),
        b'V' => ("UNICODE", RawUnicodeLine),
        b'X' => ("BINUNICODE", Unicode4),
        b'a' => ("APPEND", None),
        b'b' => ("BUILD", None),
        b'c' => ("GLOBAL", LinePair),
        b'd' => ("DICT", None),
        b'}' => ("EMPTY_DICT", None),
        b'e' => ("APPENDS", None),
        b'g' => ("GET", DecimalLine),
        b'h' => ("BINGET", U1),
        b'i' => ("INST", LinePair),
        b'j' => ("LONG_BINGET", U4),
        b'l' => ("LIST", None),
        b']' => ("EMPTY_LIST", None),
        b'o' => ("OBJ", None),
        b'p' => ("PUT", DecimalLine),
        b'q' => ("BINPUT", U1),
        b'r' => ("LONG_BINPUT", U4),
        b's' => ("SETITEM", None),
        b't' => ("TUPLE", None),
        b')' => ("EMPTY_TUPLE", None),
        b'u' => ("SETITEMS", None),
        b'G' => ("BINFLOAT", F8),
        0x80 => ("PROTO", U1),
        0x81 => ("NEWOBJ", None),
        0x82 => ("EXT1", U1),
        0x83 => ("EXT2", U2),
        0x84 => ("EXT4", I4),
        0x85 => ("TUPLE1", None),
        0x86 => ("TUPLE2", None),
        0x87 => ("TUPLE3", None),
        0x88 => ("NEWTRUE", None),
        0x89 => ("NEWFALSE", None),
        0x8a => ("LONG1", Long1),
        0x8b => ("LONG4", Long4),
        b'B' => ("BINBYTES", Bytes4),
        b'C' => ("SHORT_BINBYTES", Bytes1),
        0x8c => ("SHORT_BINUNICODE", Unicode1),
        0x8d => ("BINUNICODE8", Unicode8),
        0x8e => ("BINBYTES8", Bytes8),
        0x8f => ("EMPTY_SET", None),
        0x90 => ("ADDITEMS", None),
        0x91 => ("FROZENSET", None),
        0x92 => ("NEWOBJ_EX", None),
        0x93 => ("STACK_GLOBAL", None),
        0x94 => ("MEMOIZE", None),
        0x95 => ("FRAME", U8),
        0x96 => ("BYTEARRAY8", Bytes8),
        0x97 => ("NEXT_BUFFER", None),
        0x98 => ("READONLY_BUFFER", None),
        _ => return Option::None,
    })
}

/// Why an opcode could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Reading failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The bytes are not a pickle opcode stream.
    #[error("at byte {offset}: {reason}")]
    Malformed {
        /// Where.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// The opcodes of a pickle stream, read one at a time from any reader.
pub struct Ops<R> {
    reader: BufReader<R>,
    offset: u64,
}

/// A text line: its bytes, or only its length when longer than [`MAX_LINE`].
enum Line {
    Kept(Vec<u8>),
    Long(u64),
}

impl<R: Read> Ops<R> {
    /// Reads opcodes from `reader`.
    pub fn new(reader: R) -> Self {
        Self {
            reader: BufReader::new(reader),
            offset: 0,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next byte without consuming it, `None` at the end.
    pub fn peek(&mut self) -> io::Result<Option<u8>> {
        Ok(self.reader.fill_buf()?.first().copied())
    }

    /// The next opcode, `None` at the end of the input.
    pub fn next_op(&mut self) -> Result<Option<Op>, OpError> {
        let offset = self.offset;
        let Some(code) = self.peek()? else {
            return Ok(None);
        };
        let Some((name, encoding)) = opcode(code) else {
            return Err(self.malformed(offset, format!("unknown opcode 0x{code:02x}")));
        };
        self.consume(1);
        let arg = self.arg(encoding).map_err(|e| match e {
            OpError::Malformed { reason, .. } => OpError::Malformed {
                offset,
                reason: format!("{name}: {reason}"),
            },
            e => e,
        })?;
        Ok(Some(Op {
            offset,
            code,
            name,
            arg,
        }))
    }

    fn malformed(&self, offset: u64, reason: String) -> OpError {
        OpError::Malformed { offset, reason }
    }

    fn consume(&mut self, n: usize) {
        self.reader.consume(n);
        self.offset += n as u64;
    }

    fn exact<const N: usize>(&mut self) -> Result<[u8; N], OpError> {
        let mut bytes = [0; N];
        match self.reader.read_exact(&mut bytes) {
            Ok(()) => {
                self.offset += N as u64;
                Ok(bytes)
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.malformed(self.offset, "the stream ends inside an argument".into()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `n` payload bytes: kept when at most [`MAX_KEPT`], else read past (never buffered).
    fn payload(&mut self, n: u64) -> Result<Option<Vec<u8>>, OpError> {
        if n <= MAX_KEPT {
            let mut bytes = Vec::new();
            (&mut self.reader).take(n).read_to_end(&mut bytes)?;
            self.offset += bytes.len() as u64;
            if (bytes.len() as u64) < n {
                return Err(self.malformed(
                    self.offset,
                    format!("{n} bytes announced, the stream ends first"),
                ));
            }
            return Ok(Some(bytes));
        }
        let skipped = io::copy(&mut (&mut self.reader).take(n), &mut io::sink())?;
        self.offset += skipped;
        if skipped < n {
            return Err(self.malformed(
                self.offset,
                format!("{n} bytes announced, the stream ends first"),
            ));
        }
        Ok(None)
    }

    /// A line without its newline. One longer than [`MAX_LINE`] is read past, not kept, since
    /// `pickletools` reads on too: stopping there would let a long line hide what follows.
    fn line(&mut self) -> Result<Line, OpError> {
        let mut line = Vec::new();
        (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        self.offset += line.len() as u64;
        let taken = line.len();
        if line.last() == Some(&b'\n') {
            line.pop();
            return Ok(Line::Kept(line));
        }
        let mut read = taken as u64;
        if taken > MAX_LINE {
            loop {
                let buffer = self.reader.fill_buf()?;
                if buffer.is_empty() {
                    break;
                }
                let (used, done) = match buffer.iter().position(|&b| b == b'\n') {
                    Some(at) => (at + 1, true),
                    None => (buffer.len(), false),
                };
                self.consume(used);
                read += used as u64;
                if done {
                    return Ok(Line::Long(read - 1));
                }
            }
        }
        Err(self.malformed(self.offset, "the stream ends inside a line".into()))
    }

    fn arg(&mut self, encoding: Encoding) -> Result<Arg, OpError> {
        use Encoding as E;
        let bytes_arg = |kept: Option<Vec<u8>>, n: u64| kept.map_or(Arg::Skipped(n), Arg::Bytes);
        Ok(match encoding {
            E::None => Arg::None,
            E::U1 => Arg::Int(i64::from(self.exact::<1>()?[0])),
            E::U2 => Arg::Int(i64::from(u16::from_le_bytes(self.exact()?))),
            E::U4 => Arg::Int(i64::from(u32::from_le_bytes(self.exact()?))),
            E::I4 => Arg::Int(i64::from(i32::from_le_bytes(self.exact()?))),
            E::U8 => {
                let n = u64::from_le_bytes(self.exact()?);
                i64::try_from(n).map_or(Arg::Skipped(n), Arg::Int)
            }
            E::F8 => Arg::Float(f64::from_be_bytes(self.exact()?)),
            E::DecimalLine => match self.line()? {
                Line::Long(n) => Arg::Skipped(n),
                Line::Kept(line) => decimal(&line).ok_or_else(|| {
                    self.malformed(self.offset, format!("{} is not an integer", show(&line)))
                })?,
            },
            E::FloatLine => match self.line()? {
                Line::Long(n) => Arg::Skipped(n),
                Line::Kept(line) => {
                    let text: String = String::from_utf8_lossy(&line)
                        .trim()
                        .chars()
                        .filter(|&c| c != '_')
                        .collect();
                    Arg::Float(text.parse().map_err(|_| {
                        self.malformed(self.offset, format!("{} is not a float", show(&line)))
                    })?)
                }
            },
            E::QuotedLine => match self.line()? {
                Line::Long(n) => Arg::Skipped(n),
                Line::Kept(line) => {
                    // As `pickletools` has it, a lone quote is an empty string.
                    let quoted = match line.as_slice() {
                        [b'\'' | b'"'] => &line[..0],
                        [q @ (b'\'' | b'"'), inner @ .., last] if last == q => inner,
                        _ => {
                            return Err(
                                self.malformed(self.offset, "STRING argument not in quotes".into())
                            );
                        }
                    };
                    Arg::Str(unescape(quoted))
                }
            },
            E::RawUnicodeLine => match self.line()? {
                Line::Long(n) => Arg::Skipped(n),
                Line::Kept(line) => Arg::Str(raw_unicode_unescape(&line)),
            },
            E::Line => match self.line()? {
                Line::Long(n) => Arg::Skipped(n),
                Line::Kept(line) => Arg::Str(String::from_utf8_lossy(&line).into_owned()),
            },
            E::LinePair => {
                // Names that are not UTF-8 cannot be imported, but are read on (as `pickletools`
                // does) rather than hide what follows; a name too long to keep cannot be judged.
                let mut part = || -> Result<String, OpError> {
                    Ok(match self.line()? {
                        Line::Kept(line) => String::from_utf8_lossy(&line).into_owned(),
                        Line::Long(n) => format!("unknown (a {n}-byte name)"),
                    })
                };
                let module = part()?;
                let name = part()?;
                Arg::Global(module, name)
            }
            E::Long1 => {
                let n = u64::from(self.exact::<1>()?[0]);
                long_arg(self.payload(n)?, n)
            }
            E::Long4 => {
                let n = i32::from_le_bytes(self.exact()?);
                let n = u64::try_from(n)
                    .map_err(|_| self.malformed(self.offset, format!("negative length {n}")))?;
                long_arg(self.payload(n)?, n)
            }
            E::Bytes1 | E::String1 | E::Unicode1 => {
                let n = u64::from(self.exact::<1>()?[0]);
                self.sized(encoding, n)?
            }
            E::Bytes4 | E::Unicode4 => {
                let n = u64::from(u32::from_le_bytes(self.exact()?));
                self.sized(encoding, n)?
            }
            E::String4 => {
                let n = i32::from_le_bytes(self.exact()?);
                let n = u64::try_from(n)
                    .map_err(|_| self.malformed(self.offset, format!("negative length {n}")))?;
                self.sized(encoding, n)?
            }
            E::Bytes8 | E::Unicode8 => {
                let n = u64::from_le_bytes(self.exact()?);
                let kept = self.payload(n)?;
                match encoding {
                    E::Unicode8 => kept.map_or(Arg::Skipped(n), |b| {
                        Arg::Str(String::from_utf8_lossy(&b).into_owned())
                    }),
                    _ => bytes_arg(kept, n),
                }
            }
        })
    }

    fn sized(&mut self, encoding: Encoding, n: u64) -> Result<Arg, OpError> {
        let kept = self.payload(n)?;
        Ok(match (encoding, kept) {
            (_, None) => Arg::Skipped(n),
            (Encoding::Bytes1 | Encoding::Bytes4, Some(b)) => Arg::Bytes(b),
            // Python 2 strings are bytes that Python 3 reads as ASCII/latin-1 text by default.
            (Encoding::String1 | Encoding::String4, Some(b)) => {
                Arg::Str(b.iter().map(|&c| c as char).collect())
            }
            (_, Some(b)) => Arg::Str(String::from_utf8_lossy(&b).into_owned()),
        })
    }
}

/// A line for an error message: its start, escaped.
fn show(line: &[u8]) -> String {
    let start = &line[..line.len().min(40)];
    format!("{:?}", String::from_utf8_lossy(start))
}

/// A decimal line as Python's `int()` reads it (blanks around, a sign, `_` between digits), with
/// `LONG`'s trailing `L`; protocol 0's `I01`/`I00` (True, False) are plain integers here. Too big
/// for `i64` is [`Arg::Skipped`] (its length); not a number at all is `None`.
fn decimal(line: &[u8]) -> Option<Arg> {
    let text = line.trim_ascii();
    let text = text.strip_suffix(b"L").unwrap_or(text);
    let digits: Vec<u8> = text.iter().copied().filter(|&c| c != b'_').collect();
    let unsigned = match digits.as_slice() {
        [b'+' | b'-', rest @ ..] => rest,
        all => all,
    };
    if unsigned.is_empty() || !unsigned.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let parsed = std::str::from_utf8(&digits)
        .ok()
        .and_then(|d| d.trim_start_matches('+').parse().ok());
    Some(parsed.map_or(Arg::Skipped(digits.len() as u64), Arg::Int))
}

fn long_arg(kept: Option<Vec<u8>>, n: u64) -> Arg {
    match kept {
        Some(bytes) if bytes.len() <= 8 => {
            // Two's complement, little-endian, sign-extended.
            let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                0xff
            } else {
                0
            };
            let mut full = [fill; 8];
            full[..bytes.len()].copy_from_slice(&bytes);
            Arg::Int(i64::from_le_bytes(full))
        }
        _ => Arg::Skipped(n),
    }
}

/// Python's `codecs.escape_decode`, which `STRING` arguments go through (and `pickletools`, but
/// not the unpickler, puts `GLOBAL` lines through): each byte as latin-1.
fn unescape(quoted: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while let Some(&c) = quoted.get(i) {
        i += 1;
        if c != b'\\' {
            out.push(c as char);
            continue;
        }
        let Some(&e) = quoted.get(i) else {
            out.push('\\');
            break;
        };
        i += 1;
        let simple = match e {
            b'\\' => Some('\\'),
            b'\'' => Some('\''),
            b'"' => Some('"'),
            b'a' => Some('\x07'),
            b'b' => Some('\x08'),
            b'f' => Some('\x0c'),
            b'n' => Some('\n'),
            b'r' => Some('\r'),
            b't' => Some('\t'),
            b'v' => Some('\x0b'),
            _ => None,
        };
        if let Some(ch) = simple {
            out.push(ch);
        } else if (b'0'..=b'7').contains(&e) {
            let mut value = u32::from(e - b'0');
            for _ in 0..2 {
                match quoted.get(i) {
                    Some(&d @ b'0'..=b'7') => {
                        value = value * 8 + u32::from(d - b'0');
                        i += 1;
                    }
                    _ => break,
                }
            }
            out.push(char::from((value & 0xff) as u8));
        } else if e == b'x' {
            let hex = quoted
                .get(i..i + 2)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) => {
                    out.push(char::from(v));
                    i += 2;
                }
                None => out.push_str("\\x"),
            }
        } else {
            // Python keeps an unknown escape as it is.
            out.push('\\');
            out.push(e as char);
        }
    }
    out
}

/// `raw-unicode-escape`: `\uXXXX` and `\UXXXXXXXX` escapes, everything else latin-1.
fn raw_unicode_unescape(line: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while let Some(&c) = line.get(i) {
        let width = match (c, line.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        let escaped = (width > 0)
            .then(|| line.get(i + 2..i + 2 + width))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .and_then(char::from_u32);
        match escaped {
            Some(ch) => {
                out.push(ch);
                i += 2 + width;
            }
            None => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

/// A global a pickle imports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Global {
    /// Its module (`posix`, `torch._utils`); `unknown` when `STACK_GLOBAL`'s operand could not be
    /// resolved to a string, or an `EXT*` code (the copyreg extension registry is the loader's).
    pub module: String,
    /// Its name in the module.
    pub name: String,
    /// The opcode that imports it first: `GLOBAL`, `INST`, `STACK_GLOBAL` or `EXT1/2/4`.
    pub opcode: &'static str,
    /// The byte offset of that opcode (in its stream, or zip member).
    pub offset: u64,
    /// Whether the pickle calls it (`REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `OBJ`, `INST`) or sets its
    /// state (`BUILD`), rather than only naming it.
    pub invoked: bool,
    /// How safe importing it is: [`verdict`] of its names, or worse where the way it is imported
    /// is itself a warning sign (see [`analyze`]).
    pub verdict: Verdict,
}

/// What a pickle stream imports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Analysis {
    /// The protocol its first `PROTO` declares (`None` for protocols 0 and 1, which have none).
    pub protocol: Option<u8>,
    /// Every global imported, once each, in the order first imported.
    pub globals: Vec<Global>,
    /// Why the stream is not a well-formed pickle, with the byte offset (the globals read up to
    /// there and past stack errors are listed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub malformed: Option<String>,
    /// Which of the analysis's caps the stream reached (memo entries, distinct globals), so that
    /// part of it was not followed; the stream itself may be fine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<String>,
    /// Well-formed pickles in the stream (legacy `torch.save` writes several in a row).
    pub pickles: u32,
    /// Opcodes read.
    pub opcodes: u64,
}

impl Analysis {
    /// The worst verdict of its globals; a malformed or incomplete analysis is at least
    /// [`Verdict::Unknown`], since part of the stream was not judged. (It is not dangerous for that
    /// alone: truncated downloads are common, and what was read is judged.)
    pub fn verdict(&self) -> Verdict {
        let worst = self
            .globals
            .iter()
            .map(|g| g.verdict)
            .max()
            .unwrap_or(Verdict::Safe);
        if self.malformed.is_some() || self.incomplete.is_some() {
            worst.max(Verdict::Unknown)
        } else {
            worst
        }
    }
}

/// A value on the simulated stack: only strings (for `STACK_GLOBAL`) and globals (for what calls
/// them) matter.
#[derive(Debug, Clone)]
enum Value {
    Str {
        text: String,
        /// Pushed by a Python 2 string opcode (`STRING`, `BINSTRING`, `SHORT_BINSTRING`).
        py2: bool,
        /// The number of the opcode that pushed it (see [`Machine::recent`]).
        by: u64,
    },
    Global(usize),
    Other,
}

/// The stack and memo of one pickle, and what the stream imports.
#[derive(Default)]
struct Machine {
    analysis: Analysis,
    stack: Vec<Value>,
    /// The stack's length at each open `MARK`, innermost last: pops stop there, as the
    /// unpickler's do.
    marks: Vec<usize>,
    memo: HashMap<i64, Value>,
    memo_text: usize,
    /// Set once an entry could not be kept: `MEMOIZE` indices (the memo's length) are unknown
    /// from then on, so nothing read from the memo is trusted.
    memo_lost: bool,
    /// `globals` by (module, name).
    index: HashMap<(String, String), usize>,
    /// Globals listed, not dangerous and dangerous.
    listed: [usize; 2],
    /// The numbers of the last two opcodes other than memo writes: `STACK_GLOBAL`'s operands
    /// must have been pushed by them, since that is where picklescan and modelscan look for them.
    recent: [u64; 2],
    /// The first problem of the current pickle.
    problem: Option<String>,
}

/// Memo writes, which picklescan and modelscan step over when looking for `STACK_GLOBAL`'s
/// operands.
const MEMO_WRITES: &[&str] = &["MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"];

impl Machine {
    /// Starts a pickle: the unpickler's stack and memo are its own.
    fn begin(&mut self) {
        self.stack.clear();
        self.marks.clear();
        self.memo.clear();
        self.memo_text = 0;
        self.memo_lost = false;
        self.problem = None;
    }

    fn problem(&mut self, op: &Op, reason: &str) {
        if self.problem.is_none() {
            self.problem = Some(format!("at byte {}: {} {reason}", op.offset, op.name));
        }
    }

    fn incomplete(&mut self, reason: String) {
        self.analysis.incomplete.get_or_insert(reason);
    }

    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    /// Pops one value; past the innermost `MARK` (where the unpickler stops) it is a problem and
    /// reads as an unknown value, so that the walk goes on as the tools' does.
    fn pop(&mut self, op: &Op) -> Value {
        if self.stack.len() > self.fence() {
            self.stack.pop().unwrap_or(Value::Other)
        } else {
            self.problem(op, "pops an empty stack");
            Value::Other
        }
    }

    fn pop_mark(&mut self, op: &Op) -> Vec<Value> {
        match self.marks.pop() {
            Some(at) => self.stack.split_off(at.min(self.stack.len())),
            None => {
                self.problem(op, "has no MARK to pop to");
                Vec::new()
            }
        }
    }

    /// Requires a value (the container or object worked on) above the innermost `MARK`.
    fn need_top(&mut self, op: &Op) {
        if self.stack.len() <= self.fence() {
            self.problem(op, "has nothing to work on");
        }
    }

    fn has_room(&mut self, op: &Op) -> bool {
        let room = self.stack.len() + self.marks.len() < MAX_STACK;
        if !room {
            self.problem(op, &format!("grows the stack deeper than {MAX_STACK}"));
        }
        room
    }

    fn push(&mut self, op: &Op, value: Value) {
        if self.has_room(op) {
            self.stack.push(value);
        }
    }

    fn import(&mut self, module: String, name: String, verdict: Verdict, op: &Op) -> Value {
        let key = (module, name);
        if let Some(&i) = self.index.get(&key) {
            if let Some(global) = self.analysis.globals.get_mut(i) {
                global.verdict = global.verdict.max(verdict);
            }
            return Value::Global(i);
        }
        let class = usize::from(verdict == Verdict::Dangerous);
        if self.listed[class] >= MAX_GLOBALS {
            self.incomplete(format!(
                "more than {MAX_GLOBALS} distinct globals of one kind: the rest are not listed"
            ));
            return Value::Other;
        }
        self.listed[class] += 1;
        let i = self.analysis.globals.len();
        self.analysis.globals.push(Global {
            module: key.0.clone(),
            name: key.1.clone(),
            opcode: op.name,
            offset: op.offset,
            invoked: false,
            verdict,
        });
        self.index.insert(key, i);
        Value::Global(i)
    }

    fn invoke(&mut self, callable: &Value) {
        if let Value::Global(i) = callable
            && let Some(global) = self.analysis.globals.get_mut(*i)
        {
            global.invoked = true;
        }
    }

    /// Stores the top of the stack at `index`; `None` is an index that cannot be followed.
    fn memoize(&mut self, op: &Op, index: Option<i64>) {
        if self.stack.len() <= self.fence() {
            self.problem(op, "memoizes an empty stack");
            return;
        }
        if self.memo_lost {
            return;
        }
        let Some(index) = index else {
            self.memo_lost = true;
            return;
        };
        let mut value = self.stack.last().cloned().unwrap_or(Value::Other);
        if !self.memo.contains_key(&index) && self.memo.len() >= MAX_MEMO {
            self.memo_lost = true;
            self.incomplete(format!(
                "more than {MAX_MEMO} memo entries: memo reads after that are not followed"
            ));
            return;
        }
        if let Value::Str { text, .. } = &value {
            if self.memo_text + text.len() > MAX_MEMO_TEXT {
                self.incomplete(format!(
                    "more than {MAX_MEMO_TEXT} bytes of memoized strings: later ones are not kept"
                ));
                value = Value::Other;
            } else {
                self.memo_text += text.len();
            }
        }
        if let Some(Value::Str { text, .. }) = self.memo.insert(index, value) {
            self.memo_text -= text.len();
        }
    }

    /// `STACK_GLOBAL`'s operand as text: `unknown` unless it is a string pushed by the opcode the
    /// tools would take it from (`by`); whether it is a Python 2 string.
    fn operand(value: Value, by: u64) -> (String, bool) {
        match value {
            Value::Str { text, py2, by: at } if at == by => (text, py2),
            _ => ("unknown".into(), false),
        }
    }

    /// Applies one opcode's effect on the stack and memo; `true` at `STOP`. `number` counts the
    /// opcodes of the stream from 1.
    fn step(&mut self, op: &Op, number: u64) -> bool {
        let int = |arg: &Arg| match arg {
            Arg::Int(n) => Some(*n),
            _ => None,
        };
        let mut stop = false;
        match op.name {
            "MARK" => {
                if self.has_room(op) {
                    self.marks.push(self.stack.len());
                }
            }
            "STOP" => {
                self.pop(op);
                stop = true;
            }
            "POP" => {
                // Popping an empty mark pops the mark, as the unpickler does.
                if self.stack.len() <= self.fence() && self.marks.pop().is_none() {
                    self.problem(op, "pops an empty stack");
                } else if self.stack.len() > self.fence() {
                    self.stack.pop();
                }
            }
            "POP_MARK" => {
                self.pop_mark(op);
            }
            "DUP" => {
                let top = if self.stack.len() > self.fence() {
                    self.stack.last().cloned().unwrap_or(Value::Other)
                } else {
                    self.problem(op, "duplicates an empty stack");
                    Value::Other
                };
                let top = match top {
                    Value::Str { text, py2, .. } => Value::Str {
                        text,
                        py2,
                        by: number,
                    },
                    other => other,
                };
                self.push(op, top);
            }
            "PROTO" => match int(&op.arg) {
                Some(n @ 0..=5) => {
                    self.analysis.protocol.get_or_insert(n as u8);
                }
                _ => self.problem(op, "declares an unsupported protocol"),
            },
            "FRAME" | "READONLY_BUFFER" => {}
            "GLOBAL" | "INST" => {
                let (module, name) = match &op.arg {
                    Arg::Global(module, name) => (module.clone(), name.clone()),
                    _ => ("unknown".into(), "unknown".into()),
                };
                // `pickletools` (and so both tools) reads these lines with escapes undone; the
                // unpickler does not. Either reading may be the one a check sees.
                let mut worst = verdict(&module, &name);
                if module.contains('\\') || name.contains('\\') {
                    worst = worst.max(verdict(
                        &unescape(module.as_bytes()),
                        &unescape(name.as_bytes()),
                    ));
                }
                let global = self.import(module, name, worst, op);
                if op.name == "INST" {
                    self.pop_mark(op);
                    self.invoke(&global);
                    self.push(op, Value::Other);
                } else {
                    self.push(op, global);
                }
            }
            "STACK_GLOBAL" => {
                let [module_by, name_by] = self.recent;
                let name = self.pop(op);
                let module = self.pop(op);
                let (name, name_py2) = Self::operand(name, name_by);
                let (module, module_py2) = Self::operand(module, module_by);
                // modelscan does not take Python 2 strings as operands (and no pickler writes
                // them there): dangerous, as it has it, whatever they name.
                let worst = if module_py2 || name_py2 {
                    Verdict::Dangerous
                } else {
                    verdict(&module, &name)
                };
                let global = self.import(module, name, worst, op);
                self.push(op, global);
            }
            "EXT1" | "EXT2" | "EXT4" => {
                // The copyreg extension registry maps codes to globals at load time: not knowable here.
                let code = int(&op.arg).unwrap_or(-1);
                let global = self.import(
                    "unknown".into(),
                    format!("extension code {code}"),
                    Verdict::Dangerous,
                    op,
                );
                self.push(op, global);
            }
            "REDUCE" | "NEWOBJ" | "NEWOBJ_EX" => {
                self.pop(op);
                if op.name == "NEWOBJ_EX" {
                    self.pop(op);
                }
                let callable = self.pop(op);
                self.invoke(&callable);
                self.push(op, Value::Other);
            }
            "OBJ" => {
                let items = self.pop_mark(op);
                match items.first() {
                    Some(class) => self.invoke(class),
                    None => self.problem(op, "has no class"),
                }
                self.push(op, Value::Other);
            }
            "BUILD" => {
                self.pop(op);
                self.need_top(op);
                if let Some(target) = self.stack.last().cloned() {
                    self.invoke(&target);
                }
            }
            "PERSID" => self.push(op, Value::Other),
            "BINPERSID" => {
                self.pop(op);
                self.push(op, Value::Other);
            }
            "APPEND" => {
                self.pop(op);
                self.need_top(op);
            }
            "SETITEM" => {
                self.pop(op);
                self.pop(op);
                self.need_top(op);
            }
            "APPENDS" | "SETITEMS" | "ADDITEMS" => {
                self.pop_mark(op);
                self.need_top(op);
            }
            "TUPLE" | "LIST" | "DICT" | "FROZENSET" => {
                self.pop_mark(op);
                self.push(op, Value::Other);
            }
            "TUPLE1" | "TUPLE2" | "TUPLE3" => {
                for _ in 0..(op.code - 0x84) {
                    self.pop(op);
                }
                self.push(op, Value::Other);
            }
            "PUT" | "BINPUT" | "LONG_BINPUT" => self.memoize(op, int(&op.arg)),
            "MEMOIZE" => {
                // The unpickler stores at the memo's length, whatever PUTs made it.
                let index = i64::try_from(self.memo.len()).ok();
                self.memoize(op, index);
            }
            "GET" | "BINGET" | "LONG_BINGET" => {
                // A missing entry is an evasion or a break; either way it is not a known string.
                let value = match int(&op.arg) {
                    Some(index) if !self.memo_lost => {
                        self.memo.get(&index).cloned().unwrap_or(Value::Other)
                    }
                    _ => Value::Other,
                };
                let value = match value {
                    Value::Str { text, py2, .. } => Value::Str {
                        text,
                        py2,
                        by: number,
                    },
                    other => other,
                };
                self.push(op, value);
            }
            "STRING" | "BINSTRING" | "SHORT_BINSTRING" | "UNICODE" | "BINUNICODE"
            | "SHORT_BINUNICODE" | "BINUNICODE8" => {
                let value = match &op.arg {
                    Arg::Str(text) if text.len() <= MAX_NAME => Value::Str {
                        text: text.clone(),
                        py2: op.name.contains("STRING"),
                        by: number,
                    },
                    _ => Value::Other,
                };
                self.push(op, value);
            }
            // Everything else pushes one value that is no string: numbers, bytes, None, booleans,
            // empty containers, out-of-band buffers.
            _ => self.push(op, Value::Other),
        }
        if !MEMO_WRITES.contains(&op.name) {
            self.recent = [self.recent[1], number];
        }
        stop
    }
}

/// Walks the pickle stream `reader` yields and reports what it imports; only reading errors are
/// errors, a stream that breaks the format is [`Analysis::malformed`].
///
/// - Several pickles in a row are walked in turn, as `pickletools.genops` is called again by the
///   tools. After the first, bytes that do not make a pickle end the walk quietly (legacy
///   `torch.save` files carry raw storage bytes after their pickles), but the globals they named
///   before breaking are still listed, as picklescan does.
/// - A broken stack (popping an empty stack, a missing `MARK`) makes the first pickle malformed
///   but does not stop the walk, since the tools read opcodes only and would see what follows.
/// - `STACK_GLOBAL`'s module and name are the two strings on top of the stack, which must have
///   been pushed by the two opcodes before it (memo writes aside) as every pickler writes them;
///   otherwise, or when they are not strings, the operand is `unknown` and the global dangerous.
///   This is picklescan's and modelscan's rule: an import that cannot be named statically is what
///   an evasion looks like.
pub fn analyze(reader: impl Read) -> io::Result<Analysis> {
    match walk(reader) {
        (analysis, None) => Ok(analysis),
        (_, Some(e)) => Err(e),
    }
}

/// [`analyze`], returning what was read before a reading error along with it.
fn walk(reader: impl Read) -> (Analysis, Option<io::Error>) {
    let mut ops = Ops::new(reader);
    let mut machine = Machine::default();
    // Pickles read to STOP, well-formed or not; and whether one is under way.
    let mut ended = 0u32;
    let mut in_pickle = false;
    let error = loop {
        let broken = match ops.next_op() {
            Ok(Some(op)) => {
                if !in_pickle {
                    machine.begin();
                    in_pickle = true;
                }
                machine.analysis.opcodes += 1;
                if machine.step(&op, machine.analysis.opcodes) {
                    in_pickle = false;
                    if ended == 0 {
                        machine.analysis.malformed = machine.problem.clone();
                    }
                    if machine.problem.is_none() {
                        machine.analysis.pickles += 1;
                    }
                    ended += 1;
                }
                continue;
            }
            Ok(None) if !in_pickle && ended == 0 => "empty: no pickle opcodes".to_string(),
            Ok(None) if !in_pickle => break None,
            Ok(None) => format!("the stream ends at byte {} before STOP", ops.offset()),
            Err(OpError::Malformed { offset, reason }) => format!("at byte {offset}: {reason}"),
            Err(OpError::Io(e)) => break Some(e),
        };
        // What follows the first pickle may be anything; only the first must be a pickle.
        if ended == 0 {
            machine.analysis.malformed = Some(machine.problem.take().unwrap_or(broken));
        }
        break None;
    };
    (machine.analysis, error)
}

/// Why a zip archive could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    /// Not a readable zip archive.
    #[error("not a readable zip archive: {0}")]
    Zip(#[from] zip::result::ZipError),
    /// Reading failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Member names picklescan reads as pickles.
const PICKLE_EXTENSIONS: &[&str] = &[".pkl", ".pickle", ".joblib", ".dat", ".data"];

/// The pickles inside a zip archive (`torch.save`'s `<archive>/data.pkl`, an `.npz` of object
/// arrays), each analyzed as a stream, never decompressed into memory whole: members named like
/// pickles (`*.pkl`, and picklescan's other extensions), members whose content opens with
/// `PROTO`, and `.npy` members of object arrays (see [`analyze_npy`]). A member that cannot be read
/// (compressed in a way this build does not read, encrypted, corrupt) is listed as malformed.
/// Members beyond [`MAX_ZIP_MEMBERS`] are not looked at.
pub fn analyze_zip<R: Read + Seek>(reader: R) -> Result<Vec<(String, Analysis)>, PickleError> {
    let mut archive = zip::ZipArchive::new(reader)?;
    let mut found = Vec::new();
    for i in 0..archive.len().min(MAX_ZIP_MEMBERS) {
        let name = archive.name_for_index(i).unwrap_or_default().to_string();
        let unreadable = |why: String| Analysis {
            malformed: Some(format!("the member cannot be read: {why}")),
            ..Analysis::default()
        };
        let member = match archive.by_index(i) {
            Ok(member) if member.is_dir() => continue,
            Ok(member) => member,
            Err(e) => {
                if is_pickle_name(&name) {
                    found.push((name, unreadable(e.to_string())));
                }
                continue;
            }
        };
        let mut stream = BufReader::new(member);
        let start = match stream.fill_buf() {
            Ok(start) => start,
            Err(e) => {
                found.push((name, unreadable(e.to_string())));
                continue;
            }
        };
        let pickle = is_pickle_name(&name) || matches!(start, [0x80, 0..=5, ..]);
        let npy = name.to_ascii_lowercase().ends_with(".npy") || start.starts_with(NPY_MAGIC);
        let analysis = if pickle {
            walk(stream)
        } else if npy {
            match npy_walk(stream) {
                (None, None) => continue,
                (analysis, error) => (analysis.unwrap_or_default(), error),
            }
        } else {
            continue;
        };
        found.push(match analysis {
            (analysis, None) => (name, analysis),
            // The member's own stream failed (a corrupt deflate stream reads as an I/O error).
            (mut analysis, Some(e)) => {
                analysis
                    .malformed
                    .get_or_insert(format!("reading the member failed: {e}"));
                (name, analysis)
            }
        });
    }
    Ok(found)
}

fn is_pickle_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    PICKLE_EXTENSIONS.iter().any(|ext| name.ends_with(ext))
}

/// How `.npy` files open.
const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// The pickle in a `.npy` array of Python objects (`dtype=object`, which `np.save` pickles after
/// the header); `None` for an array of plain numbers, which holds no pickle. A header that cannot
/// be read is a malformed analysis.
pub fn analyze_npy(reader: impl Read) -> io::Result<Option<Analysis>> {
    match npy_walk(reader) {
        (analysis, None) => Ok(analysis),
        (_, Some(e)) => Err(e),
    }
}

fn npy_walk(mut reader: impl Read) -> (Option<Analysis>, Option<io::Error>) {
    let malformed = |why: &str| {
        Some(Analysis {
            malformed: Some(format!("not a NumPy array: {why}")),
            ..Analysis::default()
        })
    };
    let mut start = [0u8; 8];
    match reader.read_exact(&mut start) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return (malformed("shorter than its magic"), None);
        }
        Err(e) => return (None, Some(e)),
    }
    if !start.starts_with(NPY_MAGIC) {
        return (malformed("no \\x93NUMPY magic"), None);
    }
    // Version 1 has a 2-byte header length, versions 2 and 3 a 4-byte one.
    let width = if start[6] == 1 { 2 } else { 4 };
    let mut length = [0u8; 4];
    if let Err(e) = reader.read_exact(&mut length[..width]) {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => (malformed("the header is cut short"), None),
            _ => (None, Some(e)),
        };
    }
    let length = u64::from(u32::from_le_bytes(length));
    if length > MAX_NPY_HEADER {
        return (malformed("a header longer than 64 KiB"), None);
    }
    let mut header = Vec::new();
    if let Err(e) = (&mut reader).take(length).read_to_end(&mut header) {
        return (None, Some(e));
    }
    if (header.len() as u64) < length {
        return (malformed("the header is cut short"), None);
    }
    // An object dtype is `'|O'`, alone or as a field of a structured one.
    if !header.windows(2).any(|w| w == b"|O") {
        return (None, None);
    }
    let (analysis, error) = walk(reader);
    (Some(analysis), error)
}

pub mod state_dict;

#[cfg(test)]
mod tests;
