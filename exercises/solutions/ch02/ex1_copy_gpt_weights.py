"""Exercise 2.1: Copy a GPT into a looped model

Reference solution. See exercises/ch02/ex1_copy_gpt_weights.py for the task.
"""

import torch

from looplm.model import GPT, LoopLM


def copy_gpt_weights(gpt: GPT, model: LoopLM) -> LoopLM:
    """Copy gpt's weights into model (n_core = gpt's n_layers, no prelude or coda); return model."""
    g, c = gpt.config, model.config
    if c.n_prelude or c.n_coda:
        raise ValueError(f"model must have no prelude or coda, got n_prelude={c.n_prelude}, "
                         f"n_coda={c.n_coda}")
    if c.n_core != g.n_layers:
        raise ValueError(f"model's core has {c.n_core} blocks but the GPT has {g.n_layers} layers")
    if c.tie_embeddings != g.tie_embeddings:
        raise ValueError(f"tie_embeddings differs: GPT {g.tie_embeddings}, model {c.tie_embeddings}")
    pairs = [(gpt.embed, model.embed), (gpt.norm, model.norm), (gpt.lm_head, model.lm_head),
             *zip(gpt.blocks, model.core)]
    with torch.no_grad():
        for source, target in pairs:
            source_params = dict(source.named_parameters())
            target_params = dict(target.named_parameters())
            if source_params.keys() != target_params.keys():
                raise ValueError(f"{type(target).__name__} parameters differ: "
                                 f"{sorted(source_params)} vs {sorted(target_params)}")
            for name, param in target_params.items():
                if param.shape != source_params[name].shape:
                    raise ValueError(f"{type(target).__name__}.{name}: shape {list(param.shape)} "
                                     f"vs the GPT's {list(source_params[name].shape)}")
                param.copy_(source_params[name])
    return model
