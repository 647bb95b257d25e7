"""Arch-aware attention configurations: the GPU class a device's properties select, and
each class's tiles computing the right thing (under the interpreter on the CPU, where the
launchers would otherwise always run the hopper tiles). That every class's tiles compile
for its archs within their shared memory is tests/test_compile_sm90.py's job."""
from __future__ import annotations

import pytest
import torch

from llama_fast import reference
from llama_fast.kernels import _common
from llama_fast.kernels import flash_attn as fa
from _helpers import DEVICE, ON_GPU, assert_close, f64

KIB = 1024


@pytest.mark.parametrize("arch, smem, expected", [
    (80, 163 * KIB, "ampere"), (87, 163 * KIB, "ampere"), (86, 99 * KIB, "consumer"), (89, 99 * KIB, "consumer"),
    (90, 227 * KIB, "hopper"), (100, 227 * KIB, "blackwell"), (120, 99 * KIB, "consumer"), (121, 99 * KIB, "consumer"),
])
def test_gpu_class_from_device_properties(arch, smem, expected):
    assert fa.gpu_class(_common.DeviceLimits(arch, smem, 100)) == expected


def test_off_cuda_the_hopper_tiles_run():
    assert _common.device_limits(torch.device("cpu")) is None
    assert fa.gpu_class(None) == "hopper"


def test_every_class_has_its_archs_in_the_compile_configs():
    archs = {a for config in fa.compile_configs() for a in config[5]}
    assert archs == {a for class_archs in fa.GPU_CLASS_ARCHS.values() for a in class_archs}
    assert archs == {80, 86, 89, 90, 100, 120}


def test_configs_differ_where_the_class_needs_it():
    bf16 = torch.bfloat16
    assert fa.forward_config(128, bf16, False, "hopper")["BLOCK_N"] == 128
    assert fa.forward_config(128, bf16, True, "hopper")["BLOCK_N"] == 64  # varlen: 128 keys spill
    assert fa.forward_config(128, bf16, False, "blackwell")["BLOCK_N"] == 64  # so does sm_100
    assert fa.forward_config(128, bf16, False, "consumer")["BLOCK_N"] == 32  # 99 KiB of shared memory
    assert fa.forward_config(128, bf16, False, "ampere")["BLOCK_N"] == 32  # 64 keys spill on sm_80
    # dK/dV: the mma.sync classes take 64 x 64 at head dim 128 (16 x 128 spills there);
    # only Hopper keeps 2 stages at head dim 64.
    assert fa.backward_configs(128, bf16, False, "ampere")[0] == fa.backward_configs(128, bf16, False, "consumer")[0] \
        == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1}
    assert fa.backward_configs(128, bf16, False, "hopper")[0]["BLOCK_N"] == 128
    assert [fa.backward_configs(64, bf16, False, gpu)[0]["num_stages"] for gpu in fa.GPU_CLASS_ARCHS] == [2, 1, 1, 1]
    assert fa.backward_configs(128, bf16, False, "hopper")[1]["BLOCK_N"] == 64
    assert fa.backward_configs(128, bf16, False, "ampere")[1]["BLOCK_N"] == 32


@pytest.mark.skipif(ON_GPU, reason="the device's own class runs in test_attention.py on a GPU")
@pytest.mark.parametrize("gpu", ["ampere", "consumer", "blackwell"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_other_classes_compute_attention_and_its_gradients(monkeypatch, gpu, causal, head_dim):
    """The launchers read the class from the device (here faked): the forward and backward
    of every class's tiles match the float64 reference, GQA 4, a ragged length, D=64, 128."""
    limits = {"ampere": _common.DeviceLimits(80, 163 * KIB, 108), "consumer": _common.DeviceLimits(89, 99 * KIB, 58),
              "blackwell": _common.DeviceLimits(100, 227 * KIB, 148)}
    monkeypatch.setattr(fa, "device_limits", lambda device: limits[gpu])
    torch.manual_seed(0)
    dtype = torch.bfloat16
    q = torch.randn(1, 70, 4, head_dim, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(1, 70, 1, head_dim, dtype=dtype, device=DEVICE) for _ in range(2))
    do = torch.randn_like(q)
    scale = head_dim ** -0.5
    out, lse = fa.attn_fwd(q, k, v, causal, scale)
    ref_out, ref_lse = reference.attn_fwd(f64(q), f64(k), f64(v), causal, scale)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")
    grads = fa.attn_bwd(do, q, k, v, out, lse, causal, scale)
    ref_grads = reference.attn_bwd(f64(do), f64(q), f64(k), f64(v), ref_out, ref_lse, causal, scale)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(got, want, dtype, name)


def test_a_non_positive_scale_is_refused():
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="positive"):
        fa.attn_fwd(q, q, q, False, 0.0)
