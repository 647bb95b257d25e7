"""The patched models inside torch.distributed, on the CPU with gloo: meta-device
initialisation, FSDP2 (``llama_fast.parallel.shard_model``) with and without bfloat16 mixed
precision, DDP, and activation checkpointing (``llama_fast.parallel.checkpoint_blocks``);
tensor (+ sequence) parallelism; the fused cross-entropy with a vocabulary-sharded weight
(against float64, and training through it under tensor parallel and FSDP2 over it) and the
Hugging Face fused loss under FSDP2 with the lm_head its own unit.

The process-group tests spawn 2 processes (tests/_dist_workers.py) and compare the losses
and the parameters after several AdamW steps with a single-process run on the same global
batch. They, and the single-process runs, use the "torch" backend: the PyTorch reference of
the llama_fast ops, still called through the custom ops and the patched modules (the
Triton kernels would run on the CPU only under the Triton interpreter, far too slowly).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import llama_fast
from llama_fast import parallel
from llama_fast.model import ModelArgs, Transformer

sys.path.insert(0, str(Path(__file__).parent))
import _dist_workers as W  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available in this build")

STEPS, BATCH, WORLD = 4, 4, 2


def spawn(tmp_path, worker, *args, world: int = WORLD):
    """Run ``worker(rank, world, init_file, out, *args)`` in ``world`` processes; return what
    rank 0 saved, or fail with the ranks' tracebacks."""
    out = tmp_path / "out.pt"
    try:
        mp.spawn(worker, args=(world, str(tmp_path / "init"), str(out), *args), nprocs=world)
    except Exception as e:  # noqa: BLE001 - the ranks' own tracebacks are what explains it
        errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("out.pt.err*")))
        pytest.fail(f"a rank failed: {e}\n{errors}")
    return torch.load(out)


