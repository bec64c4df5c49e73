"""CRD: the NCE loss against the paper's formula, the memory banks, the negative sampler,
checkpoint round trips (plain and through a real Lightning resume) and heterogeneous pairs."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill_zoo import train
from distill_zoo.config import CONF_DIR, compose
from distill_zoo.distillers.base import DistillContext, StepOutputs
from distill_zoo.distillers.crd import CRD
from distill_zoo.distillers.crd_memory import NegativeSampler
from distill_zoo.distillers.taps import FeatureTap
from distill_zoo.losses import (
    crd_logits,
    crd_loss,
    crd_nce_loss,
    crd_normaliser,
)
from distill_zoo.models import create_model

# ---------------------------------------------------------------- golden values of the loss

# Two anchors in 3-d, a 6-row memory bank, K = 2 negatives per anchor (N = 6).
ANCHORS_S = [[0.6, 0.8, 0.0], [0.0, 0.6, -0.8]]
ANCHORS_T = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
MEMORY_S = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0, 0.8], [0, -1, 0], [0.8, 0.6, 0]]
MEMORY_T = [[0, 1, 0], [0.6, 0.8, 0], [-1, 0, 0], [0, 0.8, 0.6], [0, 0, -1], [1, 0, 0]]
INDICES = [[0, 3, 4], [1, 2, 5]]  # column 0: the anchor's own sample


def paper_side(anchors, memory, indices, temperature, n, z=None):
    """-(1/B) sum_b [log h(pos) + sum_j log(1 - h(neg_j))], h = P / (P + K/N),
    P = exp(<m, v> / T) / Z (Tian et al. 2020, Eq. 10/18), with plain Python floats."""
    k = len(indices[0]) - 1
    exps = [
        [
            math.exp(sum(a * b for a, b in zip(memory[j], anchor, strict=True)) / temperature)
            for j in row
        ]
        for anchor, row in zip(anchors, indices, strict=True)
    ]
    if z is None:  # the reference's estimate: mean of exp over the batch, times N
        z = sum(sum(row) for row in exps) / (len(exps) * (k + 1)) * n
    total = 0.0
    for row in exps:
        for j, e in enumerate(row):
            p = e / z
            h = p / (p + k / n)
            total += math.log(h) if j == 0 else math.log(1 - h)
    return -total / len(anchors), z


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def test_nce_loss_by_hand():
    # logits 0 and Z = 1: P = 1, K/N = 2/4, h = 1/1.5 = 2/3 for every pair;
    # per anchor -(log 2/3 + 2 log 1/3) = 3 log 3 - log 2, and the batch mean is the same.
    loss = crd_nce_loss(torch.zeros(3, 3), 1.0, num_train_samples=4)
    assert loss.item() == pytest.approx(3 * math.log(3) - math.log(2), rel=1e-6)


def test_logits_and_normaliser_follow_their_definition():
    logits = crd_logits(t(ANCHORS_S), t(MEMORY_T), torch.tensor(INDICES), 0.5)
    expected = [
        [sum(a * b for a, b in zip(MEMORY_T[j], ANCHORS_S[i], strict=True)) / 0.5 for j in row]
        for i, row in enumerate(INDICES)
    ]
    torch.testing.assert_close(logits, t(expected))
    # Row 0: <m0, v0> = 0.8, <m3, v0> = 0.64, <m4, v0> = 0 (worked by hand).
    torch.testing.assert_close(logits[0], t([1.6, 1.28, 0.0]))
    z = crd_normaliser(logits, num_train_samples=6)
    exps = [math.exp(v) for row in expected for v in row]
    assert z.item() == pytest.approx(sum(exps) / len(exps) * 6)


@pytest.mark.parametrize("normalisers", [(None, None), (2.5, 7.0)])
def test_crd_loss_matches_the_paper_formula(normalisers):
    z_s, z_t = normalisers
    temperature, n = 0.5, 6
    # Student anchor against the teacher bank, teacher anchor against the student bank.
    s_side, z_s_used = paper_side(ANCHORS_S, MEMORY_T, INDICES, temperature, n, z_s)
    t_side, _ = paper_side(ANCHORS_T, MEMORY_S, INDICES, temperature, n, z_t)
    loss = crd_loss(
        t(ANCHORS_S),
        t(ANCHORS_T),
        t(MEMORY_S),
        t(MEMORY_T),
        torch.tensor(INDICES),
        temperature,
        n,
        z_s,
        z_t,
    )
    assert loss.item() == pytest.approx(s_side + t_side, rel=1e-5)
    logits = crd_logits(t(ANCHORS_S), t(MEMORY_T), torch.tensor(INDICES), temperature)
    side = crd_nce_loss(logits, z_s_used, n)
    assert side.item() == pytest.approx(s_side, rel=1e-5)


def test_crd_loss_gradient_reaches_the_anchors():
    v_s, v_t = t(ANCHORS_S).requires_grad_(), t(ANCHORS_T).requires_grad_()
    memory = t(MEMORY_S)
    crd_loss(v_s, v_t, memory, t(MEMORY_T), torch.tensor(INDICES), 0.5, 6).backward()
    assert v_s.grad.abs().sum() > 0 and v_t.grad.abs().sum() > 0


def test_crd_loss_is_fp32_under_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = crd_logits(t(ANCHORS_S), t(MEMORY_T), torch.tensor(INDICES), 0.07)
    assert logits.dtype == torch.float32
    exact = crd_logits(t(ANCHORS_S), t(MEMORY_T), torch.tensor(INDICES), 0.07)
    assert torch.equal(logits, exact)


# ---------------------------------------------------------------- the distiller

STAGES = ["layer1", "layer2", "layer3"]
N_TRAIN = 12
TARGETS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])


def make_crd(seed: int = 0, **kwargs) -> CRD:
    """resnet8 (64-d) -> resnet8x4 teacher (256-d), 12 training samples of 3 classes."""
    torch.manual_seed(seed)
    context = DistillContext(
        student_stages=STAGES,
        teacher_stages=STAGES,
        example_input=torch.zeros(2, 3, 16, 16),
        num_classes=3,
        num_train_samples=kwargs.pop("num_train_samples", N_TRAIN),
        train_targets=kwargs.pop("train_targets", TARGETS),
    )
    kwargs.setdefault("num_negatives", 5)
    return CRD(create_model("resnet8", 3), create_model("resnet8x4", 3), context=context, **kwargs)


def step(indices, seed: int = 1) -> StepOutputs:
    """Fabricated stage outputs of the right widths (the distiller only reads them)."""
    g = torch.Generator().manual_seed(seed)
    b = len(indices)
    return StepOutputs(
        images=torch.zeros(b, 3, 16, 16),
        targets=TARGETS[indices],
        indices=torch.as_tensor(indices),
        student_logits=torch.randn(b, 3, generator=g, requires_grad=True),
        teacher_logits=torch.randn(b, 3, generator=g),
        student_features={"avgpool": torch.randn(b, 64, 1, 1, generator=g, requires_grad=True)},
        teacher_features={"avgpool": torch.randn(b, 256, 1, 1, generator=g)},
    )


def test_defaults_follow_the_paper_and_compose_with_kd():
    crd = make_crd()
    assert (crd.weight, crd.ce_weight, crd.kd_weight) == (0.8, 1.0, 0.0)
    assert (crd.temperature, crd.momentum, crd.sampler.sampling) == (0.07, 0.5, "exact")
    assert crd.memory_student.shape == crd.memory_teacher.shape == (N_TRAIN, 128)
    assert crd.memory_student.dtype == torch.float32
    assert crd.layers() == (["avgpool"], ["avgpool"])  # the heads' input, as in RepDistiller
    assert crd.embed_student.in_features == 64 and crd.embed_teacher.in_features == 256
    stdv = 1 / math.sqrt(128 / 3)
    assert crd.memory_teacher.abs().max() <= stdv
    cfg = compose(["distiller=crd_kd"]).distiller
    assert (cfg.kd_weight, cfg.weight, cfg.ce_weight, cfg.kd_temperature) == (1.0, 0.8, 1.0, 4.0)
    assert (cfg.num_negatives, cfg.temperature, cfg.momentum, cfg.embed_dim) == (
        16384,
        0.07,
        0.5,
        128,
    )
    # Banks and normalisers are checkpointed buffers, not parameters; the class tables are not.
    state = crd.state_dict()
    for key in ("memory_student", "memory_teacher", "z_student", "z_teacher", "z_ready"):
        assert key in state
    assert not any(key.startswith("sampler.") for key in state)
    assert {id(p) for p in crd.parameters()} == {
        id(p) for m in (crd.embed_student, crd.embed_teacher) for p in m.parameters()
    }


def test_forward_uses_the_pre_update_banks_then_updates_the_batch_rows():
    crd = make_crd()
    before_s, before_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    out = step([3, 7, 10])
    torch.manual_seed(5)
    terms = crd(out)
    assert set(terms) == {"ce", "crd"}
    torch.manual_seed(5)
    contrast = crd.sampler(out.indices)
    v_s, v_t = crd.embed(out)
    expected = crd_loss(v_s, v_t, before_s, before_t, contrast, 0.07, N_TRAIN)  # Z from batch
    torch.testing.assert_close(terms["crd"], 0.8 * expected)
    z_s = crd_normaliser(crd_logits(v_s, before_t, contrast, 0.07), N_TRAIN)
    assert bool(crd.z_ready) and crd.z_student.item() == pytest.approx(z_s.item(), rel=1e-6)
    terms["crd"].backward()
    assert crd.embed_student.weight.grad.abs().sum() > 0
    assert crd.embed_teacher.weight.grad.abs().sum() > 0
    # The normalisers stay fixed after the first batch.
    z_first = (crd.z_student.clone(), crd.z_teacher.clone())
    crd(step([0, 1], seed=2))
    assert torch.equal(crd.z_student, z_first[0]) and torch.equal(crd.z_teacher, z_first[1])


def test_memory_update_moves_only_the_batch_rows_by_hand():
    crd = make_crd(momentum=0.5)
    before_s, before_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    rows = [2, 9]
    v_s = F.normalize(torch.randn(2, 128), dim=1)
    v_t = F.normalize(torch.randn(2, 128), dim=1)
    crd.update_memory(torch.tensor(rows), v_s, v_t)
    for bank, before, v in (
        (crd.memory_student, before_s, v_s),
        (crd.memory_teacher, before_t, v_t),
    ):
        for i in range(N_TRAIN):
            if i not in rows:
                assert torch.equal(bank[i], before[i]), i  # bit-identical
        for b, i in enumerate(rows):
            mixed = [0.5 * before[i, d].item() + 0.5 * v[b, d].item() for d in range(128)]
            norm = math.sqrt(sum(x * x for x in mixed))
            torch.testing.assert_close(bank[i], t([x / norm for x in mixed]))
            assert bank[i].norm().item() == pytest.approx(1.0, abs=1e-6)


def test_state_survives_save_and_restore_bit_for_bit():
    a = make_crd(seed=0)
    for i, batch in enumerate(([0, 4, 8], [1, 5], [2, 6, 11])):
        a(step(batch, seed=i))  # sets Z and moves the banks
    b = make_crd(seed=1)  # different random init everywhere
    assert not torch.equal(a.memory_student, b.memory_student)
    b.load_state_dict(a.state_dict())
    out = step([3, 7, 9, 10], seed=9)
    torch.manual_seed(11)
    loss_a = a(out)["crd"]
    torch.manual_seed(11)
    loss_b = b(out)["crd"]
    assert torch.equal(loss_a, loss_b)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


# ---------------------------------------------------------------- negatives


@pytest.mark.parametrize(
    ("num_negatives", "replacement"),
    [(3, False), (8, False), (9, True), (200, False)],  # 8 = N - 4: distinct; 200: must repeat
)
def test_exact_negatives_are_of_other_classes_never_the_positive(num_negatives, replacement):
    sampler = NegativeSampler(N_TRAIN, num_negatives, "exact", TARGETS, replacement)
    torch.manual_seed(0)
    indices = torch.tensor([0, 5, 7, 11])
    contrast = sampler(indices)
    assert contrast.shape == (4, 1 + num_negatives)
    assert torch.equal(contrast[:, 0], indices)
    negatives = contrast[:, 1:]
    assert (negatives != indices[:, None]).all()
    assert (TARGETS[negatives] != TARGETS[indices][:, None]).all()
    assert negatives.min() >= 0 and negatives.max() < N_TRAIN
    if not replacement and num_negatives <= 8:  # 8 samples of other classes: distinct
        assert all(len(set(row.tolist())) == num_negatives for row in negatives)
    if num_negatives == 200:  # every allowed sample gets drawn
        for row, anchor in zip(negatives, indices, strict=True):
            allowed = {i for i in range(N_TRAIN) if TARGETS[i] != TARGETS[anchor]}
            assert set(row.tolist()) == allowed


def test_exact_negatives_with_imbalanced_classes_mix_both_draws():
    targets = torch.tensor([0] * 8 + [1] * 2)  # class 0 anchors have 2 others, class 1 have 8
    sampler = NegativeSampler(10, 4, "exact", targets)
    torch.manual_seed(0)
    contrast = sampler(torch.tensor([0, 3, 8, 9]))
    negatives = contrast[:, 1:]
    assert (targets[negatives] != targets[contrast[:, :1]]).all()
    assert len(set(negatives[2].tolist())) == len(set(negatives[3].tolist())) == 4


@pytest.mark.parametrize(("num_negatives", "replacement"), [(11, False), (4, True), (200, False)])
def test_uniform_negatives_are_any_other_sample(num_negatives, replacement):
    sampler = NegativeSampler(N_TRAIN, num_negatives, "uniform", None, replacement)
    torch.manual_seed(0)
    indices = torch.tensor([0, 6, 11])
    negatives = sampler(indices)[:, 1:]
    assert (negatives != indices[:, None]).all()
    if num_negatives == 11:  # all of them, once
        for row, anchor in zip(negatives, indices, strict=True):
            assert sorted(row.tolist()) == [i for i in range(N_TRAIN) if i != anchor]
    if num_negatives == 200:
        for row, anchor in zip(negatives, indices, strict=True):
            assert set(row.tolist()) == set(range(N_TRAIN)) - {int(anchor)}


def test_sampling_is_reproducible_under_a_seed():
    sampler = NegativeSampler(N_TRAIN, 6, "exact", TARGETS)
    torch.manual_seed(3)
    first = sampler(torch.tensor([1, 2]))
    torch.manual_seed(3)
    assert torch.equal(first, sampler(torch.tensor([1, 2])))


# ---------------------------------------------------------------- errors and zoo pairs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_targets": None}, "train_targets"),
        ({"train_targets": TARGETS[:5]}, r"one label per training sample"),
        ({"train_targets": TARGETS.float()}, "integer labels"),
        ({"train_targets": [0, 1] * 6}, "LongTensor"),
        ({"train_targets": torch.zeros(N_TRAIN, dtype=torch.long)}, "single class"),
        ({"sampling": "uniform", "num_train_samples": 1, "train_targets": None}, "at least 2"),
        ({"sampling": "relax"}, "sampling must be one of"),
        ({"num_train_samples": 0}, "num_train_samples"),
        ({"num_negatives": 0}, "num_negatives"),
        ({"student_layers": "layer9"}, "unknown layer"),
        ({"teacher_layers": [0, 1]}, "one teacher layer"),
    ],
)
def test_bad_settings_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_crd(**kwargs)


def test_uniform_sampling_needs_no_labels():
    crd = make_crd(sampling="uniform", train_targets=None)
    assert torch.isfinite(crd(step([0, 1, 2]))["crd"])


def stages(name: str) -> list[str]:
    """The zoo's stage layers of a model (teacher configs extend the student ones)."""
    return list(OmegaConf.load(CONF_DIR / "student" / f"{name}.yaml").feature_layers)


