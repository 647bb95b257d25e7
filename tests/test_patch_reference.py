"""llama_fast.patch on llama_fast's own reference Llama 3 (``llama_fast.model.Transformer``,
family "llama_fast_reference" of ``llama_fast.patching.RULES``).

A tiny random model (dim 64, 2 layers, 4 heads, 2 KV heads, vocab 64, Llama 3.1 rope
scaling) in float32 on the CPU, compared with an unpatched deep copy of itself: logits, loss,
every gradient, KV-cached decoding and greedy generate() with left-padded prompts, unpatch,
torch.compile(fullgraph=True), a 20-step AdamW run, and DDP over two CPU processes (gloo).
The "auto" backend runs the Triton kernels (under the interpreter without a GPU); a few
slower tests use the "torch" backend (said in each). ``ATTENTION_CALLS`` (keys "meta: ...")
shows which path served a call, so a test cannot pass by quietly running the original code.
"""
from __future__ import annotations

import collections
import copy
import importlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import llama_fast
from llama_fast import model as ref_model
from llama_fast.generation import generate
from llama_fast.model import ModelArgs, Transformer

lfnn = importlib.import_module("llama_fast.nn")
lfp = importlib.import_module("llama_fast.patching")
lfmf = importlib.import_module("llama_fast.model_fused")

VOCAB = 64
REPO = Path(__file__).resolve().parents[1]


def tiny_model(dtype=torch.float32) -> Transformer:
    model = Transformer(ModelArgs.from_name("tiny-3.1").scaled(vocab_size=VOCAB)).to(dtype)
    with torch.no_grad():  # norms start at ones; random ones test that the weight is applied
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def pair():
    """(reference, patched deep copy); whatever is patched is unpatched after the test."""
    made = []

    def make():
        ref = tiny_model()
        model = copy.deepcopy(ref)
        report = llama_fast.patch(model)
        made.append(model)
        return ref, model, report

    lfp.ATTENTION_CALLS.clear()
    yield make
    for m in made:
        llama_fast.unpatch(m)


def calls(name: str) -> int:
    return lfp.ATTENTION_CALLS[lfmf.META_CALLS_PREFIX + name]


def sdpa_calls() -> int:
    return sum(n for k, n in lfp.ATTENTION_CALLS.items() if k.startswith(lfmf.META_CALLS_PREFIX + "sdpa"))


def assert_close(got, want, what, tol=5e-5):
    assert got.shape == want.shape, what
    assert not torch.isnan(got).any(), f"{what}: NaN"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"{what}: max error {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------------


