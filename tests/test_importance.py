"""Parameter importance (seed paper section 2.2): the gradient pass against independent autograd,
per-rank sums against hand-written sums, and the first-order score against exact zeroing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moebench.data import IGNORE_INDEX, Example, collate
from moebench.importance import GRAD_SQUARED_NORM, TAYLOR, gradient_pass
from moebench.importance_figures import figure2, figures, sorted_shares, task_correlation
from moebench.importance_run import length_batches, task_importance
from moebench.importance_stats import (
    layout_record,
    per_rank,
    rank_groups,
    summarize,
    variance_along,
)
from moebench.inject import Adapted, inject
from moebench.method import AdapterLayer, LinearMethod, LinearShape, RankLayout
from moebench.models import load_model
from moebench.sensitivity import decoder_weights, measure
from tests.conftest import METHOD_NAMES, adapt, synthetic_examples


def _randomised(method: str) -> tuple[Adapted, Any]:
    """A tiny model adapted by `method` with every adapter weight random (B is zero at init,
    where every importance is zero: a vacuous comparison)."""
    model, tok = load_model("tiny-llama")
    adapted = adapt(model, method)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in adapted.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return adapted, tok


def _batches(tok: Any, n: int = 6) -> list[dict[str, torch.Tensor]]:
    examples, _ = synthetic_examples(len(tok), n=n, length=12)
    # prompt half unsupervised, as an eval item's prompt is
    examples = [
        Example(e.input_ids, (IGNORE_INDEX,) * 5 + e.labels[5:], e.task_label) for e in examples
    ]
    return length_batches(examples, 4, tok.pad_token_id)


def _independent(adapted: Adapted, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """|dL/dtheta * theta| with L the token mean over all batches, written out from logits."""
    params = dict(adapted.adapter_parameters())
    for p in params.values():
        p.requires_grad_(True)  # a rebuilt run's model comes frozen
    model = adapted.model
    model.eval()
    total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    loss = torch.zeros(())
    for b in batches:
        adapted.context.attention_mask = b["attention_mask"]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = loss + F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            b["labels"][:, 1:].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    adapted.context.attention_mask = None
    grads = torch.autograd.grad(loss / total, list(params.values()), allow_unused=True)
    return {
        n: (torch.zeros_like(p) if g is None else (g * p).abs().detach())
        for (n, p), g in zip(params.items(), grads, strict=True)
    }


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_importance_equals_grad_times_theta_from_autograd(method: str) -> None:
    adapted, tok = _randomised(method)
    batches = _batches(tok)
    scores, loss = task_importance(adapted, batches, torch.device("cpu"), None)
    want = _independent(adapted, batches)
    assert set(scores) == set(want) and scores
    assert sum(float(w.sum()) for w in want.values()) > 0, "every importance is zero"
    for name, w in want.items():
        torch.testing.assert_close(scores[name], w, rtol=1e-4, atol=1e-9, msg=name)
    assert all(not p.requires_grad or p.grad is None for p in adapted.model.parameters())
    assert loss > 0


def _manual_rank_sums(tensors: dict[str, torch.Tensor], layouts: dict[str, RankLayout]) -> list:
    """Rank sums by explicit loops over experts and ranks, index by index."""
    total: list[float] | None = None
    for name, t in tensors.items():
        lay = layouts[name]
        experts = 1 if lay.expert_dim is None else t.shape[lay.expert_dim]
        ranks = t.shape[lay.rank_dim]
        sums = []
        for e in range(experts):
            for j in range(ranks):
                index: list[Any] = [slice(None)] * t.dim()
                index[lay.rank_dim] = j
                if lay.expert_dim is not None:
                    index[lay.expert_dim] = e
                sums.append(float(t[tuple(index)].sum()))
        total = sums if total is None else [a + b for a, b in zip(total, sums, strict=True)]
    return total or []


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_per_rank_importance_equals_manual_sums(method: str) -> None:
    adapted, tok = _randomised(method)
    scores, _ = task_importance(adapted, _batches(tok, 4), torch.device("cpu"), None)
    summary = summarize(adapted, scores)
    record = layout_record(adapted)
    assert set(record["tensors"]) == set(scores)  # every tensor is reported, mapped or not
    assert summary["tensors"] == pytest.approx({n: float(t.sum()) for n, t in scores.items()})
    for g in rank_groups(adapted):
        layouts = dict(g.tensors)
        manual = _manual_rank_sums({n: scores[n] for n in layouts}, layouts)
        assert summary["ranks"][g.key] == pytest.approx(manual, rel=1e-5), g.key
        assert record["rank_sets"][g.key]["module_type"] == g.module_type


def test_lora_rank_j_is_row_j_of_a_plus_column_j_of_b() -> None:
    adapted, _ = _randomised("lora")
    name, layer = next(iter(adapted.layers.items()))
    scores = {f"{name}.lora_A": layer.lora_A.detach(), f"{name}.lora_B": layer.lora_B.detach()}
    (group,) = [g for g in rank_groups(adapted) if g.key == name]
    want = layer.lora_A.detach().sum(1) + layer.lora_B.detach().sum(0)
    torch.testing.assert_close(per_rank(group, scores), want)


def test_mixlora_ranks_are_each_experts_own() -> None:
    adapted, _ = _randomised("mixlora")
    name, ffn = next((n, la) for n, la in adapted.layers.items() if n.endswith("mlp"))
    (group,) = [g for g in rank_groups(adapted) if g.key == f"{name}:up"]
    scores = {f"{name}.up_A": ffn.up_A.detach(), f"{name}.up_B": ffn.up_B.detach()}
    got = per_rank(group, scores).view(ffn.num_experts, ffn.rank)
    for e in range(ffn.num_experts):
        for j in range(ffn.rank):
            want = ffn.up_A[e, j, :].sum() + ffn.up_B[e, :, j].sum()
            assert float(got[e, j]) == pytest.approx(float(want), rel=1e-5)
    assert group.module_type == "mlp.up"


def test_variance_along_rank_and_input_dimensions() -> None:
    t = torch.tensor([[1.0, 2.0, 3.0], [5.0, 7.0, 9.0]])  # [r=2, d_in=3]
    rank_var, dim_var = variance_along(t, RankLayout(0))
    assert rank_var == pytest.approx(((4**2 + 5**2 + 6**2) / 2) / 3)  # var of each column pair
    assert dim_var == pytest.approx((1.0 + 4.0) / 2)  # var of [1,2,3] is 1, of [5,7,9] is 4
    assert variance_along(t.t(), RankLayout(1)) == (rank_var, dim_var)  # B's layout [d_out, r]


# --- a plugin without the hook -----------------------------------------------------------------


class _ScaleLinear(AdapterLayer):
    """A per-output scale adapter with no rank structure and no `rank_layout`."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(torch.zeros(base.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out * (1 + self.scale.to(out.dtype))


