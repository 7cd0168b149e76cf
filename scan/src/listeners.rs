//! Which local inference servers are running: listening TCP sockets (`/proc/net/tcp`, `tcp6`)
//! mapped to the processes that hold them (through `/proc/<pid>/fd`), flagged when the process is a
//! known model runner or the port is a runner's default; and the processes on a GPU, from
//! `nvidia-smi` where it is installed. Linux only; elsewhere the inventory is empty with a note.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Bytes of a process's command line kept (a hostile process can have megabytes of arguments).
const MAX_CMDLINE: u64 = 4096;

/// File descriptors examined per process, and in all, so a process with a million open files cannot
/// stall the scan.
const MAX_FDS_PER_PROCESS: usize = 65_536;
const MAX_FDS: usize = 1 << 20;

/// How long `nvidia-smi` may take before it is killed.
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(5);

/// Model runners, recognized by the executable's base name or the first arguments: (what to look
/// for, the runner's name). Matched case-insensitively against the executable's base name, argv[0]'s
/// base name and, for interpreters, the module or script they run.
const RUNNERS: &[(&str, &str)] = &[
    ("ollama", "Ollama"),
    ("llama-server", "llama.cpp llama-server"),
    ("llama-cli", "llama.cpp llama-cli"),
    ("llamafile", "llamafile"),
    ("lms", "LM Studio"),
    ("lm studio", "LM Studio"),
    ("lm-studio", "LM Studio"),
    ("lmstudio", "LM Studio"),
    ("vllm", "vLLM"),
    ("vllm.entrypoints.openai.api_server", "vLLM"),
    ("text-generation-launcher", "Hugging Face TGI"),
    ("text-generation-server", "Hugging Face TGI"),
    ("local-ai", "LocalAI"),
    ("localai", "LocalAI"),
    ("koboldcpp", "KoboldCpp"),
    ("mlx_lm.server", "MLX LM server"),
    ("sglang.launch_server", "SGLang"),
    ("tabbyapi", "TabbyAPI"),
    ("jan", "Jan"),
    ("sanctum", "sanctum"),
];

/// Ports that model runners listen on by default.
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
    /// The local address it is bound to.
    pub address: IpAddr,
    /// The local port.
    pub port: u16,
    /// The owner's user id.
    pub uid: u32,
    /// The process that holds it, when visible (another user's are not, without root).
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
    /// Its name (`/proc/<pid>/comm`).
    pub name: String,
    /// Its executable, when readable.
    pub exe: Option<PathBuf>,
    /// Its arguments (the first [`MAX_CMDLINE`] bytes).
    pub argv: Vec<String>,
    /// GPU memory it uses, from `nvidia-smi`.
    pub gpu_memory_mib: Option<u64>,
}

/// A process on a GPU, as `nvidia-smi` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuProcess {
    /// Its id.
    pub pid: u32,
    /// Its name as `nvidia-smi` gives it.
    pub name: String,
    /// GPU memory used, MiB.
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

/// The inventory of this machine.
pub fn scan() -> Inventory {
    if !cfg!(target_os = "linux") {
        return Inventory {
            notes: vec!["listening sockets are read from /proc, which this system lacks".into()],
            ..Inventory::default()
        };
    }
    let mut inventory = scan_proc(Path::new("/proc"));
    inventory.gpu_processes = gpu_processes();
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

/// The listening sockets of the `/proc` at `root` (GPU processes are not asked for).
pub fn scan_proc(root: &Path) -> Inventory {
    let mut inventory = Inventory::default();
    let mut sockets: Vec<(&'static str, Socket)> = Vec::new();
    for protocol in ["tcp", "tcp6"] {
        match fs::read_to_string(root.join("net").join(protocol)) {
            Ok(table) => sockets.extend(
                table
                    .lines()
                    .skip(1)
                    .filter_map(parse_line)
                    .filter(|s| s.listening)
                    .map(|s| (protocol, s)),
            ),
            Err(e) => inventory.notes.push(format!(
                "cannot read {}: {e}",
                root.join("net").join(protocol).display()
            )),
        }
    }
    let wanted: BTreeSet<u64> = sockets.iter().map(|(_, s)| s.inode).collect();
    let owners = socket_owners(root, &wanted);
    let mut hidden = 0;
    let mut seen = BTreeSet::new();
    for (protocol, socket) in sockets {
        if !seen.insert((socket.address, socket.port, socket.inode)) {
            continue;
        }
        let process = owners
            .get(&socket.inode)
            .map(|&pid| read_process(root, pid));
        if process.is_none() {
            hidden += 1;
        }
        let runner = process.as_ref().and_then(runner_of);
        let known_port = KNOWN_PORTS
            .iter()
            .find(|(p, _)| *p == socket.port)
            .map(|(_, name)| (*name).to_string());
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
            "{hidden} listening socket(s) held by no process visible here (another user's, or another PID namespace's; as root in the host namespace they are named)"
        ));
    }
    inventory.listeners.sort_by_key(|l| (l.port, l.address));
    inventory
}

