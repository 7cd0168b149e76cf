//! `sanctum scan` on a tree of real files (tests/scan/make_tree.py): the real models approved in
//! the store, a copied directory and a Hugging Face cache snapshot found through `HF_HOME`; a
//! tampered copy naming its changed file; the real GGUF; pickles that would run `os.system`,
//! `subprocess` or `eval` if loaded, plain and in torch's zip layout (one named `.safetensors`); an
//! Ollama models directory; and a process listening on 127.0.0.1:11434. Every one classified in the
//! JSON report, the CycloneDX output validated by cyclonedx-python-lib against the 1.6 schema,
//! picklescan's and modelscan's findings on the same pickles all among sanctum's, and the marker
//! file every payload would create never created.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::OnceLock;

use serde_json::Value;
use tempfile::TempDir;

use crate::support::{python, real_store, repo_lock, required, sanctum};

/// The tree, built once for every test of this module.
struct Tree {
    dir: TempDir,
    marker: PathBuf,
    store: PathBuf,
}

impl Tree {
    fn root(&self) -> PathBuf {
        self.dir.path().join("tree")
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root().join(relative)
    }

    /// `sanctum scan ARGS` as a user whose home is empty but for the tree's HF cache.
    fn scan(&self, args: &[&str]) -> assert_cmd::Command {
        let mut cmd = sanctum();
        cmd.env("HOME", self.dir.path().join("home"))
            .env("HF_HOME", self.path("hf"))
            .env_remove("HF_HUB_CACHE")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("OLLAMA_MODELS")
            .env_remove("LLAMA_CACHE")
            .arg("--store")
            .arg(&self.store)
            .arg("--lock")
            .arg(repo_lock())
            .arg("--quiet")
            .arg("scan")
            .args(args);
        cmd
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.scan(args).output().unwrap();
        assert!(
            out.status.code() == Some(0) || out.status.code() == Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn tree() -> Option<&'static Tree> {
    static TREE: OnceLock<Option<Tree>> = OnceLock::new();
    TREE.get_or_init(|| {
        let store = real_store()?;
        let gguf = required(
            std::env::var_os("SANCTUM_TEST_SMOLLM2_GGUF").map(PathBuf::from),
            "SANCTUM_TEST_SMOLLM2_GGUF is not set (scripts/test sets it)",
        )?;
        let minilm = std::fs::read_dir(store.join("models/all-minilm-l6-v2"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let dir = TempDir::new().unwrap();
        std::fs::create_dir(dir.path().join("home")).unwrap();
        let marker = dir.path().join("MARKER");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scan/make_tree.py");
        let status = Process::new("python3")
            .arg(script)
            .arg(dir.path().join("tree"))
            .arg(&marker)
            .arg(&minilm)
            .arg(&gguf)
            .status()
            .unwrap();
        assert!(status.success(), "make_tree.py failed");
        Some(Tree { dir, marker, store })
    })
    .as_ref()
}

/// A process listening on 127.0.0.1:PORT until dropped.
struct Listener(Child);

impl Listener {
    fn start(port: u16) -> Self {
        let mut child = Process::new("python3")
            .args([
                "-c",
                "import socket,sys,time\n\
                 s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n\
                 print('ready', flush=True); time.sleep(120)",
            ])
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "could not listen on 127.0.0.1:{port}: is something else there?"
        );
        Self(child)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn file<'a>(report: &'a Value, path: &Path) -> &'a Value {
    report["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| Path::new(f["path"].as_str().unwrap()) == path)
        .unwrap_or_else(|| panic!("{} not in the report", path.display()))
}

fn models<'a>(report: &'a Value, name: &str) -> Vec<&'a Value> {
    report["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == name)
        .collect()
}

/// The dangerous globals sanctum found in a file, as `module.name`.
fn dangerous_globals(file: &Value) -> BTreeSet<String> {
    file["pickles"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["globals"].as_array().unwrap())
        .filter(|g| g["verdict"] == "dangerous")
        .map(|g| {
            format!(
                "{}.{}",
                g["module"].as_str().unwrap(),
                g["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// Every pickle of the tree: the plain ones and the torch zips.
fn pickles(tree: &Tree) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["pickles", "torch", "disguised"] {
        for entry in std::fs::read_dir(tree.path(dir)).unwrap() {
            files.push(entry.unwrap().path());
        }
    }
    files.sort();
    files
}

#[test]
fn scan_classifies_every_file_of_the_tree() {
    let Some(tree) = tree() else { return };
    let listener = Listener::start(11434);
    let report = tree.json(&[
        "--format",
        "json",
        "--fail-on",
        "never",
        &tree.root().to_string_lossy(),
    ]);

    // The HF cache was found through HF_HOME, the store as sanctum's.
    let roots = report["roots"].as_array().unwrap();
    assert!(
        roots.iter().any(|r| r["cache"] == "hugging-face"
            && Path::new(r["path"].as_str().unwrap()) == tree.path("hf/hub")),
        "{roots:?}"
    );

    // The real models: approved in the store, as a copied directory and as an HF snapshot.
    let smollm2 = models(&report, "smollm2-135m-instruct");
    assert_eq!(smollm2.len(), 1, "{smollm2:?}");
    assert_eq!(smollm2[0]["standing"], "approved");
    assert_eq!(smollm2[0]["approval"]["license"], "Apache-2.0");
    let minilm = models(&report, "all-minilm-l6-v2");
    let root_of = |m: &Value| PathBuf::from(m["root"].as_str().unwrap());
    let snapshot = tree.path(
        "hf/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/c9745ed1d9f207416be6d2e6f8de32d1f16199bf",
    );
    for (root, standing) in [
        (tree.path("approved/all-minilm-l6-v2"), "approved"),
        (snapshot.clone(), "approved"),
        (tree.path("tampered/all-minilm-l6-v2"), "tampered"),
    ] {
        let model = minilm
            .iter()
            .find(|m| root_of(m) == root)
            .unwrap_or_else(|| panic!("no all-minilm-l6-v2 at {}: {minilm:?}", root.display()));
        assert_eq!(model["standing"], standing, "{model}");
    }
    assert!(
        minilm
            .iter()
            .any(|m| m["standing"] == "approved" && root_of(m).starts_with(&tree.store))
    );
    let tampered = minilm.iter().find(|m| m["standing"] == "tampered").unwrap();
    assert_eq!(
        tampered["problems"][0]["file"], "model.safetensors",
        "{tampered}"
    );
    let changed = file(
        &report,
        &tree.path("tampered/all-minilm-l6-v2/model.safetensors"),
    );
    assert_eq!(changed["standing"], "tampered");
    assert_eq!(changed["approved_model"], "all-minilm-l6-v2");
    let linked = file(&report, &snapshot.join("model.safetensors"));
    assert_eq!(linked["standing"], "approved");
    assert_eq!(
        linked["origin"]["repo"],
        "sentence-transformers/all-MiniLM-L6-v2"
    );
    // The header's element counts summed (Python reads the same from the header: 22713728).
    assert_eq!(linked["parameters"], 22_713_728, "{linked}");

    // The GGUF: unapproved (the lock approves what it is imported to), its header read.
    let gguf = file(&report, &tree.path("gguf/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(gguf["standing"], "unapproved");
    assert_eq!(gguf["format"], "gguf");
    assert_eq!(gguf["architecture"], "llama");
    assert_eq!(gguf["parameters"], 134_515_008, "{gguf}");

    // Every malicious pickle is dangerous, naming what it imports; the benign ones are unapproved.
    for path in pickles(tree) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let found = file(&report, &path);
        let want = if name.starts_with("benign") {
            "unapproved"
        } else {
            "dangerous"
        };
        assert_eq!(found["standing"], want, "{}: {found}", path.display());
        if want == "dangerous" {
            assert!(!dangerous_globals(found).is_empty(), "{found}");
        }
    }
    let zip = file(&report, &tree.path("torch/os_system.pt"));
    assert_eq!(zip["format"], "pytorch-zip");
    assert!(dangerous_globals(zip).contains("posix.system"), "{zip}");
    // A .npy of Python objects carries a pickle; one of numbers does not.
    let objects = file(&report, &tree.path("numpy/objects.npy"));
    assert_eq!(objects["format"], "numpy");
    assert!(
        dangerous_globals(objects).contains("posix.system"),
        "{objects}"
    );
    assert_eq!(
        file(&report, &tree.path("numpy/numbers.npy"))["standing"],
        "unapproved"
    );
    let renamed = file(&report, &tree.path("pickles/notes.txt"));
    assert_eq!(renamed["format"], "pickle");
    let disguised = file(&report, &tree.path("disguised/model.safetensors"));
    let reasons = disguised["reasons"].to_string();
    assert!(
        reasons.contains("disguised: named .safetensors but its content is a PyTorch zip"),
        "{reasons}"
    );

    // The Ollama models: named from their manifests; a blob that is not its digest is tampered.
    let ollama = models(&report, "tinyllama:latest");
    assert_eq!(ollama.len(), 1, "{:?}", report["models"]);
    assert_eq!(ollama[0]["standing"], "unapproved");
    assert_eq!(ollama[0]["format"], "gguf");
    assert_eq!(ollama[0]["architecture"], "llama");
    let swapped = models(&report, "swapped:7b");
    assert_eq!(swapped[0]["standing"], "tampered", "{:?}", swapped);

    // The listener on Ollama's port, with the process that holds it.
    let listeners = report["listeners"].as_array().unwrap();
    let ollama_port = listeners
        .iter()
        .find(|l| l["port"] == 11434 && l["address"] == "127.0.0.1")
        .unwrap_or_else(|| panic!("no listener on 11434: {listeners:?}"));
    assert_eq!(ollama_port["inference"], true, "{ollama_port}");
    assert!(
        ollama_port["known_port"]
            .as_str()
            .unwrap()
            .contains("Ollama"),
        "{ollama_port}"
    );
    assert_eq!(
        ollama_port["process"]["pid"],
        listener.0.id(),
        "{ollama_port}"
    );
    drop(listener);

    assert_eq!(report["unreadable"], Value::Array(vec![]));
    assert!(!tree.marker.exists(), "a pickle was executed");
}

#[test]
fn scan_flags_every_global_picklescan_and_modelscan_flag() {
    let Some(tree) = tree() else { return };
    let Some(python) = python() else { return };
    let report = tree.json(&[
        "--format",
        "json",
        "--fail-on",
        "never",
        "--no-caches",
        "--no-listeners",
        &tree.root().to_string_lossy(),
    ]);
    let files = pickles(tree);
    let out = Process::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scan/peers.py"))
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peers: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut compared = 0;
    for path in &files {
        let ours = dangerous_globals(file(&report, path));
        for peer in ["picklescan", "modelscan"] {
            for global in peers[path.to_str().unwrap()][peer].as_array().unwrap() {
                let name = format!(
                    "{}.{}",
                    global[0].as_str().unwrap(),
                    global[1].as_str().unwrap()
                );
                assert!(
                    ours.contains(&name),
                    "{peer} flags {name} in {}; sanctum found {ours:?}",
                    path.display()
                );
                compared += 1;
            }
        }
    }
    // The peers did find something to compare with: both flag os.system in every protocol.
    assert!(compared >= 20, "{peers}");
    assert!(!tree.marker.exists(), "a pickle was executed");
}

#[test]
fn cyclonedx_output_validates_against_the_1_6_schema() {
    let Some(tree) = tree() else { return };
    let Some(python) = python() else { return };
    // At least one listening socket, so the BOM has a service to validate.
    let _listener = Listener::start(0);
    let bom = tree.json(&[
        "--format",
        "cyclonedx",
        "--fail-on",
        "never",
        &tree.root().to_string_lossy(),
    ]);
    let bom_path = tree.dir.path().join("bom.json");
    std::fs::write(&bom_path, serde_json::to_vec(&bom).unwrap()).unwrap();
    let check = Process::new(python)
        .args([
            "-c",
            "import sys\n\
             from cyclonedx.schema import SchemaVersion\n\
             from cyclonedx.validation.json import JsonStrictValidator\n\
             error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(open(sys.argv[1]).read())\n\
             sys.exit(f'invalid: {error.data.message} at {list(error.data.absolute_path)}' if error else 0)",
        ])
        .arg(&bom_path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let components = bom["components"].as_array().unwrap();
    let approved = components
        .iter()
        .find(|c| c["name"] == "smollm2-135m-instruct")
        .unwrap();
    assert_eq!(approved["type"], "machine-learning-model");
    assert_eq!(approved["licenses"][0]["expression"], "Apache-2.0");
    assert_eq!(
        approved["modelCard"]["modelParameters"]["task"],
        "text-generation"
    );
    let weights = approved["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap().ends_with("model.safetensors"))
        .unwrap();
    assert_eq!(
        weights["hashes"][0]["content"],
        "92c69692181bc1a9c41443d0230115b627f380cdf4d0f344eb4b0da21400a34f"
    );
    assert!(!bom["services"].as_array().unwrap().is_empty());
}

#[test]
fn fail_on_sets_the_exit_code_and_sarif_names_each_finding() {
    let Some(tree) = tree() else { return };
    let only = |dir: &str, fail_on: &str| {
        tree.scan(&[
            "--no-caches",
            "--no-listeners",
            "--fail-on",
            fail_on,
            &tree.path(dir).to_string_lossy(),
        ])
        .output()
        .unwrap()
    };
    assert_eq!(only("approved", "unapproved").status.code(), Some(0));
    assert_eq!(only("gguf", "unapproved").status.code(), Some(1));
    assert_eq!(only("gguf", "dangerous").status.code(), Some(0));
    let table = only("tampered", "unapproved");
    assert_eq!(table.status.code(), Some(1));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("tampered") && text.contains("model.safetensors: sha256"),
        "{text}"
    );
    assert_eq!(only("pickles", "dangerous").status.code(), Some(1));
    assert_eq!(only("pickles", "never").status.code(), Some(0));

    let sarif = tree.json(&[
        "--no-caches",
        "--no-listeners",
        "--format",
        "sarif",
        "--fail-on",
        "never",
        &tree.path("torch").to_string_lossy(),
    ]);
    assert_eq!(sarif["version"], "2.1.0");
    let results = sarif["runs"][0]["results"].as_array().unwrap();
    let dangerous: Vec<_> = results
        .iter()
        .filter(|r| r["ruleId"] == "sanctum/dangerous-model")
        .collect();
    assert_eq!(dangerous.len(), 3, "{results:?}");
    assert!(dangerous.iter().all(|r| {
        r["level"] == "error"
            && r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
                .as_str()
                .unwrap()
                .starts_with("file:///")
    }));
    assert!(!tree.marker.exists(), "a pickle was executed");
}

#[test]
fn hostile_and_unreadable_files_are_findings_not_failures() {
    let Some(tree) = tree() else { return };
    let dir = TempDir::new().unwrap();
    // A GGUF claiming a 2^63-byte string, one cut mid-header, a Safetensors header past the end,
    // a pickle of a million MARKs, and one unreadable file (unless we are root, who reads anything).
    let mut huge = b"GGUF".to_vec();
    huge.extend(3u32.to_le_bytes());
    huge.extend(0u64.to_le_bytes());
    huge.extend(1u64.to_le_bytes());
    huge.extend((1u64 << 63).to_le_bytes());
    std::fs::write(dir.path().join("huge.gguf"), &huge).unwrap();
    let real = std::fs::read(tree.path("gguf/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    std::fs::write(dir.path().join("cut.gguf"), &real[..5000]).unwrap();
    let mut beyond = 1000u64.to_le_bytes().to_vec();
    beyond.extend(b"{\"a\":");
    std::fs::write(dir.path().join("beyond.safetensors"), &beyond).unwrap();
    let mut marks = vec![0x80, 4];
    marks.extend(std::iter::repeat_n(b'(', 1_000_000));
    std::fs::write(dir.path().join("marks.pkl"), &marks).unwrap();
    let locked = dir.path().join("locked.bin");
    std::fs::write(&locked, b"\x80\x02}q\x00.").unwrap();
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let root = Process::new("id").arg("-u").output().unwrap().stdout == b"0\n";

    let report = tree.json(&[
        "--no-caches",
        "--no-listeners",
        "--format",
        "json",
        "--fail-on",
        "never",
        &dir.path().to_string_lossy(),
    ]);
    for name in ["huge.gguf", "cut.gguf", "beyond.safetensors"] {
        let found = file(&report, &dir.path().join(name));
        assert!(found["malformed"].is_string(), "{found}");
    }
    let marks = file(&report, &dir.path().join("marks.pkl"));
    assert_ne!(marks["standing"], "approved");
    if !root {
        let unreadable = report["unreadable"].as_array().unwrap();
        assert!(
            unreadable
                .iter()
                .any(|u| Path::new(u["path"].as_str().unwrap()) == locked),
            "{unreadable:?}"
        );
    }
}
