"""On CUDA: the device prefill path (routing top-k and the zero-copy row gather on the device, a static
column bound, the selections to the host once) against the CPU path and the synced path on the same GPU.
Run with `pytest -m gpu tests/gpu/test_prefill_device.py`.

- PrefillSelection over the same bf16 bank and the same routing queries on CUDA and on the CPU: the same
  numbers (scores to fp32 rounding: the Triton GEMM sums in another order), and the gathered K/V bytes
  are the arena's (bf16 exact), with no host sync inside a layer.
- Through `_prefill` on the GPU (tiny golden model, fp32 and bf16): the exact-columns device path equals the
  synced path bit for bit (caches, logits, selections); the static bound changes only padding up to the
  first router layer and float rounding after it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msabank import stages
from msabank.model import load_model
from msabank.prompt import Prompt
from tests.test_prefill_device import _bank, _batch, _prompts, _run, _same_routed

pytestmark = pytest.mark.gpu


def _queries(mem, lens, seed):
    g = torch.Generator().manual_seed(seed)
    dim = mem.router.dim
    q = torch.randn(sum(lens), dim, generator=g)
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return q, seq


@pytest.mark.parametrize("lens", [(5, 9, 1), (0, 7, 0, 3)], ids=lambda x: "Q" + "x".join(map(str, x)))
def test_selection_cuda_equals_cpu_bf16(golden: Path, lens):
    model = load_model(golden / "tiny-msa")
    cpu = _bank(model, 11, top_k=3, dtype=torch.bfloat16)
    gpu = _bank(model, 11, top_k=3, device="cuda", dtype=torch.bfloat16)
    assert gpu.content.pin
    q, seq = _queries(cpu, lens, 3)
    sc, sg = cpu.prefill_selection(len(lens)), gpu.prefill_selection(len(lens))
    assert sc.columns is None and sg.columns is not None and sg.columns % 64 == 0
    for r in range(cpu.router.num_router_layers):
        kc, vc, lc = sc.layer(r, q, seq)
        qd, sd = q.cuda(), seq.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # routing, row table and gather: no host wait
        try:
            kg, vg, lg = sg.layer(r, qd, sd)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert gpu.content.last_path == "zero-copy"
        assert torch.equal(lg.cpu(), lc)
        c = kc.shape[2]
        assert torch.equal(kg[:, :, :c].cpu(), kc) and torch.equal(vg[:, :, :c].cpu(), vc)
        assert not kg[:, :, c:].any() and not vg[:, :, c:].any()
    for rg, rc in zip(sg.finish(), sc.finish()):  # random queries: no near-ties; the GEMMs sum in another order
        for x, y in zip(rg, rc):
            assert x.numbers.tolist() == y.numbers.tolist()
            torch.testing.assert_close(x.scores, y.scores, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_exact_columns_equal_the_synced_path_on_cuda(golden: Path, dtype):
    model = load_model(golden / "tiny-msa", device="cuda", dtype=dtype)
    mem = _bank(model, 12, device="cuda", dtype=dtype)
    real = mem.prefill_selection
    mem.prefill_selection = lambda n, given=None: real(n, given, static_columns=False)
    prompts = _prompts(model)
    got = _run(model, mem, prompts, device=True)
    want = _run(model, mem, prompts, device=False)
    _same_routed(got[1], want[1])
    assert got[3] == want[3]
    for cg, cw in zip(got[0], want[0]):
        assert cg.prompt_start == cw.prompt_start
        assert torch.equal(cg.k, cw.k) and torch.equal(cg.v, cw.v) and torch.equal(cg.valid, cw.valid)
    assert torch.equal(got[2], want[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_static_columns_on_cuda(golden: Path, dtype):
    model = load_model(golden / "tiny-msa", device="cuda", dtype=dtype)
    mem = _bank(model, 13, device="cuda", dtype=dtype)
    prompts = _prompts(model)
    got = _run(model, mem, prompts, device=True)  # the default on CUDA: the static bound
    want = _run(model, mem, prompts, device=False)
    first = model.config.router_layers[0]
    t = _batch(model, prompts).input_ids.shape[1]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for x, y in zip(got[1], want[1]):  # selections: exact at the first router layer, near-ties aside after
        assert x[0].numbers.tolist() == y[0].numbers.tolist()
    for i, (cg, cw) in enumerate(zip(got[0], want[0])):
        if i < first:
            assert torch.equal(cg.k, cw.k)
            continue
        assert cg.prompt_start >= cw.prompt_start
        p = cw.prompt_start
        assert torch.equal(cg.valid[:, :p], cw.valid[:, :p]) and not cg.valid[:, p : cg.prompt_start].any()
        if i == first:
            assert torch.equal(cg.k[:, :, :p], cw.k[:, :, :p]) and torch.equal(cg.v[:, :, :p], cw.v[:, :, :p])
        err = (cg.k[:, :, cg.prompt_start : cg.prompt_start + t].float() - cw.k[:, :, p : p + t].float()).abs().max()
        assert err <= tol, (i, float(err))
    assert (got[2] - want[2]).abs().max() <= (1e-4 if dtype == torch.float32 else 0.25)


def test_generate_on_cuda_device_path_tokens(golden: Path):
    model = load_model(golden / "tiny-msa", device="cuda", dtype=torch.float32)
    mem = _bank(model, 14, device="cuda")
    prompts: list[Prompt] = _prompts(model)[:3]
    out = {}
    for device in (True, False):
        mem.device_prefill = device
        out[device] = stages.generate(model, prompts, mem, max_new_tokens=6, stop_ids=())
    assert out[True].tokens == out[False].tokens
    assert mem.route_s > 0 and mem.fetch_s > 0  # CUDA-event timed