def test_rules_and_report(pair):
    ref, model, report = pair()
    assert {r.family for r in lfp.RULES} >= {"llama_fast_reference"}
    n = ref.args.n_layers
    # per layer: block, attention_norm, ffn_norm (+ the final norm)
    assert report.counts == {"rms_norm": 3 * n + 1, "rope": n, "swiglu": n, "attention": n, "cross_entropy": 1}
    assert not report.left_alone, str(report)
    for layer in model.layers:
        assert type(layer) is lfmf.MetaTransformerBlock
        assert type(layer.attention) is lfmf.MetaAttention
        assert type(layer.attention.rotary) is lfmf.MetaRotary
        assert type(layer.feed_forward) is lfnn.SwiGLUMLP
        assert type(layer.attention_norm) is type(layer.ffn_norm) is lfnn.RMSNorm
    assert type(model.norm) is lfnn.RMSNorm
    assert type(model.loss_head) is lfmf.FusedCrossEntropyHead
    # the same state dict keys, and nothing but the reference's Parameters
    assert list(model.state_dict()) == list(ref.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    again = llama_fast.patch(model)
    assert sum(again.counts.values()) == 0 and len(again.already) == len(report.replaced)


def test_patch_shares_parameters():
    model = tiny_model()
    before = {name: p for name, p in model.named_parameters()}
    llama_fast.patch(model)
    try:
        after = dict(model.named_parameters())
        assert after.keys() == before.keys()
        assert all(after[k] is before[k] for k in before)
    finally:
        llama_fast.unpatch(model)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_logits_loss_and_every_gradient(pair, backend):
    ref, model, _ = pair()
    tokens = torch.randint(0, VOCAB, (2, 12))
    targets = torch.randint(0, VOCAB, (2, 12))
    with llama_fast.backend(backend):
        want = ref(tokens)
        got = model(tokens)
        assert_close(got, want, "logits")
        loss_ref = F.cross_entropy(want.flatten(0, 1), targets.flatten())
        loss = F.cross_entropy(got.flatten(0, 1), targets.flatten())
        assert_close(loss, loss_ref, "loss")
        loss_ref.backward()
        loss.backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert grads[name].grad is not None, name
        assert_close(grads[name].grad, p.grad, f"grad of {name}", tol=2e-4)
    assert calls("flash_attn") == ref.args.n_layers and sdpa_calls() == 0


def test_padded_batch_without_cache_uses_varlen(pair):
    ref, model, _ = pair()
    tokens = torch.randint(0, VOCAB, (3, 9))
    lengths = torch.tensor([9, 5, 2])
    pos = torch.arange(9)[None] - (9 - lengths)[:, None]  # left padding: negative positions
    want, got = ref(tokens, pos), model(tokens, pos)
    valid = pos >= 0
    assert_close(got[valid], want[valid], "logits of the valid tokens")
    assert calls("flash_attn_varlen") == ref.args.n_layers and sdpa_calls() == 0


def test_cached_prefill_and_decoding(pair):
    """Step by step against the reference's own cache, left-padded rows of different lengths."""
    ref, model, _ = pair()
    lengths = [6, 3]
    longest = max(lengths)
    tokens = torch.randint(0, VOCAB, (2, longest))
    pos = torch.arange(longest)[None] - (longest - torch.tensor(lengths))[:, None]
    for m in (ref, model):
        m.setup_cache(2, 16)
    with torch.no_grad():
        want, got = ref(tokens, pos), model(tokens, pos)
        valid = pos >= 0
        assert_close(got[valid], want[valid], "prefill logits")
        assert calls("flash_attn_varlen (cache)") == ref.args.n_layers
        nxt = want[:, -1].argmax(-1)
        cur = torch.tensor(lengths)
        for step in range(4):
            want = ref(nxt[:, None], cur[:, None])
            got = model(nxt[:, None], cur[:, None])
            assert_close(got, want, f"decoding step {step}")
            nxt, cur = want[:, -1].argmax(-1), cur + 1
        assert calls("flash_decode") == 4 * ref.args.n_layers
        # several tokens at once over the cache, all rows at the same position: flash_attn
        both = torch.randint(0, VOCAB, (2, 3))
        at = torch.tensor([[10, 11, 12]])
        assert_close(model(both, at), ref(both, at), "a 3-token chunk over the cache")
    assert sdpa_calls() == 0


def test_decode_step_under_capture_reads_nothing_on_the_host(pair, monkeypatch):
    """What a CUDA-graph capture of the decode step sees (on any device): after a warm-up
    step, the same positions tensor with new values is not summarised on the host again."""
    ref, model, _ = pair()
    for m in (ref, model):
        m.setup_cache(2, 16)
    tok, pos = torch.ones(2, 1, dtype=torch.long), torch.full((2, 1), 4)
    with torch.no_grad():
        prompt, start = torch.randint(0, VOCAB, (2, 4)), torch.arange(4)[None].expand(2, 4)
        ref(prompt, start), model(prompt, start)
        model(tok, pos)  # warm-up
        monkeypatch.setattr(lfmf, "_capturing", lambda p: True)
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("a host sync while capturing"))
        pos.fill_(4)  # a new version of the same tensor, as a graph's static input gets
        got = model(tok, pos)
        monkeypatch.undo()
        assert_close(got, ref(tok, pos), "decode step under capture")
        with pytest.raises(RuntimeError, match="warm-up"):
            monkeypatch.setattr(lfmf, "_capturing", lambda p: True)
            model(tok, pos.clone())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_step_replays_from_a_cuda_graph(pair):
    """The patched decode step (flash_decode) captured once after a warm-up step, then
    replayed with new tokens and positions written into its static inputs."""
    ref, model, _ = pair()
    ref, model = ref.cuda(), model.cuda()
    for m in (ref, model):
        m.setup_cache(2, 32)
    prompt = torch.randint(0, VOCAB, (2, 5), device="cuda")
    start = torch.arange(5, device="cuda")[None].expand(2, 5)
    tok = torch.zeros(2, 1, dtype=torch.long, device="cuda")
    pos = torch.zeros(2, 1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        ref(prompt, start), model(prompt, start)
        tok.fill_(1), pos.fill_(5)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(tok, pos)  # warm-up: checks the positions' layout on the host
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model(tok, pos)
        for step in range(3):
            tok.fill_(7 + step), pos.fill_(5 + step)
            graph.replay()
            want = ref(tok.clone(), pos.clone())
            assert_close(logits, want, f"replayed decode step {step}", tol=1e-4)


def test_generate_greedy_left_padded(pair):
    ref, model, _ = pair()
    prompts = [[5, 9, 1, 33, 2, 7, 8], [3, 4], [60, 1, 2, 3]]
    want = generate(ref, prompts, max_new_tokens=6)
    got = generate(model, prompts, max_new_tokens=6)
    assert got == want
    assert calls("flash_decode") > 0 and calls("flash_attn_varlen (cache)") > 0 and sdpa_calls() == 0
    # a row's tokens do not depend on its batch
    assert generate(model, prompts[1:2], max_new_tokens=6) == want[1:2]


def test_irregular_positions_fall_back_to_sdpa(pair):
    """Positions the kernels' causal alignment cannot express run SDPA, warned, not wrong."""
    ref, model, _ = pair()
    tokens = torch.randint(0, VOCAB, (1, 5))
    pos = torch.tensor([[0, 1, 3, 2, 4]])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        got = model(tokens, pos)
    assert_close(got, ref(tokens, pos), "logits")
    assert sdpa_calls() == ref.args.n_layers


def test_unpatch_restores_types_parameters_cache_and_outputs(pair):
    ref, model, _ = pair()
    params = dict(model.named_parameters())
    model.setup_cache(2, 16)  # made on the patched model: the originals get it back
    cache = model.layers[0].attention.kv_cache
    restored = llama_fast.unpatch(model)
    assert sum(restored.counts.values()) > 0
    assert [type(m) for m in model.modules() if type(m) is not ref_model.KVCache] == [type(m) for m in ref.modules()]
    for layer in model.layers:
        assert type(layer) is ref_model.TransformerBlock
        assert type(layer.attention) is ref_model.Attention and type(layer.attention.rotary) is ref_model.Rotary
        assert type(layer.feed_forward) is ref_model.FeedForward
        assert type(layer.attention_norm) is type(layer.ffn_norm) is ref_model.RMSNorm
    assert type(model.loss_head) is ref_model.CrossEntropyHead
    assert model.layers[0].attention.kv_cache is cache
    assert all(p is params[k] for k, p in model.named_parameters())
    model.drop_cache()
    tokens = torch.randint(0, VOCAB, (2, 7))
    assert torch.equal(model(tokens), ref(tokens))
    assert torch.equal(model(tokens, targets=tokens), ref(tokens, targets=tokens))
    assert sum(llama_fast.unpatch(model).counts.values()) == 0


class _OpsSeen(TorchDispatchMode):
    """The ops dispatched inside it (a custom op shows as itself, e.g. llama_fast.linear_cross_entropy)."""

    def __init__(self):
        super().__init__()
        self.names = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[str(func)] += 1
        return func(*args, **(kwargs or {}))


FUSED_CE = "llama_fast.linear_cross_entropy.default"


def loss_targets(tokens: torch.Tensor) -> torch.Tensor:
    """tokens shifted left by one; the last position and a few others without a loss (-100)."""
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)
    targets[0, :3] = -100  # a prompt whose tokens carry no loss
    return targets


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("name", ["tiny-3.1", "tiny-tied"])
def test_fused_loss_head_loss_and_every_gradient(backend, name):
    """forward(tokens, targets=...): the unpatched model's eager float32 cross-entropy vs the
    patched model's fused head; tiny-tied's output weight is the embedding (one Parameter
    getting both gradients)."""
    ref = Transformer(ModelArgs.from_name(name).scaled(vocab_size=VOCAB))
    model = copy.deepcopy(ref)
    report = llama_fast.patch(model)
    try:
        assert report.counts["cross_entropy"] == 1 and type(model.loss_head) is lfmf.FusedCrossEntropyHead
        assert (model.output.weight is model.tok_embeddings.weight) == (name == "tiny-tied")
        tokens = torch.randint(0, VOCAB, (2, 11))
        targets = loss_targets(tokens)
        want = ref(tokens, targets=targets)
        want.backward()
        with llama_fast.backend(backend), _OpsSeen() as seen:
            got = model(tokens, targets=targets)
            got.backward()
        assert seen.names[FUSED_CE] == 1
        assert got.dtype == want.dtype == torch.float32 and got.shape == ()
        assert_close(got, want, "loss")
        grads = dict(model.named_parameters())
        for pname, p in ref.named_parameters():
            assert_close(grads[pname].grad, p.grad, f"grad of {pname}", tol=2e-4)
    finally:
        llama_fast.unpatch(model)


