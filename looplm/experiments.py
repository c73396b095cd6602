# Generated from book/03_fixed_loops.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['CH03_SPLITS', 'CH03_MODELS', 'LOOPED_VS_STACKED']
# fmt: on

# --- book/03_fixed_loops.py, cell 103 ---
import torch

from looplm.data import TASK_VOCAB, encode_examples, make_splits
from looplm.diagnostics import hidden_norms, step_changes
from looplm.model import LoopLM, LoopLMConfig
from looplm.results import Experiment, register
from looplm.train import TrainConfig, Trainer, task_accuracy, task_batches

# --- book/03_fixed_loops.py, cell 104 ---
CH03_SPLITS = dict(task="stack", n_train=5000, n_test=500, max_difficulty=6, ood_max_difficulty=9, seed=0)
CH03_MODELS = {  # name -> the LoopLMConfig changes of a width-64, 4-head model
    "looped 1 block × 4": dict(n_core=1, n_loops=4),
    "same parameters: 1 layer": dict(n_core=1, n_loops=1),
    "same compute: 4 layers": dict(n_core=4, n_loops=1),
    "add, pre": dict(injection="add"),
    "add, sandwich": dict(injection="add", norm_style="sandwich"),
    "concat, pre": dict(injection="concat"),
}


def _ch03_trainer(seed, changes):
    """Chapter 3's run: a width-64 LoopLM on the stack split, TrainConfig() defaults, seeded."""
    splits = make_splits(**CH03_SPLITS)
    torch.manual_seed(seed)
    model = LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, 64, 4, **changes))
    config = TrainConfig(seed=seed, eval_every=0, progress=False)
    return Trainer(model, task_batches(splits, batch_size=config.batch_size), config), splits


def _ch03_run(seed, max_loops=8):
    out, prefix = {}, None
    for name, changes in CH03_MODELS.items():
        trainer, splits = _ch03_trainer(seed, changes)
        trainer.run()
        model, losses = trainer.model, [row["loss"] for row in trainer.history]
        record = {"parameters": sum(p.numel() for p in model.parameters()),
                  "depth": model.config.effective_depth(),
                  "final_loss": sum(losses[-50:]) / 50,
                  "losses": [round(sum(losses[i:i + 10]) / 10, 6) for i in range(0, len(losses), 10)]}
        for split in ("test", "ood"):
            record[f"{split}_acc"] = task_accuracy(model, getattr(splits, split))[-1].item()
        if model.config.n_loops > 1:   # the looped ones, run past their trained depth
            for split in ("test", "ood"):
                record[f"{split}_curve"] = task_accuracy(model, getattr(splits, split), n_loops=max_loops).tolist()
            with torch.no_grad():
                hidden = model(encode_examples(splits.test).idx, n_loops=max_loops, return_hidden=True).hidden
            record["rms"] = hidden_norms(hidden).mean(dim=(1, 2)).tolist()          # steps 1..8
            record["change"] = step_changes(hidden).mean(dim=(1, 2)).tolist()       # steps 2..8
        prefix = losses[:20] if prefix is None else prefix     # the first model's first steps
        out[name] = record
    return {"models": out, "prefix": prefix}


def _ch03_prefix(seed, n_steps):
    trainer, _ = _ch03_trainer(seed, CH03_MODELS["looped 1 block × 4"])
    trainer.run(until=n_steps)
    return [row["loss"] for row in trainer.history]


LOOPED_VS_STACKED = register(Experiment("looped-vs-stacked", "03", "chapter 3: looped vs stacked models, and injection and norm "
                    "placement, on the stack task", _ch03_run, _ch03_prefix))