@pytest.mark.parametrize(
    ("teacher_name", "student_name"),
    [("resnet32x4", "shufflenetv2"), ("vgg13", "mobilenetv2")],
)
def test_heterogeneous_pair_trains(teacher_name, student_name):
    torch.manual_seed(0)
    teacher, student = create_model(teacher_name, 10), create_model(student_name, 10)
    context = DistillContext(
        student_stages=stages(student_name),
        teacher_stages=stages(teacher_name),
        example_input=torch.zeros(2, 3, 32, 32),
        num_classes=10,
        num_train_samples=40,
        train_targets=torch.arange(40) % 10,
    )
    crd = CRD(student, teacher, context=context, num_negatives=64, kd_weight=1.0)
    s_layers, t_layers = crd.layers()
    s_tap, t_tap = FeatureTap(student, s_layers), FeatureTap(teacher, t_layers)
    images, indices = torch.randn(2, 3, 32, 32), torch.tensor([13, 26])
    teacher.eval()
    with torch.no_grad():
        teacher_logits = teacher(images)
    student_logits = student(images)
    terms = crd(
        StepOutputs(
            images=images,
            targets=indices % 10,
            indices=indices,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            student_features=s_tap.pop(),
            teacher_features=t_tap.pop(),
        )
    )
    assert set(terms) == {"ce", "kd", "crd"}
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    for part in (crd.embed_student, crd.embed_teacher):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------- a real resume


def crd_state(checkpoint: str) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("distiller.")}


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_banks(tiny_config, tmp_path, interrupt):
    args = ("distiller=crd", "distiller.num_negatives=256", "epochs=3")
    full = train.run(tiny_config(*args), tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        train.run(tiny_config(*args), tmp_path / "cut", [interrupt(2)])
    resumed = train.run(tiny_config(*args, "resume=true"), tmp_path / "cut")
    assert resumed["epochs"] == full["epochs"] == 3
    a, b = crd_state(full["last_checkpoint"]), crd_state(resumed["last_checkpoint"])
    assert "distiller.memory_student" in a and bool(a["distiller.z_ready"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