def test_cross_entropy_flag_off_and_unpatch_restore_the_head():
    model = tiny_model()
    report = llama_fast.patch(model, cross_entropy=False)
    try:
        assert report.counts["cross_entropy"] == 0 and report.counts["attention"] == 2
        assert any(s.kind == "cross_entropy" and "disabled" in s.reason for s in report.left_alone)
        assert type(model.loss_head) is ref_model.CrossEntropyHead
        tokens = torch.randint(0, VOCAB, (2, 7))
        with llama_fast.backend("torch"), _OpsSeen() as seen:
            model(tokens, targets=tokens)
        assert seen.names[FUSED_CE] == 0
        assert llama_fast.patch(model).counts["cross_entropy"] == 1  # enabled later: patched then
        assert type(model.loss_head) is lfmf.FusedCrossEntropyHead
    finally:
        llama_fast.unpatch(model)
    assert type(model.loss_head) is ref_model.CrossEntropyHead


def test_fused_head_runs_the_reference_formula_in_float64():
    """float64 is not an op dtype: the fused head runs the reference's formula, exactly."""
    ref = tiny_model(torch.float64)
    model = copy.deepcopy(ref)
    llama_fast.patch(model)
    try:
        tokens = torch.randint(0, VOCAB, (2, 7))
        with _OpsSeen() as seen:
            got = model.loss_head(torch.randn(2, 7, 64, dtype=torch.float64), model.output, tokens)
        assert seen.names[FUSED_CE] == 0 and got.dtype == torch.float64
        h = torch.randn(2, 7, 64, dtype=torch.float64)
        assert torch.equal(model.loss_head(h, model.output, tokens), ref.loss_head(h, ref.output, tokens))
    finally:
        llama_fast.unpatch(model)


