"""gpu_memory.py: a member's estimated GPU memory, the refusal of a packing that cannot fit, and
the one line when CUDA runs out of memory. No GPU and no Ray cluster needed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ensemble import gpu_memory
from ensemble.errors import UserError, run_cli
from ensemble.gpu_memory import (CUDA_OVERHEAD, GIB, GpuMemoryError, LiveTensors, MemberMemory, check_fit,
                                 inference_batch, inference_memory, member_memory, out_of_memory_line)

MIB = 2**20
A10G = 23028 * MIB  # a "24 GB" A10G as CUDA reports it (nvidia-smi: 23028 MiB)


def _peaks_of_training_steps(arch: str, image_size: int, batches: tuple) -> list:
    """Peak bytes of live tensors over a member's training step on CPU at each batch size, in the
    engine's order (forward, zero_grad, backward, Adam), with the gradients and Adam's moments of
    earlier steps held: weights, gradients, moments, activations."""
    from ensemble.engine import make_optimizer
    from ensemble.models import make_member_model

    torch.manual_seed(0)
    model = make_member_model(arch, 100, None, "layer1")
    optimizer = make_optimizer(model, 1e-3)
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # Adam's moments, as after a first step
    peaks = []
    for batch in batches:
        x, y = torch.randn(batch, 3, image_size, image_size), torch.randint(0, 100, (batch,))
        held = [*model.parameters(), *model.buffers(), *(p.grad for p in trained),
                *(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))]
        with LiveTensors(*held) as live:
            del held
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        peaks.append(live.peak)
    return peaks


def test_live_tensors_counts_the_bytes_alive_at_once():
    """By hand: a, then b = 2a (both alive: 8000 bytes), a freed, c = b + 1 (b and c: 8000 again),
    then a 16000-byte tensor with b and c alive: 24000, the peak; views share their storage."""
    held = torch.zeros(10)  # 40 bytes alive before
    with LiveTensors(held) as live:
        a = torch.empty(1000)
        b = a * 2
        assert live.now == 40 + 8000
        del a
        c = b + 1
        view = c[:10]
        assert live.now == 40 + 8000
        d = torch.empty(4000)
        del b, c, view, d
    assert live.peak == 40 + 24000 and live.now == 40


def test_the_estimate_is_the_peak_of_a_real_cpu_step():
    """Measured independently (every tensor alive over a real CPU step of resnet18, not the saved
    tensors of a meta forward), the peak is the estimate without its allowance, within 1%; the
    activations per image within 5% (the batch's own input is counted in the measurement only)."""
    memory = member_memory("resnet18", 100, 64, "layer1", False, False)
    small, large = _peaks_of_training_steps("resnet18", 64, (2, 6))
    for batch, peak in ((2, small), (6, large)):
        assert peak == pytest.approx(memory.state + batch * memory.per_image, rel=0.01)
    assert (large - small) / 4 == pytest.approx(memory.per_image, rel=0.05)


def test_the_estimate_of_the_study_s_member_and_what_bf16_and_frozen_stages_change():
    fp32 = member_memory("resnext101_64x4d", 100, 224, "layer1", False, False)
    bf16 = member_memory("resnext101_64x4d", 100, 224, "layer1", False, True)
    assert 230 * MIB < fp32.per_image < 240 * MIB  # the issue measured ~240 MB (229 MiB) per image
    assert bf16.per_image == pytest.approx(fp32.per_image / 2, rel=0.01)
    # 81,611,172 weights, 81,217,956 of them trained (models.freeze): + gradients and two moments
    assert fp32.state == bf16.state == 4 * 81_611_172 + 12 * 81_217_956
    assert fp32.per_step == 0  # bf16 copies of the conv and linear weights: all but batch norm's 0.3%
    assert bf16.per_step == pytest.approx(2 * 81_611_172, rel=0.005)
    # the stem and layer1..layer3 frozen: only layer4 and the head keep activations and train
    frozen = member_memory("resnext101_64x4d", 100, 224, "layer3", True, True)
    assert frozen.per_image < bf16.per_image / 10 and frozen.state < 0.6 * bf16.state


def test_under_bf16_autocast_the_activations_halve_and_the_weights_are_copied_once_per_step():
    """What CPU autocast really saves for backward (resnet18, 64 px, 2 images): the estimate's
    bf16 activations plus its bf16 weight copies, within 1%."""
    from ensemble.gpu_memory import saved_bytes
    from ensemble.models import make_member_model

    memory = member_memory("resnet18", 100, 64, "layer1", False, True)
    torch.manual_seed(0)
    model = make_member_model("resnet18", 100, None, "layer1")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = saved_bytes(model, 64, batch=2)
    assert torch.bfloat16 in saved
    assert sum(saved.values()) == pytest.approx(memory.per_step + 2 * memory.per_image, rel=0.01)


# Round numbers: 1 GiB of state and 200 MiB per image need 1 + 1.1 * (1 + 12.5) = 15.85 GiB at batch 64
# (15.9 in a line).
ROUND = MemberMemory(state=GIB, per_step=0, per_image=200 * MIB)


def test_need_and_the_largest_batch_that_fits():
    assert ROUND.need(64) == pytest.approx(CUDA_OVERHEAD + 1.1 * (GIB + 64 * 200 * MIB), abs=1)
    assert ROUND.largest_batch(12 * GIB) == 46  # (11 / 1.1 - 1) GiB / 200 MiB = 46.08
    assert ROUND.need(46) <= 12 * GIB < ROUND.need(47)
    assert ROUND.largest_batch(2 * GIB) == 0 and ROUND.largest_batch(ROUND.need(10)) == 10


@pytest.mark.parametrize("gpu, share, fix", [
    (24, 0.5, "use --batch-size 46 or less with --fresh, or --gpus-per-member 1"),
    (3, 0.5, "use --gpus-per-member 1 with --batch-size 4 or less and --fresh"),
    (12, 1.0, "use --batch-size 46 or less with --fresh"),
    (2, 1.0, "use a GPU with more memory, or a smaller --image-size or a later --freeze stage with --fresh"),
])
def test_a_packing_that_cannot_fit_is_refused_in_one_line_with_what_fits(gpu, share, fix, capsys):
    def start_member():
        check_fit(ROUND, member=3, arch="resnext101_64x4d", batch=64, image_size=224, precision="fp32",
                  gpu_total=int(gpu * GIB), gpus_per_member=share)

    assert run_cli(start_member) == 2
    assert capsys.readouterr().err == (
        f"error: member 3: resnext101_64x4d at --batch-size 64, 224 px, fp32 needs about 15.9 GiB of GPU memory, "
        f"more than its share, {gpu * share:.1f} GiB ({share:g} of a {gpu:.1f} GiB GPU); {fix}\n")


def test_the_issue_s_packing_two_fp32_members_on_an_a10g_is_refused_and_bf16_fits():
    fp32 = member_memory("resnext101_64x4d", 100, 224, "layer1", False, False)
    with pytest.raises(GpuMemoryError, match=r"needs about 18\.5 GiB .* share, 11\.2 GiB \(0\.5 of a 22\.5 GiB "
                                             r"GPU\); use --batch-size 35 or less with --fresh, "
                                             r"or --gpus-per-member 1$"):
        check_fit(fp32, member=0, arch="resnext101_64x4d", batch=64, image_size=224, precision="fp32",
                  gpu_total=A10G, gpus_per_member=0.5)
    bf16 = member_memory("resnext101_64x4d", 100, 224, "layer1", False, True)
    check_fit(bf16, member=0, arch="resnext101_64x4d", batch=64, image_size=224, precision="bf16",
              gpu_total=A10G, gpus_per_member=0.5)  # 10.7 GiB of 11.2: fits, by the estimate


def test_a_trainer_on_a_gpu_too_small_for_its_share_refuses_its_member_in_one_line(monkeypatch, capsys):
    """MemberTrainer._check_gpu_memory, the first thing a member does on a GPU, with CUDA's device
    properties faked as an A10G's (no GPU here): the study's member at --gpus-per-member 0.5 in fp32
    is one line and exit 2; in bf16 it fits; on CPU nothing is asked of CUDA."""
    from types import SimpleNamespace

    from ensemble.actors import MemberTrainer
    from ensemble.config import build_config

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: asked.append(device) or SimpleNamespace(total_memory=A10G))
    trainer = MemberTrainer.__ray_metadata__.modified_class.__new__(MemberTrainer.__ray_metadata__.modified_class)

    def plan(precision: str):
        cfg = build_config(flag_values={"arch": "resnext101_64x4d", "freeze": "layer1", "batch_size": 64,
                                        "image_size": 224, "gpus_per_member": 0.5, "precision": precision})
        return SimpleNamespace(config=cfg, num_classes=100, output="runs/exp1")

    trainer.device = torch.device("cuda", 0)
    assert run_cli(lambda: trainer._check_gpu_memory(4, plan("fp32"))) == 2
    assert capsys.readouterr().err == (
        "error: member 4: resnext101_64x4d at --batch-size 64, 224 px, fp32 needs about 18.5 GiB of GPU memory, "
        "more than its share, 11.2 GiB (0.5 of a 22.5 GiB GPU); use --batch-size 35 or less with --fresh, or "
        "--gpus-per-member 1\n")
    assert asked == [torch.device("cuda", 0)]
    with trainer._check_gpu_memory(4, plan("bf16")):  # 10.7 GiB of 11.2: the member trains
        pass
    trainer.device = torch.device("cpu")
    with trainer._check_gpu_memory(4, plan("fp32")):
        pass
    assert len(asked) == 2


