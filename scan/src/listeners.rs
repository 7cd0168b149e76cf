//! Which local inference servers are running: listening TCP sockets (`/proc/net/tcp`, `tcp6`)
//! mapped to the processes that hold them (through `/proc/<pid>/fd`), flagged when the process is a
//! known model runner or the port is a runner's default; and the processes on a GPU, from
//! `nvidia-smi` where it is installed. Linux only; elsewhere the inventory is empty with a note.
//!
//! Everything here is read from processes that may exit at any moment (or lie: a process chooses its
//! own name and arguments), so every read may fail and is skipped, every loop is bounded, and the
//! classification is a hint for a person, not proof.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Bytes of a process's command line kept (a hostile process can have megabytes of arguments); the
/// last argument kept may be cut short.
const MAX_CMDLINE: u64 = 4096;

/// File descriptors examined per process, so that one with millions of open files cannot stall the
/// scan. A socket whose owner lies past this cap or [`MAX_FDS`] is reported without a process.
const MAX_FDS_PER_PROCESS: usize = 65_536;
/// File descriptors examined in all (a readlink each: about a second's work).
const MAX_FDS: usize = 1 << 20;

/// Arguments after argv[0] looked at for the script or module an interpreter runs.
const MAX_ARGS_EXAMINED: usize = 8;

/// How long `nvidia-smi` may take before it is killed.
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of its output is kept (it writes about 40 bytes a process).
const MAX_NVIDIA_SMI_OUTPUT: u64 = 1 << 20;

/// The state `/proc/net/tcp` prints for a listening socket (`TCP_LISTEN`).
const TCP_LISTEN: &str = "0A";

/// How a clue names a runner. A clue is the lowercased base name of the process's name
/// (`/proc/<pid>/comm`), its executable, argv[0], and the script or module it runs (see
/// [`runner_of`]), with the directories above it where it is a path.
#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// Exactly this base name.
    Name(&'static str),
    /// A base name beginning with this (`koboldcpp-linux-x64-cuda1210`, `vllm.entrypoints.…`).
    Prefix(&'static str),
    /// A base name ending with this (`mistral-7b-instruct.llamafile`).
    Suffix(&'static str),
    /// Exactly this base name under a directory whose name contains the second: a name too common
    /// to mean a runner on its own (`llama.cpp/build/bin/server`).
    NameUnder(&'static str, &'static str),
    /// Any base name under a directory whose name contains this: runners that are a checkout's
    /// `python main.py` (`tabbyAPI/main.py`).
    Under(&'static str),
}

/// Model runners: how each is recognized, and the name the report gives it. Lowercase; first match
/// wins. Kept to servers that listen: a CLI that only generates (`llama-cli`) holds no socket.
const RUNNERS: &[(Pattern, &str)] = {
    use Pattern::{Name, NameUnder, Prefix, Suffix, Under};
    &[
        // `ollama serve`, and the model runners it starts on loopback ports (`ollama runner`;
        // before 0.4, `ollama_llama_server` extracted under /tmp).
        (Name("ollama"), "Ollama"),
        (Name("ollama_llama_server"), "Ollama"),
        // llama.cpp's server: `llama-server`, called `server` in llama.cpp builds before mid-2024;
        // llama-swap is a proxy that starts them on demand; Docker Model Runner bundles its own.
        (Name("llama-server"), "llama.cpp llama-server"),
        (NameUnder("server", "llama.cpp"), "llama.cpp llama-server"),
        (Name("llama-swap"), "llama-swap"),
        (Name("com.docker.llama-server"), "Docker Model Runner"),
        // llama-cpp-python's OpenAI-compatible server: `python -m llama_cpp.server`.
        (Name("llama_cpp.server"), "llama-cpp-python"),
        // The `llamafile` binary (`llamafile-0.8.13` in releases), or a model built into one, run
        // directly or through the APE loader.
        (Prefix("llamafile"), "llamafile"),
        (Suffix(".llamafile"), "llamafile"),
        // The app (`LM Studio` on macOS, `lm-studio` as a Linux AppImage) and its `lms` CLI.
        (Name("lm studio"), "LM Studio"),
        (Name("lm-studio"), "LM Studio"),
        (Name("lmstudio"), "LM Studio"),
        (Name("lms"), "LM Studio"),
        // `vllm serve` (a Python script named vllm) or `python -m vllm.entrypoints.openai.api_server`.
        (Name("vllm"), "vLLM"),
        (Prefix("vllm."), "vLLM"),
        // `python -m sglang.launch_server`.
        (Prefix("sglang."), "SGLang"),
        // Hugging Face TGI: the launcher, its Python shards, and the Rust router that holds the port.
        (Name("text-generation-launcher"), "Hugging Face TGI"),
        (Name("text-generation-server"), "Hugging Face TGI"),
        (Name("text-generation-router"), "Hugging Face TGI"),
        (Name("local-ai"), "LocalAI"),
        (Name("localai"), "LocalAI"),
        // `python koboldcpp.py`, or a release binary (`koboldcpp-linux-x64-cuda1210`).
        (Prefix("koboldcpp"), "KoboldCpp"),
        // `python -m mlx_lm.server`, or its console script of that name.
        (Name("mlx_lm.server"), "MLX LM server"),
        // TabbyAPI (the ExLlamaV2/V3 server) and oobabooga's web UI are a checkout's Python script.
        (Under("tabbyapi"), "TabbyAPI"),
        (Under("text-generation-webui"), "text-generation-webui"),
        (Name("jan"), "Jan"),
        // GPT4All's desktop app (`gpt4all/bin/chat`) serves an API when enabled.
        (Name("gpt4all"), "GPT4All"),
        (Under("gpt4all"), "GPT4All"),
        (Name("tritonserver"), "NVIDIA Triton"),
        // `sanctum serve` and `sanctum hub serve`: approved models, but still a server to know of.
        (Name("sanctum"), "sanctum"),
    ]
};

/// Interpreters, by base name, optionally followed by a version (`python3.11`, `.ape-1.10`): for
/// these the runner is the script or module they run (`python3 -m vllm…`, `node …/lms`, the APE
/// loader running a llamafile).
const INTERPRETERS: &[&str] = &[
    "python", "node", "nodejs", "bun", "deno", "sh", "bash", "dash", "ape", ".ape",
];

/// Whether a base name is one of [`INTERPRETERS`].
fn is_interpreter(base: &str) -> bool {
    INTERPRETERS.iter().any(|name| {
        base.strip_prefix(name).is_some_and(|version| {
            version.is_empty()
                || version.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '-')
        })
    })
}

/// Ports that model runners listen on by default. Only ports used by little else: TGI's 3000,
/// KoboldCpp's 5001 (iperf's) and Jan's 1337 would flag every other development server.
const KNOWN_PORTS: &[(u16, &str)] = &[
    (11434, "Ollama"),
    (8080, "llama.cpp llama-server / llamafile"),
    (1234, "LM Studio"),
    (8000, "vLLM"),
    (12434, "Docker Model Runner"),
];

/// A listening socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    /// `tcp` or `tcp6`.
    pub protocol: &'static str,
    /// The local address it is bound to (an IPv4-mapped IPv6 address stays as bound).
    pub address: IpAddr,
    /// The local port.
    pub port: u16,
    /// The owner's user id.
    pub uid: u32,
    /// The process that holds it, when visible (another user's are not, without root). When several
    /// hold it (a server's forked workers), the one with the lowest pid.
    pub process: Option<Process>,
    /// The model runner the process is.
    pub runner: Option<String>,
    /// The runner whose default port this is.
    pub known_port: Option<String>,
    /// A runner, or a runner's port: an inference server, as far as the scan can tell.
    pub inference: bool,
}

/// A process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Process {
    /// Its id.
    pub pid: u32,
    /// Its name (`/proc/<pid>/comm`, at most 15 bytes); empty when unreadable.
    pub name: String,
    /// Its executable, when readable.
    pub exe: Option<PathBuf>,
    /// Its arguments (from the first [`MAX_CMDLINE`] bytes).
    pub argv: Vec<String>,
    /// GPU memory it uses, from `nvidia-smi`.
    pub gpu_memory_mib: Option<u64>,
}

