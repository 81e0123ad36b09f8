"""Push an existing Vedas checkpoint folder to the Hugging Face Hub.

    python examples/push_to_hub.py /path/to/checkpoint --repo-id user/vedas-qwen2-vl [--private] [--token hf_...]

The folder is checked before anything is uploaded: config with auto_map, remote-code files, weights, processor and
tokenizer files, auto_map entries that name classes the remote-code files define (checked by parsing, not
importing), a valid ``--repo-id``, and a README.md whose YAML metadata (library_name, pipeline_tag, tags, license,
and base_model as a Hub id when present) parses with ``huggingface_hub.ModelCard``. ``--dry-run`` runs these checks
offline. Without ``--token`` the cached login (``hf auth login``) or ``HF_TOKEN`` is used. Offline
(``HF_HUB_OFFLINE=1``) or with the Hub unreachable, it exits with one line and uploads nothing.
"""

from __future__ import annotations

import argparse
import sys

from vedas_trainer.hub import HubError, push_checkpoint, validate_for_push


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="Vedas checkpoint folder (written by convert_base.py or train.py)")
    parser.add_argument("--repo-id", required=True, help="target model repository, e.g. user/vedas-tiny")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: cached login or HF_TOKEN)")
    parser.add_argument("--commit-message", default="Upload Vedas checkpoint")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--dry-run", action="store_true", help="only check the folder and list the files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.dry_run:
            files = validate_for_push(args.folder, args.repo_id)
        else:
            files = push_checkpoint(
                args.folder, args.repo_id, private=args.private, token=args.token,
                commit_message=args.commit_message, revision=args.revision,
            )
    except (ValueError, HubError) as err:  # CheckpointError is a ValueError
        print(f"push_to_hub.py: error: {err}", file=sys.stderr)
        return 1
    verb = "Would upload" if args.dry_run else "Uploaded"
    print(f"{verb} {len(files)} files to {args.repo_id}:")
    for name in files:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