def _vote_peak(states: list, batch: int, image_size: int, tta: str) -> int:
    """Peak bytes of live tensors while real CPU members (resnet18, from ``states``) vote on a
    batch (engine.vote_member_probabilities), their weights and the uint8 batch included."""
    from ensemble.engine import eval_models, vote_member_probabilities

    models = eval_models("resnet18", 10, states, torch.device("cpu"))
    images = torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8)
    with LiveTensors(*(t for m in models for t in (*m.parameters(), *m.buffers())), images) as live:
        vote_member_probabilities(models, images, tta=tta)
    return live.peak


def test_the_inference_estimate_is_the_peak_of_real_cpu_members_voting():
    """Two real resnet18 members voting on CPU with TTA, counted tensor by tensor at 3 and 7
    images: the estimate made on ``meta`` (weights, and per image the largest pass) within 1%."""
    from ensemble.models import make_member_model

    states = [make_member_model("resnet18", 10, None, "none").state_dict() for _ in range(2)]
    memory = inference_memory(("resnet18", "resnet18"), 10, 64, "hflip", False)
    weights = sum(t.untyped_storage().nbytes() for state in states for t in state.values())
    assert memory.state == weights and memory.per_step == 0
    small, large = _vote_peak(states, 3, 64, "hflip"), _vote_peak(states, 7, 64, "hflip")
    assert (large - small) / 4 == pytest.approx(memory.per_image, rel=0.01)
    assert large == pytest.approx(memory.state + 7 * memory.per_image, rel=0.01)
    # the study's member at 224 px: ~16.5 MiB an image voting (fp32), against 236 MiB training
    study = inference_memory(("resnext101_64x4d",), 100, 224, "none", False)
    assert 15 * MIB < study.per_image < 18 * MIB and study.state > 4 * 81_611_172
    assert inference_memory(("resnext101_64x4d",), 100, 224, "none", True).per_image < 0.55 * study.per_image