/// A process on a GPU, as `nvidia-smi` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuProcess {
    /// Its id (in the host's PID namespace: inside a container it may name no process here).
    pub pid: u32,
    /// Its name as `nvidia-smi` gives it (usually the executable's path).
    pub name: String,
    /// GPU memory used, MiB (`None` where the driver does not say, as under WSL).
    pub used_memory_mib: Option<u64>,
}

/// Listening sockets and GPU processes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Inventory {
    /// Listening sockets, by port then address.
    pub listeners: Vec<Listener>,
    /// Processes on a GPU.
    pub gpu_processes: Vec<GpuProcess>,
    /// What the scan could not see.
    pub notes: Vec<String>,
}

/// The inventory of this machine: its `/proc`, and `nvidia-smi` where it is installed. Never fails:
/// what cannot be read becomes a note.
pub fn scan() -> Inventory {
    if !cfg!(target_os = "linux") {
        return Inventory {
            notes: vec!["listening sockets are read from /proc, which this system lacks".into()],
            ..Inventory::default()
        };
    }
    let mut inventory = scan_proc(Path::new("/proc"));
    inventory.gpu_processes = gpu_processes(&mut inventory.notes);
    for listener in &mut inventory.listeners {
        if let Some(process) = &mut listener.process
            && let Some(gpu) = inventory
                .gpu_processes
                .iter()
                .find(|g| g.pid == process.pid)
        {
            process.gpu_memory_mib = gpu.used_memory_mib;
        }
    }
    inventory
}