def assert_same_run(got, expected_losses, expected_params, *, rtol=1e-5, atol=W.LR / 300):
    """Same losses and parameters up to float32 summation order. The gradients of the ranks
    are summed in another order than one process sums them; AdamW divides each update by
    the gradient's own running scale, so a gradient near zero can move its weight by a few
    ulps of the step: the bound is a fraction of one step's update (W.LR), not of the weight."""
    assert got["losses"] == pytest.approx(expected_losses, rel=rtol), (got["losses"], expected_losses)
    assert got["params"].keys() == expected_params.keys()
    for name, p in expected_params.items():
        torch.testing.assert_close(got["params"][name], p, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------
# Meta-device initialisation


class _OpsOnMeta(TorchDispatchMode):
    """Records every aten op that reads or writes a meta tensor."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = torch.utils._pytree.tree_flatten((args, kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in flat):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["ref", "hf"])
def test_patch_on_the_meta_device_touches_no_tensor_data(kind):
    if kind == "ref":
        model = W.build("ref", meta=True, patched=False)
    else:
        with torch.device("meta"):
            model = W.build("hf", patched=False)
    assert all(p.is_meta for p in model.parameters())
    with _OpsOnMeta() as seen:
        report = llama_fast.patch(model)
    assert seen.ops == [], f"patch ran ops on meta tensors: {seen.ops}"
    assert sum(report.counts.values()) > 0, str(report)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("patch_first", [True, False], ids=["patched-on-meta", "patched-after-init"])
def test_meta_init_equals_the_eager_build(patch_first):
    """Built on meta, (patched,) to_empty and init_weights: the same parameters and, with the
    patch, the same logits as a model built and initialised on the CPU."""
    args = ModelArgs.from_name("tiny")
    eager = Transformer(args)
    eager.init_weights(seed=5)
    with torch.device("meta"):
        model = Transformer(args)
    if patch_first:
        llama_fast.patch(model)
    model.to_empty(device="cpu")
    model.init_weights(seed=5)
    if not patch_first:
        llama_fast.patch(model)
    for (name, p), (name_e, e) in zip(model.state_dict().items(), eager.state_dict().items()):
        assert name == name_e
        assert torch.equal(p, e), name
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    with llama_fast.backend("torch"):
        torch.testing.assert_close(model(tokens), eager(tokens), rtol=1e-5, atol=1e-5)


def test_init_weights_scheme_and_seed():
    args = ModelArgs.from_name("tiny").scaled(n_layers=3, dim=128, n_heads=4, n_kv_heads=2)
    a, b, c = Transformer(args), Transformer(args), Transformer(args)
    a.init_weights(seed=1)
    b.init_weights(seed=1)
    c.init_weights(seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.attention.wq.weight"], sc["layers.0.attention.wq.weight"])
    assert torch.equal(sa["norm.weight"], torch.ones(128))
    assert sa["tok_embeddings.weight"].std().item() == pytest.approx(1.0, rel=0.05)
    assert sa["output.weight"].std().item() == pytest.approx(128 ** -0.5 * 0.986, rel=0.05)  # truncated at 3 std
    for i in range(3):
        wq, w2 = sa[f"layers.{i}.attention.wq.weight"], sa[f"layers.{i}.feed_forward.w2.weight"]
        assert wq.abs().max() <= 3 * 0.02 and wq.std().item() == pytest.approx(0.02 * 0.986, rel=0.05)
        assert w2.std().item() == pytest.approx(0.02 * 0.986 / (2 * (i + 1)) ** 0.5, rel=0.05)
    # A parameter the scheme does not know is an error, not left as it was.
    a.layers[0].extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="layers.0.extra.weight"):
        a.init_weights(seed=1)


def test_init_weights_tied_embeddings_drawn_once():
    model = Transformer(ModelArgs.from_name("tiny-tied"))
    model.init_weights(seed=0)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.std().item() == pytest.approx(64 ** -0.5, rel=0.1)


# ---------------------------------------------------------------------------------------
# FSDP2 and DDP against the single-process run


@pytest.mark.parametrize("kind,mixed,meta", [("ref", False, False), ("ref", True, True), ("ref+loss", False, False)],
                         ids=["fp32", "bf16-meta-init", "fp32-fused-loss"])
def test_fsdp2_reference_model_matches_single_process(tmp_path, kind, mixed, meta):
    """The patched reference model, fully_shard per block and at the root over 2 ranks
    (mixed: param_dtype bfloat16, reduce_dtype float32; meta: built on the meta device,
    sharded, to_empty and init_weights), against one process on the same global batch
    (mixed: the same bfloat16 compute of each rank's share, W.train_single). "ref+loss"
    trains through the fused cross-entropy: the lm_head weight FSDP2 gathers feeds it, and
    its gradient is reduce-scattered as usual."""
    got = spawn(tmp_path, W.data_parallel_worker, kind, STEPS, BATCH, "fsdp", mixed, meta, False)
    losses, params = W.train_single(kind, STEPS, BATCH, mixed_shares=WORLD if mixed else 0)
    assert_same_run(got, losses, params)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32-checkpointed", "bf16"])
def test_fsdp2_hf_llama_matches_single_process(tmp_path, mixed):
    """The patched Hugging Face LlamaForCausalLM under FSDP2 on 2 ranks (fp32 with HF's
    gradient checkpointing, or bfloat16 mixed precision) against one process."""
    pytest.importorskip("transformers")
    got = spawn(tmp_path, W.data_parallel_worker, "hf", STEPS, BATCH, "fsdp", mixed, False, not mixed)
    losses, params = W.train_single("hf", STEPS, BATCH, checkpointing=not mixed, mixed_shares=WORLD if mixed else 0)
    assert_same_run(got, losses, params)


def test_ddp_with_checkpointed_blocks_matches_single_process(tmp_path):
    """DDP of the patched reference model with checkpointed blocks on 2 ranks against one process."""
    got = spawn(tmp_path, W.data_parallel_worker, "ref", STEPS, BATCH, "ddp", False, False, True)
    losses, params = W.train_single("ref", STEPS, BATCH)
    assert_same_run(got, losses, params)


# ---------------------------------------------------------------------------------------
# Activation checkpointing (single process)


class _CountOps(TorchDispatchMode):
    def __init__(self, prefix="llama_fast::"):
        super().__init__()
        self.prefix, self.calls = prefix, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.prefix) or func.namespace == "llama_fast":
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["ref", "hf"])
def test_checkpointed_blocks_give_the_same_gradients(kind):
    """checkpoint_blocks (the reference's blocks under torch.utils.checkpoint, non-reentrant;
    HF's activation checkpointing): the same loss and gradients as the plain patched
    model; the backward reruns the llama_fast ops, and the forward saves fewer tensors."""
    if kind == "hf":
        pytest.importorskip("transformers")
    tokens = W.data(1, 2)[0]

    def run(checkpointed):
        model = W.build(kind)
        model.train()
        if checkpointed:
            parallel.checkpoint_blocks(model)
            parallel.checkpoint_blocks(model)  # idempotent
        saved = []
        with llama_fast.backend("torch"):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
                loss = W.loss_of(kind, model, tokens)
            with _CountOps() as backward_ops:
                loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return loss.detach(), grads, len(saved), backward_ops.calls

    loss, grads, saved, ops = run(False)
    loss_c, grads_c, saved_c, ops_c = run(True)
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert saved_c < saved, (saved_c, saved)
    # The plain backward runs only the backward ops; the checkpointed one reruns forwards too.
    assert ops_c > ops, (ops_c, ops)


def test_decoder_blocks_names_the_rule():
    with pytest.raises(TypeError, match=r"\.layers"):
        parallel.decoder_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="param_dtype"):
        parallel.shard_model(W.build("ref"), param_dtype="bf16")


# ---------------------------------------------------------------------------------------
# Tensor + sequence parallel


@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["tp-sp", "tp"])
def test_tensor_parallel_matches_single_process(tmp_path, sequence_parallel):
    """tensor_parallel on 2 ranks (column-parallel wq/wk/wv/w1/w3, row-parallel wo/w2, with
    sequence_parallel the norms and the fused add_rms_norm on sequence-sharded DTensors):
    the logits and the gradients of the patched reference model as in one process; the
    forward runs exactly the plan's collectives (nothing gathers besides them); and the
    ops take DTensors sharded on heads or hidden units with no collective."""
    from torch.distributed.tensor import Shard

    got = spawn(tmp_path, W.tensor_parallel_worker, sequence_parallel)
    model = W.build("ref")
    tokens = W.data(1, 2)[0]
    with llama_fast.backend("torch"):
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    layers = model.args.n_layers
    if sequence_parallel:
        # Per block: gather before attention and before the MLP, reduce-scatter after each;
        # the embedding reduce-scatters, the output gathers its input and its logits.
        expected = {"c10d_functional.all_gather_into_tensor": 2 * layers + 2,
                    "c10d_functional.reduce_scatter_tensor": 2 * layers + 1}
    else:
        expected = {"c10d_functional.all_reduce": 2 * layers + 1, "c10d_functional.all_gather_into_tensor": 1}
    assert got["counts"] == expected

    q, k, v, cos, sin, gate, up = got["inputs"]
    ops = got["ops"]
    assert ops["op_comm"] == {"flash_attn": 0, "apply_rope": 0, "swiglu": 0}
    with llama_fast.backend("torch"):
        assert ops["attn"][0] == (Shard(2),)
        torch.testing.assert_close(ops["attn"][1], llama_fast.flash_attn(q, k, v))
        assert ops["rope"][0] == (Shard(2),)
        torch.testing.assert_close(ops["rope"][1], llama_fast.apply_rope(q, k, cos, sin, interleaved=True)[0])
        assert ops["swiglu"][0] == (Shard(2),)
        torch.testing.assert_close(ops["swiglu"][1], llama_fast.swiglu(gate, up))


def test_tensor_parallel_names_the_rule():
    class FakeMesh:
        ndim = 1

        def size(self):
            return 3

    with pytest.raises(ValueError, match=r"n_heads \(4\) must be a multiple of the tensor-parallel size \(3\)"):
        parallel.tensor_parallel(W.build("ref"), FakeMesh())
    with pytest.raises(ValueError, match="1-D DeviceMesh"):
        parallel.tensor_parallel(W.build("ref"), None)


def test_fsdp2_over_tensor_parallel_2x2_matches_single_process(tmp_path):
    """2-D on 4 ranks: tensor + sequence parallel inside pairs of ranks, FSDP2 across the
    pairs (a 2x2 mesh), the model built on the meta device and initialised after both (so
    init_weights fills 2-D-sharded DTensors): several AdamW steps as in one process."""
    got = spawn(tmp_path, W.data_parallel_worker, "ref", STEPS, BATCH, "fsdp+tp", False, True, False, world=4)
    losses, params = W.train_single("ref", STEPS, BATCH)
    assert_same_run(got, losses, params)


# ---------------------------------------------------------------------------------------
# torch.compile per block under FSDP2


def test_compiled_blocks_under_fsdp2_have_no_graph_break(tmp_path):
    """compile_blocks(fullgraph=True) then shard_model with bfloat16 mixed precision on 2
    ranks (the torchtitan recipe): no graph break inside a block (fullgraph raises on one),
    every block graph holds the llama_fast ops, and training matches one process. The
    graphs run under aot_eager (dynamo and AOTAutograd, without inductor's C++ build)."""
    got = spawn(tmp_path, W.data_parallel_worker, "ref", STEPS, BATCH, "fsdp+compile", True, False, False)
    losses, params = W.train_single("ref", STEPS, BATCH, mixed_shares=WORLD)
    assert_same_run(got, losses, params)
    expected = ["llama_fast.add_rms_norm.default", "llama_fast.flash_attn.default", "llama_fast.rms_norm.default",
                "llama_fast.rope.default", "llama_fast.swiglu.default"]
    assert got["graphs"] and all(ops == expected for ops in got["graphs"]), got["graphs"]


def test_compiled_blocks_do_not_recompile_per_call():
    """Ten forwards of the patched model with compile_blocks(fullgraph=True): at most one
    graph per block (the blocks share one when their guards allow), none made per call
    (dynamo's eager backend: the guards are what is checked): the call counters of the
    router and the patch stay out of compiled code, so no guard depends on them."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    model = W.build("ref")
    parallel.compile_blocks(model, backend="eager", fullgraph=True)
    tokens = W.data(1, 2)[0][:, :-1]
    try:
        with llama_fast.backend("torch"), torch.no_grad():
            for _ in range(10):
                model(tokens)
        assert counters["stats"]["unique_graphs"] <= model.args.n_layers
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------
# The fused cross-entropy with a vocabulary-sharded weight (tensor parallel)


def _float64_cross_entropy(case):
    """Loss and gradients of hidden, weight, bias (None without one) in float64, one process."""
    _, _, _, _, _, reduction, _, smoothing = case
    hidden, weight, bias, target, upstream = W.vocab_parallel_inputs(case)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    b = bias.double().requires_grad_() if bias is not None else None
    logits = torch.nn.functional.linear(h, w, b)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction=reduction,
                                             label_smoothing=smoothing)
    loss = loss.view(target.shape) if reduction == "none" else loss
    loss.backward(upstream.double())
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def test_vocab_parallel_cross_entropy_matches_float64(tmp_path):
    """fused_linear_cross_entropy with its weight (and bias) sharded on the vocabulary over
    2 gloo ranks (37 rows: shards of 19 and 18), hidden replicated or sequence-sharded (7
    tokens: 4 and 3), the target plain or a DTensor, 4 chunks of tokens: the loss and the
    gradients of hidden, of each weight shard and of the bias against one process in
    float64, for every reduction, ignored tokens (all of them too), label smoothing and
    bfloat16, on the torch backend and on the triton one (its statistics and gradient
    kernels, under the Triton interpreter). The forward gathers nothing of the weight or the logits: its collectives are
    the hidden states' gather (when sequence-sharded), the target's, and two all-reduces per
    chunk (max, then the stacked sums)."""
    from torch.distributed.tensor import Shard

    got = spawn(tmp_path, W.vocab_parallel_op_worker)
    for backend_name in W.VP_BACKENDS:
        for case in W.VOCAB_PARALLEL_CASES:
            name, dtype, layout, target_dt, _, reduction, ignore, _ = case
            where = f"{backend_name} {name}"
            r = got[backend_name, name]
            torch.testing.assert_close(r["loss_no_grad"], r["loss"], rtol=0, atol=0, equal_nan=True)
            assert not r["loss_no_grad"].requires_grad
            loss, gh, gw, gb = _float64_cross_entropy(case)
            tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
            if ignore == "all":  # "mean" over no token: NaN, as F.cross_entropy; the gradients are 0
                assert torch.isnan(r["loss"]) and torch.isnan(loss)
                assert not r["grad_hidden"].any() and not r["grad_weight"].any()
                continue
            torch.testing.assert_close(r["loss"].double(), loss, **tol, msg=lambda m: f"{where} loss: {m}")
            for what, ref in (("grad_hidden", gh), ("grad_weight", gw), ("grad_bias", gb)):
                if ref is None:
                    assert r[what] is None, (where, what)
                    continue
                assert r[what].dtype == dtype, (where, what, r[what].dtype)
                torch.testing.assert_close(r[what].double(), ref, **tol, msg=lambda m: f"{where} {what}: {m}")
            assert r["placements"] == [(Shard(0),)]
            counts = r["counts"]
            chunks = -(-VP_TOKENS // W.VP_CHUNK)
            assert counts.get("c10d.allreduce_", 0) == 2 * chunks, (where, counts)
            gathers = (layout != "replicated") + target_dt
            assert counts.get("c10d_functional.all_gather_into_tensor", 0) == gathers, (where, counts)


def test_vocab_parallel_cross_entropy_under_torch_compile(tmp_path):
    """A training step whose loss is the vocabulary-parallel fused cross-entropy, compiled
    with torch.compile on 2 gloo ranks: the loss runs eagerly inside the compiled step (a
    graph break, ``torch._dynamo.disable``), and the loss and the gradients of every
    parameter (the projection and norm before the loss, the weight's shards) equal the eager
    step's."""
    got = spawn(tmp_path, W.vocab_parallel_compile_worker)
    eager, compiled = got["eager"], got["compiled"]
    # One graph before the loss, and the loss's own clean break: nothing else breaks the step.
    assert got["graphs"] == 1, got
    assert got["breaks"] and all("vocabulary-parallel cross-entropy runs eagerly" in b for b in got["breaks"]), got
    assert torch.isfinite(eager["loss"])
    for what in ("loss", "grad_proj", "grad_norm", "grad_weight"):
        assert eager[what].abs().sum() > 0, what
        torch.testing.assert_close(compiled[what], eager[what], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


VP_TOKENS = W.VP_SHAPE[0] * W.VP_SHAPE[1]


@pytest.mark.parametrize("tied,sequence_parallel", [(False, True), (False, False), (True, True)],
                         ids=["tp-sp", "tp", "tp-sp-tied"])
def test_tensor_parallel_training_through_the_fused_loss_matches_single_process(tmp_path, tied, sequence_parallel):
    """The patched reference model under tensor_parallel on 2 ranks, trained through its loss
    (forward(tokens, targets=...)): the fused cross-entropy runs vocabulary-parallel on the
    output's Shard(0) weight, and several AdamW steps match one process. Tied embeddings
    keep one Parameter, sharded on the vocabulary for both uses. The logits are never
    gathered: the forward's all-gathers are the plan's own (two per block with sequence
    parallelism, plus the head's input), none of size tokens x vocabulary."""
    from torch.distributed.tensor import Shard

    got = spawn(tmp_path, W.tensor_parallel_loss_worker, tied, sequence_parallel, STEPS, BATCH)
    losses, params = W.train_reference_loss_single(tied, STEPS, BATCH)
    assert_same_run(got, losses, params)
    if not tied:  # (the tied model's unit-variance output weight starts far off: 4 steps do not lower it)
        assert losses[-1] < losses[0]
    assert got["output_placements"] == (Shard(0),)
    assert got["tied"] == tied
    layers = ModelArgs.from_name("tiny").n_layers
    counts = got["counts"]
    if sequence_parallel:
        assert counts["c10d_functional.all_gather_into_tensor"] == 2 * layers + 1, counts
    else:
        assert counts.get("c10d_functional.all_gather_into_tensor", 0) == 0, counts
    assert counts["c10d.allreduce_"] == 2, counts  # one chunk of tokens: max, then the sums


def test_fused_cross_entropy_names_the_rule_for_other_dtensor_layouts(tmp_path):
    """A DTensor weight that is not vocabulary-sharded, or a DTensor hidden with a plain
    weight, raise ValueError naming the rule (checked in a 1-rank process group)."""
    got = spawn(tmp_path, W.vocab_parallel_errors_worker, world=1)
    assert "placements (Shard(0),)" in got["replicated_weight"], got
    assert "hidden is a DTensor but weight is not" in got["dtensor_hidden"], got


# ---------------------------------------------------------------------------------------
# The HF fused loss under FSDP2


@pytest.mark.parametrize("layout", ["lm_head-unit", "blocks+root"])
def test_fsdp2_hf_fused_loss_matches_single_process(tmp_path, layout):
    """The patched HF LlamaForCausalLM under FSDP2 on 2 ranks, trained through its own loss
    (labels): with the lm_head its own FSDP2 unit, the fused loss runs as an FSDP forward
    method of the head (FSDP gathers its weight, reduce-scatters its gradient); with blocks
    + root, on the root's gathered head. Every call is fused, no fallback warning, and
    several AdamW steps match one process."""
    pytest.importorskip("transformers")
    got = spawn(tmp_path, W.hf_fsdp_loss_worker, layout, STEPS, BATCH)
    losses, params = W.train_hf_loss_single(STEPS, BATCH)
    assert_same_run(got, losses, params)
    assert got["calls"] == {"fused": STEPS}, got["calls"]
    assert got["warnings"] == []


def test_fsdp2_over_tensor_parallel_2x2_through_the_fused_loss_matches_single_process(tmp_path):
    """2-D on 4 ranks (tensor + sequence parallel inside pairs, FSDP2 across them), trained
    through the patched model's loss: FSDP gathers the output weight to its tensor-parallel
    shard (a Shard(0) DTensor on the pair's mesh), so the fused cross-entropy runs
    vocabulary-parallel inside each pair; several AdamW steps match one process."""
    got = spawn(tmp_path, W.data_parallel_worker, "ref+loss", STEPS, BATCH, "fsdp+tp", False, False, False, world=4)
    losses, params = W.train_single("ref+loss", STEPS, BATCH)
    assert_same_run(got, losses, params)


def test_tensor_parallel_loss_parallel_leaves_the_logits_sharded(tmp_path):
    """tensor_parallel(loss_parallel=True) on 2 ranks: forward(tokens) returns the logits
    sharded on the vocabulary (a DTensor, Shard(2)), and torch's loss_parallel() computes
    the loss and gradients of one process from them."""
    from torch.distributed.tensor import Shard

    got = spawn(tmp_path, W.loss_parallel_logits_worker)
    assert got["placements"] == (Shard(2),)
    model = W.build("ref")
    tokens = W.data(1, 2)[0]
    with llama_fast.backend("torch"):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