/// One row of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Socket {
    address: IpAddr,
    port: u16,
    listening: bool,
    uid: u32,
    inode: u64,
}

/// Parses `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...`.
fn parse_line(line: &str) -> Option<Socket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (address, port) = fields.get(1)?.split_once(':')?;
    Some(Socket {
        address: parse_address(address)?,
        port: u16::from_str_radix(port, 16).ok()?,
        listening: *fields.get(3)? == "0A",
        uid: fields.get(7)?.parse().ok()?,
        inode: fields.get(9)?.parse().ok()?,
    })
}

/// The kernel prints each 32-bit word of the address in host byte order (little-endian here).
fn parse_address(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let text = hex.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(text, 16).ok()?.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Which process holds each wanted socket inode: `/proc/<pid>/fd/*` links read `socket:[INODE]`.
/// Processes that exit or cannot be read are skipped.
fn socket_owners(root: &Path, wanted: &BTreeSet<u64>) -> HashMap<u64, u32> {
    let mut owners = HashMap::new();
    let Ok(entries) = fs::read_dir(root) else {
        return owners;
    };
    let mut budget = MAX_FDS;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten().take(MAX_FDS_PER_PROCESS.min(budget)) {
            budget -= 1;
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if let Some(inode) = inode.filter(|i| wanted.contains(i)) {
                owners.entry(inode).or_insert(pid);
            }
        }
        if budget == 0 || owners.len() == wanted.len() {
            break;
        }
    }
    owners
}

fn read_process(root: &Path, pid: u32) -> Process {
    let dir = root.join(pid.to_string());
    let name = fs::read_to_string(dir.join("comm"))
        .map(|n| n.trim_end().to_string())
        .unwrap_or_default();
    let mut cmdline = Vec::new();
    if let Ok(file) = fs::File::open(dir.join("cmdline")) {
        let _ = file.take(MAX_CMDLINE).read_to_end(&mut cmdline);
    }
    let argv = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Process {
        pid,
        name,
        exe: fs::read_link(dir.join("exe")).ok(),
        argv,
        gpu_memory_mib: None,
    }
}

/// The runner a process is: its executable's, its name's or argv[0]'s base name, or for an
/// interpreter (`python -m vllm…`, `node …/lms`) the module or script it runs.
fn runner_of(process: &Process) -> Option<String> {
    let base = |s: &str| {
        Path::new(s)
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default()
    };
    let mut names = vec![process.name.to_lowercase()];
    if let Some(exe) = &process.exe {
        names.push(base(&exe.to_string_lossy()));
    }
    if let Some(first) = process.argv.first() {
        names.push(base(first));
    }
    // `python -m module`, `python script`, `node script`: what the interpreter runs.
    let interpreter = names
        .iter()
        .any(|n| n.starts_with("python") || n == "node" || n == "uv" || n == "bun");
    if interpreter {
        let mut args = process.argv.iter().skip(1);
        while let Some(arg) = args.next() {
            if arg == "-m" {
                if let Some(module) = args.next() {
                    names.push(module.to_lowercase());
                }
                break;
            }
            if !arg.starts_with('-') {
                names.push(base(arg));
                break;
            }
        }
    }
    names.iter().find_map(|name| {
        let stem = name.strip_suffix(".exe").unwrap_or(name);
        RUNNERS
            .iter()
            .find(|(pattern, _)| {
                stem == *pattern
                    || (*pattern == "llamafile" && stem.ends_with(".llamafile"))
                    || stem.starts_with(&format!("{pattern}."))
            })
            .map(|(_, runner)| (*runner).to_string())
    })
}

