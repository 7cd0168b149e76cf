//! Python pickles read without executing anything: an opcode reader for protocols 0–5 ([`Ops`]),
//! and on top of it [`analyze`], which follows just enough of the stack and memo to name every
//! global a pickle imports (`GLOBAL`, `INST`, `STACK_GLOBAL`) with a verdict like picklescan's and
//! modelscan's. Loading a pickle runs whatever its globals name; reading its opcodes runs nothing.
//!
//! Memory stays bounded whatever the input: long payloads are skipped rather than kept, lines,
//! the stack and the memo are capped, and a stream that breaks a rule is reported as
//! [`Analysis::malformed`], never a panic.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Seek};

use serde::Serialize;

/// Strings and bytes longer than this are skipped, not kept ([`Arg::Skipped`]).
pub const MAX_KEPT: u64 = 64 * 1024;

/// Longest text line (protocol 0 arguments, `GLOBAL`'s module and name) accepted.
const MAX_LINE: usize = 64 * 1024;

/// Strings kept on the simulated stack and memo: module and attribute names are short.
const MAX_NAME: usize = 512;

/// Deepest simulated stack; real pickles batch their items by the thousand.
const MAX_STACK: usize = 1 << 17;

/// Most memo entries tracked.
const MAX_MEMO: usize = 1 << 18;

/// Most distinct globals reported per stream.
const MAX_GLOBALS: usize = 10_000;

/// Zip members looked at in one archive.
const MAX_ZIP_MEMBERS: usize = 100_000;

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

/// The builtins both tools flag.
const DANGEROUS_BUILTINS: &[&str] = &[
    "eval",
    "compile",
    "getattr",
    "apply",
    "exec",
    "open",
    "breakpoint",
    "__import__",
];

