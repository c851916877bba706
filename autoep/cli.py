"""`autoep` console command.

    autoep inspect MODEL_TYPE_OR_CONFIG_JSON [--ep-config BLOCK.json] [--json]
    autoep inspect --families [--json]

builds the model on the meta device (no weights are allocated or downloaded) from a
model type's default config or a config.json file, and prints the MoE blocks AutoEP
would replace; with --families, prints every fused-experts MoE family of the installed
Transformers with the family table's verdict (supported, refused with the reason, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _read_json_object(path: str, what: str) -> dict:
    """A JSON file that must hold one object; any other content is a ValueError naming the file."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except ValueError as error:  # not JSON (or an integer too long to read)
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got a {type(data).__name__}")
    return data


def _build_meta_model(source: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if os.path.isdir(source):  # a model folder holding config.json
        config = AutoConfig.from_pretrained(source)
    elif os.path.isfile(source):  # a config.json file
        data = _read_json_object(source, "model config")
        if not isinstance(data.get("model_type"), str):
            raise ValueError(f"model config {source} has no \"model_type\" string (e.g. \"mixtral\")")
        config = AutoConfig.for_model(data.pop("model_type"), **data)
    else:
        config = AutoConfig.for_model(source)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModelForCausalLM.from_config(text)


def _table(rows: list[dict]) -> str:
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(str(r[h])) for r in rows)) for h in headers}
    lines = ["  ".join(h.ljust(widths[h]) for h in headers), "  ".join("-" * widths[h] for h in headers)]
    lines += ["  ".join(str(r[h]).ljust(widths[h]) for h in headers) for r in rows]
    return "\n".join(lines)


def cmd_families(args) -> int:
    from autoep.presets.survey import installed_families, summary

    families = installed_families()
    rows = [family.row() for family in families]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(summary(families))
        print(_table(rows))
    return 0


def cmd_inspect(args) -> int:
    if args.families:
        if args.model is not None or args.ep_config:
            raise ValueError("autoep inspect --families takes no model and no --ep-config")
        return cmd_families(args)
    if args.model is None:
        raise ValueError("autoep inspect needs a model type or config.json path (or --families)")
    import autoep

    block = None
    if args.ep_config:
        data = _read_json_object(args.ep_config, "--ep-config")
        block = data.get("expert_parallel", data)
    model = _build_meta_model(args.model)
    specs = autoep.inspect(model, block)
    rows = [spec.row() for spec in specs]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{type(model).__name__}: {len(rows)} MoE blocks would be replaced")
        print(_table(rows))
    return 0


def cmd_to_universal(args) -> int:
    from autoep.universal import to_universal

    to_universal(args.input_folder, args.output_folder)
    print(f"wrote Universal Checkpoint {args.output_folder}; load it with \"checkpoint\": "
          "{\"load_universal\": true} (load_dir = its parent, tag = its name)")
    return 0


def cmd_export_hf(args) -> int:
    from autoep.export import save_pretrained

    save_pretrained(args.input_folder, args.output_dir)
    print(f"wrote Hugging Face checkpoint {args.output_dir} (from_pretrained on the original model class loads it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoep", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="show the MoE blocks AutoEP would replace")
    inspect.add_argument("model", nargs="?", help="a model type (e.g. mixtral) or a config.json path")
    inspect.add_argument("--families", action="store_true",
                         help="list every fused-experts MoE family of the installed Transformers and its status")
    inspect.add_argument("--ep-config", help="a DeepSpeed config (or bare expert_parallel block) JSON file")
    inspect.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    inspect.set_defaults(func=cmd_inspect)
    universal = commands.add_parser("to-universal", help="convert an AutoEP ZeRO 1/2/3 checkpoint tag folder into a "
                                    "Universal Checkpoint tag folder (another world size / autoep_size)")
    universal.add_argument("--input_folder", required=True, help="a checkpoint tag folder, e.g. ckpt/global_step100")
    universal.add_argument("--output_folder", required=True, help="the Universal tag folder to create (must not exist)")
    universal.set_defaults(func=cmd_to_universal)
    export = commands.add_parser("export-hf", help="write a stock Hugging Face checkpoint (every expert gathered) "
                                 "from an AutoEP checkpoint tag folder")
    export.add_argument("--input_folder", required=True, help="a checkpoint tag folder, e.g. ckpt/global_step100")
    export.add_argument("--output_dir", required=True, help="the folder to create (must not exist)")
    export.set_defaults(func=cmd_export_hf)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as error:  # AutoEPConfigError, DetectionError are ValueErrors
        print(f"autoep {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
