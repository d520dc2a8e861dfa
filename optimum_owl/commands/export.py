"""`optimum-owl export onnx`: a saved (pruned) causal LM to ONNX with a KV cache and compact sparse weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_model_source_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a pruned model (ONNX)")
    formats = p.add_subparsers(dest="format", metavar="FORMAT")
    formats.required = True
    o = formats.add_parser(
        "onnx",
        help="ONNX decoder with KV cache; pruned weights stored as bitmask + values",
        description=(
            "Export MODEL (a folder written by `optimum-owl prune`, or any causal LM folder / Hub id) to one ONNX "
            "graph with a KV cache, check it against PyTorch with onnxruntime, and write owl_onnx.json with the "
            "sizes and the validation numbers."
        ),
    )
    o.add_argument("model", help="model folder or Hub id")
    add_model_source_arguments(o)
    o.add_argument("--output-dir", "-o", required=True)
    o.add_argument(
        "--storage",
        default="bitmask",
        choices=("bitmask", "sparse_initializer", "dense"),
        help="bitmask: packed mask + non-zeros decoded in-graph (default); sparse_initializer: ONNX COO; dense",
    )
    o.add_argument("--dtype", default=None, help="float32 | float16 (default: the checkpoint's)")
    o.add_argument("--opset", type=int, default=17)
    o.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    o.add_argument("--no-validate", action="store_true", help="skip the onnxruntime vs PyTorch check")
    o.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens compared when validating")
    o.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="push the export to this repo afterwards")
    o.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    o.set_defaults(func=run_onnx)


def run_onnx(args: argparse.Namespace) -> int:
    from ..export import export_onnx, require_onnx
    from ..utils import check_output_dir
    from . import args_input_paths, check_model_args, load_model_arg, load_tokenizer_arg

    require_onnx("onnx", "onnxruntime")
    check_model_args(args)  # a wrong name fails here, at once, before anything is loaded
    check_output_dir(args.output_dir, args.overwrite, protected={"input model": args.model},
                     inputs=args_input_paths(args, "output_dir"))
    from ..pruning.report import PruneReport

    model = load_model_arg(args)  # a compact checkpoint loads through the registered quantizer, a GGUF file too
    report = None
    if Path(args.model, "owl_report.json").exists():
        report = PruneReport.load(Path(args.model, "owl_report.json"))
    tokenizer = load_tokenizer_arg(args, None)  # optional: only saved beside the export
    result = export_onnx(
        model,
        args.output_dir,
        storage=args.storage,
        dtype=args.dtype,
        opset=args.opset,
        overwrite=args.overwrite,
        validate=not args.no_validate,
        max_new_tokens=args.max_new_tokens,
        tokenizer=tokenizer,
        report=report,
    )
    meta = result.metadata
    sizes = meta["sizes"]
    print(
        f"exported to {args.output_dir}: {meta['storage']['storage']} storage, {sizes['onnx_bytes']:,} bytes "
        f"({sizes['ratio_to_dense']:.3f}x the dense export), weight sparsity {meta['weight_sparsity']:.4f}"
    )
    val = meta.get("validation")
    if val:
        print(
            f"onnxruntime vs PyTorch: prefill rel. error {val['prefill_rel_error']:.2e}, decode {val['decode_rel_error']:.2e}, "
            f"greedy-{val['greedy_tokens']} equal: {val['greedy_equal']}, session creation {val['session_creation_s']:.3f} s"
        )
    if args.push_to_hub:
        from ..hub import push_folder

        info = push_folder(args.output_dir, args.push_to_hub, private=args.private or None)
        print(f"pushed to {args.push_to_hub}: {info.commit_url}")
    return 0
