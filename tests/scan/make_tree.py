"""Builds the test tree `sanctum scan` is judged on (tests/scan.rs), with real files only.

    python3 make_tree.py OUT MARKER MINILM_DIR GGUF

OUT gets:
  approved/all-minilm-l6-v2/...       the real all-MiniLM files, unchanged (approved)
  tampered/all-minilm-l6-v2/...       the same with one byte of model.safetensors flipped
  gguf/SmolLM2-135M-Instruct.Q4_1.gguf  the real GGUF (unapproved: the lock approves its import)
  pickles/*.pkl, *.bin               pickles that would run os.system / subprocess / eval / exec if
                                      loaded, at protocols 0-5; a benign state dict
  torch/*.pt                          the same in torch.save's zip layout (archive/data.pkl, ...)
  disguised/model.safetensors         a torch zip named .safetensors
  ollama/models/{manifests,blobs}     an Ollama models dir: a manifest naming a GGUF blob, and a
                                      blob whose content is not the digest it is named by
  hf/hub/models--sentence-transformers--all-MiniLM-L6-v2/{blobs,snapshots/<rev>,refs}
                                      a Hugging Face hub cache snapshot of the real files
Every malicious payload runs `touch MARKER`: the test checks that MARKER never appears.
Only the standard library: torch's layout is written with pickle and zipfile, as torch.save does.
"""

import collections
import hashlib
import io
import os
import pickle
import shutil
import struct
import sys
import zipfile

out, marker, minilm, gguf = sys.argv[1:5]
payload = f"touch {marker}"


class OsSystem:
    def __reduce__(self):
        return (os.system, (payload,))


class SubprocessPopen:
    def __reduce__(self):
        import subprocess

        return (subprocess.Popen, (["sh", "-c", payload],))


class SubprocessCheckOutput:
    def __reduce__(self):
        import subprocess

        return (subprocess.check_output, (["sh", "-c", payload],))


class BuiltinsEval:
    def __reduce__(self):
        return (eval, (f"__import__('os').system({payload!r})",))


class BuiltinsExec:
    def __reduce__(self):
        return (exec, (f"import os; os.system({payload!r})",))


