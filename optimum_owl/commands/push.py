"""`optimum-owl push`: upload a saved pruned model (and optionally its ONNX export) to the Hub in one commit;
`push --dry-run` lists what would be uploaded. `optimum-owl card`: write (or print) the model card of a saved folder
without uploading anything."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any


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
    _add_card_arguments(p)
    p.add_argument("--keep-card", action="store_true", help="upload FOLDER's own README.md instead of generating one")
    p.add_argument("--dry-run", action="store_true",
                   help="list every file that would be uploaded (the generated card included) and stop: no upload, "
                   "no network request, FOLDER unchanged; see the card with `optimum-owl card FOLDER --stdout`")
    p.set_defaults(func=run)

    c = subparsers.add_parser(
        "card",
        help="write the model card (README.md + sparsity plot) of a saved pruned model, without uploading",
        description=(
            "Write FOLDER/README.md (and owl_sparsity.png) as `optimum-owl push` would upload it: YAML metadata, the "
            "method and its setting, per-block table, evaluation, repair, reproduction and loading. No network "
            "request is made (pass --license; it is not read from the base model's card)."
        ),
    )
    c.add_argument("folder", help="saved pruned model folder (from `optimum-owl prune` or `repair`) or ONNX export")
    c.add_argument("--repo-id", default=None, help="the Hub repo it will live in (title and loading snippets)")
    _add_card_arguments(c)
    c.add_argument("--stdout", action="store_true", help="print the card instead of writing FOLDER/README.md")
    c.add_argument("--overwrite", action="store_true", help="replace an existing FOLDER/README.md")
    c.set_defaults(func=run_card)


def _add_card_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", default=None, help="Hub id of the dense model (card metadata)")
    p.add_argument("--license", default=None, help="license id; read from the base model's card when omitted")
    p.add_argument(
        "--eval-json",
        default=None,
        help='JSON file with a list of {"dataset", "metric", "value", "dense_value"} rows for the card',
    )
    p.add_argument("--reproduce-command", default=None, help="the command that produced FOLDER, shown in the card")


def _card_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    eval_results = json.loads(Path(args.eval_json).read_text()) if args.eval_json else None
    return {"base_model": args.base_model, "license": args.license, "eval_results": eval_results,
            "command": args.reproduce_command}


def run(args: argparse.Namespace) -> int:
    from ..hub import push_folder

    info = push_folder(
        args.folder,
        args.repo_id,
        private=args.private or None,
        create_pr=args.create_pr,
        revision=args.revision,
        commit_message=args.commit_message,
        onnx_dir=args.onnx_dir,
        regenerate_card=not args.keep_card,
        dry_run=args.dry_run,
        **_card_kwargs(args),
    )
    if args.dry_run:
        for name, size in info:
            print(f"{size:>14,}  {name}")
        print(f"dry run: {len(info)} files, {sum(size for _, size in info):,} bytes would be pushed to {args.repo_id}; "
              "nothing was uploaded")
        return 0
    print(f"pushed {args.folder} to {args.repo_id}: {info.pr_url or info.commit_url}")
    return 0


def run_card(args: argparse.Namespace) -> int:
    from ..hub import PLOT_NAME, write_card

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass a saved pruned model folder.")
    kwargs = {**_card_kwargs(args), "repo_id": args.repo_id, "lookup_license": False}
    if args.stdout:  # rendered in a scratch folder that links to FOLDER's entries: FOLDER is not touched
        with tempfile.TemporaryDirectory(prefix="owl-card-") as scratch:
            for path in folder.iterdir():
                if path.name not in ("README.md", PLOT_NAME):
                    (Path(scratch) / path.name).symlink_to(path.resolve())
            print(write_card(scratch, **kwargs).read_text(encoding="utf-8"), end="")
        return 0
    readme = folder / "README.md"
    if readme.exists() and not args.overwrite:
        raise FileExistsError(f"{readme} exists; pass --overwrite to replace it, or --stdout to print the card.")
    write_card(folder, **kwargs)  # README.md and the plot, each written atomically
    print(f"wrote {readme}" + (f" and {folder / PLOT_NAME}" if (folder / PLOT_NAME).is_file() else ""))
    return 0
