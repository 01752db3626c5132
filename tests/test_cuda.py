"""CUDA-only paths: entropies and blends on the GPU equal the CPU's, the flat-buffer exchange on
NCCL (and on gloo through the host), checkpoints saved on CUDA resume on CUDA.

Marked ``cuda`` and skipped without a GPU. ``scripts/gpu_check.sh`` runs them (``pytest -m cuda``);
``scripts/gpu_check.sh --cpu`` sets GRAFT_TEST_DEVICE=cpu, which runs the same checks with the CPU
standing in for the GPU (and gloo for NCCL), so that the tests themselves are exercised in CI.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graft import checkpoint, core, rules
from graft.models import build_model
from helpers import ROOT, env
from test_core import official_entropy

DEVICE = torch.device(os.environ.get("GRAFT_TEST_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"
if ON_GPU and DEVICE.index is None:  # a tensor on "cuda" reports cuda:0, and cuda != cuda:0
    DEVICE = torch.device("cuda", 0)
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                 reason="needs CUDA (scripts/gpu_check.sh --cpu runs these with the CPU standing in)")]


def trained_like_state(seed: int, model: str = "resnet20") -> dict:
    """A model's state with spread-out BN parameters, as after some training."""
    torch.manual_seed(seed)
    state = build_model(model, 10).state_dict()
    for key, t in state.items():
        if t.is_floating_point() and ("bn" in key or key.endswith(("running_mean", "running_var"))):
            t.uniform_(0.1, 1.5)
    return state


def to(state: dict, device) -> dict:
    return {k: v.to(device) for k, v in state.items()}


def test_entropies_on_the_gpu_equal_the_cpu_results():
    state = trained_like_state(0)
    tensors = [t for t in state.values() if t.is_floating_point()]
    gpu = core.weight_entropies([t.to(DEVICE) for t in tensors])
    assert gpu.device == DEVICE
    # Same bins (min, max, sub and mul are exact on both); log and sum may differ in the last bit.
    torch.testing.assert_close(gpu.cpu(), core.weight_entropies(tensors), rtol=0, atol=2e-6)
    conv = state["layer1.0.conv1.weight"]
    torch.testing.assert_close(core.filter_entropy(conv.to(DEVICE)).cpu(), core.filter_entropy(conv),
                               rtol=0, atol=2e-6)
    # The official code computes its entropy on the device, log included (a GPU's log may
    # differ from the CPU's in the last bit, which c = 500 can turn into another rounded alpha):
    # reference mode gives its bits on that device.
    for t in tensors[:8]:
        assert core.reference_entropy(t.to(DEVICE)) == official_entropy(t.to(DEVICE))


@pytest.mark.parametrize("criterion", ["entropy", "bn_scale", "constant"])
def test_blends_on_the_gpu_equal_the_cpu_results(criterion):
    spec = rules.GraftSpec(criterion=criterion)
    own, peer = trained_like_state(1), trained_like_state(2)
    plan = core.make_plan(own)
    h_own, h_peer = core.plan_entropies(own, plan), core.plan_entropies(peer, plan)
    cpu, _ = rules.blend_with_scores(own, peer, plan, h_own, h_peer, spec)
    gpu, _ = rules.blend_with_scores(to(own, DEVICE), to(peer, DEVICE), plan, h_own, h_peer, spec)
    for key in cpu:  # given the same entropies the blend is elementwise: bit for bit
        assert gpu[key].device == DEVICE and torch.equal(gpu[key].cpu(), cpu[key]), key
    # End to end, the entropies are the device's: they may differ from the CPU's in the last bits
    # (log and sums), which c = 500 magnifies about 64 times in alpha. So: the device's entropies
    # are within a few float32 ulps of the CPU's, and given them the blend is the CPU's, bit for bit.
    end_to_end, report = rules.graft_state_dict(to(own, DEVICE), to(peer, DEVICE), spec)
    h_dev_own = torch.tensor([r.score_self for r in report.layers], dtype=torch.float64)
    h_dev_peer = torch.tensor([r.score_peer for r in report.layers], dtype=torch.float64)
    if spec.criterion_rule.score:
        assert float((h_dev_own - h_own).abs().max()) <= 4e-6 and float((h_dev_peer - h_peer).abs().max()) <= 4e-6
    again, _ = rules.blend_with_scores(own, peer, plan, h_dev_own, h_dev_peer, spec)
    for key in cpu:
        assert torch.equal(end_to_end[key].cpu(), again[key]), key
    model = build_model("resnet20", 10)
    model.load_state_dict(cpu)
    assert core.count_invalid_filters(model.to(DEVICE)) == core.count_invalid_filters(model.cpu())