def test_patch_flags_and_partial_patch():
    model = tiny_model()
    report = llama_fast.patch(model, attention=False, rms_norm=False)
    try:
        assert report.counts == {"rms_norm": 0, "rope": 2, "swiglu": 2, "attention": 0, "cross_entropy": 1}
        assert type(model.layers[0]) is ref_model.TransformerBlock
        assert type(model.layers[0].attention.rotary) is lfmf.MetaRotary
    finally:
        llama_fast.unpatch(model)
    assert type(model.layers[0].attention.rotary) is ref_model.Rotary


def test_torch_compile_fullgraph_training_step(pair):
    """Inductor, fullgraph, forward + backward of the patched model and its fused loss; the "auto" backend
    (Triton kernels under the interpreter on a CPU: custom ops are opaque to the compiler)."""
    torch._dynamo.reset()
    ref, model, _ = pair()
    tokens = torch.randint(0, VOCAB, (2, 8))
    targets = torch.randint(0, VOCAB, (2, 8))

    def step(m):
        return m(tokens, targets=targets)  # the fused loss head inside the graph

    eager = copy.deepcopy(model)  # a deep copy keeps the patched modules
    want = step(eager)
    want.backward()
    compiled = torch.compile(model, fullgraph=True)
    got = step(compiled)
    got.backward()
    assert_close(got, want, "loss")
    grads = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, grads[name].grad, f"grad of {name}", tol=2e-4)
    assert calls("flash_attn") > 0 and sdpa_calls() == 0
    assert type(model.loss_head) is lfmf.FusedCrossEntropyHead
    torch._dynamo.reset()