def test_a_vote_in_passes_gives_the_same_probabilities():
    from ensemble.engine import eval_models, vote_member_probabilities
    from ensemble.models import make_member_model

    torch.manual_seed(0)
    models = eval_models("resnet18", 10, [make_member_model("resnet18", 10, None, "none").state_dict()],
                         torch.device("cpu"))
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    whole = vote_member_probabilities(models, images, tta="hflip")
    passes = vote_member_probabilities(models, images, tta="hflip", max_batch=2)
    assert passes.shape == whole.shape == (1, 5, 10)
    torch.testing.assert_close(passes, whole, rtol=1e-5, atol=1e-6)


def _fake_gpu(monkeypatch, total: float) -> torch.device:
    """A CUDA device of ``total`` bytes, as gpu_memory sees it (no GPU here: only its size is asked)."""
    monkeypatch.setattr(gpu_memory, "gpu_total_bytes", lambda device: int(total))
    return torch.device("cuda")


def test_inference_runs_a_batch_that_does_not_fit_in_passes_that_do(monkeypatch):
    archs = ("resnext101_64x4d",) * 9
    memory = inference_memory(archs, 100, 224, "none", True)
    gpu = _fake_gpu(monkeypatch, 2 * memory.need(100))  # a half share holds 100 images
    lines = []

    def limit(batch, share):
        return inference_batch(gpu, archs, 100, 224, "none", True, who="a voter", batch=batch,
                               batch_flag="--infer-batch-size", share=share, share_flag="--gpus-per-infer-actor",
                               log=lines.append)

    assert limit(64, 0.5) == 64 and limit(100, 0.5) == 100 and not lines
    assert limit(4096, 0.5) == 100
    assert lines == [f"a voter: --infer-batch-size 4096 needs about {memory.need(4096) / GIB:.1f} GiB of GPU memory, "
                     f"more than its share, {memory.need(100) / GIB:.1f} GiB (0.5 of a "
                     f"{2 * memory.need(100) / GIB:.1f} GiB GPU); it runs each batch in passes of 100 images "
                     f"(the same results)"]
    assert inference_batch(torch.device("cpu"), archs, 100, 224, "none", True, who="a voter", batch=4096,
                           batch_flag="--infer-batch-size", share=0.5, share_flag="") is None  # no limit on CPU
    # nine members' weights on a quarter of a GPU that holds them whole: the share is the fix
    gpu = _fake_gpu(monkeypatch, memory.need(1) * 1.5)
    with pytest.raises(GpuMemoryError, match=r"^a voter: the members' weights need about .* with one image, more "
                                             r"than its share, .*; use --gpus-per-infer-actor 1, or fewer members"):
        limit(64, 0.25)


