"""The compile check's static cost arithmetic on hand-written inputs (no compiler): blocks
per SM against each arch's limits, MMA FLOPs per loop iteration from PTX, bytes per CTA."""
from __future__ import annotations

import pytest

from llama_fast.tools import compile_check as cc


@pytest.mark.parametrize("arch, warps, regs, smem, expected", [
    (90, 8, 255, 0, (1, "registers")),  # 256 x 32 x 8 = 65536: the whole register file
    (90, 8, 128, 0, (2, "registers")),
    (90, 4, 32, 0, (16, "warps")),  # 64 warps / 4
    (90, 1, 16, 0, (32, "blocks")),
    (90, 8, 64, 163840, (1, "smem")),  # 160 KiB + 1 KiB reserved of 228
    (90, 4, 64, 98304, (2, "smem")),
    (86, 8, 64, 49152, (2, "smem")),  # 100 KiB per SM
    (86, 4, 32, 0, (12, "warps")),  # 48 warps
    (86, 1, 16, 0, (16, "blocks")),
    (89, 1, 16, 0, (24, "blocks")),
    (120, 8, 200, 131072, (0, "smem")),  # over the 99 KiB a block may have: does not fit
])
def test_occupancy(arch, warps, regs, smem, expected):
    assert cc.occupancy(arch, warps, regs, smem) == expected


PTX = """
\tmov.u32 %r1, 0;
\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
$L__BB0_2:
\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};
$L__BB0_3:
\tadd.s32 %r2, %r2, 1;
\t@%p1 bra $L__BB0_3;
\t@%p2 bra $L__BB0_2;
$L__BB0_4:
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};
\tbra.uni $L__BB0_4;
\tld.global.v4.b32 {...}, [%rd1];
\tst.global.b16 [%rd2], %rs1;
"""


def test_tensor_core_work_counts_each_innermost_loop_once():
    work = cc.tensor_core_work(PTX, num_warps=8)
    wgmma_loop = 2 * (2 * 64 * 64 * 16 + 2 * 64 * 128 * 16)  # two warpgroups issue each
    mma_loop = 8 * 2 * 16 * 8 * 16  # eight warps issue each
    assert work == {"loops": [wgmma_loop, mma_loop], "outside": 2 * 2 * 64 * 64 * 16, "tcgen05": 0}


def test_tcgen05_is_counted_not_sized():
    work = cc.tensor_core_work("$L__BB0_1:\n\ttcgen05.mma.cta_group::1.kind::f16 [%r1], %rd1;\n\tbra $L__BB0_1;\n", 4)
    assert work == {"loops": [], "outside": 0, "tcgen05": 1}


def test_global_bytes_per_cta():
    # one 16-byte load and one 2-byte store per thread, 4 warps
    assert cc.global_bytes_per_cta(PTX, num_warps=4) == (16 + 2) * 128


def test_tma_copies():
    """The TMA loads and stores Triton 3.6 emits for a 4-D tensor descriptor on sm_90; the
    non-tensor bulk copy and plain loads are not TMA tile copies."""
    ptx = """
\t@%p2 cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%r53], [%rd5, {%r54, %r723, %r3, %r724}], [%r52];
\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
\t@%p104 cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%rd1, {%r722, %r723, %r3, %r724}], [%r53];
\tcp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd2], 256, [%r4];
\tld.global.v4.b32 {...}, [%rd1];
"""
    assert cc.tma_copies(ptx) == (2, 1)
    assert cc.tma_copies(PTX) == (0, 0)


def test_fake_descriptor_types_as_written():
    desc = cc._fake_descriptor("tensordesc<bf16[1, 64, 1, 128]>")
    assert desc.block_shape == [1, 64, 1, 128] and desc.strides[-1] == 1 and str(desc.base.dtype) == "torch.bfloat16"


def test_element_types_name_pointers_and_descriptors():
    signature = {"Q": "tensordesc<bf16[1, 64, 1, 128]>", "LSE": "*fp32", "K": "tensordesc<bf16[1, 64, 1, 128]>",
                 "CU": "*i32", "n": "i32"}
    assert cc.element_types(signature) == "bf16,fp32,i32"