def write(path, data):
    path = os.path.join(out, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


# Plain pickles, the payload inside an ordinary-looking state dict.
def state_dict(evil):
    return collections.OrderedDict([("weight", [0.5, 1.5]), ("config", {"hidden": 8}), ("x", evil)])


for protocol in range(6):
    write(f"pickles/os_system_p{protocol}.pkl", pickle.dumps(state_dict(OsSystem()), protocol=protocol))
write("pickles/subprocess_popen.bin", pickle.dumps(state_dict(SubprocessPopen()), protocol=2))
write("pickles/subprocess_check_output.pkl", pickle.dumps(SubprocessCheckOutput(), protocol=4))
write("pickles/builtins_eval.pkl", pickle.dumps(state_dict(BuiltinsEval()), protocol=4))
write("pickles/builtins_exec.pkl", pickle.dumps(BuiltinsExec(), protocol=3))
# NumPy's .npy of Python objects: np.save pickles them after the header (format 1.0).
def npy(obj, shape):
    header = repr({"descr": "|O", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + pickle.dumps(obj, protocol=3)


write("numpy/objects.npy", npy([OsSystem()], (1,)))
write("numpy/numbers.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + repr({"descr": "<f4", "fortran_order": False, "shape": (2,)}).encode().ljust(117) + b"\n" + struct.pack("<2f", 1, 2))
# Renamed: found by content, not by name.
write("pickles/notes.txt", pickle.dumps(OsSystem(), protocol=0))
write("pickles/benign_state_dict.pkl", pickle.dumps(state_dict(3), protocol=2))


# torch.save's zip layout: `<archive>/data.pkl` (protocol 2; tensors as persistent ids of storages
# rebuilt by torch._utils._rebuild_tensor_v2), `<archive>/byteorder`, `<archive>/data/<key>`,
# `<archive>/version`. The torch globals are emitted by name through stand-in callables.
def global_named(module, name):
    def stand_in(*args):
        raise RuntimeError("never called")

    stand_in.__module__ = module
    stand_in.__qualname__ = name
    stand_in.__name__ = name
    sys.modules.setdefault(module, type(sys)(module))
    setattr(sys.modules[module], name, stand_in)
    return stand_in


rebuild_tensor_v2 = global_named("torch._utils", "_rebuild_tensor_v2")


class FloatStorage:
    pass


FloatStorage.__module__ = "torch"
sys.modules.setdefault("torch", type(sys)("torch")).FloatStorage = FloatStorage


class Tensor:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel

    def __reduce__(self):
        storage = ("storage", FloatStorage, self.key, "cpu", self.numel)
        return (rebuild_tensor_v2, (PersistentStorage(storage), 0, (self.numel,), (1,), False, collections.OrderedDict()))


class PersistentStorage:
    def __init__(self, pid):
        self.pid = pid


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, PersistentStorage) else None


def torch_zip(path, obj, archive="archive"):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", buf.getvalue())
        z.writestr(f"{archive}/byteorder", "little")
        z.writestr(f"{archive}/data/0", struct.pack("<4f", 1, 2, 3, 4))
        z.writestr(f"{archive}/version", "3\n")
    return write(path, data.getvalue())


benign = collections.OrderedDict([("linear.weight", Tensor("0", 4))])
torch_zip("torch/benign.pt", benign)
torch_zip("torch/os_system.pt", collections.OrderedDict([("linear.weight", Tensor("0", 4)), ("x", OsSystem())]))
torch_zip("torch/subprocess.pth", collections.OrderedDict([("x", SubprocessPopen())]), archive="model")
torch_zip("torch/eval.bin", collections.OrderedDict([("x", BuiltinsEval())]))
torch_zip("disguised/model.safetensors", collections.OrderedDict([("x", OsSystem())]))


# The real models: approved as they are, tampered with one byte flipped.
def copy_model(dest):
    dest = os.path.join(out, dest)
    shutil.copytree(minilm, dest)
    return dest


copy_model("approved/all-minilm-l6-v2")
tampered = copy_model("tampered/all-minilm-l6-v2")
with open(os.path.join(tampered, "model.safetensors"), "r+b") as f:
    f.seek(-1000, os.SEEK_END)
    byte = f.read(1)
    f.seek(-1000, os.SEEK_END)
    f.write(bytes([byte[0] ^ 0x01]))
os.makedirs(os.path.join(out, "gguf"))
shutil.copy(gguf, os.path.join(out, "gguf"))


# A small real GGUF (version 3): general.architecture, general.name, one f32 tensor.
def gguf_bytes(name):
    def string(s):
        b = s.encode()
        return struct.pack("<Q", len(b)) + b

    kv = string("general.architecture") + struct.pack("<I", 8) + string("llama")
    kv += string("general.name") + struct.pack("<I", 8) + string(name)
    tensor = string("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 8)
    tensor += struct.pack("<I", 0) + struct.pack("<Q", 0)
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 2) + kv + tensor
    header += b"\0" * (-len(header) % 32)
    return header + struct.pack("<32f", *range(32))


def ollama_blob(data, name=None):
    digest = name or hashlib.sha256(data).hexdigest()
    write(f"ollama/models/blobs/sha256-{digest}", data)
    return digest, len(data)


def ollama_manifest(model, tag, layers):
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64, "size": 2},
        "layers": [{"mediaType": m, "digest": "sha256:" + d, "size": s} for m, d, s in layers],
    }
    import json

    write(f"ollama/models/manifests/registry.ollama.ai/library/{model}/{tag}", json.dumps(manifest).encode())


tiny = gguf_bytes("tiny-llama")
digest, size = ollama_blob(tiny)
ollama_manifest("tinyllama", "latest", [("application/vnd.ollama.image.model", digest, size)])
# A blob changed after it was pulled: its name is no longer its digest.
swapped = gguf_bytes("swapped")
fake_digest = hashlib.sha256(b"what the manifest pinned").hexdigest()
ollama_blob(swapped, name=fake_digest)
ollama_manifest("swapped", "7b", [("application/vnd.ollama.image.model", fake_digest, len(swapped))])


# The Hugging Face hub cache layout: blobs named by sha256 (LFS) or git sha1, snapshots of symlinks.
repo = os.path.join(out, "hf/hub/models--sentence-transformers--all-MiniLM-L6-v2")
revision = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"
for root, _, files in os.walk(minilm):
    for name in files:
        src = os.path.join(root, name)
        rel = os.path.relpath(src, minilm)
        data = open(src, "rb").read()
        if rel.endswith(".safetensors"):
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(data)
        link = os.path.join(repo, "snapshots", revision, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(repo, "blobs", blob), os.path.dirname(link)), link)
write(os.path.relpath(os.path.join(repo, "refs/main"), out), revision.encode())
