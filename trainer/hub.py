"""The Hugging Face Hub: push a finished Vedas checkpoint folder after checking it, and resolve Hub model ids.

Nothing is uploaded unless the repo id is valid and the folder has everything a user needs to load it with
``trust_remote_code`` (:func:`vedas_trainer.checkpoint.check_checkpoint_folder`), its ``auto_map`` names classes
its remote code defines, and its ``README.md`` carries the Hub metadata the model page relies on. A failed check
raises :class:`CheckpointError` naming every problem at once, so a user fixes the folder in one go instead of
discovering a half-uploaded repository. Offline or with the Hub unreachable, a push is one line
(:class:`HubError`) with the command to retry, never a traceback. :func:`resolve_model_folder` turns a Hub model
id into a local snapshot folder (the local HF cache when offline).
"""

from __future__ import annotations

import ast
import difflib
import json
import logging
import shlex
import sys
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, is_offline_mode, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .checkpoint import ALL_REMOTE_CODE_FILES, CheckpointError, check_checkpoint_folder, is_hub_repo_id


logger = logging.getLogger(__name__)

# Card metadata keys the Hub uses for the model page, search and the "Use this model" widget.
# base_model is optional (a model built from scratch has none) but must be a valid repo id when present
REQUIRED_CARD_FIELDS = ("library_name", "pipeline_tag", "tags", "license")
# Local clutter that never belongs in a model repository (upload_folder skips .git/ and .cache/ itself; the others
# appear when a checkpoint's remote code was imported from the folder or it was opened in an editor).
IGNORED_PARTS = (".git", ".cache", "__pycache__", ".ipynb_checkpoints")
IGNORED_SUFFIXES = (".pyc", ".lock", ".tmp")
# JSON files whose auto_map entries name remote-code classes
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
# What a failed Hub call raises: OSError (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError),
# huggingface_hub's HTTP errors, and the HTTP client's own errors (HfHubHTTPError's other base): a refused
# connection or a time-out reaches the caller unwrapped.
HUB_ERRORS = (OSError, HfHubHTTPError, *HfHubHTTPError.__bases__)
# The files a model needs from a Hub repository: config, safetensors weights, processor, tokenizer and chat
# template, and a Vedas checkpoint's remote code (load_vedas never runs it; it keeps the snapshot complete); no
# pickle (*.bin) or other frameworks' weights
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]


class HubError(RuntimeError):
    """A Hub operation cannot go ahead: the Hub could not be reached or refused a request (the message says what was
    not uploaded), or a `--push_to_hub` run was given no valid repository."""


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def check_repo_id(repo_id, flag: str = "--repo-id") -> str:
    """`repo_id` if it is a valid Hub model repo id, else a one-line ValueError naming it (and `flag`)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{flag} {repo_id!r} is not a valid Hub repo id: {str(err).splitlines()[0]}") from None
    return repo_id


def resolve_model_folder(name_or_path) -> Path:
    """A local folder for a model given as a folder or as a Hub model id (`Qwen/Qwen2-VL-2B-Instruct`).

    An existing path, or a string that is not a repo id, is returned as a path (a missing folder is reported by
    whoever reads it, naming it). A Hub id resolves through `huggingface_hub.snapshot_download`, config, weights
    (safetensors only) and processor files: from the local HF cache (`HF_HOME`/`HF_HUB_CACHE`) when offline
    (`HF_HUB_OFFLINE=1`) or the Hub cannot be reached, downloading into that cache otherwise. A Hub id that
    resolves to nothing is a one-line CheckpointError naming the id and, offline, HF_HUB_OFFLINE.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists() or not is_hub_repo_id(text):
        return path
    try:
        return Path(snapshot_download(text, repo_type="model", allow_patterns=MODEL_FILE_PATTERNS))
    except HUB_ERRORS as err:
        if is_offline_mode():
            reason = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading: "
                      f"download it once with network access (`hf download {text}`) or pass a local folder")
        else:
            reason = f"it could not be fetched from the Hub ({_first_line(err)})"
        raise CheckpointError(f"{text!r} is not a local folder, and as a Hub model id {reason}.") from None


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
            local = str(name).startswith(("/", ".", "~")) or "\\" in str(name) or Path(str(name)).exists()
            what = "is a local path" if local else f"is malformed ({str(err).splitlines()[0]})"
            problems.append(f"README.md metadata base_model {name!r} {what}, not a Hub repo id: set it to the "
                            f"base model's Hub id (e.g. Qwen/Qwen2-VL-2B-Instruct) or remove the line")
    return problems


def _defined_names(path: Path) -> set[str] | None:
    """Names a Python file defines at top level (classes, assignments, imports), by parsing it; None if it does
    not parse. Nothing is imported or run."""
    try:
        tree = ast.parse(path.read_text(), filename=path.name)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def _auto_map_target_problem(folder: Path, target, parsed: dict) -> str | None:
    if not isinstance(target, str) or "." not in target:
        return "is not a 'module.ClassName' reference"
    if "--" in target:
        return "points at code in another repository; a Vedas checkpoint runs only the remote code it carries"
    module, _, name = target.rpartition(".")
    file_name = f"{module}.py"
    if file_name not in ALL_REMOTE_CODE_FILES:
        return f"{file_name} is not one of the checkpoint's remote-code files ({', '.join(ALL_REMOTE_CODE_FILES)})"
    if not (folder / file_name).is_file():
        return f"{file_name} is missing"
    if file_name not in parsed:
        parsed[file_name] = _defined_names(folder / file_name)
    if parsed[file_name] is None:
        return f"{file_name} does not parse as Python"
    if name not in parsed[file_name]:
        close = difflib.get_close_matches(name, sorted(parsed[file_name]), n=1)
        return f"{file_name} defines no {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    return None