/// The listening sockets of the `/proc` at `root` (GPU processes are not asked for). One listener
/// per (address, port, socket inode): two sockets sharing a port with `SO_REUSEPORT` are two.
pub fn scan_proc(root: &Path) -> Inventory {
    let mut inventory = Inventory::default();
    let mut sockets: Vec<(&'static str, Socket)> = Vec::new();
    for protocol in ["tcp", "tcp6"] {
        let path = root.join("net").join(protocol);
        match fs::File::open(&path) {
            // Read line by line: a busy server's table lists every connection, not just listeners.
            Ok(file) => sockets.extend(
                BufReader::new(file)
                    .lines()
                    .map_while(Result::ok)
                    .skip(1)
                    .filter_map(|line| parse_line(&line))
                    .filter(|s| s.state == TCP_LISTEN)
                    .map(|s| (protocol, s)),
            ),
            Err(e) => inventory
                .notes
                .push(format!("cannot read {}: {e}", path.display())),
        }
    }
    let wanted: BTreeSet<u64> = sockets.iter().map(|(_, s)| s.inode).collect();
    let owners = socket_owners(root, &wanted);
    if owners.truncated {
        inventory.notes.push(format!(
            "stopped looking for the processes holding sockets after {MAX_FDS} file descriptors ({MAX_FDS_PER_PROCESS} a process)"
        ));
    }
    let mut processes: HashMap<u32, Option<Process>> = HashMap::new();
    let mut hidden = 0;
    let mut seen = BTreeSet::new();
    for (protocol, socket) in sockets {
        if !seen.insert((socket.address, socket.port, socket.inode)) {
            continue;
        }
        let process = owners.pids.get(&socket.inode).and_then(|&pid| {
            processes
                .entry(pid)
                .or_insert_with(|| read_process(root, pid))
                .clone()
        });
        if process.is_none() {
            hidden += 1;
        }
        let runner = process.as_ref().and_then(runner_of).map(str::to_string);
        let known_port = known_port(socket.port).map(str::to_string);
        inventory.listeners.push(Listener {
            protocol,
            address: socket.address,
            port: socket.port,
            uid: socket.uid,
            inference: runner.is_some() || known_port.is_some(),
            process,
            runner,
            known_port,
        });
    }
    if hidden > 0 {
        inventory.notes.push(format!(
            "{hidden} listening socket(s) held by no process visible here (another user's, or another PID namespace's); run as root in the host namespace to name them"
        ));
    }
    inventory.listeners.sort_by(|a, b| {
        let key = |l: &Listener| {
            (
                l.port,
                l.address,
                l.protocol,
                l.process.as_ref().map(|p| p.pid),
            )
        };
        key(a).cmp(&key(b))
    });
    inventory
}

/// The runner whose default port `port` is.
fn known_port(port: u16) -> Option<&'static str> {
    KNOWN_PORTS
        .iter()
        .find(|(p, _)| *p == port)
        .map(|(_, name)| *name)
}

/// One row of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Socket {
    address: IpAddr,
    port: u16,
    /// The TCP state in hex, as printed (`0A` listening).
    state: String,
    uid: u32,
    inode: u64,
}

/// Parses `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...`; `None`
/// for the header and anything malformed.
fn parse_line(line: &str) -> Option<Socket> {
    let fields: Vec<&str> = line.split_whitespace().take(10).collect();
    let (address, port) = fields.get(1)?.split_once(':')?;
    Some(Socket {
        address: parse_address(address)?,
        port: u16::from_str_radix(port, 16).ok()?,
        state: (*fields.get(3)?).to_string(),
        uid: fields.get(7)?.parse().ok()?,
        inode: fields.get(9)?.parse().ok()?,
    })
}

