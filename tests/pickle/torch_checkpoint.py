"""Writes a model directory as torch.save would have: the Safetensors weights of SRC as
`pytorch_model.bin` in torch's zip layout, every other file copied (tests/import.rs converts it
back with `sanctum import pickle` and expects the shipped bytes).

    python3 torch_checkpoint.py SRC OUT [--evil MARKER]

torch's zip layout: `<archive>/data.pkl` (protocol 2; each tensor a call of
torch._utils._rebuild_tensor_v2 on a persistent id ('storage', torch.<T>Storage, key, 'cpu', numel)),
`<archive>/byteorder`, `<archive>/data/<key>` (one storage's raw little-endian bytes), `<archive>/version`,
`<archive>/.data/serialization_id`. Only the standard library: torch's globals are emitted by name.
With --evil, the state dict also holds an os.system call that would create MARKER if loaded.
"""

import collections
import io
import json
import os
import pickle
import shutil
import struct
import sys
import zipfile

src, out = sys.argv[1], sys.argv[2]
marker = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--evil" else None


def stand_in(module, name):
    def f(*args):
        raise RuntimeError("never called")

    f.__module__, f.__qualname__, f.__name__ = module, name, name
    sys.modules.setdefault(module, type(sys)(module))
    setattr(sys.modules[module], name, f)
    return f


rebuild_tensor_v2 = stand_in("torch._utils", "_rebuild_tensor_v2")
torch = sys.modules.setdefault("torch", type(sys)("torch"))
STORAGE = {"F32": "FloatStorage", "F16": "HalfStorage", "BF16": "BFloat16Storage", "F64": "DoubleStorage",
           "I64": "LongStorage", "I32": "IntStorage", "I16": "ShortStorage", "I8": "CharStorage",
           "U8": "ByteStorage", "BOOL": "BoolStorage"}
SIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
for cls in STORAGE.values():
    setattr(torch, cls, type(cls, (), {"__module__": "torch"}))


class Storage:
    def __init__(self, pid):
        self.pid = pid


class Tensor:
    def __init__(self, key, dtype, shape):
        self.key, self.dtype, self.shape = key, dtype, shape

    def __reduce__(self):
        numel = 1
        for d in self.shape:
            numel *= d
        stride, s = [], 1
        for d in reversed(self.shape):
            stride.insert(0, s)
            s *= d
        pid = ("storage", getattr(torch, STORAGE[self.dtype]), self.key, "cpu", numel)
        return (rebuild_tensor_v2, (Storage(pid), 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class OsSystem:
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, Storage) else None


with open(os.path.join(src, "model.safetensors"), "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
header.pop("__metadata__", None)

state = collections.OrderedDict()
state._metadata = collections.OrderedDict([("", {"version": 1})])
storages = {}
for i, (name, info) in enumerate(header.items()):
    begin, end = info["data_offsets"]
    storages[str(i)] = data[begin:end]
    state[name] = Tensor(str(i), info["dtype"], info["shape"])
if marker:
    state["x"] = OsSystem()

pkl = io.BytesIO()
TorchPickler(pkl, protocol=2).dump(state)
shutil.copytree(src, out, ignore=shutil.ignore_patterns("model.safetensors"))
with zipfile.ZipFile(os.path.join(out, "pytorch_model.bin"), "w", zipfile.ZIP_STORED) as z:
    z.writestr("pytorch_model/data.pkl", pkl.getvalue())
    z.writestr("pytorch_model/byteorder", "little")
    for key, raw in storages.items():
        z.writestr(f"pytorch_model/data/{key}", raw)
    z.writestr("pytorch_model/version", "3\n")
    z.writestr("pytorch_model/.data/serialization_id", "0123456789")
