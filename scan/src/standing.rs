//! Judging what was found: which approved model each file belongs to (by its digest, or for a
//! changed file by its place beside the model's other files), whether every file of that model is
//! there and unchanged, whether a cache's content-addressed name matches the content, and whether a
//! pickle imports something dangerous.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use attest::Sha256Digest;
use attest::lockfile::{Lockfile, ModelEntry};
use attest::pickle::Verdict;

use crate::caches::{self, Origin};
use crate::inspect::Format;
use crate::report::{Approval, FileFinding, FileProblem, ModelFinding, Standing, Unreadable};
use crate::walk::{self, Found};

/// Where a file belongs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    /// The approved model `lock.models[.0]` under the directory `.1`.
    Approved(usize, PathBuf),
    /// A cache entry (`org/repo@rev`, `model:tag`).
    Cache(String),
    /// A file on its own.
    Alone(PathBuf),
}

/// Digests of files the scan hashed only to compare with the lock (configs beside the weights).
#[derive(Default)]
struct Hashes(HashMap<PathBuf, Option<(Sha256Digest, u64)>>);

impl Hashes {
    fn of(&mut self, path: &Path) -> Option<(Sha256Digest, u64)> {
        *self.0.entry(path.to_path_buf()).or_insert_with(|| {
            let size = std::fs::metadata(path).ok().filter(|m| m.is_file())?.len();
            let digest = walk::hash(path, &|_| {}).ok()?;
            Some((digest, size))
        })
    }
}

/// The files as findings in path order, and the models they make up.
pub(crate) fn judge(
    mut found: Vec<Found>,
    lock: Option<&Lockfile>,
    unreadable: &mut Vec<Unreadable>,
) -> (Vec<FileFinding>, Vec<ModelFinding>) {
    found.sort_by(|a, b| a.candidate.path.cmp(&b.candidate.path));
    let models = lock.map_or(&[][..], |l| &l.models[..]);
    let mut by_digest: HashMap<Sha256Digest, Vec<(usize, &str)>> = HashMap::new();
    for (m, entry) in models.iter().enumerate() {
        for file in &entry.files {
            by_digest
                .entry(file.sha256)
                .or_default()
                .push((m, &file.path));
        }
    }
    let mut hashes = Hashes::default();
    let mut ollama: HashMap<PathBuf, HashMap<String, Origin>> = HashMap::new();

    let mut files = Vec::with_capacity(found.len());
    let mut groups: BTreeMap<Group, Vec<usize>> = BTreeMap::new();
    for f in found {
        let path = &f.candidate.path;
        let origin = caches::hugging_face_origin(path)
            .or_else(|| ollama_origin(path, &mut ollama, unreadable));
        let mut finding = FileFinding {
            path: path.clone(),
            aliases: f.candidate.aliases.clone(),
            size: f.candidate.size,
            sha256: f.sha256.to_hex(),
            format: f.inspection.format,
            header: f.inspection.header.clone(),
            malformed: f.inspection.malformed.clone(),
            standing: Standing::Unapproved,
            approved_model: None,
            origin,
            reasons: Vec::new(),
        };
        let group = approved_group(&f, &by_digest, models, &mut hashes, &mut finding)
            .or_else(|| {
                finding
                    .origin
                    .as_ref()
                    .map(|o| Group::Cache(o.model_name()))
            })
            .unwrap_or_else(|| Group::Alone(path.clone()));
        judge_content(&f, &mut finding);
        groups.entry(group).or_default().push(files.len());
        files.push(finding);
    }

    let mut findings = Vec::new();
    for (group, members) in groups {
        findings.push(model_finding(
            group,
            members,
            models,
            &mut files,
            &mut hashes,
        ));
    }
    (files, findings)
}

