"""Round trips of the pickle codec against real torch (run with the torch venv).

Not a pytest module: ``test_transfer_pickle.py`` runs it as
``PYTHONPATH=<kvhive src dir> <venv-probe>/bin/python pickle_probe.py`` (the probe venv
has no kvhive installed).  Prints ``ALL OK`` on success; any failure raises.
"""

from __future__ import annotations

import os
import pickle
import warnings

warnings.simplefilter("error")  # e.g. torch's warnings on read-only numpy buffers

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvhive.errors import BadRequest, UnsupportedError  # noqa: E402
from kvhive.transfer import pickle_codec as pc  # noqa: E402

assert pc.torch_available()
torch.manual_seed(0)


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def rand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = int(np.prod(shape)) * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8).view(dtype).reshape(shape)


dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.int64, torch.bool]
v3_dtypes = [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16]
for dt in dtypes + v3_dtypes:
    base = rand((4, 3, 5), dt) if dt is not torch.bool else torch.rand(4, 3, 5) > 0.5
    views = [base, base.transpose(0, 2), base[1:], base[:, 1], base[0:0], base.reshape(-1)[7:9]]
    payload = pickle.dumps(views)  # exactly what the 0.5.6 worker sends
    got = pc.decode_tensor_list(payload)
    name = str(dt).removeprefix("torch.")
    assert len(got) == len(views)
    for v, g in zip(views, got, strict=True):
        assert g.dtype == name and g.shape == tuple(v.shape), (g.dtype, g.shape, v.shape)
        assert g.data.dtype == np.uint8 and g.data.flags.c_contiguous
        assert g.data.tobytes() == raw(v), name
    assert [a.tobytes() for a in pc.decode_tensors(payload)] == [raw(v) for v in views]
    print("decode ok", name)

# encode: what the server answers prepare_retrieve with; the worker plain-unpickles it
shape = (2, 3, 8, 6)
for dt in dtypes:
    name = str(dt).removeprefix("torch.")
    nbytes = int(np.prod(shape)) * dt.itemsize
    chunks = [np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8) for i in range(3)]
    if dt is torch.bool:
        chunks = [c % 2 for c in chunks]
    chunks[1].flags.writeable = False  # L1 views may be read-only
    data = pc.encode_tensors(chunks, shape, name)
    back = pickle.loads(data)
    assert isinstance(back, list) and len(back) == 3
    for c, t in zip(chunks, back, strict=True):
        assert t.dtype == dt and tuple(t.shape) == shape and t.is_contiguous()
        assert raw(t) == c.tobytes()
    assert [d.data.tobytes() for d in pc.decode_tensor_list(data)] == [c.tobytes() for c in chunks]
    print("encode ok", name)

# MLA / fused-K/V objects travel as 3-D [NL, slots, hidden] tensors
data = pc.encode_tensors([np.zeros(3 * 8 * 5 * 2, np.uint8)], (3, 8, 5), "bfloat16")
assert tuple(pickle.loads(data)[0].shape) == (3, 8, 5)

# torch 2.13 cannot unpickle fp8 tensors: refuse to send what the worker cannot read
for name, nbytes in (("float8_e4m3fn", 4), ("uint16", 8)):
    try:
        pickle.loads(pickle.dumps(torch.zeros(1, dtype=getattr(torch, name))))
        torch_ok = True
    except Exception:  # noqa: BLE001 - any failure means this torch cannot round-trip it
        torch_ok = False
    try:
        pc.encode_tensors([np.zeros(nbytes, np.uint8)], (4,), name)
        assert torch_ok, f"sent a {name} payload the client cannot unpickle"
    except UnsupportedError:
        assert not torch_ok
    print(f"{name}: torch pickle round trip {'works' if torch_ok else 'broken'}, encode agrees")

try:
    pc.encode_tensors([np.zeros(3, np.uint8)], (2,), "bfloat16")
    raise AssertionError("wrong chunk size accepted")
except ValueError:
    pass


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/kvhive_pwned",))


for evil in (
    pickle.dumps([Evil()]),
    pickle.dumps(torch.nn.Linear(2, 2)),
    pickle.dumps({"a": torch.zeros(2)}),
):
    try:
        pc.decode_tensors(evil)
        raise AssertionError("malicious payload decoded")
    except BadRequest as exc:
        print("rejected:", exc)
assert not os.path.exists("/tmp/kvhive_pwned")
print("ALL OK")
