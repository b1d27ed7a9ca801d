"""The configurations `bench adapt` measures: the faithful recipe, each fast-adaptation lever alone, the fast
recipe, and the batched path with its execution levers.

A lever is a group of recipe fields (`LEVERS`); "alone" means the faithful recipe with only that lever's
fields taken from the fast one. An execution lever (`EXEC_LEVERS`) changes how the batched path runs the
same recipe (torch.compile, CUDA graphs, bf16 autocast, fused Adam, fewer host syncs), not what it computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tta_runtime.adapt.batched import ExecutionOptions
from tta_runtime.config import AdaptConfig
from tta_runtime.errors import ConfigError, UnknownNameError
from tta_runtime.registry import unknown_name_message

# Recipe fields that make up each lever; "alone" = the faithful recipe with these fields from the fast one.
LEVERS: dict[str, tuple[str, ...]] = {
    "frozen_encoder": ("params",),
    "pixel_subset": ("pixel_fraction",),
    "schedule": ("lr", "steps", "lr_schedule", "warmup_steps", "lr_final_fraction"),
    "early_stop": ("early_stop_patience", "early_stop_min_delta"),
    "adam_state": ("optimizer_state",),
    "time_budget": ("time_budget_ms",),
}
EXEC_LEVERS: dict[str, dict[str, Any]] = {
    "compile": {"compile": "default"},
    "graphs": {"compile": "reduce-overhead"},  # torch.compile + CUDA graphs
    "bf16": {"autocast": "bf16"},
    "fused": {"adam": "fused"},
    "async": {"sync_every": 100_000},  # the host reads losses and the guard back once, after the last step
}


@dataclass
class BenchConfig:
    """One measured configuration: a recipe and how it runs ('loop': the runtime's one loop, one image at a
    time; 'batched': `BatchedAdapter` with `execution`)."""

    name: str
    recipe: AdaptConfig
    runner: str = "loop"
    execution: ExecutionOptions | None = None
    levers: list[str] = field(default_factory=list)

    def describe(self, faithful: AdaptConfig) -> dict[str, Any]:
        base, mine = faithful.model_dump(), self.recipe.model_dump()
        return {
            "runner": self.runner, "levers": self.levers, "recipe": self.recipe.name,
            "recipe_changes_vs_faithful": {k: v for k, v in mine.items() if base[k] != v and k not in ("name", "description")},
            "execution": None if self.execution is None else self.execution.model_dump(),
        }


def lever_configs(faithful: AdaptConfig, fast: AdaptConfig) -> list[BenchConfig]:
    """Each lever of `fast` alone on top of `faithful` (only the levers where the two recipes differ)."""
    out = []
    for lever, fields in LEVERS.items():
        changes = {f: getattr(fast, f) for f in fields if getattr(fast, f) != getattr(faithful, f)}
        if changes:
            recipe = faithful.model_copy(update={**changes, "name": f"{faithful.name}+{lever}"})
            out.append(BenchConfig(f"lever:{lever}", AdaptConfig.model_validate(recipe.model_dump()), levers=[lever]))
    return out


def fast_levers(faithful: AdaptConfig, fast: AdaptConfig) -> list[str]:
    """The levers in which `fast` differs from `faithful`."""
    return [lv for lv, fields in LEVERS.items() if any(getattr(fast, f) != getattr(faithful, f) for f in fields)]


def _merged(exec_levers: Sequence[str]) -> tuple[str, dict[str, Any], list[str]]:
    """Several execution levers at once: (name suffix, execution options, lever names)."""
    options: dict[str, Any] = {}
    for e in exec_levers:
        options.update(EXEC_LEVERS[e])
    return "+" + "+".join(exec_levers), options, list(exec_levers)


def build_configs(
    faithful: AdaptConfig, fast: AdaptConfig, *, extra: Sequence[AdaptConfig] = (), levers: bool = True,
    batch_sizes: Sequence[int] = (8,), exec_levers: Sequence[str] = (), batched_recipes: Sequence[AdaptConfig] | None = None,
    compile_backend: str = "inductor",
) -> list[BenchConfig]:
    """The default set: faithful, each lever alone, fast (and extras), then the batched path."""
    unknown = [e for e in exec_levers if e not in EXEC_LEVERS]
    if unknown:
        raise UnknownNameError(unknown_name_message("execution lever", unknown[0], list(EXEC_LEVERS)))
    configs = [BenchConfig("faithful", faithful)]
    if levers:
        configs += lever_configs(faithful, fast)
    configs.append(BenchConfig("fast", fast, levers=fast_levers(faithful, fast)))
    for r in extra:
        configs.append(BenchConfig(r.name, r, levers=fast_levers(faithful, r)))
    for recipe in (fast,) if batched_recipes is None else batched_recipes:
        label = "fast" if recipe is fast else recipe.name
        base_levers = fast_levers(faithful, recipe)
        for b in batch_sizes:
            variants: list[tuple[str, dict[str, Any], list[str]]] = [("", {}, [])]
            variants += [(f"+{e}", EXEC_LEVERS[e], [e]) for e in exec_levers]
            together = [e for e in exec_levers if not (e == "compile" and "graphs" in exec_levers)]  # graphs compiles
            if len(together) > 1:  # all together
                variants.append(_merged(together))
                if "async" in together and len(together) > 2:  # and all but async, for the ratio in one process
                    variants.append(_merged([e for e in together if e != "async"]))
            for suffix, opts, names in variants:
                ex = ExecutionOptions(batch_size=b, compile_backend=compile_backend, **opts)
                configs.append(BenchConfig(f"{label}:batched{b}{suffix}", recipe, "batched", ex, [*base_levers, "vmap", *names]))
    names_seen = [c.name for c in configs]
    twice = sorted({n for n in names_seen if names_seen.count(n) > 1})
    if twice:
        raise ConfigError(f"configurations named twice: {twice} (an extra recipe repeats the fast one, or a batch size is repeated)")
    return configs
