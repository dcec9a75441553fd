"""The training loop: masking, loss, learning, determinism and resume, divergence."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moebench.data import IGNORE_INDEX, Row, collate, epoch_batches, tokenize_row
from moebench.errors import TrainingDiverged
from moebench.inject import inject
from moebench.method import get_method
from moebench.models import load_model
from moebench.prompts import build_prompt
from moebench.train import TrainConfig, TrainHooks, lr_at, token_loss_sum, train


def _rows(n: int) -> list[Row]:
    # A learnable toy task: the answer is a fixed function of the question.
    words = ["red", "blue", "green", "black", "white", "pink", "gold", "grey"]
    return [
        Row(
            f"What colour comes after {words[i % 8]}?",
            "",
            f"the answer is {words[(i + 1) % 8]}",
            None,
        )
        for i in range(n)
    ]


def _examples(tok, rows, **kw):  # type: ignore[no-untyped-def]
    opts = {"template": "alpaca", "cutoff_len": 256, "train_on_prompt": False, "task_label": -1}
    opts.update(kw)
    return [tokenize_row(r, tok, **opts) for r in rows]


def test_prompt_tokens_and_padding_are_masked() -> None:
    _, tok = load_model("tiny-llama")
    row = _rows(1)[0]
    ex = _examples(tok, [row])[0]
    prompt_len = len(tok(build_prompt("alpaca", row.instruction))["input_ids"])
    assert all(x == IGNORE_INDEX for x in ex.labels[:prompt_len])
    assert list(ex.labels[prompt_len:]) == list(ex.input_ids[prompt_len:])
    assert ex.input_ids[-1] == tok.eos_token_id  # the model learns to stop
    decoded = tok.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=True)
    assert decoded == row.output
    full = _examples(tok, [row], train_on_prompt=True)[0]
    assert list(full.labels) == list(full.input_ids)

    short = _examples(tok, [Row("Hi?", "", "ok", None)])[0]
    batch = collate([ex, short], pad_id=tok.pad_token_id)
    k = len(short.input_ids)
    assert batch["attention_mask"][1, k:].sum() == 0
    assert (batch["labels"][1, k:] == IGNORE_INDEX).all()


def test_loss_counts_only_response_tokens_and_ignores_padding() -> None:
    model, tok = load_model("tiny-llama")
    adapted = inject(model, get_method("lora"), get_method("lora").config_cls(dropout=0.0))
    model.eval()
    rows = _rows(3)
    exs = _examples(tok, rows)
    batch = collate(exs, pad_id=tok.pad_token_id)
    with torch.no_grad():
        total = token_loss_sum(adapted, batch)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        # independent computation: each row alone, full logits, positions picked by hand
        expected, count = 0.0, 0
        for e in exs:
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids).logits[0]
            for t in range(1, len(e.input_ids)):
                if e.labels[t] != IGNORE_INDEX:
                    expected += float(
                        F.cross_entropy(logits[t - 1 : t], torch.tensor([e.labels[t]]))
                    )
                    count += 1
    assert n == count
    assert abs(float(total) - expected) < 1e-3 * count


def test_length_grouped_batches_cover_every_row_once_and_are_seeded() -> None:
    lengths = [((i * 37) % 101) + 5 for i in range(203)]
    a = epoch_batches(lengths, 4, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(203))
    assert a == epoch_batches(lengths, 4, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 4, seed=1, epoch=1)

    def padding(batches):  # type: ignore[no-untyped-def]
        return sum(
            max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches
        )

    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(203, generator=g).tolist()
    shuffled = [perm[i : i + 4] for i in range(0, 203, 4)]
    assert padding(a) < 0.2 * padding(shuffled)


def test_lr_warms_up_then_decays_linearly_to_zero() -> None:
    cfg = TrainConfig(warmup_steps=4, lr_schedule="linear")
    lrs = [lr_at(cfg, 1.0, s, 20) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(1.0 / 16)
    assert all(x > y for x, y in itertools.pairwise(lrs[4:]))


def _train(
    tmp: Path,
    steps: int,
    *,
    resume: Path | None = None,
    hooks: TrainHooks | None = None,
    init_seed: int = 7,
    **cfg,
):  # type: ignore[no-untyped-def]
    model, tok = load_model("tiny-llama")
    torch.manual_seed(init_seed)
    adapted = inject(model, get_method("lora"), get_method("lora").config_cls(rank=4, dropout=0.1))
    exs = _examples(tok, _rows(40))
    opts = {
        "max_steps": steps,
        "batch_size": 8,
        "micro_batch_size": 4,
        "warmup_steps": 2,
        "checkpoint_every": 3,
        "lr": 1e-3,
        **cfg,
    }
    tc = TrainConfig(**opts)
    result = train(adapted, exs, tc, seed=7, checkpoint_root=tmp, resume_from=resume, hooks=hooks)
    return adapted, result


def test_loss_falls_on_a_learnable_task(tmp_path: Path) -> None:
    losses: list[float] = []
    _train(tmp_path, 40, hooks=TrainHooks(on_step=lambda s: losses.append(s.loss)), lr=3e-3)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_interrupted_and_resumed_run_ends_bitwise_equal(tmp_path: Path) -> None:
    full, _ = _train(tmp_path / "a", 8)

    def stop_at_5(s):  # type: ignore[no-untyped-def]
        if s.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", 8, hooks=TrainHooks(on_step=stop_at_5))
    last = sorted((tmp_path / "b").glob("step-*"))[-1]
    assert last.name == "step-0000003"  # steps 4-5 are lost and redone, as after a real crash
    # A different init seed: only the checkpoint can make the result match.
    steps: list[int] = []
    resumed, result = _train(
        tmp_path / "b",
        8,
        resume=last,
        init_seed=99,
        hooks=TrainHooks(on_step=lambda s: steps.append(s.step)),
    )
    assert steps == [4, 5, 6, 7, 8] and result.steps == 8 and result.steps_run == 5
    a, b = full.adapter_state_dict(), resumed.adapter_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_non_finite_loss_stops_with_step_and_batch(tmp_path: Path) -> None:
    model, tok = load_model("tiny-llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    adapted = inject(model, get_method("lora"), get_method("lora").config_cls())
    tc = TrainConfig(max_steps=3, batch_size=4, micro_batch_size=4)
    with pytest.raises(TrainingDiverged, match=r"at step 1 \(epoch 0, micro-batches 0-0, rows"):
        train(adapted, _examples(tok, _rows(8)), tc, seed=0, checkpoint_root=tmp_path)


def test_only_trainable_params_get_weight_decay(tmp_path: Path) -> None:
    from moebench.train import build_optimizer

    model, _ = load_model("tiny-llama")
    adapted = inject(model, get_method("lora"), get_method("lora").config_cls())
    opt = build_optimizer(adapted, dataclasses.replace(TrainConfig(), weight_decay=0.1))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for _, p in adapted.adapter_parameters()}
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == in_opt  # LoRA's A and B are matrices: all decay
    assert all(not p.requires_grad for n, p in model.named_parameters() if id(p) not in in_opt)


def test_accumulated_micro_batches_give_the_same_update_as_one_big_batch(tmp_path: Path) -> None:
    results = []
    for micro in (2, 8):
        model, tok = load_model("tiny-llama")
        torch.manual_seed(3)
        adapted = inject(model, get_method("lora"), get_method("lora").config_cls(dropout=0.0))
        tc = TrainConfig(
            max_steps=2,
            batch_size=8,
            micro_batch_size=micro,
            warmup_steps=0,
            checkpoint_every=None,
            group_by_length=False,
        )
        train(adapted, _examples(tok, _rows(16)), tc, seed=3, checkpoint_root=tmp_path / str(micro))
        results.append(adapted.adapter_state_dict())
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=1e-6), k


def test_max_steps_runs_past_the_configured_epochs() -> None:
    from moebench.train import plan_steps

    assert plan_steps(100, TrainConfig(epochs=1.0, batch_size=16, micro_batch_size=4)) == (25, 25)
    assert plan_steps(
        100, TrainConfig(epochs=1.0, max_steps=60, batch_size=16, micro_batch_size=4)
    ) == (25, 60)


def test_step_batches_resume_from_any_position_and_roll_into_new_epochs() -> None:
    from moebench.data import step_batches

    lengths = [((i * 13) % 29) + 3 for i in range(22)]  # 6 micro-batches of 4: 2 full steps
    stream = list(zip(range(9), step_batches(lengths, 4, 4, seed=5), strict=False))
    plans = [p for _, p in stream]
    assert [p.epoch for p in plans[:4]] == [0, 0, 1, 1]
    assert [len(p.micro_batches) for p in plans[:2]] == [4, 2]  # a step never spans epochs
    assert sorted(i for p in plans[:2] for ids in p.micro_batches for i in ids) == list(range(22))
    for k in range(1, 8):
        resumed = step_batches(lengths, 4, 4, seed=5, position=plans[k - 1].next_position)
        assert next(resumed) == plans[k]
    ungrouped = list(
        zip(range(2), step_batches(lengths, 4, 4, seed=5, grouped=False), strict=False)
    )
    assert sorted(i for _, p in ungrouped for ids in p.micro_batches for i in ids) == list(
        range(22)
    )