def test_each_inference_path_asks_for_its_share_before_it_loads_weights(monkeypatch):
    """The voter (Ray Data's callable class) and a Tune trial on a GPU too small: one line naming
    their own flags, before a weight is fetched or moved (no Ray: nothing is fetched)."""
    import ray

    from ensemble import actors
    from ensemble.config import EnsembleConfig
    from ensemble.tune import check_trial_memory

    gpu = _fake_gpu(monkeypatch, 1.2 * GIB)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(actors, "pick_device", lambda ids: gpu)
    monkeypatch.setattr(ray, "get", lambda refs: pytest.fail("fetched the weights before the check"))
    with pytest.raises(GpuMemoryError, match=r"^a voter: the members' weights .* \(0\.5 of a 1\.2 GiB GPU\)"):
        actors.SoftVoter(arch="resnext101_64x4d", num_classes=100, weight_refs=[None] * 9, image_size=224,
                         threads=1, precision="fp32", batch=64, gpus=0.5)
    cfg = EnsembleConfig(arch="resnet18", batch_size=64, image_size=224, precision="fp32", freeze="layer1")
    _fake_gpu(monkeypatch, 3 * GIB)
    with pytest.raises(GpuMemoryError, match=r"^trial t1 \(--freeze layer1\): resnet18 at --batch-size 64, .* "
                                             r"\(0\.5 of a 3\.0 GiB GPU\); use --batch-size \d+ or less, or "
                                             r"--gpus-per-trial 1$"):
        check_trial_memory(cfg, 100, gpu, gpus=0.5, trial="t1")
    check_trial_memory(cfg, 100, torch.device("cpu"), gpus=0.5, trial="t1")  # on CPU: nothing to check


class _OutOfMemory(torch.nn.Module):
    """A member whose forward pass runs out of memory, as a CUDA allocation would."""

    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                     "capacity of 22.49 GiB of which 1.25 GiB is free.")