/// Globals that run code when a pickle is loaded: the union of picklescan 1.0.5's `_unsafe_globals`
/// and modelscan 0.8.8's `unsafe_globals` (every severity). `*` is every name in the module and, as
/// picklescan has it, in its submodules.
const DANGEROUS: &[(&str, &[&str])] = &[
    // Protocols 0-2 name builtins by their Python 2 module.
    ("__builtin__", DANGEROUS_BUILTINS),
    ("builtins", DANGEROUS_BUILTINS),
    (
        "cloudpickle.cloudpickle",
        &[
            "_builtin_type",
            "_make_function",
            "_function_setstate",
            "_make_cell",
            "_make_empty_cell",
            "subimport",
        ],
    ),
    ("types", &["CodeType"]),
    ("aiohttp", &["*"]),
    ("asyncio", &["*"]),
    ("bdb", &["*"]),
    ("commands", &["*"]),
    ("ctypes", &["*"]),
    ("functools", &["partial"]),
    ("httplib", &["*"]),
    ("logging", &["FileHandler"]),
    ("_io", &["FileIO"]),
    ("numpy.f2py", &["*"]),
    ("numpy.testing._private.utils", &["*"]),
    ("nt", &["*"]),
    ("posix", &["*"]),
    ("_operator", &["attrgetter", "itemgetter", "methodcaller"]),
    ("operator", &["attrgetter", "itemgetter", "methodcaller"]),
    ("os", &["*"]),
    ("requests.api", &["*"]),
    ("runpy", &["*"]),
    ("shutil", &["*"]),
    ("socket", &["*"]),
    ("ssl", &["*"]),
    ("subprocess", &["*"]),
    ("sys", &["*"]),
    ("code", &["InteractiveInterpreter.runcode"]),
    ("cProfile", &["*"]),
    ("distutils.file_util", &["*"]),
    ("doctest", &["debug_script"]),
    ("ensurepip", &["_run_pip"]),
    (
        "idlelib.autocomplete",
        &["AutoComplete.get_entity", "AutoComplete.fetch_completions"],
    ),
    ("idlelib.calltip", &["Calltip.fetch_tip", "get_entity"]),
    ("idlelib.debugobj", &["ObjectTreeItem.SetText"]),
    (
        "idlelib.pyshell",
        &[
            "ModifiedInterpreter.runcode",
            "ModifiedInterpreter.runcommand",
        ],
    ),
    ("idlelib.run", &["Executive.runcode"]),
    ("imaplib", &["IMAP4_stream"]),
    ("lib2to3.pgen2.grammar", &["Grammar.loads"]),
    ("lib2to3.pgen2.pgen", &["ParserGenerator.make_label"]),
    ("pdb", &["*"]),
    ("pickle", &["*"]),
    ("_pickle", &["*"]),
    ("pip", &["*"]),
    ("pkgutil", &["resolve_name"]),
    ("pty", &["*"]),
    ("profile", &["*"]),
    ("pydoc", &["*"]),
    ("test", &["*"]),
    ("timeit", &["*"]),
    ("torch._dynamo.guards", &["GuardBuilder.get"]),
    ("torch._inductor.codecache", &["compile_file"]),
    (
        "torch.fx.experimental.symbolic_shapes",
        &["ShapeEnv.evaluate_guards_expression"],
    ),
    ("torch.jit.unsupported_tensor_ops", &["execWrapper"]),
    ("torch.serialization", &["load"]),
    ("torch.utils._config_module", &["ConfigModule.load_config"]),
    (
        "torch.utils.bottleneck.__main__",
        &["run_cprofile", "run_autograd_prof"],
    ),
    ("torch.utils.collect_env", &["run"]),
    (
        "torch.utils.data.datapipes.utils.decoder",
        &["basichandlers"],
    ),
    ("trace", &["Trace.run", "Trace.runctx"]),
    ("urllib.request", &["*"]),
    ("uuid", &["*"]),
    ("venv", &["*"]),
    ("webbrowser", &["*"]),
    ("_osx_support", &["*"]),
    ("_aix_support", &["*"]),
    ("_pyrepl", &["*"]),
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

/// The verdict on importing `module.name`.
pub fn verdict(module: &str, name: &str) -> Verdict {
    let listed = |table: &[(&str, &[&str])], module: &str, wildcard_only: bool| {
        table.iter().any(|(m, names)| {
            *m == module
                && names
                    .iter()
                    .any(|n| *n == "*" || (!wildcard_only && *n == name))
        })
    };
    // An unresolved operand is what an evasion looks like: picklescan calls it dangerous too.
    if module.contains("unknown") || name.contains("unknown") {
        return Verdict::Dangerous;
    }
    let parents = module
        .match_indices('.')
        .map(|(i, _)| &module[..i])
        .any(|parent| listed(DANGEROUS, parent, true));
    if listed(DANGEROUS, module, false) || parents {
        Verdict::Dangerous
    } else if listed(SAFE, module, false) {
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

    fn line(&mut self) -> Result<Vec<u8>, OpError> {
        let mut line = Vec::new();
        (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        self.offset += line.len() as u64;
        let read = line.len();
        if line.pop() != Some(b'\n') {
            let reason = if read > MAX_LINE {
                format!("a line longer than {MAX_LINE} bytes")
            } else {
                "the stream ends inside a line".into()
            };
            return Err(self.malformed(self.offset, reason));
        }
        Ok(line)
    }

    fn text_line(&mut self) -> Result<String, OpError> {
        let line = self.line()?;
        String::from_utf8(line)
            .map_err(|_| self.malformed(self.offset, "a line that is not UTF-8".into()))
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
            E::DecimalLine => {
                let line = self.text_line()?;
                // `I01`/`I00` are protocol 0's True and False; `L` longs end in `L`.
                let digits = line.trim_end_matches('L');
                match digits.parse::<i64>() {
                    Ok(n) => Arg::Int(n),
                    Err(_)
                        if !digits.is_empty()
                            && digits
                                .trim_start_matches('-')
                                .bytes()
                                .all(|c| c.is_ascii_digit()) =>
                    {
                        Arg::Skipped(digits.len() as u64)
                    }
                    Err(_) => {
                        return Err(self
                            .malformed(self.offset, format!("{line:?} is not a decimal integer")));
                    }
                }
            }
            E::FloatLine => {
                let line = self.text_line()?;
                Arg::Float(
                    line.trim().parse().map_err(|_| {
                        self.malformed(self.offset, format!("{line:?} is not a float"))
                    })?,
                )
            }
            E::QuotedLine => {
                let line = self.line()?;
                let quoted = match line.as_slice() {
                    [q @ (b'\'' | b'"'), inner @ .., last] if last == q => inner,
                    _ => {
                        return Err(
                            self.malformed(self.offset, "STRING argument not in quotes".into())
                        );
                    }
                };
                Arg::Str(unescape(quoted))
            }
            E::RawUnicodeLine => {
                let line = self.line()?;
                Arg::Str(raw_unicode_unescape(&line))
            }
            E::Line => Arg::Str(self.text_line()?),
            E::LinePair => {
                let module = self.text_line()?;
                let name = self.text_line()?;
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

/// Python's string-escape decoding, as far as module and attribute names need it.
fn unescape(quoted: &[u8]) -> String {
    let mut out = String::new();
    let mut bytes = quoted.iter();
    while let Some(&c) = bytes.next() {
        if c != b'\\' {
            out.push(c as char);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push('\n'),
            Some(b't') => out.push('\t'),
            Some(b'r') => out.push('\r'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).copied().collect();
                match std::str::from_utf8(&hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => out.push(v as char),
                    None => out.push('?'),
                }
            }
            Some(&other) => out.push(other as char),
            None => out.push('\\'),
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
    /// resolved to a string.
    pub module: String,
    /// Its name in the module.
    pub name: String,
    /// The opcode that imports it first: `GLOBAL`, `INST`, `STACK_GLOBAL` or `EXT1/2/4`.
    pub opcode: &'static str,
    /// The byte offset of that opcode (in its stream, or zip member).
    pub offset: u64,
    /// Whether the pickle calls it (`REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `OBJ`, `INST`), rather than
    /// only naming it.
    pub invoked: bool,
    /// How safe importing it is.
    pub verdict: Verdict,
}

/// What a pickle stream imports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Analysis {
    /// The protocol its first `PROTO` declares (`None` for protocols 0 and 1, which have none).
    pub protocol: Option<u8>,
    /// Every global imported, once each, in the order first imported.
    pub globals: Vec<Global>,
    /// Why the stream could not be walked to its end (the globals before that point are listed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub malformed: Option<String>,
    /// Complete pickles in the stream (legacy `torch.save` writes several in a row).
    pub pickles: u32,
    /// Opcodes read.
    pub opcodes: u64,
}

impl Analysis {
    /// The worst verdict of its globals; a malformed stream is at least [`Verdict::Unknown`], since
    /// what follows the break was not judged.
    pub fn verdict(&self) -> Verdict {
        let worst = self
            .globals
            .iter()
            .map(|g| g.verdict)
            .max()
            .unwrap_or(Verdict::Safe);
        match self.malformed {
            Some(_) => worst.max(Verdict::Unknown),
            None => worst,
        }
    }
}

/// A value on the simulated stack: only strings (for `STACK_GLOBAL`) and globals (for what calls
/// them) matter.
#[derive(Debug, Clone)]
enum Value {
    Mark,
    Str(String),
    Global(usize),
    Other,
}

struct Machine {
    analysis: Analysis,
    stack: Vec<Value>,
    memo: HashMap<i64, Value>,
    next_memo: i64,
}

impl Machine {
    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pops an empty stack".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("no MARK to pop to")?;
        let mut items = self.stack.split_off(at);
        items.remove(0);
        Ok(items)
    }

    fn push(&mut self, value: Value) -> Result<(), String> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("the stack grows deeper than {MAX_STACK}"));
        }
        self.stack.push(value);
        Ok(())
    }

    fn import(&mut self, module: String, name: String, op: &Op) -> Value {
        let known = self
            .analysis
            .globals
            .iter()
            .position(|g| g.module == module && g.name == name);
        match known {
            Some(i) => Value::Global(i),
            None if self.analysis.globals.len() < MAX_GLOBALS => {
                self.analysis.globals.push(Global {
                    verdict: verdict(&module, &name),
                    module,
                    name,
                    opcode: op.name,
                    offset: op.offset,
                    invoked: false,
                });
                Value::Global(self.analysis.globals.len() - 1)
            }
            None => Value::Other,
        }
    }

    fn invoke(&mut self, callable: &Value) {
        if let Value::Global(i) = callable
            && let Some(global) = self.analysis.globals.get_mut(*i)
        {
            global.invoked = true;
        }
    }

    fn memoize(&mut self, index: i64) -> Result<(), String> {
        let top = self
            .stack
            .last()
            .cloned()
            .ok_or("memoizes an empty stack")?;
        if self.memo.len() < MAX_MEMO || self.memo.contains_key(&index) {
            self.memo.insert(index, top);
        }
        Ok(())
    }

    /// Applies one opcode's effect on the stack and memo. `Ok(true)` at `STOP`.
    fn step(&mut self, op: Op) -> Result<bool, String> {
        let int = |arg: &Arg| match arg {
            Arg::Int(n) => Ok(*n),
            _ => Err(format!("{} needs an integer argument", op.name)),
        };
        match op.name {
            "MARK" => self.push(Value::Mark)?,
            "STOP" => {
                self.pop()?;
                return Ok(true);
            }
            "POP" => {
                if matches!(self.stack.last(), Some(Value::Mark)) {
                    self.stack.pop();
                } else {
                    self.pop()?;
                }
            }
            "POP_MARK" => {
                self.pop_mark()?;
            }
            "DUP" => {
                let top = self.stack.last().cloned().ok_or("DUP of an empty stack")?;
                self.push(top)?;
            }
            "PROTO" => {
                let n = int(&op.arg)?;
                if !(0..=5).contains(&n) {
                    return Err(format!("unsupported protocol {n}"));
                }
                self.analysis.protocol.get_or_insert(n as u8);
            }
            "FRAME" | "READONLY_BUFFER" => {}
            "GLOBAL" | "INST" => {
                let Arg::Global(module, name) = &op.arg else {
                    return Err(format!("{} without module and name", op.name));
                };
                let global = self.import(module.clone(), name.clone(), &op);
                if op.name == "INST" {
                    self.pop_mark()?;
                    self.invoke(&global);
                    self.push(Value::Other)?;
                } else {
                    self.push(global)?;
                }
            }
            "STACK_GLOBAL" => {
                let name = self.pop()?;
                let module = self.pop()?;
                let text = |v: Value| match v {
                    Value::Str(s) => s,
                    _ => "unknown".to_string(),
                };
                let global = self.import(text(module), text(name), &op);
                self.push(global)?;
            }
            "EXT1" | "EXT2" | "EXT4" => {
                // The copyreg extension registry maps codes to globals at load time: not knowable here.
                let code = int(&op.arg)?;
                let global = self.import("unknown".into(), format!("extension code {code}"), &op);
                self.push(global)?;
            }
            "REDUCE" => {
                self.pop()?;
                let callable = self.pop()?;
                self.invoke(&callable);
                self.push(Value::Other)?;
            }
            "NEWOBJ" => {
                self.pop()?;
                let class = self.pop()?;
                self.invoke(&class);
                self.push(Value::Other)?;
            }
            "NEWOBJ_EX" => {
                self.pop()?;
                self.pop()?;
                let class = self.pop()?;
                self.invoke(&class);
                self.push(Value::Other)?;
            }
            "OBJ" => {
                let items = self.pop_mark()?;
                if let Some(class) = items.first() {
                    self.invoke(class);
                }
                self.push(Value::Other)?;
            }
            "BUILD" => {
                self.pop()?;
                if self.stack.is_empty() {
                    return Err("BUILD with nothing to build".into());
                }
            }
            "BINPERSID" => {
                self.pop()?;
                self.push(Value::Other)?;
            }
            "APPEND" => {
                self.pop()?;
            }
            "SETITEM" => {
                self.pop()?;
                self.pop()?;
            }
            "APPENDS" | "SETITEMS" | "ADDITEMS" => {
                self.pop_mark()?;
                if self.stack.is_empty() {
                    return Err(format!("{} with no container", op.name));
                }
            }
            "TUPLE" | "LIST" | "DICT" | "FROZENSET" => {
                self.pop_mark()?;
                self.push(Value::Other)?;
            }
            "TUPLE1" | "TUPLE2" | "TUPLE3" => {
                let n = (op.code - 0x84) as usize;
                for _ in 0..n {
                    self.pop()?;
                }
                self.push(Value::Other)?;
            }
            "PUT" | "BINPUT" | "LONG_BINPUT" => {
                let index = int(&op.arg)?;
                self.memoize(index)?;
            }
            "MEMOIZE" => {
                let index = self.next_memo;
                self.memoize(index)?;
            }
            "GET" | "BINGET" | "LONG_BINGET" => {
                let index = int(&op.arg)?;
                // A missing entry is an evasion or a break; either way it is not a known string.
                let value = self.memo.get(&index).cloned().unwrap_or(Value::Other);
                self.push(value)?;
            }
            _ => {
                let value = match op.arg {
                    Arg::Str(s) if s.len() <= MAX_NAME => Value::Str(s),
                    _ => Value::Other,
                };
                self.push(value)?;
            }
        }
        if matches!(op.name, "MEMOIZE") {
            self.next_memo += 1;
        }
        Ok(false)
    }
}

/// Walks the pickle stream `reader` yields and reports what it imports. Several pickles in a row are
/// walked in turn; after the first complete one, bytes that do not open a new pickle with `PROTO`
/// end the walk quietly (legacy `torch.save` files carry raw storage bytes after their pickles).
/// Only reading errors are errors; a stream that breaks the format is [`Analysis::malformed`].
pub fn analyze(reader: impl Read) -> io::Result<Analysis> {
    let mut ops = Ops::new(reader);
    let mut machine = Machine {
        analysis: Analysis::default(),
        stack: Vec::new(),
        memo: HashMap::new(),
        next_memo: 0,
    };
    let mut in_pickle = false;
    loop {
        let op = match ops.next_op() {
            Ok(Some(op)) => op,
            Err(OpError::Io(e)) => return Err(e),
            // After a complete pickle, whatever follows that is not one is not this format's.
            Ok(None) | Err(OpError::Malformed { .. })
                if !in_pickle && machine.analysis.pickles > 0 =>
            {
                break;
            }
            Ok(None) if machine.analysis.opcodes == 0 => {
                machine.analysis.malformed = Some("empty: no pickle opcodes".into());
                break;
            }
            Ok(None) => {
                machine.analysis.malformed = Some(format!(
                    "the stream ends at byte {} before STOP",
                    ops.offset()
                ));
                break;
            }
            Err(OpError::Malformed { offset, reason }) => {
                machine.analysis.malformed = Some(format!("at byte {offset}: {reason}"));
                break;
            }
        };
        if !in_pickle && machine.analysis.pickles > 0 {
            // Another pickle only if it opens with PROTO 2..=5, as every pickle of a legacy torch
            // file does; its raw storage bytes follow the last one.
            let opens = op.name == "PROTO" && matches!(op.arg, Arg::Int(2..=5));
            if !opens {
                break;
            }
            machine.stack.clear();
            machine.memo.clear();
            machine.next_memo = 0;
        }
        in_pickle = true;
        machine.analysis.opcodes += 1;
        let offset = op.offset;
        let name = op.name;
        match machine.step(op) {
            Ok(true) => {
                machine.analysis.pickles += 1;
                in_pickle = false;
            }
            Ok(false) => {}
            Err(reason) => {
                machine.analysis.malformed = Some(format!("at byte {offset}: {name} {reason}"));
                break;
            }
        }
    }
    Ok(machine.analysis)
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

/// The pickles inside a zip archive (`torch.save`'s `<archive>/data.pkl`, an `.npz` of object
/// arrays): every member named `*.pkl` or whose content opens with `PROTO`, analyzed as a stream
/// (never decompressed into memory whole). Members beyond [`MAX_ZIP_MEMBERS`] are not looked at.
pub fn analyze_zip<R: Read + Seek>(reader: R) -> Result<Vec<(String, Analysis)>, PickleError> {
    let mut archive = zip::ZipArchive::new(reader)?;
    let mut found = Vec::new();
    for i in 0..archive.len().min(MAX_ZIP_MEMBERS) {
        let member = archive.by_index(i)?;
        if member.is_dir() {
            continue;
        }
        let name = member.name().to_string();
        let mut stream = BufReader::new(member);
        let opens_like_pickle = {
            let start = stream.fill_buf()?;
            start.len() >= 2 && start[0] == 0x80 && (2..=5).contains(&start[1])
        };
        if name.to_ascii_lowercase().ends_with(".pkl") || opens_like_pickle {
            found.push((name, analyze(stream)?));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests;