/// The approved model a file belongs to: the lock file its digest is, under the directory its path
/// places the model in; or, for a file whose digest is no lock file's, the lock file whose path it
/// has beside at least one other unchanged file of that model (a tampered copy).
fn approved_group(
    f: &Found,
    by_digest: &HashMap<Sha256Digest, Vec<(usize, &str)>>,
    models: &[ModelEntry],
    hashes: &mut Hashes,
    finding: &mut FileFinding,
) -> Option<Group> {
    let path = &f.candidate.path;
    if let Some(matches) = by_digest.get(&f.sha256) {
        for &(m, locked) in matches {
            if let Some(root) = strip_suffix(path, locked) {
                finding.standing = Standing::Approved;
                finding.approved_model = Some(models[m].name.clone());
                return Some(Group::Approved(m, root));
            }
        }
        // The right bytes under another name: approved content, but not an approved model's layout.
        let names: Vec<&str> = matches.iter().map(|&(m, _)| &*models[m].name).collect();
        finding.reasons.push(format!(
            "its content is a file of the approved {} under another name",
            names.join(", ")
        ));
    }
    for (m, entry) in models.iter().enumerate() {
        for locked in &entry.files {
            let Some(root) = strip_suffix(path, &locked.path) else {
                continue;
            };
            let sibling_matches = entry.files.iter().any(|other| {
                other.path != locked.path
                    && hashes
                        .of(&root.join(&other.path))
                        .is_some_and(|(d, _)| d == other.sha256)
            });
            if sibling_matches {
                finding.standing = Standing::Tampered;
                finding.approved_model = Some(entry.name.clone());
                finding.reasons.push(format!(
                    "{} of the approved {} has sha256 {} in the lock",
                    locked.path, entry.name, locked.sha256
                ));
                return Some(Group::Approved(m, root));
            }
        }
    }
    None
}

/// `path` without the trailing components of the relative `locked` path, when it ends with them.
fn strip_suffix(path: &Path, locked: &str) -> Option<PathBuf> {
    let mut root = path;
    for part in locked.rsplit('/') {
        if root.file_name()? != part {
            return None;
        }
        root = root.parent()?;
    }
    Some(root.to_path_buf())
}

/// The origin an Ollama models directory's manifests give a blob (`<models>/blobs/sha256-<hex>`).
fn ollama_origin(
    path: &Path,
    cache: &mut HashMap<PathBuf, HashMap<String, Origin>>,
    unreadable: &mut Vec<Unreadable>,
) -> Option<Origin> {
    let hex = path.file_name()?.to_str()?.strip_prefix("sha256-")?;
    let blobs = path.parent()?;
    let models = blobs.parent()?;
    if blobs.file_name()? != "blobs" || !models.join("manifests").is_dir() {
        return None;
    }
    let names = cache.entry(models.to_path_buf()).or_insert_with(|| {
        let (names, problems) = caches::ollama_blobs(models);
        unreadable.extend(
            problems
                .into_iter()
                .map(|(path, error)| Unreadable { path, error }),
        );
        names
    });
    names.get(hex).cloned()
}

/// What the content itself says: a cache name it contradicts, a disguise, dangerous globals.
fn judge_content(f: &Found, finding: &mut FileFinding) {
    let raise = |finding: &mut FileFinding, standing: Standing, reason: String| {
        finding.standing = finding.standing.max(standing);
        finding.reasons.push(reason);
    };
    if let Some(named) = caches::named_sha256(&f.candidate.path, f.candidate.link.as_deref())
        && named != finding.sha256
    {
        raise(
            finding,
            Standing::Tampered,
            format!(
                "its cache names it by sha256 {named}, but its content hashes to {}",
                finding.sha256
            ),
        );
    }
    let name = f
        .candidate
        .path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let claimed = [
        (".safetensors", Format::Safetensors),
        (".gguf", Format::Gguf),
    ]
    .into_iter()
    .find(|(ext, _)| name.ends_with(ext));
    if let Some((ext, claimed)) = claimed
        && claimed != f.inspection.format
    {
        raise(
            finding,
            Standing::Dangerous,
            format!(
                "disguised: named {ext} but its content is {}",
                format_name(f.inspection.format)
            ),
        );
    }
    for member in &f.inspection.header.pickles {
        let at = member
            .member
            .as_deref()
            .map(|m| format!(" in {m}"))
            .unwrap_or_default();
        let named = |verdict: Verdict| -> Vec<String> {
            member
                .analysis
                .globals
                .iter()
                .filter(|g| g.verdict == verdict)
                .map(|g| format!("{}.{}", g.module, g.name))
                .collect()
        };
        let dangerous = named(Verdict::Dangerous);
        if !dangerous.is_empty() {
            raise(
                finding,
                Standing::Dangerous,
                format!(
                    "loading it runs code: the pickle{at} imports {}",
                    dangerous.join(", ")
                ),
            );
        }
        if let Some(why) = &member.analysis.malformed {
            let standing = match member.analysis.verdict() {
                Verdict::Dangerous => Standing::Dangerous,
                _ => Standing::Unapproved,
            };
            raise(
                finding,
                standing,
                format!("the pickle{at} is malformed: {why}"),
            );
        }
        let unknown = named(Verdict::Unknown);
        if !unknown.is_empty() {
            raise(
                finding,
                Standing::Unapproved,
                format!(
                    "the pickle{at} imports globals no scanner knows to be safe: {}",
                    unknown.join(", ")
                ),
            );
        }
    }
}