/// The kernel prints the address as 32-bit words (one for IPv4, four for IPv6), each a `%08X` of the
/// network-order bytes read as a host-order integer: so each word's native-endian bytes are the
/// address's bytes (`0100007F` is 127.0.0.1 on a little-endian machine).
fn parse_address(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let text = hex.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(text, 16).ok()?.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Which process holds each wanted socket inode, and whether the search stopped at a cap.
#[derive(Debug, Default)]
struct Owners {
    pids: HashMap<u64, u32>,
    truncated: bool,
}

/// Finds the holders of `wanted`: `/proc/<pid>/fd/*` links read `socket:[INODE]`. Processes that
/// exit or cannot be read (another user's, without root) are skipped; pids are visited in
/// ascending order, so a socket shared by forked workers goes to the lowest pid.
fn socket_owners(root: &Path, wanted: &BTreeSet<u64>) -> Owners {
    let mut owners = Owners::default();
    if wanted.is_empty() {
        return owners;
    }
    let Ok(entries) = fs::read_dir(root) else {
        return owners;
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut budget = MAX_FDS;
    for pid in pids {
        let Ok(fds) = fs::read_dir(root.join(pid.to_string()).join("fd")) else {
            continue;
        };
        for (examined, fd) in fds.enumerate() {
            if examined == MAX_FDS_PER_PROCESS || budget == 0 {
                owners.truncated = true;
                break;
            }
            budget -= 1;
            let Ok(target) = fd.and_then(|fd| fs::read_link(fd.path())) else {
                continue;
            };
            if let Some(inode) = socket_inode(&target).filter(|i| wanted.contains(i)) {
                owners.pids.entry(inode).or_insert(pid);
            }
        }
        if budget == 0 || owners.pids.len() == wanted.len() {
            break;
        }
    }
    owners
}

/// The inode of an fd link's target `socket:[INODE]`.
fn socket_inode(target: &Path) -> Option<u64> {
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// What `/proc/<pid>` says of a process; `None` when it has gone (its `comm` is unreadable). Its
/// executable and arguments are each left empty when unreadable.
fn read_process(root: &Path, pid: u32) -> Option<Process> {
    let dir = root.join(pid.to_string());
    let name = fs::read_to_string(dir.join("comm"))
        .ok()?
        .trim_end_matches('\n')
        .to_string();
    let mut cmdline = Vec::new();
    if let Ok(file) = fs::File::open(dir.join("cmdline")) {
        // A partial read keeps what was read.
        let _ = file.take(MAX_CMDLINE).read_to_end(&mut cmdline);
    }
    Some(Process {
        pid,
        name,
        exe: fs::read_link(dir.join("exe")).ok(),
        argv: parse_cmdline(&cmdline),
        gpu_memory_mib: None,
    })
}

/// `/proc/<pid>/cmdline`: arguments each ended by a NUL (the last one's NUL may be cut off).
fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// A lowercased path's base name and the names of the directories above it.
struct Clue {
    base: String,
    dirs: Vec<String>,
}

impl Clue {
    fn of(path: &str) -> Self {
        let mut parts: Vec<String> = path
            .to_lowercase()
            .split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        let base = parts.pop().unwrap_or_default();
        Self { base, dirs: parts }
    }

    fn matches(&self, pattern: Pattern) -> bool {
        let under = |dir: &str| self.dirs.iter().any(|d| d.contains(dir));
        match pattern {
            Pattern::Name(name) => self.base == name,
            Pattern::Prefix(prefix) => self.base.starts_with(prefix),
            Pattern::Suffix(suffix) => self.base.ends_with(suffix),
            Pattern::NameUnder(name, dir) => self.base == name && under(dir),
            Pattern::Under(dir) => under(dir),
        }
    }
}

/// The runner a process is, judged from its name, its executable, argv[0], and what it runs: for an
/// interpreter the `-m` module or first script argument, for anything else argv[1]
/// (`ape ./model.llamafile`). Its name is only a base name: `comm` holds no directories.
fn runner_of(process: &Process) -> Option<&'static str> {
    let mut clues = vec![Clue {
        base: process.name.to_lowercase(),
        dirs: Vec::new(),
    }];
    if let Some(exe) = &process.exe {
        clues.push(Clue::of(&exe.to_string_lossy()));
    }
    let mut argv = process.argv.iter();
    if let Some(first) = argv.next() {
        clues.push(Clue::of(first));
    }
    let interpreter = clues.iter().any(|c| is_interpreter(&c.base));
    let mut args = argv.take(MAX_ARGS_EXAMINED);
    if interpreter {
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-m" => {
                    clues.extend(args.next().map(|module| Clue::of(module)));
                    break;
                }
                // Code on the command line: nothing to name.
                "-c" => break,
                option if option.starts_with('-') => {}
                script => {
                    clues.push(Clue::of(script));
                    break;
                }
            }
        }
    } else if let Some(second) = args.next().filter(|a| !a.starts_with('-')) {
        clues.push(Clue::of(second));
    }
    clues.iter().find_map(|clue| {
        RUNNERS
            .iter()
            .find(|(pattern, _)| clue.matches(*pattern))
            .map(|(_, runner)| *runner)
    })
}

/// Processes on a GPU, from `nvidia-smi`: none when it is not installed; a note when it fails or
/// takes longer than [`NVIDIA_SMI_TIMEOUT`].
fn gpu_processes(notes: &mut Vec<String>) -> Vec<GpuProcess> {
    let mut command = Command::new("nvidia-smi");
    command.args([
        "--query-compute-apps=pid,process_name,used_memory",
        "--format=csv,noheader,nounits",
    ]);
    match output_within(&mut command, NVIDIA_SMI_TIMEOUT) {
        Ok(out) => parse_nvidia_smi(&String::from_utf8_lossy(&out)),
        Err(RunError::NotFound) => Vec::new(),
        Err(e) => {
            notes.push(format!("no GPU processes listed: nvidia-smi {e}"));
            Vec::new()
        }
    }
}

/// Why a command gave no output.
#[derive(Debug)]
enum RunError {
    /// It is not installed.
    NotFound,
    /// It could not be started or waited for.
    Io(io::Error),
    /// It ran past its time and was killed.
    TimedOut(Duration),
    /// It exited unsuccessfully; the first line of its output (nvidia-smi explains itself there).
    Failed(ExitStatus, String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::NotFound => write!(f, "is not installed"),
            RunError::Io(e) => write!(f, "could not be run: {e}"),
            RunError::TimedOut(limit) => write!(f, "took longer than {limit:?} and was stopped"),
            RunError::Failed(status, line) if line.is_empty() => write!(f, "failed ({status})"),
            RunError::Failed(status, line) => write!(f, "failed ({status}): {line}"),
        }
    }
}