/// Processes on a GPU, from `nvidia-smi` (none when it is not installed, fails or hangs).
fn gpu_processes() -> Vec<GpuProcess> {
    let child = Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,process_name,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return Vec::new();
    };
    let deadline = Instant::now() + NVIDIA_SMI_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Vec::new();
            }
        }
    }
    let mut out = String::new();
    if let Some(stdout) = child.stdout.as_mut() {
        let _ = stdout.take(1 << 20).read_to_string(&mut out);
    }
    parse_nvidia_smi(&out)
}

/// Parses `pid, name, used_memory` lines (`--format=csv,noheader,nounits`).
fn parse_nvidia_smi(text: &str) -> Vec<GpuProcess> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(',').map(str::trim);
            let pid = fields.next()?.parse().ok()?;
            let name = fields.next()?.to_string();
            let used_memory_mib = fields.next().and_then(|m| m.parse().ok());
            Some(GpuProcess {
                pid,
                name,
                used_memory_mib,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn proc_net_lines_parse_as_the_kernel_writes_them() {
        let v4 = "   0: 0100007F:2CAA 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 123456 1 0000000000000000 100 0 0 10 0";
        let socket = parse_line(v4).unwrap();
        assert_eq!(socket.address, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(socket.port, 11434);
        assert!(socket.listening);
        assert_eq!((socket.uid, socket.inode), (1000, 123456));
        let any = "   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1 0 100 0 0 10 0";
        assert_eq!(
            parse_line(any).unwrap().address,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        );
        let established = "   2: 0100007F:2CAA 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1000        0 9 1 0 20 4 30 10 -1";
        assert!(!parse_line(established).unwrap().listening);
        let loopback6 = "   0: 00000000000000000000000001000000:04D2 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5 1 0 100 0 0 10 0";
        assert_eq!(
            parse_line(loopback6).unwrap().address,
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        );
        let mapped = "   0: 0000000000000000FFFF00000100007F:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 6 1 0 100 0 0 10 0";
        assert_eq!(
            parse_line(mapped).unwrap().address,
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped())
        );
        assert_eq!(parse_line("  sl  local_address rem_address   st"), None);
        assert_eq!(parse_line("garbage"), None);
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
                    &["ollama", "serve"],
                ),
                Some("Ollama"),
            ),
            (
                process("llama-server", None, &["./llama-server", "-m", "x.gguf"]),
                Some("llama.cpp llama-server"),
            ),
            (
                process("Mistral-7B.llamafile", None, &["./Mistral-7B.llamafile"]),
                Some("llamafile"),
            ),
            (
                process(
                    "python3",
                    Some("/usr/bin/python3.11"),
                    &["python3", "-m", "vllm.entrypoints.openai.api_server"],
                ),
                Some("vLLM"),
            ),
            (
                process(
                    "vllm",
                    None,
                    &["/venv/bin/python", "/venv/bin/vllm", "serve", "m"],
                ),
                Some("vLLM"),
            ),
            (
                process(
                    "text-generation-",
                    None,
                    &["text-generation-launcher", "--model-id", "m"],
                ),
                Some("Hugging Face TGI"),
            ),
            (
                process("sanctum", None, &["sanctum", "serve"]),
                Some("sanctum"),
            ),
            (
                process("python3", None, &["python3", "-m", "http.server"]),
                None,
            ),
            (process("nginx", Some("/usr/sbin/nginx"), &["nginx"]), None),
        ];
        for (process, want) in cases {
            assert_eq!(runner_of(&process).as_deref(), want, "{process:?}");
        }
    }

    #[test]
    fn nvidia_smi_output_parses() {
        let gpu = parse_nvidia_smi("4242, /usr/bin/ollama, 5120\n17, python3, [N/A]\nbad line\n");
        assert_eq!(gpu.len(), 2);
        assert_eq!((gpu[0].pid, gpu[0].used_memory_mib), (4242, Some(5120)));
        assert_eq!(
            (gpu[1].name.as_str(), gpu[1].used_memory_mib),
            ("python3", None)
        );
    }

    #[test]
    fn finds_this_process_listening() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let inventory = scan();
        let found = inventory
            .listeners
            .iter()
            .find(|l| l.port == port)
            .unwrap_or_else(|| panic!("port {port} not found: {inventory:?}"));
        assert_eq!(found.address, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(
            found.process.as_ref().map(|p| p.pid),
            Some(std::process::id())
        );
    }

    #[test]
    fn finds_a_child_listening_with_its_arguments() {
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
        assert!(
            process.argv.iter().any(|a| a.contains("getsockname")),
            "{process:?}"
        );
        assert!(!found.inference);
    }
}