def run_ring_worker(tmp_path, backend: str, device: torch.device) -> list[dict]:
    worker_env = {**env(), "GRAFT_WORKER_BACKEND": backend, "GRAFT_WORKER_DEVICE": device.type}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "workers" / "exchange_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=worker_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_flat_buffer_exchange(tmp_path, backend):
    """NCCL: a GPU per network. gloo: both networks on one GPU, the buffers staged through the host.
    With the CPU standing in, both are gloo on the CPU."""
    if not ON_GPU:
        backend = "gloo"
    elif backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs a GPU per network: 2 GPUs")
    outs = run_ring_worker(tmp_path, backend, DEVICE)
    model_bytes = sum(t.numel() * t.element_size() for t in outs[0]["before"].values())
    for k, out in enumerate(outs):
        peer = outs[1 - k]
        assert out["peer"] == 1 - k and out["bytes"] == model_bytes
        expected, _ = rules.graft_state_dict(out["before"], peer["before"])
        for key in expected:  # the entropies were computed on the device
            torch.testing.assert_close(out["after"][key], expected[key], rtol=0, atol=1e-5)
    for key in outs[0]["after"]:  # the paper's remark for N = 2, bit for bit on any device
        assert torch.equal(outs[0]["after"][key], outs[1]["after"][key]), key


def small_net() -> nn.Module:
    # No convolutions: cuDNN's may sum in another order from one call to the next.
    return nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))


def amp_step(model, optimizer, scaler, x, y) -> None:
    """What train_one_epoch does with amp: fp16 and a GradScaler on CUDA (bf16 for the CPU stand-in)."""
    with torch.autocast(DEVICE.type, torch.float16 if ON_GPU else torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def test_checkpoint_saved_on_cuda_resumes_on_cuda(tmp_path):
    """Save as the training loop does (state on the device, RNG states, GradScaler), load as resume
    does (map_location cpu, then into objects on the device): the next step is the same."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 20, device=DEVICE), torch.randint(0, 4, (64,), device=DEVICE)

    def build():
        model = small_net().to(DEVICE)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, torch.amp.GradScaler(DEVICE.type, init_scale=2.0 ** 12, growth_interval=2)

    model, optimizer, scaler = build()
    for _ in range(5):
        amp_step(model, optimizer, scaler, x, y)
    assert scaler.get_scale() != 2.0 ** 12  # it grew: the scale is state worth saving
    path = checkpoint.save_epoch(tmp_path, 0, {}, {
        "epoch": 0, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "rng": checkpoint.capture_rng(DEVICE)})
    amp_step(model, optimizer, scaler, x, y)  # the next step; its dropout draws from the device's generator
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    saved = checkpoint.load(path)
    if ON_GPU:
        assert saved["rng"]["cuda"].device.type == "cpu"  # what torch.cuda.set_rng_state takes
    model2, optimizer2, scaler2 = build()
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    scaler2.load_state_dict(saved["scaler"])
    for p in model2.parameters():
        assert optimizer2.state[p]["momentum_buffer"].device == p.device == DEVICE
    assert scaler2.get_scale() == saved["scaler"]["scale"]
    checkpoint.restore_rng(saved["rng"])
    amp_step(model2, optimizer2, scaler2, x, y)
    for key, value in model2.state_dict().items():
        assert value.device == DEVICE and torch.equal(value, expected[key]), key
    assert scaler2.get_scale() == scaler.get_scale()