def auto_map_problems(folder) -> list[str]:
    """`auto_map` entries (config.json and the processor/tokenizer JSON files) that do not name a class defined in
    the checkpoint's remote-code files. The files are parsed, not imported: a check never runs the code."""
    folder, parsed, problems = Path(folder), {}, []
    for json_name in AUTO_MAP_FILES:
        try:
            data = json.loads((folder / json_name).read_bytes())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue  # a missing or broken config.json is reported by check_checkpoint_folder
        entries = data.get("auto_map") if isinstance(data, dict) else None
        for key, targets in (entries or {}).items() if isinstance(entries, dict) else ():
            for target in targets if isinstance(targets, list) else [targets]:
                problem = None if target is None else _auto_map_target_problem(folder, target, parsed)
                if problem:
                    problems.append(f"{json_name} auto_map[{key!r}] = {target!r}: {problem}")
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


def validate_for_push(folder, repo_id: str | None = None) -> list[str]:
    """Check `repo_id` (when given) and `folder`, and return the files to upload. A bad repo id is a ValueError; a
    bad folder a CheckpointError that lists every problem, each saying what is wrong: a missing or damaged file
    (the checkpoint is incomplete), an auto_map entry naming a class the remote code does not define, or card
    metadata the Hub would reject. No file is imported and nothing touches the network."""
    if repo_id is not None:
        check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a folder.")
    problems = [f"incomplete checkpoint: missing {item}" for item in check_checkpoint_folder(folder)]
    problems += auto_map_problems(folder) + card_problems(folder)
    if len(problems) == 1:
        raise CheckpointError(f"Refusing to push {str(folder)!r}: {problems[0]}")
    if problems:
        raise CheckpointError(f"Refusing to push {str(folder)!r} ({len(problems)} problems):\n  - "
                              + "\n  - ".join(problems))
    return files_to_upload(folder)


def push_command(folder, repo_id: str, private: bool = False) -> str:
    """The shell command that pushes `folder` later."""
    command = f"python examples/push_to_hub.py {shlex.quote(str(folder))} --repo-id {shlex.quote(repo_id)}"
    return command + (" --private" if private else "")


def push_checkpoint(
    folder,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload Vedas checkpoint",
    revision: str | None = None,
) -> list[str]:
    """Validate `folder`, create `repo_id` (if needed) and upload the folder. Returns the uploaded file paths.

    Offline (`HF_HUB_OFFLINE=1`) nothing is attempted; an unreachable Hub or a refused request is a one-line
    HubError saying what happened and that no commit was made (an upload is one commit), with the command to
    retry.
    """
    files = validate_for_push(folder, repo_id)  # before any network call
    retry = f"push it later with: {push_command(folder, repo_id, private)}"
    if is_offline_mode():
        raise HubError(f"Not pushing {str(folder)!r} to {repo_id}: HF_HUB_OFFLINE=1 (offline mode) is set, so "
                       f"nothing was uploaded; unset it and {retry}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except HUB_ERRORS as err:
        raise HubError(f"Could not create or open the Hub repository {repo_id} ({_first_line(err)}); nothing "
                       f"was uploaded; {retry}") from None
    try:  # allow_patterns pins the upload to exactly the validated list (no stray files created in between)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            allow_patterns=files,
            commit_message=commit_message,
            revision=revision,
            repo_type="model",
        )
    except HUB_ERRORS as err:
        raise HubError(f"Could not upload {str(folder)!r} to {repo_id} ({_first_line(err)}); no commit was made; "
                       f"{retry}") from None
    logger.info("Pushed %d files from %s to %s", len(files), folder, repo_id)
    return files


def training_push_target(args) -> str | None:
    """For `train.py --push_to_hub`: the repo id to push `checkpoint-final` to at the end of training, or None.

    Called before any model work: a missing or invalid `--hub_model_id` is a HubError then. It turns the Trainer's own
    pushes off (`args.push_to_hub = False`): they would upload raw Trainer checkpoints (optimizer state included)
    into the same repository, and the Trainer contacts the Hub when it is built, which fails offline before
    training. Offline, training still runs (it needs no network) and a warning says the push will be skipped.
    """
    if not args.push_to_hub:
        return None
    if not args.hub_model_id:
        raise HubError("--push_to_hub needs --hub_model_id NAME, the Hub repository to push checkpoint-final to.")
    try:
        check_repo_id(args.hub_model_id, "--hub_model_id")
    except ValueError as err:
        raise HubError(str(err)) from None
    args.push_to_hub = False
    if is_offline_mode():
        logger.warning("HF_HUB_OFFLINE=1: the run trains and writes checkpoint-final, but cannot push it to %s; "
                       "the command to push it later is printed at the end.", args.hub_model_id)
    return args.hub_model_id


def push_after_training(folder, repo_id: str, token: str | None = None, private: bool = False) -> bool:
    """Push the final checkpoint of a finished run; True if pushed. A push that cannot happen (offline, no network,
    Hub refusal, a folder that fails the checks) loses no work: the checkpoint stays on disk, and one line on
    stderr says why and gives the command to push it later."""
    try:
        push_checkpoint(folder, repo_id, private=private, token=token)
    except HubError as err:
        print(f"Not pushed: {err}", file=sys.stderr)
        return False
    except CheckpointError as err:
        print(f"Not pushed: {err}\nFix the folder, then {push_command(folder, repo_id, private)}",
              file=sys.stderr)
        return False
    return True


__all__ = [
    "push_checkpoint", "validate_for_push", "files_to_upload", "card_problems", "auto_map_problems",
    "check_repo_id", "resolve_model_folder", "training_push_target", "push_after_training", "push_command",
    "HubError", "REQUIRED_CARD_FIELDS",
]