/// Runs `command` and returns its standard output (the first [`MAX_NVIDIA_SMI_OUTPUT`] bytes), or
/// kills it once `timeout` has passed: the scan never waits longer. Its output is drained on another
/// thread, so a command that writes more than a pipe holds cannot block on a reader that is waiting
/// for it to exit.
fn output_within(command: &mut Command, timeout: Duration) -> Result<Vec<u8>, RunError> {
    let deadline = Instant::now() + timeout;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => RunError::NotFound,
            _ => RunError::Io(e),
        })?;
    let (sender, output) = mpsc::channel();
    if let Some(mut stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let _ = stdout
                .by_ref()
                .take(MAX_NVIDIA_SMI_OUTPUT)
                .read_to_end(&mut kept);
            let _ = io::copy(&mut stdout, &mut io::sink());
            let _ = sender.send(kept);
        });
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            waited => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(match waited {
                    Err(e) => RunError::Io(e),
                    _ => RunError::TimedOut(timeout),
                });
            }
        }
    };
    // The output ends when the pipe closes; a grandchild still holding it open gets until the
    // deadline (and what it has not written by then is not waited for).
    let remaining = deadline.saturating_duration_since(Instant::now());
    let out = output.recv_timeout(remaining).unwrap_or_default();
    if !status.success() {
        let text = String::from_utf8_lossy(&out);
        let line = text.lines().next().unwrap_or_default().trim();
        return Err(RunError::Failed(status, line.chars().take(200).collect()));
    }
    Ok(out)
}

