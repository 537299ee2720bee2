"""The command line, config files and Accelerator every recipe starts with."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Type, TypeVar

import torch

from muvi.config import Config, ConfigError, nested_configs

logger = logging.getLogger(__name__)
C = TypeVar("C", bound=Config)

#: the `accelerate launch` flags that shard the model, and the variables they set for the processes
SHARDED_LAUNCHES = {"--use_fsdp": "ACCELERATE_USE_FSDP", "--use_deepspeed": "ACCELERATE_USE_DEEPSPEED",
                    "--use_megatron_lm": "ACCELERATE_USE_MEGATRON_LM"}


# ----------------------------------------------------------------------------- configs

def load_config(cls: Type[C], path: Optional[str | Path], overrides: Sequence[str] = ()) -> C:
    """A recipe config from a JSON file, then ``field=value`` overrides from the command line.

    Values are parsed as JSON when they can be (``steps=10``, ``sizes=[1,2]``, ``flag=true``)
    and taken as strings otherwise (``data=music/``). A dotted field sets one field of a nested
    config (``optim.lr=1e-4``), keeping the others.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8")) if path else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form field=value")
        *parents, name = key.split(".")
        target, kind = data, cls
        for parent in parents:
            nested = nested_configs(kind)
            if parent not in nested:
                raise ConfigError(f"override {item!r}: {kind.__name__} has no nested config {parent!r}; "
                                  f"nested configs are {sorted(nested)}")
            target, kind = target.setdefault(parent, {}), nested[parent]
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {parent!r} is {target!r} in the config, not an object")
        names = {f.name for f in dataclasses.fields(kind)}
        if name not in names:
            raise ConfigError(f"override {item!r}: {kind.__name__} has no field {name!r}; "
                              f"fields are {sorted(names)}")
        try:
            target[name] = json.loads(value)
        except json.JSONDecodeError:
            target[name] = value
    return cls.from_dict(data, source=str(path) if path else "command line")


# ----------------------------------------------------------------------------- command line

def recipe_parser(description: str):
    """The command line every recipe shares:

    ``accelerate launch recipes/X.py --config C.json --run-dir DIR [--resume] [--set f=v ...] [--[no-]progress]``
    """
    import argparse

    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="recipe config (JSON)")
    parser.add_argument("--run-dir", type=Path, required=True,
                        help="where checkpoints, metrics.jsonl and the final weights go")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --run-dir")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override single config fields")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar over the steps (default: when stderr is a terminal)")
    return parser


def make_accelerator(mixed_precision: str = "auto", grad_accum: int = 1, cpu: bool = False, *,
                     log_with: str = "none", run_dir: Optional[str | Path] = None):
    """An Accelerator with bf16 on GPU and fp32 on CPU (bf16 matmul is ~200x slower on CPU),
    logging to the trackers ``log_with`` names (:func:`muvi.training.logs.trackers`; their
    files go under ``run_dir``).

    A launch that asks Accelerate to shard the model (FSDP, DeepSpeed, Megatron) is refused in
    one line: the loops assume Accelerate hands back whole parameters (its EMA, checkpoints and
    optimizer restore), and Accelerate 1.16 ignores ``--use_fsdp`` on a CPU-only world and runs
    DDP. The DiT recipe shards with torch's FSDP2 itself instead (``--set shard=fsdp``,
    :mod:`muvi.training.sharding`), in a plain multi-process launch."""
    from accelerate import Accelerator

    from muvi.training.logs import trackers

    sharded = [flag for flag, env in SHARDED_LAUNCHES.items() if os.environ.get(env, "false").lower() == "true"]
    if sharded:
        raise ConfigError(f"accelerate launch {' '.join(sharded)}: the recipes train data-parallel only under "
                          f"Accelerate; launch with --multi_gpu (DDP, on one machine or several) and, to shard the "
                          f"DiT with torch FSDP2, add --set shard=fsdp (README: Training, Scaling out)")
    # Without CUDA, cpu=True is what lets Accelerate see a torchrun / `accelerate launch
    # --multi_cpu` world (gloo) instead of N independent single processes.
    cpu = cpu or not torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "no" if cpu else "bf16"
    names = trackers(log_with)
    if names and run_dir is None:
        raise ValueError(f"log_with {log_with!r} needs a run_dir for the trackers' files")
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=cpu,
                       log_with=names or None, project_dir=str(run_dir) if run_dir is not None else None)


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