def test_running_out_of_gpu_memory_stops_the_member_in_one_line(capsys):
    """The epoch loop (epochs.fit) of a member whose step raises torch's OutOfMemoryError, inside
    the trainer's context: one line naming the member, its batch, its share, the GPU and the fix,
    exit code 2; any other error passes through as it is."""
    from ensemble.epochs import Trainee, fit

    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError  # what CUDA raises is what is caught
    trainee = Trainee(_OutOfMemory(), torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]),
                      torch.device("cpu"), None)
    batches = [(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))]

    def member():
        with out_of_memory_line(ROUND, member=1, batch=64, precision="bf16", gpu_total=24 * GIB,
                                gpus_per_member=0.5, output="runs/exp1"):
            fit(trainee, epochs=2, train=lambda epoch: batches, val=lambda: [])

    assert run_cli(member) == 2
    assert capsys.readouterr().err == (
        "error: member 1 ran out of GPU memory at --batch-size 64 (bf16) in its share, 12.0 GiB (0.5 of a 24.0 GiB "
        "GPU, estimated 15.9 GiB); rerun the same command with --gpus-per-member 1 to resume (finished members and "
        "committed epochs are kept in runs/exp1), or with --batch-size 32 and --fresh\n")
    with pytest.raises(GpuMemoryError, match=r"\(1 of a 24\.0 GiB GPU\); rerun with --batch-size 32 and --fresh$"):
        with out_of_memory_line(None, member=1, batch=64, precision="bf16", gpu_total=24 * GIB, gpus_per_member=1.0,
                                output="runs/exp1"):
            raise torch.OutOfMemoryError("CUDA out of memory.")
    with pytest.raises(ValueError, match="boom"):
        with out_of_memory_line(None, member=1, batch=1, precision="fp32", gpu_total=GIB, gpus_per_member=1.0,
                                output="runs/exp1"):
            raise ValueError("boom")


def test_the_driver_prints_a_member_s_line_as_raised(monkeypatch, capsys):
    """Raised in a trainer actor, the error crosses ``ray.get`` as its own class (RayTaskError
    wrapping it): train_stage._gather raises it as it is, not as a member that failed, and it is
    not retried (an application error). No cluster: ray.get stands in."""
    import ray

    from ensemble.train_stage import _gather

    line = "member 1 ran out of GPU memory at --batch-size 64 (bf16) in its share, ..."

    def get(ref):
        error = ray.exceptions.RayTaskError("MemberTrainer.fit", "Traceback ...", GpuMemoryError(line))
        raise error.as_instanceof_cause()

    monkeypatch.setattr(ray, "get", get)
    assert issubclass(GpuMemoryError, UserError)
    assert run_cli(lambda: _gather(object(), 1, "runs/exp1")) == 2
    assert capsys.readouterr().err == f"error: {line}\n"


@pytest.mark.gpu
def test_on_a_gpu_torch_holds_no_more_than_the_estimate_and_not_much_less():
    """A resnet18 member's steps on this GPU: the allocator's peak (max_memory_reserved, cuDNN's
    workspace included) within the estimate less half a GiB for the CUDA context; what is
    allocated at least 80% of the estimate's core (state and activations)."""
    from ensemble.engine import make_optimizer, prepare_for_device, resolve_precision, train_one_epoch
    from ensemble.models import make_member_model

    device = torch.device("cuda")
    amp = resolve_precision("auto", device)
    memory = member_memory("resnet18", 100, 224, "layer1", False, amp is torch.bfloat16)
    model = prepare_for_device(make_member_model("resnet18", 100, None, "layer1"), device)
    optimizer = make_optimizer(model, 1e-3)
    batch = [(torch.randn(64, 3, 224, 224), torch.randint(0, 100, (64,)))] * 3
    torch.cuda.reset_peak_memory_stats()
    train_one_epoch(model, batch, optimizer, device, amp)
    core = memory.state + memory.per_step + 64 * memory.per_image
    assert torch.cuda.max_memory_reserved() <= memory.need(64) - CUDA_OVERHEAD // 2  # half for the context
    assert torch.cuda.max_memory_allocated() >= 0.8 * core