class _Scale(LinearMethod):
    name = "test-scale"
    help = "test"
    config_cls = SimpleNamespace

    def make_layer(self, module: nn.Linear, config: Any, context: Any) -> AdapterLayer:
        return _ScaleLinear(module)

    def linear_parameters(self, config: Any, shape: LinearShape) -> int:
        return shape.d_out


def test_a_layer_without_the_hook_still_gets_per_tensor_importance() -> None:
    model, tok = load_model("tiny-llama")
    adapted = inject(model, _Scale(), SimpleNamespace(target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        for _, p in adapted.adapter_parameters():
            p.normal_(0, 0.3)
    batches = _batches(tok, 4)
    scores, _ = task_importance(adapted, batches, torch.device("cpu"), None)
    want = _independent(adapted, batches)
    summary = summarize(adapted, scores)
    assert summary["ranks"] == {} and summary["variance"] == {}
    assert summary["tensors"] == pytest.approx({n: float(w.sum()) for n, w in want.items()})
    assert all(t["rank_set"] is None for t in layout_record(adapted)["tensors"].values())


# --- eq. 1 against eq. 3 on a toy where the first-order term is exact -------------------------


class _BilinearToy(nn.Module):
    """x >= 0 through a LoRA layer, loss = mean of w . h with w > 0: the loss is linear in every
    single parameter, so zeroing one changes it by exactly grad * theta (eq. 1 = eq. 3), and with
    A, B >= 0 every element of a rank pulls the same way, so rank scores order as zeroing does."""

    def __init__(self, layer: nn.Module, w: torch.Tensor, x: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.w, self.x = layer, w, x

    def loss(self) -> torch.Tensor:
        return (self.layer(self.x) @ self.w).mean()

    def forward(self, **batch: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=self.loss())


def test_first_order_score_orders_ranks_as_exact_zeroing_does() -> None:
    from moebench.methods.lora import LoRALinear

    g = torch.Generator().manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=5, alpha=5.0, dropout=0.0)
    for p in base.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        strength = torch.tensor([0.3, 2.0, 0.1, 1.0, 0.6])  # ranks of clearly unequal weight
        layer.lora_A.copy_(torch.rand(5, 6, generator=g) * strength[:, None])
        layer.lora_B.copy_(torch.rand(5, 5, generator=g))
    toy = _BilinearToy(layer, torch.rand(5, generator=g) + 0.1, torch.rand(7, 6, generator=g))
    batch = {"input_ids": torch.zeros(1, 2), "attention_mask": torch.ones(1, 2)}
    batch["labels"] = torch.zeros(1, 2, dtype=torch.long)
    params = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}
    scores, _ = gradient_pass(toy, [batch], params, TAYLOR, device="cpu")

    with torch.no_grad():
        full = float(toy.loss())
        a, b = layer.lora_A.clone(), layer.lora_B.clone()
        element_changes = []
        for i, j in [(0, 0), (1, 3), (4, 5)]:
            layer.lora_A[i, j] = 0
            element_changes.append((abs(full - float(toy.loss())), float(scores["lora_A"][i, j])))
            layer.lora_A.copy_(a)
        rank_changes = []
        for j in range(5):
            layer.lora_A[j] = 0
            layer.lora_B[:, j] = 0
            rank_changes.append(abs(full - float(toy.loss())))
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    for exact, first_order in element_changes:
        assert first_order == pytest.approx(exact, rel=1e-4)  # eq. 1 = eq. 3 here
    rank_scores = (scores["lora_A"].sum(1) + scores["lora_B"].sum(0)).tolist()
    assert sorted(range(5), key=rank_scores.__getitem__) == sorted(
        range(5), key=rank_changes.__getitem__
    )
    # bilinear in (A_j, B_j): each factor's Taylor term is the rank's whole contribution
    assert rank_scores == pytest.approx([2 * c for c in rank_changes], rel=1e-4)


# --- the same pass measures LoRA-SMoE's sensitivity ---------------------------------------------


def test_the_clean_sensitivity_protocol_is_this_pass() -> None:
    """LoRA-SMoE's clean protocol runs `gradient_pass` (its independent autograd check is in
    tests/test_lora_smoe.py): the same scores, to the bit, as the pass called directly."""
    model, tok = load_model("tiny-llama")
    examples, _ = synthetic_examples(len(tok), n=3)
    want = measure(
        model, examples, samples=3, seed=0, pad_token_id=0, device="cpu", protocol="clean"
    )
    weights = decoder_weights(model)
    batches = [collate([e], 0) for e in examples]
    got, _ = gradient_pass(model, batches, weights, GRAD_SQUARED_NORM, device="cpu")
    assert set(got) == set(want)
    for name, value in want.items():
        assert float(got[name]) == value, name


# --- the figures' numbers ----------------------------------------------------------------------


def _record(ranks_by_task: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    keys = next(iter(ranks_by_task.values()))
    return {
        "layout": {
            "rank_sets": {k: {"module_type": "q_proj", "ranks_per_expert": None} for k in keys},
            "tensors": {},
        },
        "tasks": {t: {"ranks": r, "variance": {}} for t, r in ranks_by_task.items()},
    }


def test_task_correlation_and_sorted_shares_by_hand() -> None:
    record = _record(
        {
            "a": {"l0": [1.0, 3.0], "l1": [2.0, 2.0]},  # shares .25 .75 | .5 .5
            "b": {"l0": [3.0, 1.0], "l1": [2.0, 2.0]},  # shares .75 .25 | .5 .5
        }
    )
    corr = task_correlation(record)
    assert corr["labels"] == ["a", "b"]
    assert corr["matrix"][0][1] == pytest.approx(-1.0)  # mirrored shares, equal elsewhere
    shares = sorted_shares(record)
    assert shares["a"] == pytest.approx([0.625, 0.375]) and shares["b"] == shares["a"]


def test_figure2_pools_tasks_and_roles() -> None:
    record = {
        "layout": {
            "rank_sets": {},
            "tensors": {
                "m.q.lora_A": {"module_type": "q_proj", "role": "lora_A"},
                "m.q.lora_B": {"module_type": "q_proj", "role": "lora_B"},
            },
        },
        "tasks": {
            "a": {"variance": {"m.q.lora_A": [4.0, 1.0], "m.q.lora_B": [2.0, 1.0]}},
            "b": {"variance": {"m.q.lora_A": [6.0, 3.0], "m.q.lora_B": [None, 1.0]}},
        },
    }
    rows = {(r["task"], r["tensor"]): r for r in figure2(record)}
    assert rows[("all", "lora_A")]["rank_avg"] == pytest.approx(5.0)
    assert rows[("all", "all")]["rank_avg"] == pytest.approx(4.0)  # None left out
    assert rows[("all", "all")]["d_or_k_avg"] == pytest.approx(1.5)
    assert rows[("a", "all")]["ratio"] == pytest.approx(3.0)


def test_comparison_plots_draw_every_run(tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    from moebench.importance_plots import write_figures

    records = {}
    for method in ("lora", "loracoe"):
        adapted, tok = _randomised(method)
        record: dict[str, Any] = {"layout": layout_record(adapted), "tasks": {}}
        for task, n in (("boolq", 4), ("gsm8k", 6)):
            scores, _ = task_importance(adapted, _batches(tok, n), torch.device("cpu"), None)
            record["tasks"][task] = summarize(adapted, scores)
        record["figures"] = figures(record)
        records[f"run {method}"] = record
    written = write_figures(records, tmp_path)
    assert {p.name for p in written} >= {"figure2.html", "figure3-ranks-run_loracoe.html"}
    html = (tmp_path / "figure4.html").read_text()
    assert "run lora: gsm8k" in html and "run loracoe: boolq" in html
    fig2 = records["run loracoe"]["figures"]["figure2"]
    assert {r["module_type"] for r in fig2} >= {"q_proj", "down_proj"}
