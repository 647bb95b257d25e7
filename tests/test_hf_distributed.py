"""A patched Hugging Face Llama inside Hugging Face's own distributed engines, on the CPU
with gloo, in 2 processes (tests/_hf_dist_workers.py):

* transformers' tensor parallelism, ``from_pretrained(..., tp_plan="auto")``, patched before
  loading or after: logits and gradients as the unsharded, unpatched model's;
* accelerate's FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)``): a few AdamW
  steps as one process takes them on the same global batch.

Every rank runs the "torch" backend (the PyTorch reference of the llama_fast ops, through
the custom ops and the patched modules): the Triton kernels run on the CPU only under the
Triton interpreter, far too slowly for several processes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import _dist_workers as W  # noqa: E402
from test_distributed import assert_same_run, spawn  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available in this build")

pytest.importorskip("transformers")
import _hf_dist_workers as H  # noqa: E402

STEPS, BATCH = 3, 4


@pytest.mark.parametrize("when", ["before", "after", "lm_head plan"],
                         ids=["patch_transformers-first", "patch-after-loading", "explicit-plan-with-lm_head"])
def test_hf_tp_plan_auto_patched_matches_the_unsharded_model(tmp_path, when):
    """``from_pretrained(folder, tp_plan="auto")`` on 2 gloo ranks with the llama_fast patch:
    transformers shards q/k/v/gate/up column-wise and o/down row-wise (DTensor weights in
    5.25, plain local shards with hooks in 5.10; either way the projections hand the
    modules plain local tensors), so the patched attention runs the fused kernel on each
    rank's local heads and the patched norms and MLP run on local tensors. The training
    loss runs the fused cross-entropy with no logits and no warning: vocabulary-parallel on
    5.25's vocabulary-sharded lm_head (each rank's shard of the weight, nothing gathered),
    on the whole lm_head 5.10 keeps. Eval logits (transformers' no-grad path), the training
    loss and every parameter's gradient match the unsharded, unpatched model in float32, and
    greedy generation (flash_decode on each rank's local KV cache) gives its tokens."""
    pytest.importorskip("accelerate", reason="transformers' from_pretrained(tp_plan=...) requires accelerate")
    folder = tmp_path / "tiny"
    H.save_tiny_checkpoint(str(folder))
    got = spawn(tmp_path, H.hf_tensor_parallel_worker, str(folder), when)
    (eval_logits, _, loss, grads), generated = H.tp_reference(str(folder))

    assert got["attn_implementation"] == "llama_fast"
    assert got["mlp_type"] == "SwiGLUMLP" and got["norm_type"] == "RMSNorm", (got["mlp_type"], got["norm_type"])
    if when == "after":
        assert "rms_norm 5, rope 2, swiglu 2, attention 1, cross_entropy 1 replaced" in got["report"], got["report"]
    # Sharded: each rank holds half of the projections' weights, split on their output
    # (q/k/v) or input (o) features, and whole norm weights. transformers 5.25 makes them
    # DTensors, 5.10 plain local Parameters with hooks: both are what this checks.
    hidden = W.hf_config().hidden_size
    local = {n.removeprefix("model.layers.0."): shape for n, (_, _, shape) in got["params"].items()
             if n.startswith("model.layers.0.")}
    assert local["self_attn.q_proj.weight"] == (hidden // 2, hidden), local
    assert local["self_attn.o_proj.weight"] == (hidden, hidden // 2), local
    assert local["input_layernorm.weight"] == (hidden,), local
    # What the patched modules are handed: plain tensors, the projections' outputs this
    # rank's half of the heads (the attention runs on 2 of 4 query heads, 1 of 2 KV heads).
    assert got["seen"]["q_proj"][2:] == ("Tensor", (2, W.SEQ, hidden // 2)), got["seen"]
    assert got["seen"]["k_proj"][2:] == ("Tensor", (2, W.SEQ, hidden // 4)), got["seen"]
    assert got["seen"]["input_layernorm"][0] == got["seen"]["mlp"][0] == "Tensor", got["seen"]
    # Every attention call (2 layers x (eval + train)) ran the fused kernel, none fell back.
    assert got["attention"] == {"flash_attn": 4}, got["attention"]
    # The training loss runs the fused cross-entropy, with no logits and no fallback warning.
    # transformers 5.25 shards the lm_head on the vocabulary (a DTensor weight, Shard(0), its
    # forward replaced by the tensor-parallel one): the loss is the vocabulary-parallel one,
    # on each rank's half of the weight. 5.10 leaves the lm_head whole on every rank.
    # An explicit plan with the lm_head entry: 5.25 shards it as its auto plan does, 5.10
    # too (a plain Parameter of this rank's rows, with hooks), and the loss is again the
    # vocabulary-parallel one.
    head_kind, head_placements, head_shape = got["params"]["lm_head.weight"]
    if head_kind == "DTensor":
        assert head_placements == ["S(0)"] and head_shape == (W.VOCAB // 2, hidden), got["params"]
    else:
        assert head_shape == ((W.VOCAB // 2, hidden) if when == "lm_head plan" else (W.VOCAB, hidden)), got["params"]
    assert got["loss_calls"] == {"transformers: eval mode": 1, "fused": 1}, got["loss_calls"]
    assert got["warnings"] == [], got["warnings"]
    assert got["train_logits"] is None
    # Nothing gathered in a training step (forward and backward): not the weight, not the
    # logits (transformers' own lm_head forward all-gathers its vocabulary shards of them).
    # The vocabulary-parallel loss all-reduces per-token statistics (c10d.allreduce_).
    collectives = got["train_collectives"]
    assert not any("gather" in op for op in collectives), collectives
    if head_shape[0] < W.VOCAB:
        assert collectives.get("c10d.allreduce_", 0) >= 2, collectives
    # Recognised precisely: the same weight under another style, or with one more hook, is
    # not fused (the patched forward then runs transformers' forward, with a warning).
    expected = ({"colwise_gather_output": True, "colwise": False, "packed_colwise": False,
                 "colwise_gather_output + a hook": False} if head_kind == "DTensor" else
                {"gather_output": True, "no gather_output": False, "gather_output + a hook": False}
                if head_shape[0] < W.VOCAB else {})
    assert got["heads_fused"] == expected, got["heads_fused"]

    torch.testing.assert_close(got["eval_logits"], eval_logits, rtol=1e-5, atol=1e-5)
    # Greedy decoding with a KV cache of the local heads: the prefill on flash_attn, each
    # next token on flash_decode, the same tokens as the unsharded model.
    assert got["decode_attention"] == {"flash_attn": 2, "flash_decode": 2 * 3}, got["decode_attention"]
    assert torch.equal(got["generated"], generated), (got["generated"], generated)
    torch.testing.assert_close(got["loss"], loss, rtol=1e-6, atol=1e-6)
    assert got["grads"].keys() == grads.keys()
    for name, (g,) in grads.items():
        torch.testing.assert_close(joined(got["grads"][name], g.shape), g, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def joined(pieces, shape):
    """The full gradient from the ranks' pieces (see _hf_dist_workers._gathered): a DTensor's
    full tensor, a replicated gradient (each rank's must be the same), or the local shards
    joined along the one dimension where they are smaller than the full tensor."""
    if len(pieces) == 1 or pieces[0].shape == shape:
        for p in pieces[1:]:
            torch.testing.assert_close(p, pieces[0], rtol=0, atol=0)
        return pieces[0]
    (dim,) = [d for d, (a, b) in enumerate(zip(pieces[0].shape, shape)) if a != b]
    return torch.cat(pieces, dim)


def test_accelerate_fsdp2_trains_the_patched_model_as_one_process(tmp_path):
    """accelerate's FSDP2 (Accelerator with FullyShardedDataParallelPlugin(fsdp_version=2),
    auto-wrapping transformers' decoder layers) on 2 gloo ranks: ``prepare`` shards the
    patched tiny Llama (the decoder layers, the root, and the leaves accelerate's policy
    adds: embeddings, the final llama_fast RMSNorm, lm_head) and its AdamW; three steps
    give the losses and parameters one unwrapped process gets on the same global batch, and
    the attention ran the fused kernel.

    accelerate 1.16 picks FSDP only on accelerators: on CPUs it reports MULTI_CPU and would
    silently prepare DDP (``chosen`` below), so the worker sets the FSDP state itself and
    the rest is accelerate's own FSDP2 path (see _hf_dist_workers.accelerate_fsdp2_worker)."""
    pytest.importorskip("accelerate")
    got = spawn(tmp_path, H.accelerate_fsdp2_worker, STEPS, BATCH)
    losses, params = H.train_hf_single(STEPS, BATCH, patched=True)
    assert got["chosen"] in ("DistributedType.MULTI_CPU", "DistributedType.FSDP"), got["chosen"]
    assert got["is_fsdp2"]
    assert got["sharded"] == {"": "FSDPLlamaForCausalLM", "model.embed_tokens": "FSDPEmbedding",
                              "model.layers.0": "FSDPLlamaDecoderLayer", "model.layers.1": "FSDPLlamaDecoderLayer",
                              "model.norm": "FSDPRMSNorm", "lm_head": "FSDPLinear"}, got["sharded"]
    assert got["attention"] == {"flash_attn": 2 * STEPS}, got["attention"]
    assert_same_run(got, losses, params)
    assert losses[-1] < losses[0]
