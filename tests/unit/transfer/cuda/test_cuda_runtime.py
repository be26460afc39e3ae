"""kvhive.transfer.cuda.runtime: the lazy torch import and its three refusals, the device
table (worker ``device_uuid`` -> this process's ordinal), and on a GPU the real table and
zero-copy pointer wrapping."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import Any

import pytest
import torch

from kvhive.errors import RegistrationError
from kvhive.transfer.cuda import runtime as rt

U0 = "58d9b2e1-0000-1111-2222-333344445555"
U1 = "aaaabbbb-cccc-dddd-eeee-ffff00001111"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch build")
def test_cpu_only_torch_is_refused_naming_the_extra() -> None:
    with pytest.raises(RegistrationError, match="build without CUDA") as e:
        rt.load_torch_cuda()
    assert rt.CUDA_EXTRA in str(e.value) and e.value.code == "registration"
    with pytest.raises(RegistrationError, match="build without CUDA"):
        rt.device_table()  # the cached table needs CUDA too
    with pytest.raises(RegistrationError, match="build without CUDA"):
        rt.TorchCudaRuntime()


def test_missing_torch_is_refused_naming_the_extra() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from kvhive.errors import RegistrationError\n"
        "from kvhive.transfer.cuda.runtime import CUDA_EXTRA, load_torch_cuda\n"
        "try:\n    load_torch_cuda()\nexcept RegistrationError as e:\n"
        "    assert CUDA_EXTRA in str(e), e\n    print('refused:', e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "refused:" in proc.stdout and "torch is not installed" in proc.stdout
    assert "pip install 'kvhive[cuda]'" in proc.stdout


class FakeTorchNoDevice(types.ModuleType):
    """Named as a mock: a CUDA build of torch that sees no device (no GPU here)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.__version__ = "2.13.0+cu128 (mock)"
        self.version = types.SimpleNamespace(cuda="12.8", hip=None)
        self.cuda = types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0)


def test_cuda_torch_without_a_visible_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", FakeTorchNoDevice())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RegistrationError, match="sees none") as e:
        rt.load_torch_cuda()
    assert rt.CUDA_EXTRA in str(e.value) and "CUDA_VISIBLE_DEVICES=''" in str(e.value)


def test_device_table_maps_uuids_to_ordinals() -> None:
    table = rt.DeviceTable.from_uuids([U0, U1])  # a stand-in for two visible devices
    assert table.ordinal(U0) == 0 and table.ordinal(U1) == 1
    assert table.ordinal("GPU-" + U1.upper()) == 1  # nvidia-smi's spelling
    assert rt.device_ordinal(f"  {U0} ", table=table) == 0
    with pytest.raises(RegistrationError, match="not visible") as e:
        table.ordinal("00000000-0000-0000-0000-000000000000")
    assert "CUDA_VISIBLE_DEVICES" in str(e.value)
    for bad in ("", "  ", None, 3):
        with pytest.raises(RegistrationError, match="non-empty string"):
            table.ordinal(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        table.ordinals["x"] = 2  # type: ignore[index]


def test_device_table_from_torch_uses_the_string_form_of_the_device_uuid() -> None:
    class Uuid:
        """Named as a mock of torch's ``_CUuuid``: ``str`` gives the 8-4-4-4-12 form."""

        def __init__(self, s: str) -> None:
            self.s = s

        def __str__(self) -> str:
            return self.s

    fake: Any = types.SimpleNamespace(
        cuda=types.SimpleNamespace(
            device_count=lambda: 2,
            get_device_properties=lambda i: types.SimpleNamespace(uuid=Uuid([U1, U0][i])),
        )
    )
    table = rt.DeviceTable.from_torch(fake)
    assert table.ordinal(U1) == 0 and table.ordinal(U0) == 1


def test_normalize_uuid() -> None:
    assert rt.normalize_uuid("GPU-ABC") == "abc"
    assert rt.normalize_uuid("MIG-abc") == "abc"
    assert rt.normalize_uuid(" abc ") == "abc"


@needs_gpu
def test_real_device_table_and_zero_copy_wrapping() -> None:
    t = rt.load_torch_cuda()
    table = rt.device_table()
    assert rt.device_table() is table  # cached
    for i in range(torch.cuda.device_count()):
        assert table.ordinal(str(torch.cuda.get_device_properties(i).uuid)) == i
    run = rt.TorchCudaRuntime(t)
    src = torch.arange(256, dtype=torch.uint8, device="cuda:0")
    flat = run.wrap_pointer(0, src.data_ptr() + 16, 64)
    assert flat.data_ptr() == src.data_ptr() + 16 and flat.dtype == torch.uint8
    assert torch.equal(flat.cpu(), src[16:80].cpu())
    flat[0] = 7  # writes land in the original memory
    torch.cuda.synchronize()
    assert int(src[16]) == 7
    view = run.typed_view(flat, "float16", (4, 2), (1, 4), 2)
    assert view.stride() == (1, 4) and view.storage_offset() == 2
    assert view.data_ptr() == src.data_ptr() + 16 + 4