/// A format as a sentence names it.
pub(crate) fn format_name(format: Format) -> &'static str {
    match format {
        Format::Safetensors => "Safetensors",
        Format::Gguf => "GGUF",
        Format::Ggml => "GGML",
        Format::Pickle => "a Python pickle",
        Format::PytorchZip => "a PyTorch zip checkpoint (pickle)",
        Format::Numpy => "a NumPy array",
        Format::NumpyZip => "a NumPy .npz archive",
        Format::Keras => "a Keras archive",
        Format::Hdf5 => "HDF5",
        Format::Onnx => "ONNX",
        Format::TfSavedModel => "a TensorFlow SavedModel",
        Format::Llamafile => "a llamafile executable",
    }
}

fn model_finding(
    group: Group,
    members: Vec<usize>,
    models: &[ModelEntry],
    files: &mut [FileFinding],
    hashes: &mut Hashes,
) -> ModelFinding {
    let first = &files[members[0]];
    let mut finding = ModelFinding {
        name: String::new(),
        standing: Standing::Approved,
        root: None,
        approval: None,
        format: first.format,
        architecture: members
            .iter()
            .find_map(|&i| files[i].header.architecture.clone()),
        parameters: members
            .iter()
            .map(|&i| files[i].header.parameters)
            .sum::<Option<u64>>(),
        files: members.clone(),
        problems: Vec::new(),
    };
    match group {
        Group::Approved(m, root) => {
            let entry = &models[m];
            finding.name = entry.name.clone();
            finding.architecture = finding
                .architecture
                .or_else(|| Some(entry.architecture.clone()));
            for locked in &entry.files {
                let at = root.join(&locked.path);
                let member = members.iter().find(|&&i| files[i].path == at);
                let actual = match member {
                    Some(&i) => Some((files[i].sha256.clone(), files[i].size)),
                    None => hashes.of(&at).map(|(d, size)| (d.to_hex(), size)),
                };
                let problem = match actual {
                    None => Some("missing".to_string()),
                    Some((_, size)) if size != locked.size => Some(format!(
                        "{size} bytes where the lock pins {} bytes",
                        locked.size
                    )),
                    Some((digest, _)) if digest != locked.sha256.to_hex() => Some(format!(
                        "sha256 {digest} where the lock pins {}",
                        locked.sha256
                    )),
                    Some(_) => None,
                };
                if let Some(problem) = problem {
                    finding.problems.push(FileProblem {
                        file: locked.path.clone(),
                        problem,
                    });
                }
            }
            if !finding.problems.is_empty() {
                finding.standing = Standing::Tampered;
                for &i in &members {
                    let file = &mut files[i];
                    file.standing = file.standing.max(Standing::Tampered);
                    if file.reasons.is_empty() {
                        file.reasons.push(format!(
                            "another file of the approved {} is missing or changed",
                            entry.name
                        ));
                    }
                }
            }
            finding.root = Some(root);
            finding.approval = Some(Approval {
                digest: entry.digest.to_hex(),
                license: entry.license.clone(),
                task: entry.task.to_string(),
                architecture: entry.architecture.clone(),
                files: entry.files.clone(),
            });
        }
        Group::Cache(name) => finding.name = name,
        Group::Alone(path) => finding.name = path.display().to_string(),
    }
    finding.standing = worst(finding.standing, &members, files);
    finding
}

/// The worst of `standing` and the standings of the `members` of `files`.
pub(crate) fn worst(standing: Standing, members: &[usize], files: &[FileFinding]) -> Standing {
    members
        .iter()
        .filter_map(|&i| files.get(i))
        .map(|f| f.standing)
        .fold(standing, Standing::max)
}
