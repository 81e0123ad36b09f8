"""Convert a base Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint into a Vedas checkpoint folder.

    python examples/convert_base.py --base tiny-qwen2-vl --out tiny-vedas \\
        --set num_replay_tokens=16 routing_topk=8 "routing_layers=[1,3]"

Adds the latent special tokens (reusing spare embedding rows), the routers, step embeddings and ``token_sr``, and
writes a folder that loads with ``AutoModel.from_pretrained(out, trust_remote_code=True)``. ``--set`` overrides any
Vedas setting; values are Python/JSON literals (``16``, ``0.5``, ``[1,3]``, ``true``) or bare strings
(``replay_mode=soft_mix``). With the default ``depth_gate_init=0`` the converted model computes exactly the base.
``--base`` may be a Hub model id (``Qwen/Qwen2-VL-2B-Instruct``): it is downloaded into the HF cache, or with
``HF_HUB_OFFLINE=1`` taken from it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys

from vedas_trainer.checkpoint import (
    CONVERSION_OWNED,
    OVERRIDABLE,
    CheckpointError,
    check_overrides,
    convert_base,
    count_vedas_parameters,
)


def parse_value(text: str):
    """A `--set` value: a Python literal, else a JSON literal (true/false/null), else the bare string."""
    for parse in (ast.literal_eval, json.loads):
        try:
            return parse(text)
        except (ValueError, SyntaxError, json.JSONDecodeError):
            continue
    return text


def parse_overrides(pairs: list[str] | None) -> dict:
    """`["key=value", ...]` -> `{key: value}`; unknown or malformed keys raise ValueError listing the valid ones."""
    overrides = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}.")
        check_overrides({key: None})
        overrides[key] = parse_value(value.strip())
    return overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint: a folder or "
                        "a Hub model id (offline, from the local HF cache)")
    parser.add_argument("--out", required=True, help="output folder for the Vedas checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", metavar="KEY=VALUE", default=[],
        help=f"override Vedas settings; valid keys: {', '.join(OVERRIDABLE)}",
    )
    args = parser.parse_args(argv)
    try:  # validate here so that a typo fails before the (possibly large) base is loaded
        args.overrides = parse_overrides(args.overrides)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, _ = convert_base(args.base, args.out, overrides=args.overrides, overwrite=args.overwrite)
    except (CheckpointError, FileExistsError, ValueError) as err:
        # expected user errors (wrong folder, corrupt weights, bad setting): a message, not a traceback
        print(f"convert_base.py: error: {err}", file=sys.stderr)
        return 1
    added = count_vedas_parameters(model)
    base = sum(p.numel() for p in model.parameters()) - added
    print(f"Wrote Vedas checkpoint to {args.out}")
    print(f"Vedas modules add {added:,} parameters to the {base:,} of the base ({added / base:.4%}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