def test_adamw_20_steps_follow_the_reference(pair):
    """torch backend (20 forward/backward/AdamW steps under the interpreter would be slow)."""
    ref, model, _ = pair()
    assert type(model.loss_head) is lfmf.FusedCrossEntropyHead
    data = torch.randint(0, VOCAB, (2, 2, 9)).repeat(10, 1, 1)  # two batches, ten times each: it must learn
    curves = []
    with llama_fast.backend("torch"):
        for m in (ref, model):
            opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)
            losses = []
            for batch in data:
                loss = m(batch[:, :-1], targets=batch[:, 1:])  # the fused loss head when patched
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            curves.append(torch.tensor(losses))
    assert curves[1][-1] < curves[1][0]  # it learns
    assert_close(curves[1], curves[0], "loss curve", tol=2e-3)
    params = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert_close(params[name].detach(), p.detach(), f"{name} after 20 steps", tol=2e-3)


_DDP_WORKER = textwrap.dedent('''
    import os, sys
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    def main():
        rank, world, port, work = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3]
        import llama_fast
        from llama_fast.model import ModelArgs, Transformer
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        torch.set_num_threads(1)
        init = torch.load(os.path.join(work, "init.pt"))
        model = Transformer(ModelArgs(**init["args"]))
        model.load_state_dict(init["state"])
        report = llama_fast.patch(model)
        assert sum(report.counts.values()) > 0 and not report.left_alone
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
        data = init["data"]  # (steps, world * per_rank, S + 1): each rank takes its rows
        per = data.shape[1] // world
        for batch in data:
            mine = batch[rank * per:(rank + 1) * per]
            loss = ddp(mine[:, :-1], targets=mine[:, 1:])  # the fused loss head
            opt.zero_grad()
            loss.backward()
            opt.step()
        grads = {n: p.grad for n, p in model.named_parameters()}
        params = {n: p.detach() for n, p in model.named_parameters()}
        torch.save({"grads": grads, "params": params}, os.path.join(work, f"rank{rank}.pt"))
        dist.destroy_process_group()

    main()
''')


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    """Two gloo processes (subprocesses), the patched model (fused loss head included) in DDP, 3 AdamW steps: the
    gradients are the same on both ranks and match one process on the whole batch. The
    workers use the torch backend (LLAMA_FAST_BACKEND=torch: the interpreter in two
    processes on a loaded machine would be slow); the in-process run uses the same."""
    model = tiny_model()
    steps, world, per_rank, seq = 3, 2, 2, 8
    data = torch.randint(0, VOCAB, (steps, world * per_rank, seq + 1))
    args = {k: getattr(model.args, k) for k in model.args.__dataclass_fields__}
    torch.save({"args": args, "state": model.state_dict(), "data": data}, tmp_path / "init.pt")
    (tmp_path / "worker.py").write_text(_DDP_WORKER)

    env = dict(os.environ, LLAMA_FAST_BACKEND="torch", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    # One process, the whole batch (equal shards: DDP's mean of means is the mean).
    single = copy.deepcopy(model)
    llama_fast.patch(single)
    opt = torch.optim.AdamW(single.parameters(), lr=3e-3)
    with llama_fast.backend("torch"):
        for batch in data:
            loss = single(batch[:, :-1], targets=batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for name, p in single.named_parameters():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), f"ranks differ on {name}"
        assert_close(ranks[0]["grads"][name], p.grad, f"grad of {name}", tol=2e-4)
        # Adam divides by sqrt(v): for elements with tiny gradients it turns a 1e-6 relative
        # difference in the gradient into a much larger one in the update, so parameters
        # are compared in units of the learning rate (a wrong gradient moves them ~lr).
        err = (ranks[0]["params"][name] - p.detach()).abs().max().item()
        assert err <= 0.05 * 3e-3 * steps, f"{name} after {steps} steps: max error {err:.3g}"