/// Parses `pid, process_name, used_memory` lines (`--format=csv,noheader,nounits`). The name is
/// everything between the first and last comma, so a path with a comma in it survives.
fn parse_nvidia_smi(text: &str) -> Vec<GpuProcess> {
    text.lines()
        .filter_map(|line| {
            let (pid, rest) = line.split_once(',')?;
            let (name, memory) = rest.rsplit_once(',')?;
            Some(GpuProcess {
                pid: pid.trim().parse().ok()?,
                name: name.trim().to_string(),
                used_memory_mib: memory.trim().parse().ok(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines from this machine's /proc/net/tcp and tcp6 (x86_64, Linux), with Python listening on
    // 127.0.0.1, 0.0.0.0, 127.1.2.3, ::1, :: and ::ffff:127.0.0.1 (IPV6_V6ONLY off), a connection
    // established to one, one in TIME_WAIT, and one listening as nobody.
    const TCP_HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode                                                     ";
    const V4_LOOPBACK: &str = "   2: 0100007F:B1D3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 350976 1 00000000c5dedd5c 100 0 0 10 0                    ";
    const V4_ANY: &str = "   0: 00000000:C281 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 350977 1 0000000038e3437b 100 0 0 10 0                    ";
    const V4_OTHER_LOOPBACK: &str = "   3: 0302017F:D6BD 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 350981 1 00000000452ac01b 100 0 0 10 0                    ";
    const V4_NOBODY: &str = "   0: 0100007F:DDA5 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 354001 1 0000000070e1eb9e 100 0 0 10 0                    ";
    const V4_ESTABLISHED: &str = "   2: 0100007F:D112 0100007F:AE5B 01 00000000:00000000 00:00000000 00000000     0        0 351139 2 00000000c5dedd5c 20 0 0 10 -1                    ";
    const V4_TIME_WAIT: &str = "   2: 0100007F:D112 0100007F:AE5B 06 00000000:00000000 03:000014A3 00000000     0        0 0 3 00000000dfe4f9a7                                      ";
    const TCP6_HEADER: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
    const V6_MAPPED: &str = "   0: 0000000000000000FFFF00000100007F:DB2B 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 350980 1 00000000cf31d863 100 0 0 10 0";
    const V6_ANY: &str = "   1: 00000000000000000000000000000000:8CA7 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 350979 1 00000000bfb553b4 100 0 0 10 0";
    const V6_LOOPBACK: &str = "   2: 00000000000000000000000001000000:DFFB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 350978 1 000000003d05a8df 100 0 0 10 0";

    fn socket(line: &str) -> Socket {
        parse_line(line).unwrap_or_else(|| panic!("unparsed: {line}"))
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn proc_net_lines_parse_as_the_kernel_writes_them() {
        let cases = [
            (V4_LOOPBACK, "127.0.0.1", 45523, 350976),
            (V4_ANY, "0.0.0.0", 49793, 350977),
            (V4_OTHER_LOOPBACK, "127.1.2.3", 54973, 350981),
            (V6_LOOPBACK, "::1", 57339, 350978),
            (V6_ANY, "::", 36007, 350979),
            (V6_MAPPED, "::ffff:127.0.0.1", 56107, 350980),
        ];
        for (line, address, port, inode) in cases {
            let s = socket(line);
            assert_eq!(s.address, address.parse::<IpAddr>().unwrap(), "{line}");
            assert_eq!((s.port, s.inode, s.uid), (port, inode, 0), "{line}");
            assert_eq!(s.state, TCP_LISTEN);
        }
        assert_eq!(socket(V4_NOBODY).uid, 65534);
        assert_eq!(socket(V4_ESTABLISHED).state, "01");
        assert_eq!(socket(V4_TIME_WAIT).state, "06");
        assert_eq!(socket(V4_TIME_WAIT).inode, 0);
    }

    #[test]
    fn headers_and_malformed_lines_are_skipped() {
        for line in [
            TCP_HEADER,
            TCP6_HEADER,
            "",
            "garbage",
            "   0: 0100007F:B1D3",
            "   0: 0100007:B1D3 00000000:0000 0A 0:0 00:0 0 0 0 1",
            "   0: 0100007F:10000 00000000:0000 0A 0:0 00:0 0 0 0 1",
            "   0: 0100007G:B1D3 00000000:0000 0A 0:0 00:0 0 0 0 1",
            "   0: 0100007F:B1D3 00000000:0000 0A 0:0 00:0 0 -1 0 1",
        ] {
            assert_eq!(parse_line(line), None, "{line:?}");
        }
    }

    #[test]
    fn cmdlines_split_at_nuls_and_survive_truncation() {
        assert_eq!(parse_cmdline(b"ollama\0serve\0"), ["ollama", "serve"]);
        assert_eq!(parse_cmdline(b"python3\0-c\0"), ["python3", "-c"]);
        // Cut off mid-argument (and mid-character) at MAX_CMDLINE.
        assert_eq!(parse_cmdline(b"a\0b\xc3"), ["a", "b\u{fffd}"]);
        assert_eq!(parse_cmdline(b"a\0\0b\0"), ["a", "", "b"]);
        assert!(parse_cmdline(b"").is_empty());
        assert!(parse_cmdline(b"\0").is_empty());
    }

    fn process(name: &str, exe: Option<&str>, argv: &[&str]) -> Process {
        Process {
            pid: 1,
            name: name.into(),
            exe: exe.map(PathBuf::from),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            gpu_memory_mib: None,
        }
    }

    #[test]
    fn runners_are_known_by_executable_or_what_an_interpreter_runs() {
        let cases = [
            (
                process(
                    "ollama",
                    Some("/usr/local/bin/ollama"),
                    &["/usr/local/bin/ollama", "serve"],
                ),
                Some("Ollama"),
            ),
            (
                process(
                    "ollama_llama_se",
                    Some("/tmp/ollama123/runners/cuda_v12/ollama_llama_server"),
                    &[
                        "/tmp/ollama123/runners/cuda_v12/ollama_llama_server",
                        "--model",
                    ],
                ),
                Some("Ollama"),
            ),
            (
                process("llama-server", None, &["./llama-server", "-m", "x.gguf"]),
                Some("llama.cpp llama-server"),
            ),
            (
                process(
                    "server",
                    Some("/home/u/src/llama.cpp/build/bin/server"),
                    &["./server", "-m", "x.gguf"],
                ),
                Some("llama.cpp llama-server"),
            ),
            // Another `server` is just a server.
            (
                process("server", Some("/opt/app/bin/server"), &["./server"]),
                None,
            ),
            // comm is cut at 15 bytes; argv[0] is whole.
            (
                process(
                    "Mistral-7B-Inst",
                    None,
                    &["./Mistral-7B-Instruct.llamafile"],
                ),
                Some("llamafile"),
            ),
            (
                process(
                    ".ape-1.10",
                    Some("/root/.ape-1.10"),
                    &["/root/.ape-1.10", "./llava.llamafile", "--server"],
                ),
                Some("llamafile"),
            ),
            (
                process(
                    "llamafile-0.8.",
                    None,
                    &["llamafile-0.8.13", "-m", "x.gguf"],
                ),
                Some("llamafile"),
            ),
            (
                process(
                    "lm-studio",
                    Some("/tmp/.mount_LM-StuAbCdEf/lm-studio"),
                    &["/tmp/.mount_LM-StuAbCdEf/lm-studio"],
                ),
                Some("LM Studio"),
            ),
            (
                process(
                    "LM Studio",
                    Some("/Applications/LM Studio.app/Contents/MacOS/LM Studio"),
                    &["/Applications/LM Studio.app/Contents/MacOS/LM Studio"],
                ),
                Some("LM Studio"),
            ),
            (
                process(
                    "node",
                    Some("/usr/bin/node"),
                    &["node", "/home/u/.lmstudio/bin/lms", "server", "start"],
                ),
                Some("LM Studio"),
            ),
            (
                process(
                    "python3",
                    Some("/usr/bin/python3.11"),
                    &["python3", "-u", "-m", "vllm.entrypoints.openai.api_server"],
                ),
                Some("vLLM"),
            ),
            (
                process(
                    "vllm",
                    Some("/venv/bin/python3.12"),
                    &["/venv/bin/python", "/venv/bin/vllm", "serve", "m"],
                ),
                Some("vLLM"),
            ),
            (
                process(
                    "text-generation",
                    None,
                    &["text-generation-router", "--port", "80"],
                ),
                Some("Hugging Face TGI"),
            ),
            (
                process(
                    "python3",
                    Some("/usr/bin/python3"),
                    &["python3", "-m", "sglang.launch_server", "--model-path", "m"],
                ),
                Some("SGLang"),
            ),
            (
                process(
                    "python3",
                    None,
                    &["python3", "-m", "llama_cpp.server", "--model", "m.gguf"],
                ),
                Some("llama-cpp-python"),
            ),
            (
                process(
                    "koboldcpp-linux",
                    None,
                    &["./koboldcpp-linux-x64-cuda1210", "--model", "m.gguf"],
                ),
                Some("KoboldCpp"),
            ),
            (
                process("python3", None, &["python3", "koboldcpp.py", "m.gguf"]),
                Some("KoboldCpp"),
            ),
            (
                process(
                    "python",
                    Some("/home/u/tabbyAPI/venv/bin/python3.11"),
                    &["python", "main.py"],
                ),
                Some("TabbyAPI"),
            ),
            (
                process("chat", Some("/home/u/gpt4all/bin/chat"), &["chat"]),
                Some("GPT4All"),
            ),
            (
                process("local-ai", Some("/usr/bin/local-ai"), &["local-ai", "run"]),
                Some("LocalAI"),
            ),
            (
                process("sanctum", None, &["sanctum", "hub", "serve"]),
                Some("sanctum"),
            ),
            (
                process("python3", None, &["python3", "-m", "http.server"]),
                None,
            ),
            // `-c` code names nothing, even when it mentions a runner.
            (
                process("python3", None, &["python3", "-c", "import vllm", "ollama"]),
                None,
            ),
            (process("nginx", Some("/usr/sbin/nginx"), &["nginx"]), None),
            // A process that has gone leaves nothing to match.
            (process("", None, &[]), None),
        ];
        for (process, want) in cases {
            assert_eq!(runner_of(&process), want, "{process:?}");
        }
    }

    #[test]
    fn interpreters_are_known_with_their_versions() {
        for base in [
            "python",
            "python3",
            "python3.11",
            "node",
            "sh",
            "ape",
            ".ape-1.10",
        ] {
            assert!(is_interpreter(base), "{base}");
        }
        for base in [
            "sshd",
            "shairport",
            "pythonista",
            "nodered",
            "apex",
            "ollama",
        ] {
            assert!(!is_interpreter(base), "{base}");
        }
    }

    #[test]
    fn known_ports_are_the_runners_defaults() {
        assert_eq!(known_port(11434), Some("Ollama"));
        assert_eq!(known_port(12434), Some("Docker Model Runner"));
        assert_eq!(known_port(1234), Some("LM Studio"));
        assert_eq!(known_port(22), None);
    }

    #[test]
    fn nvidia_smi_output_parses() {
        let gpu = parse_nvidia_smi(
            "4242, /usr/local/bin/ollama, 5120\n17, python3, [N/A]\n99, /opt/a,b/server, 10\nbad line\n\n",
        );
        assert_eq!(
            gpu,
            [
                GpuProcess {
                    pid: 4242,
                    name: "/usr/local/bin/ollama".into(),
                    used_memory_mib: Some(5120)
                },
                GpuProcess {
                    pid: 17,
                    name: "python3".into(),
                    used_memory_mib: None
                },
                GpuProcess {
                    pid: 99,
                    name: "/opt/a,b/server".into(),
                    used_memory_mib: Some(10)
                },
            ]
        );
        // No compute processes: nvidia-smi prints nothing.
        assert!(parse_nvidia_smi("").is_empty());
    }

    #[test]
    #[cfg(unix)]
    fn commands_are_bounded_in_time_and_output() {
        let missing = output_within(
            &mut Command::new("sanctum-no-such-command"),
            Duration::from_secs(5),
        );
        assert!(matches!(missing, Err(RunError::NotFound)), "{missing:?}");

        let started = Instant::now();
        let hung = output_within(
            Command::new("sh").args(["-c", "sleep 30"]),
            Duration::from_millis(200),
        );
        assert!(matches!(hung, Err(RunError::TimedOut(_))), "{hung:?}");
        assert!(started.elapsed() < Duration::from_secs(5));

        // More than a pipe holds, and more than is kept: drained, not deadlocked.
        let big = output_within(
            Command::new("sh").args(["-c", "head -c 3000000 /dev/zero"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(big.len() as u64, MAX_NVIDIA_SMI_OUTPUT);

        let failed = output_within(
            Command::new("sh").args(["-c", "echo 'NVIDIA-SMI has failed'; exit 9"]),
            Duration::from_secs(5),
        );
        assert_eq!(
            failed.map_err(|e| e.to_string()).unwrap_err(),
            "failed (exit status: 9): NVIDIA-SMI has failed"
        );
    }

    /// A fake `/proc`: `net/tcp{,6}` and per-process `comm`, `cmdline`, `exe` and `fd/` links.
    #[cfg(unix)]
    struct FakeProc(tempfile::TempDir);

    #[cfg(unix)]
    impl FakeProc {
        fn new(tcp: &[&str], tcp6: &[&str]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir(dir.path().join("net")).unwrap();
            fs::write(dir.path().join("net/tcp"), tcp.join("\n")).unwrap();
            fs::write(dir.path().join("net/tcp6"), tcp6.join("\n")).unwrap();
            Self(dir)
        }

        fn process(&self, pid: u32, comm: &str, exe: &str, cmdline: &[u8], fds: &[&str]) {
            let dir = self.0.path().join(pid.to_string());
            fs::create_dir_all(dir.join("fd")).unwrap();
            fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            fs::write(dir.join("cmdline"), cmdline).unwrap();
            std::os::unix::fs::symlink(exe, dir.join("exe")).unwrap();
            for (fd, target) in fds.iter().enumerate() {
                std::os::unix::fs::symlink(target, dir.join("fd").join(fd.to_string())).unwrap();
            }
        }
    }

    #[test]
    #[cfg(all(unix, target_endian = "little"))]
    fn a_proc_tree_maps_sockets_to_processes() {
        // The unowned socket on Ollama's port (a copy of V4_ANY's line with port 11434).
        let hidden_ollama = V4_ANY.replace("C281", "2CAA").replace("350977", "777");
        let proc = FakeProc::new(
            &[
                TCP_HEADER,
                V4_ANY,
                V4_LOOPBACK,
                V4_LOOPBACK,
                V4_ESTABLISHED,
                V4_TIME_WAIT,
                &hidden_ollama,
            ],
            &[TCP6_HEADER, V6_LOOPBACK, V6_MAPPED],
        );
        proc.process(
            10,
            "ollama",
            "/usr/local/bin/ollama",
            b"ollama\0serve\0",
            &[
                "/dev/null",
                "pipe:[5]",
                "socket:[350976]",
                "socket:[351139]",
            ],
        );
        // A forked worker sharing the socket: the lower pid names it.
        proc.process(
            11,
            "ollama",
            "/usr/local/bin/ollama",
            b"ollama\0serve\0",
            &["socket:[350976]"],
        );
        proc.process(
            20,
            "python3",
            "/usr/bin/python3.11",
            b"python3\0-m\0http.server\0",
            &["socket:[350977]", "socket:[350978]", "socket:[350980]"],
        );
        // Another user's process: its directory is there, its fds are not readable.
        fs::create_dir_all(proc.0.path().join("30")).unwrap();
        fs::create_dir_all(proc.0.path().join("self")).unwrap();
        fs::create_dir_all(proc.0.path().join("sys")).unwrap();

        let inventory = scan_proc(proc.0.path());
        type Summary<'a> = (&'a str, String, u16, Option<u32>, Option<&'a str>, bool);
        let summary: Vec<Summary> = inventory
            .listeners
            .iter()
            .map(|l| {
                (
                    l.protocol,
                    l.address.to_string(),
                    l.port,
                    l.process.as_ref().map(|p| p.pid),
                    l.runner.as_deref(),
                    l.inference,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("tcp", "0.0.0.0".into(), 11434, None, None, true),
                (
                    "tcp",
                    "127.0.0.1".into(),
                    45523,
                    Some(10),
                    Some("Ollama"),
                    true
                ),
                ("tcp", "0.0.0.0".into(), 49793, Some(20), None, false),
                (
                    "tcp6",
                    "::ffff:127.0.0.1".into(),
                    56107,
                    Some(20),
                    None,
                    false
                ),
                ("tcp6", "::1".into(), 57339, Some(20), None, false),
            ]
        );
        assert_eq!(inventory.listeners[0].known_port.as_deref(), Some("Ollama"));
        assert_eq!(
            inventory.listeners[1].process,
            Some(Process {
                pid: 10,
                name: "ollama".into(),
                exe: Some("/usr/local/bin/ollama".into()),
                argv: vec!["ollama".into(), "serve".into()],
                gpu_memory_mib: None,
            })
        );
        assert_eq!(inventory.notes.len(), 1, "{:?}", inventory.notes);
        assert!(
            inventory.notes[0].starts_with("1 listening socket(s) held by no process"),
            "{:?}",
            inventory.notes
        );
        let json = serde_json::to_value(&inventory.listeners[1]).unwrap();
        assert_eq!(json["address"], "127.0.0.1");
        assert_eq!(json["process"]["argv"][1], "serve");
        assert_eq!(json["known_port"], serde_json::Value::Null);
    }

    #[test]
    fn a_missing_proc_is_notes_not_errors() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = scan_proc(dir.path());
        assert!(inventory.listeners.is_empty());
        assert_eq!(inventory.notes.len(), 2, "{:?}", inventory.notes);
        assert!(inventory.notes[0].starts_with("cannot read "));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn finds_this_process_listening() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let inventory = scan();
        let found = inventory
            .listeners
            .iter()
            .find(|l| l.port == port)
            .unwrap_or_else(|| panic!("port {port} not found: {inventory:?}"));
        assert_eq!(found.protocol, "tcp");
        assert_eq!(found.address, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let process = found.process.as_ref().unwrap();
        assert_eq!(process.pid, std::process::id());
        assert_eq!(process.exe, std::env::current_exe().ok());
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn finds_a_child_listening_with_its_arguments() {
        /// Kills the child when the test ends, passed or failed.
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = Kill(
            Command::new("python3")
                .args([
                    "-c",
                    "import socket,time; s=socket.socket(socket.AF_INET6); s.bind(('::1',0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(30)",
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().unwrap();
        let found = scan_proc(Path::new("/proc"))
            .listeners
            .into_iter()
            .find(|l| l.port == port)
            .unwrap();
        assert_eq!(found.protocol, "tcp6");
        assert_eq!(found.address, IpAddr::V6(Ipv6Addr::LOCALHOST));
        let process = found.process.unwrap();
        assert_eq!(process.pid, child.0.id());
        // argv[0] is whatever the python3 on PATH execs (a pyenv shim runs the real one).
        assert_eq!(process.argv.get(1).map(String::as_str), Some("-c"));
        assert!(
            process.argv.iter().any(|a| a.contains("getsockname")),
            "{process:?}"
        );
        assert_eq!(found.runner, None);
        assert!(!found.inference);
    }
}
