"""Push a finished Vedas checkpoint folder to the Hugging Face Hub, after checking it is complete.

Nothing is uploaded unless the folder has everything a user needs to load it with ``trust_remote_code``
(:func:`vedas_trainer.checkpoint.check_checkpoint_folder`) and its ``README.md`` carries the Hub metadata the
model page relies on. A failed check raises :class:`CheckpointError` naming every problem at once, so a user fixes
the folder in one go instead of discovering a half-uploaded repository.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .checkpoint import CheckpointError, check_checkpoint_folder


logger = logging.getLogger(__name__)

# Card metadata keys the Hub uses for the model page, search and the "Use this model" widget.
# base_model is optional (a model built from scratch has none) but must be a valid repo id when present
REQUIRED_CARD_FIELDS = ("library_name", "pipeline_tag", "tags", "license")
# Local clutter that never belongs in a model repository (upload_folder skips .git/ and .cache/ itself; the others
# appear when a checkpoint's remote code was imported from the folder or it was opened in an editor).
IGNORED_PARTS = (".git", ".cache", "__pycache__", ".ipynb_checkpoints")
IGNORED_SUFFIXES = (".pyc", ".lock", ".tmp")


def card_problems(folder) -> list[str]:
    """What is wrong with the YAML metadata of `folder/README.md` (empty list if it is fine)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return []  # reported by check_checkpoint_folder already
    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception as err:  # ModelCard raises ValueError/yaml errors for a malformed header
        return [f"README.md YAML metadata does not parse: {err}"]
    problems = [f"README.md metadata lacks {key!r}" for key in REQUIRED_CARD_FIELDS if not data.get(key)]
    if data.get("tags") is not None and not isinstance(data["tags"], list):
        problems.append(f"README.md metadata 'tags' must be a list, got {data['tags']!r}")
    base_models = data.get("base_model") or []
    for name in base_models if isinstance(base_models, list) else [base_models]:
        try:  # the Hub links base_model to a model page, so it must at least be a valid repo id
            validate_repo_id(str(name))
        except HFValidationError as err:
            problems.append(f"README.md metadata base_model {name!r} is not a Hub repo id: {err}")
    return problems


def files_to_upload(folder) -> list[str]:
    """Relative POSIX paths of the files a push of `folder` uploads, sorted."""
    folder = Path(folder)
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part in IGNORED_PARTS for part in relative.parts):
            continue
        if path.name.endswith(IGNORED_SUFFIXES):
            continue
        files.append(relative.as_posix())
    return sorted(files)


def validate_for_push(folder) -> list[str]:
    """Check `folder` and return the files to upload; raises CheckpointError listing every problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a folder.")
    problems = [f"missing {item}" for item in check_checkpoint_folder(folder)] + card_problems(folder)
    if problems:
        raise CheckpointError(
            f"Refusing to push {str(folder)!r}: it is not a complete Vedas checkpoint:\n  - " + "\n  - ".join(problems)
        )
    return files_to_upload(folder)


def push_checkpoint(
    folder,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload Vedas checkpoint",
    revision: str | None = None,
) -> list[str]:
    """Validate `folder`, create `repo_id` (if needed) and upload the folder. Returns the uploaded file paths."""
    files = validate_for_push(folder)  # before any network call
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    # allow_patterns pins the upload to exactly the validated list (no stray files created in between)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        allow_patterns=files,
        commit_message=commit_message,
        revision=revision,
        repo_type="model",
    )
    logger.info("Pushed %d files from %s to %s", len(files), folder, repo_id)
    return files


__all__ = ["push_checkpoint", "validate_for_push", "files_to_upload", "card_problems", "REQUIRED_CARD_FIELDS"]
