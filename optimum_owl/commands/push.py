"""`optimum-owl push`: upload a saved pruned model (and optionally its ONNX export) to the Hub in one commit."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="push a saved pruned model to the Hugging Face Hub with a generated model card",
        description=(
            "Upload FOLDER (written by `optimum-owl prune` or `save_pretrained`) to the Hub in one commit, with "
            "owl_report.json, owl_config.json, a generated README.md and its sparsity plot. The token is read from "
            "HF_TOKEN or the login saved by `hf auth login`; it is never printed."
        ),
    )
    p.add_argument("folder", help="saved pruned model folder, or an ONNX export folder from `optimum-owl export onnx`")
    p.add_argument("--repo-id", required=True, help="target repo, e.g. username/llama-owl-70")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--onnx-dir", default=None, help="ONNX export to upload under onnx/ in the same commit")
    p.add_argument("--base-model", default=None, help="Hub id of the dense model (card metadata)")
    p.add_argument("--license", default=None, help="license id; read from the base model's card when omitted")
    p.add_argument(
        "--eval-json",
        default=None,
        help='JSON file with a list of {"dataset", "metric", "value", "dense_value"} rows for the card',
    )
    p.add_argument("--reproduce-command", default=None, help="the command that produced FOLDER, shown in the card")
    p.add_argument("--keep-card", action="store_true", help="upload FOLDER's own README.md instead of generating one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import push_folder

    eval_results = json.loads(Path(args.eval_json).read_text()) if args.eval_json else None
    info = push_folder(
        args.folder,
        args.repo_id,
        private=args.private or None,
        create_pr=args.create_pr,
        revision=args.revision,
        commit_message=args.commit_message,
        onnx_dir=args.onnx_dir,
        regenerate_card=not args.keep_card,
        base_model=args.base_model,
        license=args.license,
        eval_results=eval_results,
        command=args.reproduce_command,
    )
    print(f"pushed {args.folder} to {args.repo_id}: {info.pr_url or info.commit_url}")
    return 0
